//! Strict reading of Kubernetes manifests: every document is deserialized as the k8s-openapi type its
//! apiVersion/kind names, serialized back, and compared with what was written. k8s-openapi ignores unknown
//! fields, so a misspelled field (`mountpropagation`, `containerport`) would otherwise pass silently; here it
//! shows up as a field that did not survive the round trip, while the API server would reject it (kubectl's
//! default strict field validation).
//!
//! Compiled into tests/tests/manifests.rs (`#[path]`), so its crates stay dev-dependencies.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use k8s_openapi::{
    api::{
        admissionregistration::v1::ValidatingWebhookConfiguration,
        apps::v1::{DaemonSet, Deployment, StatefulSet},
        core::v1::{ConfigMap, Namespace, Service, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
        storage::v1::CSIDriver,
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
    Resource,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::Value;

/// One YAML document of a file.
#[derive(Debug, Clone)]
pub struct Doc {
    pub file: PathBuf,
    /// Index of the document in its file (0-based), for messages.
    pub index: usize,
    pub value: Value,
}

impl Doc {
    pub fn api_version(&self) -> &str {
        self.value["apiVersion"].as_str().unwrap_or("")
    }
    pub fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or("")
    }
    pub fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or("")
    }
}

impl fmt::Display for Doc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} document {} ({} {})", self.file.display(), self.index + 1, self.kind(), self.name())
    }
}

/// Every non-empty document of a YAML text, as JSON values (what the API server receives).
pub fn parse_docs(file: &Path, text: &str) -> Result<Vec<Doc>, String> {
    let mut docs = Vec::new();
    for (index, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(de).map_err(|e| format!("{}: document {}: {e}", file.display(), index + 1))?;
        if !value.is_null() {
            docs.push(Doc { file: file.to_path_buf(), index, value });
        }
    }
    Ok(docs)
}

/// Which check a document gets.
pub enum Schema {
    /// A built-in kind, read strictly as its k8s-openapi type.
    Builtin,
    /// A custom resource, validated against its CRD (`crd` file name under tests/fixtures/crds).
    Custom { crd: &'static str },
}

/// Checks a built-in kind strictly, or says which CRD validates it. Unknown kinds are an error: a manifest
/// this test cannot check is a manifest nobody checked.
pub fn check_builtin(doc: &Doc) -> Result<Schema, String> {
    macro_rules! kinds {
        ($($t:ty),* $(,)?) => {
            $(if doc.api_version() == <$t as Resource>::API_VERSION && doc.kind() == <$t as Resource>::KIND {
                return strict::<$t>(doc).map(|()| Schema::Builtin);
            })*
        };
    }
    kinds!(
        Namespace,
        ServiceAccount,
        ConfigMap,
        Service,
        DaemonSet,
        Deployment,
        StatefulSet,
        ClusterRole,
        ClusterRoleBinding,
        Role,
        RoleBinding,
        CSIDriver,
        CustomResourceDefinition,
        ValidatingWebhookConfiguration,
    );
    // The CRD decides which of its group's versions are served.
    let group = doc.api_version().split_once('/').map_or("", |(g, _)| g);
    match (group, doc.kind()) {
        ("spire.spiffe.io", "ClusterSPIFFEID") => Ok(Schema::Custom { crd: "spire.spiffe.io_clusterspiffeids.yaml" }),
        ("security.istio.io", "PeerAuthentication") => {
            Ok(Schema::Custom { crd: "security.istio.io_peerauthentications.yaml" })
        }
        (api, kind) => Err(format!(
            "{doc}: no schema known for apiVersion {api:?} kind {kind:?}; add its k8s-openapi type or CRD to \
             tests/src/manifests_strict.rs"
        )),
    }
}

/// Deserialize as `T`, serialize back, and report every input field that did not survive.
pub fn strict<T: DeserializeOwned + Serialize>(doc: &Doc) -> Result<(), String> {
    let typed: T = serde_json::from_value(doc.value.clone()).map_err(|e| format!("{doc}: {e}"))?;
    let back = serde_json::to_value(&typed).map_err(|e| format!("{doc}: serializing back: {e}"))?;
    let mut lost = Vec::new();
    diff(&doc.value, &back, String::new(), &mut lost);
    if lost.is_empty() {
        Ok(())
    } else {
        Err(format!("{doc}: not part of {}: {}", std::any::type_name::<T>(), lost.join("; ")))
    }
}

/// metadata of a custom resource, strictly as ObjectMeta.
pub fn strict_metadata(doc: &Doc) -> Result<(), String> {
    let meta = Doc { value: doc.value["metadata"].clone(), ..doc.clone() };
    strict::<ObjectMeta>(&meta).map_err(|e| format!("metadata: {e}"))
}

fn diff(input: &Value, back: &Value, path: String, lost: &mut Vec<String>) {
    match (input, back) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let p = format!("{path}.{k}");
                match b.get(k) {
                    Some(w) => diff(v, w, p, lost),
                    None if v.is_null() => lost.push(format!("{p} is null (leave it out)")),
                    None => lost.push(format!("unknown field {p}")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                diff(v, w, format!("{path}[{i}]"), lost);
            }
        }
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => {}
        (a, b) if a == b => {}
        (a, b) => lost.push(format!("{path}: wrote {a}, read back {b}")),
    }
}

/// Dotted paths of every leaf in a values tree (`agent.pinDir`), for checking overrides against defaults.
pub fn leaf_paths(v: &Value, prefix: &str, out: &mut Vec<String>) {
    match v.as_object() {
        Some(map) if !map.is_empty() => {
            for (k, child) in map {
                let p = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                leaf_paths(child, &p, out);
            }
        }
        _ => out.push(prefix.to_string()),
    }
}

/// Value at a dotted path.
pub fn at<'a>(v: &'a Value, dotted: &str) -> Option<&'a Value> {
    dotted.split('.').try_fold(v, |v, k| v.get(k))
}
