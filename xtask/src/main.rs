//! Project tasks: `cargo xtask <setup|build-ebpf|lint|test|demo|bench>`.

mod bench;
mod build_ebpf;
mod demo;
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
    /// As root: a four-pod mesh on this machine (mTLS, STRICT, PERMISSIVE, a pod outside the mesh), real clients
    /// over five paths, and a table of what the agent and the wire show. Cleans up after itself.
    Demo(demo::Args),
    /// As root: no mesh, iptables capture, eBPF capture and eBPF with sk_msg splicing, side by side on the same
    /// workloads (plaintext and mTLS), interleaved; a markdown table and JSON under target/bench/.
    Bench(bench::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::BuildEbpf => build_ebpf::run().map(|path| println!("eBPF object: {}", path.display())),
        Task::Lint => test::lint(),
        Task::Test { args } => test::run(&args),
        Task::Demo(args) => demo::run(&args),
        Task::Bench(args) => bench::run(&args),
    }
}
