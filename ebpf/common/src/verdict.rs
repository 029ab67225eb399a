//! What connect4/connect6 do with a connect from an enrolled pod.

use crate::{addr::is_loopback, addr::Addr, maps::*};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutboundVerdict {
    /// Leave the connect alone.
    Passthrough,
    /// Rewrite the destination to the pod's outbound listener.
    Redirect,
}

/// What the hook found in the per-pod rule maps for one destination.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleMatches {
    pub port_excluded: bool,
    pub in_exclude_nets: bool,
    pub in_include_nets: bool,
}

/// Istio's precedence for outbound capture: loopback is never captured; an
/// excluded port or range wins over an included range; without an include
/// list everything else is captured.
#[inline(always)]
pub fn outbound_verdict(cfg: &PodConfig, dst: &Addr, dst_port: u16, rules: RuleMatches) -> OutboundVerdict {
    if cfg.flags & POD_CAPTURE_OUTBOUND == 0
        || is_loopback(dst)
        || dst_port == 0
        || rules.port_excluded
        || rules.in_exclude_nets
    {
        return OutboundVerdict::Passthrough;
    }
    if cfg.flags & POD_INCLUDE_ALL_OUTBOUND != 0 || rules.in_include_nets {
        OutboundVerdict::Redirect
    } else {
        OutboundVerdict::Passthrough
    }
}

/// Is this established socket the app's end of the hop to the outbound
/// listener (seen by sock_ops in the pod's cgroup)?
#[inline(always)]
pub fn is_app_to_engine(cfg: &PodConfig, remote: &Addr, remote_port: u16) -> bool {
    cfg.flags & POD_CAPTURE_OUTBOUND != 0 && remote_port == cfg.outbound_port && is_loopback(remote)
}

/// Is this established socket the engine's accepted end of that hop (seen by
/// sock_ops in the agent's cgroup)?
#[inline(always)]
pub fn is_engine_from_app(cfg: &PodConfig, local: &Addr, local_port: u16) -> bool {
    cfg.flags & POD_CAPTURE_OUTBOUND != 0 && local_port == cfg.outbound_port && is_loopback(local)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InboundVerdict {
    /// Let the kernel's normal lookup find the app's socket.
    Passthrough,
    /// Assign the connection to the pod's inbound listener.
    Steer,
}

/// Istio's inbound precedence: with `includeInboundPorts: "*"` every port but
/// the excluded ones; with a list, exactly the listed ports. The engine's
/// own connections (from 127.0.0.6 / ::6) and connections to the inbound
/// port itself are never steered.
#[inline(always)]
pub fn inbound_verdict(cfg: &PodConfig, remote: &Addr, local_port: u16, port_rule: u8) -> InboundVerdict {
    if cfg.flags & POD_CAPTURE_INBOUND == 0 || local_port == cfg.inbound_port || is_engine_source(remote) {
        return InboundVerdict::Passthrough;
    }
    let in_scope =
        if cfg.flags & POD_INCLUDE_ALL_INBOUND != 0 { port_rule != PORT_EXCLUDED } else { port_rule == PORT_INCLUDED };
    if in_scope {
        InboundVerdict::Steer
    } else {
        InboundVerdict::Passthrough
    }
}

#[inline(always)]
pub fn is_engine_source(addr: &Addr) -> bool {
    match crate::addr::mapped_v4(addr) {
        Some(ip4) => ip4 == crate::addr::ENGINE_SOURCE_V4,
        None => {
            let e = crate::addr::ENGINE_SOURCE_V6;
            addr[0] == e[0] && addr[1] == e[1] && addr[2] == e[2] && addr[3] == e[3]
        }
    }
}
