//! Outbound: the app's connect was steered to 127.0.0.1:15001 (or [::1]);
//! find where it was going and connect there from a socket made in the pod's
//! netns, so the packets leave with the pod's own source address.

use std::{
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use aya::maps::{HashMap, MapData};
use meshcap_common::{FlowKey, OrigDst};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};

use super::{from_addr, relay, to_addr, PodStats};
use crate::netns::Netns;

pub(super) struct Outbound {
    pub pod: String,
    pub netns: Netns,
    pub stats: Arc<PodStats>,
    pub flows: HashMap<MapData, FlowKey, OrigDst>,
    pub abort: watch::Receiver<bool>,
    /// Per-connection problems are logged at most every few seconds: an app
    /// must not be able to flood the agent's log.
    pub last_warning: Option<std::time::Instant>,
}

const WARN_EVERY: Duration = Duration::from_secs(10);

impl Outbound {
    pub(super) async fn accept_loop(mut self, listener: TcpListener, mut stop: watch::Receiver<bool>) {
        loop {
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(pod = %self.pod, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stop.changed() => return,
            };
            self.stats.accepted.fetch_add(1, Ordering::Relaxed);
            let Some(orig) = self.original_destination(&stream, peer) else {
                // Not a redirected connect (or its record was evicted): nothing to
                // forward to. Reset rather than guess.
                if self.last_warning.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                    self.last_warning = Some(std::time::Instant::now());
                    tracing::warn!(
                        pod = %self.pod,
                        %peer,
                        "no original destination for a connection to the outbound listener (not redirected by \
                         meshcap, or its record was evicted: raise --max-flows); resetting it (further ones \
                         are counted as failed, logged every 10s)"
                    );
                }
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                relay::reset(stream);
                continue;
            };
            let (netns, stats, pod, abort) =
                (self.netns.clone(), self.stats.clone(), self.pod.clone(), self.abort.clone());
            tokio::spawn(async move {
                stats.active.fetch_add(1, Ordering::Relaxed);
                match super::connect_in(&netns, orig, None).await {
                    Ok(upstream) => {
                        stats.relayed.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%pod, %peer, dst = %orig, "relaying");
                        relay::relay(stream, upstream, &stats, abort).await;
                    }
                    Err(e) => {
                        tracing::debug!(%pod, dst = %orig, error = %e, "upstream connect failed; resetting the app's connection");
                        stats.failed.fetch_add(1, Ordering::Relaxed);
                        relay::reset(stream);
                    }
                }
                stats.active.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }

    fn original_destination(&mut self, stream: &TcpStream, peer: SocketAddr) -> Option<SocketAddr> {
        let local = stream.local_addr().ok()?;
        let key = FlowKey::new(self.netns.cookie(), to_addr(peer.ip()), peer.port(), to_addr(local.ip()), local.port());
        let orig = self.flows.get(&key, 0).ok()?;
        let _ = self.flows.remove(&key);
        Some(SocketAddr::new(from_addr(&orig.addr), orig.port))
    }
}
