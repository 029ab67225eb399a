//! Byte relay between two TCP streams: half-close propagates (EOF on one
//! side shuts down the write side of the other), backpressure comes from the
//! bounded copy buffers, and an error on either side resets both.

use std::{sync::atomic::Ordering, time::Duration};

use tokio::{net::TcpStream, sync::watch};

use super::PodStats;

const BUF: usize = 64 * 1024;

/// Relays until both directions end. `abort` (the drain deadline passed)
/// resets both sides: a cut-off response must not look complete to a
/// protocol that ends responses by closing the connection.
pub async fn relay(mut app: TcpStream, mut upstream: TcpStream, stats: &PodStats, mut abort: watch::Receiver<bool>) {
    let _ = app.set_nodelay(true);
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
pub fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}
