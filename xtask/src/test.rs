use std::process::Command;

use crate::{build_ebpf, util::sh, util::workspace_root};

/// The README's test command: eBPF object, all binaries, then every test.
pub fn run(extra: &[String]) -> anyhow::Result<()> {
    build_ebpf::run()?;
    let root = workspace_root();
    sh(Command::new("cargo").current_dir(&root).args(["build", "--workspace", "--bins"]))?;
    sh(Command::new("cargo").current_dir(&root).args(["test", "--workspace", "--no-fail-fast", "--"]).args(extra))
}
