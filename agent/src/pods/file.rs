//! The pods file: one or more YAML documents; `v1` `Pod` documents (and
//! `List`/`PodList` of them, as `kubectl get -o yaml` prints) are read, other
//! kinds are left to the parts that read them.

use std::{collections::HashMap, net::IpAddr, path::Path, path::PathBuf};

use k8s_openapi::api::core::v1::Pod;
use serde_norway::Value;

use super::{peer_auth, LocalPod, PeerAuthentication, PodInfo, CGROUP_ANNOTATION, NETNS_ANNOTATION};

#[derive(Debug, thiserror::Error)]
pub enum PodsFileError {
    #[error("pods file {path}: cannot read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("pods file {path}:{line}: {message}")]
    Yaml { path: PathBuf, line: usize, message: String },
    #[error("pods file {path}:{line}: pod {pod}: {reason}")]
    Pod { path: PathBuf, line: usize, pod: String, reason: String },
    #[error("pods file {path}:{line}: pod {pod}: uid {uid} is already used by {first} (line {first_line})")]
    DuplicateUid { path: PathBuf, line: usize, pod: String, uid: String, first: String, first_line: usize },
}

/// A parsed pods file: the pods, the PeerAuthentication policies, and notes
/// about documents it skipped.
#[derive(Debug, Default)]
pub struct PodsFile {
    pub pods: Vec<PodInfo>,
    pub peer_authentications: Vec<PeerAuthentication>,
    pub skipped: Vec<String>,
}

pub fn read_pods_file(path: &Path) -> Result<PodsFile, PodsFileError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| PodsFileError::Read { path: path.to_path_buf(), source })?;
    parse_pods_file(path, &text)
}

/// Parses the whole file or nothing: any error rejects it, so a half-edited
/// file never unenrolls the pods it failed to describe.
pub fn parse_pods_file(path: &Path, text: &str) -> Result<PodsFile, PodsFileError> {
    let mut out = PodsFile::default();
    for (start_line, doc) in split_documents(text) {
        let value: Value = match serde_norway::from_str(doc) {
            Ok(v) => v,
            Err(e) => {
                let line = start_line + e.location().map_or(0, |l| l.line().saturating_sub(1));
                return Err(PodsFileError::Yaml { path: path.into(), line, message: e.to_string() });
            }
        };
        if value.is_null() {
            continue;
        }
        let kind = value.get("kind").and_then(Value::as_str).unwrap_or("").to_string();
        let api_version = value.get("apiVersion").and_then(Value::as_str).unwrap_or("").to_string();
        match (api_version.as_str(), kind.as_str()) {
            ("v1", "Pod") => out.pods.push(pod_from_value(path, start_line, value)?),
            ("security.istio.io/v1" | "security.istio.io/v1beta1", "PeerAuthentication") => {
                let pa = peer_auth::parse(value, start_line).map_err(|message| PodsFileError::Yaml {
                    path: path.into(),
                    line: start_line,
                    message,
                })?;
                out.peer_authentications.push(pa);
            }
            ("v1", "List" | "PodList") => {
                let items = value.get("items").and_then(Value::as_sequence).cloned().unwrap_or_default();
                for item in items {
                    if item.get("kind").and_then(Value::as_str) == Some("Pod") || kind == "PodList" {
                        out.pods.push(pod_from_value(path, start_line, item)?);
                    }
                }
            }
            ("", _) | (_, "") => {
                return Err(PodsFileError::Yaml {
                    path: path.into(),
                    line: start_line,
                    message: "document has no apiVersion/kind".into(),
                })
            }
            _ => out.skipped.push(format!("line {start_line}: {api_version} {kind}")),
        }
    }
    let mut seen: HashMap<&str, &PodInfo> = HashMap::new();
    for pod in &out.pods {
        if let Some(first) = seen.insert(pod.uid.as_str(), pod) {
            return Err(PodsFileError::DuplicateUid {
                path: path.into(),
                line: pod.line,
                pod: pod.key(),
                uid: pod.uid.clone(),
                first: first.key(),
                first_line: first.line,
            });
        }
    }
    Ok(out)
}

/// Splits on `---` document markers, keeping each document's first line.
pub(crate) fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut start_line = 1;
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let trimmed = line.trim_end();
        if trimmed == "---" || trimmed.starts_with("--- ") {
            docs.push((start_line, &text[start..offset]));
            start = offset + line.len();
            start_line = i + 2;
        }
        offset += line.len();
    }
    docs.push((start_line, &text[start..]));
    docs.into_iter().filter(|(_, d)| !d.trim().is_empty()).collect()
}

fn pod_from_value(path: &Path, line: usize, value: Value) -> Result<PodInfo, PodsFileError> {
    let name_hint =
        value.get("metadata").and_then(|m| m.get("name")).and_then(Value::as_str).unwrap_or("<unnamed>").to_string();
    let bad = |reason: String| PodsFileError::Pod { path: path.into(), line, pod: name_hint.clone(), reason };
    let pod: Pod = serde_norway::from_value(value).map_err(|e| bad(format!("not a valid v1 Pod: {e}")))?;
    let meta = pod.metadata;
    let name = meta.name.filter(|n| !n.is_empty()).ok_or_else(|| bad("metadata.name is missing".into()))?;
    let namespace = meta.namespace.filter(|n| !n.is_empty()).unwrap_or_else(|| "default".into());
    let key = format!("{namespace}/{name}");
    let bad = |reason: String| PodsFileError::Pod { path: path.into(), line, pod: key.clone(), reason };
    let uid = meta.uid.filter(|u| !u.is_empty()).ok_or_else(|| bad("metadata.uid is missing".into()))?;
    if uid.len() > 47 || !uid.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(bad(format!("metadata.uid {uid:?} is not a UID (letters, digits and '-', at most 47)")));
    }
    let labels = meta.labels.unwrap_or_default();
    let annotations = meta.annotations.unwrap_or_default();
    let service_account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into());
    let status = pod.status.unwrap_or_default();
    let mut raw_ips: Vec<String> = status.pod_ips.unwrap_or_default().into_iter().map(|p| p.ip).collect();
    if raw_ips.is_empty() {
        raw_ips.extend(status.pod_ip);
    }
    let mut ips: Vec<IpAddr> = Vec::new();
    for raw in raw_ips {
        let ip = raw.parse().map_err(|_| bad(format!("status.podIPs: {raw:?} is not an IP address")))?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    // The cgroup alone is enough: the netns is then found from the cgroup's
    // processes, or handed over by the CNI plugin when the sandbox is made.
    let local = match (annotations.get(NETNS_ANNOTATION), annotations.get(CGROUP_ANNOTATION)) {
        (None, None) => None,
        (netns, Some(cgroup)) if !cgroup.is_empty() && netns.is_none_or(|n| !n.is_empty()) => {
            Some(LocalPod { netns: netns.map(PathBuf::from), cgroup: Some(cgroup.into()), qos: None })
        }
        _ => {
            return Err(bad(format!(
                "a pod on this node needs {CGROUP_ANNOTATION} (non-empty), and {NETNS_ANNOTATION} is either \
                 non-empty or absent"
            )))
        }
    };
    let created = meta.creation_timestamp.map(|t| std::time::SystemTime::from(t.0));
    Ok(PodInfo { namespace, name, uid, service_account, labels, annotations, ips, local, created, line })
}

#[cfg(test)]
#[path = "file_tests.rs"]
mod tests;
