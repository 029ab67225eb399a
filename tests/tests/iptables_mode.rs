//! `--capture-mode iptables`, the benchmark's sidecar-model baseline: Istio's
//! REDIRECT rules inside each enrolled pod's netns bring traffic to the same
//! engine, which finds the original destination with SO_ORIGINAL_DST. These
//! tests show it really captures (the engine carries the connection, over
//! mTLS between enrolled pods) and that the rules are the ones claimed.

use std::process::Command;

use meshcap_tests::{
    bin_path, privileged_or_skip,
    scenario::{attached, enroll, podctl_json, Enrolled, LoggedServer, Scenario, WAIT},
    wait_until, Pod,
};

const EXCLUDE_IN: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
const EXCLUDE_OUT: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";

/// The `-A` lines of a pod's nat table, as `iptables-save` (or `ip6tables-save`) prints them there.
fn nat_rules(pod: &Pod, save: &str) -> Vec<String> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", pod.netns_path().display()))
        .args([save, "-t", "nat"])
        .output()
        .unwrap_or_else(|e| panic!("running {save} (cargo xtask setup installs iptables): {e}"));
    assert!(out.status.success(), "{save}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with("-A ")).map(str::to_string).collect()
}

/// What istio-iptables installs for a sidecar, with the engine's mark (0x539 = 1337) where Istio matches
/// Envoy's uid, and the pod's exclusions.
fn expected(lo: &str, engine_source: &str, exclude_in: u16, exclude_out: u16) -> Vec<String> {
    [
        "-A PREROUTING -p tcp -j MESHCAP_INBOUND".to_string(),
        "-A OUTPUT -p tcp -j MESHCAP_OUTPUT".into(),
        format!("-A MESHCAP_INBOUND -p tcp -m tcp --dport {exclude_in} -j RETURN"),
        "-A MESHCAP_INBOUND -p tcp -j MESHCAP_IN_REDIRECT".into(),
        "-A MESHCAP_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006".into(),
        format!("-A MESHCAP_OUTPUT -p tcp -m tcp --dport {exclude_out} -j RETURN"),
        format!("-A MESHCAP_OUTPUT -s {engine_source} -o lo -j RETURN"),
        format!("-A MESHCAP_OUTPUT ! -d {lo} -o lo -p tcp -m mark --mark 0x539 -j MESHCAP_IN_REDIRECT"),
        "-A MESHCAP_OUTPUT -o lo -m mark ! --mark 0x539 -j RETURN".into(),
        "-A MESHCAP_OUTPUT -m mark --mark 0x539 -j RETURN".into(),
        format!("-A MESHCAP_OUTPUT -d {lo} -j RETURN"),
        "-A MESHCAP_OUTPUT -j MESHCAP_REDIRECT".into(),
        "-A MESHCAP_REDIRECT -p tcp -j REDIRECT --to-ports 15001".into(),
    ]
    .into()
}

#[test]
fn redirect_rules_bring_both_directions_to_the_engine_over_mtls() {
    if !privileged_or_skip() {
        return;
    }
    let s = Scenario::new("iptables_mode");
    let mut client = s.node.add_pod("client");
    let mut server = s.node.add_pod("server");
    enroll(&mut client);
    enroll(&mut server);
    for pod in [&mut client, &mut server] {
        pod.annotations.insert(EXCLUDE_IN.into(), "9090".into());
        pod.annotations.insert(EXCLUDE_OUT.into(), "9300".into());
    }
    s.write_pods(&[&client, &server], &[]);
    let agent = s.start_agent(&["--capture-mode", "iptables"]);
    for pod in ["client", "server"] {
        agent.must_capture(pod);
        agent.must_have_svid(pod);
    }

    for pod in [&client, &server] {
        assert_eq!(
            nat_rules(pod, "iptables-save"),
            expected("127.0.0.1/32", "127.0.0.6/32", 9090, 9300),
            "{}",
            pod.name
        );
        assert_eq!(nat_rules(pod, "ip6tables-save"), expected("::1/128", "::6/128", 9090, 9300), "{}", pod.name);
        assert!(attached(&pod.cgroup_dir()).is_empty(), "no eBPF hook on {}: iptables alone captures", pod.name);
    }

    let app = LoggedServer::start(&s, &server, 8080, "through the redirect");
    let cases = [(format!("{}:8080", server.ip4()), "127.0.0.6"), (format!("[{}]:8080", server.ip6()), "::6")];
    for (i, (addr, engine_source)) in cases.iter().enumerate() {
        let send = ["connect", "--addr", addr, "--send", "GET / HTTP/1.0\r\n\r\n", "--timeout-ms", "20000"];
        let r = podctl_json(&client, &send);
        assert_eq!(r["ok"], true, "{addr}: {r}");
        assert_eq!(r["peer"], addr.as_str(), "the client's getpeername() shows where it dialed");
        let reply = r["reply"].as_str().unwrap_or_default();
        assert!(reply.contains("through the redirect"), "{addr}: {reply}");
        assert!(
            reply.to_ascii_lowercase().contains(&format!("x-peer: {engine_source}")),
            "the app is reached from the engine: {reply}"
        );
        assert_eq!(app.wait_peers(i + 1)[i], *engine_source);
        let n = i as u64 + 1;
        assert!(wait_until(WAIT, || agent.outbound("client", "mtls") == n), "{:?}", agent.pod_status("client"));
        assert!(wait_until(WAIT, || agent.inbound("server", "mtls") == n), "{:?}", agent.pod_status("server"));
    }
    let server_status = agent.pod_status("server").expect("server in status");
    assert!(
        server_status["inbound"]["peer_ids"].to_string().contains("/ns/default/sa/client"),
        "the server side verified the client's SPIFFE ID: {server_status}"
    );
    assert_eq!(agent.counter("connect_redirected"), Some(0), "no eBPF hook took part");
    assert_eq!(agent.counter("inbound_steered"), Some(0), "no eBPF hook took part");

    // An excluded inbound port goes straight to the app: it sees the client's own address.
    let direct = LoggedServer::start(&s, &server, 9090, "excluded");
    let r = podctl_json(&client, &["http-get", "--url", &format!("http://{}:9090/", server.ip4())]);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["headers"]["x-peer"], client.ip4().to_string(), "excluded inbound port bypasses the engine");
    assert_eq!(direct.wait_peers(1), vec![client.ip4().to_string()]);
    assert_eq!(agent.inbound("server", "accepted"), 2, "the excluded port never reached the server's engine");

    // Unlabelled: the rules are gone and traffic is direct again.
    server.labels.clear();
    s.write_pods(&[&client, &server], &[]);
    agent.must_not_capture("server");
    assert!(nat_rules(&server, "iptables-save").is_empty(), "{:?}", nat_rules(&server, "iptables-save"));
    assert!(nat_rules(&server, "ip6tables-save").is_empty());
    let r = podctl_json(&client, &["http-get", "--url", &format!("http://{}:8080/", server.ip4())]);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(
        r["headers"]["x-peer"],
        client.ip4().to_string(),
        "the client's rules still capture, but an unmeshed server gets plaintext from the client's own address"
    );
}

#[test]
fn connections_no_rule_redirected_are_reset_and_bad_modes_are_refused() {
    if !privileged_or_skip() {
        return;
    }
    let (_s, client, _server, agent) =
        Scenario::client_server("iptables_direct", Enrolled::Client, &["--capture-mode", "iptables"]);
    // Dialing the engine's outbound port directly: no NAT record, so no destination; reset, counted.
    let r = podctl_json(&client, &["connect", "--addr", "127.0.0.1:15001", "--send", "x"]);
    assert_eq!(r["ok"], false, "{r}");
    assert!(wait_until(WAIT, || agent.outbound("client", "failed") == 1), "{:?}", agent.pod_status("client"));

    let bin = bin_path("meshcap-agent", "MESHCAP_AGENT_BIN");
    let out = Command::new(&bin).args(["run", "--pods", "/nonexistent", "--capture-mode", "sidecar"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("--capture-mode") && stderr.contains("iptables"), "{stderr}");
    let out = Command::new(&bin)
        .args(["run", "--pods", "/nonexistent", "--capture-mode", "iptables", "--sockmap"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("--sockmap") && stderr.contains("--capture-mode ebpf"),
        "{stderr}"
    );
}
