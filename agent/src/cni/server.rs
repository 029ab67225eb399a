//! The agent's side of the plugin socket: accept, read one request, ask the
//! [`Handler`], answer, close. Every step has a deadline, so a stuck plugin
//! or a stuck enrollment costs one task, never the agent.

use std::{
    future::Future,
    io,
    os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{UnixListener, UnixStream},
    task::JoinHandle,
    time::timeout,
};

use super::protocol::{
    AddOutcome, AddRequest, CheckRequest, DelRequest, Op, Reply, Request, Response, MAX_MESSAGE_BYTES, PROTOCOL_VERSION,
};

/// What the agent does for each CNI command. Errors are messages for the
/// pod's events: they say what is wrong, the server adds nothing but the
/// command and the pod to its own log.
pub trait Handler: Send + Sync + 'static {
    /// Enroll the pod now, before its apps start; `Err` fails the pod's network setup (the kubelet retries).
    fn add(&self, req: AddRequest) -> impl Future<Output = Result<AddOutcome, String>> + Send;
    /// The sandbox is going away. Must tolerate pods it never saw and repeated calls.
    fn del(&self, req: DelRequest) -> impl Future<Output = Result<(), String>> + Send;
    /// `Err` when the pod should be captured and is not.
    fn check(&self, req: CheckRequest) -> impl Future<Output = Result<AddOutcome, String>> + Send;
    /// `Err` while ADD could not decide (the runtime then starts no new sandbox on this network).
    fn status(&self) -> Result<(), String>;
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("creating the directory of the CNI socket {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("the CNI socket path {path} holds something that is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("binding the CNI socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("restricting the CNI socket {path} to mode 0600: {source}")]
    Chmod { path: PathBuf, source: io::Error },
    #[error("moving the CNI socket into place at {path}: {source}")]
    Rename { path: PathBuf, source: io::Error },
}

/// How long each step of one request may take.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    /// From accept to the plugin's complete request.
    pub read: Duration,
    /// Upper bound on the handler, whatever timeout the plugin asked for.
    pub handler_max: Duration,
    pub write: Duration,
}

impl Default for Deadlines {
    fn default() -> Deadlines {
        Deadlines { read: Duration::from_secs(5), handler_max: Duration::from_secs(120), write: Duration::from_secs(5) }
    }
}

/// The listening socket; dropping it stops accepting and removes the socket file, unless another agent has
/// since put its own there (an upgrade starts the new agent before the old one is gone).
pub struct CniServer {
    path: PathBuf,
    inode: (u64, u64),
    accept: JoinHandle<()>,
}

impl CniServer {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for CniServer {
    fn drop(&mut self) {
        self.accept.abort();
        let ours = std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.inode);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Listens on `path` (mode 0600: only root on the node may ask for enrollments), replacing a socket left by
/// an earlier agent, and serves each connection on its own task. Must be called within a tokio runtime.
pub fn serve<H: Handler>(path: impl Into<PathBuf>, handler: Arc<H>) -> Result<CniServer, ServeError> {
    serve_with(path, handler, Deadlines::default())
}

pub fn serve_with<H: Handler>(
    path: impl Into<PathBuf>,
    handler: Arc<H>,
    deadlines: Deadlines,
) -> Result<CniServer, ServeError> {
    let path = path.into();
    let (listener, inode) = bind(&path)?;
    let accept = tokio::spawn(accept_loop(listener, handler, deadlines));
    tracing::info!(socket = %path.display(), "serving the CNI plugin");
    Ok(CniServer { path, inode, accept })
}

/// Binds under a temporary name, restricts it, then renames it over `path`: the socket never exists at `path`
/// with looser permissions, and a stale socket is replaced in one step.
fn bind(path: &Path) -> Result<(UnixListener, (u64, u64)), ServeError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => return Err(ServeError::NotASocket { path: path.to_path_buf() }),
        _ => {}
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|source| ServeError::CreateDir { path: path.to_path_buf(), source })?;
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let std_listener = std::os::unix::net::UnixListener::bind(&tmp)
        .map_err(|source| ServeError::Bind { path: path.to_path_buf(), source })?;
    let placed = (|| {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .map_err(|source| ServeError::Chmod { path: path.to_path_buf(), source })?;
        let meta =
            std::fs::symlink_metadata(&tmp).map_err(|source| ServeError::Bind { path: path.to_path_buf(), source })?;
        std::fs::rename(&tmp, path).map_err(|source| ServeError::Rename { path: path.to_path_buf(), source })?;
        Ok((meta.dev(), meta.ino()))
    })();
    let inode = placed.inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    let bind_err = |source| ServeError::Bind { path: path.to_path_buf(), source };
    std_listener.set_nonblocking(true).map_err(bind_err)?;
    let listener = UnixListener::from_std(std_listener).map_err(bind_err)?;
    Ok((listener, inode))
}

async fn accept_loop<H: Handler>(listener: UnixListener, handler: Arc<H>, deadlines: Deadlines) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve_connection(stream, handler.clone(), deadlines));
            }
            Err(e) => {
                // EMFILE and the like pass; spinning on them would starve the rest of the agent.
                tracing::warn!(error = %e, "accepting on the CNI socket failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_connection<H: Handler>(mut stream: UnixStream, handler: Arc<H>, deadlines: Deadlines) {
    let reply = match timeout(deadlines.read, read_request(&mut stream)).await {
        Err(_) => Reply::Error { message: format!("no complete request within {:?}", deadlines.read) },
        Ok(Err(message)) => Reply::Error { message },
        Ok(Ok(request)) => dispatch(request, handler.as_ref(), deadlines).await,
    };
    let Ok(bytes) = serde_json::to_vec(&Response::new(reply)) else { return };
    let written = timeout(deadlines.write, async {
        stream.write_all(&bytes).await?;
        stream.shutdown().await
    })
    .await;
    if let Ok(Err(e)) = written {
        // The plugin gave up first (its own timeout): the runtime already has its answer.
        tracing::debug!(error = %e, "CNI plugin went away before the answer");
    }
}

async fn read_request(stream: &mut UnixStream) -> Result<Request, String> {
    let mut buf = Vec::new();
    (&mut *stream)
        .take(MAX_MESSAGE_BYTES + 1)
        .read_to_end(&mut buf)
        .await
        .map_err(|e| format!("reading the request: {e}"))?;
    if buf.len() as u64 > MAX_MESSAGE_BYTES {
        return Err(format!("request larger than {MAX_MESSAGE_BYTES} bytes"));
    }
    let value: serde_json::Value = serde_json::from_slice(&buf).map_err(|e| format!("request is not JSON: {e}"))?;
    // Checked before the shape, so a plugin of another version hears about the version, not a missing field.
    match value.get("version").and_then(serde_json::Value::as_u64) {
        Some(v) if v == u64::from(PROTOCOL_VERSION) => {}
        other => {
            let got = other.map_or_else(|| "none".to_string(), |v| v.to_string());
            return Err(format!(
                "protocol version {got} is not supported: this agent speaks version {PROTOCOL_VERSION} \
                 (is the meshcap-cni binary on the node from another release?)"
            ));
        }
    }
    serde_json::from_value(value).map_err(|e| format!("malformed request: {e}"))
}

async fn dispatch<H: Handler>(request: Request, handler: &H, deadlines: Deadlines) -> Reply {
    let command = request.op.command();
    let budget = match request.timeout_ms {
        0 => deadlines.handler_max,
        ms => Duration::from_millis(ms).min(deadlines.handler_max),
    };
    let pod = match &request.op {
        Op::Add(r) | Op::Check(r) => format!("{}/{}", r.namespace, r.name),
        Op::Del(r) => format!("{}/{}", r.namespace, r.name),
        Op::Status => String::new(),
    };
    let work = async {
        match request.op {
            Op::Add(r) => handler.add(r).await.map(Reply::Pod),
            Op::Check(r) => handler.check(r).await.map(Reply::Pod),
            Op::Del(r) => handler.del(r).await.map(|()| Reply::Deleted),
            Op::Status => handler.status().map(|()| Reply::Ready),
        }
    };
    let reply = match timeout(budget, work).await {
        Ok(Ok(reply)) => reply,
        Ok(Err(message)) => Reply::Error { message },
        Err(_) => Reply::Error { message: format!("the agent did not finish {command} within {budget:?}") },
    };
    match &reply {
        // The runtime polls STATUS: its failures are in the agent's status already.
        Reply::Error { message } if command == "STATUS" => tracing::debug!(error = %message, "CNI STATUS: not ready"),
        Reply::Error { message } => tracing::warn!(command, pod, error = %message, "CNI request failed"),
        Reply::Pod(outcome) => tracing::info!(command, pod, ?outcome, "CNI request served"),
        Reply::Deleted => tracing::info!(command, pod, "CNI request served"),
        Reply::Ready => tracing::debug!(command, "CNI request served"),
    }
    reply
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
