use std::{
    io::{Read as _, Write as _},
    os::unix::{fs::PermissionsExt as _, net::UnixStream as StdUnixStream},
    sync::Mutex,
};

use super::*;
use crate::cni::client;

/// A directory of its own under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("mc-cni-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<Op>>,
    /// `add` answers this error when set.
    fail_with: Option<String>,
    stall: bool,
}

impl Handler for Recorder {
    async fn add(&self, req: AddRequest) -> Result<AddOutcome, String> {
        self.seen.lock().unwrap().push(Op::Add(req));
        if self.stall {
            std::future::pending::<()>().await;
        }
        match &self.fail_with {
            Some(e) => Err(e.clone()),
            None => Ok(AddOutcome::Captured),
        }
    }

    async fn del(&self, req: DelRequest) -> Result<(), String> {
        self.seen.lock().unwrap().push(Op::Del(req));
        Ok(())
    }

    async fn check(&self, req: CheckRequest) -> Result<AddOutcome, String> {
        self.seen.lock().unwrap().push(Op::Check(req));
        Ok(AddOutcome::NotEnrolled { reason: "not labelled".into() })
    }

    fn status(&self) -> Result<(), String> {
        self.fail_with.clone().map_or(Ok(()), Err)
    }
}

fn add_op() -> Op {
    Op::Add(AddRequest {
        namespace: "shop".into(),
        name: "web-0".into(),
        uid: "u-1".into(),
        netns: "/var/run/netns/cni-1".into(),
        container_id: "c1".into(),
        ifname: "eth0".into(),
    })
}

async fn ask(socket: &Path, op: Op) -> Result<Reply, client::ClientError> {
    let socket = socket.to_path_buf();
    tokio::task::spawn_blocking(move || client::call(&socket, Duration::from_secs(5), op)).await.unwrap()
}

/// Sends raw bytes as a plugin of another kind would and returns the parsed answer.
fn raw_exchange(socket: &Path, bytes: &[u8]) -> serde_json::Value {
    let mut s = StdUnixStream::connect(socket).unwrap();
    s.write_all(bytes).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    serde_json::from_str(&out).unwrap()
}

#[tokio::test]
async fn serves_each_command_to_the_handler() {
    let dir = TempDir::new("serve");
    let socket = dir.0.join("run/meshcap/cni.sock");
    let handler = Arc::new(Recorder::default());
    let server = serve(&socket, handler.clone()).expect("serving");
    assert_eq!(server.path(), socket);

    assert_eq!(ask(&socket, add_op()).await.unwrap(), Reply::Pod(AddOutcome::Captured));
    let Op::Add(add) = add_op() else { unreachable!() };
    assert_eq!(
        ask(&socket, Op::Check(add.clone())).await.unwrap(),
        Reply::Pod(AddOutcome::NotEnrolled { reason: "not labelled".into() })
    );
    let del = DelRequest {
        namespace: "shop".into(),
        name: "web-0".into(),
        uid: String::new(),
        netns: None,
        container_id: "c1".into(),
        ifname: "eth0".into(),
    };
    assert_eq!(ask(&socket, Op::Del(del.clone())).await.unwrap(), Reply::Deleted);
    assert_eq!(ask(&socket, Op::Status).await.unwrap(), Reply::Ready);
    assert_eq!(*handler.seen.lock().unwrap(), vec![add_op(), Op::Check(add), Op::Del(del)]);
}

#[tokio::test]
async fn handler_errors_reach_the_plugin() {
    let dir = TempDir::new("err");
    let socket = dir.0.join("cni.sock");
    let handler = Arc::new(Recorder { fail_with: Some("netns /x is gone".into()), ..Recorder::default() });
    let _server = serve(&socket, handler).unwrap();
    assert_eq!(ask(&socket, add_op()).await.unwrap(), Reply::Error { message: "netns /x is gone".into() });
    assert_eq!(ask(&socket, Op::Status).await.unwrap(), Reply::Error { message: "netns /x is gone".into() });
}

#[tokio::test]
async fn socket_is_root_only_replaces_a_stale_one_and_goes_away_on_drop() {
    let dir = TempDir::new("mode");
    let socket = dir.0.join("cni.sock");
    // A socket file nobody listens on, as a killed agent leaves behind.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(StdUnixStream::connect(&socket).is_err(), "stale socket refuses");

    let server = serve(&socket, Arc::new(Recorder::default())).expect("replaces the stale socket");
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(ask(&socket, Op::Status).await.unwrap(), Reply::Ready);
    let leftovers: Vec<_> = std::fs::read_dir(&dir.0).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers, ["cni.sock"], "no temporary socket left");

    // A newer agent takes the path over; the old one going away must not remove the new socket.
    let newer = serve(&socket, Arc::new(Recorder::default())).unwrap();
    drop(server);
    assert_eq!(ask(&socket, Op::Status).await.unwrap(), Reply::Ready);
    drop(newer);
    assert!(!socket.exists(), "the socket goes with its server");
}

#[tokio::test]
async fn refuses_to_replace_what_is_not_a_socket() {
    let dir = TempDir::new("notsock");
    let path = dir.0.join("cni.sock");
    std::fs::write(&path, "precious").unwrap();
    let err = serve(&path, Arc::new(Recorder::default())).err().expect("must refuse").to_string();
    assert!(err.contains(&path.display().to_string()) && err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
}

#[tokio::test]
async fn a_stuck_handler_or_a_silent_plugin_meets_a_deadline() {
    let dir = TempDir::new("deadline");
    let socket = dir.0.join("cni.sock");
    let deadlines = Deadlines {
        read: Duration::from_millis(200),
        handler_max: Duration::from_millis(300),
        write: Duration::from_secs(1),
    };
    let _server = serve_with(&socket, Arc::new(Recorder { stall: true, ..Recorder::default() }), deadlines).unwrap();
    let started = std::time::Instant::now();
    let reply = ask(&socket, add_op()).await.unwrap();
    assert_eq!(reply, Reply::Error { message: "the agent did not finish ADD within 300ms".into() });
    assert!(started.elapsed() < Duration::from_secs(3));

    // Connects and never sends a complete request: answered, not held forever.
    let socket2 = socket.clone();
    let answer = tokio::task::spawn_blocking(move || {
        let mut s = StdUnixStream::connect(&socket2).unwrap();
        s.write_all(b"{\"version\":").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .await
    .unwrap();
    assert!(answer.contains("no complete request within 200ms"), "{answer}");
    // The server still answers others.
    assert_eq!(ask(&socket, Op::Status).await.unwrap(), Reply::Ready);
}

#[tokio::test]
async fn other_protocol_versions_and_garbage_get_a_clear_answer() {
    let dir = TempDir::new("version");
    let socket = dir.0.join("cni.sock");
    let _server = serve(&socket, Arc::new(Recorder::default())).unwrap();
    let s = socket.clone();
    let (v2, garbage, shape) = tokio::task::spawn_blocking(move || {
        (
            raw_exchange(&s, br#"{"version":2,"op":"add","pod":{}}"#),
            raw_exchange(&s, b"hello"),
            raw_exchange(&s, br#"{"version":1,"op":"add","namespace":"x"}"#),
        )
    })
    .await
    .unwrap();
    assert_eq!(v2["result"], "error");
    let msg = v2["message"].as_str().unwrap();
    assert!(msg.contains("protocol version 2") && msg.contains("speaks version 1"), "{msg}");
    assert!(garbage["message"].as_str().unwrap().contains("not JSON"), "{garbage}");
    assert!(shape["message"].as_str().unwrap().contains("malformed request"), "{shape}");
}
