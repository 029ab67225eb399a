//! The Kubernetes pod source. Three watches (kube-runtime's watcher handles
//! resourceVersions, bookmarks and 410 relists):
//! - pods of this node (`spec.nodeName`): the candidates for capture;
//! - pods of the whole mesh labelled for an identity: IP → SPIFFE identity;
//! - PeerAuthentications, `security.istio.io/v1`, else `v1beta1`.
//!
//! Fail closed: no snapshot before every watch has listed once, so the agent
//! is not ready and collects no garbage; when the API errors later, the last
//! state stays in force and the error is reported until the API answers.

mod convert;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::{Stream, StreamExt as _};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams},
    runtime::{
        reflector::{self, ObjectRef, Store},
        watcher, WatchStreamExt as _,
    },
    Client,
};
use tokio::sync::mpsc;

use super::{
    source::{Lookup, SourceError, SourceUpdate},
    PeerAuthentication, Snapshot,
};
use crate::policy::IDENTITY_LABEL;
pub use convert::{pod_info, Converted, Skip};

/// Changes arriving together (a relist, a rollout) make one snapshot.
const SETTLE: Duration = Duration::from_millis(50);
/// While a watch fails, how often the API is asked whether it is back.
const PROBE: Duration = Duration::from_secs(2);
/// How often to look again for PeerAuthentication when neither version is served.
const RECHECK_CRD: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Watch {
    LocalPods,
    MeshPods,
    PeerAuthentications,
}

impl fmt::Display for Watch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Watch::LocalPods => "watching the pods of this node",
            Watch::MeshPods => "watching the mesh's pods",
            Watch::PeerAuthentications => "watching PeerAuthentications",
        })
    }
}

enum Signal {
    /// The watch has listed (again): its cache is complete.
    Listed(Watch),
    Changed(Watch),
    Error(Watch, String),
}

/// What the PeerAuthentication watch knows, shared with the assembler.
#[derive(Default)]
struct PolicyState {
    /// None until listed once.
    policies: Option<Vec<PeerAuthentication>>,
    /// The version watched, once found: what the probe asks while the watch fails.
    resource: Option<ApiResource>,
    /// Neither version is served: every pod is PERMISSIVE, which status must say, not only a log line.
    not_served: bool,
}

type SharedPolicies = Arc<Mutex<PolicyState>>;

pub struct KubeSource {
    client: Client,
    node: String,
    local: Store<Pod>,
}

impl KubeSource {
    pub async fn start(node: String, tx: mpsc::Sender<SourceUpdate>) -> Result<Self, SourceError> {
        let mut config = kube::Config::infer().await.map_err(|source| SourceError::KubeConfig { source })?;
        // The client's own retries of 429/503/504 would hide an outage for
        // minutes; the watchers back off by themselves and the outage is
        // reported at once.
        config.default_retry = false;
        tracing::info!(api = %config.cluster_url, node, "pods from the Kubernetes API");
        let client = Client::try_from(config).map_err(|source| SourceError::KubeClient { source })?;
        let pods: Api<Pod> = Api::all(client.clone());
        let (signals, signals_rx) = mpsc::unbounded_channel();
        let (local, writer) = reflector::store();
        let cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        tokio::spawn(drive(
            Watch::LocalPods,
            reflector::reflector(writer, watcher(pods.clone(), cfg)),
            signals.clone(),
        ));
        // The identity label only: the inject flag may also be an annotation,
        // which no selector can see; the policy decides as for the pods file.
        let (mesh, writer) = reflector::store();
        let cfg = watcher::Config::default().labels(&format!("{IDENTITY_LABEL}=true"));
        tokio::spawn(drive(Watch::MeshPods, reflector::reflector(writer, watcher(pods, cfg)), signals.clone()));
        let policies = SharedPolicies::default();
        tokio::spawn(watch_peer_authentications(client.clone(), policies.clone(), signals));
        let assembler = Assembler { node: node.clone(), local: local.clone(), mesh, policies, warned: HashSet::new() };
        tokio::spawn(assembler.run(client.clone(), signals_rx, tx));
        Ok(Self { client, node, local })
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// The watch's cache first; the API when the pod is not there or is an
    /// older pod of the same name (the kubelet sees a pod before our watch).
    pub async fn lookup(&self, namespace: &str, name: &str, uid: &str) -> Result<Lookup, SourceError> {
        let cached = self.local.get(&ObjectRef::new(name).within(namespace));
        let pod = match cached {
            Some(p) if p.metadata.uid.as_deref() == Some(uid) => (*p).clone(),
            _ => match Api::<Pod>::namespaced(self.client.clone(), namespace).get_opt(name).await {
                Ok(Some(p)) => p,
                Ok(None) => return Ok(Lookup::Absent),
                Err(source) => {
                    // The pod cannot be enrolled and its setup fails closed: an operator must see why (RBAC?).
                    let e = SourceError::GetPod { namespace: namespace.into(), name: name.into(), source };
                    tracing::error!(pod = %format!("{namespace}/{name}"), "cannot look the pod up: {e}");
                    return Err(e);
                }
            },
        };
        Ok(match pod_info(&pod, &self.node) {
            Converted::Pod(info) => Lookup::Found(Box::new(info)),
            // A pod that asks for the mesh but cannot be read must not start unprotected.
            Converted::Skip(Skip::Invalid { pod, reason, asks_injection: true }) => {
                return Err(SourceError::InvalidPod { pod, reason })
            }
            Converted::Skip(skip) => Lookup::Ignored { reason: skip.to_string() },
        })
    }
}

/// Feeds one watch's events into its cache and tells the assembler.
async fn drive<K>(
    which: Watch,
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    signals: mpsc::UnboundedSender<Signal>,
) {
    let mut stream = std::pin::pin!(stream.default_backoff());
    while let Some(item) = stream.next().await {
        let signal = match item {
            Ok(watcher::Event::InitDone) => Signal::Listed(which),
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue,
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => Signal::Changed(which),
            Err(e) => Signal::Error(which, e.to_string()),
        };
        if signals.send(signal).is_err() {
            return;
        }
    }
}

struct Assembler {
    node: String,
    local: Store<Pod>,
    mesh: Store<Pod>,
    policies: SharedPolicies,
    /// hostNetwork pods already warned about (once each).
    warned: HashSet<String>,
}

impl Assembler {
    async fn run(
        mut self,
        client: Client,
        mut signals: mpsc::UnboundedReceiver<Signal>,
        tx: mpsc::Sender<SourceUpdate>,
    ) {
        let mut listed: HashSet<Watch> = HashSet::new();
        let mut failing: BTreeMap<Watch, String> = BTreeMap::new();
        let mut dirty = false;
        let mut probe = tokio::time::interval(PROBE);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let probe_api: Api<Pod> = Api::all(client.clone());
        loop {
            let mut reported = false;
            tokio::select! {
                signal = signals.recv() => {
                    let Some(signal) = signal else { return };
                    // Let a burst settle into one snapshot.
                    tokio::time::sleep(SETTLE).await;
                    let mut batch = vec![signal];
                    while let Ok(s) = signals.try_recv() {
                        batch.push(s);
                    }
                    for signal in batch {
                        match signal {
                            Signal::Listed(w) => {
                                listed.insert(w);
                                failing.remove(&w);
                                dirty = true;
                            }
                            Signal::Changed(w) => {
                                failing.remove(&w);
                                dirty = true;
                            }
                            Signal::Error(w, e) => {
                                failing.insert(w, e);
                                reported = true;
                            }
                        }
                    }
                }
                _ = probe.tick(), if !failing.is_empty() => {
                    // A watch that resumed without news sends nothing: ask, each watch's own resource, so a
                    // pod list that answers does not hide a PeerAuthentication watch that is still refused.
                    let one = ListParams::default().limit(1);
                    let pods = [Watch::LocalPods, Watch::MeshPods];
                    if pods.iter().any(|w| failing.contains_key(w)) && probe_api.list(&one).await.is_ok() {
                        failing.remove(&Watch::LocalPods);
                        failing.remove(&Watch::MeshPods);
                        dirty = true;
                    }
                    let policies = self.policies.lock().expect("lock").resource.clone();
                    if let (true, Some(ar)) = (failing.contains_key(&Watch::PeerAuthentications), policies) {
                        if Api::<DynamicObject>::all_with(client.clone(), &ar).list(&one).await.is_ok() {
                            failing.remove(&Watch::PeerAuthentications);
                            dirty = true;
                        }
                    }
                }
            }
            let error = self.error_text(&failing, listed.len());
            let update = if dirty && listed.len() == 3 {
                dirty = false;
                SourceUpdate::Snapshot { snapshot: self.snapshot(), error }
            } else if let (true, Some(error)) = (reported, error) {
                SourceUpdate::Error(error)
            } else {
                continue;
            };
            if tx.send(update).await.is_err() {
                return;
            }
        }
    }

    fn error_text(&self, failing: &BTreeMap<Watch, String>, listed: usize) -> Option<String> {
        let mut what: Vec<String> = failing.iter().map(|(w, e)| format!("{w}: {e}")).collect();
        if !failing.is_empty() {
            what.push(
                if listed == 3 {
                    "keeping the last known pods and policies until it answers again"
                } else {
                    "not ready and nothing garbage-collected until every watch has listed once (pinned capture stays)"
                }
                .into(),
            );
        }
        if self.policies.lock().expect("lock").not_served {
            what.push(not_served());
        }
        (!what.is_empty()).then(|| format!("Kubernetes API: {}", what.join("; ")))
    }

    fn snapshot(&mut self) -> Snapshot {
        let mut seen = HashSet::new();
        let mut pods = Vec::new();
        for pod in self.local.state().into_iter().chain(self.mesh.state()) {
            match pod_info(&pod, &self.node) {
                Converted::Pod(info) => {
                    if seen.insert(info.uid.clone()) {
                        pods.push(info);
                    }
                }
                Converted::Skip(skip) => match &skip {
                    Skip::HostNetwork { uid, asks_injection: true, .. } => {
                        if self.warned.insert(uid.clone()) {
                            tracing::warn!("{skip}");
                        }
                    }
                    Skip::Invalid { .. } => tracing::warn!("{skip}"),
                    _ => tracing::debug!("{skip}"),
                },
            }
        }
        let peer_authentications = self.policies.lock().expect("lock").policies.clone().unwrap_or_default();
        Snapshot { pods, peer_authentications }
    }
}

fn not_served() -> String {
    format!(
        "PeerAuthentication is served neither as security.istio.io/v1 nor v1beta1 (Istio's CRDs not installed?): \
         no policies, every pod PERMISSIVE; looking again every {}s",
        RECHECK_CRD.as_secs()
    )
}

fn peer_authentication_resource(version: &str) -> ApiResource {
    let gvk = GroupVersionKind::gvk("security.istio.io", version, "PeerAuthentication");
    ApiResource::from_gvk_with_plural(&gvk, "peerauthentications")
}

/// `v1` where served (Istio ≥ 1.22), else `v1beta1`; None when neither is.
pub(crate) async fn served_peer_authentication(client: &Client) -> Result<Option<ApiResource>, kube::Error> {
    for version in ["v1", "v1beta1"] {
        let ar = peer_authentication_resource(version);
        match Api::<DynamicObject>::all_with(client.clone(), &ar).list(&ListParams::default().limit(1)).await {
            Ok(_) => return Ok(Some(ar)),
            Err(kube::Error::Api(status)) if status.code == 404 => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

async fn watch_peer_authentications(client: Client, shared: SharedPolicies, signals: mpsc::UnboundedSender<Signal>) {
    let which = Watch::PeerAuthentications;
    let mut backoff = Duration::from_millis(500);
    let ar = loop {
        match served_peer_authentication(&client).await {
            Ok(Some(ar)) => break ar,
            Ok(None) => {
                {
                    let mut state = shared.lock().expect("lock");
                    if state.policies.replace(Vec::new()).is_none() {
                        tracing::warn!("{}", not_served());
                    }
                    state.not_served = true;
                }
                let _ = signals.send(Signal::Listed(which));
                tokio::time::sleep(RECHECK_CRD).await;
            }
            Err(e) => {
                let _ = signals.send(Signal::Error(which, format!("finding the served version: {e}")));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    };
    tracing::info!(version = %ar.api_version, "PeerAuthentications watched");
    {
        let mut state = shared.lock().expect("lock");
        state.not_served = false;
        state.resource = Some(ar.clone());
    }
    let writer = reflector::store::Writer::new(ar.clone());
    let store = writer.as_reader();
    let stream = reflector::reflector(writer, watcher(Api::all_with(client, &ar), watcher::Config::default()));
    let mut stream = std::pin::pin!(stream.default_backoff());
    while let Some(item) = stream.next().await {
        let signal = match item {
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue,
            Ok(event) => {
                let mut policies = Vec::new();
                for obj in store.state() {
                    match convert::peer_authentication(&obj) {
                        Ok(pa) => policies.push(pa),
                        // Only an object that is no PeerAuthentication at all (the API server validates
                        // against the CRD's schema); parts that cannot be applied fail closed in the policy.
                        Err(e) => {
                            let meta = &obj.metadata;
                            let (ns, name) =
                                (meta.namespace.as_deref().unwrap_or(""), meta.name.as_deref().unwrap_or(""));
                            tracing::error!(policy = %format!("{ns}/{name}"), "PeerAuthentication ignored: {e}")
                        }
                    }
                }
                policies.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
                shared.lock().expect("lock").policies = Some(policies);
                match event {
                    watcher::Event::InitDone => Signal::Listed(which),
                    _ => Signal::Changed(which),
                }
            }
            Err(e) => Signal::Error(which, e.to_string()),
        };
        if signals.send(signal).is_err() {
            return;
        }
    }
}
