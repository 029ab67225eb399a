use std::{
    cell::RefCell,
    collections::HashMap,
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::{json, Value};

use super::*;
use crate::cni::{client::ClientError, protocol::Reply};

/// Records what the plugin asked and answers with a canned reply.
struct FakeAgent {
    reply: RefCell<Option<Result<Reply, ClientError>>>,
    calls: RefCell<Vec<(PathBuf, Duration, Op)>>,
}

impl FakeAgent {
    fn answering(reply: Result<Reply, ClientError>) -> FakeAgent {
        FakeAgent { reply: RefCell::new(Some(reply)), calls: RefCell::new(Vec::new()) }
    }

    fn unreachable(socket: &str) -> FakeAgent {
        FakeAgent::answering(Err(ClientError::Connect {
            socket: socket.into(),
            source: io::Error::from(io::ErrorKind::NotFound),
        }))
    }

    fn calls(&self) -> Vec<(PathBuf, Duration, Op)> {
        self.calls.borrow().clone()
    }
}

impl Agent for FakeAgent {
    fn call(&self, socket: &Path, timeout: Duration, op: Op) -> Result<Reply, ClientError> {
        self.calls.borrow_mut().push((socket.to_path_buf(), timeout, op));
        self.reply.borrow_mut().take().expect("the plugin asked the agent once")
    }
}

const ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;\
                    K8S_POD_INFRA_CONTAINER_ID=abc123;K8S_POD_UID=1b4e28ba-2fa1-11d2-883f-0016d3cca427";

fn env(command: &str, args: &str) -> HashMap<String, String> {
    [
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", "abc123"),
        ("CNI_NETNS", "/var/run/netns/cni-42"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", args),
        ("CNI_PATH", "/opt/cni/bin"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn prev_result() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "mac": "0a:58:0a:f4:00:05", "sandbox": "/var/run/netns/cni-42"}],
        "ips": [{"address": "10.244.0.5/24", "gateway": "10.244.0.1", "interface": 0}],
        "dns": {}
    })
}

fn conf(extra: Value) -> Vec<u8> {
    let mut conf = json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "meshcap-cni",
                          "prevResult": prev_result()});
    for (k, v) in extra.as_object().unwrap() {
        conf[k] = v.clone();
    }
    serde_json::to_vec(&conf).unwrap()
}

fn run_with(env: &HashMap<String, String>, stdin: &[u8], agent: &FakeAgent) -> Output {
    run(|k| env.get(k).cloned(), stdin, agent)
}

fn error_of(out: &Output) -> Value {
    assert_ne!(out.exit_code, 0, "expected a failure: {out:?}");
    serde_json::from_str(&out.stdout).expect("a CNI error object on stdout")
}

#[test]
fn add_asks_the_agent_and_passes_the_previous_result_on() {
    let agent = FakeAgent::answering(Ok(Reply::Pod(AddOutcome::Captured)));
    let out =
        run_with(&env("ADD", ARGS), &conf(json!({"agentSocket": "/run/mc/cni.sock", "timeoutSeconds": 7})), &agent);
    assert_eq!(out.exit_code, 0, "{out:?}");
    assert_eq!(serde_json::from_str::<Value>(&out.stdout).unwrap(), prev_result());
    let calls = agent.calls();
    assert_eq!(calls.len(), 1);
    let (socket, timeout, op) = &calls[0];
    assert_eq!(socket, Path::new("/run/mc/cni.sock"));
    assert_eq!(*timeout, Duration::from_secs(7));
    assert_eq!(
        *op,
        Op::Add(AddRequest {
            namespace: "shop".into(),
            name: "web-0".into(),
            uid: "1b4e28ba-2fa1-11d2-883f-0016d3cca427".into(),
            netns: "/var/run/netns/cni-42".into(),
            container_id: "abc123".into(),
            ifname: "eth0".into(),
        })
    );
}

#[test]
fn add_result_takes_the_configuration_version() {
    let agent = FakeAgent::answering(Ok(Reply::Pod(AddOutcome::NotEnrolled { reason: "no labels".into() })));
    let out = run_with(&env("ADD", ARGS), &conf(json!({"cniVersion": "1.1.0"})), &agent);
    let result: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(result["cniVersion"], "1.1.0");
    assert_eq!(result["ips"], prev_result()["ips"]);
    assert_eq!(agent.calls()[0].0, Path::new(crate::cni::DEFAULT_AGENT_SOCKET));
    assert_eq!(agent.calls()[0].1, Duration::from_secs(30), "the default timeout");
}

#[test]
fn an_unreachable_agent_fails_add_naming_the_socket() {
    let agent = FakeAgent::unreachable("/run/mc/cni.sock");
    let out = run_with(&env("ADD", ARGS), &conf(json!({"agentSocket": "/run/mc/cni.sock"})), &agent);
    let err = error_of(&out);
    assert_eq!(err["code"], codes::TRY_AGAIN_LATER);
    assert_eq!(err["cniVersion"], "1.0.0");
    let msg = err["msg"].as_str().unwrap();
    assert!(msg.contains("/run/mc/cni.sock") && msg.contains("shop/web-0"), "{msg}");
    assert!(err["details"].as_str().unwrap().contains("fails closed"), "{err}");
}

#[test]
fn agent_errors_and_timeouts_map_to_their_codes() {
    let refused = FakeAgent::answering(Ok(Reply::Error { message: "netns /x is gone".into() }));
    let err = error_of(&run_with(&env("ADD", ARGS), &conf(json!({})), &refused));
    assert_eq!(err["code"], codes::ENROLL_FAILED);
    assert_eq!(err["msg"], "the meshcap agent could not capture pod shop/web-0: netns /x is gone");

    let slow = FakeAgent::answering(Err(ClientError::Timeout { socket: "/s".into(), timeout: Duration::from_secs(3) }));
    let err = error_of(&run_with(&env("ADD", ARGS), &conf(json!({})), &slow));
    assert_eq!(err["code"], codes::TRY_AGAIN_LATER);
    assert!(err["msg"].as_str().unwrap().contains("did not answer within 3s"), "{err}");

    let garbled = FakeAgent::answering(Err(ClientError::Protocol { socket: "/s".into(), reason: "not JSON".into() }));
    assert_eq!(error_of(&run_with(&env("ADD", ARGS), &conf(json!({})), &garbled))["code"], codes::AGENT_PROTOCOL);

    let wrong = FakeAgent::answering(Ok(Reply::Deleted));
    assert_eq!(error_of(&run_with(&env("ADD", ARGS), &conf(json!({})), &wrong))["code"], codes::AGENT_PROTOCOL);
}

#[test]
fn non_kubernetes_and_excluded_pods_pass_through_without_the_agent() {
    for (args, extra) in [
        ("", json!({})),
        ("IgnoreUnknown=1;FOO=bar", json!({})),
        (ARGS, json!({"excludeNamespaces": ["kube-system", "shop"]})),
    ] {
        let agent = FakeAgent::unreachable("/nowhere");
        let out = run_with(&env("ADD", args), &conf(extra), &agent);
        assert_eq!(out.exit_code, 0, "{args}: {out:?}");
        assert_eq!(serde_json::from_str::<Value>(&out.stdout).unwrap(), prev_result());
        assert!(agent.calls().is_empty(), "{args}: the agent was asked");
    }
}

#[test]
fn add_without_prev_result_or_uid_is_a_clear_error() {
    let agent = FakeAgent::unreachable("/nowhere");
    let stdin = serde_json::to_vec(&json!({"cniVersion": "1.0.0", "name": "n", "type": "meshcap-cni"})).unwrap();
    let err = error_of(&run_with(&env("ADD", ARGS), &stdin, &agent));
    assert_eq!(err["code"], codes::INVALID_CONFIG);
    assert!(err["msg"].as_str().unwrap().contains("prevResult"), "{err}");

    let err = error_of(&run_with(&env("ADD", "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0"), &conf(json!({})), &agent));
    assert_eq!(err["code"], codes::INVALID_ENV);
    assert!(
        err["msg"].as_str().unwrap().contains("K8S_POD_UID") && err["msg"].as_str().unwrap().contains("shop/web-0")
    );
    assert!(agent.calls().is_empty());
}

#[test]
fn bad_configuration_names_the_field() {
    let agent = FakeAgent::unreachable("/nowhere");
    let cases = [
        (json!({"timeoutSeconds": "30s"}), codes::INVALID_CONFIG, "timeoutSeconds"),
        (json!({"timeoutSeconds": 0}), codes::INVALID_CONFIG, "timeoutSeconds"),
        (json!({"agentSocket": "relative/cni.sock"}), codes::INVALID_CONFIG, "agentSocket"),
        (json!({"excludeNamespaces": "kube-system"}), codes::INVALID_CONFIG, "excludeNamespaces"),
        (json!({"prevResult": [1]}), codes::INVALID_CONFIG, "prevResult"),
        (json!({"cniVersion": "0.2.0"}), codes::INCOMPATIBLE_VERSION, "0.2.0"),
        (json!({"cniVersion": 1}), codes::INVALID_CONFIG, "cniVersion"),
    ];
    for (extra, code, needle) in cases {
        let err = error_of(&run_with(&env("ADD", ARGS), &conf(extra.clone()), &agent));
        assert_eq!(err["code"], code, "{extra}: {err}");
        assert!(err["msg"].as_str().unwrap().contains(needle), "{extra}: {err}");
    }
    let err = error_of(&run_with(&env("ADD", ARGS), b"{not json", &agent));
    assert_eq!(err["code"], codes::DECODE);
    assert!(agent.calls().is_empty());
}

#[test]
fn bad_environment_names_the_variable() {
    let agent = FakeAgent::unreachable("/nowhere");
    let mut e = env("ADD", ARGS);
    e.remove("CNI_NETNS");
    let err = error_of(&run_with(&e, &conf(json!({})), &agent));
    assert_eq!(err["code"], codes::INVALID_ENV);
    assert!(err["msg"].as_str().unwrap().contains("CNI_NETNS"), "{err}");

    for (var, value) in [("CNI_CONTAINERID", "-bad id"), ("CNI_NETNS", "netns"), ("CNI_ARGS", "K8S_POD_NAME")] {
        let mut e = env("ADD", ARGS);
        e.insert(var.into(), value.into());
        let err = error_of(&run_with(&e, &conf(json!({})), &agent));
        assert_eq!(err["code"], codes::INVALID_ENV, "{var}");
        assert!(err["msg"].as_str().unwrap().contains(var), "{var}: {err}");
    }
    let err = error_of(&run_with(&env("FROB", ARGS), &conf(json!({})), &agent));
    assert!(err["msg"].as_str().unwrap().contains("CNI_COMMAND"), "{err}");
    let err = error_of(&run_with(&HashMap::new(), b"", &agent));
    assert!(err["msg"].as_str().unwrap().contains("CNI_COMMAND"), "{err}");
    assert!(agent.calls().is_empty());
}

#[test]
fn del_succeeds_whatever_happens() {
    let agent = FakeAgent::answering(Ok(Reply::Deleted));
    let mut e = env("DEL", ARGS);
    e.remove("CNI_NETNS");
    let out = run_with(&e, &conf(json!({})), &agent);
    assert_eq!((out.exit_code, out.stdout.as_str()), (0, ""));
    let (_, timeout, op) = &agent.calls()[0];
    assert!(*timeout <= Duration::from_secs(5), "DEL must not wait long: {timeout:?}");
    let Op::Del(del) = op else { panic!("{op:?}") };
    assert_eq!((del.namespace.as_str(), del.name.as_str(), del.netns.as_ref()), ("shop", "web-0", None));

    for agent in [FakeAgent::unreachable("/nowhere"), FakeAgent::answering(Ok(Reply::Error { message: "x".into() }))] {
        let out = run_with(&env("DEL", ARGS), &conf(json!({})), &agent);
        assert_eq!((out.exit_code, out.stdout.as_str()), (0, ""), "{out:?}");
        assert_eq!(out.stderr.len(), 1, "the failure is still said on stderr");
    }
    let out = run_with(&env("DEL", ARGS), b"garbage", &FakeAgent::unreachable("/nowhere"));
    assert_eq!(out.exit_code, 0);
}

#[test]
fn check_fails_when_the_agent_says_the_pod_is_not_captured() {
    let ok = FakeAgent::answering(Ok(Reply::Pod(AddOutcome::Captured)));
    let out = run_with(&env("CHECK", ARGS), &conf(json!({})), &ok);
    assert_eq!((out.exit_code, out.stdout.as_str()), (0, ""));
    assert!(matches!(ok.calls()[0].2, Op::Check(_)));

    let bad = FakeAgent::answering(Ok(Reply::Error { message: "capture was removed".into() }));
    let err = error_of(&run_with(&env("CHECK", ARGS), &conf(json!({})), &bad));
    assert_eq!(err["code"], codes::NOT_CAPTURED);
    assert!(err["msg"].as_str().unwrap().contains("shop/web-0") && err["msg"].as_str().unwrap().contains("removed"));
}

#[test]
fn version_and_status() {
    let agent = FakeAgent::unreachable("/nowhere");
    let out = run_with(&env("VERSION", ""), b"", &agent);
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["supportedVersions"], json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]));
    assert_eq!(out.exit_code, 0);

    let err = error_of(&run_with(&env("STATUS", ""), &conf(json!({"agentSocket": "/run/mc/x.sock"})), &agent));
    assert_eq!(err["code"], codes::PLUGIN_NOT_AVAILABLE);
    assert!(err["msg"].as_str().unwrap().contains("/nowhere"), "{err}");

    let up = FakeAgent::answering(Ok(Reply::Ready));
    let out = run_with(&env("STATUS", ""), &conf(json!({})), &up);
    assert_eq!((out.exit_code, out.stdout.as_str()), (0, ""));
    assert_eq!(up.calls()[0].2, Op::Status);

    let out = run_with(&env("GC", ""), &conf(json!({})), &FakeAgent::unreachable("/nowhere"));
    assert_eq!(out.exit_code, 0);
}
