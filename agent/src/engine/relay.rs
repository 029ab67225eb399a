//! Byte relay between two connections, plain TCP or TLS over TCP:
//! half-close propagates (EOF, or a TLS close_notify, on one side shuts down
//! the write side of the other, which for TLS sends close_notify), backpressure
//! comes from the bounded copy buffers, and an error on either side, such as a
//! reset, resets both.

use std::{sync::atomic::Ordering, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    sync::watch,
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

/// Relays until both directions end. `abort` (the drain deadline passed)
/// resets both sides: a cut-off response must not look complete to a
/// protocol that ends responses by closing the connection.
pub async fn relay<A: Conn, B: Conn>(mut app: A, mut upstream: B, stats: &PodStats, mut abort: watch::Receiver<bool>) {
    let _ = app.tcp().set_nodelay(true);
    let outcome = tokio::select! {
        r = tokio::io::copy_bidirectional_with_sizes(&mut app, &mut upstream, BUF, BUF) => Some(r),
        _ = abort.wait_for(|aborted| *aborted) => None,
    };
    match outcome {
        Some(Ok((sent, received))) => {
            stats.bytes_sent.fetch_add(sent, Ordering::Relaxed);
            stats.bytes_received.fetch_add(received, Ordering::Relaxed);
        }
        Some(Err(e)) => {
            tracing::debug!(error = %e, "relay ended with an error; resetting both sides");
            reset(app);
            reset(upstream);
        }
        None => {
            tracing::debug!("drain deadline passed; resetting a relayed connection");
            reset(app);
            reset(upstream);
        }
    }
}

/// Closes with RST, so the peer sees a reset rather than a clean end.
pub fn reset<C: Conn>(conn: C) {
    let _ = socket2::SockRef::from(conn.tcp()).set_linger(Some(Duration::ZERO));
    drop(conn);
}
