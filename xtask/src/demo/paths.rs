//! The five paths: a real client in one pod talking to an app in another, then the evidence that the mesh did
//! what it promises, from the agent's `/status` (counter deltas around each client, so paths cannot borrow each
//! other's evidence) and from the packets of that path's own TCP flow.

use std::{net::Ipv4Addr, path::Path, process::Output, time::Duration};

use anyhow::Context as _;
use serde_json::Value;

use super::{
    agent::{pod, Agent},
    apps::{BACKEND_BODY, BANNER, BANNER_PORT, HTTP_PORT, LEGACY_BODY},
    mesh::{Mesh, NAMESPACE},
    pcap::{Flow, Segment},
    procs,
};

/// What frontend asks backend for: it must never cross the wire in the clear.
const BACKEND_PATH: &str = "/orders?demo=secret";
/// What frontend asks legacy for: that hop is plain, so it must be on the wire.
const LEGACY_PATH: &str = "/catalog?demo=plain";
const HELO_REPLY: &str = "250 HELO meshcap";
/// How long the agent gets to account a connection in /status after the client is done.
const SETTLE: Duration = Duration::from_secs(5);

pub struct Outcome {
    pub path: String,
    pub expected: &'static str,
    pub ok: bool,
    pub evidence: String,
}

/// A path whose client ran; the wire check waits for the capture to end.
pub struct Pending {
    path: String,
    expected: &'static str,
    problems: Vec<String>,
    evidence: String,
    flow: (Ipv4Addr, Ipv4Addr, u16),
    wire: fn(&Flow) -> Result<&'static str, &'static str>,
}

/// Runs the clients, one path after the other.
pub fn drive(agent: &Agent, mesh: &Mesh, podctl: &Path, backend_peer_log: &Path) -> anyhow::Result<Vec<Pending>> {
    let td = agent.status()?["identity"]["trust_domain"].as_str().unwrap_or("democluster.internal").to_string();
    let id = |name: &str| format!("spiffe://{td}/ns/{NAMESPACE}/sa/{name}");
    let (frontend, backend, reports, legacy) =
        (mesh.pod("frontend"), mesh.pod("backend"), mesh.pod("reports"), mesh.pod("legacy"));
    let run = |from: &super::mesh::Pod, program: &Path, args: &[&str]| -> anyhow::Result<Output> {
        let cmd = procs::in_netns(program, args, &from.netns_path(), Some(&from.cgroup))?;
        procs::run_with_timeout(cmd, Duration::from_secs(20))
    };
    let curl = Path::new("curl");
    let app_connections = || std::fs::read_to_string(backend_peer_log).map(|t| t.lines().count()).unwrap_or(0);
    let mut pending = Vec::new();

    // (a) frontend -> backend: mTLS both ways, each side proving its own identity.
    let before = agent.status()?;
    let url = format!("http://{}:{HTTP_PORT}{BACKEND_PATH}", backend.ip);
    let out = run(frontend, curl, &["-s", "-m", "5", &url])?;
    let (fid, bid) = (id("frontend"), id("backend"));
    let after = settle(agent, &before, |b, s| {
        peers(s, "frontend", "outbound", &bid) > peers(b, "frontend", "outbound", &bid)
            && peers(s, "backend", "inbound", &fid) > peers(b, "backend", "inbound", &fid)
    })?;
    let mut problems = http_problems(&out, BACKEND_BODY);
    if peers(&after, "backend", "inbound", &fid) <= peers(&before, "backend", "inbound", &fid) {
        problems.push(format!("backend did not verify {fid} inbound"));
    }
    if peers(&after, "frontend", "outbound", &bid) <= peers(&before, "frontend", "outbound", &bid) {
        problems.push(format!("frontend did not verify {bid} outbound"));
    }
    pending.push(Pending {
        path: "frontend -> backend".into(),
        expected: "mTLS, served",
        problems,
        evidence: format!("mTLS: frontend presented {fid}, backend presented {bid}"),
        flow: (frontend.ip, backend.ip, HTTP_PORT),
        wire: |f| {
            if !f.tls_handshake() {
                Err("no TLS handshake on the wire")
            } else if f.contains(BACKEND_PATH.as_bytes()) || f.contains(BACKEND_BODY.as_bytes()) {
                Err("request or response seen in the clear")
            } else {
                Ok("TLS handshake, request path not seen")
            }
        },
    });

    // (b) legacy -> backend: plaintext to a STRICT pod is reset, and the app never hears of it.
    let before = agent.status()?;
    let app_before = app_connections();
    let addr = format!("{}:{HTTP_PORT}", backend.ip);
    let request = "GET /orders?demo=legacy HTTP/1.0\r\n\r\n";
    let out = run(legacy, podctl, &["connect", "--addr", &addr, "--send", request, "--timeout-ms", "3000"])?;
    let after = settle(agent, &before, |b, s| {
        counter(s, "backend", "inbound", "plaintext_refused") > counter(b, "backend", "inbound", "plaintext_refused")
    })?;
    std::thread::sleep(Duration::from_millis(200));
    let refused = counter(&after, "backend", "inbound", "plaintext_refused");
    let mut problems = Vec::new();
    let client = json_line(&out);
    let reply = client["reply"].as_str().unwrap_or_default();
    if !reply.is_empty() {
        problems.push(format!("legacy got a reply: {reply:?}"));
    }
    let how = match client["ok"].as_bool() {
        Some(false) => "reset",
        Some(true) => "closed",
        None => {
            problems.push(format!("podctl connect said {:?}", String::from_utf8_lossy(&out.stdout).trim()));
            "?"
        }
    };
    if refused <= counter(&before, "backend", "inbound", "plaintext_refused") {
        problems.push("backend's plaintext_refused did not increase".into());
    }
    let app_after = app_connections();
    if app_after != app_before {
        problems.push(format!("backend's app accepted {} connection(s)", app_after - app_before));
    }
    pending.push(Pending {
        path: "legacy -> backend".into(),
        expected: "refused (STRICT)",
        problems,
        evidence: format!(
            "refused: connection {how} before any byte reached backend (plaintext_refused={refused}, \
             backend app accepted nothing)"
        ),
        flow: (legacy.ip, backend.ip, HTTP_PORT),
        wire: |f| if f.reset() { Ok("RST") } else { Err("no reset on the wire") },
    });

    // (c) legacy -> reports: PERMISSIVE serves plaintext, even for a server-first protocol.
    let before = agent.status()?;
    let addr = format!("{}:{BANNER_PORT}", reports.ip);
    let out = run(legacy, podctl, &["banner-client", "--addr", &addr])?;
    let after = settle(agent, &before, |b, s| {
        counter(s, "reports", "inbound", "plaintext") > counter(b, "reports", "inbound", "plaintext")
    })?;
    let mut problems = banner_problems(&out);
    let plaintext = counter(&after, "reports", "inbound", "plaintext");
    if plaintext <= counter(&before, "reports", "inbound", "plaintext") {
        problems.push("reports' inbound plaintext count did not increase".into());
    }
    pending.push(Pending {
        path: "legacy -> reports".into(),
        expected: "plaintext served (PERMISSIVE)",
        problems,
        evidence: format!(
            "plaintext: banner {BANNER:?} intact, reply {HELO_REPLY:?} (reports inbound plaintext={plaintext})"
        ),
        flow: (legacy.ip, reports.ip, BANNER_PORT),
        wire: |f| {
            if f.tls_handshake() {
                Err("TLS on a plaintext path")
            } else if !f.contains(BANNER.as_bytes()) {
                Err("banner not seen on the wire")
            } else {
                Ok("banner in the clear")
            }
        },
    });

    // (d) frontend -> reports: the same server-first app, now over mTLS.
    let before = agent.status()?;
    let out = run(frontend, podctl, &["banner-client", "--addr", &addr])?;
    let rid = id("reports");
    let after = settle(agent, &before, |b, s| {
        peers(s, "reports", "inbound", &fid) > peers(b, "reports", "inbound", &fid)
            && peers(s, "frontend", "outbound", &rid) > peers(b, "frontend", "outbound", &rid)
    })?;
    let mut problems = banner_problems(&out);
    if peers(&after, "reports", "inbound", &fid) <= peers(&before, "reports", "inbound", &fid) {
        problems.push(format!("reports did not verify {fid} inbound"));
    }
    if peers(&after, "frontend", "outbound", &rid) <= peers(&before, "frontend", "outbound", &rid) {
        problems.push(format!("frontend did not verify {rid} outbound"));
    }
    pending.push(Pending {
        path: "frontend -> reports".into(),
        expected: "mTLS, banner intact",
        problems,
        evidence: format!("mTLS: frontend presented {fid}, reports presented {rid}; banner {BANNER:?} intact"),
        flow: (frontend.ip, reports.ip, BANNER_PORT),
        wire: |f| {
            if !f.tls_handshake() {
                Err("no TLS handshake on the wire")
            } else if f.contains(BANNER.as_bytes()) || f.contains(HELO_REPLY.as_bytes()) {
                Err("banner seen in the clear")
            } else {
                Ok("TLS handshake, banner not seen")
            }
        },
    });

    // (e) frontend -> legacy: outside the mesh, so passed through as it is.
    let before = agent.status()?;
    let url = format!("http://{}:{HTTP_PORT}{LEGACY_PATH}", legacy.ip);
    let out = run(frontend, curl, &["-s", "-m", "5", &url])?;
    let after = settle(agent, &before, |b, s| {
        counter(s, "frontend", "outbound", "plaintext") > counter(b, "frontend", "outbound", "plaintext")
    })?;
    let mut problems = http_problems(&out, LEGACY_BODY);
    let plain = counter(&after, "frontend", "outbound", "plaintext");
    if plain <= counter(&before, "frontend", "outbound", "plaintext") {
        problems.push("frontend's outbound plaintext count did not increase".into());
    }
    if counter(&after, "frontend", "outbound", "mtls") != counter(&before, "frontend", "outbound", "mtls") {
        problems.push("frontend opened mTLS to a pod outside the mesh".into());
    }
    pending.push(Pending {
        path: "frontend -> legacy".into(),
        expected: "plain passthrough",
        problems,
        evidence: format!("passthrough: legacy is outside the mesh (frontend outbound plaintext={plain}), body intact"),
        flow: (frontend.ip, legacy.ip, HTTP_PORT),
        wire: |f| {
            if f.tls_handshake() {
                Err("TLS to a pod outside the mesh")
            } else if !f.contains(LEGACY_PATH.as_bytes()) {
                Err("request path not seen on the wire")
            } else {
                Ok("request path seen in the clear")
            }
        },
    });
    Ok(pending)
}

/// Adds each path's wire evidence, from its own flow in the capture.
pub fn judge(pending: Vec<Pending>, wire: &[Segment], dropped: u64) -> Vec<Outcome> {
    pending
        .into_iter()
        .map(|mut p| {
            let (client, server, port) = p.flow;
            let flow = Flow::between(wire, client, server, port);
            let seen = if flow.packets() == 0 { Err("no packets captured") } else { (p.wire)(&flow) };
            match seen {
                Ok(what) => p.evidence.push_str(&format!("; wire: {what}")),
                Err(problem) if dropped > 0 => {
                    p.problems.push(format!("wire: {problem} (tcpdump says the kernel dropped {dropped} packets)"))
                }
                Err(problem) => p.problems.push(format!("wire: {problem}")),
            }
            let ok = p.problems.is_empty();
            // A failure still shows what was seen, which is what tells a mesh bug from a demo bug.
            let evidence = if ok { p.evidence } else { format!("{} (seen: {})", p.problems.join("; "), p.evidence) };
            Outcome { path: format!("{} ({server}:{port})", p.path), expected: p.expected, ok, evidence }
        })
        .collect()
}

pub fn print_table(outcomes: &[Outcome]) {
    let path_w = outcomes.iter().map(|o| o.path.len()).max().unwrap_or(0).max(4);
    let exp_w = outcomes.iter().map(|o| o.expected.len()).max().unwrap_or(0).max(8);
    println!("\n{:<path_w$}  {:<exp_w$}  RESULT  EVIDENCE", "PATH", "EXPECTED");
    for o in outcomes {
        let result = if o.ok { "OK" } else { "FAIL" };
        println!("{:<path_w$}  {:<exp_w$}  {result:<6}  {}", o.path, o.expected, o.evidence);
    }
    println!();
}

/// Polls `/status` until `cond(before, now)` holds or SETTLE passes; returns the last status either way.
fn settle(agent: &Agent, before: &Value, cond: impl Fn(&Value, &Value) -> bool) -> anyhow::Result<Value> {
    let mut last = before.clone();
    procs::wait_until(SETTLE, || {
        if let Ok(now) = agent.status() {
            last = now;
        }
        cond(before, &last)
    })
    .context("waiting for the agent's counters")?;
    Ok(last)
}

fn counter(status: &Value, name: &str, direction: &str, key: &str) -> u64 {
    pod(status, name)[direction][key].as_u64().unwrap_or(0)
}

/// Connections from (outbound) or to (inbound) `name` whose peer proved SPIFFE ID `id`.
fn peers(status: &Value, name: &str, direction: &str, id: &str) -> u64 {
    pod(status, name)[direction]["peer_ids"][id].as_u64().unwrap_or(0)
}

fn json_line(out: &Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().rev().find(|l| !l.trim().is_empty()).and_then(|l| serde_json::from_str(l).ok()).unwrap_or_default()
}

fn http_problems(out: &Output, body: &str) -> Vec<String> {
    let got = String::from_utf8_lossy(&out.stdout);
    if out.status.success() && got == body {
        return Vec::new();
    }
    vec![format!("curl: {} body {got:?} {}", out.status, String::from_utf8_lossy(&out.stderr).trim())]
}

fn banner_problems(out: &Output) -> Vec<String> {
    let r = json_line(out);
    if r["ok"] == true && r["banner"] == BANNER && r["reply"] == HELO_REPLY {
        return Vec::new();
    }
    vec![format!("banner-client: {}", String::from_utf8_lossy(&out.stdout).trim())]
}
