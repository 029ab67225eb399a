use std::process::Command;

use crate::{build_ebpf, util::sh, util::workspace_root};

/// The README's test command: eBPF object, all binaries, then every test.
pub fn run(extra: &[String]) -> anyhow::Result<()> {
    build_ebpf::run()?;
    let root = workspace_root();
    // The eBPF crate only builds for its own target: leave it out here.
    let host = ["--workspace", "--exclude", "meshcap-ebpf"];
    sh(Command::new("cargo").current_dir(&root).arg("build").args(host).arg("--bins"))?;
    sh(Command::new("cargo").current_dir(&root).arg("test").args(host).args(["--no-fail-fast", "--"]).args(extra))
}
