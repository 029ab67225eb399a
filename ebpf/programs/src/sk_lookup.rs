//! sk_lookup on each enrolled pod's netns: a new TCP connection to one of the
//! pod's IPs, on a port in scope, is assigned to the engine's inbound
//! listener in that netns. No packet is rewritten, so the accepted socket's
//! local address is the original destination.
//!
//! The kubelet's own connections (health probes), recorded by `kubelet.rs`
//! from its cgroup, are let through to the app: under STRICT nothing else
//! from the node gets a plaintext path.
//!
//! Fail closed: for an enrolled pod whose listener is gone (agent killed or
//! restarting; the kernel drops closed sockets from the map) the lookup
//! returns SK_DROP, which the kernel answers with a reset: the client sees
//! "connection refused", and the app never sees the connection.

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    macros::sk_lookup,
    programs::SkLookupContext,
};
use meshcap_common::{counter, inbound_verdict, FlowKey, InboundVerdict, ListenerKey, PortKey, DIRECTION_INBOUND};

use crate::{
    ctx::{ends, ld},
    maps::{count, INBOUND_ADDRS, INBOUND_LISTENERS, KUBELET_FLOWS, POD_CONFIG, PORT_RULES},
};

const IPPROTO_TCP: u32 = 6;
const AF_INET: u32 = 2;

#[sk_lookup]
pub fn steer_inbound(ctx: SkLookupContext) -> u32 {
    let l = unsafe { &*ctx.lookup };
    if ld(&l.protocol) != IPPROTO_TCP {
        return SK_PASS;
    }
    let family = ld(&l.family);
    let (local, remote) = ends(family, &l.local_ip4, &l.remote_ip4, &l.local_ip6, &l.remote_ip6);
    let Some(&netns_cookie) = (unsafe { INBOUND_ADDRS.get(&local) }) else {
        return SK_PASS;
    };
    // No config: the pod is being unenrolled (links go before entries).
    let Some(cfg) = (unsafe { POD_CONFIG.get(&netns_cookie) }) else {
        return SK_PASS;
    };
    let port = ld(&l.local_port) as u16;
    let rule_key = PortKey { netns_cookie, port, direction: DIRECTION_INBOUND, _pad: [0; 5] };
    let rule = unsafe { PORT_RULES.get(&rule_key) }.copied().unwrap_or(0);
    if inbound_verdict(cfg, &remote, port, rule) == InboundVerdict::Passthrough {
        count(counter::INBOUND_PASSTHROUGH);
        return SK_PASS;
    }
    // Read unconditionally: a narrow context load the verifier accepts at a constant offset.
    let remote_port = u16::from_be(unsafe { core::ptr::read_volatile(&l.remote_port) });
    let flow = FlowKey::new(netns_cookie, local, port, remote, remote_port);
    if unsafe { KUBELET_FLOWS.get(&flow) }.is_some() {
        count(counter::INBOUND_KUBELET_PROBE);
        return SK_PASS;
    }
    let key = ListenerKey { netns_cookie, family: if family == AF_INET { 2 } else { 10 }, _pad: 0 };
    match INBOUND_LISTENERS.redirect_sk_lookup(&ctx, key, 0) {
        Ok(()) => {
            count(counter::INBOUND_STEERED);
            SK_PASS
        }
        Err(_) => {
            count(counter::INBOUND_REFUSED);
            SK_DROP
        }
    }
}
