use std::path::PathBuf;

use super::Fixture;
use crate::discovery::{find_pod_cgroup, DiscoveryError, QosClass, MAX_DEPTH};

const UID: &str = "1a2b3c4d-0000-4e5f-8a9b-0123456789ab";
const UID_: &str = "1a2b3c4d_0000_4e5f_8a9b_0123456789ab";
const OTHER_UID: &str = "99999999-0000-4e5f-8a9b-0123456789ab";
const CONTAINER: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";

/// The pod's cgroup (relative to the root) for each driver and QoS class, as the kubelet lays it out.
fn kubelet_layouts() -> Vec<(QosClass, &'static str, String)> {
    vec![
        (QosClass::Guaranteed, "systemd", format!("kubepods.slice/kubepods-pod{UID_}.slice")),
        (
            QosClass::Burstable,
            "systemd",
            format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"),
        ),
        (
            QosClass::BestEffort,
            "systemd",
            format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice"),
        ),
        (QosClass::Guaranteed, "cgroupfs", format!("kubepods/pod{UID}")),
        (QosClass::Burstable, "cgroupfs", format!("kubepods/burstable/pod{UID}")),
        (QosClass::BestEffort, "cgroupfs", format!("kubepods/besteffort/pod{UID}")),
    ]
}

/// A container of the pod, named as each runtime names it, so the pod directory has children like a real one.
fn container(driver: &str, index: usize) -> String {
    match (driver, index % 3) {
        ("cgroupfs", _) => CONTAINER.to_string(),
        (_, 0) => format!("cri-containerd-{CONTAINER}.scope"),
        (_, 1) => format!("crio-{CONTAINER}.scope"),
        _ => format!("docker-{CONTAINER}.scope"),
    }
}

#[test]
fn both_drivers_and_every_qos_class() {
    for (i, (qos, driver, pod)) in kubelet_layouts().into_iter().enumerate() {
        let fx = Fixture::new();
        // A neighbour pod of every class, so the search has something to tell apart.
        for (_, _, other) in kubelet_layouts() {
            fx.cgroup(&other.replace(UID, OTHER_UID).replace(UID_, &OTHER_UID.replace('-', "_")));
        }
        let expected = fx.cgroup(&pod);
        fx.cgroup(&format!("{pod}/{}", container(driver, i)));
        for asked in [Some(qos), None] {
            let found = find_pod_cgroup(&fx.cgroup_root(), UID, asked).unwrap_or_else(|e| panic!("{pod}: {e}"));
            assert_eq!(found, expected, "{driver} {qos:?} asked as {asked:?}");
        }
    }
}

#[test]
fn kind_layout_inside_the_node() {
    let fx = Fixture::new();
    let pod = format!(
        "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice"
    );
    let expected = fx.cgroup(&pod);
    fx.cgroup(&format!("{pod}/cri-containerd-{CONTAINER}.scope"));
    fx.cgroup(&format!(
        "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{}.slice",
        OTHER_UID.replace('-', "_")
    ));
    assert_eq!(find_pod_cgroup(&fx.cgroup_root(), UID, Some(QosClass::BestEffort)).unwrap(), expected);
    assert_eq!(find_pod_cgroup(&fx.cgroup_root(), UID, None).unwrap(), expected);
}

#[test]
fn kind_layout_seen_from_the_host_is_found_by_the_walk() {
    let fx = Fixture::new();
    fx.cgroup("system.slice/containerd.service");
    fx.cgroup("user.slice/user-0.slice/session-1.scope");
    let node = format!("system.slice/docker-{CONTAINER}.scope");
    let pod = format!(
        "{node}/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/\
         kubelet-kubepods-burstable-pod{UID_}.slice"
    );
    let expected = fx.cgroup(&pod);
    fx.cgroup(&format!("{pod}/cri-containerd-{CONTAINER}.scope"));
    fx.cgroup(&format!("{node}/init.scope"));
    assert_eq!(find_pod_cgroup(&fx.cgroup_root(), UID, Some(QosClass::Burstable)).unwrap(), expected);
    // Rooted at the node container's cgroup, kind's own view, the usual places find it.
    let from_node = fx.cgroup_root().join(&node);
    assert_eq!(find_pod_cgroup(&from_node, UID, Some(QosClass::Burstable)).unwrap(), expected);
}

#[test]
fn wrong_or_unknown_qos_class_is_still_found() {
    let fx = Fixture::new();
    let expected = fx.cgroup(&format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"));
    for asked in [Some(QosClass::BestEffort), Some(QosClass::Guaranteed), None] {
        assert_eq!(find_pod_cgroup(&fx.cgroup_root(), UID, asked).unwrap(), expected, "{asked:?}");
    }
    assert_eq!(QosClass::parse("Burstable"), Some(QosClass::Burstable));
    assert_eq!(QosClass::parse("BestEffort"), Some(QosClass::BestEffort));
    assert_eq!(QosClass::parse("Guaranteed"), Some(QosClass::Guaranteed));
    for unknown in ["", "burstable", "Best-Effort", "Unknown"] {
        assert_eq!(QosClass::parse(unknown), None, "{unknown:?}");
    }
}

#[test]
fn a_pod_not_on_this_node_is_a_clear_error() {
    let fx = Fixture::new();
    fx.cgroup(&format!("kubepods.slice/kubepods-pod{}.slice", OTHER_UID.replace('-', "_")));
    // Names that merely contain the UID are not the pod's.
    fx.cgroup(&format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-xpod{UID_}.slice"));
    fx.cgroup(&format!("kubepods/besteffort/pod{UID}0"));
    let err = find_pod_cgroup(&fx.cgroup_root(), UID, Some(QosClass::BestEffort)).unwrap_err();
    assert!(matches!(err, DiscoveryError::PodCgroupNotFound { .. }), "{err:?}");
    let text = err.to_string();
    let root = fx.cgroup_root().display().to_string();
    for needle in [
        format!("no cgroup for pod {UID} below {root}"),
        format!("*-pod{UID_}.slice (systemd cgroup driver)"),
        format!("pod{UID} (cgroupfs driver)"),
        format!("{MAX_DEPTH} levels down"),
        format!("is {root} the host's cgroup2 mount"),
    ] {
        assert!(text.contains(&needle), "{needle:?} missing from: {text}");
    }
}

#[test]
fn a_pod_found_twice_names_both() {
    let fx = Fixture::new();
    // A tree left by a kubelet with the other driver: both usual places exist.
    let systemd = fx.cgroup(&format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"));
    let cgroupfs = fx.cgroup(&format!("kubepods/burstable/pod{UID}"));
    let text = find_pod_cgroup(&fx.cgroup_root(), UID, Some(QosClass::Burstable)).unwrap_err().to_string();
    assert!(text.contains("matches more than one cgroup"), "{text}");
    assert!(text.contains(&systemd.display().to_string()) && text.contains(&cgroupfs.display().to_string()), "{text}");

    // Twice in unknown places, so only the walk sees them.
    let fx = Fixture::new();
    let a = fx.cgroup(&format!("a.slice/x-pod{UID_}.slice"));
    let b = fx.cgroup(&format!("b/c/pod{UID}"));
    let err = find_pod_cgroup(&fx.cgroup_root(), UID, None).unwrap_err();
    match err {
        DiscoveryError::AmbiguousPodCgroup { first, second, .. } => assert_eq!((first, second), (a, b)),
        other => panic!("expected AmbiguousPodCgroup, got {other}"),
    }
}

#[test]
fn bad_uids_are_refused_before_any_path_is_built() {
    let fx = Fixture::new();
    fx.cgroup("kubepods/pod..");
    let too_long = "a".repeat(48);
    for uid in ["", "../../etc", "a/b", "..", "abc_def", "abc def", "abc\0", "ü", too_long.as_str()] {
        let err = find_pod_cgroup(&fx.cgroup_root(), uid, None).unwrap_err();
        assert!(matches!(err, DiscoveryError::InvalidUid { .. }), "{uid:?}: {err:?}");
        assert!(err.to_string().contains("is not a Kubernetes UID"), "{err}");
    }
    // 47 characters is the limit, not an error.
    let longest = "b".repeat(47);
    let expected = fx.cgroup(&format!("kubepods/pod{longest}"));
    assert_eq!(find_pod_cgroup(&fx.cgroup_root(), &longest, None).unwrap(), expected);
}

#[test]
fn the_walk_is_bounded_and_does_not_follow_symlinks() {
    let fx = Fixture::new();
    // Depth MAX_DEPTH + 1: out of reach.
    let deep: PathBuf = (0..MAX_DEPTH).map(|i| format!("d{i}")).chain([format!("pod{UID}")]).collect();
    fx.cgroup(deep.to_str().unwrap());
    assert!(matches!(find_pod_cgroup(&fx.cgroup_root(), UID, None), Err(DiscoveryError::PodCgroupNotFound { .. })));

    // Depth MAX_DEPTH exactly: found, and a symlink to its parent does not make it a second match.
    let fx = Fixture::new();
    let at_limit: PathBuf = (1..MAX_DEPTH).map(|i| format!("d{i}")).chain([format!("pod{UID}")]).collect();
    let expected = fx.cgroup(at_limit.to_str().unwrap());
    std::os::unix::fs::symlink(expected.parent().unwrap(), fx.cgroup_root().join("shortcut")).unwrap();
    assert_eq!(find_pod_cgroup(&fx.cgroup_root(), UID, None).unwrap(), expected);
}

#[test]
fn a_missing_cgroup_root_is_named() {
    let fx = Fixture::new();
    let missing = fx.cgroup_root().join("not-here");
    let text = find_pod_cgroup(&missing, UID, None).unwrap_err().to_string();
    assert!(text.contains(&format!("reading the cgroup root {}", missing.display())), "{text}");
    assert!(text.contains("is the cgroup2 filesystem mounted there?"), "{text}");
}
