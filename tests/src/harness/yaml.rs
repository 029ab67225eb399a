//! The pods file the agent reads in place of a Kubernetes API server: one `v1` Pod document per pod.

use std::{collections::BTreeMap, fmt::Write as _};

use super::node::Pod;

/// Annotation naming the pod's network namespace file; only pods of this node carry it.
pub const NETNS_ANNOTATION: &str = "meshcap.io/netns";
/// Annotation naming the pod's cgroup v2 directory; only pods of this node carry it.
pub const CGROUP_ANNOTATION: &str = "meshcap.io/cgroup";

/// Pods of this node, with the node-local annotations that tell the agent where their namespace and cgroup are.
pub fn pods_yaml(pods: &[&Pod]) -> String {
    pods_yaml_with(pods, &[])
}

/// `local` pods as in [`pods_yaml`], followed by `remote` pods written without the node-local annotations (unless
/// the test set them itself), so the agent takes them for pods of another node, known by IP only.
pub fn pods_yaml_with(local: &[&Pod], remote: &[&Pod]) -> String {
    let docs: Vec<String> =
        local.iter().map(|p| pod_document(p, true)).chain(remote.iter().map(|p| pod_document(p, false))).collect();
    docs.join("---\n")
}

/// A YAML double-quoted scalar. JSON string syntax is a subset of it, so serde_json does the escaping.
fn q(s: &str) -> String {
    serde_json::to_string(s).expect("serialising a string cannot fail")
}

fn map_block(out: &mut String, key: &str, entries: &[(&str, &str)]) {
    if entries.is_empty() {
        let _ = writeln!(out, "  {key}: {{}}");
        return;
    }
    let _ = writeln!(out, "  {key}:");
    for (k, v) in entries {
        let _ = writeln!(out, "    {}: {}", q(k), q(v));
    }
}

fn pod_document(pod: &Pod, local: bool) -> String {
    let mut out = String::new();
    out.push_str("apiVersion: \"v1\"\nkind: \"Pod\"\nmetadata:\n");
    let _ = writeln!(out, "  namespace: {}", q(&pod.namespace));
    let _ = writeln!(out, "  name: {}", q(&pod.name));
    let _ = writeln!(out, "  uid: {}", q(&pod.uid));
    let labels: Vec<(&str, &str)> = pod.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    map_block(&mut out, "labels", &labels);
    let (netns, cgroup) = (pod.netns_path().display().to_string(), pod.cgroup_dir().display().to_string());
    // A test's own value for a node-local annotation wins, so tests can point the agent at a bogus namespace.
    let mut annotations: BTreeMap<&str, &str> = pod.annotations.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    if local {
        annotations.entry(NETNS_ANNOTATION).or_insert(&netns);
        annotations.entry(CGROUP_ANNOTATION).or_insert(&cgroup);
    }
    let annotations: Vec<(&str, &str)> = annotations.into_iter().collect();
    map_block(&mut out, "annotations", &annotations);
    out.push_str("spec:\n");
    let _ = writeln!(out, "  serviceAccountName: {}", q(&pod.service_account));
    out.push_str("  containers:\n  - name: \"app\"\n    image: \"meshcap.invalid/test-app\"\n");
    out.push_str("status:\n  phase: \"Running\"\n");
    let (ip4, ip6) = (pod.ip4().to_string(), pod.ip6().to_string());
    let _ = writeln!(out, "  podIP: {}", q(&ip4));
    let _ = writeln!(out, "  podIPs:\n  - ip: {}\n  - ip: {}", q(&ip4), q(&ip6));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_escapes_what_yaml_needs() {
        assert_eq!(q("a\"b\\c\n"), r#""a\"b\\c\n""#);
    }

    #[test]
    fn empty_maps_are_flow_style() {
        let mut out = String::new();
        map_block(&mut out, "labels", &[]);
        assert_eq!(out, "  labels: {}\n");
    }
}
