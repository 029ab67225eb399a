//! Byte relay between two connections, plain TCP or TLS over TCP:
//! half-close propagates (EOF, or a TLS close_notify, on one side shuts down
//! the write side of the other, which for TLS sends close_notify), backpressure
//! comes from the bounded copy buffers, and an error on either side, such as a
//! reset, resets both.

use std::{
    pin::pin,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
    sync::watch,
    time::Instant,
};

use super::PodStats;

const BUF: usize = 64 * 1024;

/// A relayed connection: something to copy bytes through, over a TCP socket
/// that can be closed abortively.
pub trait Conn: AsyncRead + AsyncWrite + Unpin + Send {
    fn tcp(&self) -> &TcpStream;
}

impl Conn for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl Conn for tokio_rustls::client::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

impl Conn for tokio_rustls::server::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

/// Relays until both directions end. Once one direction has ended (a
/// half-close), the other may stay idle at most `half_closed_idle`: a peer
/// that half-closed and then vanished must not pin the pair forever.
/// `abort` (the drain deadline passed) resets both sides: a cut-off response
/// must not look complete to a protocol that ends responses by closing the
/// connection.
pub async fn relay<A: Conn, B: Conn>(
    app: A,
    upstream: B,
    stats: &PodStats,
    mut abort: watch::Receiver<bool>,
    half_closed_idle: Duration,
) {
    let _ = app.tcp().set_nodelay(true);
    let started = Instant::now();
    let last_activity = AtomicU64::new(0);
    let (mut app_r, mut app_w) = tokio::io::split(app);
    let (mut up_r, mut up_w) = tokio::io::split(upstream);
    let outcome = {
        let mut sent = pin!(copy_half(&mut app_r, &mut up_w, started, &last_activity, &stats.bytes_sent));
        let mut received = pin!(copy_half(&mut up_r, &mut app_w, started, &last_activity, &stats.bytes_received));
        let (mut sent_n, mut received_n) = (None, None);
        loop {
            let half_closed = sent_n.is_some() || received_n.is_some();
            let idle_deadline =
                started + Duration::from_millis(last_activity.load(Ordering::Relaxed)) + half_closed_idle;
            tokio::select! {
                r = &mut sent, if sent_n.is_none() => match r {
                    Ok(n) => sent_n = Some(n),
                    Err(e) => break Outcome::Failed(e),
                },
                r = &mut received, if received_n.is_none() => match r {
                    Ok(n) => received_n = Some(n),
                    Err(e) => break Outcome::Failed(e),
                },
                _ = tokio::time::sleep_until(idle_deadline), if half_closed => {
                    let idle_for = started.elapsed().saturating_sub(Duration::from_millis(last_activity.load(Ordering::Relaxed)));
                    if idle_for >= half_closed_idle {
                        break Outcome::IdleHalfClosed;
                    }
                }
                _ = abort.wait_for(|aborted| *aborted) => break Outcome::Aborted,
            }
            if let (Some(s), Some(r)) = (sent_n, received_n) {
                break Outcome::Done(s, r);
            }
        }
    };
    let app = app_r.unsplit(app_w);
    let upstream = up_r.unsplit(up_w);
    match outcome {
        Outcome::Done(sent, received) => {
            tracing::trace!(sent, received, "relay finished");
        }
        Outcome::Failed(e) => {
            tracing::debug!(error = %e, "relay ended with an error; resetting both sides");
            reset(app);
            reset(upstream);
        }
        Outcome::IdleHalfClosed => {
            tracing::debug!(
                idle_s = half_closed_idle.as_secs(),
                "half-closed connection idle too long; resetting both sides"
            );
            reset(app);
            reset(upstream);
        }
        Outcome::Aborted => {
            tracing::debug!("drain deadline passed; resetting a relayed connection");
            reset(app);
            reset(upstream);
        }
    }
}

enum Outcome {
    Done(u64, u64),
    Failed(std::io::Error),
    IdleHalfClosed,
    Aborted,
}

/// One direction: copies to EOF, then shuts the write side down (FIN, or
/// close_notify then FIN for TLS), noting the time of every chunk and
/// counting its bytes as they go (long connections show in metrics live).
async fn copy_half<R, W>(
    r: &mut R,
    w: &mut W,
    started: Instant,
    last_activity: &AtomicU64,
    bytes: &AtomicU64,
) -> std::io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            w.shutdown().await?;
            return Ok(total);
        }
        w.write_all(&buf[..n]).await?;
        total += n as u64;
        bytes.fetch_add(n as u64, Ordering::Relaxed);
        last_activity.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// Closes with RST, so the peer sees a reset rather than a clean end.
pub fn reset<C: Conn>(conn: C) {
    let _ = socket2::SockRef::from(conn.tcp()).set_linger(Some(Duration::ZERO));
    drop(conn);
}
