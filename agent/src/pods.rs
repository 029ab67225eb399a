//! Where pods come from: a Kubernetes YAML file (`kubectl get pod -o yaml`
//! output plus node-local annotations), watched for changes, or the
//! Kubernetes API. Both hand the agent the same full snapshot.

pub(crate) mod file;
pub mod kube;
pub(crate) mod peer_auth;
pub mod source;

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

pub use file::{parse_pods_file, read_pods_file, PodsFile, PodsFileError};
pub use peer_auth::{MtlsMode, PeerAuthentication};
use serde::Serialize;
pub use source::{Lookup, PodSource, SourceError, SourceUpdate};

use crate::discovery::QosClass;

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
    /// `metadata.creationTimestamp`: when two pods claim one IP, the newer one holds it (the older one's
    /// deletion has not been seen yet).
    #[serde(skip)]
    pub created: Option<std::time::SystemTime>,
    /// Line of the pods file the pod's document starts at.
    #[serde(skip)]
    pub line: usize,
}

/// Node-local facts about a pod on this node. What the source does not
/// know (the Kubernetes API knows neither path) is discovered at enroll time
/// from the pod's UID and QoS class.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LocalPod {
    pub netns: Option<PathBuf>,
    pub cgroup: Option<PathBuf>,
    pub qos: Option<QosClass>,
}

/// Everything a source knows at one moment: the reconcile loop replaces its
/// whole view with it.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub pods: Vec<PodInfo>,
    pub peer_authentications: Vec<PeerAuthentication>,
}

impl PodInfo {
    /// `namespace/name`, the way operators name pods.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}
