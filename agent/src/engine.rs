//! The in-node engine: listeners inside each enrolled pod's netns and the
//! relays behind them. Plaintext relay for now; TLS wraps the upstream side.

mod outbound;
mod relay;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use meshcap_common::{addr_from_octets, addr_octets, Addr};
use serde::Serialize;
use tokio::sync::watch;

use crate::{capture::Pins, netns::Netns};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("pod {pod}: binding {addr} in its netns: {source} (is the app using this port?)")]
    Bind { pod: String, addr: SocketAddr, source: std::io::Error },
    #[error("pod {pod}: {source}")]
    Netns { pod: String, source: crate::netns::NetnsError },
    #[error("pod {pod}: opening the flow table: {source}")]
    FlowTable { pod: String, source: crate::capture::CaptureError },
}

/// Per-pod relay counters, shared with status and metrics.
#[derive(Debug, Default)]
pub struct PodStats {
    pub accepted: AtomicU64,
    pub relayed: AtomicU64,
    pub active: AtomicU64,
    pub failed: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PodStatsSnapshot {
    pub accepted: u64,
    pub relayed: u64,
    pub active: u64,
    pub failed: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

impl PodStats {
    pub fn snapshot(&self) -> PodStatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PodStatsSnapshot {
            accepted: g(&self.accepted),
            relayed: g(&self.relayed),
            active: g(&self.active),
            failed: g(&self.failed),
            bytes_sent: g(&self.bytes_sent),
            bytes_received: g(&self.bytes_received),
        }
    }
}

/// One pod's engine side. Dropping it closes the listeners; connections in
/// flight keep going until they end (or the agent's drain deadline).
pub struct PodEngine {
    pub stats: Arc<PodStats>,
    stop: watch::Sender<bool>,
}

impl PodEngine {
    /// Opens the outbound listeners inside the pod's netns and starts
    /// accepting. Must run inside the runtime.
    pub async fn start(pod: &str, netns: Netns, pins: &Pins, outbound_port: u16) -> Result<Self, EngineError> {
        let stats = Arc::new(PodStats::default());
        let (stop, stopped) = watch::channel(false);
        let listeners = outbound::bind(pod, &netns, outbound_port).await?;
        for listener in listeners {
            let flows = crate::capture::open_flow_table(pins)
                .map_err(|source| EngineError::FlowTable { pod: pod.into(), source })?;
            let ctx = outbound::Outbound { pod: pod.into(), netns: netns.clone(), stats: stats.clone(), flows };
            tokio::spawn(ctx.accept_loop(listener, stopped.clone()));
        }
        Ok(Self { stats, stop })
    }

    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

impl Drop for PodEngine {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A socket address as the maps store it (IPv4 as IPv4-mapped).
pub fn to_addr(ip: IpAddr) -> Addr {
    let v6 = match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    };
    addr_from_octets(&v6.octets())
}

/// Inverse of [`to_addr`]: mapped addresses come back as IPv4.
pub fn from_addr(addr: &Addr) -> IpAddr {
    let v6 = Ipv6Addr::from(addr_octets(addr));
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

pub const LOOPBACK_LISTENERS: [IpAddr; 2] = [IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addr_round_trips_and_maps_v4() {
        for ip in ["10.0.2.7", "fd00::7", "::1", "127.0.0.1"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(from_addr(&to_addr(ip)), ip);
        }
        let mapped: IpAddr = "::ffff:10.0.2.7".parse().unwrap();
        assert_eq!(from_addr(&to_addr(mapped)), "10.0.2.7".parse::<IpAddr>().unwrap());
        assert_eq!(to_addr(mapped), to_addr("10.0.2.7".parse().unwrap()));
    }
}
