//! Pod identities from SPIRE's Delegated Identity API, served by an
//! in-process server speaking the real protocol over a Unix socket.

use std::{collections::HashMap, time::Duration};

use meshcap_tests::{
    privileged_or_skip,
    scenario::{curl, enroll, LoggedServer, Scenario, WAIT},
    spire::{FakeSpire, PodSvid, TestCa},
    wait_until, Agent, Pod,
};

const TTL: Duration = Duration::from_secs(3600);

fn id_of(pod: &Pod) -> String {
    format!("spiffe://democluster.internal/ns/{}/sa/{}", pod.namespace, pod.service_account)
}

struct Mesh {
    s: Scenario,
    client: Pod,
    server: Pod,
    socket: std::path::PathBuf,
}

fn mesh(test: &str) -> Mesh {
    let s = Scenario::new(test);
    let mut client = s.node.add_pod("client");
    let mut server = s.node.add_pod("server");
    enroll(&mut client);
    enroll(&mut server);
    s.write_pods(&[&client, &server], &[]);
    let socket = s.node.scratch_dir().join("admin.sock");
    Mesh { s, client, server, socket }
}

fn start_agent(m: &Mesh) -> Agent {
    let agent = m.s.start_agent(&["--spire-admin-socket", m.socket.to_str().unwrap()]);
    agent.must_capture("client");
    agent.must_capture("server");
    agent
}

fn has_svid(agent: &Agent, pod: &str) -> bool {
    agent.pod_status(pod).is_some_and(|p| p["svid_expires"].is_u64())
}

fn tls_failures(agent: &Agent, pod: &str) -> String {
    agent.pod_status(pod).map(|p| p["outbound"]["tls_failures"].to_string()).unwrap_or_default()
}

#[test]
fn each_pod_speaks_with_the_svid_spire_issued_it() {
    if !privileged_or_skip() {
        return;
    }
    let m = mesh("spire_basic");
    let ca = TestCa::new("democluster.internal");
    let spire = FakeSpire::start(&m.socket, &ca);
    spire.set(&m.client.uid, ca.issue(&id_of(&m.client), TTL));
    spire.set(&m.server.uid, ca.issue(&id_of(&m.server), TTL));
    let agent = start_agent(&m);
    assert!(wait_until(WAIT, || has_svid(&agent, "client") && has_svid(&agent, "server")), "{}", agent.logs());
    assert_eq!(agent.status().unwrap()["identity"]["source"], "SPIRE Delegated Identity API");
    assert!(wait_until(WAIT, || agent.status().is_ok_and(|s| s["ready"] == true)));
    let _app = LoggedServer::start(&m.s, &m.server, 8080, "via spire");
    assert_eq!(curl(&m.client, &format!("http://{}:8080/", m.server.ip4())), (0, "via spire".into()));
    assert!(wait_until(WAIT, || agent.pod_status("client").unwrap()["outbound"]["peer_ids"][id_of(&m.server)] == 1));
    assert_eq!(agent.pod_status("server").unwrap()["inbound"]["peer_ids"][id_of(&m.client)], 1);

    // Withdrawn (an empty update): the pod has no identity, its connections are refused.
    spire.set(&m.client.uid, PodSvid::NotIssued);
    assert!(wait_until(WAIT, || !has_svid(&agent, "client")));
    assert_ne!(curl(&m.client, &format!("http://{}:8080/", m.server.ip4())).0, 0);
    assert!(wait_until(WAIT, || agent.status().is_ok_and(|s| s["ready"] == false)));
}

#[test]
fn a_missing_spire_socket_refuses_until_it_appears_and_a_restart_is_survived() {
    if !privileged_or_skip() {
        return;
    }
    let m = mesh("spire_late");
    let ca = TestCa::new("democluster.internal");
    let agent = start_agent(&m);
    let _app = LoggedServer::start(&m.s, &m.server, 8080, "late");
    let url = format!("http://{}:8080/", m.server.ip4());
    // No SPIRE yet: captured, not ready, and connections between meshed pods refused.
    assert_eq!(agent.status().unwrap()["ready"], false);
    assert_ne!(curl(&m.client, &url).0, 0, "no plaintext while there is no SVID");
    std::thread::sleep(Duration::from_secs(10));
    assert_ne!(curl(&m.client, &url).0, 0);

    let mut spire = FakeSpire::start(&m.socket, &ca);
    spire.set(&m.client.uid, ca.issue(&id_of(&m.client), TTL));
    spire.set(&m.server.uid, ca.issue(&id_of(&m.server), TTL));
    assert!(
        wait_until(Duration::from_secs(45), || agent.status().is_ok_and(|s| s["ready"] == true)),
        "{}",
        agent.logs()
    );
    assert_eq!(curl(&m.client, &url), (0, "late".into()), "works with no restart of the agent");

    // SPIRE restarts (socket unlinked and recreated): SVIDs in use are kept,
    // and what it issues after the restart is picked up.
    spire.restart();
    assert_eq!(curl(&m.client, &url), (0, "late".into()));
    let before = agent.pod_status("server").unwrap()["svid_expires"].as_u64().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    spire.set(&m.server.uid, ca.issue(&id_of(&m.server), TTL * 2));
    let later = || agent.pod_status("server").unwrap()["svid_expires"].as_u64().unwrap_or(0) > before;
    assert!(wait_until(Duration::from_secs(45), later), "rotation after the restart: {}", agent.logs());
    assert_eq!(curl(&m.client, &url), (0, "late".into()));
}

#[test]
fn wrong_foreign_and_malformed_svids_are_refused_with_a_reason() {
    if !privileged_or_skip() {
        return;
    }
    let m = mesh("spire_bad");
    let ca = TestCa::new("democluster.internal");
    let foreign = TestCa::new("evil.example");
    let spire = FakeSpire::start(&m.socket, &ca);
    spire.set(&m.client.uid, ca.issue(&id_of(&m.client), TTL));
    // The server pod gets a valid SVID of another service account.
    let impostor = "spiffe://democluster.internal/ns/default/sa/impostor";
    spire.set(&m.server.uid, ca.issue(impostor, TTL));
    let agent = start_agent(&m);
    assert!(wait_until(WAIT, || has_svid(&agent, "client") && has_svid(&agent, "server")));
    let app = LoggedServer::start(&m.s, &m.server, 8080, "x");
    let url = format!("http://{}:8080/", m.server.ip4());
    assert_ne!(curl(&m.client, &url).0, 0);
    assert!(
        wait_until(WAIT, || tls_failures(&agent, "client").contains("wrong_identity")),
        "{}",
        tls_failures(&agent, "client")
    );
    let logged = || agent.logs().contains(impostor) && agent.logs().contains(&id_of(&m.server));
    assert!(wait_until(WAIT, logged), "reason in the log: {}", agent.logs());
    // The client refused inside the handshake, so the impostor's side never completed it and its app
    // got no connection.
    assert!(agent.wait_for_log("inbound mTLS handshake failed", WAIT), "{}", agent.logs());
    assert!(app.peers().is_empty(), "the impostor's app got a connection: {:?}", app.peers());

    // A certificate from a foreign trust domain that is not trusted here.
    let mut bundles = HashMap::new();
    bundles.insert(ca.trust_domain.clone(), ca.der.clone());
    spire.set_bundles(bundles);
    spire.set(&m.server.uid, foreign.issue("spiffe://evil.example/ns/default/sa/server", TTL));
    let foreign_id = "spiffe://evil.example/ns/default/sa/server";
    assert!(wait_until(WAIT, || agent.pod_status("server").is_some_and(|p| p["spiffe_id"] == foreign_id)));
    assert_ne!(curl(&m.client, &url).0, 0);
    assert!(
        wait_until(WAIT, || tls_failures(&agent, "client").contains("unknown_trust_domain")),
        "foreign domain refused: {}",
        tls_failures(&agent, "client")
    );
    assert!(agent.wait_for_log("no trust bundle for trust domain evil.example", WAIT), "reason in the log");
    assert!(app.peers().is_empty(), "no connection reached the app");

    // A malformed SVID for the server: reported, the current one kept, the
    // client (another pod) unaffected.
    spire.set(&m.server.uid, ca.issue(&id_of(&m.server), TTL));
    assert!(wait_until(WAIT, || { curl(&m.client, &url) == (0, "x".into()) }), "{}", agent.logs());
    spire.set(
        &m.server.uid,
        PodSvid::Issued {
            id: id_of(&m.server),
            chain: vec![b"not a certificate".to_vec()],
            key: vec![1, 2, 3],
            expires_at: 0,
        },
    );
    assert!(agent.wait_for_log("unusable SVID", WAIT), "{}", agent.logs());
    assert!(agent.logs().contains(&m.server.uid), "the error names the pod");
    assert_eq!(curl(&m.client, &url), (0, "x".into()), "the current SVID is kept");

    // A malformed bundle for our own trust domain: reported, the trust kept.
    spire.set_bundles(HashMap::from([(ca.trust_domain.clone(), b"garbage".to_vec())]));
    assert!(agent.wait_for_log("keeping the current bundles", WAIT), "{}", agent.logs());
    assert!(agent.logs().lines().any(|l| l.contains("keeping the current bundles") && l.contains("failed parsing")));
    assert_eq!(curl(&m.client, &url), (0, "x".into()), "mTLS keeps working on the previous bundle");
}

#[test]
fn the_agent_takes_its_own_identity_from_the_workload_api() {
    if !privileged_or_skip() {
        return;
    }
    let m = mesh("workload_api");
    let ca = TestCa::new("democluster.internal");
    let spire = FakeSpire::start(&m.socket, &ca);
    spire.set(&m.client.uid, ca.issue(&id_of(&m.client), TTL));
    spire.set(&m.server.uid, ca.issue(&id_of(&m.server), TTL));
    let workload_socket = m.s.node.scratch_dir().join("workload.sock");
    let agent_id = "spiffe://democluster.internal/ns/istio-system/sa/meshcap";
    let _workload = meshcap_tests::workload_api::FakeWorkloadApi::start(&workload_socket, &ca, agent_id);
    let agent = m.s.start_agent(&[
        "--spire-admin-socket",
        m.socket.to_str().unwrap(),
        "--spiffe-endpoint-socket",
        workload_socket.to_str().unwrap(),
    ]);
    let own = || agent.status().ok().map(|s| s["identity"]["agent"].clone()).unwrap_or_default();
    assert!(wait_until(WAIT, || own()["spiffe_id"] == agent_id), "{}\n{}", own(), agent.logs());
    assert!(own()["expires"].as_u64().is_some());
    assert!(wait_until(WAIT, || agent.status().is_ok_and(|s| s["ready"] == true)));
}

#[test]
fn metrics_move_with_traffic_and_readiness_waits_for_svids() {
    if !privileged_or_skip() {
        return;
    }
    let m = mesh("metrics");
    let ca = TestCa::new("democluster.internal");
    let agent = start_agent(&m);
    let ready = || meshcap_tests::harness::agent::http_get(agent.readiness_addr(), "/healthz/ready").map(|r| r.0).ok();
    // SPIRE not there yet: programs attached, but no SVIDs: not ready.
    assert_eq!(ready(), Some(503));
    let spire = FakeSpire::start(&m.socket, &ca);
    spire.set(&m.client.uid, ca.issue(&id_of(&m.client), TTL));
    spire.set(&m.server.uid, ca.issue(&id_of(&m.server), TTL));
    assert!(wait_until(Duration::from_secs(45), || ready() == Some(200)), "{}", agent.logs());

    let _app = LoggedServer::start(&m.s, &m.server, 8080, "metered");
    let scrape = || meshcap_tests::harness::agent::http_get(agent.metrics_addr(), "/metrics").expect("scrape").1;
    let before = scrape();
    for _ in 0..3 {
        assert_eq!(curl(&m.client, &format!("http://{}:8080/", m.server.ip4())), (0, "metered".into()));
    }
    let series = |text: &str, needle: &str| -> u64 {
        text.lines()
            .filter(|l| !l.starts_with('#') && l.contains(needle))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| v as u64)
            .sum()
    };
    let opened = |t: &str| {
        series(t, r#"meshcap_connections_opened_total{pod="default/client",direction="outbound",mode="mtls"}"#)
    };
    assert!(wait_until(WAIT, || opened(&scrape()) == opened(&before) + 3), "{}", scrape());
    let after = scrape();
    let peer = format!(r#"direction="inbound",peer_identity="{}""#, id_of(&m.client));
    assert_eq!(series(&after, &peer), 3, "{after}");
    assert!(series(&after, "meshcap_bytes_total{pod=\"default/client\"") > 0);
    assert!(series(&after, r#"meshcap_identity_refreshes_total{source="SPIRE Delegated Identity API"}"#) >= 2);
    assert_eq!(series(&after, r#"meshcap_map_entries{map="POD_CONFIG"}"#), 2);
    assert!(after.contains("meshcap_kernel_events_total{event=\"connect_redirected\"}"));
    assert!(after.contains("meshcap_ready 1"));
}

#[test]
fn servers_with_flawed_certificates_are_refused_with_the_rule_they_break() {
    if !privileged_or_skip() {
        return;
    }
    // The client trusts the mesh CA (through SPIRE); the "server" is a rogue
    // TLS endpoint listed as a meshed pod on another node, presenting in turn
    // an expired leaf, a CA-flagged leaf and a leaf with two URI SANs, all
    // signed by that same CA, so only the rule they break can refuse them.
    use meshcap_tests::spire::Flaw;
    let s = Scenario::new("spire_flawed");
    let mut client = s.node.add_pod("client");
    let mut rogue = s.node.add_pod("server");
    enroll(&mut client);
    enroll(&mut rogue);
    s.write_pods(&[&client], &[&rogue]);
    let socket = s.node.scratch_dir().join("admin.sock");
    let ca = TestCa::new("democluster.internal");
    let spire = FakeSpire::start(&socket, &ca);
    spire.set(&client.uid, ca.issue(&id_of(&client), TTL));
    let agent = s.start_agent(&["--spire-admin-socket", socket.to_str().unwrap()]);
    agent.must_capture("client");
    assert!(wait_until(WAIT, || has_svid(&agent, "client")));

    let server_id = id_of(&rogue);
    let cases = [
        (ca.issue_with(&[&server_id], TTL, Flaw::Expired), "certificate expired", "expired"),
        (ca.issue_with(&[&server_id], TTL, Flaw::CaFlag), "leaf is a CA", "leaf_is_ca"),
        (
            ca.issue_with(&[&server_id, "spiffe://democluster.internal/ns/x/sa/y"], TTL, Flaw::None),
            "2 URI SANs",
            "bad_uri_san",
        ),
    ];
    for (i, (svid, rule, kind)) in cases.into_iter().enumerate() {
        let PodSvid::Issued { chain, key, .. } = svid else { unreachable!() };
        let (cert_file, key_file) =
            (s.node.scratch_dir().join(format!("c{i}.der")), s.node.scratch_dir().join(format!("k{i}.der")));
        std::fs::write(&cert_file, &chain[0]).unwrap();
        std::fs::write(&key_file, &key).unwrap();
        let port = 9400 + i as u16;
        let _server = meshcap_tests::scenario::serve(
            &rogue,
            "tls-server",
            port,
            &["--cert", cert_file.to_str().unwrap(), "--key", key_file.to_str().unwrap()],
        );
        let r = meshcap_tests::scenario::podctl_json(
            &client,
            &["connect", "--addr", &format!("{}:{port}", rogue.ip4()), "--send", "x"],
        );
        assert_eq!(r["ok"], false, "case {i} ({rule}): {r}");
        assert!(!r["reply"].as_str().unwrap_or("").contains("rogue"), "case {i}: no byte of the rogue server arrived");
        assert!(
            wait_until(WAIT, || tls_failures(&agent, "client").contains(kind)),
            "case {i}: counted as {kind}: {}",
            tls_failures(&agent, "client")
        );
        // The counter can be read before the agent's log line has come through its pipe.
        let logged = || agent.logs().lines().any(|l| l.contains("mTLS to a meshed pod failed") && l.contains(rule));
        assert!(wait_until(WAIT, logged), "case {i}: in the log");
    }
}
