//! deploy/ checked without a cluster (plain `cargo test`, no root): every manifest is read strictly as the
//! Kubernetes type it names, custom resources against their published CRD schemas, the Helm chart is rendered
//! and its objects checked the same way, and the facts the security of the installation rests on are asserted
//! (capabilities, sockets, RBAC, identities, trust domains). What needs a cluster is deploy/kind/up.sh.

#[path = "../src/manifests_crd.rs"]
mod crd;
#[path = "../src/manifests_render.rs"]
mod render;
#[path = "../src/manifests_strict.rs"]
mod strict;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use clap::CommandFactory as _;
use serde::Deserialize;
use serde_json::{json, Value};
use strict::{at, check_builtin, parse_docs, strict_metadata, Doc, Schema};

const TRUST_DOMAIN: &str = "democluster.internal";
const AGENT_NAMESPACE: &str = "meshcap-system";
const AGENT_ID: &str = "spiffe://democluster.internal/ns/meshcap-system/sa/meshcap-agent";
const SPIFFE_ID_TEMPLATE: &str =
    "spiffe://{{ .TrustDomain }}/ns/{{ .PodMeta.Namespace }}/sa/{{ .PodSpec.ServiceAccountName }}";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn deploy() -> PathBuf {
    root().join("deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml(path: &Path) -> Value {
    serde_norway::from_str(&read(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// YAML files under deploy/ that are not Kubernetes objects, with what they are.
fn non_manifest(rel: &str) -> Option<&'static str> {
    match rel {
        "charts/meshcap/Chart.yaml" => Some("chart metadata"),
        "charts/meshcap/values.yaml" | "kind/meshcap-values.yaml" => Some("chart values"),
        "istio/istiod-values.yaml" => Some("istiod chart values"),
        "kind/cluster.yaml" => Some("kind cluster config"),
        _ => None,
    }
}

/// Every YAML file under deploy/ but deploy/local (the agent's pods file, tested with the agent) and chart
/// templates (rendered below).
fn deploy_yaml_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("directory entry").path())
            .collect();
        entries.sort();
        for p in entries {
            let rel = p.strip_prefix(deploy()).expect("under deploy").to_string_lossy().into_owned();
            if rel == "local" || rel.ends_with("/templates") {
                continue;
            }
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&deploy(), &mut out);
    out
}

/// Every Kubernetes object in deploy/ (not the chart).
fn deploy_docs() -> Vec<Doc> {
    let mut docs = Vec::new();
    for file in deploy_yaml_files() {
        let rel = file.strip_prefix(deploy()).expect("under deploy").to_string_lossy().into_owned();
        if non_manifest(&rel).is_none() {
            docs.extend(parse_docs(&file, &read(&file)).unwrap_or_else(|e| panic!("{e}")));
        }
    }
    docs
}

fn kind_values() -> Value {
    yaml(&deploy().join("kind/meshcap-values.yaml"))
}

/// The chart rendered as `helm template meshcap deploy/charts/meshcap -n meshcap-system [-f overrides]`:
/// its objects, and NOTES.txt.
fn chart(overrides: &[Value]) -> (Vec<Doc>, String) {
    let release = render::Release { name: "meshcap", namespace: AGENT_NAMESPACE };
    let rendered = render::render_chart(&deploy().join("charts/meshcap"), overrides, &release)
        .unwrap_or_else(|e| panic!("rendering the chart: {e}"));
    let mut docs = Vec::new();
    let mut notes = String::new();
    for r in rendered {
        if r.name == "NOTES.txt" {
            notes = r.text;
            continue;
        }
        let file = PathBuf::from(format!("deploy/charts/meshcap/templates/{} (rendered)", r.name));
        docs.extend(parse_docs(&file, &r.text).unwrap_or_else(|e| panic!("{e}\n--- rendered ---\n{}", r.text)));
    }
    (docs, notes)
}

fn crd_schema(name: &str) -> crd::CrdSchema {
    crd::CrdSchema::load(&root().join("tests/fixtures/crds").join(name)).unwrap_or_else(|e| panic!("{e}"))
}

/// Checks one object: built-in kinds strictly, custom resources against their CRD. Returns the problem.
fn check(doc: &Doc) -> Result<(), String> {
    match check_builtin(doc)? {
        Schema::Builtin => Ok(()),
        Schema::Custom { crd } => {
            strict_metadata(doc).map_err(|e| format!("{doc}: {e}"))?;
            crd_schema(crd).validate(doc)
        }
    }
}

fn find<'a>(docs: &'a [Doc], kind: &str, name: &str) -> &'a Doc {
    docs.iter()
        .find(|d| d.kind() == kind && d.name() == name)
        .unwrap_or_else(|| panic!("no {kind} {name} among {} objects", docs.len()))
}

fn container<'a>(workload: &'a Doc, name: &str) -> &'a Value {
    workload.value["spec"]["template"]["spec"]["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("{workload}: no container {name}"))
}

fn env_of(c: &Value) -> BTreeMap<String, Value> {
    c["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| (e["name"].as_str().expect("env name").to_string(), e.get("value").cloned().unwrap_or(Value::Null)))
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().into_iter().flatten().map(|s| s.as_str().expect("a string").to_string()).collect()
}

/// `key = value` at the start of a line of a SPIRE HCL config; list values are JSON-compatible.
fn hcl(text: &str, key: &str) -> Option<Value> {
    text.lines().find_map(|l| {
        let rest = l.trim().strip_prefix(key)?.trim_start().strip_prefix('=')?.trim();
        Some(serde_json::from_str(rest).unwrap_or_else(|_| Value::String(rest.to_string())))
    })
}

fn configmap_data(docs: &[Doc], name: &str, key: &str) -> String {
    find(docs, "ConfigMap", name).value["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("ConfigMap {name} has no data key {key}"))
        .to_string()
}

#[test]
fn every_manifest_is_its_kind_exactly() {
    let files = deploy_yaml_files();
    assert!(files.len() >= 10, "deploy/ has only {} YAML files", files.len());
    let mut problems = Vec::new();
    let mut kinds = BTreeSet::new();
    for file in &files {
        let rel = file.strip_prefix(deploy()).expect("under deploy").to_string_lossy().into_owned();
        let docs = match parse_docs(file, &read(file)) {
            Ok(docs) => docs,
            Err(e) => {
                problems.push(e);
                continue;
            }
        };
        if non_manifest(&rel).is_some() {
            continue;
        }
        assert!(!docs.is_empty(), "{rel} has no document");
        for doc in &docs {
            kinds.insert(doc.kind().to_string());
            if let Err(e) = check(doc) {
                problems.push(e);
            }
        }
    }
    assert!(problems.is_empty(), "invalid manifests:\n{}", problems.join("\n"));
    for kind in ["DaemonSet", "StatefulSet", "Deployment", "CSIDriver", "ClusterSPIFFEID", "PeerAuthentication"] {
        assert!(kinds.contains(kind), "no {kind} was checked (kinds seen: {kinds:?})");
    }
}

#[test]
fn mistakes_are_caught_with_the_field_named() {
    // A misspelled field in a built-in kind: k8s-openapi alone would drop it.
    let (docs, _) = chart(&[]);
    let mut ds = find(&docs, "DaemonSet", "meshcap-agent").clone();
    ds.value["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]["mountpropagation"] = json!("None");
    let err = check(&ds).expect_err("a misspelled field is an error");
    assert!(err.contains("unknown field .spec.template.spec.containers[0].volumeMounts[0].mountpropagation"), "{err}");

    // A wrong type.
    let mut ds = find(&docs, "DaemonSet", "meshcap-agent").clone();
    ds.value["spec"]["template"]["spec"]["hostPID"] = json!("yes");
    assert!(check(&ds).expect_err("hostPID must be a boolean").contains("invalid type"));

    // Custom resources: a misspelled spec field, an unknown mode, a bad metadata field.
    let docs = deploy_docs();
    let mut id = find(&docs, "ClusterSPIFFEID", "mesh-workloads").clone();
    let template = id.value["spec"].as_object_mut().expect("spec").remove("spiffeIDTemplate").expect("template");
    id.value["spec"]["spiffeIdTemplate"] = template;
    let err = check(&id).expect_err("misspelled spiffeIDTemplate");
    assert!(err.contains("spiffeIdTemplate") && err.contains("spiffeIDTemplate"), "{err}");

    let mut pa = find(&docs, "PeerAuthentication", "myapi").clone();
    pa.value["spec"]["mtls"]["mode"] = json!("STRIKT");
    let err = check(&pa).expect_err("unknown mode");
    assert!(err.contains("STRIKT") && err.contains("/spec/mtls/mode"), "{err}");

    let mut pa = find(&docs, "PeerAuthentication", "myapi").clone();
    pa.value["metadata"]["namepsace"] = json!("meshcap-sample");
    assert!(check(&pa).expect_err("bad metadata").contains("unknown field .namepsace"));

    let mut pa = find(&docs, "PeerAuthentication", "myapi").clone();
    pa.value["apiVersion"] = json!("security.istio.io/v2");
    assert!(check(&pa).expect_err("unserved version").contains("v2 is not served"));
}

#[test]
fn chart_renders_to_valid_objects_with_default_and_kind_values() {
    for (what, overrides) in [("default values", vec![]), ("deploy/kind/meshcap-values.yaml", vec![kind_values()])] {
        let (docs, notes) = chart(&overrides);
        let problems: Vec<String> = docs.iter().filter_map(|d| check(d).err()).collect();
        assert!(problems.is_empty(), "chart with {what}:\n{}", problems.join("\n"));
        let kinds: BTreeSet<&str> = docs.iter().map(Doc::kind).collect();
        let want: BTreeSet<&str> =
            ["DaemonSet", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Service"].into_iter().collect();
        assert_eq!(kinds, want, "chart with {what}");
        for d in &docs {
            let ns = d.value["metadata"]["namespace"].as_str();
            let cluster_scoped = matches!(d.kind(), "ClusterRole" | "ClusterRoleBinding");
            assert_eq!(ns, (!cluster_scoped).then_some(AGENT_NAMESPACE), "{d}: namespace");
        }
        assert!(notes.contains(AGENT_ID), "NOTES.txt names the delegate ID:\n{notes}");
        assert!(notes.contains("kubectl -n meshcap-system exec ds/meshcap-agent -c agent -- meshcap-agent status"));
    }
    // Every key the kind values set exists in the chart's values (a typo would be silently ignored by helm).
    let defaults = yaml(&deploy().join("charts/meshcap/values.yaml"));
    let mut keys = Vec::new();
    strict::leaf_paths(&kind_values(), "", &mut keys);
    for k in keys {
        assert!(at(&defaults, &k).is_some(), "deploy/kind/meshcap-values.yaml sets {k}, which the chart does not have");
    }
    // The kind values take effect.
    let (docs, _) = chart(&[kind_values()]);
    let agent = container(find(&docs, "DaemonSet", "meshcap-agent"), "agent");
    assert_eq!(agent["image"], "meshcap:dev");
    assert_eq!(agent["imagePullPolicy"], "Never");
    assert_eq!(env_of(agent)["MESHCAP_PIN_DIR"], "/sys/fs/bpf/meshcap-$(NODE_NAME)");
}

#[test]
fn agent_daemonset_has_exactly_the_documented_privileges() {
    let (docs, _) = chart(&[]);
    let ds = find(&docs, "DaemonSet", "meshcap-agent");
    let pod = &ds.value["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true, "pod netns are found through the host's /proc");
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["serviceAccountName"], "meshcap-agent");
    assert_eq!(
        ds.value["spec"]["updateStrategy"],
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}})
    );

    let agent = container(ds, "agent");
    let sc = &agent["securityContext"];
    assert_eq!(sc["privileged"], false, "capabilities, not privileged");
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    let caps: BTreeSet<String> = strings(&sc["capabilities"]["add"]).into_iter().collect();
    let want: BTreeSet<String> =
        ["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_RESOURCE", "SYS_PTRACE"].map(String::from).into_iter().collect();
    assert_eq!(caps, want, "the agent's capabilities are exactly the documented set");
    // Each added capability has its reason written next to it.
    let template = read(&deploy().join("charts/meshcap/templates/daemonset.yaml"));
    for cap in &want {
        let line = template.lines().position(|l| l.trim() == format!("- {cap}")).expect("capability line");
        let above = template.lines().nth(line - 1).expect("line above");
        assert!(above.trim_start().starts_with('#'), "capability {cap} has no comment saying why");
    }
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");

    let cni = container(ds, "install-cni");
    assert_eq!(strings(&cni["securityContext"]["capabilities"]["drop"]), ["ALL"]);
    assert!(cni["securityContext"]["capabilities"].get("add").is_none(), "install-cni needs no capability");
    let command = strings(&cni["command"]);
    assert_eq!(
        command.join(" "),
        "meshcap-cni install --bin-dir /host/opt/cni/bin --conf-dir /host/etc/cni/net.d \
         --agent-socket /var/run/meshcap/cni.sock --exclude-namespaces kube-system,spire-system --watch"
    );
    installer_takes(&command);

    // Volumes: host paths by name, and where each is mounted.
    let volumes: BTreeMap<String, Value> = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .map(|v| (v["name"].as_str().expect("volume name").to_string(), v.clone()))
        .collect();
    let mount = |c: &Value, vol: &str| -> Value {
        c["volumeMounts"]
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["name"] == vol).cloned())
            .unwrap_or_else(|| panic!("container {} does not mount {vol}", c["name"]))
    };
    assert_eq!(volumes["spire-admin"]["hostPath"]["path"], "/run/spire/admin");
    assert_eq!(mount(agent, "spire-admin")["mountPath"], "/run/spire/admin");
    assert_eq!(volumes["spiffe-workload-api"]["csi"], json!({"driver": "csi.spiffe.io", "readOnly": true}));
    assert_eq!(mount(agent, "spiffe-workload-api")["mountPath"], "/spiffe-workload-api");
    assert_eq!(volumes["bpffs"]["hostPath"]["path"], "/sys/fs/bpf");
    assert_eq!(mount(agent, "bpffs")["mountPath"], "/sys/fs/bpf");
    // CNI_NETNS paths are the host's: the agent must see them where the runtime made them.
    assert_eq!(mount(agent, "netns")["mountPath"], "/var/run/netns");
    assert_eq!(mount(agent, "netns")["mountPropagation"], "HostToContainer");
    assert_eq!(volumes["cgroup"]["hostPath"]["path"], "/sys/fs/cgroup");
    assert_eq!(volumes["run"]["hostPath"]["path"], "/var/run/meshcap");
    assert_eq!(volumes["cni-bin"]["hostPath"]["path"], "/opt/cni/bin");
    assert_eq!(mount(cni, "cni-bin")["mountPath"], "/host/opt/cni/bin");
    assert_eq!(volumes["cni-conf"]["hostPath"]["path"], "/etc/cni/net.d");
    assert_eq!(mount(cni, "cni-conf")["mountPath"], "/host/etc/cni/net.d");

    let env = env_of(agent);
    assert_eq!(env["MESHCAP_KUBERNETES"], "true");
    assert_eq!(env["SPIRE_ADMIN_ENDPOINT_SOCKET"], "unix:///run/spire/admin/admin.sock");
    assert_eq!(env["SPIFFE_ENDPOINT_SOCKET"], "unix:///spiffe-workload-api/spire-agent.sock");
    assert_eq!(env["MESHCAP_CNI_SOCKET"], "/var/run/meshcap/cni.sock");
    assert_eq!(env["MESHCAP_TRUST_DOMAIN"], TRUST_DOMAIN);
    assert_eq!(env["MESHCAP_ROOT_NAMESPACE"], "istio-system");
    assert_eq!(agent["env"][0]["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName", "NODE_NAME first");
    assert_eq!(env["MESHCAP_METRICS_ADDR"], "0.0.0.0:15020");
    let probe = &agent["readinessProbe"]["httpGet"];
    assert_eq!((probe["path"].as_str(), probe["port"].as_u64()), (Some("/healthz/ready"), Some(15021)));
    assert_eq!(env["MESHCAP_READINESS_ADDR"], format!("{}:15021", probe["host"].as_str().expect("probe host")));
}

/// Rules the API server applies that no schema expresses; manifests breaking them are refused at apply time.
#[test]
fn no_workload_breaks_the_api_servers_security_context_rules() {
    let (chart_docs, _) = chart(&[]);
    let all: Vec<Doc> = deploy_docs().into_iter().chain(chart_docs).collect();
    let mut checked = 0;
    for d in all.iter().filter(|d| matches!(d.kind(), "DaemonSet" | "Deployment" | "StatefulSet")) {
        for c in d.value["spec"]["template"]["spec"]["containers"].as_array().expect("containers") {
            checked += 1;
            let sc = &c["securityContext"];
            let privileged = sc["privileged"] == true;
            for m in c["volumeMounts"].as_array().into_iter().flatten() {
                assert!(
                    m["mountPropagation"] != "Bidirectional" || privileged,
                    "{d}: container {}: Bidirectional mount propagation is only allowed in privileged containers",
                    c["name"]
                );
            }
            let adds_sys_admin = strings(&sc["capabilities"]["add"]).iter().any(|c| c == "SYS_ADMIN");
            assert!(
                !(sc["allowPrivilegeEscalation"] == false && (privileged || adds_sys_admin)),
                "{d}: container {}: allowPrivilegeEscalation false with privileged or SYS_ADMIN is refused",
                c["name"]
            );
        }
    }
    assert!(checked >= 8, "only {checked} containers checked");
}

#[test]
fn agent_rbac_is_read_only_pods_and_peerauthentications() {
    let (docs, _) = chart(&[]);
    let role = find(&docs, "ClusterRole", "meshcap-agent");
    let mut granted = BTreeSet::new();
    for rule in role.value["rules"].as_array().expect("rules") {
        assert_eq!(strings(&rule["verbs"]), ["get", "list", "watch"], "only reads: {rule}");
        for group in strings(&rule["apiGroups"]) {
            for res in strings(&rule["resources"]) {
                granted.insert(format!("{group}/{res}"));
            }
        }
    }
    let want: BTreeSet<String> = ["/pods", "security.istio.io/peerauthentications"].map(String::from).into();
    assert_eq!(granted, want);
    let binding = find(&docs, "ClusterRoleBinding", "meshcap-agent");
    assert_eq!(binding.value["roleRef"]["name"], "meshcap-agent");
    assert_eq!(
        binding.value["subjects"],
        json!([{"kind": "ServiceAccount", "name": "meshcap-agent", "namespace": AGENT_NAMESPACE}])
    );
}

#[test]
fn identities_sockets_and_trust_domains_agree_everywhere() {
    let docs = deploy_docs();
    let server = configmap_data(&docs, "spire-server", "server.conf");
    let agent = configmap_data(&docs, "spire-agent", "agent.conf");
    let manager: Value = serde_norway::from_str(&configmap_data(
        &docs,
        "spire-controller-manager-config",
        "spire-controller-manager-config.yaml",
    ))
    .expect("controller manager config is YAML");
    let istiod = yaml(&deploy().join("istio/istiod-values.yaml"));
    let (chart_docs, _) = chart(&[]);
    let ds = find(&chart_docs, "DaemonSet", "meshcap-agent");
    let env = env_of(container(ds, "agent"));

    let domains = [
        ("SPIRE server trust_domain", hcl(&server, "trust_domain")),
        ("SPIRE agent trust_domain", hcl(&agent, "trust_domain")),
        ("controller manager trustDomain", manager.get("trustDomain").cloned()),
        ("istiod meshConfig.trustDomain", at(&istiod, "meshConfig.trustDomain").cloned()),
        ("meshcap MESHCAP_TRUST_DOMAIN", env.get("MESHCAP_TRUST_DOMAIN").cloned()),
    ];
    for (what, td) in domains {
        assert_eq!(td, Some(json!(TRUST_DOMAIN)), "{what}");
    }
    // One cluster name for node attestation and registration.
    assert!(server.contains("\"democluster\" = {"), "k8s_psat server cluster:\n{server}");
    assert_eq!(hcl(&agent, "cluster"), Some(json!("democluster")));
    assert_eq!(manager["clusterName"], "democluster");

    // The only authorized delegate is the identity the chart's service account gets.
    let sa_name = ds.value["spec"]["template"]["spec"]["serviceAccountName"].as_str().expect("service account");
    let ns = ds.value["metadata"]["namespace"].as_str().expect("namespace");
    assert_eq!(format!("spiffe://{TRUST_DOMAIN}/ns/{ns}/sa/{sa_name}"), AGENT_ID);
    assert_eq!(hcl(&agent, "authorized_delegates"), Some(json!([AGENT_ID])));

    // ClusterSPIFFEIDs: mesh pods by label, and the agent itself by its pod labels in its namespace.
    let mesh = find(&docs, "ClusterSPIFFEID", "mesh-workloads");
    assert_eq!(mesh.value["spec"]["spiffeIDTemplate"], SPIFFE_ID_TEMPLATE);
    assert_eq!(mesh.value["spec"]["podSelector"], json!({"matchLabels": {"spire-managed-identity": "true"}}));
    let own = find(&docs, "ClusterSPIFFEID", "meshcap-agent");
    assert_eq!(own.value["spec"]["spiffeIDTemplate"], SPIFFE_ID_TEMPLATE);
    assert_eq!(own.value["spec"]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"], ns);
    let pod_labels = &ds.value["spec"]["template"]["metadata"]["labels"];
    for (k, v) in own.value["spec"]["podSelector"]["matchLabels"].as_object().expect("podSelector") {
        assert_eq!(&pod_labels[k], v, "the meshcap-agent ClusterSPIFFEID selects the agent's pods by {k}");
    }

    // Sockets: the admin socket meshcap dials is the one the SPIRE agent serves, through the same host
    // directory, and not in the Workload API socket's directory (SPIRE refuses that).
    let admin = hcl(&agent, "admin_socket_path").expect("admin_socket_path");
    let workload = hcl(&agent, "socket_path").expect("socket_path");
    assert_eq!(admin, "/run/spire/admin/admin.sock");
    assert_eq!(env["SPIRE_ADMIN_ENDPOINT_SOCKET"], format!("unix://{}", admin.as_str().expect("path")));
    let dir = |p: &Value| Path::new(p.as_str().expect("path")).parent().expect("dir").to_path_buf();
    assert_ne!(dir(&admin), dir(&workload));
    let spire_agent = find(&docs, "DaemonSet", "spire-agent");
    let host_dir = |d: &Doc, vol: &str| {
        d.value["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .and_then(|vs| vs.iter().find(|v| v["name"] == vol))
            .map(|v| v["hostPath"]["path"].clone())
            .unwrap_or_else(|| panic!("{d}: no volume {vol}"))
    };
    assert_eq!(host_dir(spire_agent, "spire-admin-socket-dir"), json!(dir(&admin)));
    assert_eq!(host_dir(spire_agent, "spire-agent-socket-dir"), json!(dir(&workload)));
    // The CSI driver publishes the Workload API directory; meshcap finds the socket by its file name there.
    let csi = find(&docs, "DaemonSet", "spiffe-csi-driver");
    assert_eq!(host_dir(csi, "spire-agent-socket-dir"), json!(dir(&workload)));
    let file = Path::new(workload.as_str().expect("path")).file_name().expect("file").to_string_lossy().into_owned();
    assert_eq!(env["SPIFFE_ENDPOINT_SOCKET"], format!("unix:///spiffe-workload-api/{file}"));
    assert_eq!(find(&docs, "CSIDriver", "csi.spiffe.io").value["spec"]["volumeLifecycleModes"], json!(["Ephemeral"]));
}

/// The agent needs SPIRE (its own SVID, the pods' SVIDs) and the CSI driver (its own volume), while meshcap's
/// chained CNI plugin refuses new pods of a node whose agent is down. So nothing SPIRE runs may depend on
/// that plugin: each SPIRE workload is in the plugin's excluded namespaces or in the node's network (no CNI).
#[test]
fn spire_starts_on_a_node_whose_meshcap_agent_is_down() {
    let (chart_docs, _) = chart(&[]);
    let cni = container(find(&chart_docs, "DaemonSet", "meshcap-agent"), "install-cni");
    let args = strings(&cni["command"]);
    let excluded: Vec<&str> = args
        .iter()
        .position(|a| a == "--exclude-namespaces")
        .map(|i| args[i + 1].split(',').collect())
        .unwrap_or_default();
    let docs = deploy_docs();
    let spire: Vec<&Doc> = docs
        .iter()
        .filter(|d| {
            matches!(d.kind(), "DaemonSet" | "StatefulSet") && d.value["metadata"]["namespace"] == "spire-system"
        })
        .collect();
    assert_eq!(spire.len(), 3, "server, agent, CSI driver");
    for d in spire {
        let host_network = d.value["spec"]["template"]["spec"]["hostNetwork"] == true;
        assert!(host_network || excluded.contains(&"spire-system"), "{d} would wait for meshcap's CNI plugin");
    }
    assert_eq!(find(&docs, "DaemonSet", "spiffe-csi-driver").value["spec"]["template"]["spec"]["hostNetwork"], true);
}

#[test]
fn every_env_var_the_chart_sets_is_read_by_the_agent() {
    let run = meshcap_agent::cli::Cli::command();
    let run = run.find_subcommand("run").expect("`meshcap-agent run`");
    let known: BTreeSet<String> =
        run.get_arguments().filter_map(|a| a.get_env()).map(|e| e.to_string_lossy().into_owned()).collect();
    let (docs, _) = chart(&[]);
    let agent = container(find(&docs, "DaemonSet", "meshcap-agent"), "agent");
    // RUST_LOG is read by the log filter, not by the CLI.
    let unknown: Vec<String> = env_of(agent).into_keys().filter(|k| k != "RUST_LOG" && !known.contains(k)).collect();
    assert!(
        unknown.is_empty(),
        "the chart sets {unknown:?}, which `meshcap-agent run` does not read (it reads {known:?})"
    );
}

/// Runs the chart's install-cni command line (minus `--watch`, with the host
/// directories moved into a scratch dir) through the real `meshcap-cni`, so a
/// flag the installer does not take fails here, not on a node.
fn installer_takes(command: &[String]) {
    let scratch = std::env::temp_dir().join(format!("meshcap-manifests-cni-{}", std::process::id()));
    let (bin_dir, conf_dir) = (scratch.join("opt/cni/bin"), scratch.join("etc/cni/net.d"));
    std::fs::create_dir_all(&bin_dir).expect("scratch bin dir");
    std::fs::create_dir_all(&conf_dir).expect("scratch conf dir");
    let primary = conf_dir.join("10-kindnet.conflist");
    let kindnet = json!({"cniVersion": "0.3.1", "name": "kindnet", "plugins": [{"type": "ptp"}, {"type": "portmap"}]});
    std::fs::write(&primary, kindnet.to_string()).expect("writing the primary conflist");
    let args: Vec<String> = command[1..]
        .iter()
        .filter(|a| *a != "--watch")
        .map(|a| match a.as_str() {
            "/host/opt/cni/bin" => bin_dir.display().to_string(),
            "/host/etc/cni/net.d" => conf_dir.display().to_string(),
            other => other.to_string(),
        })
        .collect();
    let out = Command::new(meshcap_tests::bin_path("meshcap-cni", "MESHCAP_CNI_BIN"))
        .args(&args)
        .output()
        .expect("running meshcap-cni");
    let conflist: Value = serde_json::from_str(&read(&primary)).expect("conflist is JSON");
    let installed = bin_dir.join("meshcap-cni").exists();
    let _ = std::fs::remove_dir_all(&scratch);
    assert!(out.status.success(), "the chart's install-cni command fails: {}", String::from_utf8_lossy(&out.stderr));
    assert!(installed, "meshcap-cni was not copied into the bin dir");
    let plugins = conflist["plugins"].as_array().expect("plugins");
    assert_eq!(plugins.len(), 3, "{conflist}");
    assert_eq!(plugins[2]["type"], "meshcap-cni");
    assert_eq!(plugins[2]["agentSocket"], "/var/run/meshcap/cni.sock", "{conflist}");
}

#[test]
fn diagnose_finds_nothing_wrong_in_what_deploy_installs() {
    use meshcap_agent::diagnose::{diagnose, load_text, Manifests};
    let mut m = Manifests::default();
    for file in deploy_yaml_files() {
        let rel = file.strip_prefix(deploy()).expect("under deploy").to_string_lossy().into_owned();
        if non_manifest(&rel).is_none() || rel == "istio/istiod-values.yaml" {
            load_text(&file, &read(&file), &mut m);
        }
    }
    for r in render::render_chart(
        &deploy().join("charts/meshcap"),
        &[],
        &render::Release { name: "meshcap", namespace: AGENT_NAMESPACE },
    )
    .expect("chart renders")
    .into_iter()
    .filter(|r| r.name.ends_with(".yaml"))
    {
        load_text(Path::new(&r.name), &r.text, &mut m);
    }
    assert!(m.unreadable.is_empty(), "{:?}", m.unreadable);
    let findings = diagnose(&m, TRUST_DOMAIN);
    assert!(
        findings.is_empty(),
        "diagnose: {}",
        findings.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
    );
    // It did look: the sample's workloads and policy, and the trust domains of SPIRE and Istio.
    assert!(m.workloads.iter().any(|w| w.name == "myapi"), "{:?}", m.workloads);
    assert_eq!(m.policies.len(), 1);
    assert!(m.trust_domains.len() >= 3, "{:?}", m.trust_domains);
}

#[test]
fn sample_is_meshed_strict_and_kept_from_sidecar_injection() {
    let docs = deploy_docs();
    for name in ["myapi", "myapi-client"] {
        let d = find(&docs, "Deployment", name);
        let meta = &d.value["spec"]["template"]["metadata"];
        assert_eq!(meta["labels"]["sidecar.istio.io/inject"], "true", "{name}");
        assert_eq!(meta["labels"]["spire-managed-identity"], "true", "{name}");
        assert_eq!(meta["annotations"]["inject.istio.io/templates"], "sidecar,spire", "{name}");
        assert_eq!(d.value["metadata"]["namespace"], "meshcap-sample");
    }
    let myapi = find(&docs, "Deployment", "myapi");
    let labels = &myapi.value["spec"]["template"]["metadata"]["labels"];
    let pa = find(&docs, "PeerAuthentication", "myapi");
    assert_eq!(pa.value["spec"]["mtls"]["mode"], "STRICT");
    assert_eq!(pa.value["metadata"]["namespace"], "meshcap-sample");
    for (k, v) in pa.value["spec"]["selector"]["matchLabels"].as_object().expect("selector") {
        assert_eq!(&labels[k], v, "the PeerAuthentication selects myapi's pods by {k}");
    }
    let svc = find(&docs, "Service", "myapi");
    for (k, v) in svc.value["spec"]["selector"].as_object().expect("selector") {
        assert_eq!(&labels[k], v, "the Service selects myapi's pods by {k}");
    }
    let client = container(find(&docs, "Deployment", "myapi-client"), "client");
    assert!(client["args"][0].as_str().expect("script").contains("http://myapi.meshcap-sample.svc:8080/"));
    let ns = find(&docs, "Namespace", "meshcap-sample");
    assert_eq!(ns.value["metadata"]["labels"]["istio-injection"], "disabled");
}

#[test]
fn istiod_values_carry_the_trust_domain_and_the_spire_template() {
    let values = yaml(&deploy().join("istio/istiod-values.yaml"));
    assert!(values.get("defaults").is_none(), "current istiod charts refuse values under `defaults:`");
    assert_eq!(at(&values, "meshConfig.trustDomain"), Some(&json!(TRUST_DOMAIN)));
    let template = at(&values, "sidecarInjectorWebhook.templates.spire")
        .and_then(Value::as_str)
        .expect("sidecarInjectorWebhook.templates.spire is a string (a pod patch)");
    let patch: Value = serde_norway::from_str(template).expect("the spire template is YAML");
    assert_eq!(
        patch["spec"]["volumes"],
        json!([{"name": "workload-socket", "csi": {"driver": "csi.spiffe.io", "readOnly": true}}])
    );
    let proxy = &patch["spec"]["containers"][0];
    assert_eq!(proxy["name"], "istio-proxy");
    assert_eq!(proxy["volumeMounts"][0]["name"], "workload-socket");
    assert_eq!(proxy["volumeMounts"][0]["mountPath"], "/run/secrets/workload-spiffe-uds");
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct KindCluster {
    kind: String,
    api_version: String,
    name: String,
    nodes: Vec<KindNode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct KindNode {
    role: String,
    #[serde(default)]
    extra_mounts: Vec<KindMount>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct KindMount {
    host_path: String,
    container_path: String,
    propagation: Option<String>,
}

#[test]
fn kind_cluster_config_gives_every_node_the_bpf_filesystem() {
    let path = deploy().join("kind/cluster.yaml");
    let cluster: KindCluster =
        serde_norway::from_str(&read(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!((cluster.kind.as_str(), cluster.api_version.as_str()), ("Cluster", "kind.x-k8s.io/v1alpha4"));
    assert_eq!(cluster.name, "meshcap");
    assert!(cluster.nodes.iter().any(|n| n.role == "control-plane"));
    assert!(cluster.nodes.len() >= 2, "a worker too, so pods can talk across nodes");
    for n in &cluster.nodes {
        let bpf = n.extra_mounts.iter().find(|m| m.container_path == "/sys/fs/bpf").expect("bpffs mount");
        assert_eq!(bpf.host_path, "/sys/fs/bpf");
        assert!(matches!(bpf.propagation.as_deref(), None | Some("None" | "HostToContainer" | "Bidirectional")));
    }
}

#[test]
fn vendored_crds_are_what_deploy_installs() {
    let fixtures = root().join("tests/fixtures/crds");
    for (fixture, deployed) in [
        ("spire.spiffe.io_clusterspiffeids.yaml", "spire/crds/spire.spiffe.io_clusterspiffeids.yaml"),
        ("security.istio.io_peerauthentications.yaml", "istio/peerauthentication-crd.yaml"),
    ] {
        assert!(
            read(&fixtures.join(fixture)) == read(&deploy().join(deployed)),
            "deploy/{deployed} differs from tests/fixtures/crds/{fixture}: update both from upstream together"
        );
    }
}

/// A tool the checks need: absent is a skip with the reason, but a failure in CI (as privileged tests do).
fn tool_or_skip(tool: &str) -> bool {
    if Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success()) {
        return true;
    }
    let reason = format!("`{tool}` is not installed (Debian package {tool})");
    assert!(std::env::var_os("CI").is_none(), "{reason}");
    eprintln!("skipping: {reason}");
    false
}

#[test]
fn shell_scripts_parse_and_pass_shellcheck() {
    let scripts: Vec<PathBuf> = ["kind/up.sh", "kind/down.sh"].iter().map(|s| deploy().join(s)).collect();
    for s in &scripts {
        let text = read(s);
        assert!(text.starts_with("#!/usr/bin/env bash\n"), "{}: bash shebang", s.display());
        assert!(text.contains("\nset -euo pipefail\n"), "{}: set -euo pipefail", s.display());
        let out = Command::new("bash").arg("-n").arg(s).output().expect("running bash -n");
        assert!(out.status.success(), "{}: {}", s.display(), String::from_utf8_lossy(&out.stderr));
    }
    if tool_or_skip("shellcheck") {
        let out = Command::new("shellcheck").args(&scripts).output().expect("running shellcheck");
        assert!(out.status.success(), "shellcheck:\n{}", String::from_utf8_lossy(&out.stdout));
    }
}

#[test]
fn up_sh_names_every_missing_tool_and_stops() {
    // With an empty PATH (bash itself started by absolute path), up.sh must stop before touching anything,
    // naming all the tools it needs.
    let bash = ["/bin/bash", "/usr/bin/bash"].into_iter().find(|p| Path::new(p).exists()).expect("bash");
    let out = Command::new(bash)
        .arg(deploy().join("kind/up.sh"))
        .env_clear()
        .env("PATH", "/nonexistent")
        .output()
        .expect("running up.sh");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("missing tools: docker kind kubectl helm jq"), "{stderr}");
}

#[test]
fn image_builds_both_binaries_on_the_pinned_toolchain() {
    let dockerfile = read(&deploy().join("Dockerfile"));
    let lines: Vec<&str> = dockerfile.lines().map(str::trim).collect();
    let from: Vec<&str> = lines.iter().filter_map(|l| l.strip_prefix("FROM ")).collect();
    assert_eq!(from, ["rust:1.95-bookworm AS builder", "debian:bookworm-slim"]);
    for step in
        ["cargo xtask setup", "cargo xtask build-ebpf", "cargo build --release --locked -p meshcap-agent --bins"]
    {
        assert!(dockerfile.contains(step), "the builder runs `{step}`");
    }
    assert!(lines.contains(&"ENTRYPOINT [\"meshcap-agent\"]"));
    // The binaries it copies are the agent package's; the CNI plugin runs on the node itself, linked statically.
    assert!(dockerfile.contains("/src/target/release/meshcap-agent"), "the image carries meshcap-agent");
    assert!(
        dockerfile.contains("--target x86_64-unknown-linux-musl -p meshcap-agent --bin meshcap-cni")
            && dockerfile.contains("/src/target/x86_64-unknown-linux-musl/release/meshcap-cni"),
        "the image carries a static meshcap-cni"
    );
    assert!(root().join("agent/src/main.rs").exists() && root().join("agent/src/bin/meshcap-cni.rs").exists());
    let ignore = read(&root().join(".dockerignore"));
    assert!(ignore.lines().any(|l| l.trim() == "target/"), "the build context leaves out target/");
}

/// `meshcap-agent diagnose PATH...` as an operator runs it on a checkout: directories are walked for YAML, a
/// finding names file and line and makes the exit status 1; the shipped manifests come out clean.
#[test]
fn diagnose_command_reads_directories_and_exits_nonzero_on_findings() {
    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let run = |args: &[&str]| {
        let out = std::process::Command::new(meshcap_tests::bin_path("meshcap-agent", "MESHCAP_AGENT_BIN"))
            .arg("diagnose")
            .args(args)
            .env_remove("MESHCAP_TRUST_DOMAIN")
            .output()
            .expect("running meshcap-agent diagnose");
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let shipped: Vec<String> =
        ["sample", "spire", "istio"].iter().map(|d| deploy().join(d).display().to_string()).collect();
    let shipped: Vec<&str> = shipped.iter().map(String::as_str).collect();
    let (code, out) = run(&shipped);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("0 finding(s)"), "{out}");
    let (code, out) = run(&[&["--trust-domain", "other.example"][..], &shipped].concat());
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("SPIRE") && out.contains("Istio") && out.contains("\"other.example\""), "{out}");

    let dir = Dir(std::env::temp_dir().join(format!("meshcap-diagnose-dir-{}", std::process::id())));
    std::fs::create_dir_all(dir.0.join("apps/myapi")).unwrap();
    let seed = "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata:\n  name: myapi\nspec:\n  \
                selector:\n    matchLabels:\n      role: myapi\n  mtls:\n    mode: STRICT\n---\napiVersion: v1\nkind: Pod\n\
                metadata:\n  name: myapi\n  labels:\n    app: myapi\n    sidecar.istio.io/inject: 'true'\n    \
                spire-managed-identity: 'true'\nspec:\n  containers:\n  - name: myapi\n    image: myapi:v1\n";
    std::fs::write(dir.0.join("apps/myapi/all.yaml"), seed).unwrap();
    std::fs::write(dir.0.join("apps/notes.txt"), "not a manifest: {{ ignored").unwrap();
    let (code, out) = run(&[dir.0.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{out}");
    let file = dir.0.join("apps/myapi/all.yaml").display().to_string();
    assert!(out.contains(&format!("{file}:1: PeerAuthentication default/myapi: selector {{role: myapi}}")), "{out}");
    assert!(out.contains("Pod myapi has app: myapi: did you mean that?"), "{out}");
}
