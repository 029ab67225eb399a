//! Which pods are enrolled and with what exclusions. Pure logic: labels and
//! annotations in, a decision and warnings out.

use std::{collections::BTreeSet, fmt, net::IpAddr};

use ipnet::IpNet;
use serde::Serialize;

use crate::pods::PodInfo;

pub mod mtls;
pub use mtls::{inbound_mtls, InboundMtls, MtlsWarning, PeerMode};

pub const INJECT_LABEL: &str = "sidecar.istio.io/inject";
pub const IDENTITY_LABEL: &str = "spire-managed-identity";
pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
pub const EXCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
pub const INCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/includeOutboundIPRanges";
pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
pub const INCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Enrollment {
    Enrolled,
    /// No injection asked for.
    NotRequested,
    /// Injection asked for, but SPIRE will not issue the pod an identity.
    MissingIdentityLabel,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum IncludeNets {
    /// Istio's default `*`.
    All,
    Only(Vec<IpNet>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutboundRules {
    pub exclude_ports: BTreeSet<u16>,
    pub exclude_nets: Vec<IpNet>,
    pub include_nets: IncludeNets,
}

impl Default for OutboundRules {
    fn default() -> Self {
        Self { exclude_ports: BTreeSet::new(), exclude_nets: Vec::new(), include_nets: IncludeNets::All }
    }
}

/// Inbound ports in scope, as Istio reads `includeInboundPorts` /
/// `excludeInboundPorts`: with `*` (the default) every port but the excluded
/// ones; with a list exactly those ports (exclusions then do not apply).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum InboundRules {
    AllExcept(BTreeSet<u16>),
    Only(BTreeSet<u16>),
}

impl Default for InboundRules {
    fn default() -> Self {
        Self::AllExcept(BTreeSet::new())
    }
}

/// A bad annotation value: the annotation is ignored as a whole and the
/// default used, so a typo never half-applies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyWarning {
    pub pod: String,
    pub annotation: String,
    pub value: String,
    pub reason: String,
    pub fallback: &'static str,
}

impl fmt::Display for PolicyWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pod {}: annotation {}={:?} ignored: {}; using {}",
            self.pod, self.annotation, self.value, self.reason, self.fallback
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodPolicy {
    pub enrollment: Enrollment,
    pub outbound: OutboundRules,
    pub inbound: InboundRules,
    pub warnings: Vec<PolicyWarning>,
}

fn is_true(v: Option<&String>) -> bool {
    v.is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// Istio reads `sidecar.istio.io/inject` as a label, and still honours the
/// older annotation form; the label wins when both are present.
pub fn asks_injection(
    labels: &std::collections::BTreeMap<String, String>,
    annotations: &std::collections::BTreeMap<String, String>,
) -> bool {
    match labels.get(INJECT_LABEL) {
        Some(v) => is_true(Some(v)),
        None => is_true(annotations.get(INJECT_LABEL)),
    }
}

pub fn enrollment(pod: &PodInfo) -> Enrollment {
    if !asks_injection(&pod.labels, &pod.annotations) {
        Enrollment::NotRequested
    } else if !is_true(pod.labels.get(IDENTITY_LABEL)) {
        Enrollment::MissingIdentityLabel
    } else {
        Enrollment::Enrolled
    }
}

pub fn pod_policy(pod: &PodInfo) -> PodPolicy {
    let mut warnings = Vec::new();
    let mut warn = |annotation: &str, value: &str, reason: String, fallback: &'static str| {
        warnings.push(PolicyWarning {
            pod: pod.key(),
            annotation: annotation.into(),
            value: value.into(),
            reason,
            fallback,
        })
    };
    let mut outbound = OutboundRules::default();
    if let Some(v) = pod.annotations.get(EXCLUDE_OUTBOUND_PORTS) {
        match parse_ports(v) {
            Ok(ports) => outbound.exclude_ports = ports,
            Err(reason) => warn(EXCLUDE_OUTBOUND_PORTS, v, reason, "no excluded ports"),
        }
    }
    if let Some(v) = pod.annotations.get(EXCLUDE_OUTBOUND_IP_RANGES) {
        match parse_nets(v) {
            Ok(NetList::Nets(nets)) => outbound.exclude_nets = nets,
            Ok(NetList::All) => warn(
                EXCLUDE_OUTBOUND_IP_RANGES,
                v,
                "`*` would exclude all outbound traffic; remove the inject label instead".into(),
                "no excluded ranges",
            ),
            Err(reason) => warn(EXCLUDE_OUTBOUND_IP_RANGES, v, reason, "no excluded ranges"),
        }
    }
    if let Some(v) = pod.annotations.get(INCLUDE_OUTBOUND_IP_RANGES) {
        match parse_nets(v) {
            Ok(NetList::All) => outbound.include_nets = IncludeNets::All,
            Ok(NetList::Nets(nets)) => outbound.include_nets = IncludeNets::Only(nets),
            Err(reason) => warn(INCLUDE_OUTBOUND_IP_RANGES, v, reason, "the default `*` (capture all)"),
        }
    }
    let mut excluded_inbound = BTreeSet::new();
    if let Some(v) = pod.annotations.get(EXCLUDE_INBOUND_PORTS) {
        match parse_ports(v) {
            Ok(ports) => excluded_inbound = ports,
            Err(reason) => warn(EXCLUDE_INBOUND_PORTS, v, reason, "no excluded inbound ports"),
        }
    }
    let mut inbound = InboundRules::AllExcept(excluded_inbound);
    if let Some(v) = pod.annotations.get(INCLUDE_INBOUND_PORTS) {
        if v.trim() != "*" {
            match parse_ports(v) {
                Ok(ports) => inbound = InboundRules::Only(ports),
                Err(reason) => warn(INCLUDE_INBOUND_PORTS, v, reason, "the default `*` (capture all inbound ports)"),
            }
        }
    }
    PodPolicy { enrollment: enrollment(pod), outbound, inbound, warnings }
}

/// Comma-separated ports, as Istio writes them; blanks ignored.
pub fn parse_ports(v: &str) -> Result<BTreeSet<u16>, String> {
    let mut out = BTreeSet::new();
    for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item.parse::<u16>() {
            Ok(p) if p != 0 => {
                out.insert(p);
            }
            _ => return Err(format!("{item:?} is not a port (1-65535)")),
        }
    }
    Ok(out)
}

#[derive(Debug, PartialEq, Eq)]
pub enum NetList {
    All,
    Nets(Vec<IpNet>),
}

/// Comma-separated CIDRs or addresses, or `*`. IPv4-mapped IPv6 ranges are
/// stored as IPv4, as the hooks see such destinations.
pub fn parse_nets(v: &str) -> Result<NetList, String> {
    if v.trim() == "*" {
        return Ok(NetList::All);
    }
    let mut out = Vec::new();
    for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let net = match item.parse::<IpNet>() {
            Ok(n) => n,
            Err(_) => match item.parse::<IpAddr>() {
                Ok(ip) => IpNet::from(ip),
                Err(_) => return Err(format!("{item:?} is not an IP range (like 10.0.0.0/8 or fd00::/8)")),
            },
        };
        out.push(net.trunc());
    }
    Ok(NetList::Nets(out))
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
