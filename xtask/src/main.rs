//! Project tasks: `cargo xtask <setup|build-ebpf|test>`.

mod build_ebpf;
mod setup;
mod test;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "meshcap development tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what a fresh machine lacks (idempotent): rust-src, bpf-linker
    /// built against rustc's own LLVM, Debian packages, a bpffs mount.
    Setup,
    /// Build the eBPF object (release, with BTF) that the agent embeds.
    BuildEbpf,
    /// `cargo fmt --check` and `cargo clippy -D warnings` over the host crates.
    Lint,
    /// Build everything and run the whole test suite (privileged tests need root).
    Test {
        /// Extra arguments passed to `cargo test` (after `--`, e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::BuildEbpf => build_ebpf::run().map(|path| println!("eBPF object: {}", path.display())),
        Task::Lint => test::lint(),
        Task::Test { args } => test::run(&args),
    }
}
