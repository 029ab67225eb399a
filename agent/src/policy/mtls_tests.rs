use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::*;

fn pod(ns: &str, labels: &[(&str, &str)]) -> PodInfo {
    PodInfo {
        namespace: ns.into(),
        name: "myapi-1".into(),
        uid: "u".into(),
        service_account: "myapi".into(),
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        annotations: Default::default(),
        ips: vec![],
        local: None,
        created: None,
        line: 1,
    }
}

fn pa(ns: &str, name: &str, selector: Option<&[(&str, &str)]>, mode: MtlsMode) -> PeerAuthentication {
    PeerAuthentication {
        namespace: ns.into(),
        name: name.into(),
        selector: selector.map(|s| s.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
        mode,
        port_modes: Default::default(),
        line: 7,
        ..Default::default()
    }
}

const APP: &[(&str, &str)] = &[("app", "myapi")];

#[test]
fn precedence_table() {
    use MtlsMode::*;
    use PeerMode as P;
    let mesh = |m| pa("istio-system", "mesh", None, m);
    let ns = |m| pa("shop", "ns", None, m);
    let wl = |m| pa("shop", "wl", Some(APP), m);
    // (policies, expected mode, decided by)
    let table: Vec<(Vec<PeerAuthentication>, P, &str)> = vec![
        (vec![], P::Permissive, "default"),
        (vec![mesh(Strict)], P::Strict, "istio-system/mesh"),
        (vec![mesh(Strict), ns(Disable)], P::Disable, "shop/ns"),
        (vec![mesh(Strict), ns(Disable), wl(Permissive)], P::Permissive, "shop/wl"),
        (vec![mesh(Strict), ns(Unset)], P::Strict, "istio-system/mesh"),
        (vec![mesh(Disable), ns(Strict), wl(Unset)], P::Strict, "shop/ns"),
        (vec![wl(Unset)], P::Permissive, "default"),
        (vec![pa("other", "x", None, Strict)], P::Permissive, "default"),
        (vec![pa("shop", "wrong-labels", Some(&[("role", "myapi")]), Strict)], P::Permissive, "default"),
    ];
    for (i, (policies, mode, by)) in table.into_iter().enumerate() {
        let (got, _) = inbound_mtls(&pod("shop", APP), &policies, "istio-system");
        assert_eq!((got.mode, got.decided_by.as_str()), (mode, by), "row {i}");
    }
}

#[test]
fn port_level_modes_apply_from_workload_policies() {
    let mut wl = pa("shop", "wl", Some(APP), MtlsMode::Strict);
    wl.port_modes.insert(8081, MtlsMode::Disable);
    wl.port_modes.insert(8082, MtlsMode::Unset);
    let (got, _) = inbound_mtls(&pod("shop", APP), &[wl], "istio-system");
    assert_eq!(got.for_port(8080), PeerMode::Strict);
    assert_eq!(got.for_port(8081), PeerMode::Disable);
    assert_eq!(got.for_port(8082), PeerMode::Strict, "UNSET port inherits");
}

#[test]
fn invalid_mode_fails_closed_with_a_named_warning() {
    let (got, warnings) = inbound_mtls(
        &pod("shop", APP),
        &[pa("shop", "typo", Some(APP), MtlsMode::Invalid("STRCT".into()))],
        "istio-system",
    );
    assert_eq!(got.mode, PeerMode::Strict);
    assert_eq!(warnings.len(), 1);
    let w = warnings[0].to_string();
    assert!(w.contains("shop/typo") && w.contains("STRCT") && w.contains("line 7"), "{w}");
}

#[test]
fn several_policies_at_one_level_are_reported() {
    let (got, warnings) = inbound_mtls(
        &pod("shop", APP),
        &[pa("shop", "a", None, MtlsMode::Strict), pa("shop", "b", None, MtlsMode::Disable)],
        "istio-system",
    );
    assert_eq!(got.decided_by, "shop/a");
    assert!(warnings[0].reason.contains("shop/b"));
}

#[test]
fn a_policy_with_parts_that_cannot_be_applied_fails_closed_on_every_port() {
    use PeerMode as P;
    let bad = |mut p: PeerAuthentication| {
        p.unreadable.push("portLevelMtls key \"abc\" is not a port (1-65535)".into());
        p
    };
    let mut wl = bad(pa("shop", "wl", Some(APP), MtlsMode::Permissive));
    wl.port_modes.insert(8081, MtlsMode::Disable);
    // (policies, mode, port 8081, decided by, the policy the warning names)
    let table: Vec<(Vec<PeerAuthentication>, P, P, &str)> = vec![
        (vec![bad(pa("shop", "ns", None, MtlsMode::Strict))], P::Strict, P::Strict, "shop/ns"),
        (vec![bad(pa("shop", "ns", None, MtlsMode::Permissive))], P::Strict, P::Strict, "shop/ns"),
        (vec![bad(pa("istio-system", "mesh", None, MtlsMode::Disable))], P::Strict, P::Strict, "istio-system/mesh"),
        (vec![pa("shop", "ns", None, MtlsMode::Disable), wl], P::Strict, P::Strict, "shop/wl"),
        // A valid narrower policy still decides, as Istio's precedence says.
        (
            vec![bad(pa("shop", "ns", None, MtlsMode::Strict)), pa("shop", "ok", Some(APP), MtlsMode::Permissive)],
            P::Permissive,
            P::Permissive,
            "shop/ok",
        ),
    ];
    for (i, (policies, mode, port, by)) in table.into_iter().enumerate() {
        let named = policies.iter().find(|p| !p.unreadable.is_empty()).map(|p| format!("{}/{}", p.namespace, p.name));
        let (got, warnings) = inbound_mtls(&pod("shop", APP), &policies, "istio-system");
        assert_eq!((got.mode, got.for_port(8081), got.decided_by.as_str()), (mode, port, by), "row {i}");
        let w = warnings.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n");
        assert!(w.contains(named.as_deref().unwrap()) && w.contains("\"abc\"") && w.contains("STRICT"), "row {i}: {w}");
    }
}

#[test]
fn a_warning_about_a_policy_from_the_api_names_no_file_line() {
    let mut from_api = pa("shop", "typo", Some(APP), MtlsMode::Invalid("STRCT".into()));
    from_api.line = 0;
    let (_, warnings) = inbound_mtls(&pod("shop", APP), &[from_api], "istio-system");
    let w = warnings[0].to_string();
    assert!(w.starts_with("PeerAuthentication shop/typo: unknown mtls mode") && !w.contains("line"), "{w}");
}

fn created(mut p: PeerAuthentication, at: Option<&str>) -> PeerAuthentication {
    p.created = at.map(|t| Time(t.parse().expect("an RFC 3339 time")));
    p
}

/// Istio's tie-break at one level: the oldest creationTimestamp, then the name; no timestamp is the oldest.
#[test]
fn of_several_policies_at_one_level_the_oldest_wins() {
    let ns = |name: &str, at: Option<&str>, mode| created(pa("shop", name, None, mode), at);
    let wl = |name: &str, at: Option<&str>, mode| created(pa("shop", name, Some(APP), mode), at);
    let mesh = |name: &str, at: Option<&str>, mode| created(pa("istio-system", name, None, mode), at);
    let (jan1, jan2) = (Some("2026-01-01T00:00:00Z"), Some("2026-01-02T00:00:00Z"));
    use MtlsMode::*;
    // (policies in the order the source gives them, mode, decided by)
    let table: Vec<(Vec<PeerAuthentication>, PeerMode, &str)> = vec![
        (vec![ns("a", jan2, Disable), ns("z", jan1, Strict)], PeerMode::Strict, "shop/z"),
        (vec![ns("z", jan1, Strict), ns("a", jan2, Disable)], PeerMode::Strict, "shop/z"),
        (vec![wl("a", jan2, Disable), wl("z", jan1, Strict)], PeerMode::Strict, "shop/z"),
        (vec![mesh("a", jan2, Disable), mesh("z", jan1, Strict)], PeerMode::Strict, "istio-system/z"),
        (vec![ns("b", jan1, Disable), ns("a", jan1, Strict)], PeerMode::Strict, "shop/a"),
        (vec![ns("b", None, Disable), ns("a", None, Strict)], PeerMode::Strict, "shop/a"),
        (vec![ns("a", jan1, Strict), ns("z", None, Disable)], PeerMode::Disable, "shop/z"),
        // Seconds are all the API gives; sub-second parts still order when a file has them.
        (vec![ns("a", Some("2026-01-01T00:00:00.5Z"), Disable), ns("z", jan1, Strict)], PeerMode::Strict, "shop/z"),
    ];
    for (i, (policies, mode, by)) in table.into_iter().enumerate() {
        let (got, warnings) = inbound_mtls(&pod("shop", APP), &policies, "istio-system");
        assert_eq!((got.mode, got.decided_by.as_str()), (mode, by), "row {i}");
        let w = &warnings[0];
        assert!(w.policy == by && w.reason.contains("oldest"), "row {i}: {w}");
    }
}
