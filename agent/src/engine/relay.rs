//! Byte relay between two TCP streams: half-close propagates (EOF on one
//! side shuts down the write side of the other), backpressure comes from the
//! bounded copy buffers, and an error on either side resets both.

use std::{sync::atomic::Ordering, time::Duration};

use tokio::net::TcpStream;

use super::PodStats;

const BUF: usize = 64 * 1024;

pub async fn relay(mut app: TcpStream, mut upstream: TcpStream, stats: &PodStats) {
    let _ = app.set_nodelay(true);
    match tokio::io::copy_bidirectional_with_sizes(&mut app, &mut upstream, BUF, BUF).await {
        Ok((sent, received)) => {
            stats.bytes_sent.fetch_add(sent, Ordering::Relaxed);
            stats.bytes_received.fetch_add(received, Ordering::Relaxed);
        }
        Err(e) => {
            tracing::debug!(error = %e, "relay ended with an error; resetting both sides");
            reset(app);
            reset(upstream);
        }
    }
}

/// Closes with RST, so the peer sees a reset rather than a clean end.
pub fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}
