//! Keys and values of the pinned maps. Field order and explicit padding keep
//! the layouts free of implicit holes (the verifier rejects reads of
//! uninitialised stack bytes used as keys).

use crate::addr::Addr;

/// Map names, as pinned under `<pin dir>/maps/`.
pub mod names {
    pub const POD_CONFIG: &str = "POD_CONFIG";
    pub const POD_OWNER: &str = "POD_OWNER";
    pub const PORT_RULES: &str = "PORT_RULES";
    pub const OUT_EXCLUDE_NETS: &str = "OUT_EXCLUDE_NETS";
    pub const OUT_INCLUDE_NETS: &str = "OUT_INCLUDE_NETS";
    pub const ORIG_DST: &str = "ORIG_DST";
    pub const FLOW_ORIG: &str = "FLOW_ORIG";
    pub const SOCK_HASH: &str = "SOCK_HASH";
    pub const COUNTERS: &str = "COUNTERS";
    pub const INBOUND_ADDRS: &str = "INBOUND_ADDRS";
    pub const INBOUND_LISTENERS: &str = "INBOUND_LISTENERS";
    pub const KUBELET_FLOWS: &str = "KUBELET_FLOWS";
    /// Every map the object declares, for pin checks and `status`.
    pub const ALL: [&str; 12] = [
        POD_CONFIG,
        POD_OWNER,
        PORT_RULES,
        OUT_EXCLUDE_NETS,
        OUT_INCLUDE_NETS,
        ORIG_DST,
        FLOW_ORIG,
        SOCK_HASH,
        COUNTERS,
        INBOUND_ADDRS,
        INBOUND_LISTENERS,
        KUBELET_FLOWS,
    ];
}

/// Default map sizes; the agent overrides them from its config.
pub mod default_size {
    pub const PODS: u32 = 1024;
    pub const PORT_RULES: u32 = 16384;
    pub const NETS: u32 = 16384;
    pub const FLOWS: u32 = 65536;
    /// Kubelet probe connections in flight: a few per pod per probe period.
    pub const KUBELET_FLOWS: u32 = 8192;
}

/// `PodConfig::flags`: the pod's outbound TCP is captured.
pub const POD_CAPTURE_OUTBOUND: u32 = 1 << 0;
/// `PodConfig::flags`: with no `includeOutboundIPRanges` list, every
/// destination is in scope (Istio's default `*`).
pub const POD_INCLUDE_ALL_OUTBOUND: u32 = 1 << 1;
/// `PodConfig::flags`: local app↔engine hops are spliced with sk_msg.
pub const POD_SOCKMAP: u32 = 1 << 2;
/// `PodConfig::flags`: new TCP connections to the pod's IPs go to its inbound listener.
pub const POD_CAPTURE_INBOUND: u32 = 1 << 3;
/// `PodConfig::flags`: every inbound port is in scope (Istio's
/// `includeInboundPorts: "*"`, the default), less `PORT_EXCLUDED` ones;
/// without it only `PORT_INCLUDED` ports are.
pub const POD_INCLUDE_ALL_INBOUND: u32 = 1 << 4;

/// Per-pod settings, keyed by the pod's network namespace cookie
/// (`SO_NETNS_COOKIE`), which every process and sub-cgroup of the pod shares.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PodConfig {
    pub flags: u32,
    /// Outbound listener port inside the pod (host order).
    pub outbound_port: u16,
    /// Inbound listener port inside the pod (host order).
    pub inbound_port: u16,
}

/// Which pod owns a netns cookie: lets a restarted agent tell live entries
/// from ones left by pods that went away while it was down. Userspace only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodOwner {
    /// Pod UID, UTF-8, zero padded.
    pub uid: [u8; 48],
}

/// Port rule key: (pod, direction, port).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PortKey {
    pub netns_cookie: u64,
    pub port: u16,
    pub direction: u8,
    pub _pad: [u8; 5],
}

pub const DIRECTION_OUTBOUND: u8 = 1;
pub const DIRECTION_INBOUND: u8 = 2;

/// `PORT_RULES` value: the port is excluded from capture.
pub const PORT_EXCLUDED: u8 = 1;
/// `PORT_RULES` value: the port is one of an explicit inbound include list.
pub const PORT_INCLUDED: u8 = 2;

/// `INBOUND_LISTENERS` key: the inbound listener of one pod for one family
/// (`AF_INET` = 2 or `AF_INET6` = 10). The kernel drops the entry when the
/// listener closes, which is what makes inbound fail closed.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ListenerKey {
    pub netns_cookie: u64,
    pub family: u32,
    pub _pad: u32,
}

/// Data part of the LPM keys of `OUT_EXCLUDE_NETS`/`OUT_INCLUDE_NETS`. The
/// cookie comes first and is always matched in full, so one trie serves every
/// pod; `prefix_len` = 64 + the IPv6 prefix length (IPv4 prefixes + 96).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NetKey {
    pub netns_cookie: u64,
    pub addr: [u8; 16],
}

/// Bits of an LPM key's `prefix_len` taken by the cookie.
pub const NET_KEY_COOKIE_BITS: u32 = 64;

/// LPM prefix length for an IPv4 prefix of `len` bits.
pub const fn net_prefix_v4(len: u8) -> u32 {
    NET_KEY_COOKIE_BITS + 96 + len as u32
}

/// LPM prefix length for an IPv6 prefix of `len` bits.
pub const fn net_prefix_v6(len: u8) -> u32 {
    NET_KEY_COOKIE_BITS + len as u32
}

/// LPM prefix length that matches one address exactly.
pub const NET_PREFIX_HOST: u32 = NET_KEY_COOKIE_BITS + 128;

/// The destination an app dialed, recorded by connect4/6 under the socket
/// cookie and handed to the engine under the flow's 4-tuple.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OrigDst {
    /// IPv4-mapped for IPv4 destinations.
    pub addr: Addr,
    /// Host order.
    pub port: u16,
    pub _pad: u16,
}

/// A TCP connection end inside one pod's netns. Used for `FLOW_ORIG` and
/// as the `SOCK_HASH` key; a socket is stored under its own (local, remote)
/// view, and the peer is found by swapping the two.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowKey {
    pub netns_cookie: u64,
    pub local: Addr,
    pub remote: Addr,
    /// Host order.
    pub local_port: u16,
    /// Host order.
    pub remote_port: u16,
    pub _pad: u32,
}

impl FlowKey {
    pub const fn new(netns_cookie: u64, local: Addr, local_port: u16, remote: Addr, remote_port: u16) -> Self {
        Self { netns_cookie, local, remote, local_port, remote_port, _pad: 0 }
    }

    /// The key under which the pod's netns sees a connection that a client
    /// outside it (the kubelet, in the node's netns) is opening: local is the
    /// pod's end.
    pub const fn inbound_seen_by_pod(
        pod_netns_cookie: u64,
        client: Addr,
        client_port: u16,
        pod: Addr,
        pod_port: u16,
    ) -> Self {
        Self::new(pod_netns_cookie, pod, pod_port, client, client_port)
    }

    /// The key under which the other end of this connection is stored.
    pub const fn peer(&self) -> Self {
        Self::new(self.netns_cookie, self.remote, self.remote_port, self.local, self.local_port)
    }
}

/// Indexes into the per-CPU `COUNTERS` array. Errors are counted where a
/// hook fails (each hook documents whether it then fails open or closed).
pub mod counter {
    pub const CONNECT_REDIRECTED: u32 = 0;
    pub const CONNECT_PASSTHROUGH: u32 = 1;
    pub const CONNECT_REFUSED: u32 = 2;
    pub const GETPEERNAME_REWRITTEN: u32 = 3;
    pub const FLOW_HANDED_OVER: u32 = 4;
    pub const FLOW_HANDOVER_MISSING: u32 = 5;
    pub const SOCKHASH_INSERTED: u32 = 6;
    pub const MSG_REDIRECTED: u32 = 7;
    pub const MSG_PASSED: u32 = 8;
    pub const ERR_ORIG_DST_INSERT: u32 = 9;
    pub const ERR_FLOW_INSERT: u32 = 10;
    pub const ERR_SOCKHASH_UPDATE: u32 = 11;
    pub const INBOUND_STEERED: u32 = 12;
    pub const INBOUND_PASSTHROUGH: u32 = 13;
    pub const INBOUND_REFUSED: u32 = 14;
    pub const INBOUND_KUBELET_PROBE: u32 = 15;
    pub const ERR_KUBELET_FLOW_INSERT: u32 = 16;
    pub const COUNT: u32 = 17;

    /// Names for `status` and metrics, in index order.
    pub const NAMES: [&str; COUNT as usize] = [
        "connect_redirected",
        "connect_passthrough",
        "connect_refused",
        "getpeername_rewritten",
        "flow_handed_over",
        "flow_handover_missing",
        "sockhash_inserted",
        "msg_redirected",
        "msg_passed",
        "err_orig_dst_insert",
        "err_flow_insert",
        "err_sockhash_update",
        "inbound_steered",
        "inbound_passthrough",
        "inbound_refused",
        "inbound_kubelet_probe",
        "err_kubelet_flow_insert",
    ];
}

#[cfg(feature = "user")]
mod pod_impls {
    // SAFETY: all of these are #[repr(C)], Copy, made of integers and arrays
    // of integers, with every padding byte an explicit field.
    unsafe impl aya::Pod for super::PodConfig {}
    unsafe impl aya::Pod for super::PodOwner {}
    unsafe impl aya::Pod for super::PortKey {}
    unsafe impl aya::Pod for super::NetKey {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::ListenerKey {}
}
