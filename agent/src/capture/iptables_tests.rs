use std::{collections::BTreeSet, net::IpAddr, path::Path};

use super::{chain_rules, families, jump_rules, Family};
use crate::{
    capture::PodCapture,
    policy::{InboundRules, IncludeNets, OutboundRules},
};

fn spec<'a>(ips: &'a [IpAddr], outbound: &'a OutboundRules, inbound: &'a InboundRules) -> PodCapture<'a> {
    PodCapture {
        pod: "default/web".into(),
        uid: "uid-1",
        cgroup: Path::new("/sys/fs/cgroup/web"),
        cgroup_id: 1,
        netns_cookie: 1,
        netns: Path::new("/run/netns/web"),
        ips,
        outbound,
        inbound,
        listeners: &[],
    }
}

#[test]
fn default_pod_gets_istios_sidecar_rules_with_a_mark_for_the_engine() {
    let ips: Vec<IpAddr> = vec!["10.0.0.2".parse().unwrap()];
    let (out, inb) = (OutboundRules::default(), InboundRules::default());
    assert_eq!(
        chain_rules(&spec(&ips, &out, &inb), Family::V4, 15001, 15006),
        [
            "-A MESHCAP_INBOUND -p tcp -j MESHCAP_IN_REDIRECT",
            "-A MESHCAP_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
            "-A MESHCAP_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN",
            "-A MESHCAP_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m mark --mark 0x539 -j MESHCAP_IN_REDIRECT",
            "-A MESHCAP_OUTPUT -o lo -m mark ! --mark 0x539 -j RETURN",
            "-A MESHCAP_OUTPUT -m mark --mark 0x539 -j RETURN",
            "-A MESHCAP_OUTPUT -d 127.0.0.1/32 -j RETURN",
            "-A MESHCAP_OUTPUT -j MESHCAP_REDIRECT",
            "-A MESHCAP_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        ]
    );
    assert_eq!(families(&ips), [Family::V4]);
    assert_eq!(jump_rules(), ["-A PREROUTING -p tcp -j MESHCAP_INBOUND", "-A OUTPUT -p tcp -j MESHCAP_OUTPUT"]);
}

#[test]
fn annotations_become_returns_and_includes_per_family() {
    let ips: Vec<IpAddr> = vec!["10.0.0.2".parse().unwrap(), "fd00::2".parse().unwrap()];
    let out = OutboundRules {
        exclude_ports: BTreeSet::from([9300]),
        exclude_nets: vec!["10.9.0.0/16".parse().unwrap(), "fd00:9::/64".parse().unwrap()],
        include_nets: IncludeNets::Only(vec!["10.0.0.0/8".parse().unwrap()]),
    };
    let inb = InboundRules::Only(BTreeSet::from([8080, 9090]));
    let v6 = chain_rules(&spec(&ips, &out, &inb), Family::V6, 15001, 15006);
    assert_eq!(
        v6,
        [
            "-A MESHCAP_INBOUND -p tcp -m tcp --dport 8080 -j MESHCAP_IN_REDIRECT",
            "-A MESHCAP_INBOUND -p tcp -m tcp --dport 9090 -j MESHCAP_IN_REDIRECT",
            "-A MESHCAP_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
            "-A MESHCAP_OUTPUT -p tcp -m tcp --dport 9300 -j RETURN",
            "-A MESHCAP_OUTPUT -s ::6/128 -o lo -j RETURN",
            "-A MESHCAP_OUTPUT ! -d ::1/128 -o lo -p tcp -m mark --mark 0x539 -j MESHCAP_IN_REDIRECT",
            "-A MESHCAP_OUTPUT -o lo -m mark ! --mark 0x539 -j RETURN",
            "-A MESHCAP_OUTPUT -m mark --mark 0x539 -j RETURN",
            "-A MESHCAP_OUTPUT -d ::1/128 -j RETURN",
            "-A MESHCAP_OUTPUT -d fd00:9::/64 -j RETURN",
            "-A MESHCAP_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        ],
        "IPv4 ranges stay out of ip6tables; an IPv4-only include list captures no IPv6"
    );
    let v4 = chain_rules(&spec(&ips, &out, &inb), Family::V4, 15001, 15006);
    assert!(v4.contains(&"-A MESHCAP_OUTPUT -d 10.9.0.0/16 -j RETURN".to_string()));
    assert!(v4.contains(&"-A MESHCAP_OUTPUT -d 10.0.0.0/8 -j MESHCAP_REDIRECT".to_string()));
    assert_eq!(families(&ips), [Family::V4, Family::V6]);

    let excluding = InboundRules::AllExcept(BTreeSet::from([22]));
    let rules = chain_rules(&spec(&ips, &out, &excluding), Family::V4, 15001, 15006);
    assert_eq!(
        rules[..2],
        ["-A MESHCAP_INBOUND -p tcp -m tcp --dport 22 -j RETURN", "-A MESHCAP_INBOUND -p tcp -j MESHCAP_IN_REDIRECT"]
    );
}
