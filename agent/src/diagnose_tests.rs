use super::*;

/// The seed document's YAML, as users write it today.
const SEED: &str = r#"
defaults:
  meshConfig:
    trustDomain: democluster.internal
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata:
  name: myapi
spec:
  selector:
    matchLabels:
      role: myapi
  mtls:
    mode: STRICT
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: myapi
spec:
  replicas: 1
  selector:
    matchLabels:
      app: myapi
  template:
    metadata:
      labels:
        app: myapi
        sidecar.istio.io/inject: 'true'
        spire-managed-identity: 'true'
      annotations:
        inject.istio.io/templates: 'sidecar,spire'
    spec:
      serviceAccountName: myapi
      containers:
      - name: myapi
        image: myapi:v1
"#;

fn findings(text: &str, td: &str) -> Vec<String> {
    let mut m = Manifests::default();
    load_text(Path::new("seed.yaml"), text, &mut m);
    assert!(m.unreadable.is_empty(), "{:?}", m.unreadable);
    diagnose(&m, td).iter().map(ToString::to_string).collect()
}

#[test]
fn the_seed_selector_that_matches_nothing_is_flagged_with_the_likely_fix() {
    let f = findings(SEED, "democluster.internal");
    assert_eq!(f.len(), 1, "{f:?}");
    assert!(f[0].starts_with("seed.yaml:6: PeerAuthentication default/myapi"), "{}", f[0]);
    assert!(f[0].contains("role: myapi") && f[0].contains("Deployment myapi has app: myapi"), "{}", f[0]);
}

#[test]
fn a_fixed_selector_is_clean() {
    assert!(findings(&SEED.replace("role: myapi", "app: myapi"), "democluster.internal").is_empty());
}

#[test]
fn injection_without_the_identity_label_is_flagged() {
    let text = SEED.replace("role: myapi", "app: myapi").replace("        spire-managed-identity: 'true'\n", "");
    let f = findings(&text, "democluster.internal");
    assert_eq!(f.len(), 1, "{f:?}");
    assert!(f[0].contains("Deployment default/myapi asks for injection") && f[0].contains(IDENTITY_LABEL));
}

#[test]
fn trust_domains_that_differ_are_flagged() {
    let spire = "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: spire-server, namespace: spire}\ndata:\n  server.conf: |\n    server {\n      trust_domain = \"example.org\"\n    }\n";
    let text = format!("{}{spire}", SEED.replace("role: myapi", "app: myapi"));
    let f = findings(&text, "democluster.internal");
    assert_eq!(f.len(), 1, "{f:?}");
    assert!(f[0].contains("SPIRE spire-server/server.conf trust_domain is \"example.org\""), "{}", f[0]);
    let f = findings(&SEED.replace("role: myapi", "app: myapi"), "other.example");
    assert!(f[0].contains("Istio defaults.meshConfig.trustDomain is \"democluster.internal\""), "{f:?}");
}

#[test]
fn an_unknown_mode_is_flagged() {
    let f = findings(&SEED.replace("role: myapi", "app: myapi").replace("STRICT", "STRCT"), "democluster.internal");
    assert!(f.iter().any(|l| l.contains("unknown mtls mode \"STRCT\"")), "{f:?}");
}

#[test]
fn istios_mesh_config_map_is_read_for_its_trust_domain() {
    let text = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio, namespace: istio-system}\ndata:\n  mesh: |\n    trustDomain: cluster.local\n";
    let mut m = Manifests::default();
    load_text(Path::new("istio.yaml"), text, &mut m);
    let findings = diagnose(&m, "democluster.internal");
    assert_eq!(findings.len(), 1, "{findings:?}");
    assert!(findings[0].to_string().starts_with("istio.yaml:1: Istio istio/mesh trustDomain is \"cluster.local\""));
    let api_object = Location { file: "configmaps/istio-system/istio".into(), line: 0 };
    assert_eq!(api_object.to_string(), "configmaps/istio-system/istio", "objects from the API have no line");
}

#[test]
fn injection_asked_by_annotation_counts_as_istio_reads_it() {
    let text = SEED
        .replace("role: myapi", "app: myapi")
        .replace("        sidecar.istio.io/inject: 'true'\n        spire-managed-identity: 'true'\n", "")
        .replace("      annotations:\n", "      annotations:\n        sidecar.istio.io/inject: 'true'\n");
    let f = findings(&text, "democluster.internal");
    assert_eq!(f.len(), 1, "{f:?}");
    assert!(f[0].contains("Deployment default/myapi asks for injection"), "{}", f[0]);
    // The label wins over the annotation, as in Istio.
    let label_off = text.replace(
        "        app: myapi\n      annotations:",
        "        app: myapi\n        sidecar.istio.io/inject: 'false'\n      annotations:",
    );
    assert!(findings(&label_off, "democluster.internal").is_empty());
}

#[test]
fn meshcaps_own_trust_domain_is_read_from_its_daemon_set() {
    let agent = |container: &str| {
        format!(
            "---\napiVersion: apps/v1\nkind: DaemonSet\nmetadata: {{name: meshcap-agent, namespace: meshcap-system}}\n\
             spec:\n  selector: {{matchLabels: {{app: meshcap-agent}}}}\n  template:\n    metadata: {{labels: {{app: meshcap-agent}}}}\n\
             \x20   spec:\n      containers:\n{container}"
        )
    };
    let by_env =
        agent("      - name: agent\n        env:\n        - {name: MESHCAP_TRUST_DOMAIN, value: prod.example}\n");
    let by_arg = agent(
        "      - name: agent\n        image: ghcr.io/x/meshcap:1\n        args: [run, --trust-domain=prod.example]\n",
    );
    let split_arg = agent("      - name: agent\n        command: [meshcap-agent, run, --trust-domain, prod.example]\n");
    for ds in [by_env, by_arg, split_arg] {
        let text = format!("{}{ds}", SEED.replace("role: myapi", "app: myapi"));
        let f = findings(&text, "democluster.internal");
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(f[0].contains("meshcap in DaemonSet meshcap-system/meshcap-agent is \"prod.example\""), "{}", f[0]);
    }
    // Another tool's --trust-domain is not meshcap's.
    let other = agent("      - name: spiffe-csi\n        image: example/csi-driver-spiffe:1\n        args: [--trust-domain=prod.example]\n");
    assert!(
        findings(&format!("{}{other}", SEED.replace("role: myapi", "app: myapi")), "democluster.internal").is_empty()
    );
}
