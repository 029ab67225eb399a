//! Outbound capture on a real kernel: simulated pods (a netns, a veth, a
//! cgroup and processes each), the real agent binary, and checks of where
//! each connection actually landed.

use meshcap_tests::{
    podctl, privileged_or_skip,
    scenario::{attached, curl, enroll, json_of, podctl_json, serve, Enrolled, LoggedServer, Scenario, WAIT},
    wait_until,
};

const EXCLUDE_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
const EXCLUDE_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";

#[test]
fn curl_reaches_the_server_through_the_agent_with_the_client_ip() {
    if !privileged_or_skip() {
        return;
    }
    let (s, client, server, agent) = Scenario::client_server("curl_through_agent", Enrolled::Client, &[]);
    let app = LoggedServer::start(&s, &server, 8080, "hello through meshcap");

    let (code, body) = curl(&client, &format!("http://{}:8080/", server.ip4()));
    assert_eq!((code, body.as_str()), (0, "hello through meshcap"));
    assert_eq!(app.wait_peers(1), vec![client.ip4().to_string()], "the server sees the client pod's own IP");
    assert!(wait_until(WAIT, || agent.outbound("client", "relayed") == 1), "{:?}", agent.pod_status("client"));
    assert_eq!(agent.counter("connect_redirected"), Some(1));
    assert_eq!(agent.counter("flow_handed_over"), Some(1));

    // The same over IPv6.
    let (code, body) = curl(&client, &format!("http://[{}]:8080/", server.ip6()));
    assert_eq!((code, body.as_str()), (0, "hello through meshcap"));
    assert_eq!(app.wait_peers(2)[1], client.ip6().to_string());
    assert!(wait_until(WAIT, || agent.outbound("client", "relayed") == 2));
}

#[test]
fn getpeername_returns_the_dialed_address_for_each_family() {
    if !privileged_or_skip() {
        return;
    }
    let (s, client, server, agent) = Scenario::client_server("getpeername", Enrolled::Client, &[]);
    let _app = LoggedServer::start(&s, &server, 8080, "x");

    let cases = [
        (format!("{}:8080", server.ip4()), "v4", format!("{}:8080", server.ip4())),
        (format!("[{}]:8080", server.ip6()), "v6", format!("[{}]:8080", server.ip6())),
        (format!("{}:8080", server.ip4()), "v6", format!("[::ffff:{}]:8080", server.ip4())),
    ];
    for (i, (addr, family, expected_peer)) in cases.iter().enumerate() {
        let r =
            podctl_json(&client, &["connect", "--addr", addr, "--family", family, "--send", "GET / HTTP/1.0\r\n\r\n"]);
        assert_eq!(r["ok"], true, "{addr} ({family}): {r}");
        assert_eq!(r["peer"], expected_peer.as_str(), "getpeername() after a captured connect to {addr} ({family})");
        assert!(r["reply"].as_str().unwrap_or("").contains("200 OK"), "{r}");
        assert!(
            wait_until(WAIT, || agent.outbound("client", "relayed") == i as u64 + 1),
            "connection {i} was not relayed"
        );
    }
    assert_eq!(agent.counter("getpeername_rewritten").map(|n| n >= 3), Some(true));
}

#[test]
fn pods_without_both_labels_are_not_captured() {
    if !privileged_or_skip() {
        return;
    }
    let s = Scenario::new("unlabelled");
    let plain = s.node.add_pod("plain");
    let mut inject_only = s.node.add_pod("inject-only");
    inject_only.labels.insert("sidecar.istio.io/inject".into(), "true".into());
    let server = s.node.add_pod("server");
    s.write_pods(&[&plain, &inject_only, &server], &[]);
    let agent = s.start_agent(&[]);
    agent.must_not_capture("plain");
    agent.must_not_capture("inject-only");
    assert!(
        agent.wait_for_log("spire-managed-identity", WAIT) && agent.logs().contains("default/inject-only"),
        "no warning naming the pod and the missing label:\n{}",
        agent.logs()
    );
    assert_eq!(agent.pod_status("inject-only").unwrap()["enrollment"], "missing_identity_label");
    assert!(attached(&plain.cgroup_dir()).is_empty());
    assert!(attached(&inject_only.cgroup_dir()).is_empty());

    let app = LoggedServer::start(&s, &server, 8080, "direct");
    for pod in [&plain, &inject_only] {
        assert_eq!(curl(pod, &format!("http://{}:8080/", server.ip4())), (0, "direct".into()));
    }
    assert_eq!(app.wait_peers(2), vec![plain.ip4().to_string(), inject_only.ip4().to_string()]);
    assert_eq!(agent.counter("connect_redirected"), Some(0), "the agent never saw these connects");
}

#[test]
fn exclusions_go_direct_and_bad_values_warn_without_losing_the_rest() {
    if !privileged_or_skip() {
        return;
    }
    let s = Scenario::new("exclusions");
    let mut client = s.node.add_pod("client");
    let mut sloppy = s.node.add_pod("sloppy");
    let mut half_bad = s.node.add_pod("half-bad");
    let server = s.node.add_pod("server");
    let other = s.node.add_pod("other");
    enroll(&mut client);
    enroll(&mut sloppy);
    enroll(&mut half_bad);
    client.annotations.insert(EXCLUDE_PORTS.into(), "9300".into());
    client.annotations.insert(EXCLUDE_RANGES.into(), format!("{}/32", other.ip4()));
    // A bad port list and a bad range list: each ignored whole, with a warning,
    // while the pod stays enrolled.
    sloppy.annotations.insert(EXCLUDE_PORTS.into(), "93x0".into());
    sloppy.annotations.insert(EXCLUDE_RANGES.into(), "10.0.0.0/33".into());
    // One bad annotation among good ones: the good ones still apply.
    half_bad.annotations.insert(EXCLUDE_PORTS.into(), "9300".into());
    half_bad.annotations.insert(EXCLUDE_RANGES.into(), "10.0.0.0/33".into());
    s.write_pods(&[&client, &sloppy, &half_bad, &server, &other], &[]);
    let agent = s.start_agent(&[]);
    agent.must_capture("client");
    agent.must_capture("sloppy");
    agent.must_capture("half-bad");
    let web = LoggedServer::start(&s, &server, 8080, "web");
    let search = LoggedServer::start(&s, &server, 9300, "search");
    let other_web = LoggedServer::start(&s, &other, 8080, "other");
    let relayed = || agent.outbound("client", "relayed");

    assert_eq!(curl(&client, &format!("http://{}:9300/", server.ip4())), (0, "search".into()));
    assert_eq!(search.wait_peers(1), vec![client.ip4().to_string()]);
    assert_eq!(curl(&client, &format!("http://{}:8080/", other.ip4())), (0, "other".into()));
    assert_eq!(other_web.wait_peers(1), vec![client.ip4().to_string()]);
    assert_eq!(relayed(), 0, "excluded port and range went direct");
    assert_eq!(agent.counter("connect_passthrough"), Some(2));

    assert_eq!(curl(&client, &format!("http://{}:8080/", server.ip4())), (0, "web".into()));
    assert!(wait_until(WAIT, || relayed() == 1), "outside the exclusions is captured");
    assert_eq!(web.wait_peers(1), vec![client.ip4().to_string()]);

    let logs = agent.logs();
    for needle in ["default/sloppy", EXCLUDE_PORTS, "93x0", EXCLUDE_RANGES, "10.0.0.0/33"] {
        assert!(logs.contains(needle), "warning lacks {needle:?}:\n{logs}");
    }
    let warnings = agent.pod_status("sloppy").unwrap()["warnings"].as_array().cloned().unwrap_or_default();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    // The sloppy pod's settings fall back to capturing everything: 9300 is captured for it.
    assert_eq!(curl(&sloppy, &format!("http://{}:9300/", server.ip4())), (0, "search".into()));
    assert!(wait_until(WAIT, || agent.outbound("sloppy", "relayed") == 1));
    // half-bad: its range list was ignored, its port exclusion applies.
    assert_eq!(curl(&half_bad, &format!("http://{}:9300/", server.ip4())), (0, "search".into()));
    assert_eq!(search.wait_peers(3)[2], half_bad.ip4().to_string());
    assert_eq!(agent.outbound("half-bad", "relayed"), 0, "9300 excluded for half-bad");
    assert!(agent.pod_status("half-bad").unwrap()["warnings"][0]["value"] == "10.0.0.0/33");
    assert_eq!(agent.map_entries("PORT_RULES"), 2);
    assert_eq!(agent.map_entries("OUT_EXCLUDE_NETS"), 1);
}

#[test]
fn the_engine_own_connects_are_never_captured() {
    if !privileged_or_skip() {
        return;
    }
    // Both ends enrolled: the engine's upstream connect leaves from inside the
    // client pod's netns, yet must not be captured again (its socket is in the
    // agent's cgroup).
    let (s, client, server, agent) = Scenario::client_server("no_loop", Enrolled::Both, &[]);
    let app = LoggedServer::start(&s, &server, 8080, "once");
    for n in 1..=5u64 {
        assert_eq!(curl(&client, &format!("http://{}:8080/", server.ip4())), (0, "once".into()));
        assert!(wait_until(WAIT, || agent.outbound("client", "relayed") == n));
    }
    assert_eq!(app.wait_peers(5).len(), 5, "exactly one upstream connection per client connection");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(app.peers().len(), 5);
    assert_eq!(agent.counter("connect_redirected"), Some(5));
    assert_eq!(agent.outbound("server", "accepted"), 0, "nothing was redirected inside the server pod");
}

#[test]
fn blocking_readers_get_their_reply_and_eof_by_default() {
    if !privileged_or_skip() {
        return;
    }
    // A client with a plain blocking socket half-closes, then blocks in read()
    // while the slow server works: it must get the reply, then EOF. (With a
    // sockmap'd socket the kernel can end such a read with EAGAIN, which is
    // why sk_msg splicing is opt-in.)
    let (_s, client, server, agent) = Scenario::client_server("blocking_readers", Enrolled::Client, &[]);
    for round in 1..=5u64 {
        let sink = serve(&server, "sink", 9000, &["--read-delay-ms", "20"]);
        let addr = format!("{}:9000", server.ip4());
        let r = json_of(&client.run(podctl(), ["source", "--addr", &addr, "--bytes", "2000000"]));
        let report = meshcap_tests::parse_json_line(&sink.wait_output(WAIT).stdout).expect("sink report");
        assert_eq!(r["ok"], true, "round {round}: a blocking read failed: {r}");
        assert!(r["reply"].as_str().unwrap_or("").contains(report["sha256"].as_str().unwrap()), "round {round}: {r}");
        assert!(wait_until(WAIT, || agent.outbound("client", "relayed") == round));
    }
    assert_eq!(agent.counter("msg_redirected"), Some(0), "no splicing unless asked for");
}
