//! Embeds the eBPF object built by `cargo xtask build-ebpf`. Building the
//! agent needs no root; it needs that object.
use std::path::PathBuf;

fn main() {
    let path = match std::env::var_os("MESHCAP_EBPF_OBJECT") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/ebpf/bpfel-unknown-none/release/meshcap"),
    };
    println!("cargo:rerun-if-env-changed=MESHCAP_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", path.display());
    if !path.exists() {
        panic!("eBPF object {} not found: run `cargo xtask build-ebpf` first", path.display());
    }
    println!("cargo:rustc-env=MESHCAP_EBPF_OBJECT={}", path.display());
}
