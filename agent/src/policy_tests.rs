use std::collections::BTreeMap;

use super::*;

fn pod(labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> PodInfo {
    let map = |kv: &[(&str, &str)]| kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>();
    PodInfo {
        namespace: "default".into(),
        name: "client".into(),
        uid: "u-1".into(),
        service_account: "client".into(),
        labels: map(labels),
        annotations: map(annotations),
        ips: vec![],
        local: None,
        created: None,
        line: 1,
    }
}

const BOTH: &[(&str, &str)] = &[(INJECT_LABEL, "true"), (IDENTITY_LABEL, "true")];

#[test]
fn both_labels_enroll() {
    assert_eq!(enrollment(&pod(BOTH, &[])), Enrollment::Enrolled);
    assert_eq!(enrollment(&pod(&[(INJECT_LABEL, "True"), (IDENTITY_LABEL, "TRUE")], &[])), Enrollment::Enrolled);
}

#[test]
fn inject_without_identity_is_flagged() {
    assert_eq!(enrollment(&pod(&[(INJECT_LABEL, "true")], &[])), Enrollment::MissingIdentityLabel);
    assert_eq!(
        enrollment(&pod(&[(INJECT_LABEL, "true"), (IDENTITY_LABEL, "false")], &[])),
        Enrollment::MissingIdentityLabel
    );
}

#[test]
fn no_inject_or_false_is_not_requested() {
    assert_eq!(enrollment(&pod(&[(IDENTITY_LABEL, "true")], &[])), Enrollment::NotRequested);
    assert_eq!(enrollment(&pod(&[(INJECT_LABEL, "false"), (IDENTITY_LABEL, "true")], &[])), Enrollment::NotRequested);
}

#[test]
fn inject_label_wins_over_annotation() {
    let p = pod(&[(INJECT_LABEL, "false"), (IDENTITY_LABEL, "true")], &[(INJECT_LABEL, "true")]);
    assert_eq!(enrollment(&p), Enrollment::NotRequested);
    let p = pod(&[(IDENTITY_LABEL, "true")], &[(INJECT_LABEL, "true")]);
    assert_eq!(enrollment(&p), Enrollment::Enrolled);
}

#[test]
fn exclusions_parse() {
    let p = pod(
        BOTH,
        &[
            (EXCLUDE_OUTBOUND_PORTS, "9300, 9301"),
            (EXCLUDE_OUTBOUND_IP_RANGES, "10.96.0.0/12,fd00::/8, 192.168.1.7"),
            (INCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/8"),
        ],
    );
    let pol = pod_policy(&p);
    assert!(pol.warnings.is_empty(), "{:?}", pol.warnings);
    assert_eq!(pol.outbound.exclude_ports.iter().copied().collect::<Vec<_>>(), vec![9300, 9301]);
    assert_eq!(pol.outbound.exclude_nets.len(), 3);
    assert_eq!(pol.outbound.exclude_nets[2].to_string(), "192.168.1.7/32");
    assert_eq!(pol.outbound.include_nets, IncludeNets::Only(vec!["10.0.0.0/8".parse().unwrap()]));
}

#[test]
fn bad_values_warn_naming_pod_annotation_value_and_keep_the_rest() {
    let p = pod(BOTH, &[(EXCLUDE_OUTBOUND_PORTS, "93x0"), (EXCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/33,10.1.0.0/16")]);
    let pol = pod_policy(&p);
    assert_eq!(pol.enrollment, Enrollment::Enrolled);
    assert_eq!(pol.warnings.len(), 2);
    let text: Vec<String> = pol.warnings.iter().map(ToString::to_string).collect();
    assert!(text[0].contains("default/client") && text[0].contains(EXCLUDE_OUTBOUND_PORTS) && text[0].contains("93x0"));
    assert!(text[1].contains("10.0.0.0/33"));
    assert!(pol.outbound.exclude_ports.is_empty());
    assert!(pol.outbound.exclude_nets.is_empty(), "a bad list is ignored whole");
}

#[test]
fn bad_include_falls_back_to_capture_all() {
    let pol = pod_policy(&pod(BOTH, &[(INCLUDE_OUTBOUND_IP_RANGES, "nonsense")]));
    assert_eq!(pol.outbound.include_nets, IncludeNets::All);
    assert_eq!(pol.warnings.len(), 1);
    let pol = pod_policy(&pod(BOTH, &[(INCLUDE_OUTBOUND_IP_RANGES, "")]));
    assert_eq!(pol.outbound.include_nets, IncludeNets::Only(vec![]), "empty list captures nothing, as Istio");
}

#[test]
fn ports_reject_zero_and_overflow() {
    assert!(parse_ports("0").is_err());
    assert!(parse_ports("65536").is_err());
    assert_eq!(parse_ports(" , 80,").unwrap().len(), 1);
}

#[test]
fn inbound_ports_follow_istio() {
    assert_eq!(pod_policy(&pod(BOTH, &[])).inbound, InboundRules::AllExcept(Default::default()));
    let pol = pod_policy(&pod(BOTH, &[(EXCLUDE_INBOUND_PORTS, "8081,9090")]));
    assert_eq!(pol.inbound, InboundRules::AllExcept([8081, 9090].into()));
    let pol = pod_policy(&pod(BOTH, &[(INCLUDE_INBOUND_PORTS, "8080"), (EXCLUDE_INBOUND_PORTS, "8081")]));
    assert_eq!(pol.inbound, InboundRules::Only([8080].into()));
    let pol = pod_policy(&pod(BOTH, &[(INCLUDE_INBOUND_PORTS, "*"), (EXCLUDE_INBOUND_PORTS, "8081")]));
    assert_eq!(pol.inbound, InboundRules::AllExcept([8081].into()));
    let pol = pod_policy(&pod(BOTH, &[(INCLUDE_INBOUND_PORTS, "")]));
    assert_eq!(pol.inbound, InboundRules::Only(Default::default()), "empty: nothing captured inbound");
}

#[test]
fn bad_inbound_values_keep_safe_defaults() {
    let pol = pod_policy(&pod(BOTH, &[(INCLUDE_INBOUND_PORTS, "80,http"), (EXCLUDE_INBOUND_PORTS, "-1")]));
    assert_eq!(pol.inbound, InboundRules::AllExcept(Default::default()), "capture everything inbound");
    assert_eq!(pol.warnings.len(), 2);
    assert!(pol.warnings.iter().any(|w| w.annotation == INCLUDE_INBOUND_PORTS && w.value == "80,http"));
}
