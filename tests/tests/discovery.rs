//! Pod discovery on live simulated pods: the kubelet's systemd cgroup layout built below a unique cgroup, real
//! processes in it, and the real /proc.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use meshcap_agent::discovery::{find_pod_cgroup, find_pod_netns, DiscoveryError, QosClass};
use meshcap_tests::{cgroup2_mount, privileged_or_skip, Node, PodProcess};

const CONTAINER: &str = "4b1ee1b5f6b1d2c0a7e9c3d8f5a6b7c8d9e0f1a2b3c4d5e6f708192a3b4c5d6e";

/// `<root>/kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice`, as the kubelet's systemd driver
/// names it, plus a containerd scope below it; returns (pod slice, container scope).
fn kubelet_pod_cgroup(root: &Path, qos: &str, uid: &str) -> (PathBuf, PathBuf) {
    let slice = root
        .join("kubepods.slice")
        .join(format!("kubepods-{qos}.slice"))
        .join(format!("kubepods-{qos}-pod{}.slice", uid.replace('-', "_")));
    let scope = slice.join(format!("cri-containerd-{CONTAINER}.scope"));
    fs::create_dir_all(&scope).unwrap_or_else(|e| panic!("creating cgroup {}: {e}", scope.display()));
    (slice, scope)
}

fn move_to_cgroup(pid: u32, cgroup: &Path) {
    let procs = cgroup.join("cgroup.procs");
    fs::write(&procs, pid.to_string()).unwrap_or_else(|e| panic!("moving pid {pid} to {}: {e}", procs.display()));
}

fn netns_inode(path: &Path) -> u64 {
    fs::metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display())).ino()
}

#[test]
fn a_live_pods_cgroup_and_netns_are_found() {
    if !privileged_or_skip() {
        return;
    }
    let node = Node::new("a_live_pods_cgroup_and_netns_are_found");
    let pod = node.add_pod("web");
    // The harness pod's cgroup is unique and removed (processes killed) on drop, also on panic: it serves as the
    // cgroup root the kubelet's tree is built in. The pod's network namespace is a fresh one.
    let root = pod.cgroup_dir();
    let (slice, scope) = kubelet_pod_cgroup(&root, "burstable", &pod.uid);
    let mut sandbox = pod.spawn("sh", ["-c", "readlink /proc/self/ns/net; exec sleep 600"]);
    move_to_cgroup(sandbox.pid(), &scope);
    let stdout = sandbox.child().stdout.take().expect("stdout is piped");
    let mut seen = String::new();
    BufReader::new(stdout).read_line(&mut seen).expect("reading what the process sees");

    assert_eq!(find_pod_cgroup(&root, &pod.uid, Some(QosClass::Burstable)).expect("found in the usual place"), slice);
    // From the real cgroup2 mount, with the class unknown: only the walk over the live tree can find it.
    assert_eq!(find_pod_cgroup(&cgroup2_mount(), &pod.uid, None).expect("found by the walk"), slice);

    let netns = find_pod_netns(Path::new("/proc"), &slice).expect("the pod's netns");
    assert_eq!(netns, PathBuf::from(format!("/proc/{}/ns/net", sandbox.pid())));
    let inode = netns_inode(&netns);
    assert_eq!(seen.trim(), format!("net:[{inode}]"), "the process's own view of its netns");
    assert_eq!(inode, netns_inode(&pod.netns_path()), "the pod's network namespace");
    assert_ne!(inode, netns_inode(Path::new("/proc/self/ns/net")), "not the host's (where this test runs)");
}

#[test]
fn a_pod_without_processes_or_in_the_host_netns_is_refused() {
    if !privileged_or_skip() {
        return;
    }
    let node = Node::new("a_pod_without_processes_or_in_the_host_netns_is_refused");
    let pod = node.add_pod("holder");
    let root = pod.cgroup_dir();
    // Valid UID characters, unique to this pod's run.
    let uid = format!("{}-host", pod.uid);
    let (slice, scope) = kubelet_pod_cgroup(&root, "besteffort", &uid);
    assert_eq!(find_pod_cgroup(&root, &uid, Some(QosClass::BestEffort)).expect("found"), slice);

    let err = find_pod_netns(Path::new("/proc"), &slice).unwrap_err();
    assert!(matches!(err, DiscoveryError::NoProcesses { .. }), "{err:?}");
    assert!(err.to_string().contains("has no processes yet (sandbox not started)"), "{err}");

    // A hostNetwork pod: its process runs in the host's (here: this test's) network namespace.
    let child = Command::new("sleep").arg("600").stdin(Stdio::null()).spawn().expect("starting sleep");
    let host_process = PodProcess::from_child(child, "host-network pod");
    move_to_cgroup(host_process.pid(), &scope);
    let err = find_pod_netns(Path::new("/proc"), &slice).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, DiscoveryError::HostNetwork { .. }), "{err:?}");
    let host = fs::read_link(format!("/proc/{}/ns/net", host_process.pid())).expect("the process's netns");
    assert!(
        text.contains(&format!("(pids [{}]) is in the host network namespace {}", host_process.pid(), host.display())),
        "{text}"
    );
    assert!(text.contains("(hostNetwork pod?)"), "{text}");
}
