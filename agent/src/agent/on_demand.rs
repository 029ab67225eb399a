//! Enrolling one pod right now, for the CNI plugin: during sandbox network
//! setup, before any app container starts, so the pod has no plaintext
//! window. The answer is "captured" only once the hooks are attached, and an
//! error whenever a pod that asks for the mesh is not captured: the plugin
//! then fails the pod's network setup and the kubelet retries.

use std::{path::PathBuf, sync::Arc, time::Duration};

use super::{reconcile, AgentState, PodState};
use crate::{
    pods::{Lookup, SourceError},
    policy::{pod_policy, Enrollment, IDENTITY_LABEL, INJECT_LABEL},
};

/// How long a pod enrolled on demand is kept while the source's snapshots do
/// not list it yet (the watch lags behind the kubelet). Only a snapshot
/// arriving after that removes it: a source that says nothing keeps it captured.
pub const SOURCE_GRACE: Duration = Duration::from_secs(120);

#[derive(Debug, Clone)]
pub struct EnrollRequest {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The sandbox's network namespace (it has no process yet to find it by).
    pub netns: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnrollOutcome {
    Captured,
    /// The pod does not ask for the mesh (or cannot be in it): its network
    /// setup goes on untouched.
    NotEnrolled {
        reason: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum OnDemandError {
    #[error("pod {pod} (uid {uid}) is not in the {source_name}; cannot decide whether to capture it")]
    NotFound { pod: String, uid: String, source_name: String },
    #[error("pod {pod}: looking it up: {source}")]
    Lookup { pod: String, source: Box<SourceError> },
    #[error(
        "pod {pod}: the runtime asks for uid {requested} but the {source_name} has uid {known} \
         (a pod recreated under the same name?)"
    )]
    UidMismatch { pod: String, requested: String, known: String, source_name: String },
    #[error("pod {pod} is not a pod of this node according to the {source_name}")]
    NotLocal { pod: String, source_name: String },
    #[error(
        "pod {pod} asks for injection ({INJECT_LABEL}=true) but lacks {IDENTITY_LABEL}=true, so it gets no \
         identity and cannot be captured; add the label (or drop the injection request)"
    )]
    NoIdentity { pod: String },
    #[error("pod {pod}: capture failed: {error}")]
    Capture { pod: String, error: String },
    #[error(
        "the agent has not read the {source_name} yet (PeerAuthentication and mesh membership unknown), so it cannot \
         decide how to capture pods; retry shortly{}",
        source_error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default()
    )]
    NotReady { source_name: String, source_error: Option<String> },
}

/// Until the first snapshot the agent knows no policy: a pod enrolled then
/// would get PERMISSIVE inbound and no mesh peers, plaintext where STRICT is
/// asked for. ADD fails (the kubelet retries) and STATUS says not ready.
pub fn ready(state: &AgentState) -> Result<(), OnDemandError> {
    if state.source_loaded.load(std::sync::atomic::Ordering::Acquire) {
        return Ok(());
    }
    Err(OnDemandError::NotReady {
        source_name: state.source.describe(),
        source_error: state.source_error.lock().expect("lock").clone(),
    })
}

/// Finds the pod in the source, enrolls it with the given netns through the
/// same path as the reconcile loop (serialised with it), and returns once
/// its hooks are attached.
pub async fn enroll_now(state: &Arc<AgentState>, req: EnrollRequest) -> Result<EnrollOutcome, OnDemandError> {
    let pod = format!("{}/{}", req.namespace, req.name);
    let source_name = state.source.describe();
    ready(state)?;
    let found = state
        .source
        .lookup(&req.namespace, &req.name, &req.uid)
        .await
        .map_err(|source| OnDemandError::Lookup { pod: pod.clone(), source: Box::new(source) })?;
    let mut info = match found {
        Lookup::Found(info) => *info,
        Lookup::Ignored { reason } => return Ok(EnrollOutcome::NotEnrolled { reason }),
        Lookup::Absent => return Err(OnDemandError::NotFound { pod, uid: req.uid, source_name }),
    };
    if info.uid != req.uid {
        return Err(OnDemandError::UidMismatch { pod, requested: req.uid, known: info.uid, source_name });
    }
    match pod_policy(&info).enrollment {
        Enrollment::Enrolled => {}
        Enrollment::NotRequested => {
            let reason = format!("pod {pod} is not labelled {INJECT_LABEL}=true");
            return Ok(EnrollOutcome::NotEnrolled { reason });
        }
        Enrollment::MissingIdentityLabel => return Err(OnDemandError::NoIdentity { pod }),
    }
    let Some(local) = info.local.as_mut() else { return Err(OnDemandError::NotLocal { pod, source_name }) };
    local.netns = Some(req.netns);
    let uid = info.uid.clone();
    let _applying = state.apply_lock.lock().await;
    let previous = state.pods.lock().expect("lock").remove(&uid);
    // New to the agent, or known only from an earlier ADD (a sandbox set up
    // again): the source has not listed it, so it gets the grace again.
    let unlisted = previous.as_ref().is_none_or(|p| p.on_demand_until.is_some());
    let mut entry = reconcile::apply(state, info, previous).await;
    if unlisted {
        entry.on_demand_until = Some(tokio::time::Instant::now() + SOURCE_GRACE);
    }
    let outcome = match &entry.state {
        PodState::Captured(_) => {
            tracing::info!(pod, "pod captured on demand (CNI), before its containers start");
            Ok(EnrollOutcome::Captured)
        }
        PodState::Failed { error, .. } => Err(OnDemandError::Capture { pod, error: error.clone() }),
        PodState::NotEnrolled => {
            Err(OnDemandError::Capture { pod, error: "the policy left it unenrolled after all".into() })
        }
    };
    state.pods.lock().expect("lock").insert(uid, entry);
    outcome
}
