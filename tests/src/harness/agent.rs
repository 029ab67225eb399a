//! A handle on the `meshcap-agent` binary under test: start, logs, the admin status endpoint, crash and restart,
//! and removal of what it leaves behind (pins, its cgroup) when the test ends.

use std::{
    io::{BufRead as _, BufReader, Read, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use anyhow::{bail, Context as _};
use serde_json::Value;

use super::{
    bin_path, cgroup2_mount, cleanup, free_ports,
    names::{self, Kind},
    wait_until,
};

/// How the agent is started. `AgentOptions::new` fills in unique, per-test values for everything but the pods file.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub pods_file: PathBuf,
    /// Where the agent pins its maps and links; removed when the test ends.
    pub pin_dir: PathBuf,
    /// Name of the agent's own cgroup, a directory directly below the cgroup2 mount.
    pub agent_cgroup: String,
    pub admin_port: u16,
    pub metrics_port: u16,
    pub readiness_port: u16,
    pub extra_args: Vec<String>,
    /// RUST_LOG for the agent; None means the test's own RUST_LOG, or `info`.
    pub rust_log: Option<String>,
    /// The binary: env `MESHCAP_AGENT_BIN`, else `meshcap-agent` next to the test executable's target dir.
    pub binary: PathBuf,
}

impl AgentOptions {
    pub fn new(pods_file: impl Into<PathBuf>) -> AgentOptions {
        let unique = names::unique(Kind::Agent);
        let [admin_port, metrics_port, readiness_port] = free_ports::<3>();
        AgentOptions {
            pods_file: pods_file.into(),
            pin_dir: Path::new("/sys/fs/bpf").join(&unique),
            agent_cgroup: unique,
            admin_port,
            metrics_port,
            readiness_port,
            extra_args: Vec::new(),
            rust_log: None,
            binary: bin_path("meshcap-agent", "MESHCAP_AGENT_BIN"),
        }
    }

    pub fn arg(mut self, arg: impl Into<String>) -> AgentOptions {
        self.extra_args.push(arg.into());
        self
    }

    fn args(&self) -> Vec<String> {
        let mut args = vec!["run".to_string(), "--pods".to_string(), self.pods_file.display().to_string()];
        args.extend(["--pin-dir".to_string(), self.pin_dir.display().to_string()]);
        args.extend(["--agent-cgroup".to_string(), self.agent_cgroup.clone()]);
        args.extend(["--admin-addr".to_string(), format!("127.0.0.1:{}", self.admin_port)]);
        args.extend(["--metrics-addr".to_string(), format!("127.0.0.1:{}", self.metrics_port)]);
        args.extend(["--readiness-addr".to_string(), format!("127.0.0.1:{}", self.readiness_port)]);
        args.extend(self.extra_args.iter().cloned());
        args
    }
}

/// Removes the agent's pin dir and cgroup (killing whatever is left in it) on drop. It outlives kill9 and restart,
/// because those are exactly the cases where pins must survive; tests that start a second `Agent` on the same pins
/// can hold on to it through [`Agent::pin_guard`].
#[derive(Debug)]
pub struct PinDirGuard {
    pin_dir: PathBuf,
    cgroup_dir: PathBuf,
}

impl PinDirGuard {
    pub fn new(pin_dir: PathBuf, cgroup_dir: PathBuf) -> PinDirGuard {
        PinDirGuard { pin_dir, cgroup_dir }
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }
}

impl Drop for PinDirGuard {
    fn drop(&mut self) {
        cleanup::remove_cgroup(&self.cgroup_dir);
        match std::fs::remove_dir_all(&self.pin_dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                eprintln!("harness: removing pin dir {}: {e}", self.pin_dir.display())
            }
            _ => {}
        }
    }
}

/// A running (or crashed) agent. Dropping it stops the agent (SIGTERM, then SIGKILL after 5 s).
pub struct Agent {
    opts: AgentOptions,
    child: Option<Child>,
    pid: u32,
    logs: Arc<Mutex<String>>,
    /// Where in `logs` the current run's output starts.
    run_start: usize,
    guard: Arc<PinDirGuard>,
}

impl Agent {
    pub fn start(opts: AgentOptions) -> Agent {
        let guard = Arc::new(PinDirGuard::new(opts.pin_dir.clone(), cgroup2_mount().join(&opts.agent_cgroup)));
        let logs = Arc::new(Mutex::new(String::new()));
        let child = spawn(&opts, &logs).unwrap_or_else(|e| panic!("starting the agent: {e:#}"));
        Agent { pid: child.id(), child: Some(child), opts, logs, run_start: 0, guard }
    }

    /// Start again with the same options, pins and log buffer (stopping the current process first if it runs).
    /// [`Agent::wait_for_log`] looks at the new run's output only.
    pub fn restart(&mut self) {
        self.stop();
        {
            let mut logs = self.logs.lock().unwrap_or_else(|p| p.into_inner());
            logs.push_str("--- harness: agent restarted ---\n");
            self.run_start = logs.len();
        }
        let child = spawn(&self.opts, &self.logs).unwrap_or_else(|e| panic!("restarting the agent: {e:#}"));
        self.pid = child.id();
        self.child = Some(child);
    }

    /// SIGKILL the agent and reap it, as a crash would; pins and its cgroup stay.
    pub fn kill9(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let _ = child.kill();
        child.wait().ok()
    }

    /// Stop the agent as Kubernetes would: SIGTERM, then SIGKILL if it is still running after 5 s.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: kill has no memory-safety preconditions; the child is not reaped yet, so the pid is still ours.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let mut status = None;
        wait_until(Duration::from_secs(5), || {
            status = child.try_wait().ok().flatten();
            status.is_some()
        });
        if status.is_none() {
            eprintln!("harness: agent pid {} ignored SIGTERM for 5 s, killing it", child.id());
            let _ = child.kill();
            status = child.wait().ok();
        }
        status
    }

    /// Pid of the current (or last) agent process.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Is the agent process still running?
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn options(&self) -> &AgentOptions {
        &self.opts
    }

    pub fn admin_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.opts.admin_port))
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.opts.metrics_port))
    }

    pub fn readiness_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.opts.readiness_port))
    }

    /// The pin dir (removed when the guard goes, at the end of the test).
    pub fn pins(&self) -> &Path {
        &self.opts.pin_dir
    }

    pub fn pin_guard(&self) -> Arc<PinDirGuard> {
        Arc::clone(&self.guard)
    }

    pub fn cgroup_dir(&self) -> PathBuf {
        self.guard.cgroup_dir.clone()
    }

    /// Everything the agent printed (stdout and stderr, all runs).
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Wait until the current run's output contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || {
            let logs = self.logs.lock().unwrap_or_else(|p| p.into_inner());
            logs.get(self.run_start..).is_some_and(|run| run.contains(needle))
        })
    }

    /// GET /status from the admin endpoint.
    pub fn status(&self) -> anyhow::Result<Value> {
        http_get_json(self.admin_addr(), "/status")
    }

    /// Wait until the status endpoint answers (and does not say `"ready": false`). Gives up early if the agent
    /// exits.
    pub fn wait_ready(&mut self, timeout: Duration) -> bool {
        let mut ready = false;
        wait_until(timeout, || {
            ready = self.status().is_ok_and(|s| s["ready"] != false);
            ready || !self.is_running()
        });
        ready
    }

    /// The status entry of the pod called `name`, if the agent answers and knows it.
    pub fn pod_status(&self, name: &str) -> Option<Value> {
        let status = self.status().ok()?;
        status["pods"].as_array()?.iter().find(|p| p["name"] == name).cloned()
    }

    /// Wait until the agent reports the pod as captured.
    pub fn wait_pod_captured(&self, name: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.pod_status(name).is_some_and(|p| p["captured"] == true))
    }

    /// A value from the status `counters` object.
    pub fn counter(&self, name: &str) -> Option<u64> {
        self.status().ok()?["counters"][name].as_u64()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn(opts: &AgentOptions, logs: &Arc<Mutex<String>>) -> anyhow::Result<Child> {
    if !opts.binary.exists() {
        bail!(
            "{} does not exist: build it with `cargo build -p meshcap-agent`, or set MESHCAP_AGENT_BIN",
            opts.binary.display()
        );
    }
    let rust_log =
        opts.rust_log.clone().or_else(|| std::env::var("RUST_LOG").ok()).unwrap_or_else(|| "info".to_string());
    let mut cmd = Command::new(&opts.binary);
    cmd.args(opts.args())
        .env("RUST_LOG", rust_log)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    eprintln!("harness: starting {cmd:?}");
    let mut child = cmd.spawn().with_context(|| format!("spawning {}", opts.binary.display()))?;
    if let Some(out) = child.stdout.take() {
        collect_lines(out, Arc::clone(logs));
    }
    if let Some(err) = child.stderr.take() {
        collect_lines(err, Arc::clone(logs));
    }
    Ok(child)
}

/// Append each line from `pipe` to `logs` and echo it to the test's stderr (which libtest captures per test).
fn collect_lines(pipe: impl Read + Send + 'static, logs: Arc<Mutex<String>>) {
    thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut raw = Vec::new();
        while reader.read_until(b'\n', &mut raw).is_ok_and(|n| n > 0) {
            let line = strip_ansi(&String::from_utf8_lossy(&raw));
            let line = line.trim_end_matches(['\n', '\r']);
            eprintln!("[agent] {line}");
            let mut logs = logs.lock().unwrap_or_else(|p| p.into_inner());
            logs.push_str(line);
            logs.push('\n');
            raw.clear();
        }
    });
}

/// Drop ANSI escape sequences (terminal colours), which would otherwise sit between the words a test looks for.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            out.push(c);
            continue;
        }
        // CSI: ESC [ parameters... final byte in @..~; any other escape is ESC plus one character.
        if chars.next() == Some('[') {
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        }
    }
    out
}

/// A minimal HTTP/1.0 GET: enough for the agent's JSON admin endpoint, without an HTTP client dependency.
pub fn http_get_json(addr: SocketAddr, path: &str) -> anyhow::Result<Value> {
    let (code, body) = http_get(addr, path)?;
    if code != 200 {
        bail!("GET {path}: status {code}: {body}");
    }
    serde_json::from_str(&body).with_context(|| format!("GET {path}: not JSON: {body}"))
}

/// A plain HTTP/1.0 GET: (status code, body).
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).with_context(|| format!("{addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).context("reading the response")?;
    let (head, body) = split_response(&response)?;
    let code = head.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|c| c.parse().ok());
    Ok((code.context("no HTTP status line")?, String::from_utf8_lossy(&body).into_owned()))
}

/// Split a raw response into its head and its body, undoing chunked transfer encoding if the server used it.
fn split_response(response: &[u8]) -> anyhow::Result<(String, Vec<u8>)> {
    let end = response.windows(4).position(|w| w == b"\r\n\r\n").context("response has no end of headers")?;
    let head = String::from_utf8_lossy(&response[..end]).into_owned();
    let body = &response[end + 4..];
    let chunked = head.lines().any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("transfer-encoding") && v.trim().eq_ignore_ascii_case("chunked")
        })
    });
    if !chunked {
        return Ok((head, body.to_vec()));
    }
    let mut out = Vec::new();
    let mut rest = body;
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n").context("truncated chunk size")?;
        let size_text = String::from_utf8_lossy(&rest[..line_end]);
        let size_hex = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16).with_context(|| format!("bad chunk size {size_hex:?}"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok((head, out));
        }
        out.extend_from_slice(rest.get(..size).context("truncated chunk")?);
        rest = rest.get(size + 2..).context("truncated chunk")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_chunked_bodies() {
        let (head, body) = split_response(b"HTTP/1.0 200 OK\r\nA: b\r\n\r\n{\"x\":1}").expect("plain");
        assert_eq!((head.as_str(), body.as_slice()), ("HTTP/1.0 200 OK\r\nA: b", b"{\"x\":1}".as_slice()));
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"x\r\n4;e=1\r\n\":1}\r\n0\r\n\r\n";
        assert_eq!(split_response(raw).expect("chunked").1, b"{\"x\":1}");
    }

    #[test]
    fn colours_are_stripped() {
        assert_eq!(strip_ansi("\x1b[2mts\x1b[0m \x1b[32m INFO\x1b[0m pin_dir\x1b[2m=\x1b[0m/x"), "ts  INFO pin_dir=/x");
        assert_eq!(strip_ansi("plain"), "plain");
    }

    #[test]
    fn agent_command_line() {
        let opts = AgentOptions {
            pods_file: "/p.yaml".into(),
            pin_dir: "/sys/fs/bpf/x".into(),
            agent_cgroup: "x".into(),
            admin_port: 9,
            metrics_port: 10,
            readiness_port: 11,
            extra_args: vec!["--v".into()],
            rust_log: None,
            binary: "/bin/false".into(),
        };
        let expected = "run --pods /p.yaml --pin-dir /sys/fs/bpf/x --agent-cgroup x --admin-addr 127.0.0.1:9 \
                        --metrics-addr 127.0.0.1:10 --readiness-addr 127.0.0.1:11 --v";
        assert_eq!(opts.args().join(" "), expected);
    }
}
