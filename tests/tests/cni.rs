//! The `meshcap-cni` binary run exactly as a container runtime runs a chained plugin: `CNI_*` variables, the
//! network configuration with the bridge plugin's `prevResult` on stdin, the result or error read from stdout
//! and the exit code.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use meshcap_agent::cni::{
    protocol::{AddOutcome, AddRequest, CheckRequest, DelRequest, Op, Reply},
    server::{self, Handler},
};
use meshcap_tests::{
    bin_path,
    harness::yaml::CGROUP_ANNOTATION,
    privileged_or_skip,
    scenario::{attached, curl, enroll, LoggedServer, Scenario, INJECT, WAIT},
    wait_until, Node, Pod,
};
use serde_json::{json, Value};

fn cni_bin() -> PathBuf {
    let bin = bin_path("meshcap-cni", "MESHCAP_CNI_BIN");
    assert!(bin.exists(), "{} does not exist: build it with `cargo build -p meshcap-agent --bins`", bin.display());
    bin
}

/// What the runtime gets back.
#[derive(Debug)]
struct Invocation {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Invocation {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }

    /// The CNI error object, after checking the plugin failed.
    fn error(&self) -> Value {
        assert_ne!(self.code, 0, "expected the plugin to fail: {self:?}");
        let err = self.json();
        assert!(err["code"].is_u64() && err["msg"].is_string(), "not a CNI error: {err}");
        err
    }
}

/// The sandbox a runtime describes to the plugin.
struct Sandbox {
    container_id: String,
    netns: PathBuf,
    /// `CNI_ARGS` as containerd builds it; empty for a non-Kubernetes caller.
    args: String,
}

impl Sandbox {
    fn of_pod(pod: &Pod) -> Sandbox {
        Sandbox {
            container_id: format!("{:x}", std::process::id()) + "c0ffee",
            netns: pod.netns_path(),
            args: format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID=c0ffee;K8S_POD_UID={}",
                pod.namespace, pod.name, pod.uid
            ),
        }
    }

    fn kubernetes(netns: &Path) -> Sandbox {
        Sandbox {
            container_id: "3f2a9c".into(),
            netns: netns.to_path_buf(),
            args: "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=3f2a9c;\
                   K8S_POD_UID=1b4e28ba-2fa1-11d2-883f-0016d3cca427"
                .into(),
        }
    }
}

/// Runs the plugin as libcni does: a clean environment with the `CNI_*` variables and PATH, config on stdin.
fn invoke(command: &str, sandbox: &Sandbox, stdin: &Value) -> Invocation {
    let mut child = Command::new(cni_bin())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &sandbox.container_id)
        .env("CNI_NETNS", &sandbox.netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", &sandbox.args)
        .env("CNI_PATH", "/opt/cni/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting meshcap-cni");
    child.stdin.take().unwrap().write_all(stdin.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    Invocation {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// What the bridge plugin (with host-local IPAM) reports for a pod at `ip` in `netns`.
fn bridge_result(netns: &Path, ip: &str) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "cni0", "mac": "36:b2:8f:0c:5e:21"},
            {"name": "veth3c8f2a1b", "mac": "9a:1e:44:03:7d:10"},
            {"name": "eth0", "mac": "0a:58:0a:f4:00:05", "sandbox": netns}
        ],
        "ips": [{"interface": 2, "address": format!("{ip}/24"), "gateway": "10.244.0.1"}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.0.1"}],
        "dns": {}
    })
}

/// The runtime's view of meshcap's entry in the list: list-level keys plus the entry, plus the previous result.
fn netconf(socket: &Path, prev: Option<&Value>, extra: Value) -> Value {
    let mut conf = json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "meshcap-cni",
                          "agentSocket": socket, "timeoutSeconds": 30});
    if let Some(prev) = prev {
        conf["prevResult"] = prev.clone();
    }
    for (k, v) in extra.as_object().unwrap() {
        conf[k] = v.clone();
    }
    conf
}

/// A directory of the test's own, removed on drop (also when the test panics).
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("mc-cni-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn without_the_agent_add_fails_closed_and_del_version_status_behave() {
    let dir = TempDir::new("noagent");
    let socket = dir.0.join("meshcap/cni.sock");
    let netns = Path::new("/var/run/netns/cni-3f2a9c");
    let prev = bridge_result(netns, "10.244.0.5");
    let pod = Sandbox::kubernetes(netns);

    let add = invoke("ADD", &pod, &netconf(&socket, Some(&prev), json!({})));
    let err = add.error();
    assert_eq!(err["code"], 11, "try again later: {err}");
    assert_eq!(err["cniVersion"], "1.0.0");
    let msg = err["msg"].as_str().unwrap();
    assert!(msg.contains(&socket.display().to_string()) && msg.contains("shop/web-0"), "{msg}");
    assert!(add.stderr.contains("meshcap-cni:"), "the failure is logged too: {add:?}");

    let status = invoke("STATUS", &pod, &netconf(&socket, None, json!({})));
    let err = status.error();
    assert_eq!(err["code"], 50, "{err}");
    assert!(err["msg"].as_str().unwrap().contains(&socket.display().to_string()), "{err}");

    let del = invoke("DEL", &pod, &netconf(&socket, Some(&prev), json!({})));
    assert_eq!((del.code, del.stdout.as_str()), (0, ""), "DEL tolerates a missing agent: {del:?}");

    let version = invoke("VERSION", &pod, &json!({"cniVersion": "1.0.0"}));
    assert_eq!(version.code, 0, "{version:?}");
    assert_eq!(version.json()["supportedVersions"], json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]));

    // podman, a test rig: no pod named, so no agent asked and nothing held up.
    let plain = Sandbox { args: String::new(), ..Sandbox::kubernetes(netns) };
    let passthrough = invoke("ADD", &plain, &netconf(&socket, Some(&prev), json!({"cniVersion": "1.1.0"})));
    assert_eq!(passthrough.code, 0, "{passthrough:?}");
    let mut expected = prev.clone();
    expected["cniVersion"] = "1.1.0".into();
    assert_eq!(passthrough.json(), expected);
    let excluded = invoke("ADD", &pod, &netconf(&socket, Some(&prev), json!({"excludeNamespaces": ["shop"]})));
    assert_eq!((excluded.code, excluded.json()), (0, prev.clone()));

    let bad = invoke("ADD", &pod, &netconf(&socket, Some(&prev), json!({"timeoutSeconds": "soon"})));
    let err = bad.error();
    assert_eq!(err["code"], 7);
    assert!(err["msg"].as_str().unwrap().contains("timeoutSeconds"), "{err}");
}

/// Records what the plugin asked; answers ADD with `fail_with` when set, stalls ADD when `stall`.
#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<Op>>,
    fail_with: Mutex<Option<String>>,
    stall: Mutex<bool>,
}

impl Handler for Recorder {
    async fn add(&self, req: AddRequest) -> Result<AddOutcome, String> {
        self.seen.lock().unwrap().push(Op::Add(req));
        let stall = *self.stall.lock().unwrap();
        if stall {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        let fail = self.fail_with.lock().unwrap().clone();
        fail.map_or(Ok(AddOutcome::Captured), Err)
    }

    async fn del(&self, req: DelRequest) -> Result<(), String> {
        self.seen.lock().unwrap().push(Op::Del(req));
        Ok(())
    }

    async fn check(&self, req: CheckRequest) -> Result<AddOutcome, String> {
        self.seen.lock().unwrap().push(Op::Check(req));
        Ok(AddOutcome::Captured)
    }

    fn status(&self) -> Result<(), String> {
        Ok(())
    }
}

impl Recorder {
    fn take(&self) -> Vec<Op> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

#[test]
fn add_through_the_agent_socket_passes_the_result_on_and_reports_the_agents_error() {
    if !privileged_or_skip() {
        return;
    }
    let node = Node::new("cni_add");
    let pod = node.add_pod("web");
    let socket = node.scratch_dir().join("run/meshcap/cni.sock");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let handler = Arc::new(Recorder::default());
    let _server = {
        let _in_runtime = runtime.enter();
        server::serve(&socket, handler.clone()).expect("serving the CNI socket")
    };
    let sandbox = Sandbox::of_pod(&pod);
    let prev = bridge_result(&pod.netns_path(), &pod.ip4().to_string());
    let conf = netconf(&socket, Some(&prev), json!({}));

    let add = invoke("ADD", &sandbox, &conf);
    assert_eq!(add.code, 0, "{add:?}");
    assert_eq!(add.json(), prev, "the previous result, unchanged");
    let expected = AddRequest {
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        uid: pod.uid.clone(),
        netns: pod.netns_path(),
        container_id: sandbox.container_id.clone(),
        ifname: "eth0".into(),
    };
    assert_eq!(handler.take(), [Op::Add(expected.clone())]);

    let check = invoke("CHECK", &sandbox, &conf);
    assert_eq!((check.code, check.stdout.as_str()), (0, ""), "{check:?}");
    assert_eq!(handler.take(), [Op::Check(expected.clone())]);
    let status = invoke("STATUS", &sandbox, &netconf(&socket, None, json!({})));
    assert_eq!((status.code, status.stdout.as_str()), (0, ""), "{status:?}");
    let del = invoke("DEL", &sandbox, &conf);
    assert_eq!((del.code, del.stdout.as_str()), (0, ""), "{del:?}");
    let seen = handler.take();
    let [Op::Del(d)] = seen.as_slice() else { panic!("{seen:?}") };
    assert_eq!((d.uid.as_str(), d.netns.as_deref()), (pod.uid.as_str(), Some(pod.netns_path().as_path())));

    *handler.fail_with.lock().unwrap() = Some(format!("netns {} has no cgroup yet", pod.netns_path().display()));
    let err = invoke("ADD", &sandbox, &conf).error();
    assert_eq!(err["code"], 101, "{err}");
    assert_eq!(
        err["msg"],
        format!(
            "the meshcap agent could not capture pod default/web: netns {} has no cgroup yet",
            pod.netns_path().display()
        )
    );

    // An agent that does not answer in time: the configured timeout, not a hang.
    *handler.stall.lock().unwrap() = true;
    let started = Instant::now();
    let err = invoke("ADD", &sandbox, &netconf(&socket, Some(&prev), json!({"timeoutSeconds": 1}))).error();
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    assert_eq!(err["code"], 11, "{err}");
    assert!(err["msg"].as_str().unwrap().contains("did not answer within 1s"), "{err}");
}

/// The hooks an enrolled pod's cgroup carries, as bpftool names them.
const POD_HOOKS: [&str; 5] = [
    "cgroup_inet4_connect",
    "cgroup_inet4_getpeername",
    "cgroup_inet6_connect",
    "cgroup_inet6_getpeername",
    "cgroup_sock_ops",
];

#[test]
fn the_plugin_has_the_agent_capture_a_pod_before_its_app_makes_a_first_connection() {
    if !privileged_or_skip() {
        return;
    }
    let s = Scenario::new("cni_e2e");
    let server = s.node.add_pod("server");
    let mut app = s.node.add_pod("app");
    enroll(&mut app);
    let mut plain = s.node.add_pod("plain");
    let mut half = s.node.add_pod("half");
    half.labels.insert(INJECT.into(), "true".into());
    // As a Kubernetes source sees a pod whose sandbox is being set up: its cgroup exists, but it has no process
    // yet, so the agent cannot find its network namespace by itself. Only the plugin can name it.
    for pod in [&mut app, &mut plain, &mut half] {
        pod.annotations.insert(CGROUP_ANNOTATION.into(), pod.cgroup_dir().display().to_string());
    }
    s.write_pods(&[&server], &[&app, &plain, &half]);
    let socket = s.node.scratch_dir().join("run/meshcap/cni.sock");
    let agent = s.start_agent(&["--cni-socket", socket.to_str().unwrap()]);
    let web = LoggedServer::start(&s, &server, 8080, "served");
    assert!(wait_until(WAIT, || socket.exists()), "the agent never opened {}:\n{}", socket.display(), agent.logs());
    assert!(wait_until(WAIT, || agent.pod_status("app").is_some()), "the agent never listed app:\n{}", agent.logs());
    // Listed, and the snapshot fully applied: until then ADD is refused ("retry shortly").
    let ready = || meshcap_agent::cni::client::call(&socket, Duration::from_secs(5), Op::Status);
    assert!(wait_until(WAIT, || ready().is_ok_and(|r| r == Reply::Ready)), "{:?}", ready());
    let waiting = wait_until(WAIT, || agent.pod_status("app").is_some_and(|p| p["captured"] == false));
    assert!(waiting, "no netns yet, so no capture yet: {:?}", agent.pod_status("app"));
    assert!(app.pids().is_empty() && attached(&app.cgroup_dir()).is_empty());

    let prev = bridge_result(&app.netns_path(), &app.ip4().to_string());
    let add = invoke("ADD", &Sandbox::of_pod(&app), &netconf(&socket, Some(&prev), json!({})));
    assert_eq!(add.code, 0, "{add:?}\n{}", agent.logs());
    assert_eq!(add.json(), prev);
    // Captured when ADD returns, before any container of the pod runs: not eventually.
    assert_eq!(agent.pod_status("app").unwrap()["captured"], true, "{:?}", agent.pod_status("app"));
    assert_eq!(attached(&app.cgroup_dir()), POD_HOOKS);

    // The app starts and its very first connection goes through the engine.
    assert_eq!(curl(&app, &format!("http://{}:8080/", server.ip4())), (0, "served".into()));
    assert!(wait_until(WAIT, || agent.outbound("app", "relayed") == 1), "{:?}", agent.pod_status("app"));
    assert_eq!(web.wait_peers(1), [app.ip4().to_string()], "relayed from inside the pod, with its own address");
    let check = invoke("CHECK", &Sandbox::of_pod(&app), &netconf(&socket, Some(&prev), json!({})));
    assert_eq!((check.code, check.stdout.as_str()), (0, ""), "{check:?}");

    // A pod that does not ask for the mesh starts as it would without meshcap.
    let prev = bridge_result(&plain.netns_path(), &plain.ip4().to_string());
    let add = invoke("ADD", &Sandbox::of_pod(&plain), &netconf(&socket, Some(&prev), json!({})));
    assert_eq!((add.code, add.json()), (0, prev), "{add:?}");
    assert!(attached(&plain.cgroup_dir()).is_empty());

    // One asking for injection without an identity cannot be captured: its setup fails, saying why.
    let prev = bridge_result(&half.netns_path(), &half.ip4().to_string());
    let err = invoke("ADD", &Sandbox::of_pod(&half), &netconf(&socket, Some(&prev), json!({}))).error();
    assert_eq!(err["code"], 101, "{err}");
    let msg = err["msg"].as_str().unwrap();
    assert!(msg.contains("default/half") && msg.contains("spire-managed-identity"), "{msg}");
    assert!(attached(&half.cgroup_dir()).is_empty());
}
