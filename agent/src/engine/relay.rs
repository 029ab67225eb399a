//! Byte relay between two connections, plain TCP or TLS over TCP:
//! half-close propagates (EOF, or a TLS close_notify, on one side shuts down
//! the write side of the other, which for TLS sends close_notify), backpressure
//! comes from the bounded copy buffers, and an error on either side, such as a
//! reset, resets both.
//!
//! An idle connection holds no copy buffer: a direction reads first into a
//! small buffer on the stack and takes a heap buffer only while data is
//! flowing (or waiting to be written), giving it back as soon as the reader
//! has nothing more. Thousands of idle keep-alive connections then cost the
//! agent a few hundred bytes each instead of two 64 KiB buffers.

use std::{
    future::poll_fn,
    io,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    task::{ready, Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::watch,
    time::Instant,
};

use super::PodStats;

/// Heap buffer of a direction while data flows: big enough for bulk transfers
/// to move in few syscalls.
pub const BUF: usize = 64 * 1024;
/// First read of an idle direction, on the stack: a request or response of
/// this size goes through without touching the heap at all.
const PROBE: usize = 4 * 1024;

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
    mut app: A,
    mut upstream: B,
    stats: &PodStats,
    mut abort: watch::Receiver<bool>,
    half_closed_idle: Duration,
) {
    let _ = app.tcp().set_nodelay(true);
    let mut sent = Direction::new(&stats.bytes_sent);
    let mut received = Direction::new(&stats.bytes_received);
    let outcome = loop {
        let half_closed = sent.finished || received.finished;
        let last = sent.tally.last_activity.max(received.tally.last_activity);
        let step = poll_fn(|cx| {
            let a = sent.poll_copy(cx, &mut app, &mut upstream);
            let b = received.poll_copy(cx, &mut upstream, &mut app);
            match (a, b) {
                (Poll::Ready(Err(e)), _) | (_, Poll::Ready(Err(e))) => Poll::Ready(Err(e)),
                // Something ended: the caller re-arms the half-closed timer.
                (Poll::Ready(Ok(true)), _) | (_, Poll::Ready(Ok(true))) => Poll::Ready(Ok(())),
                _ => Poll::Pending,
            }
        });
        tokio::select! {
            r = step => if let Err(e) = r { break Outcome::Failed(e) },
            _ = tokio::time::sleep_until(last + half_closed_idle), if half_closed => {
                if sent.tally.last_activity.max(received.tally.last_activity).elapsed() >= half_closed_idle {
                    break Outcome::IdleHalfClosed;
                }
            }
            _ = abort.wait_for(|aborted| *aborted) => break Outcome::Aborted,
        }
        if sent.finished && received.finished {
            break Outcome::Done(sent.tally.total, received.tally.total);
        }
    };
    match outcome {
        Outcome::Done(sent, received) => {
            tracing::trace!(sent, received, "relay finished");
            return;
        }
        Outcome::Failed(e) => tracing::debug!(error = %e, "relay ended with an error; resetting both sides"),
        Outcome::IdleHalfClosed => tracing::debug!(
            idle_s = half_closed_idle.as_secs(),
            "half-closed connection idle too long; resetting both sides"
        ),
        Outcome::Aborted => tracing::debug!("drain deadline passed; resetting a relayed connection"),
    }
    reset(app);
    reset(upstream);
}

enum Outcome {
    Done(u64, u64),
    Failed(io::Error),
    IdleHalfClosed,
    Aborted,
}

/// One direction: copies to EOF, then shuts the write side down (FIN, or
/// close_notify then FIN for TLS), noting the time of every chunk and
/// counting its bytes as they go (long connections show in metrics live).
struct Direction<'a> {
    /// Present only while bytes flow or wait to be written.
    buf: Option<Box<[u8]>>,
    /// Unwritten bytes are `buf[pos..end]`.
    pos: usize,
    end: usize,
    eof: bool,
    finished: bool,
    tally: Tally<'a>,
}

struct Tally<'a> {
    total: u64,
    bytes: &'a AtomicU64,
    last_activity: Instant,
}

impl Tally<'_> {
    fn written(&mut self, n: usize) {
        self.total += n as u64;
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        self.last_activity = Instant::now();
    }
}

impl<'a> Direction<'a> {
    fn new(bytes: &'a AtomicU64) -> Self {
        let tally = Tally { total: 0, bytes, last_activity: Instant::now() };
        Self { buf: None, pos: 0, end: 0, eof: false, finished: false, tally }
    }

    /// Ready(Ok(true)) once, when the direction has ended (EOF seen and the
    /// writer shut down); Pending while it waits; an error ends the relay.
    fn poll_copy<R, W>(&mut self, cx: &mut Context<'_>, r: &mut R, w: &mut W) -> Poll<io::Result<bool>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        if self.finished {
            return Poll::Pending;
        }
        loop {
            if let Some(buf) = &self.buf {
                while self.pos < self.end {
                    let n = ready!(Pin::new(&mut *w).poll_write(cx, &buf[self.pos..self.end]))?;
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    self.pos += n;
                    self.tally.written(n);
                }
            }
            if self.eof {
                ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
                self.finished = true;
                self.buf = None;
                return Poll::Ready(Ok(true));
            }
            let read = match self.buf.as_mut() {
                Some(buf) => {
                    let mut rb = ReadBuf::new(buf);
                    match Pin::new(&mut *r).poll_read(cx, &mut rb) {
                        Poll::Ready(Ok(())) => rb.filled().len(),
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => {
                            // The reader is drained: give the buffer back while waiting.
                            self.buf = None;
                            return self.poll_flush_pending(cx, w);
                        }
                    }
                }
                None => {
                    // Left uninitialised: zeroing 4 KiB on every read showed up in profiles.
                    let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); PROBE];
                    let mut rb = ReadBuf::uninit(&mut probe);
                    match Pin::new(&mut *r).poll_read(cx, &mut rb) {
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => return self.poll_flush_pending(cx, w),
                    }
                    let probe = rb.filled();
                    let n = probe.len();
                    if n == 0 {
                        self.eof = true;
                        continue;
                    }
                    // Straight from the stack while the writer keeps up.
                    let mut done = 0;
                    while done < n {
                        match Pin::new(&mut *w).poll_write(cx, &probe[done..n]) {
                            Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                            Poll::Ready(Ok(k)) => {
                                done += k;
                                self.tally.written(k);
                            }
                            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                            Poll::Pending => break,
                        }
                    }
                    // A full probe means more is likely waiting: read on into
                    // a real buffer. A partial write keeps the rest there too.
                    if done < n || n == PROBE {
                        let mut buf = vec![0u8; BUF].into_boxed_slice();
                        buf[..n - done].copy_from_slice(&probe[done..n]);
                        self.buf = Some(buf);
                        (self.pos, self.end) = (0, n - done);
                        if done < n {
                            return Poll::Pending;
                        }
                    }
                    continue;
                }
            };
            if read == 0 {
                self.eof = true;
            }
            (self.pos, self.end) = (0, read);
        }
    }

    /// Nothing to read: make sure what was written leaves (TLS buffers
    /// records until flushed), then wait.
    fn poll_flush_pending<W: AsyncWrite + Unpin>(&mut self, cx: &mut Context<'_>, w: &mut W) -> Poll<io::Result<bool>> {
        match Pin::new(w).poll_flush(cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            _ => Poll::Pending,
        }
    }
}

/// Closes with RST, so the peer sees a reset rather than a clean end.
pub fn reset<C: Conn>(conn: C) {
    let _ = socket2::SockRef::from(conn.tcp()).set_linger(Some(Duration::ZERO));
    drop(conn);
}

#[cfg(test)]
#[path = "relay_tests.rs"]
mod tests;
