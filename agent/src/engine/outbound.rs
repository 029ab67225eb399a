//! Outbound: the app's connect was steered to 127.0.0.1:15001 (or [::1]);
//! find where it was going and connect there from a socket made in the pod's
//! netns, so the packets leave with the pod's own source address. To a
//! meshed pod the connection is mutual TLS with this pod's SVID, and the
//! server must prove the identity expected for that pod before a single
//! byte of the app's goes out; to anything else it is passed through.

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

use super::{from_addr, relay, to_addr, EngineContext, PodStats};
use crate::{
    identity::{handshake_failure, peer_id, peer_not_after, SpiffeId},
    mesh::Upstream,
    netns::Netns,
};

pub(super) struct Outbound {
    pub pod: String,
    pub netns: Netns,
    pub stats: Arc<PodStats>,
    /// eBPF capture's record of original destinations; None in iptables
    /// mode, where conntrack has it (`SO_ORIGINAL_DST`).
    pub flows: Option<HashMap<MapData, FlowKey, OrigDst>>,
    pub abort: watch::Receiver<bool>,
    /// Per-connection problems are logged at most every few seconds: an app
    /// must not be able to flood the agent's log.
    pub last_warning: Option<std::time::Instant>,
    pub ctx: EngineContext,
    /// SO_MARK of upstream sockets (iptables mode: the rules skip it).
    pub mark: Option<u32>,
}

const WARN_EVERY: Duration = Duration::from_secs(10);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
            let conn = Connection {
                pod: self.pod.clone(),
                netns: self.netns.clone(),
                stats: self.stats.clone(),
                abort: self.abort.clone(),
                plan: self.ctx.mesh.borrow().upstream(orig),
                identity: self.ctx.identity.clone(),
                half_closed_idle: self.ctx.half_closed_idle,
                mark: self.mark,
            };
            tokio::spawn(async move {
                conn.stats.active.fetch_add(1, Ordering::Relaxed);
                conn.carry(stream, peer, orig).await;
                conn.stats.active.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }

    fn original_destination(&mut self, stream: &TcpStream, peer: SocketAddr) -> Option<SocketAddr> {
        let Some(flows) = self.flows.as_mut() else {
            return super::redirected_destination(stream).ok();
        };
        let local = stream.local_addr().ok()?;
        let key = FlowKey::new(self.netns.cookie(), to_addr(peer.ip()), peer.port(), to_addr(local.ip()), local.port());
        let orig = flows.get(&key, 0).ok()?;
        let _ = flows.remove(&key);
        Some(SocketAddr::new(from_addr(&orig.addr), orig.port))
    }
}

/// One captured connection on its way out.
struct Connection {
    pod: String,
    netns: Netns,
    stats: Arc<PodStats>,
    abort: watch::Receiver<bool>,
    plan: Upstream,
    identity: crate::agent::identities::IdentityWatch,
    half_closed_idle: Duration,
    mark: Option<u32>,
}

impl Connection {
    async fn carry(&self, app: TcpStream, peer: SocketAddr, dst: SocketAddr) {
        let pod = &self.pod;
        // Fail closed: a meshed destination never gets plaintext from a pod
        // whose SVID is not there yet.
        let identity = match &self.plan {
            Upstream::Mtls { .. } => match self.identity.borrow().clone() {
                Some(identity) => Some(identity),
                None => {
                    tracing::warn!(%pod, %dst, "no SVID for this pod yet: refusing its connection to a meshed pod");
                    self.stats.failed.fetch_add(1, Ordering::Relaxed);
                    relay::reset(app);
                    return;
                }
            },
            Upstream::Plaintext => None,
        };
        let upstream = match super::connect_in(&self.netns, dst, None, self.mark).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%pod, %dst, error = %e, "upstream connect failed; resetting the app's connection");
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                relay::reset(app);
                return;
            }
        };
        let (Upstream::Mtls { expected }, Some(identity)) = (&self.plan, identity) else {
            tracing::debug!(%pod, %peer, %dst, "relaying in plaintext (not a meshed destination)");
            self.stats.relayed.fetch_add(1, Ordering::Relaxed);
            self.stats.plaintext.fetch_add(1, Ordering::Relaxed);
            relay::relay(app, upstream, &self.stats, self.abort.clone(), self.half_closed_idle).await;
            return;
        };
        // Boxed: a task is as big as its largest state, and the TLS states
        // (handshake, session) are kilobytes a plaintext relay must not carry.
        Box::pin(self.carry_mtls(app, upstream, dst, expected, identity)).await;
    }

    async fn carry_mtls(
        &self,
        app: TcpStream,
        upstream: TcpStream,
        dst: SocketAddr,
        expected: &SpiffeId,
        identity: Arc<crate::identity::TlsIdentity>,
    ) {
        let pod = &self.pod;
        let connector = tokio_rustls::TlsConnector::from(identity.client_for(expected));
        // No SNI: the server name is the destination IP, which TLS does not
        // send; identity is checked on the certificate, never on a name.
        let name = rustls::pki_types::ServerName::IpAddress(dst.ip().into());
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, upstream)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                let reason = handshake_failure(&e).map_or_else(|| e.to_string(), ToString::to_string);
                return self.refuse(app, dst, expected, &reason);
            }
            Err(_) => return self.refuse(app, dst, expected, "TLS handshake timed out"),
        };
        // The verifier from `client_for` already required `expected`; checked again so that no config
        // built some other way can ever relay to the wrong peer.
        match peer_id(tls.get_ref().1.peer_certificates()) {
            Some(id) if id == *expected => {
                tracing::debug!(%pod, %dst, peer_id = %id, "mTLS established");
                self.stats.relayed.fetch_add(1, Ordering::Relaxed);
                self.stats.peer_verified(&id, peer_not_after(tls.get_ref().1.peer_certificates()));
                relay::relay(app, tls, &self.stats, self.abort.clone(), self.half_closed_idle).await;
            }
            got => {
                let got = got.map_or_else(|| "no SPIFFE ID".to_string(), |id| id.to_string());
                relay::reset(tls);
                self.refuse(app, dst, expected, &format!("server presented {got}, expected {expected}"));
            }
        }
    }

    fn refuse(&self, app: TcpStream, dst: SocketAddr, expected: &SpiffeId, reason: &str) {
        tracing::warn!(pod = %self.pod, %dst, %expected, reason, "mTLS to a meshed pod failed; connection refused");
        self.stats.tls_failed(reason);
        relay::reset(app);
    }
}
