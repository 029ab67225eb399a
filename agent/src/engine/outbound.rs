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
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::watch,
};

use super::{from_addr, relay, to_addr, EngineError, PodStats, LOOPBACK_LISTENERS};
use crate::netns::Netns;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) struct Outbound {
    pub pod: String,
    pub netns: Netns,
    pub stats: Arc<PodStats>,
    pub flows: HashMap<MapData, FlowKey, OrigDst>,
}

/// 127.0.0.1:port always; [::1]:port when the pod has IPv6.
pub(super) async fn bind(pod: &str, netns: &Netns, port: u16) -> Result<Vec<TcpListener>, EngineError> {
    let mut out = Vec::new();
    for ip in LOOPBACK_LISTENERS {
        let addr = SocketAddr::new(ip, port);
        let made = netns
            .run(move || -> std::io::Result<std::net::TcpListener> {
                let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
                s.set_reuse_address(true)?;
                if addr.is_ipv6() {
                    s.set_only_v6(true)?;
                }
                s.bind(&addr.into())?;
                s.listen(1024)?;
                s.set_nonblocking(true)?;
                Ok(s.into())
            })
            .await
            .map_err(|source| EngineError::Netns { pod: pod.into(), source })?;
        match made {
            Ok(l) => out.push(TcpListener::from_std(l).map_err(|source| EngineError::Bind {
                pod: pod.into(),
                addr,
                source,
            })?),
            // A pod without IPv6 has no ::1; its IPv6 connects fail as they would without a mesh.
            Err(e) if addr.is_ipv6() && e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
                tracing::info!(pod, "no IPv6 loopback in the pod; outbound IPv6 listener skipped")
            }
            Err(source) => return Err(EngineError::Bind { pod: pod.into(), addr, source }),
        }
    }
    Ok(out)
}

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
                tracing::warn!(pod = %self.pod, %peer, "no original destination for connection; resetting it");
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                relay::reset(stream);
                continue;
            };
            let (netns, stats, pod) = (self.netns.clone(), self.stats.clone(), self.pod.clone());
            tokio::spawn(async move {
                stats.active.fetch_add(1, Ordering::Relaxed);
                match connect_upstream(&netns, orig).await {
                    Ok(upstream) => {
                        stats.relayed.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%pod, %peer, dst = %orig, "relaying");
                        relay::relay(stream, upstream, &stats).await;
                    }
                    Err(e) => {
                        tracing::info!(%pod, dst = %orig, error = %e, "upstream connect failed; resetting the app's connection");
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

async fn connect_upstream(netns: &Netns, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let made = netns
        .run(move || -> std::io::Result<std::net::TcpStream> {
            let s = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
            s.set_nonblocking(true)?;
            Ok(s.into())
        })
        .await
        .map_err(std::io::Error::other)??;
    let socket = TcpSocket::from_std_stream(made);
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, format!("connect to {dst} timed out")))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}
