//! The demo's node and pods: a node network namespace holding a bridge, and four pods, each a network namespace
//! with a veth into that bridge plus a cgroup v2 directory; and the pods file describing them to the agent.
//!
//! Nothing is created in the host network namespace and no namespace has a default route, so no demo packet
//! can reach a real network.

use std::{
    fmt::Write as _,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context as _};

/// Every name the demo creates starts with this (netns, cgroups, pins, scratch dirs, pid files).
pub const PREFIX: &str = "mcdemo";
pub const NAMESPACE: &str = "demo";
const BRIDGE: &str = "br0";
/// The node's side of the bridge; pods are .2 upwards. Its own subnet, distinct from the test harness's.
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);

/// The pods: name, last octet of the IP, meshed.
const PODS: [(&str, u8, bool); 4] =
    [("frontend", 2, true), ("backend", 3, true), ("reports", 4, true), ("legacy", 5, false)];

/// Names of everything one demo run creates, derived from the xtask pid so that runs never collide.
pub struct Names {
    pid: u32,
    cgroup2: PathBuf,
}

impl Names {
    pub fn for_this_run() -> anyhow::Result<Names> {
        Ok(Names { pid: std::process::id(), cgroup2: cgroup2_mount()? })
    }

    /// `mcdemo-<pid>`: the pin dir and scratch dir are called this, the netns and pod cgroups start with it.
    pub fn run_prefix(&self) -> String {
        format!("{PREFIX}-{}", self.pid)
    }

    pub fn netns(&self, what: &str) -> String {
        format!("{}-{what}", self.run_prefix())
    }

    pub fn pin_dir(&self) -> PathBuf {
        Path::new("/sys/fs/bpf").join(self.run_prefix())
    }

    pub fn agent_cgroup(&self) -> String {
        format!("{PREFIX}-agent-{}", self.pid)
    }

    pub fn scratch(&self) -> PathBuf {
        Path::new("/tmp").join(self.run_prefix())
    }

    /// Where the agent's pid is recorded for `--cleanup` (a demo killed with SIGKILL cannot stop its agent).
    pub fn pid_file(&self) -> PathBuf {
        Path::new("/run").join(format!("{}.pid", self.run_prefix()))
    }

    pub fn cgroup2(&self) -> &Path {
        &self.cgroup2
    }

    /// Does a netns, cgroup, pin, scratch or pid file called `name` belong to this run?
    pub fn owns(&self, name: &str) -> bool {
        let run = self.run_prefix();
        name == run
            || name == self.agent_cgroup()
            || name.strip_prefix(&run).is_some_and(|rest| rest.starts_with('-') || rest == ".pid")
    }
}

/// The cgroup2 mount, from mountinfo: hybrid hosts have it below /sys/fs/cgroup (e.g. `unified`).
pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    info.lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .context("no cgroup2 filesystem in /proc/self/mountinfo; the demo needs cgroup v2")
}

pub struct Pod {
    pub name: &'static str,
    pub ip: Ipv4Addr,
    pub meshed: bool,
    pub netns: String,
    pub cgroup: PathBuf,
    uid: String,
}

impl Pod {
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.netns)
    }
}

pub struct Mesh {
    pub node_netns: String,
    pub pods: Vec<Pod>,
    pub pods_file: PathBuf,
}

impl Mesh {
    /// Create node, pods and pods file. On error, what exists is left for the caller's name-based teardown.
    pub fn create(names: &Names) -> anyhow::Result<Mesh> {
        fs::create_dir_all(names.scratch()).with_context(|| format!("creating {}", names.scratch().display()))?;
        let node_netns = names.netns("node");
        add_netns(&node_netns)?;
        let n = node_netns.as_str();
        ip(&["-n", n, "link", "add", BRIDGE, "type", "bridge"])?;
        ip(&["-n", n, "addr", "add", &format!("{NODE_IP}/24"), "dev", BRIDGE])?;
        ip(&["-n", n, "link", "set", BRIDGE, "up"])?;
        let mut pods = Vec::new();
        for (index, (name, host, meshed)) in PODS.into_iter().enumerate() {
            let pod = Pod {
                name,
                ip: Ipv4Addr::new(10, 250, 0, host),
                meshed,
                netns: names.netns(name),
                cgroup: names.cgroup2().join(names.netns(name)),
                uid: make_uid(index),
            };
            add_netns(&pod.netns)?;
            // Made inside the node namespace with the peer put straight into the pod's: it never appears in the
            // host namespace. The node-side name only has to be unique within the node.
            let node_end = format!("veth-{name}");
            ip(&["-n", n, "link", "add", &node_end, "type", "veth", "peer", "name", "eth0", "netns", &pod.netns])?;
            ip(&["-n", n, "link", "set", &node_end, "master", BRIDGE, "up"])?;
            ip(&["-n", &pod.netns, "addr", "add", &format!("{}/24", pod.ip), "dev", "eth0"])?;
            ip(&["-n", &pod.netns, "link", "set", "eth0", "up"])?;
            fs::create_dir(&pod.cgroup).with_context(|| format!("creating cgroup {}", pod.cgroup.display()))?;
            pods.push(pod);
        }
        let pods_file = names.scratch().join("pods.yaml");
        fs::write(&pods_file, pods_yaml(&pods)).with_context(|| format!("writing {}", pods_file.display()))?;
        Ok(Mesh { node_netns, pods, pods_file })
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no demo pod {name}"))
    }

    pub fn node_netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.node_netns)
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

/// UUID-shaped and different for every pod and run (the agent keys pins by uid).
fn make_uid(index: usize) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default();
    format!("{:08x}-{index:04x}-4000-8000-{:012x}", std::process::id(), nanos & 0xffff_ffff_ffff)
}

/// A YAML double-quoted scalar; JSON string syntax is a subset of it.
fn q(s: &str) -> String {
    serde_json::to_string(s).expect("serialising a string cannot fail")
}

/// v1 Pod documents, plus the PeerAuthentications: backend STRICT, reports explicitly PERMISSIVE (the default,
/// spelled out so `/status` names the policy that decided it).
pub fn pods_yaml(pods: &[Pod]) -> String {
    let mut out = String::from("# Written by `cargo xtask demo`.\n");
    for pod in pods {
        out.push_str("---\napiVersion: v1\nkind: Pod\nmetadata:\n");
        let _ = writeln!(out, "  namespace: {NAMESPACE}\n  name: {}\n  uid: {}", q(pod.name), q(&pod.uid));
        let _ = writeln!(out, "  labels:\n    app: {}", q(pod.name));
        if pod.meshed {
            out.push_str("    sidecar.istio.io/inject: \"true\"\n    spire-managed-identity: \"true\"\n");
        }
        let netns = pod.netns_path().display().to_string();
        let _ = writeln!(out, "  annotations:\n    meshcap.io/netns: {}", q(&netns));
        let _ = writeln!(out, "    meshcap.io/cgroup: {}", q(&pod.cgroup.display().to_string()));
        let _ = writeln!(out, "spec:\n  serviceAccountName: {}", q(pod.name));
        out.push_str("  containers:\n  - name: app\n    image: meshcap.invalid/demo\n");
        let _ = writeln!(out, "status:\n  phase: Running\n  podIP: \"{0}\"\n  podIPs:\n  - ip: \"{0}\"", pod.ip);
    }
    for (name, app, mode) in [("backend-strict", "backend", "STRICT"), ("reports-permissive", "reports", "PERMISSIVE")]
    {
        out.push_str("---\napiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata:\n");
        let _ = writeln!(out, "  name: {name}\n  namespace: {NAMESPACE}");
        let _ = writeln!(out, "spec:\n  selector:\n    matchLabels:\n      app: {app}\n  mtls:\n    mode: {mode}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_names_are_owned_and_others_are_not() {
        let names = Names { pid: 42, cgroup2: "/sys/fs/cgroup".into() };
        for own in ["mcdemo-42", "mcdemo-42-node", "mcdemo-42-frontend", "mcdemo-agent-42", "mcdemo-42.pid"] {
            assert!(names.owns(own), "{own}");
        }
        for other in ["mcdemo-421", "mcdemo-4-node", "mcdemo-agent-421", "mc42p1", "mcdemo"] {
            assert!(!names.owns(other), "{other}");
        }
    }

    #[test]
    fn pods_file_has_pods_and_policies() {
        let pods: Vec<Pod> = PODS
            .iter()
            .map(|&(name, host, meshed)| Pod {
                name,
                ip: Ipv4Addr::new(10, 250, 0, host),
                meshed,
                netns: format!("mcdemo-1-{name}"),
                cgroup: PathBuf::from(format!("/cg/mcdemo-1-{name}")),
                uid: make_uid(host.into()),
            })
            .collect();
        let yaml = pods_yaml(&pods);
        assert_eq!(yaml.matches("kind: Pod\n").count(), 4);
        assert_eq!(yaml.matches("spire-managed-identity").count(), 3);
        assert!(yaml.contains("meshcap.io/netns: \"/run/netns/mcdemo-1-legacy\""));
        assert!(yaml.contains("      app: backend\n  mtls:\n    mode: STRICT\n"));
    }
}
