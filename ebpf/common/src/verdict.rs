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

/// Istio's precedence for outbound capture: loopback and the engine's own
/// port are never captured; an excluded port or range wins over an included
/// range; without an include list everything else is captured.
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
