//! Which inbound mTLS mode applies to a pod, from Istio `PeerAuthentication`
//! with Istio's precedence: a workload policy (selector matching the pod's
//! labels) over the namespace's policy over the mesh-wide one in the root
//! namespace; `UNSET` inherits from the level above it; the default is
//! PERMISSIVE. `portLevelMtls` applies from workload policies only.

use std::{collections::BTreeMap, fmt};

use serde::Serialize;

use crate::pods::{MtlsMode, PeerAuthentication, PodInfo};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PeerMode {
    /// mTLS only: plaintext is refused before any byte reaches the app.
    Strict,
    /// mTLS or plaintext, told apart by the first bytes.
    Permissive,
    /// Plaintext passthrough; meshed clients send plaintext too.
    Disable,
}

/// A pod's resolved inbound mode, with the policy that decided it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InboundMtls {
    pub mode: PeerMode,
    pub ports: BTreeMap<u16, PeerMode>,
    /// `namespace/name` of the deciding policy, or "default".
    pub decided_by: String,
}

impl Default for InboundMtls {
    fn default() -> Self {
        Self { mode: PeerMode::Permissive, ports: BTreeMap::new(), decided_by: "default".into() }
    }
}

impl InboundMtls {
    pub fn for_port(&self, port: u16) -> PeerMode {
        self.ports.get(&port).copied().unwrap_or(self.mode)
    }
}

/// A policy that was read but cannot be applied as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MtlsWarning {
    pub policy: String,
    pub line: usize,
    pub reason: String,
}

impl fmt::Display for MtlsWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Line 0: read from the Kubernetes API, which has no lines.
        match self.line {
            0 => write!(f, "PeerAuthentication {}: {}", self.policy, self.reason),
            line => write!(f, "PeerAuthentication {} (pods file line {line}): {}", self.policy, self.reason),
        }
    }
}

fn key(pa: &PeerAuthentication) -> String {
    format!("{}/{}", pa.namespace, pa.name)
}

/// Maps a written mode to what it means; an invalid mode fails closed.
fn meaning(pa: &PeerAuthentication, mode: &MtlsMode, warnings: &mut Vec<MtlsWarning>) -> Option<PeerMode> {
    match mode {
        MtlsMode::Unset => None,
        MtlsMode::Disable => Some(PeerMode::Disable),
        MtlsMode::Permissive => Some(PeerMode::Permissive),
        MtlsMode::Strict => Some(PeerMode::Strict),
        MtlsMode::Invalid(v) => {
            warnings.push(MtlsWarning {
                policy: key(pa),
                line: pa.line,
                reason: format!(
                    "unknown mtls mode {v:?} (expected STRICT, PERMISSIVE, DISABLE or UNSET); \
                     treated as STRICT for the pods it selects until fixed"
                ),
            });
            Some(PeerMode::Strict)
        }
    }
}

/// A policy with parts that cannot be applied means STRICT on every port, whatever else it says: the part
/// that cannot be read might have asked for more than the rest does.
fn fails_closed(pa: &PeerAuthentication, warnings: &mut Vec<MtlsWarning>) -> bool {
    for reason in &pa.unreadable {
        warnings.push(MtlsWarning {
            policy: key(pa),
            line: pa.line,
            reason: format!(
                "{reason}; the policy is treated as STRICT on every port for the pods it selects until fixed"
            ),
        });
    }
    !pa.unreadable.is_empty()
}

fn selects(pa: &PeerAuthentication, pod: &PodInfo) -> bool {
    match &pa.selector {
        Some(labels) if !labels.is_empty() => labels.iter().all(|(k, v)| pod.labels.get(k) == Some(v)),
        _ => false,
    }
}

fn namespace_wide(pa: &PeerAuthentication) -> bool {
    pa.selector.as_ref().is_none_or(BTreeMap::is_empty)
}

/// Of several candidates the oldest wins (`metadata.creationTimestamp`, then namespace/name, as Istio
/// orders them; no timestamp counts as the oldest), with a warning naming the others.
fn pick<'a>(
    mut found: Vec<&'a PeerAuthentication>,
    level: &str,
    warnings: &mut Vec<MtlsWarning>,
) -> Option<&'a PeerAuthentication> {
    found.sort_by(|a, b| (&a.created, &a.namespace, &a.name).cmp(&(&b.created, &b.namespace, &b.name)));
    if found.len() > 1 {
        let ignored: Vec<String> = found[1..].iter().map(|p| key(p)).collect();
        warnings.push(MtlsWarning {
            policy: key(found[0]),
            line: found[0].line,
            reason: format!(
                "several {level} policies apply; this one (the oldest by creationTimestamp, then by name) wins over \
                 {ignored:?}"
            ),
        });
    }
    if found.is_empty() {
        None
    } else {
        Some(found.remove(0))
    }
}

pub fn inbound_mtls(
    pod: &PodInfo,
    policies: &[PeerAuthentication],
    root_namespace: &str,
) -> (InboundMtls, Vec<MtlsWarning>) {
    let mut warnings = Vec::new();
    let in_ns = |pa: &&PeerAuthentication| pa.namespace == pod.namespace;
    let workload =
        pick(policies.iter().filter(in_ns).filter(|pa| selects(pa, pod)).collect(), "workload", &mut warnings);
    let namespace =
        pick(policies.iter().filter(in_ns).filter(|pa| namespace_wide(pa)).collect(), "namespace", &mut warnings);
    let mesh = pick(
        policies.iter().filter(|pa| pa.namespace == root_namespace && namespace_wide(pa)).collect(),
        "mesh-wide",
        &mut warnings,
    );
    let mut out = InboundMtls::default();
    // From the broadest level to the narrowest: each set mode overrides.
    for pa in [mesh, namespace, workload].into_iter().flatten() {
        let mode =
            if fails_closed(pa, &mut warnings) { Some(PeerMode::Strict) } else { meaning(pa, &pa.mode, &mut warnings) };
        if let Some(mode) = mode {
            out.mode = mode;
            out.decided_by = key(pa);
        }
    }
    if let Some(pa) = workload.filter(|pa| pa.unreadable.is_empty()) {
        for (port, mode) in &pa.port_modes {
            if let Some(m) = meaning(pa, mode, &mut warnings) {
                out.ports.insert(*port, m);
            }
        }
    }
    (out, warnings)
}

#[cfg(test)]
#[path = "mtls_tests.rs"]
mod tests;
