//! sock_ops on each enrolled pod's cgroup and on the agent's own cgroup
//! (accepted sockets inherit their listener's cgroup).
//!
//! - App end established (pod cgroup): hand the original destination over
//!   from the socket cookie to the 4-tuple the engine will see after
//!   accept(), and put the socket in SOCK_HASH.
//! - Engine end established (agent cgroup): put it in SOCK_HASH.
//! - App end closed: drop its ORIG_DST record.
//!
//! Fail closed for the handover (no record → the engine resets the
//! connection) and open for splicing (not in SOCK_HASH → normal TCP path).

use aya_ebpf::{
    bindings::{
        BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    programs::SockOpsContext,
    EbpfContext as _,
};
use aya_log_ebpf::warn;
use meshcap_common::{
    counter, is_app_to_engine, is_engine_from_app, remote_port_from_ctx, FlowKey, PodConfig, POD_SOCKMAP,
};

use crate::ctx::{ends, ld};
use crate::maps::{count, FLOW_ORIG, ORIG_DST, POD_CONFIG, SOCK_HASH};

const TCP_CLOSE: u32 = 7;

#[sock_ops]
pub fn track_sock(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => app_established(&ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => engine_established(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => {
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            let _ = ORIG_DST.remove(&cookie);
        }
        _ => {}
    }
    1
}

#[inline(always)]
fn flow_key(ctx: &SockOpsContext) -> (FlowKey, Option<PodConfig>) {
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let ops = unsafe { &*ctx.ops };
    let (local, remote) = ends(ld(&ops.family), &ops.local_ip4, &ops.remote_ip4, &ops.local_ip6, &ops.remote_ip6);
    let key = FlowKey::new(
        netns_cookie,
        local,
        ld(&ops.local_port) as u16,
        remote,
        remote_port_from_ctx(ld(&ops.remote_port)),
    );
    let cfg = unsafe { POD_CONFIG.get(&netns_cookie) }.copied();
    (key, cfg)
}

#[inline(always)]
fn app_established(ctx: &SockOpsContext) {
    let (key, Some(cfg)) = flow_key(ctx) else {
        return;
    };
    if !is_app_to_engine(&cfg, &key.remote, key.remote_port) {
        return;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    match unsafe { ORIG_DST.get(&cookie) } {
        Some(orig) => {
            if FLOW_ORIG.insert(&key, orig, 0).is_ok() {
                count(counter::FLOW_HANDED_OVER);
            } else {
                count(counter::ERR_FLOW_INSERT);
                warn!(ctx, "meshcap: FLOW_ORIG insert failed; the engine will reset this connection");
            }
            // Clean ORIG_DST when this socket closes.
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        }
        // A connect to the listener the app made itself (not redirected).
        None => count(counter::FLOW_HANDOVER_MISSING),
    }
    splice(ctx, key, &cfg);
}

#[inline(always)]
fn engine_established(ctx: &SockOpsContext) {
    let (key, Some(cfg)) = flow_key(ctx) else {
        return;
    };
    if is_engine_from_app(&cfg, &key.local, key.local_port) {
        splice(ctx, key, &cfg);
    }
}

#[inline(always)]
fn splice(ctx: &SockOpsContext, mut key: FlowKey, cfg: &PodConfig) {
    if cfg.flags & POD_SOCKMAP == 0 {
        return;
    }
    if SOCK_HASH.update(&mut key, unsafe { &mut *ctx.ops }, BPF_NOEXIST as u64).is_ok() {
        count(counter::SOCKHASH_INSERTED);
    } else {
        count(counter::ERR_SOCKHASH_UPDATE);
    }
}
