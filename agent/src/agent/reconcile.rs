//! Turns the pods file into capture state: enroll what should be captured,
//! unenroll what should not, retry what failed. A bad file changes nothing.

use std::{
    collections::{BTreeMap, HashSet},
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use tokio::time::Instant;

use super::{AgentState, CapturedPod, PodEntry, PodState};
use crate::{
    agent::identities::Subject,
    capture::PodCapture,
    cgroup,
    engine::{EngineContext, PodEngine, Ports},
    identity::{workload_id, SpiffeId},
    netns::Netns,
    pods::PodInfo,
    policy::{pod_policy, Enrollment, IDENTITY_LABEL, INJECT_LABEL},
};

const RETRY_FAILED: Duration = Duration::from_secs(5);

pub async fn watch_pods_file(state: Arc<AgentState>) {
    let mut last_text: Option<String> = None;
    let mut collected = false;
    let mut tick = tokio::time::interval(state.config.pods_poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let path = state.config.pods_file.clone();
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(t) => t,
            Err(e) => {
                report_file_error(&state, format!("pods file {}: cannot read: {e}", path.display()));
                continue;
            }
        };
        let changed = last_text.as_deref() != Some(text.as_str());
        if changed {
            match crate::pods::parse_pods_file(&path, &text) {
                Ok(file) => {
                    *state.pods_file_error.lock().expect("lock") = None;
                    for note in &file.skipped {
                        tracing::debug!(file = %path.display(), "skipped document ({note}): not read by this agent yet");
                    }
                    if !collected {
                        collect_garbage(&state, &file.pods);
                        collected = true;
                    }
                    *state.mesh_pods.lock().expect("lock") = file.pods.len();
                    publish_mesh(&state, &file.pods, &file.peer_authentications);
                    *state.peer_authentications.lock().expect("lock") = file.peer_authentications;
                    reconcile(&state, file.pods).await;
                    state.pods_file_loaded.store(true, Ordering::Relaxed);
                }
                Err(e) => report_file_error(&state, format!("{e}; keeping the pods already served")),
            }
            last_text = Some(text);
        } else {
            retry_failed(&state).await;
        }
    }
}

/// Rebuilds mesh membership and hands it to every engine.
fn publish_mesh(state: &AgentState, pods: &[PodInfo], policies: &[crate::pods::PeerAuthentication]) {
    let c = &state.config;
    let (index, notes) = crate::mesh::MeshIndex::build(pods, policies, &c.trust_domain, &c.root_namespace);
    for note in notes {
        tracing::warn!("{note}");
    }
    tracing::debug!(meshed_ips = index.len(), "mesh membership updated");
    state.mesh.send_replace(Arc::new(index));
}

fn report_file_error(state: &AgentState, message: String) {
    let mut slot = state.pods_file_error.lock().expect("lock");
    if slot.as_deref() != Some(message.as_str()) {
        tracing::error!("{message}");
        *slot = Some(message);
    }
}

/// First good read after start: pins of pods that are gone (or no longer
/// enrolled) were left by the previous run; remove them.
fn collect_garbage(state: &AgentState, pods: &[PodInfo]) {
    let live: HashSet<String> = pods
        .iter()
        .filter(|p| p.local.is_some() && pod_policy(p).enrollment == Enrollment::Enrolled)
        .map(|p| p.uid.clone())
        .collect();
    let removed = state.capture.lock().expect("capture lock").collect_garbage(&live);
    for uid in removed {
        tracing::info!(uid, "removed capture left by a pod that is gone or no longer enrolled");
    }
}

async fn reconcile(state: &AgentState, pods: Vec<PodInfo>) {
    let desired: BTreeMap<String, PodInfo> =
        pods.into_iter().filter(|p| p.local.is_some()).map(|p| (p.uid.clone(), p)).collect();
    let current: Vec<String> = state.pods.lock().expect("lock").keys().cloned().collect();
    for uid in current {
        if !desired.contains_key(&uid) {
            if let Some(entry) = state.pods.lock().expect("lock").remove(&uid) {
                tracing::info!(pod = %entry.info.key(), "pod removed from the pods file");
                release(state, &entry);
            }
        }
    }
    for (uid, info) in desired {
        let previous = state.pods.lock().expect("lock").remove(&uid);
        let entry = apply(state, info, previous).await;
        state.pods.lock().expect("lock").insert(uid, entry);
    }
}

async fn retry_failed(state: &AgentState) {
    let due: Vec<String> = state
        .pods
        .lock()
        .expect("lock")
        .iter()
        .filter(|(_, e)| matches!(e.state, PodState::Failed { retry_at, .. } if retry_at <= Instant::now()))
        .map(|(uid, _)| uid.clone())
        .collect();
    for uid in due {
        let Some(previous) = state.pods.lock().expect("lock").remove(&uid) else { continue };
        let info = previous.info.clone();
        let entry = apply(state, info, Some(previous)).await;
        state.pods.lock().expect("lock").insert(uid, entry);
    }
}

/// Brings one pod from its previous entry to what `info` asks for.
async fn apply(state: &AgentState, info: PodInfo, previous: Option<PodEntry>) -> PodEntry {
    let policy = pod_policy(&info);
    let (mtls, mtls_warnings) = {
        let policies = state.peer_authentications.lock().expect("lock");
        crate::policy::inbound_mtls(&info, &policies, &state.config.root_namespace)
    };
    if previous.as_ref().is_none_or(|p| p.mtls != mtls) {
        for w in &mtls_warnings {
            tracing::error!(pod = %info.key(), "{w}");
        }
        tracing::info!(pod = %info.key(), mode = ?mtls.mode, ports = ?mtls.ports, decided_by = %mtls.decided_by, "inbound mTLS mode");
    }
    let policy_changed = previous.as_ref().is_none_or(|p| p.policy != policy);
    if policy_changed {
        for w in &policy.warnings {
            tracing::warn!("{w}");
        }
        if policy.enrollment == Enrollment::MissingIdentityLabel {
            tracing::warn!(
                pod = %info.key(),
                "pod asks for injection ({INJECT_LABEL}=true) but lacks the label {IDENTITY_LABEL}=true, \
                 so SPIRE issues it no identity: NOT captured; add the label to enroll it"
            );
        }
    }
    if policy.enrollment != Enrollment::Enrolled {
        if let Some(p) = previous {
            if matches!(p.state, PodState::Captured(_)) {
                tracing::info!(pod = %info.key(), "pod no longer enrolled: capture removed, traffic goes direct");
            }
            release(state, &p);
        }
        return PodEntry { info, policy, mtls, state: PodState::NotEnrolled };
    }
    let id = match workload_id(&state.config.trust_domain, &info.namespace, &info.service_account) {
        Ok(id) => id,
        Err(e) => {
            let error = format!(
                "no SPIFFE ID for namespace {:?}, service account {:?}: {e}",
                info.namespace, info.service_account
            );
            tracing::error!(pod = %info.key(), "{error}");
            return PodEntry {
                info,
                policy,
                mtls,
                state: PodState::Failed { error, retry_at: Instant::now() + RETRY_FAILED },
            };
        }
    };
    if let Some(mut prev) = previous {
        let same_place =
            prev.info.local == info.local && matches!(&prev.state, PodState::Captured(c) if c.subject.id == id);
        if let (true, PodState::Captured(captured)) = (same_place, &mut prev.state) {
            let rules_changed = prev.policy.outbound != policy.outbound
                || prev.policy.inbound != policy.inbound
                || prev.info.ips != info.ips;
            if rules_changed {
                let spec = spec(&info, captured, &policy);
                let result = state.capture.lock().expect("capture lock").reconfigure(&spec);
                if let Err(e) = result {
                    // Rules half old, half new: close the listeners (connects are
                    // refused, never sent around the mesh) and retry from scratch.
                    let error = format!("updating capture rules: {e}");
                    state.identities.release(&captured.subject);
                    tracing::error!(pod = %info.key(), "{error}; connections refused until a retry succeeds");
                    return PodEntry {
                        info,
                        policy,
                        mtls,
                        state: PodState::Failed { error, retry_at: Instant::now() + RETRY_FAILED },
                    };
                }
            }
            captured.mtls.send_if_modified(|m| {
                let changed = *m != mtls;
                *m = mtls.clone();
                changed
            });
            return PodEntry { info, policy, mtls, state: prev.state };
        }
        // Moved (new netns or cgroup): start over. A pod that failed keeps
        // whatever capture is pinned for it (fail closed); enrolling again
        // adopts or replaces it.
        if matches!(prev.state, PodState::Captured(_)) {
            release(state, &prev);
        }
    }
    let state_now = match enroll(state, &info, &policy, &mtls, id).await {
        Ok(captured) => {
            tracing::info!(pod = %info.key(), netns_cookie = captured.netns.cookie(), hooks = ?captured.hooks, "pod captured");
            PodState::Captured(Box::new(captured))
        }
        Err(error) => {
            tracing::error!(pod = %info.key(), "cannot capture pod: {error}; other pods are unaffected; retrying in {}s", RETRY_FAILED.as_secs());
            PodState::Failed { error, retry_at: Instant::now() + RETRY_FAILED }
        }
    };
    PodEntry { info, policy, mtls, state: state_now }
}

fn spec<'a>(info: &'a PodInfo, c: &'a CapturedPod, policy: &'a crate::policy::PodPolicy) -> PodCapture<'a> {
    PodCapture {
        pod: info.key(),
        uid: &info.uid,
        cgroup: &c.cgroup,
        cgroup_id: c.cgroup_id,
        netns_cookie: c.netns.cookie(),
        netns: c.netns.path(),
        ips: &info.ips,
        outbound: &policy.outbound,
        inbound: &policy.inbound,
        listeners: &c.engine.inbound_listeners,
    }
}

async fn enroll(
    state: &AgentState,
    info: &PodInfo,
    policy: &crate::policy::PodPolicy,
    mtls: &crate::policy::InboundMtls,
    id: SpiffeId,
) -> Result<CapturedPod, String> {
    let local = info.local.as_ref().expect("only local pods are enrolled");
    let key = info.key();
    let cgroup =
        cgroup::resolve_pod_cgroup(&state.cgroup2, &local.cgroup, &state.agent_cgroup).map_err(|e| e.to_string())?;
    let cgroup_id = cgroup::cgroup_id(&cgroup).map_err(|e| e.to_string())?;
    let netns = Netns::enter(&local.netns, &info.name).map_err(|e| e.to_string())?;
    // Listener first: once the hooks are attached, connects go to it.
    let (mtls_tx, mtls_rx) = tokio::sync::watch::channel(mtls.clone());
    let subject = Subject {
        id,
        pod_uid: info.uid.clone(),
        namespace: info.namespace.clone(),
        service_account: info.service_account.clone(),
    };
    let identity = state.identities.acquire(&subject);
    let ctx = EngineContext {
        identity: identity.clone(),
        mesh: state.mesh.subscribe(),
        mtls: mtls_rx,
        detect_timeout: state.config.protocol_detect_timeout,
        half_closed_idle: state.config.half_closed_timeout,
    };
    let engine = {
        let pins = state.capture.lock().expect("capture lock").pins().clone();
        let ports = Ports { outbound: state.config.outbound_port, inbound: state.config.inbound_port };
        match PodEngine::start(&key, netns.clone(), &pins, ports, ctx).await {
            Ok(engine) => engine,
            Err(e) => {
                state.identities.release(&subject);
                return Err(e.to_string());
            }
        }
    };
    let spec = PodCapture {
        pod: key.clone(),
        uid: &info.uid,
        cgroup: &cgroup,
        cgroup_id,
        netns_cookie: netns.cookie(),
        netns: &local.netns,
        ips: &info.ips,
        outbound: &policy.outbound,
        inbound: &policy.inbound,
        listeners: &engine.inbound_listeners,
    };
    let enrolled = state.capture.lock().expect("capture lock").enroll(&spec);
    match enrolled {
        Ok(hooks) => Ok(CapturedPod { netns, cgroup, cgroup_id, hooks, engine, subject, identity, mtls: mtls_tx }),
        Err(e) => {
            state.identities.release(&subject);
            Err(e.to_string())
        }
    }
}

/// Removes capture (links, then map entries) and closes the pod's listeners.
/// Whatever state the pod was in: a pod that failed to re-enroll (say after
/// an agent restart) can still carry pinned capture from before.
fn release(state: &AgentState, entry: &PodEntry) {
    let cookie = match &entry.state {
        PodState::Captured(c) => {
            c.engine.stop();
            state.identities.release(&c.subject);
            Some(c.netns.cookie())
        }
        PodState::Failed { .. } | PodState::NotEnrolled => None,
    };
    if let Err(e) = state.capture.lock().expect("capture lock").unenroll(&entry.info.uid, cookie) {
        tracing::error!(pod = %entry.info.key(), error = %e, "removing capture failed; restart the agent to retry");
    }
}
