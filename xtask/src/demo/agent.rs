//! The demo's `meshcap-agent`: started on the pods file with its own pin dir, cgroup and admin port, recorded in
//! a pid file for `--cleanup`, and asked for `/status`.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command},
    time::Duration,
};

use anyhow::{bail, Context as _};
use serde_json::Value;

use super::{
    mesh::{Mesh, Names},
    procs,
};

pub struct Agent {
    child: Child,
    admin: SocketAddr,
    pid_file: PathBuf,
    log: PathBuf,
}

impl Agent {
    pub fn start(binary: &Path, names: &Names, mesh: &Mesh) -> anyhow::Result<Agent> {
        let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let mut cmd = Command::new(binary);
        cmd.arg("run")
            .arg("--pods")
            .arg(&mesh.pods_file)
            .arg("--pin-dir")
            .arg(names.pin_dir())
            .args(["--agent-cgroup", &names.agent_cgroup()])
            .args(["--admin-addr", &admin.to_string()])
            // The demo reads only the admin port; any free port for the others.
            .args(["--metrics-addr", "127.0.0.1:0", "--readiness-addr", "127.0.0.1:0"])
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .env("NO_COLOR", "1");
        eprintln!("demo: starting {cmd:?}");
        let log = names.scratch().join("agent.log");
        let child = procs::spawn_daemon(cmd, &log)?;
        let agent = Agent { admin, pid_file: names.pid_file(), log, child };
        fs::write(&agent.pid_file, format!("{}\n", agent.child.id()))
            .with_context(|| format!("writing {}", agent.pid_file.display()))?;
        Ok(agent)
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    pub fn status(&self) -> anyhow::Result<Value> {
        http_get_json(self.admin, "/status")
    }

    /// Until every meshed pod is captured and holds an SVID, and the STRICT policy is in force.
    pub fn wait_ready(&mut self, mesh: &Mesh, timeout: Duration) -> anyhow::Result<()> {
        let mut last = Value::Null;
        let mut exited = None;
        let ready = procs::wait_until(timeout, || {
            if let Ok(Some(status)) = self.child.try_wait() {
                exited = Some(status);
                return true;
            }
            let Ok(status) = self.status() else { return false };
            last = status;
            mesh.pods.iter().filter(|p| p.meshed).all(|p| {
                let s = pod(&last, p.name);
                s["captured"] == true
                    && s["svid_expires"].is_u64()
                    && (p.name != "backend" || s["mtls"]["mode"] == "STRICT")
            })
        })?;
        if let Some(status) = exited {
            bail!("the agent exited ({status}) before it was ready; its log:\n{}", self.log_tail(30));
        }
        if !ready {
            bail!("the agent was not ready after {timeout:?}; last /status: {last}\nits log:\n{}", self.log_tail(30));
        }
        Ok(())
    }

    /// The last `lines` lines of the agent's log (its file goes with the scratch dir at the end).
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// SIGTERM (the agent drains relayed connections), then SIGKILL; the pid file goes with it.
    pub fn stop(&mut self) {
        procs::terminate(&mut self.child, Duration::from_secs(8));
        let _ = fs::remove_file(&self.pid_file);
    }
}

/// One pod's entry in a `/status` document (Null if absent, so lookups on it stay Null).
pub fn pod<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["pods"].as_array().and_then(|pods| pods.iter().find(|p| p["name"] == name)).unwrap_or(&Value::Null)
}

/// A port on 127.0.0.1 that was free a moment ago (the kernel rotates ephemeral ports, so it stays free).
fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// A minimal HTTP/1.0 GET: the server must then delimit the body by closing, so no chunked decoding is needed.
pub fn http_get_json(addr: SocketAddr, path: &str) -> anyhow::Result<Value> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).with_context(|| format!("{addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).context("reading the response")?;
    let end = response.windows(4).position(|w| w == b"\r\n\r\n").context("response has no end of headers")?;
    let head = String::from_utf8_lossy(&response[..end]);
    if head.split_whitespace().nth(1) != Some("200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or_default());
    }
    serde_json::from_slice(&response[end + 4..]).with_context(|| format!("GET {path}: body is not JSON"))
}
