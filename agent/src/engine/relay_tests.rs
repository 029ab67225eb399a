use std::{future::poll_fn, sync::atomic::AtomicU64, task::Poll, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use super::{relay, Direction, BUF};
use crate::engine::PodStats;

/// A connected loopback pair: (client end, server end).
async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
    let (server, _) = listener.accept().await.unwrap();
    (client, server)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed as u32) as u8).collect()
}

/// app <-> [relay] <-> upstream, both over real sockets; returns the outer ends.
async fn relayed(stats: &'static PodStats) -> (TcpStream, TcpStream, tokio::task::JoinHandle<()>) {
    let (app_client, app_engine) = pair().await;
    let (up_engine, up_server) = pair().await;
    let (_abort_tx, abort) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        let _keep = _abort_tx;
        relay(app_engine, up_engine, stats, abort, Duration::from_secs(30)).await
    });
    (app_client, up_server, task)
}

#[tokio::test]
async fn bulk_both_ways_arrives_intact_and_half_close_propagates() {
    let stats: &'static PodStats = Box::leak(Box::default());
    let (mut app, mut server, task) = relayed(stats).await;
    let request = pattern(9 * 1024 * 1024 + 17, 1);
    let response = pattern(3 * 1024 * 1024 + 5, 2);
    let (mut app_r, mut app_w) = app.split();
    let (mut srv_r, mut srv_w) = server.split();
    let send = async {
        app_w.write_all(&request).await.unwrap();
        // Half-close: the server must see EOF and still be able to answer.
        app_w.shutdown().await.unwrap();
    };
    let serve = async {
        let mut got = Vec::new();
        srv_r.read_to_end(&mut got).await.unwrap();
        srv_w.write_all(&response).await.unwrap();
        srv_w.shutdown().await.unwrap();
        got
    };
    let receive = async {
        let mut got = Vec::new();
        app_r.read_to_end(&mut got).await.unwrap();
        got
    };
    let ((), server_got, app_got) = tokio::join!(send, serve, receive);
    assert!(server_got == request, "request corrupted: {} of {} bytes", server_got.len(), request.len());
    assert!(app_got == response, "response corrupted: {} of {} bytes", app_got.len(), response.len());
    tokio::time::timeout(Duration::from_secs(5), task).await.expect("relay ends after both EOFs").unwrap();
    let snap = stats.snapshot();
    assert_eq!((snap.bytes_sent, snap.bytes_received), (request.len() as u64, response.len() as u64));
}

#[tokio::test]
async fn small_exchanges_never_take_a_heap_buffer_and_bursts_give_it_back() {
    let counted = AtomicU64::new(0);
    let mut dir = Direction::new(&counted);
    // A small pipe, so a burst cannot be written at once.
    let (mut src, mut reader) = tokio::io::duplex(BUF * 4);
    let (mut writer, mut sink) = tokio::io::duplex(16 * 1024);

    src.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let step = poll_fn(|cx| Poll::Ready(dir.poll_copy(cx, &mut reader, &mut writer))).await;
    assert!(step.is_pending(), "still open");
    assert!(dir.buf.is_none(), "a small request goes through the stack buffer");
    let mut got = [0u8; 18];
    sink.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"GET / HTTP/1.1\r\n\r\n");

    // A burst bigger than the sink takes: the rest waits in a heap buffer.
    let burst = pattern(100 * 1024, 3);
    src.write_all(&burst).await.unwrap();
    let step = poll_fn(|cx| Poll::Ready(dir.poll_copy(cx, &mut reader, &mut writer))).await;
    assert!(step.is_pending());
    assert!(dir.buf.is_some(), "unwritten bytes are held while the writer is full");
    let mut out = vec![0u8; burst.len()];
    let drain = sink.read_exact(&mut out);
    let pump = async {
        while dir.tally.total < 18 + burst.len() as u64 {
            let _ = poll_fn(|cx| Poll::Ready(dir.poll_copy(cx, &mut reader, &mut writer))).await;
            tokio::task::yield_now().await;
        }
    };
    let (r, ()) = tokio::join!(drain, pump);
    r.unwrap();
    assert!(out == burst, "burst corrupted");
    let step = poll_fn(|cx| Poll::Ready(dir.poll_copy(cx, &mut reader, &mut writer))).await;
    assert!(step.is_pending());
    assert!(dir.buf.is_none(), "an idle direction holds no buffer");

    drop(src);
    let step = poll_fn(|cx| Poll::Ready(dir.poll_copy(cx, &mut reader, &mut writer))).await;
    assert!(matches!(step, Poll::Ready(Ok(true))), "EOF ends the direction");
    assert_eq!(sink.read(&mut [0u8; 1]).await.unwrap(), 0, "and shuts the writer down");
    assert_eq!(counted.load(std::sync::atomic::Ordering::Relaxed), 18 + burst.len() as u64);
}

#[tokio::test]
async fn a_reset_on_one_side_resets_the_other() {
    let stats: &'static PodStats = Box::leak(Box::default());
    let (mut app, server, task) = relayed(stats).await;
    app.write_all(b"hello").await.unwrap();
    super::reset(server);
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(5), app.read(&mut buf)).await.expect("answered");
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "the app sees a reset, not a clean end: {r:?}"
    );
    tokio::time::timeout(Duration::from_secs(5), task).await.expect("relay ended").unwrap();
}
