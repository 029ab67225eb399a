//! The identities in use on this node, each published through a `watch` so
//! the engine reads the newest TLS configs without a lock.
//!
//! Two sources: SPIRE's Delegated Identity API (one subscription per pod,
//! selected by `k8s:pod-uid`, plus one bundle subscription; reconnected with
//! backoff, the current SVID kept meanwhile) and the built-in development CA
//! (one identity per SPIFFE ID, refreshed at half-life, the old SVID kept if
//! a refresh fails).

mod spire;

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::{Duration, SystemTime},
};

use tokio::{sync::watch, task::JoinHandle};

use crate::identity::{tls_identity, DevCa, IdentityError, SpiffeId, TlsIdentity, TrustBundles};

pub type IdentityWatch = watch::Receiver<Option<Arc<TlsIdentity>>>;

/// Whose identity: the SPIFFE ID the pod should get, and what SPIRE selects it by.
#[derive(Debug, Clone)]
pub struct Subject {
    pub id: SpiffeId,
    pub pod_uid: String,
    pub namespace: String,
    pub service_account: String,
}

/// Where SVIDs and bundles come from. A source keeps one subject's identity
/// watch up to date until its task is aborted.
pub trait IdentitySource: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// Subjects with the same key share one identity (and one task).
    fn key(&self, subject: &Subject) -> String;
    fn watch(&self, ids: Arc<Identities>, subject: Subject, tx: IdentitySender) -> BoxFuture;
}

pub type IdentitySender = watch::Sender<Option<Arc<TlsIdentity>>>;
pub type BoxFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// The built-in development CA: one identity per SPIFFE ID.
struct DevCaSource {
    ca: Arc<DevCa>,
    ttl: Duration,
}

impl IdentitySource for DevCaSource {
    fn name(&self) -> &'static str {
        "development CA"
    }

    fn key(&self, subject: &Subject) -> String {
        subject.id.to_string()
    }

    fn watch(&self, ids: Arc<Identities>, subject: Subject, tx: IdentitySender) -> BoxFuture {
        Box::pin(refresh_dev(ids, self.ca.clone(), self.ttl, subject.id, tx))
    }
}

/// SPIRE's Delegated Identity API: one subscription per pod.
struct SpireSource {
    endpoint: String,
    bundles: watch::Receiver<Option<TrustBundles>>,
}

impl IdentitySource for SpireSource {
    fn name(&self) -> &'static str {
        "SPIRE Delegated Identity API"
    }

    fn key(&self, subject: &Subject) -> String {
        subject.pod_uid.clone()
    }

    fn watch(&self, ids: Arc<Identities>, subject: Subject, tx: IdentitySender) -> BoxFuture {
        Box::pin(spire::watch_svid(ids, self.endpoint.clone(), subject, self.bundles.clone(), tx))
    }
}

struct Entry {
    rx: IdentityWatch,
    users: usize,
    task: JoinHandle<()>,
}

pub struct Identities {
    source: Box<dyn IdentitySource>,
    entries: Mutex<HashMap<String, Entry>>,
    refreshes: AtomicU64,
    refresh_failures: AtomicU64,
    _bundle_task: Option<JoinHandle<()>>,
}

const MAX_BACKOFF: Duration = Duration::from_secs(30);
const FIRST_BACKOFF: Duration = Duration::from_millis(500);

impl Identities {
    /// The built-in development CA: for demos and tests, never production.
    pub fn dev_ca(trust_domain: &str, ttl: Duration) -> Result<Arc<Self>, IdentityError> {
        Ok(Arc::new(Self::with(Box::new(DevCaSource { ca: Arc::new(DevCa::new(trust_domain)?), ttl }), None)))
    }

    /// SPIRE's Delegated Identity API at `endpoint` (`unix:///path` or a path).
    /// Must run inside the runtime: it starts the bundle subscription.
    pub fn spire(endpoint: &str) -> Arc<Self> {
        let endpoint = spire::endpoint(endpoint);
        let (tx, rx) = watch::channel(None);
        let task = tokio::spawn(spire::watch_bundles(endpoint.clone(), tx));
        Arc::new(Self::with(Box::new(SpireSource { endpoint, bundles: rx }), Some(task)))
    }

    fn with(source: Box<dyn IdentitySource>, bundle_task: Option<JoinHandle<()>>) -> Self {
        Self {
            source,
            entries: Mutex::new(HashMap::new()),
            refreshes: AtomicU64::new(0),
            refresh_failures: AtomicU64::new(0),
            _bundle_task: bundle_task,
        }
    }

    pub fn source_name(&self) -> &'static str {
        self.source.name()
    }

    /// The subject's identity watch, starting its source task on first use.
    pub fn acquire(self: &Arc<Self>, subject: &Subject) -> IdentityWatch {
        let key = self.source.key(subject);
        let mut entries = self.entries.lock().expect("identities lock");
        if let Some(e) = entries.get_mut(&key) {
            e.users += 1;
            return e.rx.clone();
        }
        let (tx, rx) = watch::channel(None);
        let task = tokio::spawn(self.source.watch(self.clone(), subject.clone(), tx));
        entries.insert(key, Entry { rx: rx.clone(), users: 1, task });
        rx
    }

    /// One user fewer; the last one stops the subscription or refreshes.
    pub fn release(&self, subject: &Subject) {
        let key = self.source.key(subject);
        let mut entries = self.entries.lock().expect("identities lock");
        if let Some(e) = entries.get_mut(&key) {
            e.users -= 1;
            if e.users == 0 {
                e.task.abort();
                entries.remove(&key);
            }
        }
    }

    /// (SPIFFE ID in use, expiry of its SVID) per identity, for status;
    /// `None` expiry: not issued (yet).
    pub fn snapshot(&self) -> Vec<(Option<SpiffeId>, Option<SystemTime>)> {
        let entries = self.entries.lock().expect("identities lock");
        entries
            .values()
            .map(|e| {
                let current = e.rx.borrow();
                (current.as_ref().map(|t| t.id.clone()), current.as_ref().map(|t| t.not_after))
            })
            .collect()
    }

    pub fn counts(&self) -> (u64, u64) {
        (self.refreshes.load(Relaxed), self.refresh_failures.load(Relaxed))
    }

    fn refreshed(&self) {
        self.refreshes.fetch_add(1, Relaxed);
    }

    fn refresh_failed(&self) {
        self.refresh_failures.fetch_add(1, Relaxed);
    }
}

async fn refresh_dev(ids: Arc<Identities>, ca: Arc<DevCa>, ttl: Duration, id: SpiffeId, tx: IdentitySender) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        match ca.issue(&id, ttl).and_then(|svid| tls_identity(&svid, &ca.bundles())) {
            Ok(identity) => {
                ids.refreshed();
                let life = identity.not_after.duration_since(SystemTime::now()).unwrap_or_default();
                tracing::debug!(%id, ttl_s = life.as_secs(), "SVID issued");
                let _ = tx.send(Some(Arc::new(identity)));
                backoff = FIRST_BACKOFF;
                tokio::time::sleep((life / 2).max(Duration::from_secs(1))).await;
            }
            Err(e) => {
                ids.refresh_failed();
                tracing::warn!(%id, error = %e, retry_in_ms = backoff.as_millis() as u64, "SVID refresh failed; keeping the current one");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}
