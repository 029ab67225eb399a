//! Mutual TLS between enrolled pods, with each pod's own SPIFFE identity,
//! and PeerAuthentication deciding what plaintext gets.

use std::{process::Stdio, time::Duration};

use meshcap_tests::{
    podctl, privileged_or_skip,
    scenario::{curl, enroll, json_of, podctl_json, serve, Enrolled, LoggedServer, Scenario, WAIT},
    wait_until, Agent, Node, Pod,
};
use serde_json::Value;

const TD: &str = "spiffe://democluster.internal";

fn id_of(pod: &Pod) -> String {
    format!("{TD}/ns/{}/sa/{}", pod.namespace, pod.service_account)
}

fn peer_ids(agent: &Agent, pod: &str, direction: &str) -> Value {
    agent.pod_status(pod).map(|p| p[direction]["peer_ids"].clone()).unwrap_or(Value::Null)
}

/// A PeerAuthentication document selecting `app: <label>`.
fn peer_authentication(name: &str, app: &str, mode: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata:\n  name: {name}\n  \
         namespace: default\nspec:\n  selector:\n    matchLabels:\n      app: {app}\n  mtls:\n    mode: {mode}\n"
    )
}

/// Captures the node's traffic (every veth port of the bridge) to a pcap file.
struct Capture {
    child: std::process::Child,
    file: std::path::PathBuf,
}

impl Capture {
    fn start(node: &Node) -> Self {
        let file = node.scratch_dir().join("bridge.pcap");
        let child = node
            .command(
                "tcpdump",
                ["-i", "any", "--immediate-mode", "-Z", "root", "-U", "-s", "0", "-w", file.to_str().unwrap(), "tcp"],
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tcpdump (cargo xtask setup installs it)");
        assert!(wait_until(WAIT, || file.exists()), "tcpdump did not start");
        std::thread::sleep(Duration::from_millis(300));
        Self { child, file }
    }

    fn bytes(mut self) -> Vec<u8> {
        // Until the file stops growing: what tcpdump has not written yet is lost on SIGINT.
        let size = || std::fs::metadata(&self.file).map(|m| m.len()).unwrap_or(0);
        let mut last = size();
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let now = size();
            // 24 bytes is the pcap header alone.
            if (now == last && now > 24) || std::time::Instant::now() > deadline {
                break;
            }
            last = now;
        }
        // SIGINT: tcpdump flushes what it captured and exits.
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        std::fs::read(&self.file).expect("pcap file")
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn enrolled_pods_talk_mutual_tls_with_their_own_identities() {
    if !privileged_or_skip() {
        return;
    }
    let (s, client, server, agent) = Scenario::client_server("mtls_wire", Enrolled::Both, &[]);
    let app = LoggedServer::start(&s, &server, 8080, "secret body from the server");
    let capture = Capture::start(&s.node);

    let (code, body) = curl(&client, &format!("http://{}:8080/very-secret-path", server.ip4()));
    assert_eq!((code, body.as_str()), (0, "secret body from the server"));
    assert_eq!(app.wait_peers(1), vec!["127.0.0.6".to_string()]);
    let wire = capture.bytes();
    assert!(!contains(&wire, b"very-secret-path"), "the request crossed the wire in plaintext");
    assert!(!contains(&wire, b"secret body from the server"), "the response crossed the wire in plaintext");
    // A TLS 1.2-framed handshake record (0x16 0x03 0x01|0x03) went across.
    assert!(
        contains(&wire, &[0x16, 0x03, 0x01]) || contains(&wire, &[0x16, 0x03, 0x03]),
        "no TLS handshake seen in {} bytes: {:?}",
        wire.len(),
        &wire[..wire.len().min(400)]
    );

    assert!(wait_until(WAIT, || peer_ids(&agent, "client", "outbound")[id_of(&server)] == 1));
    assert_eq!(peer_ids(&agent, "server", "inbound")[id_of(&client)], 1);
    let status = agent.pod_status("server").unwrap();
    assert_eq!(status["spiffe_id"], id_of(&server).as_str());
    assert!(status["svid_expires"].as_u64().is_some());
    assert_eq!(status["mtls"]["mode"], "PERMISSIVE");
}

#[test]
fn strict_refuses_plaintext_and_permissive_serves_it_even_server_first() {
    if !privileged_or_skip() {
        return;
    }
    let s = Scenario::new("mtls_modes");
    let legacy = s.node.add_pod("legacy");
    let mut meshed = s.node.add_pod("meshed");
    let mut strict = s.node.add_pod("strict");
    let mut permissive = s.node.add_pod("permissive");
    for p in [&mut meshed, &mut strict, &mut permissive] {
        enroll(p);
    }
    strict.labels.insert("app".into(), "backend".into());
    permissive.labels.insert("app".into(), "reports".into());
    let pods = meshcap_tests::pods_yaml(&[&legacy, &meshed, &strict, &permissive]);
    s.write_raw(&format!("{pods}{}", peer_authentication("backend", "backend", "STRICT")));
    let agent = s.start_agent(&[]);
    for p in ["meshed", "strict", "permissive"] {
        agent.must_capture(p);
        agent.must_have_svid(p);
    }
    assert!(wait_until(WAIT, || agent.pod_status("strict").is_some_and(|p| p["mtls"]["mode"] == "STRICT")));

    let strict_app = LoggedServer::start(&s, &strict, 8080, "strict app");
    // Plaintext to STRICT: refused, and the app never sees the connection.
    let r = podctl_json(
        &legacy,
        &["connect", "--addr", &format!("{}:8080", strict.ip4()), "--send", "GET / HTTP/1.0\r\n\r\n"],
    );
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["reply"].is_null() || r["reply"] == "", "{r}");
    assert!(wait_until(WAIT, || agent.inbound("strict", "plaintext_refused") == 1));
    // mTLS to STRICT: served.
    assert_eq!(curl(&meshed, &format!("http://{}:8080/", strict.ip4())), (0, "strict app".into()));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(strict_app.peers().len(), 1, "only the mTLS connection reached the app");

    // PERMISSIVE with a server-first protocol: plaintext and mTLS clients both get the banner.
    let _banner = serve(&permissive, "banner-server", 2525, &["--banner", "220 reports ready"]);
    let addr = format!("{}:2525", permissive.ip4());
    for client in [&legacy, &meshed] {
        let r = json_of(&client.run(podctl(), ["banner-client", "--addr", &addr]));
        assert_eq!(r["ok"], true, "{}: {r}", client.name);
        assert_eq!(r["banner"], "220 reports ready", "{}", client.name);
        assert_eq!(r["reply"], "250 HELO meshcap", "{}", client.name);
    }
    assert!(
        wait_until(WAIT, || agent.inbound("permissive", "plaintext") == 1 && agent.inbound("permissive", "mtls") == 1)
    );
    assert_eq!(peer_ids(&agent, "permissive", "inbound")[id_of(&meshed)], 1);

    // Meshed client to a pod outside the mesh: plain passthrough.
    let _legacy_app = LoggedServer::start(&s, &legacy, 8080, "legacy app");
    assert_eq!(curl(&meshed, &format!("http://{}:8080/", legacy.ip4())), (0, "legacy app".into()));
    assert!(wait_until(WAIT, || agent.outbound("meshed", "plaintext") == 1));
}

#[test]
fn half_close_and_resets_cross_the_mtls_hop() {
    if !privileged_or_skip() {
        return;
    }
    let (_s, client, server, agent) = Scenario::client_server("mtls_half_close", Enrolled::Both, &[]);
    // The client writes, shuts down its write side and reads the reply to
    // EOF; the server reads to EOF, replies and closes.
    let sink = serve(&server, "sink", 9000, &[]);
    let r =
        json_of(&client.run(podctl(), ["source", "--addr", &format!("{}:9000", server.ip4()), "--bytes", "3000000"]));
    let report = meshcap_tests::parse_json_line(&sink.wait_output(WAIT).stdout).expect("sink report");
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(report["sha256"], r["sha256"]);
    assert!(r["reply"].as_str().unwrap().contains(report["sha256"].as_str().unwrap()), "{r}");
    assert!(wait_until(WAIT, || agent.outbound("client", "mtls") == 1));

    // The server resets mid-stream (SO_LINGER 0): the client's read fails with a reset.
    let _rst = serve(&server, "reset-server", 9100, &["--send", "partial"]);
    let r = podctl_json(&client, &["connect", "--addr", &format!("{}:9100", server.ip4()), "--no-read"]);
    assert_eq!(r["ok"], true, "{r}");
    // A long read timeout: a timeout would fail the errno check below for the wrong reason.
    let r = podctl_json(&client, &["connect", "--addr", &format!("{}:9100", server.ip4()), "--timeout-ms", "20000"]);
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["errno"], libc::ECONNRESET, "the reset crossed the mTLS hop as a reset: {r}");
}

#[test]
fn svid_rotation_under_steady_traffic_fails_nothing() {
    if !privileged_or_skip() {
        return;
    }
    // SVIDs live 10 s and are refreshed at half-life: within ~12 s of traffic
    // both pods rotate at least twice.
    let (s, client, server, agent) = Scenario::client_server("mtls_rotation", Enrolled::Both, &["--svid-ttl", "10s"]);
    let _app = LoggedServer::start(&s, &server, 8080, "steady");
    let expiry = |pod: &str| agent.pod_status(pod).and_then(|p| p["svid_expires"].as_u64());
    let first_expiry = expiry("server").expect("server SVID");
    // One long connection spanning the rotations: established connections keep going.
    let sink = serve(&server, "sink", 9000, &["--read-delay-ms", "60"]);
    let long = client.spawn(
        podctl(),
        ["source", "--addr", &format!("{}:9000", server.ip4()), "--bytes", "14000000", "--timeout-ms", "60000"],
    );
    let url = format!("http://{}:8080/", server.ip4());
    let started = std::time::Instant::now();
    let mut requests = 0;
    while started.elapsed() < Duration::from_secs(12) {
        assert_eq!(curl(&client, &url), (0, "steady".into()), "request {requests} failed during rotation");
        requests += 1;
        std::thread::sleep(Duration::from_millis(150));
    }
    let r = json_of(&long.wait_output(Duration::from_secs(60)));
    let report = meshcap_tests::parse_json_line(&sink.wait_output(WAIT).stdout).expect("sink report");
    assert_eq!(r["ok"], true, "the long connection broke: {r}");
    assert_eq!(report["sha256"], r["sha256"]);
    assert!(expiry("server").unwrap() > first_expiry, "the server's SVID was rotated");
    let seen = agent.pod_status("client").unwrap()["outbound"]["peer_svids"].clone();
    let server_svids =
        seen.as_array().unwrap().iter().filter(|v| v.as_str().unwrap().starts_with(&id_of(&server))).count();
    assert!(server_svids >= 2, "new handshakes present the new certificate: {seen}");
    assert!(agent.status().unwrap()["identity"]["refreshes"].as_u64().unwrap() >= 4);
}

#[test]
fn an_unknown_mode_fails_closed_for_its_pods_only() {
    if !privileged_or_skip() {
        return;
    }
    let s = Scenario::new("mtls_bad_mode");
    let legacy = s.node.add_pod("legacy");
    let mut typo = s.node.add_pod("typo");
    let mut fine = s.node.add_pod("fine");
    enroll(&mut typo);
    enroll(&mut fine);
    typo.labels.insert("app".into(), "typo".into());
    let pods = meshcap_tests::pods_yaml(&[&legacy, &typo, &fine]);
    s.write_raw(&format!("{pods}{}", peer_authentication("strict-typo", "typo", "STRCT")));
    let agent = s.start_agent(&[]);
    agent.must_capture("typo");
    agent.must_capture("fine");
    assert!(agent.wait_for_log("STRCT", WAIT), "{}", agent.logs());
    assert!(agent.logs().contains("default/strict-typo"), "the error names the policy");
    assert!(agent.logs().lines().any(|l| l.contains("STRCT") && l.contains("line ")), "and where it is");
    assert_eq!(agent.pod_status("typo").unwrap()["mtls"]["mode"], "STRICT", "treated as STRICT");
    let _a = LoggedServer::start(&s, &typo, 8080, "typo app");
    let _b = LoggedServer::start(&s, &fine, 8080, "fine app");
    let r = podctl_json(&legacy, &["connect", "--addr", &format!("{}:8080", typo.ip4())]);
    assert_eq!(r["ok"], false, "plaintext refused by the fail-closed pod: {r}");
    assert_eq!(curl(&legacy, &format!("http://{}:8080/", fine.ip4())), (0, "fine app".into()), "others keep working");
}

#[test]
fn no_plaintext_to_a_strict_pod_after_the_agent_restarts() {
    if !privileged_or_skip() {
        return;
    }
    // Fail closed across restarts: until the new agent has issued the pod's
    // SVID again, nothing is served in plaintext.
    let s = Scenario::new("mtls_restart");
    let legacy = s.node.add_pod("legacy");
    let mut strict = s.node.add_pod("strict");
    enroll(&mut strict);
    strict.labels.insert("app".into(), "backend".into());
    let pods = meshcap_tests::pods_yaml(&[&legacy, &strict]);
    s.write_raw(&format!("{pods}{}", peer_authentication("backend", "backend", "STRICT")));
    let mut agent = s.start_agent(&[]);
    agent.must_capture("strict");
    let app = LoggedServer::start(&s, &strict, 8080, "strict app");
    agent.kill9();
    agent.restart();
    agent.must_capture("strict");
    for _ in 0..3 {
        let r = podctl_json(&legacy, &["connect", "--addr", &format!("{}:8080", strict.ip4())]);
        assert_eq!(r["ok"], false, "{r}");
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(app.peers().is_empty());
}

#[test]
fn an_idle_half_closed_pair_is_reset_after_the_timeout() {
    if !privileged_or_skip() {
        return;
    }
    let (_s, client, server, agent) =
        Scenario::client_server("mtls_half_closed_idle", Enrolled::Both, &["--half-closed-timeout", "1s"]);
    // The client half-closes and waits for an answer that never comes.
    let _hold = serve(&server, "hold-server", 9200, &[]);
    let started = std::time::Instant::now();
    let r = podctl_json(
        &client,
        &["connect", "--addr", &format!("{}:9200", server.ip4()), "--send", "hello?", "--timeout-ms", "20000"],
    );
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["errno"], libc::ECONNRESET, "{r}");
    assert!(started.elapsed() < Duration::from_secs(8), "reset after {:?}", started.elapsed());
    assert!(wait_until(WAIT, || agent.outbound("client", "active") == 0 && agent.inbound("server", "active") == 0));
}
