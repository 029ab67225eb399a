//! `cargo xtask bench`: the same workloads between two simulated pods under each capture mode, interleaved in
//! one invocation (every round runs every mode once, in order, so machine drift hits all alike):
//! `direct` (no agent), then `iptables`, `ebpf` and `ebpf+sockmap`, each with the server under DISABLE
//! (plaintext relayed by both engines) and STRICT (mutual TLS). Results go to `<out>/bench.json` and
//! `<out>/bench.md`: medians over rounds, with each mode's ratio to `direct` and to `iptables`.

mod pods;
mod report;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use serde_json::{json, Map, Value};

use crate::{
    build_ebpf,
    demo::procs,
    setup,
    util::{is_root, sh, workspace_root},
};
use pods::{Agent, Node, SERVER_PORT};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A cut-down run (one round, short workloads, 1,000 idle connections) that finishes in under two minutes
    /// once built: proves the harness works, not the numbers.
    #[arg(long)]
    quick: bool,
    /// Where bench.json and bench.md go (relative to the workspace root).
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Skip setup and the release build (the binaries must exist in target/release).
    #[arg(long)]
    no_build: bool,
    /// Also record a system-wide `perf` profile (cpu-clock, call graphs) of the request/response c=64 workload
    /// of this setup in the first round, e.g. `--profile direct --profile "iptables mTLS"`; the report goes to
    /// `<out>/perf-<setup>.txt`.
    #[arg(long)]
    profile: Vec<String>,
}

/// One column of the table: a capture mode, and the server's PeerAuthentication mode where an agent runs.
#[derive(Clone, Copy)]
pub struct Setup {
    pub mode: &'static str,
    pub variant: &'static str,
    agent_args: &'static [&'static str],
}

impl Setup {
    pub fn key(&self) -> String {
        if self.mode == "direct" {
            "direct".into()
        } else {
            format!("{} {}", self.mode, self.variant)
        }
    }
}

pub const SETUPS: [Setup; 7] = [
    Setup { mode: "direct", variant: "", agent_args: &[] },
    Setup { mode: "iptables", variant: "plaintext", agent_args: &["--capture-mode", "iptables"] },
    Setup { mode: "iptables", variant: "mTLS", agent_args: &["--capture-mode", "iptables"] },
    Setup { mode: "ebpf", variant: "plaintext", agent_args: &[] },
    Setup { mode: "ebpf", variant: "mTLS", agent_args: &[] },
    Setup { mode: "ebpf+sockmap", variant: "plaintext", agent_args: &["--sockmap"] },
    Setup { mode: "ebpf+sockmap", variant: "mTLS", agent_args: &["--sockmap"] },
];

/// How much of everything: the full run or `--quick`.
struct Plan {
    /// Setups to profile, and where their reports go.
    profile: Vec<String>,
    out: PathBuf,
    rounds: usize,
    secs: f64,
    warmup: f64,
    bulk_bytes: u64,
    /// Idle connections held for the memory figure: 1,000, then as many as the descriptor limit allows up to
    /// 10,000 (each costs the agent four descriptors: both ends of the hop on each side).
    idle_conns: Vec<usize>,
}

impl Plan {
    fn new(quick: bool, profile: Vec<String>, out: PathBuf) -> Plan {
        if quick {
            Plan { profile, out, rounds: 1, secs: 0.5, warmup: 0.1, bulk_bytes: 128 << 20, idle_conns: vec![1000] }
        } else {
            let most = (fd_limit().saturating_sub(2000) / 4 / 500 * 500).min(10_000);
            let idle_conns = if most > 1000 { vec![1000, most] } else { vec![1000] };
            Plan { profile, out, rounds: 3, secs: 5.0, warmup: 0.5, bulk_bytes: 1 << 30, idle_conns }
        }
    }
}

struct Binaries {
    agent: PathBuf,
    loadgen: PathBuf,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    if !is_root() {
        eprintln!("error: cargo xtask bench must run as root (network namespaces, cgroups, eBPF, iptables)");
        std::process::exit(1);
    }
    let started = Instant::now();
    procs::install_signal_handlers();
    raise_fd_limit(1 << 20);
    let root = workspace_root();
    if !args.no_build {
        setup::run()?;
        build_ebpf::run()?;
        sh(Command::new("cargo").current_dir(&root).args(["build", "--release", "-p", "meshcap-agent"]).args([
            "-p",
            "meshcap-tests",
            "--bin",
            "meshcap-agent",
            "--bin",
            "loadgen",
        ]))?;
    }
    let bins = locate()?;
    let measuring = Instant::now();
    let out = if args.out.is_absolute() { args.out.clone() } else { root.join(&args.out) };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let plan = Plan::new(args.quick, args.profile.clone(), out.clone());
    pods::sweep_leftovers();
    let node = Node::create()?;
    let mut server = procs::spawn_daemon(
        node.in_pod("server", &bins.loadgen, &["serve".into(), "--port".into(), SERVER_PORT.to_string()])?,
        &node.scratch.join("server.log"),
    )?;
    procs::wait_listening(&mut server, SERVER_PORT, Duration::from_secs(10))?;
    let target = format!("{}:{SERVER_PORT}", node.pod("server").ip);

    let mut runs = Vec::new();
    for round in 0..plan.rounds {
        for setup in SETUPS {
            procs::check_interrupted()?;
            eprintln!("bench: round {}/{}: {}", round + 1, plan.rounds, setup.key());
            let measured = measure(&node, &bins, &plan, setup, &target, round)
                .with_context(|| format!("round {}, {}", round + 1, setup.key()))?;
            runs.push(json!({"round": round, "setup": setup.key(), "results": measured}));
        }
    }
    procs::terminate(&mut server, Duration::from_secs(2));
    drop(node);

    let measured_secs = measuring.elapsed().as_secs_f64();
    let command = format!("cargo xtask bench{}", if args.quick { " --quick" } else { "" });
    let summary = report::summarize(&runs);
    let doc = json!({
        "command": command,
        "machine": report::machine(),
        "load_generator": "loadgen (tests/src/bin/loadgen.rs): tokio, one thread, HDR histogram",
        "plan": {"rounds": plan.rounds, "secs": plan.secs, "bulk_bytes": plan.bulk_bytes, "idle_conns": plan.idle_conns},
        "measured_secs": measured_secs,
        "summary": summary,
        "runs": runs,
    });
    let json_path = out.join("bench.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&doc)?)?;
    let table = report::markdown(&doc);
    std::fs::write(out.join("bench.md"), &table)?;
    println!("{table}");
    println!(
        "bench: wrote {} and bench.md; measuring took {measured_secs:.0} s ({:.0} s with the build)",
        json_path.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// release binaries: `<target>/release`, found from this executable's `<target>/<profile>` (follows
/// CARGO_TARGET_DIR without parsing it).
fn locate() -> anyhow::Result<Binaries> {
    let exe = std::env::current_exe().context("locating the xtask executable")?;
    let profile_dir = exe.parent().context("xtask executable has no directory")?;
    let target = profile_dir.parent().context("no target directory")?;
    let dir = target.join("release");
    let bins = Binaries { agent: dir.join("meshcap-agent"), loadgen: dir.join("loadgen") };
    for bin in [&bins.agent, &bins.loadgen] {
        if !bin.exists() {
            bail!("{} is missing; run `cargo xtask bench` without --no-build", bin.display());
        }
    }
    Ok(bins)
}

/// One setup in one round: the agent (if any) started and settled, the workloads, the memory figures.
fn measure(
    node: &Node,
    bins: &Binaries,
    plan: &Plan,
    setup: Setup,
    target: &str,
    round: usize,
) -> anyhow::Result<Map<String, Value>> {
    let memory = round == 0;
    let mut results = Map::new();
    let enrolled = setup.mode != "direct";
    let mtls_mode = if setup.variant == "mTLS" { "STRICT" } else { "DISABLE" };
    node.write_pods(enrolled, mtls_mode)?;
    let mut agent = None;
    if enrolled {
        let mut a = Agent::start(&bins.agent, node, setup.agent_args, &setup.key().replace([' ', '+'], "_"))?;
        a.wait_settled(node.pods.len(), true, mtls_mode)?;
        std::thread::sleep(Duration::from_millis(500));
        results.insert("rss_10_pods_idle_mib".into(), json!(pods::rss_kib(a.pid())? as f64 / 1024.0));
        agent = Some(a);
    }
    let secs = plan.secs.to_string();
    let warmup = plan.warmup.to_string();
    for conns in [1, 16, 64] {
        let profiling = conns == 64 && round == 0 && plan.profile.contains(&setup.key());
        let perf = if profiling { Some(Profile::start(&plan.out, &setup.key())?) } else { None };
        let r = loadgen(
            node,
            bins,
            &[
                "rr",
                "--addr",
                target,
                "--conns",
                &conns.to_string(),
                "--size",
                "1024",
                "--secs",
                &secs,
                "--warmup-secs",
                &warmup,
            ],
        )?;
        results.insert(format!("rr_c{conns}_per_sec"), r["per_sec"].clone());
        results.insert(format!("rr_c{conns}_p50_us"), r["p50_us"].clone());
        results.insert(format!("rr_c{conns}_p99_us"), r["p99_us"].clone());
        if let Some(perf) = perf {
            perf.finish()?;
        }
    }
    let r = loadgen(node, bins, &["connrate", "--addr", target, "--conns", "8", "--size", "1024", "--secs", &secs])?;
    results.insert("conn_per_sec".into(), r["per_sec"].clone());
    results.insert("conn_ttfb_p99_us".into(), r["p99_us"].clone());
    let cpu_before = agent.as_ref().map(|a| pods::cpu_seconds(a.pid())).transpose()?;
    let r = loadgen(node, bins, &["bulk", "--addr", target, "--bytes", &plan.bulk_bytes.to_string()])?;
    results.insert("bulk_gbit_per_sec".into(), r["gbit_per_sec"].clone());
    if let (Some(a), Some(before)) = (&agent, cpu_before) {
        let gib = plan.bulk_bytes as f64 / (1u64 << 30) as f64;
        results.insert("bulk_agent_cpu_s_per_gib".into(), json!((pods::cpu_seconds(a.pid())? - before) / gib));
    }
    if let (Some(a), true) = (&agent, memory) {
        for (i, &n) in plan.idle_conns.iter().enumerate() {
            let per_conn = idle_connections(node, bins, a, target, n)?;
            let key = if i == 0 { "rss_per_idle_conn_1000_kib" } else { "rss_per_idle_conn_most_kib" };
            results.insert(key.into(), json!(per_conn));
        }
    }
    if let Some(mut a) = agent {
        // Unenroll everything before the agent goes, so its capture (pins, iptables rules) leaves with it
        // and the next setup starts clean.
        node.write_pods(false, mtls_mode)?;
        a.wait_settled(node.pods.len(), false, mtls_mode)?;
        a.stop();
        let _ = std::fs::remove_dir_all(node.pin_dir());
    }
    Ok(results)
}

/// Runs loadgen in the client pod and returns its report.
fn loadgen(node: &Node, bins: &Binaries, args: &[&str]) -> anyhow::Result<Value> {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let cmd = node.in_pod("client", &bins.loadgen, &args)?;
    let out = procs::run_with_timeout(cmd, Duration::from_secs(300))?;
    let report: Value =
        String::from_utf8_lossy(&out.stdout).lines().rev().find_map(|l| serde_json::from_str(l).ok()).with_context(
            || format!("loadgen {}: no report; stderr: {}", args[0], String::from_utf8_lossy(&out.stderr)),
        )?;
    if report["ok"] != true {
        bail!("loadgen {}: {report}", args.join(" "));
    }
    Ok(report)
}

/// Agent memory per idle relayed connection: RSS with `n` connections held open through the engine, less RSS
/// before, over `n` (KiB).
fn idle_connections(node: &Node, bins: &Binaries, agent: &Agent, target: &str, n: usize) -> anyhow::Result<f64> {
    let before = pods::rss_kib(agent.pid())?;
    let args = ["hold".to_string(), "--addr".into(), target.into(), "--conns".into(), n.to_string()];
    let mut cmd = node.in_pod("client", &bins.loadgen, &args)?;
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn()?;
    let mut line = String::new();
    let mut stdout = BufReader::new(child.stdout.take().context("hold's stdout")?);
    stdout.read_line(&mut line)?;
    let held: Value = serde_json::from_str(line.trim()).with_context(|| format!("hold reported {line:?}"))?;
    if held["ok"] != true {
        let _ = child.kill();
        let _ = child.wait();
        bail!("holding {n} connections: {held}");
    }
    std::thread::sleep(Duration::from_secs(2));
    let during = pods::rss_kib(agent.pid())?;
    // Closing stdin releases the connections.
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.flush();
    }
    let _ = child.wait();
    drop(stdout);
    std::thread::sleep(Duration::from_millis(500));
    Ok(during.saturating_sub(before) as f64 / n as f64)
}

/// Children (agent, load generators) inherit it. A container may forbid raising the hard limit; then the soft
/// one goes up to it and the idle-connection count follows.
fn raise_fd_limit(want: u64) {
    let lim = libc::rlimit { rlim_cur: want, rlim_max: want };
    // SAFETY: get/setrlimit on local structs.
    unsafe {
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            let mut have = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut have) == 0 {
                have.rlim_cur = have.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &have);
                eprintln!("bench: open files limited to {} here (cannot raise the hard limit)", have.rlim_max);
            }
        }
    }
}

fn fd_limit() -> usize {
    let mut have = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit on a local struct.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut have) };
    have.rlim_cur as usize
}

/// `perf record -a` around one workload, then a flat report by command, object and symbol.
struct Profile {
    child: std::process::Child,
    data: PathBuf,
    report: PathBuf,
}

impl Profile {
    fn start(out: &std::path::Path, setup: &str) -> anyhow::Result<Profile> {
        let name = setup.replace([' ', '+'], "_");
        let data = out.join(format!("perf-{name}.data"));
        let report = out.join(format!("perf-{name}.txt"));
        let child = Command::new("perf")
            .args(["record", "-a", "-g", "-e", "cpu-clock", "-F", "999", "-o"])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("running perf (Debian package linux-perf)")?;
        std::thread::sleep(Duration::from_millis(300));
        Ok(Profile { child, data, report })
    }

    fn finish(mut self) -> anyhow::Result<()> {
        // SAFETY: kill(2) on our own unreaped child; SIGINT makes perf write its data and exit.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        let _ = self.child.wait();
        let out = Command::new("perf")
            .args([
                "report",
                "--stdio",
                "--no-children",
                "--sort",
                "comm,dso,symbol",
                "--percent-limit",
                "0.5",
                "-g",
                "none",
            ])
            // Only the benchmark's processes (the agent's threads are tokio-rt-worker), relative to their total:
            // the machine may be busy with other work.
            .args(["--comms", "loadgen,tokio-rt-worker,meshcap-agent", "--percentage", "relative", "-i"])
            .arg(&self.data)
            .output()
            .context("perf report")?;
        std::fs::write(&self.report, &out.stdout)?;
        eprintln!("bench: profile in {}", self.report.display());
        Ok(())
    }
}
