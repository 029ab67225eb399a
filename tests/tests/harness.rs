//! Self-test of the simulated-pod harness and podctl, without the agent: if these fail, agent tests cannot be
//! trusted either.

use std::{
    path::PathBuf,
    process::Output,
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod as K8sPod;
use meshcap_tests::{
    parse_json_line, pods_yaml_with, privileged_or_skip, wait_until, Agent, AgentOptions, Node, Pod, PodProcess,
};
use serde::Deserialize as _;
use serde_json::Value;

const PODCTL: &str = env!("CARGO_BIN_EXE_podctl");
const WAIT: Duration = Duration::from_secs(10);

fn json(out: &Output) -> Value {
    assert!(out.status.success(), "podctl failed: {}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    parse_json_line(&out.stdout).expect("podctl prints a JSON line")
}

fn serve(pod: &Pod, command: &str, port: u16, extra: &[&str]) -> PodProcess {
    let port_arg = port.to_string();
    let mut args = vec![command, "--port", &port_arg];
    args.extend_from_slice(extra);
    let mut server = pod.spawn(PODCTL, &args);
    assert!(server.wait_listening(port, WAIT), "{command} in {} is not listening on {port}", pod.name);
    server
}

#[test]
fn pods_reach_each_other_over_ipv4_and_ipv6() {
    if !privileged_or_skip() {
        return;
    }
    let node = Node::new("pods_reach_each_other_over_ipv4_and_ipv6");
    let (a, b) = (node.add_pod("a"), node.add_pod("b"));
    let peer_log = node.scratch_dir().join("peers.log");
    let peer_log_arg = peer_log.to_str().expect("scratch paths are UTF-8");
    let server = serve(&b, "http-server", 8080, &["--body", "hello from b", "--peer-log", peer_log_arg]);

    for (url, expected_peer) in [
        (format!("http://{}:8080/x", b.ip4()), a.ip4().to_string()),
        (format!("http://[{}]:8080/x", b.ip6()), a.ip6().to_string()),
    ] {
        let reply = json(&a.run(PODCTL, ["http-get", "--url", &url]));
        assert_eq!(reply["ok"], true, "{url}: {reply}");
        assert_eq!(reply["status"], 200, "{url}: {reply}");
        assert_eq!(reply["body"], "hello from b");
        assert_eq!(reply["headers"]["x-peer"], expected_peer.as_str(), "{url}");
    }
    let logged = std::fs::read_to_string(&peer_log).expect("peer log");
    assert_eq!(logged, format!("{}\n{}\n", a.ip4(), a.ip6()));

    // The node side (the bridge address) reaches pods too, from outside any pod cgroup.
    let reply = json(&node.run(PODCTL, ["http-get", "--url", &format!("http://{}:8080/", b.ip4())]));
    assert_eq!(reply["headers"]["x-peer"], node.ip4().to_string());

    // The server runs in b's cgroup and network namespace.
    let pid = server.pid() as i32;
    assert!(b.pids().contains(&pid), "pid {pid} not in {:?}", b.pids());
    assert!(!a.pids().contains(&pid));
    let netns_of = |p: PathBuf| std::fs::metadata(p).map(|m| std::os::unix::fs::MetadataExt::ino(&m)).expect("stat");
    assert_eq!(netns_of(format!("/proc/{pid}/ns/net").into()), netns_of(b.netns_path()));
}

#[test]
fn connect_reports_the_raw_peer_address_of_each_family() {
    if !privileged_or_skip() {
        return;
    }
    let node = Node::new("connect_reports_the_raw_peer_address_of_each_family");
    let (a, b) = (node.add_pod("a"), node.add_pod("b"));
    let _echo = serve(&b, "echo-server", 7000, &[]);
    let cases = [
        (format!("{}:7000", b.ip4()), None, format!("{}:7000", b.ip4())),
        (format!("{}:7000", b.ip4()), Some("v6"), format!("[::ffff:{}]:7000", b.ip4())),
        (format!("[{}]:7000", b.ip6()), None, format!("[{}]:7000", b.ip6())),
    ];
    for (addr, family, expected_peer) in cases {
        let mut args = vec!["connect", "--addr", &addr, "--send", "ping"];
        args.extend(family.iter().flat_map(|f| ["--family", f]));
        let reply = json(&a.run(PODCTL, &args));
        assert_eq!(reply["ok"], true, "{addr} {family:?}: {reply}");
        assert_eq!(reply["peer"], expected_peer.as_str());
        assert_eq!(reply["reply"], "ping");
    }
    let refused = json(&a.run(PODCTL, ["connect", "--addr", &format!("{}:7001", b.ip4())]));
    assert_eq!((refused["ok"].clone(), refused["errno"].clone()), (false.into(), libc::ECONNREFUSED.into()));
}

#[test]
fn nothing_leaves_the_simulated_node() {
    if !privileged_or_skip() {
        return;
    }
    let node = Node::new("nothing_leaves_the_simulated_node");
    let a = node.add_pod("a");
    for target in ["192.0.2.1:80", "[2001:db8::1]:80"] {
        let started = Instant::now();
        let pod_reply = json(&a.run(PODCTL, ["connect", "--addr", target, "--timeout-ms", "1000"]));
        assert_eq!(pod_reply["ok"], false, "{target} reachable from a pod: {pod_reply}");
        assert_eq!(pod_reply["errno"], libc::ENETUNREACH, "{target}: {pod_reply}");
        assert!(started.elapsed() < Duration::from_secs(5), "no route should fail at once");
        let node_reply = json(&node.run(PODCTL, ["connect", "--addr", target, "--timeout-ms", "1000"]));
        assert_eq!(node_reply["errno"], libc::ENETUNREACH, "{target} from the node: {node_reply}");
    }
}

#[test]
fn source_and_sink_agree_on_what_was_sent() {
    if !privileged_or_skip() {
        return;
    }
    let node = Node::new("source_and_sink_agree_on_what_was_sent");
    let (a, b) = (node.add_pod("a"), node.add_pod("b"));
    let sink = serve(&b, "sink", 9000, &["--read-delay-ms", "1"]);
    let bytes = 3 * 1024 * 1024 + 12_345;
    let addr = format!("[{}]:9000", b.ip6());
    let sent = json(&a.run(PODCTL, ["source", "--addr", &addr, "--bytes", &bytes.to_string(), "--seed", "42"]));
    assert_eq!(sent["ok"], true, "{sent}");
    let received = parse_json_line(&sink.wait_output(WAIT).stdout).expect("sink prints JSON");
    assert_eq!(received["bytes"], bytes);
    assert_eq!(received["sha256"], sent["sha256"]);
    assert_eq!(
        received["peer"].as_str().and_then(|p| p.rsplit_once(':')).map(|p| p.0),
        Some(&*format!("[{}]", a.ip6()))
    );
    let echoed: Value = serde_json::from_str(sent["reply"].as_str().expect("reply text")).expect("reply is JSON");
    assert_eq!(echoed, received);
}

#[test]
fn pods_yaml_is_a_stream_of_kubernetes_pods() {
    if !privileged_or_skip() {
        return;
    }
    let node = Node::new("pods_yaml_is_a_stream_of_kubernetes_pods");
    let (mut local, mut remote) = (node.add_pod("client"), node.add_pod("server"));
    local.labels.insert("app".into(), "client: \"quoted\"".into());
    local.annotations.insert("note".into(), "x".into());
    remote.namespace = "other".into();
    remote.service_account = "sa".into();
    let yaml = pods_yaml_with(&[&local], &[&remote]);
    let pods: Vec<K8sPod> = serde_norway::Deserializer::from_str(&yaml)
        .map(|doc| K8sPod::deserialize(doc).expect("each document is a Pod"))
        .collect();
    assert_eq!(pods.len(), 2, "{yaml}");

    let meta = &pods[0].metadata;
    assert_eq!((meta.name.as_deref(), meta.namespace.as_deref()), (Some("client"), Some("default")));
    assert_eq!(meta.uid.as_deref(), Some(local.uid.as_str()));
    assert_eq!(meta.labels.as_ref().expect("labels")["app"], "client: \"quoted\"");
    let annotations = meta.annotations.as_ref().expect("annotations");
    assert_eq!(annotations["meshcap.io/netns"], local.netns_path().to_str().expect("utf-8"));
    assert_eq!(annotations["meshcap.io/cgroup"], local.cgroup_dir().to_str().expect("utf-8"));
    assert_eq!(annotations["note"], "x");
    let status = pods[0].status.as_ref().expect("status");
    assert_eq!(status.pod_ip.as_deref(), Some(&*local.ip4().to_string()));
    let ips: Vec<&str> = status.pod_ips.iter().flatten().map(|p| p.ip.as_str()).collect();
    assert_eq!(ips, [local.ip4().to_string(), local.ip6().to_string()]);
    assert_eq!(pods[0].spec.as_ref().and_then(|s| s.service_account_name.as_deref()), Some("client"));

    let meta = &pods[1].metadata;
    assert_eq!(meta.namespace.as_deref(), Some("other"));
    assert!(meta.annotations.as_ref().is_none_or(|a| a.is_empty()), "remote pods carry no node-local annotations");
    assert_eq!(pods[1].spec.as_ref().and_then(|s| s.service_account_name.as_deref()), Some("sa"));
}

/// What a pod leaves behind, checked after it is gone.
fn footprint(pod: &Pod) -> [PathBuf; 2] {
    [pod.netns_path(), pod.cgroup_dir()]
}

fn assert_gone(paths: &[PathBuf]) {
    for path in paths {
        assert!(!path.exists(), "{} survived", path.display());
    }
}

#[test]
fn dropping_removes_namespaces_cgroups_and_stray_processes() {
    if !privileged_or_skip() {
        return;
    }
    let node = Node::new("dropping_removes_namespaces_cgroups_and_stray_processes");
    let node_netns = node.netns_path();
    let pod = node.add_pod("a");
    // A daemonised grandchild: no handle of the test owns it, only the pod's cgroup knows it.
    let out = pod.run("sh", ["-c", "sleep 600 >/dev/null 2>&1 & echo $!"]);
    let stray: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().expect("pid of the background sleep");
    assert!(pod.pids().contains(&stray));
    let paths = footprint(&pod);
    drop(pod);
    assert_gone(&paths);
    assert!(!PathBuf::from(format!("/proc/{stray}")).exists() || is_zombie(stray), "stray process {stray} survived");

    // A pod that outlives its node is cleaned up by the node, and its own drop is then harmless.
    let late = node.add_pod("late");
    let late_paths = footprint(&late);
    drop(node);
    assert_gone(&late_paths);
    assert_gone(&[node_netns]);
    drop(late);
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')))
}

#[test]
fn a_panicking_test_still_cleans_up() {
    if !privileged_or_skip() {
        return;
    }
    let left: Mutex<Vec<PathBuf>> = Mutex::default();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let node = Node::new("a_panicking_test_still_cleans_up");
        let pod = node.add_pod("a");
        let _server = pod.spawn(PODCTL, ["echo-server", "--port", "7000"]);
        left.lock().expect("lock").extend(footprint(&pod).into_iter().chain([node.netns_path()]));
        panic!("deliberate");
    }));
    assert!(result.is_err());
    let left = left.into_inner().expect("lock");
    assert_eq!(left.len(), 3);
    assert_gone(&left);
}

/// Stands in for meshcap-agent: takes the same arguments, makes a pin dir, joins its cgroup, logs, and serves a
/// fixed status, so the `Agent` handle can be tested before (and independently of) the real agent.
const FAKE_AGENT: &str = r#"#!/usr/bin/env python3
import http.server, json, os, signal, sys
opts = dict(zip(sys.argv[2::2], sys.argv[3::2]))
assert sys.argv[1] == "run" and os.path.exists(opts["--pods"]), sys.argv
os.makedirs(os.path.join(opts["--pin-dir"], "links"))
mounts = [l.split(" - ") for l in open("/proc/self/mountinfo")]
cgroup2 = next(left.split()[4] for left, right in mounts if right.startswith("cgroup2 "))
cgroup = os.path.join(cgroup2, opts["--agent-cgroup"])
os.makedirs(cgroup, exist_ok=True)
open(os.path.join(cgroup, "cgroup.procs"), "w").write("0")
def stop(*_):
    print("stopping", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
status = {"ready": True, "pods": [{"name": "client", "captured": True}], "counters": {"connect_redirected": 3}}
class Status(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps(dict(status, pid=os.getpid())).encode()
        self.send_response(200 if self.path == "/status" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
host, port = opts["--admin-addr"].rsplit(":", 1)
server = http.server.HTTPServer((host, int(port)), Status)
print("starting", os.getpid(), file=sys.stderr, flush=True)
print("ready", flush=True)
server.serve_forever()
"#;

#[test]
fn agent_handle_starts_watches_crashes_restarts_and_cleans_up() {
    if !privileged_or_skip() {
        return;
    }
    if std::process::Command::new("python3").arg("--version").output().is_err() {
        // `cargo xtask setup` installs python3: in CI its absence is a failure.
        assert!(std::env::var_os("CI").is_none(), "no python3 for the stand-in agent (run `cargo xtask setup`)");
        eprintln!("skipping: no python3 for the stand-in agent");
        return;
    }
    let node = Node::new("agent_handle_starts_watches_crashes_restarts_and_cleans_up");
    let script = node.scratch_dir().join("fake-agent");
    std::fs::write(&script, FAKE_AGENT).expect("writing the stand-in agent");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let pods_file = node.scratch_dir().join("pods.yaml");
    meshcap_tests::write_atomic(&pods_file, &meshcap_tests::pods_yaml(&[])).expect("pods file");
    let mut opts = AgentOptions::new(&pods_file);
    opts.binary = script;

    let mut agent = Agent::start(opts);
    assert!(agent.wait_ready(WAIT), "stand-in never answered; logs:\n{}", agent.logs());
    assert!(agent.wait_for_log("starting", WAIT) && agent.wait_for_log("ready", WAIT), "{}", agent.logs());
    assert_eq!(agent.status().expect("status")["pid"], agent.pid());
    assert!(agent.wait_pod_captured("client", WAIT));
    assert_eq!(agent.pod_status("nobody"), None);
    assert_eq!(agent.counter("connect_redirected"), Some(3));
    let (pins, cgroup) = (agent.pins().to_path_buf(), agent.cgroup_dir());
    assert!(std::fs::read_to_string(cgroup.join("cgroup.procs"))
        .expect("agent cgroup")
        .contains(&agent.pid().to_string()));

    let first = agent.pid();
    agent.kill9();
    assert!(!agent.is_running() && agent.status().is_err());
    assert!(pins.exists(), "a crash leaves the pins");
    std::fs::remove_dir_all(&pins).expect("clearing pins so the restart can make them again");
    agent.restart();
    assert!(agent.wait_ready(WAIT), "restart never answered; logs:\n{}", agent.logs());
    assert_ne!(agent.pid(), first);
    assert_eq!(agent.status().expect("status")["pid"], agent.pid());

    agent.stop();
    assert!(wait_until(WAIT, || agent.logs().contains("stopping")), "SIGTERM first; logs:\n{}", agent.logs());
    assert!(agent.logs().contains("agent restarted"));
    drop(agent);
    assert_gone(&[pins, cgroup]);
}
