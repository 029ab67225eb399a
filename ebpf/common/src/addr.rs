//! Address normalisation. Every address in a map is 16 bytes in network
//! order; IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`), so an AF_INET6
//! socket that dialed a mapped address and an AF_INET socket produce the
//! same keys.

/// Four 32-bit words as the kernel hands them over in `bpf_sock_addr`,
/// `bpf_sock_ops` and `sk_msg_md`: each word holds network-order bytes.
pub type Addr = [u32; 4];

const MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// `127.0.0.1` as a network-order word.
pub const LOOPBACK_V4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
/// `::1`.
pub const LOOPBACK_V6: Addr = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
/// Source of the engine's connections to apps (Istio's inbound passthrough
/// address): the sk_lookup hook never steers connections from it.
pub const ENGINE_SOURCE_V4: u32 = u32::from_ne_bytes([127, 0, 0, 6]);
/// IPv6 counterpart of [`ENGINE_SOURCE_V4`], `::6`, added to each pod's `lo`.
pub const ENGINE_SOURCE_V6: Addr = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 6])];

/// `::ffff:127.0.0.1`.
pub const LOOPBACK_V4_MAPPED: Addr = v4_mapped(LOOPBACK_V4);

/// IPv4 (network-order word) to its IPv4-mapped IPv6 form.
#[inline(always)]
pub const fn v4_mapped(ip4: u32) -> Addr {
    [0, 0, MAPPED_PREFIX, ip4]
}

/// The IPv4 address inside an IPv4-mapped IPv6 address, if it is one.
#[inline(always)]
pub const fn mapped_v4(addr: &Addr) -> Option<u32> {
    if addr[0] == 0 && addr[1] == 0 && addr[2] == MAPPED_PREFIX {
        Some(addr[3])
    } else {
        None
    }
}

/// Loopback destinations (127.0.0.0/8, `::1`, and their mapped forms) are
/// never captured: a pod's traffic to itself over `lo` stays inside it, as
/// with Istio's sidecar rules.
#[inline(always)]
pub const fn is_loopback(addr: &Addr) -> bool {
    match mapped_v4(addr) {
        Some(ip4) => ip4.to_ne_bytes()[0] == 127,
        None => {
            addr[0] == LOOPBACK_V6[0]
                && addr[1] == LOOPBACK_V6[1]
                && addr[2] == LOOPBACK_V6[2]
                && addr[3] == LOOPBACK_V6[3]
        }
    }
}

/// `bpf_sock_addr.user_port`: a network-order u16 in the low half of a u32.
#[inline(always)]
pub const fn port_from_user(user_port: u32) -> u16 {
    u16::from_be(user_port as u16)
}

/// Inverse of [`port_from_user`].
#[inline(always)]
pub const fn port_to_user(port: u16) -> u32 {
    port.to_be() as u32
}

/// `remote_port` of `bpf_sock_ops` and `sk_msg_md`: the network-order u16
/// sits in the upper half of the u32 on little-endian machines.
#[inline(always)]
pub const fn remote_port_from_ctx(raw: u32) -> u16 {
    u32::from_be(raw) as u16
}

/// The raw octets of an address, in network order.
#[inline(always)]
pub const fn addr_octets(addr: &Addr) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = addr[i].to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
}

/// Inverse of [`addr_octets`].
#[inline(always)]
pub const fn addr_from_octets(o: &[u8; 16]) -> Addr {
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}
