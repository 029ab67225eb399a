//! API objects to what the agent reads: the same `PodInfo` the pods file
//! gives, with the node-local paths left for discovery.

use std::{fmt, net::IpAddr};

use k8s_openapi::api::core::v1::Pod;
use kube::api::DynamicObject;

use crate::{
    discovery::QosClass,
    pods::{peer_auth, LocalPod, PeerAuthentication, PodInfo},
    policy::{enrollment, Enrollment},
};

pub enum Converted {
    Pod(PodInfo),
    Skip(Skip),
}

/// Why a pod the API lists is left out of the snapshot.
#[derive(Debug, PartialEq, Eq)]
pub enum Skip {
    /// Its "netns" is the node's: capturing it would capture the node itself.
    HostNetwork { pod: String, uid: String, asks_injection: bool },
    /// Succeeded or Failed: its IP may already belong to another pod.
    Finished { pod: String, phase: String },
    /// Being deleted and none of its containers runs any more.
    Deleted { pod: String },
    Invalid {
        pod: String,
        reason: String,
        /// It asks for the mesh: a CNI request for it must fail, not pass.
        asks_injection: bool,
    },
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Skip::HostNetwork { pod, .. } => write!(
                f,
                "pod {pod} uses hostNetwork: it is never enrolled, because capturing it would capture the node's own \
                 network namespace (every host process); remove the injection label from it"
            ),
            Skip::Finished { pod, phase } => write!(f, "pod {pod} has finished (phase {phase}): it counts as gone"),
            Skip::Deleted { pod } => write!(f, "pod {pod} is being deleted and has no running container left"),
            Skip::Invalid { pod, reason, .. } => write!(f, "pod {pod}: {reason}; ignored"),
        }
    }
}

/// `node`: this agent's node; pods scheduled there are local.
pub fn pod_info(pod: &Pod, node: &str) -> Converted {
    let meta = &pod.metadata;
    let namespace = meta.namespace.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| "default".into());
    let name = meta.name.clone().unwrap_or_default();
    let key = format!("{namespace}/{name}");
    let spec = pod.spec.clone().unwrap_or_default();
    let status = pod.status.clone().unwrap_or_default();
    let mut info = PodInfo {
        namespace,
        name,
        uid: meta.uid.clone().unwrap_or_default(),
        service_account: spec
            .service_account_name
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into()),
        labels: meta.labels.clone().unwrap_or_default(),
        annotations: meta.annotations.clone().unwrap_or_default(),
        ips: Vec::new(),
        local: None,
        created: meta.creation_timestamp.as_ref().map(|t| std::time::SystemTime::from(t.0)),
        line: 0,
    };
    let asks_injection = enrollment(&info) != Enrollment::NotRequested;
    let invalid = |reason: String| Converted::Skip(Skip::Invalid { pod: key.clone(), reason, asks_injection });
    if !valid_uid(&info.uid) {
        return invalid(format!("metadata.uid {:?} is not a UID", info.uid));
    }
    if spec.host_network == Some(true) {
        return Converted::Skip(Skip::HostNetwork { pod: key, uid: info.uid, asks_injection });
    }
    if let Some(phase @ ("Succeeded" | "Failed")) = status.phase.as_deref() {
        return Converted::Skip(Skip::Finished { pod: key, phase: phase.into() });
    }
    if meta.deletion_timestamp.is_some() {
        let running =
            status.container_statuses.iter().flatten().any(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()));
        if !running {
            return Converted::Skip(Skip::Deleted { pod: key });
        }
    }
    let mut raw: Vec<String> = status.pod_ips.unwrap_or_default().into_iter().map(|p| p.ip).collect();
    if raw.is_empty() {
        raw.extend(status.pod_ip);
    }
    for r in raw {
        match r.parse::<IpAddr>() {
            Ok(ip) if !info.ips.contains(&ip) => info.ips.push(ip),
            Ok(_) => {}
            Err(_) => return invalid(format!("status.podIPs: {r:?} is not an IP address")),
        }
    }
    if spec.node_name.as_deref() == Some(node) {
        let qos = status.qos_class.as_deref().and_then(QosClass::parse);
        info.local = Some(LocalPod { netns: None, cgroup: None, qos });
    }
    Converted::Pod(info)
}

/// The same rule as the pods file: UIDs become pin and cgroup path parts.
fn valid_uid(uid: &str) -> bool {
    !uid.is_empty() && uid.len() <= 47 && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

pub fn peer_authentication(obj: &DynamicObject) -> Result<PeerAuthentication, String> {
    let value = serde_json::to_value(obj).map_err(|e| e.to_string())?;
    peer_auth::from_json(value)
}
