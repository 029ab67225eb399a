//! Istio `PeerAuthentication` documents (`security.istio.io/v1` and
//! `v1beta1`): read as written; which one applies to a pod is policy's job.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde::{Deserialize, Serialize};

/// `spec.mtls.mode`, as Istio spells it. A value Istio would reject is kept
/// as `Invalid` so the policy can fail closed for the pods it selects and say
/// why, while every other pod keeps working.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub enum MtlsMode {
    #[default]
    Unset,
    Disable,
    Permissive,
    Strict,
    Invalid(String),
}

impl MtlsMode {
    fn parse(v: Option<&str>) -> Self {
        match v {
            None | Some("UNSET") => Self::Unset,
            Some("DISABLE") => Self::Disable,
            Some("PERMISSIVE") => Self::Permissive,
            Some("STRICT") => Self::Strict,
            Some(other) => Self::Invalid(other.to_string()),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PeerAuthentication {
    pub namespace: String,
    pub name: String,
    /// `spec.selector.matchLabels`; `None` = namespace-wide (or mesh-wide in the root namespace).
    pub selector: Option<BTreeMap<String, String>>,
    pub mode: MtlsMode,
    /// `spec.portLevelMtls`, by port.
    pub port_modes: BTreeMap<u16, MtlsMode>,
    /// `metadata.creationTimestamp`: of several policies at one level the oldest applies, as in Istio. None (the
    /// pods file rarely says) sorts as the oldest, as Istio's zero time does; ties go by namespace/name.
    pub created: Option<Time>,
    /// Where it was read, for messages (0: from the API).
    pub line: usize,
    /// Parts that cannot be applied as written (a `portLevelMtls` key that is no port). Dropping the policy
    /// would fail open (a STRICT namespace silently PERMISSIVE), so it stays, and fails closed: STRICT on every
    /// port for the pods it selects, with an error naming it, until fixed.
    pub unreadable: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Doc {
    #[serde(default)]
    metadata: Meta,
    #[serde(default)]
    spec: Spec,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Meta {
    name: Option<String>,
    namespace: Option<String>,
    creation_timestamp: Option<Time>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Spec {
    selector: Option<Selector>,
    mtls: Option<Mtls>,
    #[serde(default)]
    port_level_mtls: BTreeMap<String, Mtls>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Selector {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
struct Mtls {
    mode: Option<String>,
}

/// Reads one document; `Err` is a reason for the file error. The pods file is read whole or not at all, so a
/// part that cannot be applied rejects the file (the last good one stays in force).
pub fn parse(value: serde_norway::Value, line: usize) -> Result<PeerAuthentication, String> {
    let doc: Doc = serde_norway::from_value(value).map_err(|e| format!("not a valid PeerAuthentication: {e}"))?;
    let pa = from_doc(doc, line)?;
    match pa.unreadable.first() {
        Some(reason) => Err(format!("PeerAuthentication {}: {reason}", pa.name)),
        None => Ok(pa),
    }
}

/// An object as the API server sends it (no line: `line` is 0). Parts that cannot be applied are kept in
/// `unreadable`: the policy fails closed rather than disappearing.
pub fn from_json(value: serde_json::Value) -> Result<PeerAuthentication, String> {
    let doc: Doc = serde_json::from_value(value).map_err(|e| format!("not a valid PeerAuthentication: {e}"))?;
    from_doc(doc, 0)
}

fn from_doc(doc: Doc, line: usize) -> Result<PeerAuthentication, String> {
    let name = doc.metadata.name.filter(|n| !n.is_empty()).ok_or("PeerAuthentication without metadata.name")?;
    let mut port_modes = BTreeMap::new();
    let mut unreadable = Vec::new();
    for (port, mtls) in doc.spec.port_level_mtls {
        match port.parse::<u16>() {
            Ok(p) if p != 0 => {
                port_modes.insert(p, MtlsMode::parse(mtls.mode.as_deref()));
            }
            _ => unreadable.push(format!("portLevelMtls key {port:?} is not a port (1-65535)")),
        }
    }
    Ok(PeerAuthentication {
        namespace: doc.metadata.namespace.filter(|n| !n.is_empty()).unwrap_or_else(|| "default".into()),
        name,
        selector: doc.spec.selector.map(|s| s.match_labels),
        mode: MtlsMode::parse(doc.spec.mtls.and_then(|m| m.mode).as_deref()),
        port_modes,
        created: doc.metadata.creation_timestamp,
        line,
        unreadable,
    })
}
