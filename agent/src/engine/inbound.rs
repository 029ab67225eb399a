//! Inbound: sk_lookup assigned a connection for the pod's IP to the inbound
//! listener; its local address is where the client was going. Forward it to
//! that same address (never 127.0.0.1: a port the app bound only on
//! loopback stays unreachable, as without a mesh) from 127.0.0.6 / ::6,
//! which sk_lookup never steers.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use tokio::{net::TcpListener, sync::watch};

use super::{relay, PodStats};
use crate::netns::Netns;

const SOURCE_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
const SOURCE_V6: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

pub(super) struct Inbound {
    pub pod: String,
    pub netns: Netns,
    pub stats: Arc<PodStats>,
    pub inbound_port: u16,
    pub abort: watch::Receiver<bool>,
}

/// Gives the pod's `lo` the IPv6 engine source; a pod without IPv6 skips it.
pub(super) async fn prepare_source(pod: &str, netns: &Netns) {
    match netns.run(|| crate::netns::add_loopback_v6(SOURCE_V6)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::info!(pod, error = %e, "cannot add ::6 to lo; inbound IPv6 is not relayed"),
        Err(e) => tracing::warn!(pod, error = %e, "netns worker gone"),
    }
}

impl Inbound {
    pub(super) async fn accept_loop(self, listener: TcpListener, mut stop: watch::Receiver<bool>) {
        let this = Arc::new(self);
        loop {
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(pod = %this.pod, error = %e, "inbound accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stop.changed() => return,
            };
            this.stats.accepted.fetch_add(1, Ordering::Relaxed);
            let Ok(dst) = stream.local_addr() else {
                relay::reset(stream);
                continue;
            };
            if dst.port() == this.inbound_port {
                // Someone dialed the inbound port itself: never loop into it.
                this.stats.failed.fetch_add(1, Ordering::Relaxed);
                relay::reset(stream);
                continue;
            }
            let this = this.clone();
            tokio::spawn(async move {
                this.stats.active.fetch_add(1, Ordering::Relaxed);
                let source = match dst.ip() {
                    IpAddr::V4(_) => IpAddr::V4(SOURCE_V4),
                    IpAddr::V6(_) => IpAddr::V6(SOURCE_V6),
                };
                match super::connect_in(&this.netns, SocketAddr::new(dst.ip(), dst.port()), Some(source)).await {
                    Ok(app) => {
                        this.stats.relayed.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(pod = %this.pod, %peer, %dst, "inbound relaying");
                        relay::relay(stream, app, &this.stats, this.abort.clone()).await;
                    }
                    Err(e) => {
                        // Closed port (or a port the app bound only on loopback):
                        // the client gets a reset at once, as it would without a mesh.
                        tracing::debug!(pod = %this.pod, %dst, error = %e, "inbound: app not reachable; resetting");
                        this.stats.failed.fetch_add(1, Ordering::Relaxed);
                        relay::reset(stream);
                    }
                }
                this.stats.active.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }
}
