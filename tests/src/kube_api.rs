//! A fake Kubernetes API server for the agent's Kubernetes pod source: real HTTP on 127.0.0.1, real JSON as the
//! API server sends it (lists with `metadata.resourceVersion`, `?watch=true` streams of ADDED / MODIFIED / DELETED
//! / BOOKMARK / ERROR lines, Status objects for errors), label and field selectors with `=` and `!=`, one pod by
//! name, PeerAuthentications under the `security.istio.io` versions a test chooses, ConfigMaps, and controls for what a real
//! cluster does to its clients: an expired watch (410 Gone), bookmarks, an API server that is down.
//!
//! The agent under test is the real binary, configured as in a cluster except that its kubeconfig points here.

mod http;
mod store;

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::Path,
    sync::{atomic::Ordering, Arc, Mutex},
};

use serde_json::{json, Value};

use crate::{bin_path, AgentOptions, Node, Pod};
use store::{Resource, Store};

const TOKEN: &str = "meshcap-test-token";

pub struct FakeApi {
    shared: Arc<http::Shared>,
    addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl FakeApi {
    /// Serves PeerAuthentication as `security.istio.io/v1` and `v1beta1`, like Istio ≥ 1.22.
    pub fn start() -> FakeApi {
        FakeApi::start_serving(&["v1", "v1beta1"])
    }

    /// Serves PeerAuthentication under these versions only; the others answer 404 (an older Istio's CRDs).
    pub fn start_serving(peer_auth_versions: &[&str]) -> FakeApi {
        let shared = Arc::new(http::Shared {
            store: Mutex::new(Store::default()),
            down: Default::default(),
            token: TOKEN.into(),
            peer_auth_versions: peer_auth_versions.iter().map(|v| v.to_string()).collect(),
            requests: Mutex::default(),
            refusals: Mutex::default(),
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime for the fake API server");
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("binding 127.0.0.1:0");
        let addr = listener.local_addr().expect("bound address");
        let app = http::router(shared.clone());
        runtime.spawn(async move { axum::serve(listener, app).await });
        eprintln!("fake API server at http://{addr}");
        FakeApi { shared, addr, runtime: Some(runtime) }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.shared.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates or replaces a pod (ADDED / MODIFIED for watchers); returns its new resourceVersion.
    pub fn put_pod(&self, pod: Value) -> u64 {
        self.store().put(Resource::Pods, pod)
    }

    /// Stores a pod that only a GET by name finds: no list or watch shows it, as for a pod the kubelet is setting
    /// up before the watches have delivered it. `put_pod` later publishes it.
    pub fn put_pod_unlisted(&self, pod: Value) -> u64 {
        self.store().put_unlisted(Resource::Pods, pod)
    }

    /// Answers every GET of this one pod with `code` (403: the API server's RBAC refusal), or again normally
    /// with None. Lists and watches of pods are untouched.
    pub fn refuse_pod_get(&self, namespace: &str, name: &str, code: Option<u16>) {
        self.refuse(&format!("/api/v1/namespaces/{namespace}/pods/{name}"), code);
    }

    /// Answers every PeerAuthentication request, any version, with `code` (or normally again with None), and
    /// ends the running PeerAuthentication watches, so the agent's next watch meets it as after an RBAC change.
    pub fn refuse_peer_authentications(&self, code: Option<u16>) {
        for version in ["v1", "v1beta1"] {
            self.refuse(&format!("/apis/security.istio.io/{version}/peerauthentications"), code);
        }
        if code.is_some() {
            self.store().close_watches_of(Resource::PeerAuthentications);
        }
    }

    fn refuse(&self, path: &str, code: Option<u16>) {
        let mut refusals = self.shared.refusals.lock().unwrap_or_else(|p| p.into_inner());
        refusals.retain(|(p, _)| p != path);
        if let Some(code) = code {
            let code = axum::http::StatusCode::from_u16(code).expect("an HTTP status code");
            refusals.push((path.to_string(), code));
        }
    }

    pub fn delete_pod(&self, namespace: &str, name: &str) -> Option<u64> {
        self.store().delete(Resource::Pods, namespace, name)
    }

    pub fn put_peer_authentication(&self, pa: Value) -> u64 {
        self.store().put(Resource::PeerAuthentications, pa)
    }

    pub fn put_config_map(&self, cm: Value) -> u64 {
        self.store().put(Resource::ConfigMaps, cm)
    }

    pub fn resource_version(&self) -> u64 {
        self.store().resource_version()
    }

    /// While down, every request is answered 503 and running watches end.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
        if down {
            self.store().close_watches();
        }
    }

    /// Compacts history: running watches get an ERROR event with code 410 and end, and a watch resuming from an
    /// older resourceVersion gets the same, so the client must list again.
    pub fn expire_watches(&self) {
        self.store().expire();
    }

    /// Sends a BOOKMARK with the current resourceVersion on every running watch that allowed bookmarks.
    pub fn bookmark(&self) {
        self.store().bookmark();
    }

    /// Ends every running watch cleanly, as the API server's watch timeout does.
    pub fn close_watches(&self) {
        self.store().close_watches();
    }

    pub fn running_watches(&self) -> usize {
        self.store().running_watches()
    }

    /// Every request so far, as `GET /path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.shared.requests.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A kubeconfig for this server, as `kubectl` would read it.
    pub fn write_kubeconfig(&self, path: &Path) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\nusers:\n- name: agent\n  \
             user:\n    token: {TOKEN}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: agent\n\
             current-context: fake\n",
            self.url()
        );
        std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }

    /// Options for the real agent reading this API server as node `node_name`, with the node's kubelet cgroup root.
    /// The harness passes `--pods FILE`; a small wrapper in the node's scratch dir swaps it for the Kubernetes
    /// source and sets KUBECONFIG, and then execs the agent binary itself.
    pub fn agent_options(&self, node: &Node, node_name: &str) -> AgentOptions {
        let dir = node.scratch_dir();
        let kubeconfig = dir.join("kubeconfig");
        self.write_kubeconfig(&kubeconfig);
        let binary = bin_path("meshcap-agent", "MESHCAP_AGENT_BIN");
        let wrapper = dir.join("meshcap-agent-kubernetes");
        let mut script = String::from("#!/bin/sh\nset -e\n");
        script.push_str("if [ \"$1\" = run ] && [ \"$2\" = --pods ]; then shift 3; set -- run \"$@\"; fi\n");
        let _ = writeln!(script, "export KUBECONFIG={}", sh_quote(&kubeconfig));
        let _ = writeln!(
            script,
            "exec {} \"$@\" --kubernetes --node-name {} --cgroup-root {}",
            sh_quote(&binary),
            sh_quote(Path::new(node_name)),
            sh_quote(&node.kubelet_cgroup_root())
        );
        std::fs::write(&wrapper, script).expect("writing the agent wrapper");
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod the wrapper");
        let mut opts = AgentOptions::new(dir.join("unused-pods.yaml"));
        opts.binary = wrapper;
        opts
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn sh_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', "'\\''"))
}

/// The pod as the API server shows a running pod of `node_name`: labels and service account from the harness pod,
/// its IPs, QoS class BestEffort (the cgroup layout `Node::add_kube_pod` makes), a running container.
pub fn pod_object(pod: &Pod, node_name: &str) -> Value {
    let (ip4, ip6) = (pod.ip4().to_string(), pod.ip6().to_string());
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod.name, "namespace": pod.namespace, "uid": pod.uid,
            "labels": pod.labels, "annotations": pod.annotations,
            "creationTimestamp": "2026-01-01T00:00:00Z"
        },
        "spec": {
            "nodeName": node_name,
            "serviceAccountName": pod.service_account,
            "containers": [{"name": "app", "image": "meshcap.invalid/test-app"}]
        },
        "status": {
            "phase": "Running",
            "podIP": ip4,
            "podIPs": [{"ip": ip4}, {"ip": ip6}],
            "qosClass": "BestEffort",
            "containerStatuses": [{
                "name": "app", "image": "meshcap.invalid/test-app", "imageID": "", "ready": true, "restartCount": 0,
                "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
            }]
        }
    })
}

/// A `security.istio.io/v1` PeerAuthentication; `app`: the `app` label it selects (None: namespace-wide).
pub fn peer_authentication(namespace: &str, name: &str, app: Option<&str>, mode: &str) -> Value {
    let mut spec = json!({"mtls": {"mode": mode}});
    if let Some(app) = app {
        spec["selector"] = json!({"matchLabels": {"app": app}});
    }
    json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec
    })
}
