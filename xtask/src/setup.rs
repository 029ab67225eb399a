//! Idempotent machine setup. Everything here checks before it installs, so a
//! second run takes a second.

use std::{fs, path::PathBuf, process::Command};

use anyhow::{bail, Context as _};

use crate::{
    build_ebpf::TOOLCHAIN,
    util::{is_root, output, sh, succeeds},
};

const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages the tests and tools use, by the command that shows each is present.
const PACKAGES: &[(&str, &str)] = &[
    ("bpftool", "bpftool"),
    ("ip", "iproute2"),
    ("nsenter", "util-linux"),
    ("curl", "curl"),
    ("python3", "python3"),
    ("sysctl", "procps"),
    ("tcpdump", "tcpdump"),
    ("shellcheck", "shellcheck"),
    // The iptables capture mode (the benchmark's baseline) and its test; nft backend.
    ("iptables-restore", "iptables"),
];

pub fn run() -> anyhow::Result<()> {
    rust_src()?;
    bpf_linker()?;
    packages()?;
    bpffs()?;
    eprintln!("setup: done");
    Ok(())
}

fn rust_src() -> anyhow::Result<()> {
    let installed =
        output(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", TOOLCHAIN]))?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    sh(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", TOOLCHAIN]))
}

/// bpf-linker links against an LLVM; these machines have none but rustc's
/// own, so build it against that one through a prefix of two symlinks.
fn bpf_linker() -> anyhow::Result<()> {
    let rustc = output(Command::new("rustc").arg(format!("+{TOOLCHAIN}")).arg("-vV"))?;
    let llvm_major = rustc
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc -vV shows no LLVM version")?
        .to_string();
    let have = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if have.contains(BPF_LINKER_VERSION) && succeeds("bpf-linker", &["--version"]) {
        return Ok(());
    }
    let sysroot =
        PathBuf::from(output(Command::new("rustc").arg(format!("+{TOOLCHAIN}")).args(["--print", "sysroot"]))?.trim());
    let lib = sysroot.join("lib");
    let libllvm = fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let prefix = PathBuf::from(home).join(".cache/meshcap/llvm-prefix");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)?;
    for name in ["libLLVM.so", libllvm.as_str()] {
        let link = prefix_lib.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(lib.join(&libllvm), &link).with_context(|| format!("linking {}", link.display()))?;
    }
    sh(Command::new("cargo")
        .arg(format!("+{TOOLCHAIN}"))
        .args(["install", &format!("bpf-linker@{BPF_LINKER_VERSION}"), "--locked", "--force", "--no-default-features"])
        .args(["--features", &format!("llvm-{llvm_major}")])
        .env("LLVM_PREFIX", &prefix))?;
    if !succeeds("bpf-linker", &["--version"]) {
        bail!("bpf-linker was installed but does not run");
    }
    Ok(())
}

fn packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(cmd, _)| !succeeds("sh", &["-c", &format!("command -v {cmd}")]))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!("missing Debian packages {missing:?}; run `cargo xtask setup` as root to install them");
    }
    sh(Command::new("apt-get").args(["update", "-qq"]))?;
    sh(Command::new("apt-get").args(["install", "-y", "-qq"]).args(&missing).env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Pins live on a bpf filesystem; a fresh machine may not have one mounted.
fn bpffs() -> anyhow::Result<()> {
    let mounts = fs::read_to_string("/proc/self/mounts")?;
    if mounts.lines().any(|l| l.split_whitespace().nth(2) == Some("bpf")) {
        return Ok(());
    }
    if !is_root() {
        eprintln!("setup: no bpf filesystem mounted; the agent needs one (`mount -t bpf bpf /sys/fs/bpf` as root)");
        return Ok(());
    }
    sh(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}
