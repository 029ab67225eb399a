//! The agent's main loop: load capture, follow the pod source (pods file or
//! Kubernetes API), enroll and unenroll pods, serve the admin endpoint, drain
//! on shutdown.

mod cni_handler;
pub mod identities;
pub mod on_demand;
pub mod own_identity;
mod reconcile;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{atomic::AtomicBool, Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use serde::Serialize;

use crate::{
    capture::Capture,
    cgroup,
    cli::RunArgs,
    config::Config,
    engine::PodEngine,
    netns::Netns,
    pods::{PodInfo, PodSource},
    policy::PodPolicy,
};

/// Everything the admin endpoint and the reconcile loop share.
pub struct AgentState {
    pub config: Config,
    pub cgroup2: PathBuf,
    /// Where pod cgroups the source does not name are searched for.
    pub cgroup_root: PathBuf,
    pub agent_cgroup: PathBuf,
    pub capture: Mutex<Capture>,
    pub pods: Mutex<BTreeMap<String, PodEntry>>,
    /// Pods of the whole mesh (this node and others), from the last good snapshot.
    pub mesh_pods: Mutex<usize>,
    pub source: PodSource,
    /// Why the source cannot be read right now (the last snapshot stays in force).
    pub source_error: Mutex<Option<String>>,
    /// A first snapshot arrived: until then the agent is not ready.
    pub source_loaded: AtomicBool,
    /// Held while pods are applied, so the reconcile loop and on-demand
    /// enrollment never work on the same pod at once.
    pub apply_lock: tokio::sync::Mutex<()>,
    pub identities: Arc<identities::Identities>,
    /// The agent's own identity (Workload API), when configured.
    pub own_identity: Arc<own_identity::OwnIdentity>,
    /// Mesh membership, published to every pod's engine.
    pub mesh: tokio::sync::watch::Sender<Arc<crate::mesh::MeshIndex>>,
    /// PeerAuthentication policies from the last good snapshot.
    pub peer_authentications: Mutex<Vec<crate::pods::PeerAuthentication>>,
}

/// One pod of this node, as the agent sees it.
pub struct PodEntry {
    pub info: PodInfo,
    pub policy: PodPolicy,
    /// Inbound mTLS mode from PeerAuthentication.
    pub mtls: crate::policy::InboundMtls,
    pub state: PodState,
    /// Enrolled on demand (CNI) before the source listed it: kept this long
    /// while snapshots do not show it yet.
    pub on_demand_until: Option<tokio::time::Instant>,
}

pub enum PodState {
    /// Not asked for, or missing the identity label: traffic untouched.
    NotEnrolled,
    Captured(Box<CapturedPod>),
    /// Enrolled but capture could not be set up; retried.
    Failed {
        error: String,
        retry_at: tokio::time::Instant,
    },
}

pub struct CapturedPod {
    pub netns: Netns,
    pub cgroup: PathBuf,
    pub cgroup_id: u64,
    pub hooks: Vec<String>,
    pub engine: PodEngine,
    /// Whose identity the pod presents (held from `identities` while captured).
    pub subject: identities::Subject,
    /// The identity as issued (SPIFFE ID, expiry), as the engine sees it.
    pub identity: identities::IdentityWatch,
    /// The pod's inbound mode, as its engine sees it.
    pub mtls: tokio::sync::watch::Sender<crate::policy::InboundMtls>,
}

#[derive(Serialize)]
struct StartupSummary<'a> {
    config: &'a Config,
    cgroup2: &'a PathBuf,
    agent_cgroup: &'a PathBuf,
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    init_tracing();
    let config = Config::from_args(&args)?;
    let cgroup2 = cgroup::cgroup2_mount()?;
    // Before any thread exists: the whole process moves with this write.
    let agent_cgroup = cgroup::ensure_agent_cgroup(&cgroup2, &config.agent_cgroup)?;
    raise_fd_limit();
    let summary =
        serde_json::to_string(&StartupSummary { config: &config, cgroup2: &cgroup2, agent_cgroup: &agent_cgroup })?;
    tracing::info!(config = %summary, "meshcap agent starting");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    runtime.block_on(serve(config, cgroup2, agent_cgroup))
}

/// Two sockets per relayed connection: the default soft limit of 1024 would
/// cap a node at a few hundred connections.
fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: get/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let want = lim.rlim_max;
            lim.rlim_cur = want;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::warn!("cannot raise the open-file limit to {want}; large connection counts may fail");
            }
        }
    }
}

fn init_tracing() {
    use tracing_subscriber::{fmt, EnvFilter};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal as _;
    fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal()).init();
}

async fn serve(config: Config, cgroup2: PathBuf, agent_cgroup: PathBuf) -> anyhow::Result<()> {
    let capture = Capture::load(&config, &agent_cgroup).context("setting up eBPF capture")?;
    tracing::info!(pin_dir = %config.pin_dir.display(), "eBPF programs loaded; maps and links pinned");
    let identities = match &config.spire_admin_socket {
        Some(socket) => {
            tracing::info!(socket, "identity source: SPIRE Delegated Identity API");
            identities::Identities::spire(socket)
        }
        None => {
            tracing::warn!(
                trust_domain = %config.trust_domain,
                "identity source: the BUILT-IN DEVELOPMENT CA mints every pod's SVID; for development and tests \
                 only, not for production (set --spire-admin-socket to use SPIRE)"
            );
            identities::Identities::dev_ca(&config.trust_domain, config.svid_ttl)
                .context("starting the development CA")?
        }
    };
    let (source, updates) = PodSource::start(&config).await.context("starting the pod source")?;
    tracing::info!(source = %source.describe(), "pod source started");
    let state = Arc::new(AgentState {
        config: config.clone(),
        cgroup_root: config.cgroup_root.clone().unwrap_or_else(|| cgroup2.clone()),
        cgroup2,
        agent_cgroup,
        capture: Mutex::new(capture),
        pods: Mutex::new(BTreeMap::new()),
        mesh_pods: Mutex::new(0),
        source,
        source_error: Mutex::new(None),
        source_loaded: AtomicBool::new(false),
        apply_lock: tokio::sync::Mutex::new(()),
        identities,
        own_identity: own_identity::OwnIdentity::start(config.spiffe_endpoint_socket.as_deref()),
        mesh: tokio::sync::watch::channel(Arc::new(crate::mesh::MeshIndex::default())).0,
        peer_authentications: Mutex::new(Vec::new()),
    });
    let [admin, metrics, readiness] =
        crate::admin::serve(state.clone()).await.context("starting the admin, metrics and readiness endpoints")?;
    tracing::info!(%admin, %metrics, %readiness, "listening: admin (/status, /config_dump), metrics (/metrics), readiness (/healthz/ready)");

    let watcher = tokio::spawn(reconcile::run(state.clone(), updates));
    // Held until shutdown: dropping it removes the socket.
    let _cni = match &config.cni_socket {
        Some(path) => {
            let handler = Arc::new(cni_handler::CniHandler { state: state.clone() });
            let server = crate::cni::server::serve(path.clone(), handler).context("starting the CNI socket")?;
            tracing::info!(socket = %path.display(), "CNI plugin requests served");
            Some(server)
        }
        None => None,
    };
    shutdown_signal().await;
    tracing::info!("shutting down: closing listeners, draining connections; capture stays pinned");
    watcher.abort();
    drain(&state, config.drain_timeout).await;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}

/// Stops accepting everywhere, then waits for relayed connections to finish.
async fn drain(state: &AgentState, timeout: Duration) {
    let stats: Vec<_> = {
        let pods = state.pods.lock().expect("pods lock");
        pods.values()
            .filter_map(|p| match &p.state {
                PodState::Captured(c) => {
                    c.engine.stop();
                    Some([c.engine.stats.clone(), c.engine.inbound_stats.clone()])
                }
                _ => None,
            })
            .flatten()
            .collect()
    };
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let active: u64 = stats.iter().map(|s| s.active.load(std::sync::atomic::Ordering::Relaxed)).sum();
        if active == 0 {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(active, "drain deadline reached; resetting the remaining connections");
            for p in state.pods.lock().expect("pods lock").values() {
                if let PodState::Captured(c) = &p.state {
                    c.engine.abort();
                }
            }
            // Let the relays send their resets before the process exits.
            let settle = tokio::time::Instant::now() + Duration::from_secs(1);
            while tokio::time::Instant::now() < settle
                && stats.iter().any(|s| s.active.load(std::sync::atomic::Ordering::Relaxed) > 0)
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
