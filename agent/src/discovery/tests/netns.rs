use std::{fs, path::Path};

use super::{Fixture, HOST_NET};
use crate::discovery::{find_pod_netns, pod_netns::start_time, DiscoveryError};

const POD: &str = "kubepods/burstable/pod1234";
const POD_NET: u64 = 4026532500;

#[test]
fn processes_only_in_container_scopes_are_found() {
    let fx = Fixture::new();
    fx.process(1, HOST_NET, Some(1));
    let pod = fx.cgroup(POD);
    fx.cgroup_with(&format!("{POD}/sandbox"), &[4100]);
    fx.cgroup_with(&format!("{POD}/app"), &[4200, 4201]);
    let sandbox = fx.process(4100, POD_NET, Some(500));
    fx.process(4200, POD_NET, Some(600));
    fx.process(4201, POD_NET, Some(601));
    assert_eq!(find_pod_netns(&fx.proc_root(), &pod).unwrap(), sandbox);
}

#[test]
fn the_oldest_process_decides_and_host_ones_are_skipped() {
    let fx = Fixture::new();
    fx.process(1, HOST_NET, Some(1));
    // An app that later made a namespace of its own, with a lower pid (pids wrap), and a process that joined
    // the host's: neither is the pod's.
    let pod = fx.cgroup_with(POD, &[]);
    fx.cgroup_with(&format!("{POD}/app"), &[90, 95]);
    fx.cgroup_with(&format!("{POD}/sandbox"), &[7000]);
    fx.process(90, 4026532999, Some(900));
    fx.process(95, HOST_NET, Some(100));
    let sandbox = fx.process(7000, POD_NET, Some(400));
    assert_eq!(find_pod_netns(&fx.proc_root(), &pod).unwrap(), sandbox);
}

#[test]
fn processes_that_exited_meanwhile_are_skipped() {
    let fx = Fixture::new();
    fx.process(1, HOST_NET, None);
    // 300 is listed but has no /proc entry any more; 301 has no stat (start time unknown) and still counts.
    let pod = fx.cgroup_with(POD, &[300, 301]);
    let live = fx.process(301, POD_NET, None);
    assert_eq!(find_pod_netns(&fx.proc_root(), &pod).unwrap(), live);

    let gone = fx.cgroup_with("kubepods/podgone", &[300]);
    let err = find_pod_netns(&fx.proc_root(), &gone).unwrap_err();
    assert!(matches!(err, DiscoveryError::NetnsUnreadable { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("no process of pod cgroup") && text.contains("300/ns/net"), "{text}");
}

#[test]
fn a_cgroup_without_processes_is_a_sandbox_not_started() {
    let fx = Fixture::new();
    fx.process(1, HOST_NET, None);
    let pod = fx.cgroup(POD);
    fx.cgroup(&format!("{POD}/sandbox"));
    let err = find_pod_netns(&fx.proc_root(), &pod).unwrap_err();
    assert!(matches!(err, DiscoveryError::NoProcesses { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "pod cgroup {} has no processes yet (sandbox not started); its network namespace cannot be found",
            pod.display()
        )
    );
}

#[test]
fn a_host_network_pod_is_refused() {
    let fx = Fixture::new();
    fx.process(1, HOST_NET, Some(1));
    let pod = fx.cgroup_with(POD, &[]);
    fx.cgroup_with(&format!("{POD}/sandbox"), &[10]);
    fx.cgroup_with(&format!("{POD}/app"), &[11]);
    fx.process(10, HOST_NET, Some(50));
    fx.process(11, HOST_NET, Some(60));
    let err = find_pod_netns(&fx.proc_root(), &pod).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, DiscoveryError::HostNetwork { .. }), "{err:?}");
    assert!(text.contains(&format!("every process of {} (pids [10, 11])", pod.display())), "{text}");
    assert!(text.contains(&format!("host network namespace net:[{HOST_NET}] (hostNetwork pod?)")), "{text}");
}

#[test]
fn an_unreadable_host_namespace_or_pod_cgroup_is_named() {
    let fx = Fixture::new();
    let pod = fx.cgroup_with(POD, &[10]);
    fx.process(10, POD_NET, None);
    // Pid 2 is not kthreadd (its parent is 1): this proc root is no host's.
    fx.process(2, HOST_NET, None);
    fs::write(fx.proc_root().join("2/stat"), "2 (kthreadd) S 1 2 2 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 9 0 0\n").unwrap();
    let text = find_pod_netns(&fx.proc_root(), &pod).unwrap_err().to_string();
    let proc_root = fx.proc_root().display().to_string();
    assert!(text.contains(&format!("reading the host network namespace {proc_root}/1/ns/net")), "{text}");
    assert!(text.contains(&format!("is {proc_root} the host's /proc (hostPID)")), "{text}");
    assert!(text.contains("(CAP_SYS_PTRACE)?"), "{text}");

    fx.process(1, HOST_NET, None);
    let gone = fx.cgroup_root().join("kubepods/podgone");
    let text = find_pod_netns(&fx.proc_root(), &gone).unwrap_err().to_string();
    assert!(text.starts_with(&format!("reading {}/cgroup.procs: ", gone.display())), "{text}");
    assert!(text.ends_with("(is the pod's cgroup gone?)"), "{text}");
}

#[test]
fn kthreadd_stands_in_for_an_unreadable_init() {
    let fx = Fixture::new();
    // No pid 1 entry, as when init denies ptrace access to its links.
    fx.kthreadd(HOST_NET);
    let pod = fx.cgroup_with(POD, &[10]);
    fx.process(10, HOST_NET, None);
    let err = find_pod_netns(&fx.proc_root(), &pod).unwrap_err();
    assert!(matches!(err, DiscoveryError::HostNetwork { .. }), "{err:?}");

    fx.process(11, POD_NET, None);
    fx.cgroup_with(POD, &[10, 11]);
    assert_eq!(find_pod_netns(&fx.proc_root(), &pod).unwrap(), fx.proc_root().join("11/ns/net"));
}

#[test]
fn a_link_that_is_not_a_network_namespace_is_an_error() {
    let fx = Fixture::new();
    fx.process(1, HOST_NET, None);
    let pod = fx.cgroup_with(POD, &[10]);
    fx.process(10, POD_NET, None);
    fx.link(10, "mnt:[4026531841]");
    let text = find_pod_netns(&fx.proc_root(), &pod).unwrap_err().to_string();
    assert!(text.contains("10/ns/net points to \"mnt:[4026531841]\", which is not a network namespace"), "{text}");
}

#[test]
fn start_times_are_read_from_the_real_proc() {
    let own = start_time(Path::new("/proc"), std::process::id()).expect("our own start time");
    let init = start_time(Path::new("/proc"), 1).expect("init's start time");
    assert!(init <= own, "init started at {init}, after us at {own}?");
}
