//! `meshcap-agent diagnose`: reads Kubernetes manifests (files or
//! directories) and reports the mistakes that leave traffic unprotected
//! without any error anywhere: a PeerAuthentication whose selector matches
//! no workload, a workload asking for injection without the SPIRE identity
//! label, trust domains that differ between meshcap, SPIRE and Istio.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
};

use serde_norway::Value;

mod cluster;

use crate::{
    cli::DiagnoseArgs,
    pods::{file::split_documents, peer_auth, MtlsMode, PeerAuthentication},
    policy::{IDENTITY_LABEL, INJECT_LABEL},
};

/// Where a document came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub line: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            // An object read from the API: `file` names it, there is no line.
            0 => write!(f, "{}", self.file.display()),
            line => write!(f, "{}:{line}", self.file.display()),
        }
    }
}

/// A pod or a pod template (Deployment, StatefulSet, DaemonSet, ...).
#[derive(Debug, Clone)]
pub struct Workload {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Istio still honours `sidecar.istio.io/inject` as an annotation, and so does meshcap.
    pub annotations: BTreeMap<String, String>,
    pub at: Location,
}

#[derive(Debug, Default)]
pub struct Manifests {
    pub workloads: Vec<Workload>,
    pub policies: Vec<(PeerAuthentication, Location)>,
    /// (where, what says so, trust domain)
    pub trust_domains: Vec<(Location, String, String)>,
    pub unreadable: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub at: Option<Location>,
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.at {
            Some(at) => write!(f, "{at}: {}", self.message),
            None => write!(f, "{}", self.message),
        }
    }
}

/// Prints the findings; exit code 1 when there is any.
pub fn run(args: &DiagnoseArgs) -> i32 {
    let mut manifests = Manifests::default();
    for path in &args.paths {
        load_path(path, &mut manifests);
    }
    if args.kubernetes {
        if let Err(e) = cluster::load(&mut manifests) {
            eprintln!("meshcap-agent diagnose: {e}");
            return 1;
        }
    }
    for problem in &manifests.unreadable {
        eprintln!("meshcap-agent diagnose: {problem}");
    }
    let findings = diagnose(&manifests, &args.trust_domain);
    for f in &findings {
        println!("{f}");
    }
    println!(
        "{} finding(s) in {} workload(s) and {} PeerAuthentication(s)",
        findings.len(),
        manifests.workloads.len(),
        manifests.policies.len()
    );
    i32::from(!findings.is_empty() || !manifests.unreadable.is_empty())
}

fn load_path(path: &Path, out: &mut Manifests) {
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = match std::fs::read_dir(path) {
            Ok(rd) => rd.filter_map(Result::ok).map(|e| e.path()).collect(),
            Err(e) => return out.unreadable.push(format!("{}: {e}", path.display())),
        };
        entries.sort();
        for entry in entries {
            let is_yaml = entry.extension().is_some_and(|e| e == "yaml" || e == "yml");
            if entry.is_dir() || is_yaml {
                load_path(&entry, out);
            }
        }
        return;
    }
    match std::fs::read_to_string(path) {
        Ok(text) => load_text(path, &text, out),
        Err(e) => out.unreadable.push(format!("{}: {e}", path.display())),
    }
}

/// Reads every document of one file; documents that are not YAML are
/// reported, the rest still read.
pub fn load_text(path: &Path, text: &str, out: &mut Manifests) {
    for (line, doc) in split_documents(text) {
        let at = Location { file: path.into(), line };
        let value: Value = match serde_norway::from_str(doc) {
            Ok(v) => v,
            Err(e) => {
                out.unreadable.push(format!("{at}: not YAML: {e}"));
                continue;
            }
        };
        load_value(value, at, out);
    }
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(*k)).and_then(Value::as_str)
}

fn labels_at(v: &Value, path: &[&str]) -> BTreeMap<String, String> {
    let Some(map) = path.iter().try_fold(v, |v, k| v.get(*k)).and_then(Value::as_mapping) else {
        return BTreeMap::new();
    };
    map.iter()
        .filter_map(|(k, v)| {
            Some((k.as_str()?.to_string(), v.as_str().map(str::to_string).unwrap_or_else(|| format!("{v:?}"))))
        })
        .collect()
}

pub(crate) fn load_value(v: Value, at: Location, out: &mut Manifests) {
    let kind = str_at(&v, &["kind"]).unwrap_or("").to_string();
    let namespace = str_at(&v, &["metadata", "namespace"]).unwrap_or("default").to_string();
    let name = str_at(&v, &["metadata", "name"]).unwrap_or("<unnamed>").to_string();
    match kind.as_str() {
        "Pod" | "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
            let (meta, spec): (&[&str], &[&str]) = match kind.as_str() {
                "Pod" => (&["metadata"], &["spec"]),
                _ => (&["spec", "template", "metadata"], &["spec", "template", "spec"]),
            };
            let key = format!("{namespace}/{name}");
            for td in meshcap_trust_domains(&v, spec) {
                out.trust_domains.push((at.clone(), format!("meshcap in {kind} {key}"), td));
            }
            out.workloads.push(Workload {
                labels: labels_at(&v, &[meta, &["labels"]].concat()),
                annotations: labels_at(&v, &[meta, &["annotations"]].concat()),
                kind,
                namespace,
                name,
                at,
            })
        }
        "PeerAuthentication" => match peer_auth::parse(v, at.line) {
            Ok(pa) => out.policies.push((pa, at)),
            Err(e) => out.unreadable.push(format!("{at}: {e}")),
        },
        "List" => {
            for item in v.get("items").and_then(Value::as_sequence).cloned().unwrap_or_default() {
                load_value(item, at.clone(), out);
            }
        }
        "ConfigMap" => {
            // SPIRE's server.conf / agent.conf (HCL): `trust_domain = "..."`;
            // Istio's mesh config (ConfigMap `istio`, key `mesh`): `trustDomain: ...`.
            for (key, text) in labels_at(&v, &["data"]) {
                if key == "mesh" {
                    let mesh: Option<Value> = serde_norway::from_str(&text).ok();
                    if let Some(td) = mesh.as_ref().and_then(|m| str_at(m, &["trustDomain"])) {
                        out.trust_domains.push((at.clone(), format!("Istio {name}/mesh trustDomain"), td.to_string()));
                    }
                    continue;
                }
                for l in text.lines() {
                    if let Some(td) = l.trim().strip_prefix("trust_domain").and_then(|r| r.trim().strip_prefix('=')) {
                        let td = td.trim().trim_matches('"').to_string();
                        out.trust_domains.push((at.clone(), format!("SPIRE {name}/{key} trust_domain"), td));
                    }
                }
            }
        }
        _ => {
            // Istio: helm values (`meshConfig` at the top or under `defaults`)
            // or an IstioOperator (`spec.meshConfig`).
            for path in [
                &["meshConfig", "trustDomain"][..],
                &["defaults", "meshConfig", "trustDomain"],
                &["spec", "meshConfig", "trustDomain"],
            ] {
                if let Some(td) = str_at(&v, path) {
                    out.trust_domains.push((at.clone(), format!("Istio {}", path.join(".")), td.to_string()));
                }
            }
        }
    }
}

fn is_true(labels: &BTreeMap<String, String>, key: &str) -> bool {
    labels.get(key).is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// The trust domain a meshcap agent container is given (`--trust-domain` or
/// `MESHCAP_TRUST_DOMAIN`), so a cluster or chart is checked against itself.
fn meshcap_trust_domains(v: &Value, pod_spec: &[&str]) -> Vec<String> {
    let containers = pod_spec.iter().try_fold(v, |v, k| v.get(*k)).and_then(|s| s.get("containers"));
    let mut found = Vec::new();
    for c in containers.and_then(Value::as_sequence).into_iter().flatten() {
        for e in c.get("env").and_then(Value::as_sequence).into_iter().flatten() {
            if let (Some("MESHCAP_TRUST_DOMAIN"), Some(value)) = (str_at(e, &["name"]), str_at(e, &["value"])) {
                found.push(value.to_string());
            }
        }
        let words: Vec<&str> = ["command", "args"]
            .iter()
            .filter_map(|k| c.get(*k).and_then(Value::as_sequence))
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        // Other tools take a --trust-domain too: only meshcap's own container counts.
        let image = str_at(c, &["image"]).unwrap_or("");
        if !image.contains("meshcap") && !words.iter().any(|w| w.contains("meshcap-agent")) {
            continue;
        }
        for (i, w) in words.iter().enumerate() {
            match w.strip_prefix("--trust-domain") {
                Some("") => found.extend(words.get(i + 1).map(|s| s.to_string())),
                Some(rest) => found.extend(rest.strip_prefix('=').map(str::to_string)),
                None => {}
            }
        }
    }
    found
}

pub fn diagnose(m: &Manifests, trust_domain: &str) -> Vec<Finding> {
    let mut out = Vec::new();
    for (pa, at) in &m.policies {
        let key = format!("{}/{}", pa.namespace, pa.name);
        if let MtlsMode::Invalid(mode) = &pa.mode {
            out.push(Finding {
                at: Some(at.clone()),
                message: format!(
                    "PeerAuthentication {key}: unknown mtls mode {mode:?} (STRICT, PERMISSIVE, DISABLE or UNSET)"
                ),
            });
        }
        let Some(selector) = pa.selector.as_ref().filter(|s| !s.is_empty()) else { continue };
        let in_ns: Vec<&Workload> = m.workloads.iter().filter(|w| w.namespace == pa.namespace).collect();
        if in_ns.iter().any(|w| selector.iter().all(|(k, v)| w.labels.get(k) == Some(v))) {
            continue;
        }
        // A workload carrying the selector's values under other keys is the
        // likely target (`role: myapi` meant `app: myapi`).
        let hint = in_ns
            .iter()
            .find_map(|w| {
                let fixed: Vec<String> = selector
                    .values()
                    .filter_map(|v| w.labels.iter().find(|(_, wv)| *wv == v).map(|(wk, wv)| format!("{wk}: {wv}")))
                    .collect();
                (fixed.len() == selector.len())
                    .then(|| format!("; {} {} has {}: did you mean that?", w.kind, w.name, fixed.join(", ")))
            })
            .unwrap_or_default();
        let wanted: Vec<String> = selector.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        out.push(Finding {
            at: Some(at.clone()),
            message: format!(
                "PeerAuthentication {key}: selector {{{}}} matches no workload in namespace {}, so its mode ({:?}) \
                 applies to nothing and the workloads it was meant for keep the default{hint}",
                wanted.join(", "),
                pa.namespace,
                pa.mode,
            ),
        });
    }
    for w in &m.workloads {
        if crate::policy::asks_injection(&w.labels, &w.annotations) && !is_true(&w.labels, IDENTITY_LABEL) {
            out.push(Finding {
                at: Some(w.at.clone()),
                message: format!(
                    "{} {}/{} asks for injection ({INJECT_LABEL}: 'true') without {IDENTITY_LABEL}: 'true': SPIRE gives \
                     it no identity and meshcap does not capture it; add the label",
                    w.kind, w.namespace, w.name
                ),
            });
        }
    }
    for (at, what, td) in &m.trust_domains {
        if td != trust_domain {
            out.push(Finding {
                at: Some(at.clone()),
                message: format!(
                    "{what} is {td:?} but meshcap's trust domain is {trust_domain:?}: identities will not match \
                     (set --trust-domain or fix the manifest)"
                ),
            });
        }
    }
    out
}

#[cfg(test)]
#[path = "diagnose_tests.rs"]
mod tests;
