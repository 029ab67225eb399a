//! Turns the source's snapshots into capture state: enroll what should be
//! captured, unenroll what should not, retry what failed. A source error
//! changes nothing.

use std::{
    collections::{BTreeMap, HashSet},
    path::Path,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use tokio::{sync::mpsc, time::Instant};

use super::{AgentState, CapturedPod, PodEntry, PodState};
use crate::{
    agent::identities::Subject,
    capture::PodCapture,
    cgroup, discovery,
    engine::{EngineContext, PodEngine, Ports},
    identity::{workload_id, SpiffeId},
    netns::Netns,
    pods::{PodInfo, SourceUpdate},
    policy::{pod_policy, Enrollment, IDENTITY_LABEL, INJECT_LABEL},
};

const RETRY_FAILED: Duration = Duration::from_secs(5);
/// How often failed pods are looked at.
const HOUSEKEEPING: Duration = Duration::from_millis(250);

/// Applies the source's snapshots as they come; between them, retries pods
/// that failed.
pub async fn run(state: Arc<AgentState>, mut updates: mpsc::Receiver<SourceUpdate>) {
    let mut collected = false;
    let mut tick = tokio::time::interval(HOUSEKEEPING);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            update = updates.recv() => match update {
                None => return,
                Some(SourceUpdate::Snapshot { snapshot, error }) => {
                    let _applying = state.apply_lock.lock().await;
                    let healthy = error.is_none();
                    match error {
                        Some(e) => report_source_error(&state, e),
                        None => *state.source_error.lock().expect("lock") = None,
                    }
                    if !collected {
                        collect_garbage(&state, &snapshot.pods);
                        collected = true;
                    }
                    *state.mesh_pods.lock().expect("lock") = snapshot.pods.len();
                    publish_mesh(&state, &snapshot.pods, &snapshot.peer_authentications);
                    *state.peer_authentications.lock().expect("lock") = snapshot.peer_authentications;
                    reconcile(&state, snapshot.pods, healthy).await;
                    state.source_loaded.store(true, Ordering::Release);
                }
                Some(SourceUpdate::Error(e)) => report_source_error(&state, e),
            },
            _ = tick.tick() => {
                let _applying = state.apply_lock.lock().await;
                retry_failed(&state).await;
            }
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

fn report_source_error(state: &AgentState, message: String) {
    let mut slot = state.source_error.lock().expect("lock");
    if slot.as_deref() != Some(message.as_str()) {
        tracing::error!("{message}");
        *slot = Some(message);
    }
}

/// First snapshot after start: pins of pods that are gone (or no longer
/// enrolled) were left by the previous run; remove them. Pods enrolled on
/// demand meanwhile are live too.
fn collect_garbage(state: &AgentState, pods: &[PodInfo]) {
    let mut live: HashSet<String> = pods
        .iter()
        .filter(|p| p.local.is_some() && pod_policy(p).enrollment == Enrollment::Enrolled)
        .map(|p| p.uid.clone())
        .collect();
    live.extend(state.pods.lock().expect("lock").keys().cloned());
    let removed = state.capture.lock().expect("capture lock").collect_garbage(&live);
    for uid in removed {
        tracing::info!(uid, "removed capture left by a pod that is gone or no longer enrolled");
    }
}

/// `healthy`: no part of the source is failing. A snapshot from a partly
/// failing source may simply not have heard of a pod enrolled on demand yet,
/// so it removes none of those.
async fn reconcile(state: &AgentState, pods: Vec<PodInfo>, healthy: bool) {
    let current: HashSet<String> = state.pods.lock().expect("lock").keys().cloned().collect();
    // A pod of the source without a network yet (no IP, no netns known) has
    // nothing to capture: it is taken once it has, or when the CNI plugin
    // enrolls it.
    let desired: BTreeMap<String, PodInfo> = pods
        .into_iter()
        .filter(|p| {
            p.local.as_ref().is_some_and(|l| !p.ips.is_empty() || l.netns.is_some() || current.contains(&p.uid))
        })
        .map(|p| (p.uid.clone(), p))
        .collect();
    for uid in current {
        if desired.contains_key(&uid) {
            continue;
        }
        let mut pods = state.pods.lock().expect("lock");
        if pods.get(&uid).and_then(|e| e.on_demand_until).is_some_and(|t| !healthy || t > Instant::now()) {
            continue;
        }
        if let Some(entry) = pods.remove(&uid) {
            drop(pods);
            if entry.on_demand_until.is_some() {
                tracing::warn!(
                    pod = %entry.info.key(),
                    "pod enrolled on demand (CNI) never appeared in the {} within {}s: capture removed",
                    state.source.describe(),
                    super::on_demand::SOURCE_GRACE.as_secs()
                );
            } else {
                tracing::info!(pod = %entry.info.key(), "pod removed from the {}", state.source.describe());
            }
            release(state, &entry);
        }
    }
    for (uid, mut info) in desired {
        let previous = state.pods.lock().expect("lock").remove(&uid);
        if let (Some(prev), Some(local)) = (previous.as_ref().and_then(|p| p.info.local.as_ref()), info.local.as_mut())
        {
            // What the source does not say stays as found (or as the CNI
            // plugin gave it): a snapshot without paths is not a move.
            if local.netns.is_none() {
                local.netns.clone_from(&prev.netns);
            }
            if local.cgroup.is_none() {
                local.cgroup.clone_from(&prev.cgroup);
            }
        }
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
        // A retry is no news from the source: an on-demand pod keeps its grace.
        let on_demand_until = previous.on_demand_until;
        let mut entry = apply(state, info, Some(previous)).await;
        entry.on_demand_until = on_demand_until;
        state.pods.lock().expect("lock").insert(uid, entry);
    }
}

/// Brings one pod from its previous entry to what `info` asks for.
pub(super) async fn apply(state: &AgentState, info: PodInfo, previous: Option<PodEntry>) -> PodEntry {
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
        return PodEntry { info, policy, mtls, state: PodState::NotEnrolled, on_demand_until: None };
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
                on_demand_until: None,
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
                        on_demand_until: None,
                    };
                }
            }
            captured.mtls.send_if_modified(|m| {
                let changed = *m != mtls;
                *m = mtls.clone();
                changed
            });
            return PodEntry { info, policy, mtls, state: prev.state, on_demand_until: None };
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
    PodEntry { info, policy, mtls, state: state_now, on_demand_until: None }
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
    let given = match &local.cgroup {
        Some(c) => c.clone(),
        None => discovery::find_pod_cgroup(&state.cgroup_root, &info.uid, local.qos).map_err(|e| e.to_string())?,
    };
    // Found or given, the same rules: never the root, never the agent's own.
    let cgroup = cgroup::resolve_pod_cgroup(&state.cgroup2, &given, &state.agent_cgroup).map_err(|e| e.to_string())?;
    let cgroup_id = cgroup::cgroup_id(&cgroup).map_err(|e| e.to_string())?;
    let netns_path = match &local.netns {
        Some(n) => n.clone(),
        None => discovery::find_pod_netns(Path::new("/proc"), &cgroup).map_err(|e| e.to_string())?,
    };
    // Opened right away: a /proc/<pid>/ns/net path names the netns only
    // while that process lives.
    let netns = Netns::enter(&netns_path, &info.name).map_err(|e| e.to_string())?;
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
        let ports = Ports::from_config(&state.config);
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
        netns: &netns_path,
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
