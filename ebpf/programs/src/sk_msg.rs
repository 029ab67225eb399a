//! sk_msg on SOCK_HASH: data written on one end of a local app↔engine hop
//! goes straight to the other end's receive queue, skipping TCP/IP.
//! Fail open by design: when the peer is not in the map the helper returns
//! SK_DROP, and we return SK_PASS so the data takes the normal path.

use aya_ebpf::{
    bindings::{sk_action::SK_PASS, BPF_F_INGRESS},
    helpers::bpf_get_netns_cookie,
    macros::sk_msg,
    programs::SkMsgContext,
    EbpfContext as _,
};
use meshcap_common::{counter, remote_port_from_ctx, FlowKey};

use crate::ctx::{ends, ld};
use crate::maps::{count, SOCK_HASH};

#[sk_msg]
pub fn splice_msg(ctx: SkMsgContext) -> u32 {
    let md = unsafe { &*ctx.msg };
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let (local, remote) = ends(ld(&md.family), &md.local_ip4, &md.remote_ip4, &md.local_ip6, &md.remote_ip6);
    // The peer is stored under its own view: our remote is its local.
    let mut peer =
        FlowKey::new(netns_cookie, remote, remote_port_from_ctx(ld(&md.remote_port)), local, ld(&md.local_port) as u16);
    if SOCK_HASH.redirect_msg(&ctx, &mut peer, BPF_F_INGRESS as u64) == SK_PASS as i64 {
        count(counter::MSG_REDIRECTED);
    } else {
        count(counter::MSG_PASSED);
    }
    SK_PASS
}
