//! One identity per SPIFFE ID in use on this node (pods of one service
//! account share it), each published through a `watch` so the engine reads
//! the newest TLS configs without a lock. Each is refreshed at half-life;
//! a failed refresh keeps the old SVID and retries with backoff.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tokio::{sync::watch, task::JoinHandle};

use crate::identity::{tls_identity, DevCa, IdentityError, SpiffeId, TlsIdentity};

pub type IdentityWatch = watch::Receiver<Option<Arc<TlsIdentity>>>;

struct Entry {
    rx: IdentityWatch,
    users: usize,
    task: JoinHandle<()>,
}

pub struct Identities {
    ca: Arc<DevCa>,
    ttl: Duration,
    entries: Mutex<HashMap<SpiffeId, Entry>>,
    refreshes: std::sync::atomic::AtomicU64,
    refresh_failures: std::sync::atomic::AtomicU64,
}

const MAX_BACKOFF: Duration = Duration::from_secs(30);

impl Identities {
    /// The built-in development CA: for demos and tests, never production.
    pub fn dev_ca(trust_domain: &str, ttl: Duration) -> Result<Arc<Self>, IdentityError> {
        Ok(Arc::new(Self {
            ca: Arc::new(DevCa::new(trust_domain)?),
            ttl,
            entries: Mutex::new(HashMap::new()),
            refreshes: Default::default(),
            refresh_failures: Default::default(),
        }))
    }

    /// The identity's watch, starting its refresh task on first use.
    pub fn acquire(self: &Arc<Self>, id: &SpiffeId) -> IdentityWatch {
        let mut entries = self.entries.lock().expect("identities lock");
        if let Some(e) = entries.get_mut(id) {
            e.users += 1;
            return e.rx.clone();
        }
        let (tx, rx) = watch::channel(None);
        let task = tokio::spawn(self.clone().refresh(id.clone(), tx));
        entries.insert(id.clone(), Entry { rx: rx.clone(), users: 1, task });
        rx
    }

    /// One user fewer; the last one stops the refreshes.
    pub fn release(&self, id: &SpiffeId) {
        let mut entries = self.entries.lock().expect("identities lock");
        if let Some(e) = entries.get_mut(id) {
            e.users -= 1;
            if e.users == 0 {
                e.task.abort();
                entries.remove(id);
            }
        }
    }

    /// (identity, expiry of the SVID in use) for status.
    pub fn snapshot(&self) -> Vec<(SpiffeId, Option<SystemTime>)> {
        let entries = self.entries.lock().expect("identities lock");
        let mut out: Vec<_> =
            entries.iter().map(|(id, e)| (id.clone(), e.rx.borrow().as_ref().map(|t| t.not_after))).collect();
        out.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        out
    }

    pub fn counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.refreshes.load(Relaxed), self.refresh_failures.load(Relaxed))
    }

    async fn refresh(self: Arc<Self>, id: SpiffeId, tx: watch::Sender<Option<Arc<TlsIdentity>>>) {
        use std::sync::atomic::Ordering::Relaxed;
        let mut backoff = Duration::from_millis(500);
        loop {
            let made = self.ca.issue(&id, self.ttl).and_then(|svid| tls_identity(&svid, &self.ca.bundles()));
            match made {
                Ok(identity) => {
                    self.refreshes.fetch_add(1, Relaxed);
                    let life = identity.not_after.duration_since(SystemTime::now()).unwrap_or_default();
                    tracing::debug!(%id, ttl_s = life.as_secs(), "SVID issued");
                    let _ = tx.send(Some(Arc::new(identity)));
                    backoff = Duration::from_millis(500);
                    tokio::time::sleep((life / 2).max(Duration::from_secs(1))).await;
                }
                Err(e) => {
                    self.refresh_failures.fetch_add(1, Relaxed);
                    tracing::warn!(%id, error = %e, retry_in_ms = backoff.as_millis() as u64, "SVID refresh failed; keeping the current one");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}
