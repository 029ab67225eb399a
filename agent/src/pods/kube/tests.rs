use k8s_openapi::api::core::v1::Pod;
use serde_json::json;

use super::*;
use crate::{
    discovery::QosClass,
    pods::{MtlsMode, PodInfo},
};

fn pod(extra: serde_json::Value) -> Pod {
    let mut v = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "api-7d9f", "namespace": "shop", "uid": "0b5a3c9e-1f3e-4c1e-9a57-1d2a3b4c5d6e",
            "resourceVersion": "41",
            "labels": {"sidecar.istio.io/inject": "true", "spire-managed-identity": "true"}
        },
        "spec": {"nodeName": "node-a", "serviceAccountName": "api", "containers": [{"name": "app", "image": "x"}]},
        "status": {"phase": "Running", "podIP": "10.244.1.7", "podIPs": [{"ip": "10.244.1.7"}, {"ip": "fd00::7"}],
                   "qosClass": "Burstable"}
    });
    merge(&mut v, extra);
    serde_json::from_value(v).expect("a Pod")
}

fn merge(into: &mut serde_json::Value, from: serde_json::Value) {
    match (into, from) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (slot, v) => *slot = v,
    }
}

fn converted(p: &Pod, node: &str) -> PodInfo {
    match pod_info(p, node) {
        Converted::Pod(info) => info,
        Converted::Skip(s) => panic!("skipped: {s}"),
    }
}

fn skipped(p: &Pod) -> Skip {
    match pod_info(p, "node-a") {
        Converted::Pod(info) => panic!("not skipped: {info:?}"),
        Converted::Skip(s) => s,
    }
}

#[test]
fn a_pod_of_this_node_is_local_with_its_qos_class_and_no_paths() {
    let info = converted(&pod(json!({})), "node-a");
    assert_eq!(info.key(), "shop/api-7d9f");
    assert_eq!(info.service_account, "api");
    assert_eq!(info.ips, vec!["10.244.1.7".parse::<std::net::IpAddr>().unwrap(), "fd00::7".parse().unwrap()]);
    let local = info.local.expect("scheduled here");
    assert_eq!((local.netns, local.cgroup, local.qos), (None, None, Some(QosClass::Burstable)));
    assert!(converted(&pod(json!({})), "node-b").local.is_none(), "a pod of another node only counts for the mesh");
}

#[test]
fn host_network_finished_and_deleted_pods_are_left_out_saying_why() {
    let host = skipped(&pod(json!({"spec": {"hostNetwork": true}})));
    assert!(matches!(host, Skip::HostNetwork { asks_injection: true, .. }), "{host:?}");
    let text = host.to_string();
    assert!(text.contains("shop/api-7d9f") && text.contains("hostNetwork") && text.contains("node's own"), "{text}");
    for phase in ["Succeeded", "Failed"] {
        let s = skipped(&pod(json!({"status": {"phase": phase}})));
        assert_eq!(s, Skip::Finished { pod: "shop/api-7d9f".into(), phase: phase.into() });
    }
    let deleting = json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}});
    assert!(matches!(skipped(&pod(deleting.clone())), Skip::Deleted { .. }));
    // Still terminating gracefully: its app runs, so it keeps its capture.
    let mut running = deleting;
    merge(
        &mut running,
        json!({"status": {"containerStatuses": [{"name": "app", "image": "x", "imageID": "", "ready": true,
            "restartCount": 0, "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}]}}),
    );
    assert!(converted(&pod(running), "node-a").local.is_some());
}

#[test]
fn bad_uids_and_ips_are_named() {
    let s = skipped(&pod(json!({"metadata": {"uid": "../../etc"}})));
    assert!(s.to_string().contains("\"../../etc\" is not a UID"), "{s}");
    let s = skipped(&pod(json!({"status": {"podIPs": [{"ip": "10.0.0.300"}]}})));
    assert!(s.to_string().contains("10.0.0.300"), "{s}");
    // Whether it asked for the mesh decides between a CNI error and a pass-through.
    assert!(matches!(s, Skip::Invalid { asks_injection: true, .. }), "{s:?}");
    let mut plain = pod(json!({"status": {"podIPs": [{"ip": "10.0.0.300"}]}}));
    plain.metadata.labels.as_mut().unwrap().remove("sidecar.istio.io/inject");
    assert!(matches!(skipped(&plain), Skip::Invalid { asks_injection: false, .. }));
    let mut by_annotation = pod(json!({"metadata": {"uid": "",
                                                    "annotations": {"sidecar.istio.io/inject": "true"}}}));
    by_annotation.metadata.labels.as_mut().unwrap().remove("sidecar.istio.io/inject");
    assert!(matches!(skipped(&by_annotation), Skip::Invalid { asks_injection: true, .. }));
}

#[test]
fn peer_authentications_read_from_api_objects() {
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "security.istio.io/v1beta1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "myapi", "namespace": "shop", "resourceVersion": "9",
                     "creationTimestamp": "2026-03-04T05:06:07Z"},
        "spec": {"selector": {"matchLabels": {"app": "myapi"}}, "mtls": {"mode": "STRICT"},
                 "portLevelMtls": {"8081": {"mode": "DISABLE"}}}
    }))
    .unwrap();
    let pa = convert::peer_authentication(&obj).unwrap();
    assert_eq!((pa.namespace.as_str(), pa.name.as_str()), ("shop", "myapi"));
    assert_eq!(pa.mode, MtlsMode::Strict);
    assert_eq!(pa.port_modes[&8081], MtlsMode::Disable);
    assert_eq!(pa.selector.unwrap()["app"], "myapi");
    assert_eq!(pa.created.expect("creationTimestamp").0.to_string(), "2026-03-04T05:06:07Z");
}

/// A key that is no port must not drop the policy (a STRICT namespace would silently become PERMISSIVE): it is
/// kept with the good parts, and the bad ones named so the policy fails closed.
#[test]
fn a_peer_authentication_with_port_keys_that_are_no_ports_is_kept_and_says_why() {
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "ns-strict", "namespace": "shop", "resourceVersion": "9"},
        "spec": {"mtls": {"mode": "STRICT"},
                 "portLevelMtls": {"0": {"mode": "DISABLE"}, "abc": {"mode": "DISABLE"}, "70000": {"mode": "DISABLE"},
                                   "8081": {"mode": "PERMISSIVE"}}}
    }))
    .unwrap();
    let pa = convert::peer_authentication(&obj).expect("kept");
    assert_eq!((pa.name.as_str(), pa.mode.clone()), ("ns-strict", MtlsMode::Strict));
    assert_eq!(pa.port_modes.into_iter().collect::<Vec<_>>(), vec![(8081, MtlsMode::Permissive)]);
    assert_eq!(pa.unreadable.len(), 3, "{:?}", pa.unreadable);
    for key in ["\"0\"", "\"abc\"", "\"70000\""] {
        assert!(pa.unreadable.iter().any(|r| r.contains(key) && r.contains("not a port")), "{:?}", pa.unreadable);
    }
}
