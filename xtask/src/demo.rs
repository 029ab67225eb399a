//! `cargo xtask demo`: a four-pod mesh on this machine, real clients over five paths, and the evidence that each
//! path did what the mesh promises (from the agent's `/status` and from a packet capture), as a table.
//!
//! Everything the demo creates carries the name prefix `mcdemo`, so `cargo xtask demo --cleanup` can find it
//! even after the demo itself was killed.

mod agent;
mod apps;
pub(crate) mod cleanup;
pub(crate) mod mesh;
mod paths;
mod pcap;
pub(crate) mod procs;

use std::{
    path::PathBuf,
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use crate::{
    build_ebpf, setup,
    util::{is_root, sh, succeeds, workspace_root},
};
use mesh::{Mesh, Names};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Leave the mesh and the agent running, and print how to use and remove them.
    #[arg(long, conflicts_with = "cleanup")]
    keep: bool,
    /// Skip setup and builds: the binaries must already be built (used by the test, which runs inside cargo).
    #[arg(long)]
    no_build: bool,
    /// Remove whatever earlier demos left (names starting with `mcdemo`, and their agents), then exit.
    #[arg(long)]
    cleanup: bool,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    if !is_root() {
        // One line, whatever RUST_BACKTRACE says (anyhow would append a backtrace).
        eprintln!("error: cargo xtask demo must run as root (it creates network namespaces, cgroups and eBPF pins)");
        std::process::exit(1);
    }
    if args.cleanup {
        return cleanup::sweep_everything();
    }
    let started = Instant::now();
    procs::install_signal_handlers();
    if !args.no_build {
        setup::run()?;
        build_ebpf::run()?;
        let root = workspace_root();
        sh(Command::new("cargo")
            .current_dir(&root)
            .args(["build", "-p", "meshcap-agent", "-p", "meshcap-tests"])
            .arg("--bins"))?;
    }
    preflight()?;
    let bins = Binaries::locate()?;
    procs::check_interrupted()?;

    // Built before anything exists, so that every later step, failing or interrupted, is undone by its Drop.
    let mut demo = Teardown::new(Names::for_this_run()?);
    eprintln!("demo: creating the mesh ({})", demo.names.run_prefix());
    let mesh = Mesh::create(&demo.names)?;
    let agent = agent::Agent::start(&bins.agent, &demo.names, &mesh)?;
    demo.agent = Some(agent);
    let agent = demo.agent.as_mut().expect("just set");
    agent.wait_ready(&mesh, Duration::from_secs(45))?;
    eprintln!("demo: agent ready at {}; every meshed pod captured and holding an SVID", agent.admin_addr());

    let apps = apps::start(&bins.podctl, &mesh, &demo.names)?;
    demo.children.extend(apps.children);
    let (capture, tcpdump) = apps::Capture::start(&mesh, &demo.names)?;
    let tcpdump = demo.tcpdump.insert(tcpdump);

    let agent = demo.agent.as_ref().expect("agent started");
    let pending = paths::drive(agent, &mesh, &bins.podctl, &apps.backend_peer_log)?;
    let (wire, dropped) = capture.finish(tcpdump)?;
    let outcomes = paths::judge(pending, &wire, dropped);
    paths::print_table(&outcomes);
    let failed = outcomes.iter().filter(|o| !o.ok).count();
    if failed > 0 {
        eprintln!("demo: the agent's last log lines:\n{}", agent.log_tail(30));
    }

    if args.keep {
        print_keep_instructions(&demo, &mesh, &bins);
        demo.disarm();
    } else {
        drop(demo);
    }
    println!("demo: finished in {:.1} s", started.elapsed().as_secs_f64());
    if failed > 0 {
        bail!("{failed} of {} paths did not behave as expected", outcomes.len());
    }
    Ok(())
}

/// The tools the demo runs besides its own binaries (`cargo xtask setup` installs them), and the bpffs.
fn preflight() -> anyhow::Result<()> {
    for tool in ["ip", "nsenter", "curl", "tcpdump"] {
        if !succeeds("sh", &["-c", &format!("command -v {tool}")]) {
            bail!("`{tool}` is not installed; run `cargo xtask setup`");
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    if !mounts.lines().any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf")) {
        bail!("no bpf filesystem at /sys/fs/bpf; run `cargo xtask setup`");
    }
    Ok(())
}

struct Binaries {
    agent: PathBuf,
    podctl: PathBuf,
}

impl Binaries {
    /// Next to this xtask executable: `cargo xtask` and `cargo test` both build into the same profile directory,
    /// which also follows CARGO_TARGET_DIR without parsing it.
    fn locate() -> anyhow::Result<Binaries> {
        let exe = std::env::current_exe().context("locating the xtask executable")?;
        let mut dir = exe.parent().context("xtask executable has no directory")?.to_path_buf();
        if dir.file_name().is_some_and(|n| n == "deps") {
            dir.pop();
        }
        let bins = Binaries { agent: dir.join("meshcap-agent"), podctl: dir.join("podctl") };
        for bin in [&bins.agent, &bins.podctl] {
            if !bin.exists() {
                bail!("{} is missing; run `cargo xtask demo` without --no-build", bin.display());
            }
        }
        Ok(bins)
    }
}

/// Undoes the demo when dropped: on success, on error, while unwinding from a panic, and after Ctrl-C (which
/// only sets a flag that the waiting loops turn into an error). Removal goes by name, not by what was recorded,
/// so a step that failed half-way is cleaned up too.
struct Teardown {
    names: Names,
    agent: Option<agent::Agent>,
    /// The pods' apps, killed and reaped at the end.
    children: Vec<Child>,
    tcpdump: Option<Child>,
    armed: bool,
}

impl Teardown {
    fn new(names: Names) -> Teardown {
        Teardown { names, agent: None, children: Vec::new(), tcpdump: None, armed: true }
    }

    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for Teardown {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        eprintln!("demo: cleaning up {}", self.names.run_prefix());
        // The agent first: its per-pod threads hold the pods' namespaces, and it must not see pods vanish.
        if let Some(mut agent) = self.agent.take() {
            agent.stop();
        }
        for child in self.children.iter_mut().chain(self.tcpdump.as_mut()) {
            let _ = child.kill();
            let _ = child.wait();
        }
        let names = &self.names;
        cleanup::sweep(&|name: &str| names.owns(name));
    }
}

fn print_keep_instructions(demo: &Teardown, mesh: &Mesh, bins: &Binaries) {
    let names = &demo.names;
    let admin = demo.agent.as_ref().map(|a| a.admin_addr().to_string()).unwrap_or_default();
    let frontend = mesh.pod("frontend");
    let backend = mesh.pod("backend");
    println!("\nThe mesh is still running (--keep):");
    println!("  agent admin:   http://{admin}/status  (log: {})", names.scratch().join("agent.log").display());
    println!("  agent status:  {} status --admin-addr {admin}", bins.agent.display());
    println!("  pods file:     {}", names.scratch().join("pods.yaml").display());
    for pod in &mesh.pods {
        println!("  pod {:<9} {}  netns /run/netns/{}  cgroup {}", pod.name, pod.ip, pod.netns, pod.cgroup.display());
    }
    println!("  run a command in a pod (join its cgroup too, or the agent does not capture it):");
    println!(
        "    sh -c 'echo $$ > {}/cgroup.procs && exec nsenter --net=/run/netns/{} curl -s http://{}:8080/'",
        frontend.cgroup.display(),
        frontend.netns,
        backend.ip
    );
    println!("  clean up:      cargo xtask demo --cleanup");
}
