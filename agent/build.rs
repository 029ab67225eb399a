//! Embeds the eBPF object built by `cargo xtask build-ebpf`. Building the
//! agent needs no root; it needs that object.
use std::path::{Path, PathBuf};

const OBJECT: &str = "ebpf/bpfel-unknown-none/release/meshcap";

fn main() {
    println!("cargo:rerun-if-env-changed=MESHCAP_EBPF_OBJECT");
    let candidates: Vec<PathBuf> = match std::env::var_os("MESHCAP_EBPF_OBJECT") {
        Some(p) => vec![PathBuf::from(p)],
        // Read at run time (not baked in with env!), and also looked up in
        // the target directory this build uses: a checkout at another path
        // may share it.
        None => {
            let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
            let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets it"));
            // OUT_DIR is <target>/<profile>/build/<pkg>-<hash>/out.
            let target = out.ancestors().nth(4).map(Path::to_path_buf);
            let mut c = vec![manifest.join("../target").join(OBJECT)];
            c.extend(target.map(|t| t.join(OBJECT)));
            c
        }
    };
    let Some(path) = candidates.iter().find(|p| p.exists()) else {
        let tried: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
        panic!("eBPF object not found (tried {}): run `cargo xtask build-ebpf` first", tried.join(", "));
    };
    for p in &candidates {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    println!("cargo:rustc-env=MESHCAP_EBPF_OBJECT={}", path.display());
}
