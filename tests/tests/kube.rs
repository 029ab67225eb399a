//! The agent reading pods and PeerAuthentications from a (fake) Kubernetes API server, with pods laid out as a
//! kubelet does (cgroup found from the pod's UID, netns from its pause process), and enrolling on demand for the
//! CNI plugin.

use std::time::Duration;

use meshcap_tests::{
    kube_api::{peer_authentication, pod_object, FakeApi},
    privileged_or_skip,
    scenario::{attached, curl, enroll, podctl_json, LoggedServer, Scenario, IDENTITY, WAIT},
    wait_until, Agent, Pod,
};
use serde_json::json;

const NODE: &str = "kind-worker";

/// The five cgroup hooks of a captured pod, as bpftool names them.
const POD_HOOKS: [&str; 5] = [
    "cgroup_inet4_connect",
    "cgroup_inet4_getpeername",
    "cgroup_inet6_connect",
    "cgroup_inet6_getpeername",
    "cgroup_sock_ops",
];

/// A node whose pods are published to a fake API server.
struct Cluster {
    api: FakeApi,
    s: Scenario,
}

impl Cluster {
    fn new(test: &str) -> Cluster {
        Cluster::with_api(test, FakeApi::start())
    }

    fn with_api(test: &str, api: FakeApi) -> Cluster {
        Cluster { api, s: Scenario::new(test) }
    }

    /// A pod laid out as the kubelet does, labelled `app: <name>`, enrolled or not.
    fn pod(&self, name: &str, enrolled: bool) -> Pod {
        let mut pod = self.s.node.add_kube_pod(name);
        pod.labels.insert("app".into(), name.into());
        if enrolled {
            enroll(&mut pod);
        }
        pod
    }

    fn publish(&self, pod: &Pod) {
        self.api.put_pod(pod_object(pod, NODE));
    }

    fn start_agent(&self) -> Agent {
        self.start_agent_with(&[])
    }

    fn start_agent_with(&self, args: &[&str]) -> Agent {
        let opts = args.iter().fold(self.api.agent_options(&self.s.node, NODE), |o, a| o.arg(*a));
        let mut agent = Agent::start(opts);
        assert!(agent.wait_ready_or_answering(WAIT), "agent did not come up:\n{}", agent.logs());
        agent
    }
}

/// The pod's own cgroup (the kubelet's pod slice), where the agent attaches; commands run one level below.
fn pod_slice(pod: &Pod) -> std::path::PathBuf {
    pod.cgroup_dir().parent().expect("the container scope sits in the pod slice").to_path_buf()
}

fn pinned_uids(agent: &Agent) -> Vec<String> {
    std::fs::read_dir(agent.pins().join("links"))
        .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
        .unwrap_or_default()
}

fn ready(agent: &Agent) -> bool {
    agent.status().is_ok_and(|s| s["ready"] == true)
}

/// CNI ADD for a pod through the agent's socket, as the plugin sends it during sandbox setup.
fn cni_add(socket: &std::path::Path, pod: &Pod) -> meshcap_agent::cni::protocol::Reply {
    use meshcap_agent::cni::{
        client::call,
        protocol::{AddRequest, Op},
    };
    let request = AddRequest {
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        uid: pod.uid.clone(),
        netns: pod.netns_path(),
        container_id: "0123456789abcdef".into(),
        ifname: "eth0".into(),
    };
    call(socket, Duration::from_secs(30), Op::Add(request)).expect("the agent answers on its CNI socket")
}

#[test]
fn a_pod_from_the_api_is_captured_and_dropping_a_label_lets_it_go_direct() {
    if !privileged_or_skip() {
        return;
    }
    let c = Cluster::new("kube_capture");
    let mut client = c.pod("client", true);
    let server = c.pod("server", false);
    c.publish(&client);
    c.publish(&server);
    let agent = c.start_agent();
    agent.must_capture("client");
    assert!(wait_until(WAIT, || ready(&agent)), "{:?}", agent.status());
    let status = agent.status().unwrap();
    assert_eq!(status["source"], format!("Kubernetes API (node {NODE})"));
    assert!(status["source_error"].is_null(), "{status}");
    assert_eq!(attached(&pod_slice(&client)), POD_HOOKS, "hooks on the pod slice the agent found from the UID");

    let app = LoggedServer::start(&c.s, &server, 8080, "from the api");
    let url = format!("http://{}:8080/", server.ip4());
    assert_eq!(curl(&client, &url), (0, "from the api".into()));
    assert!(wait_until(WAIT, || agent.outbound("client", "relayed") == 1), "{:?}", agent.pod_status("client"));
    assert_eq!(app.wait_peers(1), vec![client.ip4().to_string()], "left with the pod's own IP");

    client.labels.remove(IDENTITY);
    c.publish(&client);
    agent.must_not_capture("client");
    assert!(attached(&pod_slice(&client)).is_empty(), "capture removed");
    let before = agent.counter("connect_redirected");
    assert_eq!(curl(&client, &url), (0, "from the api".into()));
    assert_eq!(agent.counter("connect_redirected"), before, "went direct");
    assert_eq!(agent.outbound("client", "relayed"), 0);
    assert!(agent.wait_for_log("lacks the label spire-managed-identity=true", WAIT), "{}", agent.logs());

    // Labelled again while running: captured again, its next connection through the engine.
    enroll(&mut client);
    c.publish(&client);
    agent.must_capture("client");
    assert_eq!(curl(&client, &url), (0, "from the api".into()));
    assert!(wait_until(WAIT, || agent.outbound("client", "relayed") == 1), "{:?}", agent.pod_status("client"));
    assert_eq!(app.wait_peers(2)[1], client.ip4().to_string());
}

#[test]
fn a_pod_deleted_from_the_api_loses_its_capture_and_pins() {
    if !privileged_or_skip() {
        return;
    }
    let c = Cluster::new("kube_delete");
    let client = c.pod("client", true);
    let server = c.pod("server", false);
    c.publish(&client);
    c.publish(&server);
    let agent = c.start_agent();
    agent.must_capture("client");
    assert!(pinned_uids(&agent).iter().any(|p| p.starts_with(&client.uid)));
    assert_eq!(agent.map_entries("POD_CONFIG"), 1);

    c.api.delete_pod(&client.namespace, &client.name).expect("the pod was there");
    // The pod leaves the status before its capture is released, so wait for all of it.
    let released = || {
        agent.pod_status("client").is_none()
            && attached(&pod_slice(&client)).is_empty()
            && !pinned_uids(&agent).iter().any(|p| p.starts_with(&client.uid))
            && agent.map_entries("POD_CONFIG") == 0
    };
    assert!(wait_until(WAIT, released), "{:?} {:?}", agent.pod_status("client"), pinned_uids(&agent));
    let app = LoggedServer::start(&c.s, &server, 8080, "direct");
    assert_eq!(curl(&client, &format!("http://{}:8080/", server.ip4())), (0, "direct".into()));
    assert_eq!(app.wait_peers(1), vec![client.ip4().to_string()]);
}

#[test]
fn an_ip_reused_by_a_new_pod_points_the_mesh_and_inbound_capture_at_the_new_pod() {
    if !privileged_or_skip() {
        return;
    }
    let c = Cluster::new("kube_ip_reuse");
    let client = c.pod("client", true);
    let old = c.pod("api-old", true);
    c.publish(&client);
    c.publish(&old);
    let agent = c.start_agent();
    agent.must_capture("client");
    agent.must_have_svid("client");
    agent.must_capture("api-old");
    let host = u32::from(old.ip4().octets()[3]);

    // The old pod finished: the API still lists it (phase Failed), but its IP is free at once.
    let mut finished = pod_object(&old, NODE);
    finished["status"]["phase"] = json!("Failed");
    c.api.put_pod(finished);
    let gone = || agent.pod_status("api-old").is_none() && !pinned_uids(&agent).iter().any(|p| p.starts_with(&old.uid));
    assert!(wait_until(WAIT, gone), "a finished pod counts as gone: {:?}", pinned_uids(&agent));
    drop(old);
    let new = {
        let mut p = c.s.node.add_kube_pod_at("api-new", host);
        p.labels.insert("app".into(), "api-new".into());
        enroll(&mut p);
        p
    };
    c.publish(&new);
    agent.must_capture("api-new");
    agent.must_have_svid("api-new");

    let app = LoggedServer::start(&c.s, &new, 8080, "new pod");
    assert_eq!(curl(&client, &format!("http://{}:8080/", new.ip4())), (0, "new pod".into()));
    // mTLS end to end: the client's engine expected the new pod's identity (the old one's would have been
    // refused), and the new pod's inbound side took the connection.
    assert!(wait_until(WAIT, || agent.inbound("api-new", "relayed") == 1), "{:?}", agent.pod_status("api-new"));
    assert_eq!(app.wait_peers(1), vec!["127.0.0.6".to_string()], "delivered by the new pod's inbound engine");
    let peers = agent.pod_status("client").unwrap();
    assert_eq!(peers["outbound"]["relayed"], 1, "{peers}");
    assert!(!agent.logs().contains("both claim IP"), "the finished pod's IP was not claimed twice");
}

#[test]
fn a_watch_expired_mid_run_and_during_an_outage_relists_and_catches_up() {
    if !privileged_or_skip() {
        return;
    }
    let c = Cluster::new("kube_410");
    let mut client = c.pod("client", true);
    let server = c.pod("server", false);
    c.publish(&client);
    c.publish(&server);
    let agent = c.start_agent();
    agent.must_capture("client");
    let lists =
        || c.api.requests().iter().filter(|r| r.starts_with("GET /api/v1/pods?") && !r.contains("watch=")).count();

    // 410 on the running watches: the agent lists again and follows the next change.
    let before = lists();
    c.api.expire_watches();
    let second = c.pod("second", true);
    c.publish(&second);
    agent.must_capture("second");
    assert!(wait_until(WAIT, || lists() >= before + 2), "both pod watches listed again: {:?}", c.api.requests());

    // An outage, changes meanwhile, history compacted: the last known state stays in force and is said to be
    // stale; once the API answers, the watch from the old version is refused (410) and a relist catches up.
    c.api.set_down(true);
    let broken = wait_until(WAIT, || agent.status().is_ok_and(|s| s["source_error"].is_string()));
    assert!(broken, "{:?}", agent.status());
    let error = agent.status().unwrap()["source_error"].as_str().unwrap().to_string();
    assert!(error.contains("Kubernetes API") && error.contains("keeping the last known"), "{error}");
    client.labels.remove(IDENTITY);
    c.publish(&client);
    let third = c.pod("third", true);
    c.publish(&third);
    c.api.expire_watches();
    let _app = LoggedServer::start(&c.s, &server, 8080, "still meshed");
    assert_eq!(curl(&client, &format!("http://{}:8080/", server.ip4())), (0, "still meshed".into()));
    assert!(wait_until(WAIT, || agent.outbound("client", "relayed") == 1), "the last known state still serves");

    c.api.set_down(false);
    agent.must_capture("third");
    agent.must_not_capture("client");
    agent.must_capture("second");
    assert!(wait_until(WAIT, || agent.status().is_ok_and(|s| s["source_error"].is_null())), "{:?}", agent.status());
    assert!(agent.logs().contains("too old resource version"), "the 410 reached the agent: {}", agent.logs());
}

#[test]
fn bookmarks_are_accepted_and_a_resumed_watch_starts_from_them() {
    if !privileged_or_skip() {
        return;
    }
    let c = Cluster::new("kube_bookmarks");
    let client = c.pod("client", true);
    c.publish(&client);
    let agent = c.start_agent();
    agent.must_capture("client");
    let requests = c.api.requests();
    let pod_watches: Vec<&String> =
        requests.iter().filter(|r| r.starts_with("GET /api/v1/pods?") && r.contains("watch=")).collect();
    assert!(pod_watches.iter().all(|r| r.contains("allowWatchBookmarks=true")), "{pod_watches:?}");
    let lists = || c.api.requests().iter().filter(|r| !r.contains("watch=")).count();
    let lists_before = lists();

    // Another resource moves the global resourceVersion on; the pod watches only learn it from a bookmark.
    let rv = c.api.put_peer_authentication(peer_authentication("default", "other", Some("nobody"), "STRICT"));
    c.api.bookmark();
    std::thread::sleep(Duration::from_millis(300));
    c.api.close_watches();
    let resumed = format!("resourceVersion={rv}");
    let ok = wait_until(WAIT, || {
        c.api.requests().iter().filter(|r| r.starts_with("GET /api/v1/pods?") && r.contains(&resumed)).count() >= 2
    });
    assert!(ok, "both pod watches resumed from the bookmark's version {rv}: {:?}", c.api.requests());
    assert_eq!(lists(), lists_before, "no relist: {:?}", c.api.requests());
    let next = c.pod("next", true);
    c.publish(&next);
    agent.must_capture("next");
}

#[test]
fn a_peer_authentication_served_as_v1beta1_applies_live() {
    if !privileged_or_skip() {
        return;
    }
    let c = Cluster::with_api("kube_peerauth", FakeApi::start_serving(&["v1beta1"]));
    let server = c.pod("server", true);
    let legacy = c.pod("legacy", false);
    c.publish(&server);
    c.publish(&legacy);
    let agent = c.start_agent();
    agent.must_capture("server");
    let app = LoggedServer::start(&c.s, &server, 8080, "hello");
    let url = format!("http://{}:8080/", server.ip4());
    assert_eq!(curl(&legacy, &url), (0, "hello".into()), "PERMISSIVE by default: plaintext served");
    assert!(agent.logs().contains("security.istio.io/v1beta1"), "{}", agent.logs());
    assert!(c.api.requests().iter().any(|r| r.starts_with("GET /apis/security.istio.io/v1/peerauthentications")));

    c.api.put_peer_authentication(peer_authentication("default", "server-strict", Some("server"), "STRICT"));
    let strict = wait_until(WAIT, || agent.pod_status("server").is_some_and(|p| p["mtls"]["mode"] == "STRICT"));
    assert!(strict, "{:?}", agent.pod_status("server"));
    assert_ne!(curl(&legacy, &url).0, 0, "plaintext refused under STRICT");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(app.peers().len(), 1, "nothing reached the app");

    c.api.put_peer_authentication(peer_authentication("default", "server-strict", Some("server"), "PERMISSIVE"));
    assert!(wait_until(WAIT, || curl(&legacy, &url) == (0, "hello".into())), "PERMISSIVE again");

    // A port key that is no port (the CRD's schema lets it through) keeps the policy and fails closed.
    let mut bad = peer_authentication("default", "server-strict", Some("server"), "PERMISSIVE");
    bad["spec"]["portLevelMtls"] = json!({"abc": {"mode": "DISABLE"}});
    c.api.put_peer_authentication(bad);
    let strict = wait_until(WAIT, || agent.pod_status("server").is_some_and(|p| p["mtls"]["mode"] == "STRICT"));
    assert!(strict, "{:?}", agent.pod_status("server"));
    assert_ne!(curl(&legacy, &url).0, 0, "plaintext refused: the policy failed closed");
    let said = || {
        agent
            .logs()
            .lines()
            .any(|l| l.contains("ERROR") && l.contains("default/server-strict") && l.contains("\"abc\""))
    };
    assert!(wait_until(WAIT, said), "{}", agent.logs());
}

/// RBAC refusing PeerAuthentications while pods are served: the error stays in status for as long as it lasts (the
/// pod-list probe answering says nothing about PeerAuthentications), pods keep being followed, and it clears once the
/// API serves PeerAuthentications again.
#[test]
fn a_refused_peer_authentication_watch_stays_reported_while_pods_are_served() {
    if !privileged_or_skip() {
        return;
    }
    let c = Cluster::new("kube_pa_403");
    let client = c.pod("client", true);
    c.publish(&client);
    let agent = c.start_agent();
    agent.must_capture("client");
    assert!(wait_until(WAIT, || ready(&agent)), "{:?}", agent.status());

    c.api.refuse_peer_authentications(Some(403));
    let error = || agent.status().ok().and_then(|s| s["source_error"].as_str().map(str::to_string));
    let refused = |e: &str| e.contains("watching PeerAuthentications") && e.contains("forbidden");
    assert!(wait_until(WAIT, || error().is_some_and(|e| refused(&e))), "{:?}", agent.status());
    // Several probe periods (2 s): never cleared meanwhile.
    let until = std::time::Instant::now() + Duration::from_secs(7);
    while std::time::Instant::now() < until {
        let now = error();
        assert!(now.as_deref().is_some_and(refused), "the refusal left status while it lasts: {now:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let next = c.pod("next", true);
    c.publish(&next);
    agent.must_capture("next");

    c.api.refuse_peer_authentications(None);
    assert!(wait_until(WAIT, || error().is_none()), "cleared once served again: {:?}", agent.status());
}

/// Without Istio's CRDs every pod is PERMISSIVE: status says so, not only a log line.
#[test]
fn without_peer_authentication_crds_status_says_every_pod_is_permissive() {
    if !privileged_or_skip() {
        return;
    }
    let c = Cluster::with_api("kube_no_crd", FakeApi::start_serving(&[]));
    let client = c.pod("client", true);
    c.publish(&client);
    let agent = c.start_agent();
    agent.must_capture("client");
    assert!(wait_until(WAIT, || ready(&agent)), "{:?}", agent.status());
    let status = agent.status().unwrap();
    let error = status["source_error"].as_str().unwrap_or_else(|| panic!("nothing in status: {status}"));
    assert!(
        error.contains("served neither as security.istio.io/v1 nor v1beta1") && error.contains("every pod PERMISSIVE"),
        "{error}"
    );
    assert_eq!(agent.pod_status("client").unwrap()["mtls"]["mode"], "PERMISSIVE");
}

#[test]
fn with_the_api_down_at_start_the_agent_is_not_ready_and_keeps_pinned_capture() {
    if !privileged_or_skip() {
        return;
    }
    let c = Cluster::new("kube_down");
    let client = c.pod("client", true);
    let server = c.pod("server", false);
    c.publish(&client);
    c.publish(&server);
    let mut agent = c.start_agent();
    agent.must_capture("client");
    let app = LoggedServer::start(&c.s, &server, 8080, "up");
    agent.kill9();

    c.api.set_down(true);
    agent.restart();
    assert!(agent.wait_ready_or_answering(WAIT), "{}", agent.logs());
    let said = wait_until(WAIT, || agent.status().is_ok_and(|s| s["source_error"].is_string()));
    assert!(said, "{:?}", agent.status());
    let status = agent.status().unwrap();
    assert_eq!(status["ready"], false, "{status}");
    let error = status["source_error"].as_str().unwrap();
    assert!(error.contains("Kubernetes API") && error.contains("nothing garbage-collected"), "{error}");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(attached(&pod_slice(&client)), POD_HOOKS, "pinned capture stays");
    assert!(pinned_uids(&agent).iter().any(|p| p.starts_with(&client.uid)));
    let r = podctl_json(&client, &["connect", "--addr", &format!("{}:8080", server.ip4()), "--timeout-ms", "2000"]);
    assert_eq!(r["errno"], libc::ECONNREFUSED, "refused, never sent around the mesh: {r}");
    assert!(app.peers().is_empty());

    c.api.set_down(false);
    agent.must_capture("client");
    assert!(wait_until(WAIT, || ready(&agent)), "{:?}", agent.status());
    assert_eq!(curl(&client, &format!("http://{}:8080/", server.ip4())), (0, "up".into()));
    assert_eq!(app.wait_peers(1), vec![client.ip4().to_string()]);
}

#[test]
fn a_host_network_pod_is_never_enrolled_and_the_agent_says_why() {
    if !privileged_or_skip() {
        return;
    }
    let c = Cluster::new("kube_hostnet");
    let marker = c.pod("marker", true);
    c.publish(&marker);
    let mut host = pod_object(&marker, NODE);
    host["metadata"]["name"] = json!("node-exporter");
    host["metadata"]["uid"] = json!("7c1d4c6a-95b6-4d3c-8f3e-000000000001");
    host["spec"]["hostNetwork"] = json!(true);
    host["status"]["podIP"] = json!(c.s.node.ip4().to_string());
    host["status"]["podIPs"] = json!([{"ip": c.s.node.ip4().to_string()}]);
    c.api.put_pod(host);
    let agent = c.start_agent();
    agent.must_capture("marker");
    assert!(agent.wait_for_log("pod default/node-exporter uses hostNetwork", WAIT), "{}", agent.logs());
    assert!(agent.logs().contains("node's own network namespace"), "{}", agent.logs());
    assert!(agent.pod_status("node-exporter").is_none(), "{:?}", agent.pod_status("node-exporter"));
    assert!(wait_until(WAIT, || ready(&agent)), "a hostNetwork pod does not hold readiness back");
    assert_eq!(agent.logs().matches("uses hostNetwork").count(), 1, "warned once");
}

/// The CNI plugin's path, through the pods file: a pod whose file entry names its cgroup but not its netns, whose
/// sandbox has no process yet, is enrolled over the agent's CNI socket with the netns the runtime gives, before
/// its app runs, so its first connection is captured.
#[test]
fn enrolling_on_demand_captures_a_pod_before_its_first_connection() {
    use meshcap_agent::cni::{
        client::call,
        protocol::{AddOutcome, AddRequest, Op, Reply},
    };
    if !privileged_or_skip() {
        return;
    }
    let s = Scenario::new("on_demand");
    let mut client = s.node.add_pod("client");
    enroll(&mut client);
    let server = s.node.add_pod("server");
    let mut halfway = s.node.add_pod("halfway");
    halfway.labels.insert("sidecar.istio.io/inject".into(), "true".into());
    let netns_line = format!("\"meshcap.io/netns\": \"{}\"", client.netns_path().display());
    let yaml: String = meshcap_tests::pods_yaml(&[&client, &server, &halfway])
        .lines()
        .filter(|l| !l.contains(&netns_line))
        .map(|l| format!("{l}\n"))
        .collect();
    s.write_raw(&yaml);
    let socket = s.node.scratch_dir().join("cni.sock");
    let agent = s.start_agent(&["--cni-socket", socket.to_str().unwrap()]);
    let waiting = wait_until(WAIT, || {
        agent.pod_status("client").is_some_and(|p| p["error"].as_str().is_some_and(|e| e.contains("no processes yet")))
    });
    assert!(waiting, "the sandbox has no process to find its netns by: {:?}", agent.pod_status("client"));
    let cni_status = || call(&socket, Duration::from_secs(5), Op::Status);
    assert!(wait_until(WAIT, || cni_status().is_ok_and(|r| r == Reply::Ready)), "{:?}", cni_status());

    let request = |uid: &str, name: &str| AddRequest {
        namespace: "default".into(),
        name: name.into(),
        uid: uid.into(),
        netns: client.netns_path(),
        container_id: "0123456789abcdef".into(),
        ifname: "eth0".into(),
    };
    let add = |uid: &str, name: &str| {
        call(&socket, Duration::from_secs(30), Op::Add(request(uid, name)))
            .expect("the agent answers on its CNI socket")
    };
    assert_eq!(add(&client.uid, "client"), Reply::Pod(AddOutcome::Captured));
    // No waiting: the answer came after the hooks were attached.
    assert_eq!(attached(&client.cgroup_dir()), POD_HOOKS);
    assert_eq!(agent.pod_status("client").unwrap()["captured"], true);

    let app = LoggedServer::start(&s, &server, 8080, "first");
    assert_eq!(curl(&client, &format!("http://{}:8080/", server.ip4())), (0, "first".into()));
    assert!(wait_until(WAIT, || agent.outbound("client", "relayed") == 1), "{:?}", agent.pod_status("client"));
    assert_eq!(app.wait_peers(1), vec![client.ip4().to_string()]);

    let Reply::Error { message } = add("00000000-0000-4000-8000-000000000000", "client") else {
        panic!("uid mismatch")
    };
    assert!(message.contains("default/client") && message.contains(&client.uid), "{message}");
    let Reply::Error { message } = add(&client.uid, "ghost") else { panic!("an unknown pod is an error") };
    assert!(message.contains("default/ghost") && message.contains("pods file"), "{message}");
    assert!(matches!(add(&server.uid, "server"), Reply::Pod(AddOutcome::NotEnrolled { .. })));
    // Asking for the mesh without an identity is never "fine": the pod's network setup fails, saying why.
    let Reply::Error { message } = add(&halfway.uid, "halfway") else { panic!("injection without identity") };
    assert!(message.contains("default/halfway") && message.contains("lacks spire-managed-identity=true"), "{message}");
    let check = call(&socket, Duration::from_secs(5), Op::Check(request(&client.uid, "client"))).unwrap();
    assert_eq!(check, Reply::Pod(AddOutcome::Captured), "CHECK sees the pod captured");

    // The next read of the file (still without the netns) keeps the pod where the runtime put it.
    let cookie = agent.pod_status("client").unwrap()["netns_cookie"].clone();
    s.write_raw(&format!("{yaml}---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: touch}}\n"));
    std::thread::sleep(Duration::from_millis(500));
    let now = agent.pod_status("client").unwrap();
    assert_eq!((now["captured"].clone(), now["netns_cookie"].clone()), (json!(true), cookie), "{now}");
    assert!(wait_until(WAIT, || ready(&agent)), "{:?}", agent.status());
}

/// The CNI plugin's path through the Kubernetes source, for pods the watches have not delivered yet (the kubelet
/// sets a sandbox up before the agent's watch hears of the pod): the agent GETs the pod. Found: captured before its
/// first connection. Refused by RBAC (403): ADD fails closed, saying which pod and what the API said, logged as an
/// error, nothing captured. Not there (404): ADD fails, saying the pod is not in the API.
#[test]
fn on_demand_enrollment_gets_an_unwatched_pod_from_the_api_and_fails_closed_when_the_api_refuses() {
    use meshcap_agent::cni::protocol::{AddOutcome, Reply};
    if !privileged_or_skip() {
        return;
    }
    let c = Cluster::new("kube_on_demand");
    let server = c.pod("server", false);
    c.publish(&server);
    let early = c.pod("early", true);
    let refused = c.pod("refused", true);
    let ghost = c.pod("ghost", true);
    c.api.put_pod_unlisted(pod_object(&early, NODE));
    c.api.put_pod_unlisted(pod_object(&refused, NODE));
    c.api.refuse_pod_get("default", "refused", Some(403));
    let socket = c.s.node.scratch_dir().join("cni.sock");
    let agent = c.start_agent_with(&["--cni-socket", socket.to_str().unwrap()]);
    assert!(wait_until(WAIT, || ready(&agent)), "{:?}", agent.status());
    assert!(wait_until(WAIT, || socket.exists()), "no CNI socket:\n{}", agent.logs());
    for pod in ["early", "refused", "ghost"] {
        assert!(agent.pod_status(pod).is_none(), "{pod} is in no list or watch: {:?}", agent.pod_status(pod));
    }
    let add = |pod: &Pod| cni_add(&socket, pod);
    let got = |pod: &Pod| {
        let path = format!("GET /api/v1/namespaces/{}/pods/{}", pod.namespace, pod.name);
        c.api.requests().iter().any(|r| r.starts_with(&path))
    };

    // (a) Found by GET: captured when ADD returns, and the app's first connection goes through the engine.
    assert_eq!(add(&early), Reply::Pod(AddOutcome::Captured), "{}", agent.logs());
    assert!(got(&early), "the pod came from a GET: {:?}", c.api.requests());
    assert_eq!(attached(&pod_slice(&early)), POD_HOOKS);
    let app = LoggedServer::start(&c.s, &server, 8080, "first");
    let url = format!("http://{}:8080/", server.ip4());
    assert_eq!(curl(&early, &url), (0, "first".into()));
    assert!(wait_until(WAIT, || agent.outbound("early", "relayed") == 1), "{:?}", agent.pod_status("early"));
    assert_eq!(app.wait_peers(1), vec![early.ip4().to_string()]);

    // (b) RBAC refuses the GET: the pod's network setup fails, naming the pod and the API's answer.
    let Reply::Error { message } = add(&refused) else { panic!("a refused GET must fail ADD") };
    assert!(got(&refused));
    assert!(
        message.contains("default/refused")
            && message.contains("403 Forbidden")
            && message.contains("cannot get resource \"pods\""),
        "{message}"
    );
    // The reply can arrive before the agent's log line has been read from its pipe.
    let logged = wait_until(WAIT, || {
        agent.logs().lines().any(|l| l.contains("ERROR") && l.contains("default/refused") && l.contains("403"))
    });
    assert!(logged, "logged at error level:\n{}", agent.logs());
    assert!(agent.pod_status("refused").is_none(), "{:?}", agent.pod_status("refused"));
    assert!(attached(&pod_slice(&refused)).is_empty(), "nothing captured");
    let redirected = agent.counter("connect_redirected");
    assert_eq!(curl(&refused, &url), (0, "first".into()));
    assert_eq!(agent.counter("connect_redirected"), redirected, "went direct: not captured");
    // The kubelet retries once RBAC is fixed.
    c.api.refuse_pod_get("default", "refused", None);
    assert_eq!(add(&refused), Reply::Pod(AddOutcome::Captured));
    assert_eq!(attached(&pod_slice(&refused)), POD_HOOKS);

    // (c) The API does not know the pod (404).
    let Reply::Error { message } = add(&ghost) else { panic!("an unknown pod must fail ADD") };
    assert!(got(&ghost));
    assert!(message.contains("default/ghost") && message.contains("is not in the Kubernetes API"), "{message}");
    assert!(message.contains(&ghost.uid), "{message}");
    assert!(agent.pod_status("ghost").is_none());
    assert!(attached(&pod_slice(&ghost)).is_empty(), "nothing captured");
}

/// Until the agent has read pods and PeerAuthentications once it cannot tell how a pod must be captured (a STRICT pod
/// enrolled then would get PERMISSIVE): ADD fails (the kubelet retries) and STATUS says not ready, whatever the
/// pod. Here RBAC refuses PeerAuthentications from the start; once they are served, ADD captures under STRICT. A pod
/// asking for the mesh that the agent cannot read (a malformed pod IP) fails ADD too.
#[test]
fn before_its_first_snapshot_the_agent_refuses_cni_requests_and_a_strict_pod_is_never_permissive() {
    use meshcap_agent::cni::{
        client::call,
        protocol::{AddOutcome, Op, Reply},
    };
    if !privileged_or_skip() {
        return;
    }
    let c = Cluster::new("kube_cni_unready");
    let server = c.pod("server", true);
    let outsider = c.pod("outsider", false);
    c.publish(&outsider);
    c.api.put_pod_unlisted(pod_object(&server, NODE));
    c.api.put_peer_authentication(peer_authentication("default", "server-strict", Some("server"), "STRICT"));
    c.api.refuse_peer_authentications(Some(403));
    let socket = c.s.node.scratch_dir().join("cni.sock");
    let agent = c.start_agent_with(&["--cni-socket", socket.to_str().unwrap()]);
    assert!(wait_until(WAIT, || socket.exists()), "no CNI socket:\n{}", agent.logs());
    let add = |pod: &Pod| cni_add(&socket, pod);
    let status = || call(&socket, Duration::from_secs(5), Op::Status).expect("the agent answers STATUS");

    let refused = || agent.status().ok().and_then(|s| s["source_error"].as_str().map(str::to_string));
    assert!(wait_until(WAIT, || refused().is_some_and(|e| e.contains("forbidden"))), "{:?}", agent.status());
    let Reply::Error { message } = add(&server) else { panic!("ADD before the first snapshot must fail") };
    assert!(message.contains("has not read the Kubernetes API") && message.contains("retry"), "{message}");
    assert!(message.contains("forbidden"), "says why it has not: {message}");
    let Reply::Error { message } = status() else { panic!("STATUS before the first snapshot must say not ready") };
    assert!(message.contains("has not read the Kubernetes API"), "{message}");
    assert!(attached(&pod_slice(&server)).is_empty(), "nothing captured");
    assert_eq!(agent.status().unwrap()["ready"], false);

    c.api.refuse_peer_authentications(None);
    assert!(wait_until(WAIT, || ready(&agent)), "{:?}", agent.status());
    assert_eq!(status(), Reply::Ready);
    assert_eq!(add(&server), Reply::Pod(AddOutcome::Captured), "{}", agent.logs());
    assert_eq!(attached(&pod_slice(&server)), POD_HOOKS);
    assert_eq!(agent.pod_status("server").unwrap()["mtls"]["mode"], "STRICT");
    let app = LoggedServer::start(&c.s, &server, 8080, "strict");
    let (code, _) = curl(&outsider, &format!("http://{}:8080/", server.ip4()));
    assert_ne!(code, 0, "plaintext from outside the mesh reaches no STRICT app");
    assert!(app.peers().is_empty(), "{:?}", app.peers());

    let broken = c.pod("broken", true);
    let mut object = pod_object(&broken, NODE);
    object["status"]["podIPs"] = json!([{"ip": "10.0.0.300"}]);
    c.api.put_pod_unlisted(object);
    let Reply::Error { message } = add(&broken) else { panic!("a meshed pod the agent cannot read must fail ADD") };
    assert!(message.contains("default/broken") && message.contains("10.0.0.300"), "{message}");
}

/// `meshcap-agent diagnose --kubernetes` runs the manifest checks on what the cluster holds. Needs no root.
#[test]
fn diagnose_reads_pods_policies_and_config_maps_from_the_cluster() {
    struct Dir(std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let dir = Dir(std::env::temp_dir().join(format!("meshcap-diagnose-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let api = FakeApi::start_serving(&["v1beta1"]);
    let kubeconfig = dir.0.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let labelled = |name: &str, labels: serde_json::Value| {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"), "labels": labels},
               "spec": {"nodeName": NODE, "containers": [{"name": "app", "image": "x"}]}})
    };
    let meshed = json!({"app": "myapi", "sidecar.istio.io/inject": "true", "spire-managed-identity": "true"});
    api.put_pod(labelled("myapi-5d8f", meshed));
    api.put_pod(labelled("worker", json!({"sidecar.istio.io/inject": "true"})));
    let mut seed_policy = peer_authentication("default", "myapi", None, "STRICT");
    seed_policy["spec"]["selector"] = json!({"matchLabels": {"role": "myapi"}});
    api.put_peer_authentication(seed_policy);
    api.put_config_map(json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "spire-server", "namespace": "spire"},
        "data": {"server.conf": "server {\n  trust_domain = \"example.org\"\n}\n"}}));
    api.put_config_map(json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "istio", "namespace": "istio-system"},
        "data": {"mesh": "trustDomain: democluster.internal\n"}}));
    let diagnose = |kubeconfig: &std::path::Path| {
        std::process::Command::new(meshcap_tests::bin_path("meshcap-agent", "MESHCAP_AGENT_BIN"))
            .args(["diagnose", "--kubernetes", "--trust-domain", "democluster.internal"])
            .env("KUBECONFIG", kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .output()
            .expect("running meshcap-agent diagnose")
    };
    let out = diagnose(&kubeconfig);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains("peerauthentications/default/myapi: PeerAuthentication default/myapi: selector {role: myapi}")
            && stdout.contains("Pod myapi-5d8f has app: myapi: did you mean that?"),
        "{stdout}"
    );
    assert!(stdout.contains("pods/default/worker: Pod default/worker asks for injection"), "{stdout}");
    assert!(
        stdout
            .contains("configmaps/spire/spire-server: SPIRE spire-server/server.conf trust_domain is \"example.org\""),
        "{stdout}"
    );
    assert!(!stdout.contains("Istio istio/mesh"), "Istio's trust domain matches: {stdout}");
    assert!(stdout.contains("3 finding(s) in 2 workload(s) and 1 PeerAuthentication(s)"), "{stdout}");

    api.set_down(true);
    let out = diagnose(&kubeconfig);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("listing pods from the Kubernetes API") && stderr.contains("503"), "{stderr}");
}
