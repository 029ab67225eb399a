//! Finding a Kubernetes pod's cgroup v2 directory and network namespace on this node from what the API tells us
//! (its UID and QoS class). The kubelet names the pod's cgroup after the UID; where it puts it depends on its
//! cgroup driver and `--cgroup-root`, so the usual places are tried first and a bounded walk covers the rest.

use std::path::{Path, PathBuf};

mod pod_cgroup;
mod pod_netns;

#[cfg(test)]
mod tests;

/// How deep below the cgroup root the walk looks: kind's kubelet, seen from the host, puts a container's scope
/// at depth 7 (`system.slice/docker-<id>.scope/kubelet.slice/kubelet-kubepods.slice/<qos>.slice/<pod>/<ctr>`).
pub const MAX_DEPTH: usize = 8;

/// Longest pod UID accepted. Kubernetes makes 36-character UUIDs; static pods use a 32-character hash.
const MAX_UID_LEN: usize = 47;

/// A pod's `status.qosClass`, which picks the kubelet's parent cgroup for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    pub const ALL: [QosClass; 3] = [QosClass::Guaranteed, QosClass::Burstable, QosClass::BestEffort];

    /// `status.qosClass` as the API spells it; anything else is None.
    pub fn parse(s: &str) -> Option<QosClass> {
        match s {
            "Guaranteed" => Some(QosClass::Guaranteed),
            "Burstable" => Some(QosClass::Burstable),
            "BestEffort" => Some(QosClass::BestEffort),
            _ => None,
        }
    }

    /// The kubelet's name for the class's parent cgroup; Guaranteed pods have none (they sit in kubepods itself).
    fn cgroup_name(self) -> Option<&'static str> {
        match self {
            QosClass::Guaranteed => None,
            QosClass::Burstable => Some("burstable"),
            QosClass::BestEffort => Some("besteffort"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error(
        "pod uid {uid:?} is not a Kubernetes UID (only letters, digits and '-', 1 to {MAX_UID_LEN} characters); \
         no cgroup path is built from it"
    )]
    InvalidUid { uid: String },
    #[error("reading the cgroup root {root}: {source} (is the cgroup2 filesystem mounted there?)")]
    CgroupRoot { root: PathBuf, source: std::io::Error },
    #[error("reading cgroup directory {path} while looking for pod {uid}: {source}")]
    ReadDir { uid: String, path: PathBuf, source: std::io::Error },
    #[error(
        "no cgroup for pod {uid} below {root} (looked for {systemd_name} (systemd cgroup driver) and {cgroupfs_name} \
         (cgroupfs driver) in the kubelet's usual places and up to {MAX_DEPTH} levels down): is the pod running on \
         this node, and is {root} the host's cgroup2 mount rather than a container's own view of it?"
    )]
    PodCgroupNotFound { uid: String, root: PathBuf, systemd_name: String, cgroupfs_name: String },
    #[error(
        "pod {uid} matches more than one cgroup below {root}: {first} and {second}; refusing to guess (a leftover \
         from a kubelet with another cgroup driver or --cgroup-root?)"
    )]
    AmbiguousPodCgroup { uid: String, root: PathBuf, first: PathBuf, second: PathBuf },
    #[error("reading {path}: {source} (is the pod's cgroup gone?)")]
    CgroupProcs { path: PathBuf, source: std::io::Error },
    #[error("pod cgroup {cgroup} has no processes yet (sandbox not started); its network namespace cannot be found")]
    NoProcesses { cgroup: PathBuf },
    #[error(
        "reading the host network namespace {path} (nor was kthreadd's readable): {source}; is {proc_root} the \
         host's /proc (hostPID), and may the agent read other processes' namespaces (CAP_SYS_PTRACE)?"
    )]
    HostNetns { proc_root: PathBuf, path: PathBuf, source: std::io::Error },
    #[error("{path} points to {target:?}, which is not a network namespace (expected net:[inode])")]
    NotANetns { path: PathBuf, target: String },
    #[error(
        "no process of pod cgroup {cgroup} has a readable network namespace; last tried {path}: {source} (did \
         they all exit meanwhile, or does the agent lack CAP_SYS_PTRACE?)"
    )]
    NetnsUnreadable { cgroup: PathBuf, path: PathBuf, source: std::io::Error },
    #[error(
        "every process of {cgroup} (pids {pids:?}) is in the host network namespace {host} (hostNetwork pod?); \
         capturing it would capture the node itself"
    )]
    HostNetwork { cgroup: PathBuf, pids: Vec<u32>, host: String },
}

/// The pod's cgroup v2 directory (absolute), searched below `cgroup_root` (normally the cgroup2 mount).
pub fn find_pod_cgroup(cgroup_root: &Path, pod_uid: &str, qos: Option<QosClass>) -> Result<PathBuf, DiscoveryError> {
    validate_uid(pod_uid)?;
    pod_cgroup::find(cgroup_root, pod_uid, qos)
}

/// A path to the pod's network namespace (`<proc_root>/<pid>/ns/net` of a live process in the pod's cgroup or
/// any cgroup below it), refusing the host's own netns (the netns of `<proc_root>/1`).
///
/// The oldest such process decides (the sandbox, whose namespace the containers join); when init's link cannot
/// be read, kthreadd's stands in for the host's. The path names the namespace only while that process lives:
/// open it right away (as `Netns::enter` does).
pub fn find_pod_netns(proc_root: &Path, pod_cgroup: &Path) -> Result<PathBuf, DiscoveryError> {
    pod_netns::find(proc_root, pod_cgroup)
}

/// The UID becomes part of directory names we look up; anything but UID characters could climb out of the
/// cgroup tree (`../`) or match names it should not.
fn validate_uid(uid: &str) -> Result<(), DiscoveryError> {
    let ok = !uid.is_empty() && uid.len() <= MAX_UID_LEN && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(DiscoveryError::InvalidUid { uid: uid.to_string() })
    }
}
