//! Where pods come from. For now: a Kubernetes YAML file (`kubectl get pod
//! -o yaml` output plus two node-local annotations), watched for changes.

pub(crate) mod file;
pub(crate) mod peer_auth;

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

pub use file::{parse_pods_file, read_pods_file, PodsFile, PodsFileError};
pub use peer_auth::{MtlsMode, PeerAuthentication};
use serde::Serialize;

/// Annotation naming the pod's network namespace on this node.
pub const NETNS_ANNOTATION: &str = "meshcap.io/netns";
/// Annotation naming the pod's cgroup v2 directory on this node.
pub const CGROUP_ANNOTATION: &str = "meshcap.io/cgroup";

/// What the agent needs to know about one pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
    /// Set for pods running on this node; others only count for mesh membership.
    pub local: Option<LocalPod>,
    /// Line of the pods file the pod's document starts at.
    #[serde(skip)]
    pub line: usize,
}

/// Node-local facts about a pod on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LocalPod {
    pub netns: PathBuf,
    pub cgroup: PathBuf,
}

impl PodInfo {
    /// `namespace/name`, the way operators name pods.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}
