//! Capture across agent restarts, map limits and live pods-file edits.

use std::time::Duration;

use meshcap_tests::{
    privileged_or_skip,
    scenario::{
        attached, curl, enroll, json_of, pinned_link_id, podctl_json, serve, Enrolled, LoggedServer, Scenario, WAIT,
    },
    wait_until,
};

/// The five hooks every enrolled pod's cgroup carries, as bpftool names them.
const POD_HOOKS: [&str; 5] = [
    "cgroup_inet4_connect",
    "cgroup_inet4_getpeername",
    "cgroup_inet6_connect",
    "cgroup_inet6_getpeername",
    "cgroup_sock_ops",
];

#[test]
fn kill9_fails_closed_and_a_restart_adopts_the_pinned_links() {
    if !privileged_or_skip() {
        return;
    }
    let (s, client, server, mut agent) = Scenario::client_server("kill9_restart", Enrolled::Client, &[]);
    let app = LoggedServer::start(&s, &server, 8080, "up");
    let url = format!("http://{}:8080/", server.ip4());
    assert_eq!(curl(&client, &url), (0, "up".into()));
    assert_eq!(app.wait_peers(1).len(), 1);
    assert_eq!(attached(&client.cgroup_dir()), POD_HOOKS);
    let links_before = pinned_link_ids(&agent.pins().join("links"));
    assert_eq!(links_before.len(), 7, "6 pod links and the agent's own sock_ops: {links_before:?}");

    agent.kill9();
    // Capture stays: the connect is still steered to the in-pod listener, which
    // died with the agent, so it is refused, and nothing reaches the server.
    assert_eq!(attached(&client.cgroup_dir()), POD_HOOKS, "links survive the agent");
    let r = podctl_json(&client, &["connect", "--addr", &format!("{}:8080", server.ip4()), "--timeout-ms", "2000"]);
    assert_eq!(r["ok"], false, "a connect while the agent is down must fail: {r}");
    assert_eq!(r["errno"], libc::ECONNREFUSED, "{r}");
    let (code, _) = curl(&client, &url);
    assert_ne!(code, 0, "curl must fail while the agent is down");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(app.peers().len(), 1, "nothing reached the destination directly");

    agent.restart();
    assert!(agent.wait_ready_or_answering(WAIT), "{}", agent.logs());
    agent.must_capture("client");
    assert_eq!(attached(&client.cgroup_dir()), POD_HOOKS, "adopted: still exactly one link per hook");
    assert_eq!(pinned_link_ids(&agent.pins().join("links")), links_before, "the same links, not new ones");
    assert_eq!(attached(&agent.cgroup_dir()), ["cgroup_sock_ops"], "one sock_ops on the agent cgroup");
    assert_eq!(curl(&client, &url), (0, "up".into()));
    assert_eq!(app.wait_peers(2), vec![client.ip4().to_string(), client.ip4().to_string()]);
    assert!(wait_until(WAIT, || agent.outbound("client", "relayed") == 1));
}

#[test]
fn pods_removed_while_the_agent_was_down_are_cleaned_up_on_start() {
    if !privileged_or_skip() {
        return;
    }
    let s = Scenario::new("gc_on_start");
    let mut stays = s.node.add_pod("stays");
    let mut goes = s.node.add_pod("goes");
    enroll(&mut stays);
    enroll(&mut goes);
    goes.annotations.insert("traffic.sidecar.istio.io/excludeOutboundPorts".into(), "9300".into());
    s.write_pods(&[&stays, &goes], &[]);
    let mut agent = s.start_agent(&[]);
    agent.must_capture("stays");
    agent.must_capture("goes");
    assert_eq!(agent.map_entries("POD_CONFIG"), 2);
    agent.kill9();

    s.write_pods(&[&stays], &[]);
    agent.restart();
    assert!(agent.wait_ready_or_answering(WAIT));
    agent.must_capture("stays");
    assert!(wait_until(WAIT, || agent.map_entries("POD_CONFIG") == 1), "stale pod config left");
    assert_eq!(agent.map_entries("PORT_RULES"), 0, "stale port rules left");
    assert!(attached(&goes.cgroup_dir()).is_empty(), "links of the removed pod detached");
    assert_eq!(attached(&stays.cgroup_dir()), POD_HOOKS);
    let pins: Vec<String> = std::fs::read_dir(agent.pins().join("links"))
        .expect("links dir")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    assert!(!pins.iter().any(|p| p.starts_with(&goes.uid)), "{pins:?}");
}

#[test]
fn a_full_map_fails_the_extra_pods_clearly_and_keeps_the_others() {
    if !privileged_or_skip() {
        return;
    }
    let s = Scenario::new("tiny_maps");
    let mut pods = Vec::new();
    for name in ["first", "second", "third"] {
        let mut p = s.node.add_pod(name);
        enroll(&mut p);
        pods.push(p);
    }
    let server = s.node.add_pod("server");
    // Enroll two, then add the third so which one fails is deterministic.
    s.write_pods(&[&pods[0], &pods[1], &server], &[]);
    let agent = s.start_agent(&["--max-pods", "2"]);
    agent.must_capture("first");
    agent.must_capture("second");
    s.write_pods(&[&pods[0], &pods[1], &pods[2], &server], &[]);
    let failed = wait_until(WAIT, || agent.pod_status("third").is_some_and(|p| p["error"].is_string()));
    assert!(failed, "{:?}", agent.pod_status("third"));
    let error = agent.pod_status("third").unwrap()["error"].as_str().unwrap().to_string();
    assert!(
        error.contains("default/third") && error.contains("is full") && error.contains("--max-pods"),
        "unclear error: {error}"
    );
    assert!(attached(&pods[2].cgroup_dir()).is_empty(), "nothing half-attached to the failed pod");
    let status = agent.status().unwrap();
    assert_eq!(status["ready"], false, "not ready while a pod that should be captured is not");

    let app = LoggedServer::start(&s, &server, 8080, "still fine");
    for (i, p) in pods[..2].iter().enumerate() {
        assert_eq!(curl(p, &format!("http://{}:8080/", server.ip4())), (0, "still fine".into()));
        assert!(wait_until(WAIT, || agent.outbound(&p.name, "relayed") == 1), "{} not relayed", p.name);
        assert_eq!(app.wait_peers(i + 1)[i], p.ip4().to_string());
    }
}

#[test]
fn editing_the_pods_file_enrolls_and_unenrolls_live_without_stale_entries() {
    if !privileged_or_skip() {
        return;
    }
    let s = Scenario::new("live_edits");
    let mut client = s.node.add_pod("client");
    let server = s.node.add_pod("server");
    enroll(&mut client);
    client.annotations.insert("traffic.sidecar.istio.io/excludeOutboundPorts".into(), "9300".into());
    s.write_pods(&[&client, &server], &[]);
    let agent = s.start_agent(&[]);
    agent.must_capture("client");
    let app = LoggedServer::start(&s, &server, 8080, "ok");
    let url = format!("http://{}:8080/", server.ip4());
    let relayed = || agent.outbound("client", "relayed");

    assert_eq!(curl(&client, &url), (0, "ok".into()));
    assert!(wait_until(WAIT, || relayed() == 1));

    // inject: false → direct, capture gone from the cgroup and the maps.
    client.labels.insert("sidecar.istio.io/inject".into(), "false".into());
    s.write_pods(&[&client, &server], &[]);
    agent.must_not_capture("client");
    assert!(attached(&client.cgroup_dir()).is_empty());
    assert_eq!(agent.map_entries("POD_CONFIG"), 0);
    assert_eq!(agent.map_entries("PORT_RULES"), 0);
    let before = agent.counter("connect_redirected");
    assert_eq!(curl(&client, &url), (0, "ok".into()));
    assert_eq!(agent.counter("connect_redirected"), before, "went direct");

    // Back to true → captured again, one set of entries.
    client.labels.insert("sidecar.istio.io/inject".into(), "true".into());
    s.write_pods(&[&client, &server], &[]);
    agent.must_capture("client");
    assert_eq!(attached(&client.cgroup_dir()), POD_HOOKS);
    assert_eq!(agent.map_entries("POD_CONFIG"), 1);
    assert_eq!(agent.map_entries("PORT_RULES"), 1);
    assert_eq!(curl(&client, &url), (0, "ok".into()));
    assert!(wait_until(WAIT, || relayed() == 1), "a fresh engine for the re-enrolled pod relayed it");

    // A bad edit changes nothing and says where it is.
    s.write_raw("apiVersion: v1\nkind: Pod\nmetadata:\n  name: [broken\n");
    assert!(agent.wait_for_log("pods.yaml:", WAIT), "{}", agent.logs());
    assert!(wait_until(WAIT, || agent.status().is_ok_and(|s| s["pods_file_error"].is_string())));
    agent.must_capture("client");
    assert_eq!(curl(&client, &url), (0, "ok".into()));
    assert!(wait_until(WAIT, || relayed() == 2));

    // The pod goes away and a new pod takes its IP: the new one is captured on
    // its own, nothing of the old one is left.
    let client_host = u32::from(client.ip4().octets()[3]);
    let old_uid = client.uid.clone();
    s.write_pods(&[&server], &[]);
    assert!(wait_until(WAIT, || agent.pod_status("client").is_none()));
    drop(client);
    let mut reborn = s.node.add_pod_at("reborn", client_host);
    enroll(&mut reborn);
    s.write_pods(&[&reborn, &server], &[]);
    agent.must_capture("reborn");
    assert_eq!(agent.map_entries("POD_CONFIG"), 1);
    assert_eq!(agent.map_entries("PORT_RULES"), 0, "the old pod's exclusion is gone");
    let pins: Vec<String> = std::fs::read_dir(agent.pins().join("links"))
        .expect("links dir")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    assert!(!pins.iter().any(|p| p.starts_with(&old_uid)), "{pins:?}");
    // 9300 is captured now: nothing listens there, so the engine's upstream
    // connect fails and the app's connection is reset; a stale exclusion
    // would have sent it direct and left the engine's counters alone.
    assert_ne!(curl(&reborn, &format!("http://{}:9300/", server.ip4())).0, 0);
    assert!(wait_until(WAIT, || agent.outbound("reborn", "failed") == 1), "{:?}", agent.pod_status("reborn"));
    assert_eq!(curl(&reborn, &url), (0, "ok".into()));
    assert!(wait_until(WAIT, || agent.outbound("reborn", "relayed") == 1));
    assert_eq!(app.peers().last().cloned(), Some(reborn.ip4().to_string()));
}

#[test]
fn status_lists_pods_and_says_so_when_no_agent_answers() {
    if !privileged_or_skip() {
        return;
    }
    let s = Scenario::new("status_cli");
    let mut client = s.node.add_pod("client");
    let mut half = s.node.add_pod("half");
    enroll(&mut client);
    half.labels.insert("sidecar.istio.io/inject".into(), "true".into());
    half.annotations.insert("traffic.sidecar.istio.io/excludeOutboundPorts".into(), "93x0".into());
    s.write_pods(&[&client, &half], &[]);
    let agent = s.start_agent(&[]);
    agent.must_capture("client");
    agent.must_have_svid("client");
    let bin = meshcap_tests::bin_path("meshcap-agent", "MESHCAP_AGENT_BIN");
    let admin = agent.admin_addr().to_string();

    let out = std::process::Command::new(&bin).args(["status", "--admin-addr", &admin]).output().expect("status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let client_line = text.lines().find(|l| l.starts_with("default/client")).unwrap_or_else(|| panic!("{text}"));
    assert!(
        client_line.contains("yes") && client_line.contains(&client.ip4().to_string()) && client_line.contains("6/6")
    );
    let half_line = text.lines().find(|l| l.starts_with("default/half")).unwrap_or_else(|| panic!("{text}"));
    assert!(half_line.contains("missing identity label"), "{half_line}");
    assert!(text.contains("93x0"), "annotation warnings are shown: {text}");
    let identity =
        format!("identity: spiffe://democluster.internal/ns/default/sa/{}, SVID expires", client.service_account);
    assert!(text.contains(&identity), "identity and SVID expiry are shown: {text}");
    assert!(text.contains("inbound mTLS PERMISSIVE"), "the mTLS mode is shown: {text}");
    assert!(text.lines().any(|l| l.starts_with("POD_CONFIG") && l.contains(" 1 ")), "{text}");

    let json = std::process::Command::new(&bin).args(["status", "--json", "--admin-addr", &admin]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("--json prints JSON");
    assert_eq!(v["pods"].as_array().map(Vec::len), Some(2));

    drop(agent);
    let out = std::process::Command::new(&bin).args(["status", "--admin-addr", &admin]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains("no meshcap agent answering") && err.contains(&admin), "{err}");
}

/// (pin path, link id) of every pinned link, sorted.
fn pinned_link_ids(links: &std::path::Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for dir in std::fs::read_dir(links).expect("links dir").filter_map(Result::ok) {
        for pin in std::fs::read_dir(dir.path()).expect("link dir").filter_map(Result::ok) {
            let name = format!("{}/{}", dir.file_name().to_string_lossy(), pin.file_name().to_string_lossy());
            out.push((name, pinned_link_id(&pin.path())));
        }
    }
    out.sort();
    out
}

#[test]
fn a_pod_that_failed_to_re_enroll_is_still_released_when_unlabelled() {
    if !privileged_or_skip() {
        return;
    }
    let s = Scenario::new("failed_release");
    let mut client = s.node.add_pod("client");
    enroll(&mut client);
    s.write_pods(&[&client], &[]);
    let mut agent = s.start_agent(&[]);
    agent.must_capture("client");
    agent.kill9();
    // The agent comes back to a pod it cannot enter: the pod fails, and its
    // pinned capture stays (fail closed).
    client.annotations.insert("meshcap.io/netns".into(), "/run/netns/does-not-exist".into());
    s.write_pods(&[&client], &[]);
    agent.restart();
    assert!(agent.wait_ready_or_answering(WAIT));
    assert!(wait_until(WAIT, || agent.pod_status("client").is_some_and(|p| p["error"].is_string())));
    let error = agent.pod_status("client").unwrap()["error"].as_str().unwrap().to_string();
    assert!(error.contains("/run/netns/does-not-exist"), "{error}");
    assert_eq!(attached(&client.cgroup_dir()), POD_HOOKS, "capture kept while the pod is failed");
    assert_eq!(agent.status().unwrap()["ready"], false);

    client.labels.insert("sidecar.istio.io/inject".into(), "false".into());
    s.write_pods(&[&client], &[]);
    assert!(wait_until(WAIT, || attached(&client.cgroup_dir()).is_empty()), "unlabelled: capture removed");
    assert!(wait_until(WAIT, || agent.map_entries("POD_CONFIG") == 0));
    assert!(wait_until(WAIT, || agent.status().is_ok_and(|s| s["ready"] == true)));
}

#[test]
fn shutdown_drains_then_resets_what_is_left() {
    if !privileged_or_skip() {
        return;
    }
    let (_s, client, server, mut agent) =
        Scenario::client_server("drain", Enrolled::Client, &["--drain-timeout", "500ms"]);
    // A transfer far longer than the drain deadline (a slow reader).
    let sink = serve(&server, "sink", 9000, &["--read-delay-ms", "50"]);
    let source = client.spawn(
        meshcap_tests::podctl(),
        ["source", "--addr", &format!("{}:9000", server.ip4()), "--bytes", "200000000", "--timeout-ms", "30000"],
    );
    assert!(wait_until(WAIT, || agent.outbound("client", "active") == 1));
    // The transfer needs minutes; the agent must exit by itself once the 500 ms drain is over, well
    // before the harness' SIGKILL at 5 s.
    let status = agent.stop();
    assert!(status.is_some_and(|s| s.code().is_some()), "the agent did not exit by itself: {status:?}");
    let r = json_of(&source.wait_output(WAIT));
    assert_eq!(r["ok"], false, "the cut-off transfer must not look complete: {r}");
    let errno = r["errno"].as_i64().unwrap_or(0);
    assert!(errno == libc::ECONNRESET as i64 || errno == libc::EPIPE as i64, "{r}");
    let report = meshcap_tests::parse_json_line(&sink.wait_output(WAIT).stdout).expect("sink report");
    assert!(
        report["error"].as_str().is_some_and(|e| e.contains("ConnectionReset")),
        "server side sees a reset: {report}"
    );
}

#[test]
fn bad_pods_files_are_one_clear_error_each_and_change_nothing() {
    if !privileged_or_skip() {
        return;
    }
    let (s, client, server, agent) = Scenario::client_server("bad_files", Enrolled::Client, &[]);
    let app = LoggedServer::start(&s, &server, 8080, "still served");
    let good = meshcap_tests::pods_yaml(&[&client, &server]);
    let file = s.pods_file.display().to_string();
    let cases = [
        // (contents, what the one error must say)
        (format!("{good}---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: [oops\n"), format!("{file}:")),
        (format!("{good}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: twin, uid: {}}}\n", client.uid), client.uid.clone()),
        (
            format!(
                "{good}---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: half\n  uid: u-half\n  annotations: {{meshcap.io/netns: /run/netns/x}}\n"
            ),
            "meshcap.io/cgroup".to_string(),
        ),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        s.write_raw(text);
        let error = || agent.status().ok().and_then(|st| st["pods_file_error"].as_str().map(str::to_string));
        assert!(wait_until(WAIT, || error().is_some_and(|e| e.contains(needle.as_str()))), "case {i}: {:?}", error());
        assert!(error().unwrap().starts_with(&format!("pods file {file}:")), "case {i}: file and line: {:?}", error());
        agent.must_capture("client");
        assert_eq!(curl(&client, &format!("http://{}:8080/", server.ip4())), (0, "still served".into()), "case {i}");
        s.write_pods(&[&client, &server], &[]);
        assert!(wait_until(WAIT, || error().is_none()), "case {i}: the fixed file is taken");
    }
    assert_eq!(app.peers().len(), 3);
}
