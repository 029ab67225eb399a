//! sock_ops on the kubelet's cgroup: when the kubelet opens a connection to
//! an enrolled pod (an HTTP, TCP or gRPC health probe), record it in
//! `KUBELET_FLOWS` as the pod will see it, before the SYN leaves, so the
//! pod's sk_lookup hook lets exactly that connection reach the app.
//!
//! This is how probes keep working under STRICT without rewriting them (as
//! Istio's injector does) and without exempting the node's IP (as ambient
//! does, which also exempts every hostNetwork pod): the exemption is tied to
//! the kernel's view of which process made the socket.
//!
//! Fail closed: if the record cannot be written the probe goes to the
//! engine, which under STRICT refuses plaintext; the probe fails visibly
//! (counted as `err_kubelet_flow_insert`) rather than opening a path.

use aya_ebpf::{bindings::BPF_SOCK_OPS_TCP_CONNECT_CB, macros::sock_ops, programs::SockOpsContext};
use meshcap_common::{counter, remote_port_from_ctx, FlowKey};

use crate::{
    ctx::{ends, ld},
    maps::{count, INBOUND_ADDRS, KUBELET_FLOWS},
};

#[sock_ops]
pub fn note_kubelet_connect(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_TCP_CONNECT_CB {
        try_note_kubelet_connect(&ctx);
    }
    1
}

#[inline(always)]
fn try_note_kubelet_connect(ctx: &SockOpsContext) {
    let ops = unsafe { &*ctx.ops };
    let (kubelet, pod) = ends(ld(&ops.family), &ops.local_ip4, &ops.remote_ip4, &ops.local_ip6, &ops.remote_ip6);
    // Only connections to enrolled pods matter; the rest of the kubelet's
    // traffic (API server, registries) is not recorded.
    let Some(&pod_netns_cookie) = (unsafe { INBOUND_ADDRS.get(&pod) }) else {
        return;
    };
    let key = FlowKey::inbound_seen_by_pod(
        pod_netns_cookie,
        kubelet,
        ld(&ops.local_port) as u16,
        pod,
        remote_port_from_ctx(ld(&ops.remote_port)),
    );
    if KUBELET_FLOWS.insert(&key, &1, 0).is_err() {
        count(counter::ERR_KUBELET_FLOW_INSERT);
    }
}
