use std::{path::PathBuf, process::Command};

use anyhow::Context as _;

use crate::util::{sh, workspace_root};

pub const TOOLCHAIN: &str = "stable";
const TARGET: &str = "bpfel-unknown-none";

/// Where the object lands; the agent's build script reads it from here.
pub fn object_path() -> PathBuf {
    workspace_root().join("target/ebpf").join(TARGET).join("release/meshcap")
}

/// Builds the eBPF crate on stable with RUSTC_BOOTSTRAP for `-Z build-std`
/// (only for this sub-build), in its own target dir so its rustflags never
/// invalidate the host build.
pub fn run() -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    let flags = ["--cfg=bpf_target_arch=\"x86_64\"", "-Cdebuginfo=2", "-Clink-arg=--btf"].join("\x1f");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&root)
        .arg(format!("+{TOOLCHAIN}"))
        .args(["build", "--package", "meshcap-ebpf", "--bins", "--release", "--target", TARGET])
        .args(["-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(root.join("target/ebpf"))
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_ENCODED_RUSTFLAGS", flags)
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTFLAGS");
    sh(&mut cmd).context("building the eBPF programs (did `cargo xtask setup` run?)")?;
    Ok(object_path())
}
