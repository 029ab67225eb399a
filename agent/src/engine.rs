//! The in-node engine: listeners inside each enrolled pod's netns and the
//! relays behind them. Plaintext relay for now; TLS wraps the upstream side.

mod inbound;
mod outbound;
pub mod relay;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd as _, RawFd},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use meshcap_common::{addr_from_octets, addr_octets, Addr};
use serde::Serialize;
use tokio::sync::watch;

use crate::{
    capture::{CaptureMode, Pins, ENGINE_MARK},
    netns::Netns,
};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("pod {pod}: binding {addr} in its netns: {source} (is the app using this port?)")]
    Bind { pod: String, addr: SocketAddr, source: std::io::Error },
    #[error("pod {pod}: {source}")]
    Netns { pod: String, source: crate::netns::NetnsError },
    #[error("pod {pod}: opening the flow table: {source}")]
    FlowTable { pod: String, source: crate::capture::CaptureError },
}

/// Per-pod relay counters of one direction, shared with status and metrics.
#[derive(Debug, Default)]
pub struct PodStats {
    pub accepted: AtomicU64,
    pub relayed: AtomicU64,
    pub active: AtomicU64,
    pub failed: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    /// Connections carried over mTLS / in plaintext.
    pub mtls: AtomicU64,
    pub plaintext: AtomicU64,
    /// Plaintext refused by STRICT.
    pub plaintext_refused: AtomicU64,
    /// Verified peer SPIFFE IDs, with connection counts.
    pub peer_ids: Mutex<BTreeMap<String, u64>>,
    /// TLS handshake failures by reason.
    pub tls_failures: Mutex<BTreeMap<String, u64>>,
    /// Distinct peer SVIDs seen, as "SPIFFE ID expiring at unix second"
    /// (a rotation shows up as a second entry); the most recent few.
    pub peer_svids: Mutex<std::collections::VecDeque<String>>,
}

const PEER_SVIDS_KEPT: usize = 16;

#[derive(Debug, Clone, Serialize)]
pub struct PodStatsSnapshot {
    pub accepted: u64,
    pub relayed: u64,
    pub active: u64,
    pub failed: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub mtls: u64,
    pub plaintext: u64,
    pub plaintext_refused: u64,
    pub peer_ids: BTreeMap<String, u64>,
    pub tls_failures: BTreeMap<String, u64>,
    pub peer_svids: Vec<String>,
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
            mtls: g(&self.mtls),
            plaintext: g(&self.plaintext),
            plaintext_refused: g(&self.plaintext_refused),
            peer_ids: self.peer_ids.lock().expect("stats lock").clone(),
            tls_failures: self.tls_failures.lock().expect("stats lock").clone(),
            peer_svids: self.peer_svids.lock().expect("stats lock").iter().cloned().collect(),
        }
    }

    pub fn peer_verified(&self, id: &crate::identity::SpiffeId, not_after: Option<std::time::SystemTime>) {
        self.mtls.fetch_add(1, Ordering::Relaxed);
        *self.peer_ids.lock().expect("stats lock").entry(id.to_string()).or_default() += 1;
        let secs = not_after.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_secs());
        let svid = format!("{id} until {secs}");
        let mut seen = self.peer_svids.lock().expect("stats lock");
        if !seen.contains(&svid) {
            if seen.len() == PEER_SVIDS_KEPT {
                seen.pop_front();
            }
            seen.push_back(svid);
        }
    }

    /// Counts a failed handshake under one of a fixed set of reasons (the
    /// full text goes to the log): a peer must not be able to grow the map,
    /// or the metric labels, by varying what it sends.
    pub fn tls_failed(&self, reason: &str) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        *self.tls_failures.lock().expect("stats lock").entry(failure_kind(reason).to_string()).or_default() += 1;
    }
}

/// The fixed reasons TLS failures are counted under.
pub fn failure_kind(reason: &str) -> &'static str {
    const KINDS: [(&str, &str); 11] = [
        ("expected spiffe://", "wrong_identity"),
        ("certificate expired", "expired"),
        ("not valid yet", "not_yet_valid"),
        ("URI SAN", "bad_uri_san"),
        ("is a CA", "leaf_is_ca"),
        ("no trust bundle", "unknown_trust_domain"),
        ("does not verify", "untrusted_chain"),
        ("UnknownIssuer", "untrusted_chain"),
        ("no certificates", "no_peer_certificate"),
        ("timed out", "timeout"),
        ("corrupt message", "not_tls"),
    ];
    KINDS.iter().find(|(needle, _)| reason.contains(needle)).map_or("other", |(_, kind)| kind)
}

/// What the engine of one pod needs besides its netns: its identity, the
/// mesh, and its inbound mTLS mode, each a `watch` so updates (rotation,
/// pods and policies changing) reach new connections without a lock.
#[derive(Clone)]
pub struct EngineContext {
    pub identity: crate::agent::identities::IdentityWatch,
    pub mesh: watch::Receiver<Arc<crate::mesh::MeshIndex>>,
    pub mtls: watch::Receiver<crate::policy::InboundMtls>,
    /// How long inbound waits for a client's first bytes to tell TLS from
    /// plaintext (PERMISSIVE) before treating it as a server-first protocol.
    pub detect_timeout: Duration,
    /// How long a half-closed connection may stay idle before it is reset.
    pub half_closed_idle: Duration,
}

/// One pod's engine side. Dropping it closes the listeners; connections in
/// flight keep going until they end (or the agent's drain deadline).
pub struct PodEngine {
    pub stats: Arc<PodStats>,
    pub inbound_stats: Arc<PodStats>,
    /// The inbound listeners, (address family, fd), for the sk_lookup map.
    pub inbound_listeners: Vec<(u32, RawFd)>,
    stop: watch::Sender<bool>,
    abort: watch::Sender<bool>,
}

/// Ports of a pod's listeners, and how connections are brought to them.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub outbound: u16,
    pub inbound: u16,
    pub mode: CaptureMode,
}

impl Ports {
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self { outbound: config.outbound_port, inbound: config.inbound_port, mode: config.capture_mode }
    }

    /// In iptables mode the engine's sockets carry the mark the rules skip.
    fn mark(&self) -> Option<u32> {
        (self.mode == CaptureMode::Iptables).then_some(ENGINE_MARK)
    }
}

impl PodEngine {
    /// Opens the outbound and inbound listeners inside the pod's netns and
    /// starts accepting. Must run inside the runtime.
    pub async fn start(
        pod: &str,
        netns: Netns,
        pins: &Pins,
        ports: Ports,
        ctx: EngineContext,
    ) -> Result<Self, EngineError> {
        let stats = Arc::new(PodStats::default());
        let inbound_stats = Arc::new(PodStats::default());
        let (stop, stopped) = watch::channel(false);
        let (abort, aborted) = watch::channel(false);
        // REDIRECT in PREROUTING sends inbound connections to the pod's own
        // address: in iptables mode the inbound listener takes any address.
        let inbound_ips = match ports.mode {
            CaptureMode::Ebpf => LOOPBACK_LISTENERS,
            CaptureMode::Iptables => WILDCARD_LISTENERS,
        };
        let outbound_listeners = bind_listeners(pod, &netns, LOOPBACK_LISTENERS, ports.outbound).await?;
        let inbound_listeners = bind_listeners(pod, &netns, inbound_ips, ports.inbound).await?;
        inbound::prepare_source(pod, &netns).await;
        for listener in outbound_listeners {
            let flows = match ports.mode {
                CaptureMode::Ebpf => Some(
                    crate::capture::open_flow_table(pins)
                        .map_err(|source| EngineError::FlowTable { pod: pod.into(), source })?,
                ),
                CaptureMode::Iptables => None,
            };
            let out = outbound::Outbound {
                pod: pod.into(),
                netns: netns.clone(),
                stats: stats.clone(),
                flows,
                abort: aborted.clone(),
                last_warning: None,
                ctx: ctx.clone(),
                mark: ports.mark(),
            };
            tokio::spawn(out.accept_loop(listener, stopped.clone()));
        }
        let mut fds = Vec::new();
        for listener in inbound_listeners {
            let family = if listener.local_addr().is_ok_and(|a| a.is_ipv4()) { libc::AF_INET } else { libc::AF_INET6 };
            fds.push((family as u32, listener.as_raw_fd()));
            let inb = inbound::Inbound {
                pod: pod.into(),
                netns: netns.clone(),
                stats: inbound_stats.clone(),
                inbound_port: ports.inbound,
                abort: aborted.clone(),
                ctx: ctx.clone(),
                mark: ports.mark(),
            };
            tokio::spawn(inb.accept_loop(listener, stopped.clone()));
        }
        Ok(Self { stats, inbound_stats, inbound_listeners: fds, stop, abort })
    }

    /// Stops accepting; relayed connections go on.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Resets every connection still relayed (the drain deadline passed).
    pub fn abort(&self) {
        let _ = self.abort.send(true);
    }
}

impl Drop for PodEngine {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Listeners on the IPv4 address always and the IPv6 one when the pod has
/// IPv6, created inside the pod's netns. For eBPF capture loopback only:
/// nothing outside the pod can connect to them directly (sk_lookup assigns
/// inbound connections).
async fn bind_listeners(
    pod: &str,
    netns: &Netns,
    ips: [IpAddr; 2],
    port: u16,
) -> Result<Vec<TcpListener>, EngineError> {
    let mut out = Vec::new();
    for ip in ips {
        let addr = SocketAddr::new(ip, port);
        let made = netns
            .run(move || -> std::io::Result<std::net::TcpListener> {
                let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
                s.set_reuse_address(true)?;
                if addr.is_ipv6() {
                    s.set_only_v6(true)?;
                }
                s.bind(&addr.into())?;
                s.listen(4096)?;
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
                tracing::info!(pod, port, "no IPv6 loopback in the pod; IPv6 listener skipped")
            }
            Err(source) => return Err(EngineError::Bind { pod: pod.into(), addr, source }),
        }
    }
    Ok(out)
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to `dst` from a socket made inside the pod's netns, optionally
/// bound to `source` first and marked with `mark`.
async fn connect_in(
    netns: &Netns,
    dst: SocketAddr,
    source: Option<IpAddr>,
    mark: Option<u32>,
) -> std::io::Result<TcpStream> {
    let made = netns
        .run(move || -> std::io::Result<std::net::TcpStream> {
            let s = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
            if let Some(mark) = mark {
                s.set_mark(mark)?;
            }
            if let Some(ip) = source {
                // Port chosen at connect() against the destination, not at bind()
                // against every socket on 127.0.0.6: otherwise each relayed
                // connection's TIME_WAIT on that address blocks its port for any
                // destination, and a busy pod scans the whole range per connection.
                bind_address_no_port(&s)?;
                s.bind(&SocketAddr::new(ip, 0).into())?;
            }
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

fn bind_address_no_port(s: &Socket) -> std::io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt on an owned socket with a c_int option of the right size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Where a connection REDIRECTed by iptables was going (`SO_ORIGINAL_DST`,
/// `IP6T_SO_ORIGINAL_DST`): conntrack keeps it for the NATed flow.
fn redirected_destination(stream: &TcpStream) -> std::io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let addr = if stream.local_addr()?.is_ipv4() { sock.original_dst_v4()? } else { sock.original_dst_v6()? };
    addr.as_socket().ok_or_else(|| std::io::Error::other("original destination is not an IP address"))
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
const WILDCARD_LISTENERS: [IpAddr; 2] = [IpAddr::V4(Ipv4Addr::UNSPECIFIED), IpAddr::V6(Ipv6Addr::UNSPECIFIED)];

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
