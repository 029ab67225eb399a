//! A pod source is a task that sends the reconcile loop full snapshots (and
//! errors, while it keeps the last good one), plus a handle that finds one pod
//! for on-demand enrollment. The loop does not care where pods come from.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::mpsc;

use super::{kube::KubeSource, PodInfo, Snapshot};
use crate::config::{Config, SourceConfig};

pub enum SourceUpdate {
    /// The whole current state; replaces the previous one. `error`: part of
    /// the source is failing still (the snapshot is its best knowledge).
    Snapshot { snapshot: Snapshot, error: Option<String> },
    /// The source cannot be read; the last snapshot stays in force.
    Error(String),
}

/// What a source knows about one pod.
#[derive(Debug)]
pub enum Lookup {
    Found(Box<PodInfo>),
    /// Known, but never enrolled (hostNetwork, finished).
    Ignored {
        reason: String,
    },
    Absent,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("Kubernetes client configuration (in-cluster service account, or KUBECONFIG): {source}")]
    KubeConfig { source: kube::config::InferConfigError },
    #[error("Kubernetes client: {source}")]
    KubeClient { source: kube::Error },
    #[error("Kubernetes API: GET pod {namespace}/{name}: {}", api_error(source))]
    GetPod { namespace: String, name: String, source: kube::Error },
    #[error("pod {pod} asks for the mesh but cannot be enrolled: {reason}")]
    InvalidPod { pod: String, reason: String },
}

/// The API server's own words first (`403 Forbidden: pods "x" is forbidden: User ... cannot get ...`), not
/// the client's debug dump of its Status.
fn api_error(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) => format!("{} {}: {}", status.code, status.reason, status.message),
        other => other.to_string(),
    }
}

pub enum PodSource {
    File(FileSource),
    Kubernetes(KubeSource),
}

impl PodSource {
    /// Starts the source's task; its updates arrive on the receiver.
    pub async fn start(config: &Config) -> Result<(Self, mpsc::Receiver<SourceUpdate>), SourceError> {
        let (tx, rx) = mpsc::channel(16);
        let source = match &config.source {
            SourceConfig::File { path } => PodSource::File(FileSource::start(path.clone(), config.pods_poll, tx)),
            SourceConfig::Kubernetes { node_name } => {
                PodSource::Kubernetes(KubeSource::start(node_name.clone(), tx).await?)
            }
        };
        Ok((source, rx))
    }

    /// Names the source in status and messages.
    pub fn describe(&self) -> String {
        match self {
            PodSource::File(f) => format!("pods file {}", f.path.display()),
            PodSource::Kubernetes(k) => format!("Kubernetes API (node {})", k.node()),
        }
    }

    /// Finds one pod: in the last snapshot, and for the Kubernetes source
    /// also straight from the API (the watch may lag behind the kubelet).
    /// `uid` is what the caller expects, a hint for a cache that may be stale.
    pub async fn lookup(&self, namespace: &str, name: &str, uid: &str) -> Result<Lookup, SourceError> {
        match self {
            PodSource::File(f) => Ok(f.lookup(namespace, name)),
            PodSource::Kubernetes(k) => k.lookup(namespace, name, uid).await,
        }
    }
}

pub struct FileSource {
    path: PathBuf,
    /// Pods of the last file that parsed.
    last: Arc<Mutex<Vec<PodInfo>>>,
}

impl FileSource {
    fn start(path: PathBuf, poll: Duration, tx: mpsc::Sender<SourceUpdate>) -> Self {
        let last = Arc::new(Mutex::new(Vec::new()));
        tokio::spawn(watch_file(path.clone(), poll, tx, last.clone()));
        Self { path, last }
    }

    fn lookup(&self, namespace: &str, name: &str) -> Lookup {
        let pods = self.last.lock().expect("lock");
        match pods.iter().find(|p| p.namespace == namespace && p.name == name) {
            Some(p) => Lookup::Found(Box::new(p.clone())),
            None => Lookup::Absent,
        }
    }
}

/// Polls the file; a change that parses is a snapshot, one that does not is
/// an error (with file and line) that changes nothing.
async fn watch_file(path: PathBuf, poll: Duration, tx: mpsc::Sender<SourceUpdate>, last: Arc<Mutex<Vec<PodInfo>>>) {
    let mut last_text: Option<String> = None;
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let update = match tokio::fs::read_to_string(&path).await {
            Err(e) => Some(SourceUpdate::Error(format!("pods file {}: cannot read: {e}", path.display()))),
            Ok(text) if last_text.as_deref() == Some(text.as_str()) => None,
            Ok(text) => {
                let parsed = super::parse_pods_file(&path, &text);
                last_text = Some(text);
                Some(match parsed {
                    Ok(file) => {
                        for note in &file.skipped {
                            tracing::debug!(file = %path.display(), "skipped document ({note}): not read by this agent");
                        }
                        *last.lock().expect("lock") = file.pods.clone();
                        let snapshot = Snapshot { pods: file.pods, peer_authentications: file.peer_authentications };
                        SourceUpdate::Snapshot { snapshot, error: None }
                    }
                    Err(e) => SourceUpdate::Error(format!("{e}; keeping the pods already served")),
                })
            }
        };
        if let Some(update) = update {
            if tx.send(update).await.is_err() {
                return;
            }
        }
    }
}
