//! A simulated node (a network namespace with a bridge) and its pods (a network namespace with a veth on the
//! bridge, plus a cgroup v2 directory), torn down on drop.

use std::{
    collections::BTreeMap,
    ffi::OsStr,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use sha2::{Digest as _, Sha256};

use super::{
    cgroup2_mount, cleanup,
    names::{self, Kind},
    wait_until,
};

mod process;

pub use process::PodProcess;

/// How long `run` lets a program take before killing it, so a hung client fails a test instead of hanging CI.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// First IPv4/IPv6 host number given to a pod; .1 is the node's bridge.
const FIRST_POD_HOST: u32 = 2;

/// What the node must clean up for a pod that is still alive when the node goes.
struct PodResources {
    netns: String,
    cgroup: PathBuf,
}

impl PodResources {
    fn remove(&self) {
        cleanup::remove_cgroup(&self.cgroup);
        cleanup::delete_netns(&self.netns);
    }
}

type Registry = Arc<Mutex<Vec<PodResources>>>;

fn take_registered(registry: &Registry, netns: &str) -> Option<PodResources> {
    let mut pods = registry.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let index = pods.iter().position(|p| p.netns == netns)?;
    Some(pods.swap_remove(index))
}

/// Run a setup command; setup failures are fatal for the test, with the command and its stderr in the message.
fn sh(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("starting {program} {}: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "{program} {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

/// `ip netns add` plus what every namespace of the harness needs: lo up and no IPv6 duplicate address detection,
/// which would otherwise keep new addresses unusable ("tentative") for a second or more.
fn add_netns(name: &str) {
    sh("ip", &["netns", "add", name]);
    // nsenter rather than `ip netns exec`: the latter remounts /sys, which sysctl does not need.
    let net = format!("--net={}", netns_path(name).display());
    let sysctls = ["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"];
    sh("nsenter", &[net.as_str(), "sysctl", "-q", "-w", sysctls[0], sysctls[1]]);
    sh("ip", &["-n", name, "link", "set", "lo", "up"]);
}

/// A per-test node: a network namespace holding bridge `br0` (10.244.0.1/24, fd00:10:244::1/64) that its pods
/// are plugged into. Nothing is created in the host network namespace.
pub struct Node {
    netns: String,
    scratch: PathBuf,
    next_host: AtomicU32,
    pods: Registry,
}

impl Node {
    pub const BRIDGE: &'static str = "br0";

    pub fn new(test_name: &str) -> Node {
        let netns = names::unique(Kind::Node);
        let scratch = std::env::temp_dir().join(&netns);
        eprintln!("harness: node {netns} for test {test_name}");
        // Built before the setup steps so that a failing step still tears down what the earlier ones made.
        let node = Node { netns, scratch, next_host: AtomicU32::new(FIRST_POD_HOST), pods: Registry::default() };
        std::fs::create_dir_all(&node.scratch).expect("creating the node's scratch dir");
        let n = node.netns.as_str();
        add_netns(n);
        sh("ip", &["-n", n, "link", "add", Self::BRIDGE, "type", "bridge"]);
        sh("ip", &["-n", n, "addr", "add", "10.244.0.1/24", "dev", Self::BRIDGE]);
        sh("ip", &["-n", n, "addr", "add", "fd00:10:244::1/64", "dev", Self::BRIDGE, "nodad"]);
        sh("ip", &["-n", n, "link", "set", Self::BRIDGE, "up"]);
        node
    }

    /// Name of the node's network namespace (under /run/netns).
    pub fn netns_name(&self) -> &str {
        &self.netns
    }

    pub fn netns_path(&self) -> PathBuf {
        netns_path(&self.netns)
    }

    /// The bridge's addresses, which pods can reach (the "host side" of the node).
    pub fn ip4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, 0, 1)
    }

    pub fn ip6(&self) -> Ipv6Addr {
        pod_ip6(1)
    }

    /// A directory for the test's files (pods file, logs), removed with the node.
    pub fn scratch_dir(&self) -> &Path {
        &self.scratch
    }

    /// Create a pod on this node. Its addresses are 10.244.0.N and fd00:10:244::N, N counting up from 2.
    pub fn add_pod(&self, name: &str) -> Pod {
        let host = self.next_host.fetch_add(1, Ordering::Relaxed);
        self.add_pod_at(name, host)
    }

    /// Create a pod with the addresses 10.244.0.`host` and fd00:10:244::`host`, e.g. to reuse the address of
    /// a pod that was dropped.
    pub fn add_pod_at(&self, name: &str, host: u32) -> Pod {
        let netns = names::unique(Kind::Pod);
        let cgroup = cgroup2_mount().join(&netns);
        self.make_pod(name, host, netns, make_uid(), cgroup.clone(), cgroup)
    }

    /// The cgroup directory this node's kubelet puts pods under (`--cgroup-root` for an agent reading the
    /// Kubernetes API): a unique directory below the cgroup2 mount, removed with the node.
    pub fn kubelet_cgroup_root(&self) -> PathBuf {
        cgroup2_mount().join(&self.netns)
    }

    /// Create a pod laid out as a kubelet with the systemd cgroup driver does for a BestEffort pod:
    /// `<kubelet root>/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice/
    /// cri-containerd-<id>.scope`, with a long-lived "pause" process in that scope and the pod's netns, so the
    /// agent can find both from the pod's UID alone. Commands run in the pod join the container scope.
    pub fn add_kube_pod(&self, name: &str) -> Pod {
        let host = self.next_host.fetch_add(1, Ordering::Relaxed);
        self.add_kube_pod_at(name, host)
    }

    pub fn add_kube_pod_at(&self, name: &str, host: u32) -> Pod {
        let netns = names::unique(Kind::Pod);
        let uid = make_uid();
        let qos = self.kubelet_cgroup_root().join("kubepods.slice/kubepods-besteffort.slice");
        let slice = qos.join(format!("kubepods-besteffort-pod{}.slice", uid.replace('-', "_")));
        let container: String = Sha256::digest(uid.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
        let scope = slice.join(format!("cri-containerd-{container}.scope"));
        std::fs::create_dir_all(&qos).unwrap_or_else(|e| panic!("creating {}: {e}", qos.display()));
        std::fs::create_dir(&slice).unwrap_or_else(|e| panic!("creating {}: {e}", slice.display()));
        let mut pod = self.make_pod(name, host, netns, uid, slice, scope);
        let pause = pod.spawn("sleep", ["infinity"]);
        pod.pause = Some(pause);
        pod
    }

    fn make_pod(&self, name: &str, host: u32, netns: String, uid: String, owned: PathBuf, cgroup: PathBuf) -> Pod {
        assert!((FIRST_POD_HOST..255).contains(&host), "a node holds at most {} pods", 255 - FIRST_POD_HOST);
        self.pods
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(PodResources { netns: netns.clone(), cgroup: owned });
        let pod = Pod {
            name: name.to_string(),
            uid,
            namespace: "default".to_string(),
            service_account: name.to_string(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            netns,
            cgroup,
            ip4: Ipv4Addr::new(10, 244, 0, host as u8),
            ip6: pod_ip6(host as u16),
            registry: Arc::clone(&self.pods),
            pause: None,
        };
        pod.setup(&self.netns);
        pod
    }

    /// A command that runs in the node's network namespace (but in no pod cgroup): a client "on the host side".
    pub fn command<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        process::entering_command(program, args, &self.netns_path(), None)
    }

    pub fn spawn<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> PodProcess
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        PodProcess::spawn(self.command(program, args), &self.netns)
    }

    pub fn run<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        process::run_with_timeout(self.command(program, args), RUN_TIMEOUT)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let leftovers: Vec<_> = std::mem::take(&mut *self.pods.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
        for pod in &leftovers {
            pod.remove();
        }
        cleanup::remove_cgroup(&self.kubelet_cgroup_root());
        cleanup::delete_netns(&self.netns);
        if let Err(e) = std::fs::remove_dir_all(&self.scratch) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("harness: removing {}: {e}", self.scratch.display());
            }
        }
    }
}

fn pod_ip6(host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, host)
}

/// A UUID-shaped (version 4 layout) id that differs between pods, processes and runs.
fn make_uid() -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default();
    let seed = format!("{}/{}/{nanos}", std::process::id(), names::next_counter());
    let mut b: [u8; 16] = Sha256::digest(seed.as_bytes())[..16].try_into().expect("sha256 is 32 bytes");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..])
}

/// A simulated pod. The Kubernetes-facing fields are public so a test can shape what `pods_yaml` reports.
pub struct Pod {
    pub name: String,
    pub uid: String,
    pub namespace: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    netns: String,
    cgroup: PathBuf,
    ip4: Ipv4Addr,
    ip6: Ipv6Addr,
    registry: Registry,
    /// The sandbox's process of a pod made by `Node::add_kube_pod`.
    pause: Option<PodProcess>,
}

impl Pod {
    fn setup(&self, node_netns: &str) {
        let p = self.netns.as_str();
        add_netns(p);
        // Created inside the node namespace with the peer placed straight into the pod's, so the pair never
        // appears in the host namespace. The node-side name only has to be unique within the node, and must
        // not be reused: a dropped pod's veth can outlive its netns for a moment (teardown is asynchronous).
        let node_end = format!("veth{}", names::next_counter());
        sh("ip", &["-n", node_netns, "link", "add", &node_end, "type", "veth", "peer", "name", "eth0", "netns", p]);
        sh("ip", &["-n", node_netns, "link", "set", &node_end, "master", Node::BRIDGE, "up"]);
        sh("ip", &["-n", p, "addr", "add", &format!("{}/24", self.ip4), "dev", "eth0"]);
        sh("ip", &["-n", p, "addr", "add", &format!("{}/64", self.ip6), "dev", "eth0", "nodad"]);
        sh("ip", &["-n", p, "link", "set", "eth0", "up"]);
        std::fs::create_dir(&self.cgroup).unwrap_or_else(|e| panic!("creating cgroup {}: {e}", self.cgroup.display()));
        let usable = wait_until(Duration::from_secs(10), || {
            let out = Command::new("ip").args(["-n", p, "-6", "addr", "show", "dev", "eth0"]).output();
            out.is_ok_and(|o| {
                let text = String::from_utf8_lossy(&o.stdout);
                o.status.success() && text.contains(&self.ip6.to_string()) && !text.contains("tentative")
            })
        });
        assert!(usable, "IPv6 address {} of pod {} stayed tentative", self.ip6, self.name);
    }

    /// Name of the pod's network namespace (under /run/netns); also the name of its cgroup.
    pub fn netns_name(&self) -> &str {
        &self.netns
    }

    pub fn netns_path(&self) -> PathBuf {
        netns_path(&self.netns)
    }

    pub fn cgroup_dir(&self) -> PathBuf {
        self.cgroup.clone()
    }

    pub fn ip4(&self) -> Ipv4Addr {
        self.ip4
    }

    pub fn ip6(&self) -> Ipv6Addr {
        self.ip6
    }

    /// Processes currently in the pod's cgroup.
    pub fn pids(&self) -> Vec<i32> {
        cleanup::cgroup_pids(&self.cgroup)
    }

    /// A command whose process runs inside the pod: in its network namespace and its cgroup, from before exec.
    pub fn command<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        process::entering_command(program, args, &self.netns_path(), Some(&self.cgroup.join("cgroup.procs")))
    }

    /// Start a program in the pod: stdin empty, stdout piped (see [`PodProcess::wait_output`]), stderr inherited.
    pub fn spawn<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> PodProcess
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        PodProcess::spawn(self.command(program, args), &self.name)
    }

    /// Run a program in the pod to completion and collect its output. One that takes longer than two minutes is
    /// killed, and its output so far is returned with the kill as its status.
    pub fn run<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        process::run_with_timeout(self.command(program, args), RUN_TIMEOUT)
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        // Absent when the node went first and already cleaned up this pod.
        if let Some(resources) = take_registered(&self.registry, &self.netns) {
            resources.remove();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_are_uuid_shaped_and_distinct() {
        let (a, b) = (make_uid(), make_uid());
        assert_ne!(a, b);
        let groups: Vec<usize> = a.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12]);
        assert!(a.chars().all(|c| c == '-' || c.is_ascii_hexdigit()));
    }

    #[test]
    fn pod_addresses() {
        assert_eq!(pod_ip6(2).to_string(), "fd00:10:244::2");
    }
}
