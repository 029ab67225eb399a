//! The benchmark's node: a node network namespace with a bridge, a `client` and a `server` pod and eight idle
//! pods (ten enrolled pods for the memory figure), each a netns with a veth plus a cgroup; the pods file that
//! enrolls them (or not) under one PeerAuthentication; and the agent serving it.
//!
//! Everything is named `mcbench-<pid>-…`, and removed by name (see `demo::cleanup`) at the end and, for
//! leftovers of a killed run, at the start.

use std::{
    fmt::Write as _,
    fs,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context as _};
use serde_json::Value;

use crate::demo::{cleanup, mesh::cgroup2_mount, procs};

pub const PREFIX: &str = "mcbench";
/// Own subnet, distinct from the demo's and the test harness's.
const SUBNET: [u8; 3] = [10, 251, 0];
pub const SERVER_PORT: u16 = 8080;
const IDLE_PODS: usize = 8;

pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    pub netns: PathBuf,
    pub cgroup: PathBuf,
    uid: String,
}

pub struct Node {
    run: String,
    pub scratch: PathBuf,
    pub pods: Vec<Pod>,
    pub pods_file: PathBuf,
}

impl Node {
    pub fn create() -> anyhow::Result<Node> {
        let run = format!("{PREFIX}-{}", std::process::id());
        let scratch = Path::new("/tmp").join(&run);
        fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
        let cgroup2 = cgroup2_mount()?;
        // From here on, Drop removes whatever exists, also after an error half-way.
        let mut node = Node { pods_file: scratch.join("pods.yaml"), run, scratch, pods: Vec::new() };
        let n = node.netns_name("node");
        add_netns(&n)?;
        ip(&["-n", &n, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &n, "link", "set", "br0", "up"])?;
        let names =
            ["client".to_string(), "server".to_string()].into_iter().chain((0..IDLE_PODS).map(|i| format!("idle{i}")));
        for (i, name) in names.enumerate() {
            let netns_name = node.netns_name(&name);
            let pod = Pod {
                ip: Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], 2 + i as u8),
                netns: Path::new("/run/netns").join(&netns_name),
                cgroup: cgroup2.join(&netns_name),
                uid: format!("{:08x}-{i:04x}-4000-8000-000000000bec", std::process::id()),
                name,
            };
            add_netns(&netns_name)?;
            let node_end = format!("veth{i}");
            ip(&["-n", &n, "link", "add", &node_end, "type", "veth", "peer", "name", "eth0", "netns", &netns_name])?;
            ip(&["-n", &n, "link", "set", &node_end, "master", "br0", "up"])?;
            ip(&["-n", &netns_name, "addr", "add", &format!("{}/24", pod.ip), "dev", "eth0"])?;
            ip(&["-n", &netns_name, "link", "set", "eth0", "up"])?;
            // A new connection per request leaves TIME_WAIT sockets behind; let connects reuse them, as busy
            // clients are configured to, so every mode meets the same port supply. The range stays clear of
            // the engine's and the server's ports (an ephemeral 15006 would block the listener's bind).
            sysctl(&netns_name, "net.ipv4.tcp_tw_reuse=1")?;
            sysctl(&netns_name, "net.ipv4.ip_local_port_range=20000 65000")?;
            fs::create_dir(&pod.cgroup).with_context(|| format!("creating cgroup {}", pod.cgroup.display()))?;
            node.pods.push(pod);
        }
        Ok(node)
    }

    fn netns_name(&self, what: &str) -> String {
        format!("{}-{what}", self.run)
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods.iter().find(|p| p.name == name).expect("a bench pod")
    }

    pub fn pin_dir(&self) -> PathBuf {
        Path::new("/sys/fs/bpf").join(&self.run)
    }

    pub fn agent_cgroup(&self) -> String {
        format!("{}-agent", self.run)
    }

    /// All pods enrolled (or none), the server under `mtls_mode` (a PeerAuthentication selecting it).
    pub fn write_pods(&self, enrolled: bool, mtls_mode: &str) -> anyhow::Result<()> {
        let mut out = String::from("# Written by `cargo xtask bench`.\n");
        for pod in &self.pods {
            out.push_str("---\napiVersion: v1\nkind: Pod\nmetadata:\n");
            let _ = writeln!(out, "  namespace: bench\n  name: {}\n  uid: {}", pod.name, pod.uid);
            let _ = writeln!(out, "  labels:\n    app: {}", pod.name);
            if enrolled {
                out.push_str("    sidecar.istio.io/inject: \"true\"\n    spire-managed-identity: \"true\"\n");
            }
            let _ = writeln!(out, "  annotations:\n    meshcap.io/netns: \"{}\"", pod.netns.display());
            let _ = writeln!(out, "    meshcap.io/cgroup: \"{}\"", pod.cgroup.display());
            let _ = writeln!(out, "spec:\n  serviceAccountName: {}", pod.name);
            out.push_str("  containers:\n  - name: app\n    image: meshcap.invalid/bench\n");
            let _ = writeln!(out, "status:\n  phase: Running\n  podIP: \"{0}\"\n  podIPs:\n  - ip: \"{0}\"", pod.ip);
        }
        out.push_str("---\napiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata:\n");
        out.push_str("  name: server\n  namespace: bench\nspec:\n  selector:\n    matchLabels:\n      app: server\n");
        let _ = writeln!(out, "  mtls:\n    mode: {mtls_mode}");
        let tmp = self.scratch.join(".pods.yaml.tmp");
        fs::write(&tmp, out).with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &self.pods_file).with_context(|| format!("writing {}", self.pods_file.display()))
    }

    /// A command run inside `pod`: its netns and its cgroup, as the pod's own processes.
    pub fn in_pod(&self, pod: &str, program: &Path, args: &[String]) -> anyhow::Result<Command> {
        let pod = self.pod(pod);
        procs::in_netns(program, args, &pod.netns, Some(&pod.cgroup))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let run = self.run.clone();
        cleanup::sweep(&|name: &str| name == run || name.starts_with(&format!("{run}-")));
    }
}

/// Leftovers of a bench that was killed: its agent first (by the pin dir on its command line), then names.
pub fn sweep_leftovers() {
    let ours = format!("{PREFIX}-{}", std::process::id());
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains("meshcap-agent") && cmdline.contains(&format!("/sys/fs/bpf/{PREFIX}-")) {
            // SAFETY: kill(2); the command line was checked just before.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    let removed = cleanup::sweep(&|name: &str| name.starts_with(&format!("{PREFIX}-")) && !name.starts_with(&ours));
    if removed > 0 {
        eprintln!("bench: removed {removed} leftover(s) of an earlier run");
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).stdin(Stdio::null()).output().context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!("ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn add_netns(name: &str) -> anyhow::Result<()> {
    ip(&["netns", "add", name])?;
    ip(&["-n", name, "link", "set", "lo", "up"])
}

fn sysctl(netns: &str, setting: &str) -> anyhow::Result<()> {
    let out = Command::new("ip").args(["netns", "exec", netns, "sysctl", "-q", "-w", setting]).output()?;
    if !out.status.success() {
        bail!("sysctl {setting} in {netns}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// A running agent: its process, admin address and log.
pub struct Agent {
    child: Child,
    admin: SocketAddr,
    pub log: PathBuf,
}

impl Agent {
    pub fn start(binary: &Path, node: &Node, extra: &[&str], label: &str) -> anyhow::Result<Agent> {
        let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let mut cmd = Command::new(binary);
        cmd.arg("run")
            .arg("--pods")
            .arg(&node.pods_file)
            .arg("--pin-dir")
            .arg(node.pin_dir())
            .args(["--agent-cgroup", &node.agent_cgroup(), "--admin-addr", &admin.to_string()])
            .args(["--metrics-addr", "127.0.0.1:0", "--readiness-addr", "127.0.0.1:0", "--pods-poll", "100ms"])
            .args(["--kubelet-cgroup", "none"])
            .args(extra)
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1");
        let log = node.scratch.join(format!("agent-{label}.log"));
        let child = procs::spawn_daemon(cmd, &log)?;
        Ok(Agent { child, admin, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn status(&self) -> anyhow::Result<Value> {
        http_get_json(self.admin, "/status")
    }

    /// Until every pod in the file is captured (or, with `enrolled` false, none is) and the server's
    /// inbound mode is `mtls_mode`.
    pub fn wait_settled(&mut self, pods: usize, enrolled: bool, mtls_mode: &str) -> anyhow::Result<()> {
        let mut last = Value::Null;
        let mut exited = None;
        let ok = procs::wait_until(Duration::from_secs(60), || {
            if let Ok(Some(status)) = self.child.try_wait() {
                exited = Some(status);
                return true;
            }
            let Ok(status) = self.status() else { return false };
            last = status;
            let list = last["pods"].as_array().cloned().unwrap_or_default();
            let captured = list.iter().filter(|p| p["captured"] == true).count();
            let server_mode = list.iter().find(|p| p["name"] == "server").map(|p| p["mtls"]["mode"].clone());
            if enrolled {
                captured == pods && server_mode.is_some_and(|m| m == mtls_mode)
            } else {
                list.len() == pods && captured == 0
            }
        })?;
        if let Some(status) = exited {
            bail!("the agent exited ({status}); its log:\n{}", tail(&self.log));
        }
        if !ok {
            bail!("the agent did not settle in 60 s; last /status: {last}\nlog:\n{}", tail(&self.log));
        }
        Ok(())
    }

    pub fn stop(&mut self) {
        procs::terminate(&mut self.child, Duration::from_secs(10));
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

fn tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

fn http_get_json(addr: SocketAddr, path: &str) -> anyhow::Result<Value> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let end = response.windows(4).position(|w| w == b"\r\n\r\n").context("no end of headers")?;
    serde_json::from_slice(&response[end + 4..]).with_context(|| format!("GET {path}: body is not JSON"))
}

/// Resident memory of a process, in KiB (VmRSS).
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")
}

/// User plus system CPU time of a process (all threads), in seconds.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at ") "; utime and stime are fields 14, 15.
    let rest = stat.rsplit_once(") ").context("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks as f64 / hz)
}
