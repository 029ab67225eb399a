extern crate std;

use crate::*;

fn v4(a: u8, b: u8, c: u8, d: u8) -> Addr {
    v4_mapped(u32::from_ne_bytes([a, b, c, d]))
}

fn v6(octets: [u8; 16]) -> Addr {
    addr_from_octets(&octets)
}

const ENROLLED: PodConfig =
    PodConfig { flags: POD_CAPTURE_OUTBOUND | POD_INCLUDE_ALL_OUTBOUND, outbound_port: 15001, inbound_port: 15006 };

#[test]
fn mapped_roundtrip_and_detection() {
    let a = v4(10, 0, 2, 7);
    assert_eq!(mapped_v4(&a), Some(u32::from_ne_bytes([10, 0, 2, 7])));
    assert_eq!(addr_octets(&a), [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 2, 7]);
    let native = v6([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    assert_eq!(mapped_v4(&native), None);
    assert_eq!(addr_from_octets(&addr_octets(&native)), native);
}

#[test]
fn loopback_detection() {
    assert!(is_loopback(&v4(127, 0, 0, 1)));
    assert!(is_loopback(&v4(127, 9, 9, 9)));
    assert!(is_loopback(&LOOPBACK_V6));
    assert!(is_loopback(&LOOPBACK_V4_MAPPED));
    assert!(!is_loopback(&v4(10, 0, 0, 1)));
    assert!(!is_loopback(&v4(128, 0, 0, 1)));
    assert!(!is_loopback(&v6([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2])));
}

#[test]
fn port_byte_orders() {
    // 8080 = 0x1f90: network order puts 0x1f first in memory.
    let user = u32::from(u16::from_ne_bytes([0x1f, 0x90]));
    assert_eq!(port_from_user(user), 8080);
    assert_eq!(port_to_user(8080), user);
    // sock_ops/sk_msg remote_port: the network-order u16 in the upper half.
    let raw = u32::from_ne_bytes([0, 0, 0x1f, 0x90]);
    assert_eq!(remote_port_from_ctx(raw), 8080);
}

#[test]
fn verdict_captures_by_default() {
    let dst = v4(10, 0, 2, 7);
    assert_eq!(outbound_verdict(&ENROLLED, &dst, 8080, RuleMatches::default()), OutboundVerdict::Redirect);
}

#[test]
fn verdict_never_captures_loopback_or_unenrolled() {
    assert_eq!(
        outbound_verdict(&ENROLLED, &v4(127, 0, 0, 1), 8080, RuleMatches::default()),
        OutboundVerdict::Passthrough
    );
    assert_eq!(outbound_verdict(&ENROLLED, &LOOPBACK_V6, 8080, RuleMatches::default()), OutboundVerdict::Passthrough);
    let off = PodConfig { flags: 0, ..ENROLLED };
    assert_eq!(outbound_verdict(&off, &v4(10, 0, 2, 7), 8080, RuleMatches::default()), OutboundVerdict::Passthrough);
}

#[test]
fn verdict_exclusions_win_over_includes() {
    let dst = v4(10, 0, 2, 7);
    let port = RuleMatches { port_excluded: true, ..Default::default() };
    assert_eq!(outbound_verdict(&ENROLLED, &dst, 9300, port), OutboundVerdict::Passthrough);
    let both = RuleMatches { in_exclude_nets: true, in_include_nets: true, ..Default::default() };
    assert_eq!(outbound_verdict(&ENROLLED, &dst, 80, both), OutboundVerdict::Passthrough);
}

#[test]
fn verdict_include_list_limits_capture() {
    let only_listed = PodConfig { flags: POD_CAPTURE_OUTBOUND, ..ENROLLED };
    let dst = v4(10, 0, 2, 7);
    assert_eq!(outbound_verdict(&only_listed, &dst, 80, RuleMatches::default()), OutboundVerdict::Passthrough);
    let inside = RuleMatches { in_include_nets: true, ..Default::default() };
    assert_eq!(outbound_verdict(&only_listed, &dst, 80, inside), OutboundVerdict::Redirect);
}

#[test]
fn local_hop_recognition() {
    assert!(is_app_to_engine(&ENROLLED, &v4(127, 0, 0, 1), 15001));
    assert!(is_app_to_engine(&ENROLLED, &LOOPBACK_V6, 15001));
    assert!(!is_app_to_engine(&ENROLLED, &v4(10, 0, 0, 1), 15001));
    assert!(!is_app_to_engine(&ENROLLED, &v4(127, 0, 0, 1), 8080));
    assert!(is_engine_from_app(&ENROLLED, &LOOPBACK_V4_MAPPED, 15001));
}

#[test]
fn flow_key_peer_swaps_ends() {
    let k = FlowKey::new(7, v4(127, 0, 0, 1), 40000, v4(127, 0, 0, 1), 15001);
    let p = k.peer();
    assert_eq!((p.local_port, p.remote_port), (15001, 40000));
    assert_eq!(p.peer(), k);
}

#[test]
fn net_prefix_lengths() {
    assert_eq!(net_prefix_v4(32), NET_PREFIX_HOST);
    assert_eq!(net_prefix_v6(128), NET_PREFIX_HOST);
    assert_eq!(net_prefix_v4(0), 64 + 96);
}

const INBOUND_ALL: PodConfig =
    PodConfig { flags: POD_CAPTURE_INBOUND | POD_INCLUDE_ALL_INBOUND, outbound_port: 15001, inbound_port: 15006 };

#[test]
fn inbound_steers_all_ports_but_excluded_ones_by_default() {
    let client = v4(10, 0, 0, 9);
    assert_eq!(inbound_verdict(&INBOUND_ALL, &client, 8080, 0), InboundVerdict::Steer);
    assert_eq!(inbound_verdict(&INBOUND_ALL, &client, 8081, PORT_EXCLUDED), InboundVerdict::Passthrough);
    // An include rule means nothing in "*" mode.
    assert_eq!(inbound_verdict(&INBOUND_ALL, &client, 8080, PORT_INCLUDED), InboundVerdict::Steer);
}

#[test]
fn inbound_include_list_steers_only_listed_ports() {
    let only = PodConfig { flags: POD_CAPTURE_INBOUND, ..INBOUND_ALL };
    let client = v4(10, 0, 0, 9);
    assert_eq!(inbound_verdict(&only, &client, 8080, PORT_INCLUDED), InboundVerdict::Steer);
    assert_eq!(inbound_verdict(&only, &client, 9090, 0), InboundVerdict::Passthrough);
}

#[test]
fn inbound_never_steers_the_engine_or_its_own_port() {
    assert_eq!(inbound_verdict(&INBOUND_ALL, &v4(127, 0, 0, 6), 8080, 0), InboundVerdict::Passthrough);
    assert_eq!(inbound_verdict(&INBOUND_ALL, &ENGINE_SOURCE_V6, 8080, 0), InboundVerdict::Passthrough);
    assert_eq!(inbound_verdict(&INBOUND_ALL, &v4(10, 0, 0, 9), 15006, 0), InboundVerdict::Passthrough);
    let off = PodConfig { flags: 0, ..INBOUND_ALL };
    assert_eq!(inbound_verdict(&off, &v4(10, 0, 0, 9), 8080, 0), InboundVerdict::Passthrough);
    // 127.0.0.7 is just another client.
    assert!(!is_engine_source(&v4(127, 0, 0, 7)));
}

#[test]
fn layouts_have_no_implicit_padding() {
    use core::mem::size_of;
    assert_eq!(size_of::<PodConfig>(), 8);
    assert_eq!(size_of::<PortKey>(), 16);
    assert_eq!(size_of::<NetKey>(), 24);
    assert_eq!(size_of::<OrigDst>(), 20);
    assert_eq!(size_of::<FlowKey>(), 48);
    assert_eq!(size_of::<PodOwner>(), 48);
    assert_eq!(size_of::<ListenerKey>(), 16);
}

#[test]
fn kubelet_flow_key_matches_the_pod_side_lookup() {
    // sock_ops in the kubelet's cgroup sees (kubelet end, pod end); sk_lookup in
    // the pod's netns sees (pod end, kubelet end): both must build one key.
    let (kubelet, pod) = (v4(10, 244, 0, 1), v4(10, 244, 0, 7));
    let recorded = FlowKey::inbound_seen_by_pod(42, kubelet, 51234, pod, 8080);
    let looked_up = FlowKey::new(42, pod, 8080, kubelet, 51234);
    assert_eq!(recorded, looked_up);
    let client_view = FlowKey::new(42, kubelet, 51234, pod, 8080);
    assert_eq!(recorded, client_view.peer());
    assert_ne!(recorded, FlowKey::inbound_seen_by_pod(42, kubelet, 51235, pod, 8080), "source port matters");
    assert_ne!(recorded, FlowKey::inbound_seen_by_pod(43, kubelet, 51234, pod, 8080), "pod netns matters");
}
