//! cgroup/getpeername4 and getpeername6: the app sees the address it dialed,
//! not the outbound listener. Fail open by nature: with no record (not
//! captured, or evicted) the real peer address is returned unchanged.

use aya_ebpf::{
    bindings::bpf_sock_addr, helpers::bpf_get_socket_cookie, macros::cgroup_sock_addr, programs::SockAddrContext,
    EbpfContext as _,
};
use meshcap_common::{counter, mapped_v4, port_to_user};

use crate::maps::{count, ORIG_DST};

#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(orig) = unsafe { ORIG_DST.get(&cookie) } {
        if let Some(ip4) = mapped_v4(&orig.addr) {
            let sa: &mut bpf_sock_addr = unsafe { &mut *ctx.sock_addr };
            sa.user_ip4 = ip4;
            sa.user_port = port_to_user(orig.port);
            count(counter::GETPEERNAME_REWRITTEN);
        }
    }
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(orig) = unsafe { ORIG_DST.get(&cookie) } {
        let sa: &mut bpf_sock_addr = unsafe { &mut *ctx.sock_addr };
        sa.user_ip6[0] = orig.addr[0];
        sa.user_ip6[1] = orig.addr[1];
        sa.user_ip6[2] = orig.addr[2];
        sa.user_ip6[3] = orig.addr[3];
        sa.user_port = port_to_user(orig.port);
        count(counter::GETPEERNAME_REWRITTEN);
    }
    1
}
