//! The plugin's side of the socket. Blocking: the plugin is a short-lived
//! process with one question to ask.

use std::{
    io::{self, Read as _, Write as _},
    net::Shutdown,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::protocol::{Op, Reply, Request, Response, MAX_MESSAGE_BYTES, PROTOCOL_VERSION};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the meshcap agent at {socket}: {source}")]
    Connect { socket: PathBuf, source: io::Error },
    #[error("the meshcap agent at {socket} did not answer within {timeout:?}")]
    Timeout { socket: PathBuf, timeout: Duration },
    #[error("talking to the meshcap agent at {socket}: {source}")]
    Io { socket: PathBuf, source: io::Error },
    #[error("the meshcap agent at {socket} answered something this plugin cannot read: {reason}")]
    Protocol { socket: PathBuf, reason: String },
}

impl ClientError {
    /// The agent is not there (or not answering) as opposed to answering nonsense.
    pub fn is_unavailable(&self) -> bool {
        !matches!(self, ClientError::Protocol { .. })
    }
}

/// Asks the agent one question. A trait so the plugin's mapping of answers to CNI results can be tested
/// without an agent.
pub trait Agent {
    fn call(&self, socket: &Path, timeout: Duration, op: Op) -> Result<Reply, ClientError>;
}

/// The real thing: a unix stream socket.
pub struct UnixAgent;

impl Agent for UnixAgent {
    fn call(&self, socket: &Path, timeout: Duration, op: Op) -> Result<Reply, ClientError> {
        call(socket, timeout, op)
    }
}

pub fn call(socket: &Path, timeout: Duration, op: Op) -> Result<Reply, ClientError> {
    let deadline = Instant::now() + timeout;
    let io_err = |source: io::Error| {
        if matches!(source.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) {
            ClientError::Timeout { socket: socket.to_path_buf(), timeout }
        } else {
            ClientError::Io { socket: socket.to_path_buf(), source }
        }
    };
    let remaining = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or(ClientError::Timeout { socket: socket.to_path_buf(), timeout })
    };
    let mut stream =
        UnixStream::connect(socket).map_err(|source| ClientError::Connect { socket: socket.to_path_buf(), source })?;
    let request = Request::new(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX), op);
    let bytes = serde_json::to_vec(&request).expect("a request always serializes");
    stream.set_write_timeout(Some(remaining()?)).map_err(io_err)?;
    stream.write_all(&bytes).map_err(io_err)?;
    stream.shutdown(Shutdown::Write).map_err(io_err)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        stream.set_read_timeout(Some(remaining()?)).map_err(io_err)?;
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(e)),
        }
        if buf.len() as u64 > MAX_MESSAGE_BYTES {
            return Err(protocol(socket, format!("answer larger than {MAX_MESSAGE_BYTES} bytes")));
        }
    }
    if buf.is_empty() {
        return Err(protocol(socket, "the connection closed without an answer".into()));
    }
    let value: serde_json::Value =
        serde_json::from_slice(&buf).map_err(|e| protocol(socket, format!("not JSON: {e}")))?;
    let version = value.get("version").and_then(serde_json::Value::as_u64);
    if version != Some(u64::from(PROTOCOL_VERSION)) {
        return Err(protocol(
            socket,
            format!("protocol version {version:?}, this plugin speaks {PROTOCOL_VERSION} (agent and plugin from different releases?)"),
        ));
    }
    let response: Response = serde_json::from_value(value).map_err(|e| protocol(socket, format!("malformed: {e}")))?;
    Ok(response.reply)
}

fn protocol(socket: &Path, reason: String) -> ClientError {
    ClientError::Protocol { socket: socket.to_path_buf(), reason }
}
