//! Inbound: sk_lookup assigned a connection for the pod's IP to the inbound
//! listener; its local address is where the client was going. Forward it to
//! that same address (never 127.0.0.1: a port the app bound only on
//! loopback stays unreachable, as without a mesh) from 127.0.0.6 / ::6,
//! which sk_lookup never steers.
//!
//! The pod's PeerAuthentication mode for the port decides what comes in:
//! STRICT takes mutual TLS only (anything else is reset before a byte
//! reaches the app), PERMISSIVE tells TLS from plaintext by the first byte
//! (waiting a bounded time, so server-first protocols work), DISABLE passes
//! everything through. TLS is terminated with this pod's own SVID.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use tokio::{net::TcpListener, sync::watch};

use super::{relay, EngineContext, PodStats};
use crate::{
    identity::{peer_id, peer_not_after},
    netns::Netns,
    policy::PeerMode,
};

const SOURCE_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
const SOURCE_V6: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

pub(super) struct Inbound {
    pub pod: String,
    pub netns: Netns,
    pub stats: Arc<PodStats>,
    pub inbound_port: u16,
    pub abort: watch::Receiver<bool>,
    pub ctx: EngineContext,
    /// Some in iptables mode: sockets are marked, and connections arrive by
    /// REDIRECT, so the original destination comes from conntrack.
    pub mark: Option<u32>,
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Content type of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// What the client's first bytes say.
#[derive(Debug, PartialEq, Eq)]
enum FirstBytes {
    Tls,
    Plaintext,
    /// Nothing within the wait: a server-first protocol (or a slow client).
    Silent,
}

async fn first_bytes(stream: &tokio::net::TcpStream, wait: Duration) -> FirstBytes {
    let deadline = tokio::time::Instant::now() + wait;
    let mut head = [0u8; CLIENT_HELLO_PREFIX];
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut head)).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) => return FirstBytes::Plaintext,
            Err(_) => return FirstBytes::Silent,
        };
        match classify(&head[..n]) {
            Some(kind) => return kind,
            // A prefix of a ClientHello so far: wait for the rest (rare).
            None if tokio::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(1)).await,
            None => return FirstBytes::Plaintext,
        }
    }
}

/// Bytes of a TLS record header plus the handshake type that identify a
/// ClientHello: content type 22, legacy version 3.x, a length, type 1.
const CLIENT_HELLO_PREFIX: usize = 6;

/// `None` while what has arrived could still be the start of a ClientHello.
fn classify(head: &[u8]) -> Option<FirstBytes> {
    if head.is_empty() {
        return Some(FirstBytes::Plaintext); // EOF before any byte
    }
    let expect: [fn(u8) -> bool; CLIENT_HELLO_PREFIX] =
        [|b| b == TLS_HANDSHAKE, |b| b == 3, |b| b <= 4, |_| true, |_| true, |b| b == 1];
    if head.iter().zip(expect).any(|(b, ok)| !ok(*b)) {
        return Some(FirstBytes::Plaintext);
    }
    (head.len() >= CLIENT_HELLO_PREFIX).then_some(FirstBytes::Tls)
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
            let dst = match this.mark {
                None => stream.local_addr(),
                Some(_) => super::redirected_destination(&stream),
            };
            let Ok(dst) = dst else {
                // In iptables mode: a connection to the listener that no rule redirected.
                this.stats.failed.fetch_add(1, Ordering::Relaxed);
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
                this.carry(stream, peer, dst).await;
                this.stats.active.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }

    async fn carry(&self, client: tokio::net::TcpStream, peer: SocketAddr, dst: SocketAddr) {
        let pod = &self.pod;
        let mode = self.ctx.mtls.borrow().for_port(dst.port());
        let tls = match mode {
            PeerMode::Disable => false,
            // STRICT waits as long as a handshake may take: a meshed client
            // that is slow to send its ClientHello is not refused for it.
            PeerMode::Strict => match first_bytes(&client, HANDSHAKE_TIMEOUT).await {
                FirstBytes::Tls => true,
                FirstBytes::Plaintext | FirstBytes::Silent => {
                    tracing::info!(%pod, %peer, %dst, "STRICT: plaintext connection refused");
                    self.stats.plaintext_refused.fetch_add(1, Ordering::Relaxed);
                    self.stats.failed.fetch_add(1, Ordering::Relaxed);
                    relay::reset(client);
                    return;
                }
            },
            PeerMode::Permissive => {
                matches!(first_bytes(&client, self.ctx.detect_timeout).await, FirstBytes::Tls)
            }
        };
        if !tls {
            let Some(app) = self.connect_app(dst).await else {
                relay::reset(client);
                return;
            };
            self.stats.plaintext.fetch_add(1, Ordering::Relaxed);
            relay::relay(client, app, &self.stats, self.abort.clone(), self.ctx.half_closed_idle).await;
            return;
        }
        // Boxed: a task is as big as its largest state, and the TLS states
        // (handshake, session) are kilobytes a plaintext relay must not carry.
        Box::pin(self.carry_mtls(client, peer, dst)).await;
    }

    async fn carry_mtls(&self, client: tokio::net::TcpStream, peer: SocketAddr, dst: SocketAddr) {
        let pod = &self.pod;
        let Some(identity) = self.ctx.identity.borrow().clone() else {
            tracing::warn!(%pod, %peer, "no SVID for this pod yet: refusing an mTLS connection to it");
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            relay::reset(client);
            return;
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(identity.server.clone());
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(client)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::warn!(%pod, %peer, reason = %e, "inbound mTLS handshake failed; connection refused");
                self.stats.tls_failed(&e.to_string());
                return;
            }
            Err(_) => {
                tracing::warn!(%pod, %peer, "inbound mTLS handshake timed out");
                self.stats.tls_failed("TLS handshake timed out");
                return;
            }
        };
        let Some(client_id) = peer_id(tls.get_ref().1.peer_certificates()) else {
            self.stats.tls_failed("client presented no SPIFFE ID");
            relay::reset(tls);
            return;
        };
        tracing::debug!(%pod, %peer, peer_id = %client_id, %dst, "inbound mTLS established");
        self.stats.peer_verified(&client_id, peer_not_after(tls.get_ref().1.peer_certificates()));
        let Some(app) = self.connect_app(dst).await else {
            relay::reset(tls);
            return;
        };
        relay::relay(tls, app, &self.stats, self.abort.clone(), self.ctx.half_closed_idle).await;
    }

    /// Connects to the app at the original destination from the engine's
    /// source address; `None` (after counting) when it is not reachable.
    async fn connect_app(&self, dst: SocketAddr) -> Option<tokio::net::TcpStream> {
        let source = match dst.ip() {
            IpAddr::V4(_) => IpAddr::V4(SOURCE_V4),
            IpAddr::V6(_) => IpAddr::V6(SOURCE_V6),
        };
        match super::connect_in(&self.netns, SocketAddr::new(dst.ip(), dst.port()), Some(source), self.mark).await {
            Ok(app) => {
                self.stats.relayed.fetch_add(1, Ordering::Relaxed);
                Some(app)
            }
            Err(e) => {
                // Closed port (or a port the app bound only on loopback): the
                // client gets a reset at once, as it would without a mesh.
                tracing::debug!(pod = %self.pod, %dst, error = %e, "inbound: app not reachable; resetting");
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{classify, FirstBytes};

    #[test]
    fn only_a_client_hello_prefix_counts_as_tls() {
        assert_eq!(classify(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]), Some(FirstBytes::Tls));
        assert_eq!(classify(&[0x16, 0x03, 0x03, 0x00, 0x40, 0x01, 0xff]), Some(FirstBytes::Tls));
        assert_eq!(classify(&[0x16, 0x03]), None, "could still be TLS");
        assert_eq!(classify(&[0x16, 0x35]), Some(FirstBytes::Plaintext), "0x16 then text is plaintext");
        assert_eq!(classify(b"GET / HTTP/1.1"), Some(FirstBytes::Plaintext));
        assert_eq!(classify(&[0x16, 0x03, 0x01, 0x00, 0x05, 0x02]), Some(FirstBytes::Plaintext), "not a ClientHello");
        assert_eq!(classify(&[]), Some(FirstBytes::Plaintext));
    }
}
