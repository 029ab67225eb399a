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

enum Source {
    DevCa(Arc<DevCa>),
    Spire { endpoint: String, bundles: watch::Receiver<Option<TrustBundles>> },
}

struct Entry {
    rx: IdentityWatch,
    users: usize,
    task: JoinHandle<()>,
}

pub struct Identities {
    source: Source,
    ttl: Duration,
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
        Ok(Arc::new(Self::with(Source::DevCa(Arc::new(DevCa::new(trust_domain)?)), ttl, None)))
    }

    /// SPIRE's Delegated Identity API at `endpoint` (`unix:///path` or a path).
    /// Must run inside the runtime: it starts the bundle subscription.
    pub fn spire(endpoint: &str) -> Arc<Self> {
        let endpoint = spire::endpoint(endpoint);
        let (tx, rx) = watch::channel(None);
        let task = tokio::spawn(spire::watch_bundles(endpoint.clone(), tx));
        Arc::new(Self::with(Source::Spire { endpoint, bundles: rx }, Duration::ZERO, Some(task)))
    }

    fn with(source: Source, ttl: Duration, bundle_task: Option<JoinHandle<()>>) -> Self {
        Self {
            source,
            ttl,
            entries: Mutex::new(HashMap::new()),
            refreshes: AtomicU64::new(0),
            refresh_failures: AtomicU64::new(0),
            _bundle_task: bundle_task,
        }
    }

    pub fn source_name(&self) -> &'static str {
        match self.source {
            Source::DevCa(_) => "development CA",
            Source::Spire { .. } => "SPIRE Delegated Identity API",
        }
    }

    /// SPIRE subscribes per pod; the development CA mints per SPIFFE ID, so
    /// pods of one service account share it.
    fn key(&self, subject: &Subject) -> String {
        match self.source {
            Source::DevCa(_) => subject.id.to_string(),
            Source::Spire { .. } => subject.pod_uid.clone(),
        }
    }

    /// The subject's identity watch, starting its source task on first use.
    pub fn acquire(self: &Arc<Self>, subject: &Subject) -> IdentityWatch {
        let key = self.key(subject);
        let mut entries = self.entries.lock().expect("identities lock");
        if let Some(e) = entries.get_mut(&key) {
            e.users += 1;
            return e.rx.clone();
        }
        let (tx, rx) = watch::channel(None);
        let task = match &self.source {
            Source::DevCa(ca) => tokio::spawn(self.clone().refresh_dev(ca.clone(), subject.id.clone(), tx)),
            Source::Spire { endpoint, bundles } => {
                tokio::spawn(spire::watch_svid(self.clone(), endpoint.clone(), subject.clone(), bundles.clone(), tx))
            }
        };
        entries.insert(key, Entry { rx: rx.clone(), users: 1, task });
        rx
    }

    /// One user fewer; the last one stops the subscription or refreshes.
    pub fn release(&self, subject: &Subject) {
        let key = self.key(subject);
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

    async fn refresh_dev(self: Arc<Self>, ca: Arc<DevCa>, id: SpiffeId, tx: watch::Sender<Option<Arc<TlsIdentity>>>) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            match ca.issue(&id, self.ttl).and_then(|svid| tls_identity(&svid, &ca.bundles())) {
                Ok(identity) => {
                    self.refreshed();
                    let life = identity.not_after.duration_since(SystemTime::now()).unwrap_or_default();
                    tracing::debug!(%id, ttl_s = life.as_secs(), "SVID issued");
                    let _ = tx.send(Some(Arc::new(identity)));
                    backoff = FIRST_BACKOFF;
                    tokio::time::sleep((life / 2).max(Duration::from_secs(1))).await;
                }
                Err(e) => {
                    self.refresh_failed();
                    tracing::warn!(%id, error = %e, retry_in_ms = backoff.as_millis() as u64, "SVID refresh failed; keeping the current one");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}
