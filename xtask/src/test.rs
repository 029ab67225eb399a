use std::process::Command;

use crate::{build_ebpf, util::sh, util::workspace_root};

/// The eBPF crate only builds for its own target: leave it out of host builds.
const HOST: [&str; 3] = ["--workspace", "--exclude", "meshcap-ebpf"];

pub fn lint() -> anyhow::Result<()> {
    build_ebpf::run()?;
    let root = workspace_root();
    sh(Command::new("cargo").current_dir(&root).args(["fmt", "--all", "--check"]))?;
    sh(Command::new("cargo").current_dir(&root).arg("clippy").args(HOST).args([
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
}

/// The README's test command: setup (idempotent), eBPF object, all
/// binaries, then every test.
pub fn run(extra: &[String]) -> anyhow::Result<()> {
    crate::setup::run()?;
    build_ebpf::run()?;
    let root = workspace_root();
    sh(Command::new("cargo").current_dir(&root).arg("build").args(HOST).arg("--bins"))?;
    sh(Command::new("cargo").current_dir(&root).arg("test").args(HOST).args(["--no-fail-fast", "--"]).args(extra))
}
