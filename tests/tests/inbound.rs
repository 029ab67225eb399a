//! Inbound capture with sk_lookup: connections to an enrolled pod's IP are
//! handed to the engine's in-pod listener and forwarded to the app from
//! 127.0.0.6 / ::6, with no rewritten packet; fail closed when the agent dies.

use std::time::{Duration, Instant};

use meshcap_tests::{
    podctl, privileged_or_skip,
    scenario::{curl, enroll, json_of, pinned_link_id, podctl_json, serve, Enrolled, LoggedServer, Scenario, WAIT},
    wait_until, Node, Pod,
};
use serde_json::Value;

const EXCLUDE_IN: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
const INCLUDE_IN: &str = "traffic.sidecar.istio.io/includeInboundPorts";

/// Runs podctl somewhere (a pod, the node) and returns its JSON answer.
type Client<'a> = &'a dyn Fn(&[&str]) -> Value;

fn http_get(from: Client<'_>, url: &str) -> Value {
    let r = from(&["http-get", "--url", url]);
    assert_eq!(r["ok"], true, "GET {url}: {r}");
    r
}

fn in_pod(pod: &Pod) -> impl Fn(&[&str]) -> Value + '_ {
    move |args| podctl_json(pod, args)
}

fn in_node(node: &Node) -> impl Fn(&[&str]) -> Value + '_ {
    move |args| json_of(&node.run(podctl(), args))
}

/// errno of a failed `podctl connect`, asserting it failed by a refusal or
/// a reset (a reset that lands before the client's send shows up on the send
/// as EPIPE or ENOTCONN).
fn refused_or_reset(r: &Value) -> i64 {
    assert_eq!(r["ok"], false, "expected the connection to fail: {r}");
    let errno = r["errno"].as_i64().unwrap_or(0) as i32;
    assert!([libc::ECONNREFUSED, libc::ECONNRESET, libc::EPIPE, libc::ENOTCONN].contains(&errno), "{r}");
    errno as i64
}

#[test]
fn inbound_reaches_the_app_from_127_0_0_6_for_pods_and_the_host() {
    if !privileged_or_skip() {
        return;
    }
    let (s, client, server, agent) = Scenario::client_server("inbound_basic", Enrolled::Server, &[]);
    let app = LoggedServer::start(&s, &server, 8080, "inbound ok");

    let from_pod = in_pod(&client);
    let from_host = in_node(&s.node);
    let cases: [(Client<'_>, String, &str); 4] = [
        (&from_pod, format!("http://{}:8080/", server.ip4()), "127.0.0.6"),
        (&from_host, format!("http://{}:8080/", server.ip4()), "127.0.0.6"),
        (&from_pod, format!("http://[{}]:8080/", server.ip6()), "::6"),
        (&from_host, format!("http://[{}]:8080/", server.ip6()), "::6"),
    ];
    for (i, (from, url, source)) in cases.iter().enumerate() {
        let r = http_get(*from, url);
        assert_eq!(r["body"], "inbound ok", "{url}");
        assert_eq!(r["headers"]["x-peer"], *source, "{url}: the app sees the engine's source");
        assert_eq!(app.wait_peers(i + 1)[i], *source);
        assert!(wait_until(WAIT, || agent.inbound("server", "relayed") == i as u64 + 1), "{url} not relayed");
    }
    assert_eq!(agent.counter("inbound_steered"), Some(4));
    assert_eq!(agent.outbound("server", "accepted"), 0);
}

#[test]
fn loopback_only_and_closed_ports_stay_unreachable_with_a_prompt_reset() {
    if !privileged_or_skip() {
        return;
    }
    let (_s, client, server, agent) = Scenario::client_server("inbound_unreachable", Enrolled::Server, &[]);
    // An app bound only to 127.0.0.1:9000: reachable inside the pod, not from outside.
    let local_only = serve(&server, "http-server", 9000, &["--bind", "127.0.0.1", "--body", "private"]);
    assert_eq!(curl(&server, "http://127.0.0.1:9000/"), (0, "private".into()));

    for port in [9000, 9999] {
        let start = Instant::now();
        let r = podctl_json(
            &client,
            &["connect", "--addr", &format!("{}:{port}", server.ip4()), "--send", "GET / HTTP/1.0\r\n\r\n"],
        );
        refused_or_reset(&r);
        // A reset, not the client's 3 s timeout; the margin is for starting podctl on a loaded machine.
        assert!(start.elapsed() < Duration::from_millis(2500), "port {port}: took {:?}", start.elapsed());
        assert!(r["reply"].is_null() || r["reply"] == "", "no byte of the app came back: {r}");
    }
    assert!(wait_until(WAIT, || agent.inbound("server", "failed") == 2));
    drop(local_only);
}

#[test]
fn inbound_port_annotations_follow_istio() {
    if !privileged_or_skip() {
        return;
    }
    let s = Scenario::new("inbound_ports");
    let client = s.node.add_pod("client");
    let mut excluding = s.node.add_pod("excluding");
    let mut including = s.node.add_pod("including");
    enroll(&mut excluding);
    enroll(&mut including);
    excluding.annotations.insert(EXCLUDE_IN.into(), "8081".into());
    including.annotations.insert(INCLUDE_IN.into(), "8080".into());
    s.write_pods(&[&client, &excluding, &including], &[]);
    let agent = s.start_agent(&[]);
    agent.must_capture("excluding");
    agent.must_capture("including");
    for pod in [&excluding, &including] {
        let a = LoggedServer::start(&s, pod, 8080, "a");
        let b = LoggedServer::start(&s, pod, 8081, "b");
        let expect_8081 = client.ip4().to_string();
        assert_eq!(
            http_get(&in_pod(&client), &format!("http://{}:8080/", pod.ip4()))["headers"]["x-peer"],
            "127.0.0.6"
        );
        let r = http_get(&in_pod(&client), &format!("http://{}:8081/", pod.ip4()));
        assert_eq!(r["headers"]["x-peer"], expect_8081.as_str(), "{}: 8081 goes straight to the app", pod.name);
        assert_eq!((a.wait_peers(1).len(), b.wait_peers(1).len()), (1, 1));
    }
}

#[test]
fn kill9_refuses_inbound_and_a_restart_adopts_the_same_link() {
    if !privileged_or_skip() {
        return;
    }
    let s = Scenario::new("inbound_kill9");
    let client = s.node.add_pod("client");
    let mut server = s.node.add_pod("server");
    enroll(&mut server);
    server.annotations.insert(EXCLUDE_IN.into(), "8081".into());
    s.write_pods(&[&client, &server], &[]);
    let mut agent = s.start_agent(&[]);
    agent.must_capture("server");
    let app = LoggedServer::start(&s, &server, 8080, "app");
    let excluded = LoggedServer::start(&s, &server, 8081, "excluded");
    let links = agent.pins().join("links");
    let link_id = || sk_lookup_link_id(&links, &server.uid);
    let before = link_id();

    agent.kill9();
    let addr = format!("{}:8080", server.ip4());
    assert_eq!(refused_or_reset(&podctl_json(&client, &["connect", "--addr", &addr])), libc::ECONNREFUSED as i64);
    let r = json_of(&s.node.run(podctl(), ["connect", "--addr", &addr]));
    assert_eq!(refused_or_reset(&r), libc::ECONNREFUSED as i64, "from the host too");
    assert_eq!(http_get(&in_pod(&client), &format!("http://{}:8081/", server.ip4()))["body"], "excluded");
    assert_eq!(excluded.wait_peers(1), vec![client.ip4().to_string()]);
    std::thread::sleep(Duration::from_millis(200));
    assert!(app.peers().is_empty(), "nothing reached the app while the agent was down");

    agent.restart();
    assert!(agent.wait_ready_or_answering(WAIT), "{}", agent.logs());
    agent.must_capture("server");
    assert_eq!(link_id(), before, "the pinned sk_lookup link is adopted, not re-attached");
    assert_eq!(sk_lookup_links_on(&server), 1);
    assert_eq!(http_get(&in_pod(&client), &format!("http://{addr}/"))["headers"]["x-peer"], "127.0.0.6");
    assert_eq!(app.wait_peers(1), vec!["127.0.0.6".to_string()]);
}

#[test]
fn a_pod_dialing_its_own_ip_reaches_its_app_once() {
    if !privileged_or_skip() {
        return;
    }
    let s = Scenario::new("inbound_self");
    let mut pod = s.node.add_pod("selfie");
    enroll(&mut pod);
    s.write_pods(&[&pod], &[]);
    let agent = s.start_agent(&[]);
    agent.must_capture("selfie");
    let app = LoggedServer::start(&s, &pod, 8080, "me");
    assert_eq!(curl(&pod, &format!("http://{}:8080/", pod.ip4())), (0, "me".into()));
    assert!(wait_until(WAIT, || agent.outbound("selfie", "relayed") == 1 && agent.inbound("selfie", "relayed") == 1));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(app.peers(), vec!["127.0.0.6".to_string()], "exactly one connection reached the app");
}

#[test]
fn a_thousand_concurrent_inbound_echoes_complete_and_fds_come_back() {
    if !privileged_or_skip() {
        return;
    }
    let (_s, client, server, agent) = Scenario::client_server("inbound_load", Enrolled::Server, &[]);
    let _echo = serve(&server, "echo-server", 7000, &[]);
    let fds = || std::fs::read_dir(format!("/proc/{}/fd", agent.pid())).map(|d| d.count()).unwrap_or(0);
    let baseline = fds();

    let out = client.run(
        podctl(),
        ["echo-load", "--addr", &format!("{}:7000", server.ip4()), "--conns", "1000", "--bytes", "65536"],
    );
    let r = json_of(&out);
    assert_eq!(r["ok"], true, "{r}");
    assert!(wait_until(WAIT, || agent.inbound("server", "relayed") == 1000), "{:?}", agent.pod_status("server"));
    assert!(wait_until(WAIT, || agent.inbound("server", "active") == 0));
    assert!(wait_until(WAIT, || fds() <= baseline + 2), "agent fds {} vs baseline {baseline}", fds());
}

/// Id of the pod's pinned sk_lookup link.
fn sk_lookup_link_id(links: &std::path::Path, uid: &str) -> u64 {
    let dir = std::fs::read_dir(links)
        .expect("links dir")
        .filter_map(Result::ok)
        .find(|e| e.file_name().to_string_lossy().starts_with(uid))
        .expect("pod link dir")
        .path();
    pinned_link_id(&dir.join("steer_inbound"))
}

/// sk_lookup links attached to the pod's netns.
fn sk_lookup_links_on(pod: &Pod) -> usize {
    use std::os::unix::fs::MetadataExt as _;
    let ino = std::fs::metadata(pod.netns_path()).expect("netns").ino();
    let out = std::process::Command::new("bpftool").args(["-j", "link", "show"]).output().expect("bpftool");
    let v: Value = serde_json::from_slice(&out.stdout).expect("bpftool json");
    v.as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["type"] == "netns" && l["netns_ino"].as_u64() == Some(ino) && l["attach_type"] == "sk_lookup")
        .count()
}

#[test]
fn unenrolling_passes_inbound_traffic_again_at_once_and_removes_pins() {
    if !privileged_or_skip() {
        return;
    }
    let (s, client, mut server, agent) = Scenario::client_server("inbound_unenroll", Enrolled::Server, &[]);
    let app = LoggedServer::start(&s, &server, 8080, "app");
    let url = format!("http://{}:8080/", server.ip4());
    assert_eq!(http_get(&in_pod(&client), &url)["headers"]["x-peer"], "127.0.0.6");

    server.labels.insert("sidecar.istio.io/inject".into(), "false".into());
    s.write_pods(&[&client, &server], &[]);
    agent.must_not_capture("server");
    assert_eq!(sk_lookup_links_on(&server), 0);
    assert_eq!(agent.map_entries("INBOUND_ADDRS"), 0);
    assert_eq!(agent.map_entries("INBOUND_LISTENERS"), 0);
    let pins: Vec<String> = std::fs::read_dir(agent.pins().join("links"))
        .expect("links dir")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    assert!(!pins.iter().any(|p| p.starts_with(&server.uid)), "{pins:?}");
    assert_eq!(http_get(&in_pod(&client), &url)["headers"]["x-peer"], client.ip4().to_string().as_str());
    assert_eq!(app.wait_peers(2)[1], client.ip4().to_string());
}

/// The engine closes its side towards the app first when the client does, so each relayed connection leaves a
/// TIME_WAIT socket on 127.0.0.6 in the pod. The forwarding socket's port must be chosen against the destination
/// (connect time), not against every socket on 127.0.0.6 (bind time): with the pod's ephemeral range cut to two
/// ports, connections to six app ports in a row all get through.
#[test]
fn time_wait_sockets_of_earlier_connections_do_not_exhaust_the_forwarding_ports() {
    if !privileged_or_skip() {
        return;
    }
    let (_s, client, server, agent) = Scenario::client_server("inbound_tw", Enrolled::Server, &[]);
    let range = server.run("sysctl", ["-w", "net.ipv4.ip_local_port_range=40000 40001"]);
    assert!(range.status.success(), "{}", String::from_utf8_lossy(&range.stderr));
    let ports: Vec<u16> = (8081..=8086).collect();
    let _servers: Vec<_> = ports.iter().map(|p| serve(&server, "echo-server", *p, &[])).collect();
    for (i, port) in ports.iter().enumerate() {
        let addr = format!("{}:{port}", server.ip4());
        let r = podctl_json(&client, &["connect", "--addr", &addr, "--send", "ping"]);
        assert_eq!((r["ok"].clone(), r["reply"].clone()), (Value::Bool(true), "ping".into()), "port {port}: {r}");
        assert!(wait_until(WAIT, || agent.inbound("server", "relayed") == i as u64 + 1), "{:?}", agent.status());
    }
    let waiting = server.run("ss", ["-Htan", "state", "time-wait", "src", "127.0.0.6"]);
    let lines = String::from_utf8_lossy(&waiting.stdout).lines().count();
    assert!(lines >= 2, "the engine's side of each hop lingers in TIME_WAIT, as the test means: {lines}");
}
