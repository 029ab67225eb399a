use std::path::Path;

use super::*;

const TWO_PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: client
  namespace: shop
  uid: 11111111-1111-1111-1111-111111111111
  labels:
    sidecar.istio.io/inject: 'true'
    spire-managed-identity: 'true'
  annotations:
    meshcap.io/netns: /run/netns/client
    meshcap.io/cgroup: /sys/fs/cgroup/kubepods/client
spec:
  serviceAccountName: client-sa
  containers: [{name: app, image: app:v1}]
status:
  podIP: 10.244.0.2
  podIPs: [{ip: 10.244.0.2}, {ip: "fd00::2"}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict}
spec: {mtls: {mode: STRICT}}
---
apiVersion: v1
kind: Pod
metadata:
  name: remote
  uid: 22222222-2222-2222-2222-222222222222
status:
  podIP: 10.244.1.9
"#;

#[test]
fn reads_pods_and_skips_other_kinds() {
    let f = parse_pods_file(Path::new("pods.yaml"), TWO_PODS).expect("valid");
    assert_eq!(f.pods.len(), 2);
    let c = &f.pods[0];
    assert_eq!(c.key(), "shop/client");
    assert_eq!(c.service_account, "client-sa");
    assert_eq!(c.ips, vec!["10.244.0.2".parse::<IpAddr>().unwrap(), "fd00::2".parse().unwrap()]);
    assert_eq!(c.local.as_ref().unwrap().netns.as_deref(), Some(Path::new("/run/netns/client")));
    let r = &f.pods[1];
    assert_eq!(r.key(), "default/remote");
    assert!(r.local.is_none(), "no netns annotation: a pod of another node");
    assert_eq!(r.line, 26);
    assert!(f.skipped.is_empty(), "{:?}", f.skipped);
    assert_eq!(f.peer_authentications.len(), 1);
    assert_eq!(f.peer_authentications[0].mode, crate::pods::MtlsMode::Strict);
    assert_eq!(f.peer_authentications[0].line, 21);
}

#[test]
fn yaml_error_names_file_and_line() {
    let text = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: [unclosed\n";
    let err = parse_pods_file(Path::new("p.yaml"), text).unwrap_err().to_string();
    assert!(err.starts_with("pods file p.yaml:"), "{err}");
    assert!(err.contains(":4") || err.contains(":5"), "{err}");
}

#[test]
fn duplicate_uid_is_rejected_naming_both() {
    let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, uid: u-1}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: b, uid: u-1}\n";
    let err = parse_pods_file(Path::new("p.yaml"), text).unwrap_err().to_string();
    assert!(err.contains("default/b") && err.contains("default/a") && err.contains("u-1"), "{err}");
    assert!(err.contains("p.yaml:5"), "{err}");
}

#[test]
fn local_pod_needs_both_annotations() {
    let text = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n  uid: u-1\n  annotations: {meshcap.io/netns: /run/netns/a}\n";
    let err = parse_pods_file(Path::new("p.yaml"), text).unwrap_err().to_string();
    assert!(err.contains("meshcap.io/cgroup"), "{err}");
}

#[test]
fn missing_uid_and_bad_ip_are_errors() {
    let no_uid = "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n";
    assert!(parse_pods_file(Path::new("p"), no_uid).unwrap_err().to_string().contains("metadata.uid"));
    let bad_ip = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, uid: u}\nstatus: {podIP: 10.0.0.300}\n";
    assert!(parse_pods_file(Path::new("p"), bad_ip).unwrap_err().to_string().contains("10.0.0.300"));
}

#[test]
fn kubectl_list_output_is_accepted() {
    let text = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Pod\n  metadata: {name: a, uid: u-1}\n";
    let f = parse_pods_file(Path::new("p"), text).unwrap();
    assert_eq!(f.pods.len(), 1);
}

#[test]
fn peer_authentications_are_read_as_written() {
    let text = r#"apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata:
  name: myapi
  namespace: shop
spec:
  selector:
    matchLabels:
      role: myapi
  mtls:
    mode: STRICT
  portLevelMtls:
    "8081":
      mode: DISABLE
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: typo, creationTimestamp: "2026-03-04T05:06:07Z"}
spec: {mtls: {mode: STRCT}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: skipped}
"#;
    let f = parse_pods_file(Path::new("p"), text).unwrap();
    let pa = &f.peer_authentications;
    assert_eq!(pa.len(), 2);
    assert_eq!(pa[0].namespace, "shop");
    assert_eq!(pa[0].selector.as_ref().unwrap()["role"], "myapi");
    assert_eq!(pa[0].port_modes[&8081], crate::pods::MtlsMode::Disable);
    assert_eq!(pa[1].namespace, "default");
    assert_eq!(pa[1].mode, crate::pods::MtlsMode::Invalid("STRCT".into()));
    assert_eq!(pa[0].created, None, "no timestamp: the oldest, as in Istio");
    assert_eq!(pa[1].created.as_ref().map(|t| t.0.to_string()).as_deref(), Some("2026-03-04T05:06:07Z"));
    assert_eq!(f.skipped.len(), 1);
}

/// The file is read whole or not at all: a PeerAuthentication with a part that cannot be applied rejects it,
/// naming file, line, policy and key (the last good file stays in force), unlike the API's objects, which are
/// kept and fail closed.
#[test]
fn a_creation_timestamp_that_is_no_time_rejects_the_file() {
    let text = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
                metadata: {name: old, creationTimestamp: yesterday}\nspec: {mtls: {mode: STRICT}}\n";
    let e = parse_pods_file(Path::new("pods.yaml"), text).unwrap_err().to_string();
    assert!(e.contains("pods.yaml:1") && e.contains("not a valid PeerAuthentication"), "{e}");
}

#[test]
fn a_peer_authentication_port_key_that_is_no_port_rejects_the_file() {
    for key in ["0", "abc", "70000"] {
        let text = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: x}}\n---\napiVersion: security.istio.io/v1\n\
             kind: PeerAuthentication\nmetadata: {{name: ns-strict, namespace: shop}}\n\
             spec: {{mtls: {{mode: STRICT}}, portLevelMtls: {{\"{key}\": {{mode: DISABLE}}}}}}\n"
        );
        let e = parse_pods_file(Path::new("pods.yaml"), &text).unwrap_err().to_string();
        assert!(e.contains("pods.yaml:5") && e.contains("ns-strict") && e.contains(&format!("{key:?}")), "{e}");
    }
}

#[test]
fn the_shipped_sample_parses_and_makes_myapi_strict() {
    let text = include_str!("../../../deploy/local/pods.example.yaml");
    let f = parse_pods_file(Path::new("deploy/local/pods.example.yaml"), text).expect("sample is valid");
    assert_eq!(f.pods.len(), 2);
    let myapi = f.pods.iter().find(|p| p.labels.get("app").map(String::as_str) == Some("myapi")).unwrap();
    assert_eq!(f.peer_authentications.len(), 1, "{:?} {:?}", f.peer_authentications, f.skipped);
    let (mtls, warnings) = crate::policy::inbound_mtls(myapi, &f.peer_authentications, "istio-system");
    assert!(warnings.is_empty());
    assert_eq!(mtls.mode, crate::policy::PeerMode::Strict);
}

#[test]
fn a_cgroup_annotation_alone_makes_a_local_pod_whose_netns_is_found_later() {
    let text =
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n  uid: u-1\n  annotations: {meshcap.io/cgroup: kubepods/a}\n";
    let f = parse_pods_file(Path::new("p.yaml"), text).unwrap();
    let local = f.pods[0].local.as_ref().expect("a pod of this node");
    assert_eq!(local.cgroup.as_deref(), Some(Path::new("kubepods/a")));
    assert_eq!(local.netns, None);
    let empty = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n  uid: u-1\n  annotations: {meshcap.io/cgroup: kubepods/a, meshcap.io/netns: ''}\n";
    let err = parse_pods_file(Path::new("p.yaml"), empty).unwrap_err().to_string();
    assert!(err.contains("p.yaml:1: pod default/a") && err.contains("meshcap.io/netns"), "{err}");
}
