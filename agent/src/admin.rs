//! Admin endpoint: `/status` (what `meshcap-agent status` shows),
//! `/config_dump` (effective config and pods), `/healthz/ready`.

use std::{net::SocketAddr, sync::atomic::Ordering, sync::Arc};

use axum::{extract::State, http::StatusCode, routing::get, Json, Router};
use serde::Serialize;

use crate::{
    agent::{AgentState, PodState},
    capture::MapOccupancy,
    engine::PodStatsSnapshot,
    policy::{Enrollment, PolicyWarning},
};

#[derive(Debug, Serialize)]
pub struct Status {
    pub ready: bool,
    /// Where pods come from, e.g. `pods file /etc/pods.yaml`, `Kubernetes API (node n1)`.
    pub source: String,
    /// Why the source cannot be read now; the last state it gave stays in force.
    pub source_error: Option<String>,
    /// The same two for the pods file only (older scripts read these).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pods_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pods_file_error: Option<String>,
    pub mesh_pods: usize,
    /// The kubelet cgroup whose probes of enrolled pods reach the app (null: exemption off).
    pub kubelet_probe_cgroup: Option<String>,
    pub pods: Vec<PodStatus>,
    pub maps: Vec<MapOccupancy>,
    pub counters: std::collections::BTreeMap<&'static str, u64>,
    pub identity: IdentityStatus,
}

#[derive(Debug, Serialize)]
pub struct IdentityStatus {
    pub source: &'static str,
    /// The agent's own identity from the Workload API (null when not configured).
    pub agent: Option<crate::agent::own_identity::OwnIdentityStatus>,
    pub trust_domain: String,
    pub refreshes: u64,
    pub refresh_failures: u64,
}

#[derive(Debug, Serialize)]
pub struct PodStatus {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
    pub ips: Vec<String>,
    pub enrollment: Enrollment,
    pub captured: bool,
    pub error: Option<String>,
    pub netns_cookie: Option<u64>,
    pub hooks: Vec<String>,
    pub outbound: Option<PodStatsSnapshot>,
    pub inbound: Option<PodStatsSnapshot>,
    /// SPIFFE ID the pod presents, and when its current SVID expires (unix seconds; null: none yet).
    pub spiffe_id: Option<String>,
    pub svid_expires: Option<u64>,
    /// Inbound mTLS mode (STRICT / PERMISSIVE / DISABLE), per-port overrides and the deciding policy.
    pub mtls: crate::policy::InboundMtls,
    pub warnings: Vec<PolicyWarning>,
}

/// The three endpoints, each on its own port (as Istio's 15000/15020/15021):
/// admin (`/status`, `/config_dump`, `/healthz/ready`), metrics (`/metrics`)
/// and readiness (`/healthz/ready`), so probes and scrapes never need the
/// admin port. Returns the bound addresses in that order.
pub async fn serve(state: Arc<AgentState>) -> std::io::Result<[SocketAddr; 3]> {
    let admin = Router::new()
        .route("/status", get(status))
        .route("/config_dump", get(config_dump))
        .route("/healthz/ready", get(ready))
        .with_state(state.clone());
    let metrics = Router::new().route("/metrics", get(metrics)).with_state(state.clone());
    let readiness = Router::new().route("/healthz/ready", get(ready)).with_state(state.clone());
    let c = &state.config;
    Ok([
        listen("admin", c.admin_addr, admin).await?,
        listen("metrics", c.metrics_addr, metrics).await?,
        listen("readiness", c.readiness_addr, readiness).await?,
    ])
}

async fn listen(what: &'static str, addr: SocketAddr, app: Router) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("{what} endpoint {addr}: {e}")))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "{what} endpoint stopped");
        }
    });
    Ok(bound)
}

async fn metrics(State(state): State<Arc<AgentState>>) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    let status = tokio::task::spawn_blocking(move || build_status(&state)).await.expect("status task");
    (
        [(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        crate::metrics::render(&status),
    )
}

/// Ready once the pod source has given a first snapshot, every pod that should be
/// captured is, and every identity in use has an SVID.
pub fn is_ready(state: &AgentState) -> bool {
    state.source_loaded.load(Ordering::Relaxed)
        && state.pods.lock().expect("lock").values().all(|p| !matches!(p.state, PodState::Failed { .. }))
        && state
            .identities
            .snapshot()
            .iter()
            .all(|(_, expiry)| expiry.is_some_and(|t| t > std::time::SystemTime::now()))
        && state.own_identity.ready()
}

pub fn build_status(state: &AgentState) -> Status {
    let pods = state
        .pods
        .lock()
        .expect("lock")
        .values()
        .map(|p| {
            let (captured, error, cookie, hooks, outbound, inbound) = match &p.state {
                PodState::Captured(c) => {
                    let hooks = crate::capture::Pins::hooks_in(
                        &state.capture.lock().expect("lock").pins().pod_links_dir(&p.info.uid, c.cgroup_id),
                    );
                    let (out, inb) = (c.engine.stats.snapshot(), c.engine.inbound_stats.snapshot());
                    (true, None, Some(c.netns.cookie()), hooks, Some(out), Some(inb))
                }
                PodState::Failed { error, .. } => {
                    // Capture pinned before the failure stays (fail closed): show it.
                    let capture = state.capture.lock().expect("lock");
                    let hooks = capture
                        .pins()
                        .pinned_pods()
                        .into_iter()
                        .find(|pinned| pinned.uid == p.info.uid)
                        .map(|pinned| crate::capture::Pins::hooks_in(&pinned.dir))
                        .unwrap_or_default();
                    (false, Some(error.clone()), None, hooks, None, None)
                }
                PodState::NotEnrolled => (false, None, None, vec![], None, None),
            };
            // The identity as issued (SPIRE may issue another ID than expected).
            let (spiffe_id, svid_expires) = match &p.state {
                PodState::Captured(c) => match c.identity.borrow().as_ref() {
                    Some(t) => (
                        Some(t.id.to_string()),
                        t.not_after.duration_since(std::time::UNIX_EPOCH).ok().map(|d| d.as_secs()),
                    ),
                    None => (Some(c.subject.id.to_string()), None),
                },
                _ => (None, None),
            };
            PodStatus {
                spiffe_id,
                svid_expires,
                mtls: p.mtls.clone(),
                namespace: p.info.namespace.clone(),
                name: p.info.name.clone(),
                uid: p.info.uid.clone(),
                service_account: p.info.service_account.clone(),
                ips: p.info.ips.iter().map(ToString::to_string).collect(),
                enrollment: p.policy.enrollment,
                captured,
                error,
                netns_cookie: cookie,
                hooks,
                outbound,
                inbound,
                warnings: p.policy.warnings.clone(),
            }
        })
        .collect();
    let (maps, counters, kubelet_probe_cgroup) = {
        let capture = state.capture.lock().expect("lock");
        (capture.occupancy(), capture.counters(), capture.kubelet_cgroup().map(|p| p.display().to_string()))
    };
    let (refreshes, refresh_failures) = state.identities.counts();
    let source_error = state.source_error.lock().expect("lock").clone();
    let pods_file = match &state.config.source {
        crate::config::SourceConfig::File { path } => Some(path),
        crate::config::SourceConfig::Kubernetes { .. } => None,
    };
    Status {
        identity: IdentityStatus {
            source: state.identities.source_name(),
            agent: state.own_identity.status(),
            trust_domain: state.config.trust_domain.clone(),
            refreshes,
            refresh_failures,
        },
        ready: is_ready(state),
        source: state.source.describe(),
        source_error: source_error.clone(),
        pods_file: pods_file.as_ref().map(|p| p.display().to_string()),
        pods_file_error: pods_file.and(source_error),
        mesh_pods: *state.mesh_pods.lock().expect("lock"),
        kubelet_probe_cgroup,
        pods,
        maps,
        counters,
    }
}

async fn status(State(state): State<Arc<AgentState>>) -> Json<Status> {
    Json(tokio::task::spawn_blocking(move || build_status(&state)).await.expect("status task"))
}

async fn config_dump(State(state): State<Arc<AgentState>>) -> Json<serde_json::Value> {
    let pods: Vec<serde_json::Value> = state
        .pods
        .lock()
        .expect("lock")
        .values()
        .map(|p| serde_json::json!({ "pod": p.info, "policy": p.policy, "mtls": p.mtls }))
        .collect();
    Json(serde_json::json!({
        "config": state.config,
        "cgroup2": state.cgroup2,
        "agent_cgroup": state.agent_cgroup,
        "pods": pods,
    }))
}

async fn ready(State(state): State<Arc<AgentState>>) -> (StatusCode, &'static str) {
    if is_ready(&state) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}
