//! cgroup/connect4 and cgroup/connect6 on each enrolled pod's cgroup:
//! steer the pod's outbound TCP to its in-pod outbound listener and record
//! where it was going.
//!
//! Fail closed: if the original destination cannot be recorded the connect
//! is refused (EPERM) rather than sent direct, which would bypass the mesh.

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext as _,
};
use aya_log_ebpf::error;
use meshcap_common::{
    counter, mapped_v4, outbound_verdict, port_from_user, port_to_user, v4_mapped, Addr, OrigDst, OutboundVerdict,
    PodConfig, PortKey, RuleMatches, DIRECTION_OUTBOUND, LOOPBACK_V4, LOOPBACK_V4_MAPPED, LOOPBACK_V6,
};

use crate::ctx::{ld, ld6};
use crate::maps::{count, net_key, ORIG_DST, OUT_EXCLUDE_NETS, OUT_INCLUDE_NETS, POD_CONFIG, PORT_RULES};

const ALLOW: i32 = 1;
const DENY: i32 = 0;
const IPPROTO_TCP: u32 = 6;
const SOCK_STREAM: u32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    finish(&ctx, try_connect(&ctx, Family::V4))
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    finish(&ctx, try_connect(&ctx, Family::V6))
}

#[derive(Clone, Copy)]
enum Family {
    V4,
    V6,
}

struct RecordFailed;

#[inline(always)]
fn finish(ctx: &SockAddrContext, result: Result<i32, RecordFailed>) -> i32 {
    match result {
        Ok(verdict) => verdict,
        Err(RecordFailed) => {
            error!(ctx, "meshcap: ORIG_DST insert failed; connect refused (fail closed)");
            count(counter::ERR_ORIG_DST_INSERT);
            count(counter::CONNECT_REFUSED);
            DENY
        }
    }
}

#[inline(always)]
fn try_connect(ctx: &SockAddrContext, family: Family) -> Result<i32, RecordFailed> {
    let sa: &mut bpf_sock_addr = unsafe { &mut *ctx.sock_addr };
    if ld(&sa.protocol) != IPPROTO_TCP || ld(&sa.type_) != SOCK_STREAM {
        return Ok(ALLOW);
    }
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // No config: the pod is being unenrolled (links go before config).
    let Some(cfg) = (unsafe { POD_CONFIG.get(&netns_cookie) }) else {
        return Ok(ALLOW);
    };
    let cfg: PodConfig = *cfg;
    let dst: Addr = match family {
        Family::V4 => v4_mapped(ld(&sa.user_ip4)),
        Family::V6 => ld6(&sa.user_ip6),
    };
    let dst_port = port_from_user(ld(&sa.user_port));
    let rules = RuleMatches {
        port_excluded: unsafe {
            PORT_RULES
                .get(&PortKey { netns_cookie, port: dst_port, direction: DIRECTION_OUTBOUND, _pad: [0; 5] })
                .is_some()
        },
        in_exclude_nets: OUT_EXCLUDE_NETS.get(net_key(netns_cookie, &dst)).is_some(),
        in_include_nets: OUT_INCLUDE_NETS.get(net_key(netns_cookie, &dst)).is_some(),
    };
    if outbound_verdict(&cfg, &dst, dst_port, rules) == OutboundVerdict::Passthrough {
        count(counter::CONNECT_PASSTHROUGH);
        return Ok(ALLOW);
    }

    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst { addr: dst, port: dst_port, _pad: 0 };
    ORIG_DST.insert(&cookie, &orig, 0).map_err(|_| RecordFailed)?;

    match family {
        Family::V4 => sa.user_ip4 = LOOPBACK_V4,
        Family::V6 => {
            // A mapped destination stays IPv4 on the wire: send it to the
            // IPv4 listener; a native IPv6 one to the IPv6 listener.
            let to = if mapped_v4(&dst).is_some() { LOOPBACK_V4_MAPPED } else { LOOPBACK_V6 };
            sa.user_ip6[0] = to[0];
            sa.user_ip6[1] = to[1];
            sa.user_ip6[2] = to[2];
            sa.user_ip6[3] = to[3];
        }
    }
    sa.user_port = port_to_user(cfg.outbound_port);
    count(counter::CONNECT_REDIRECTED);
    Ok(ALLOW)
}
