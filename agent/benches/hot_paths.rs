//! Microbenchmarks of the engine's hot paths: a full mutual-TLS handshake with SPIFFE verification on both
//! sides (in memory, so only crypto and verification are timed), and the relay's copy loop over real loopback
//! sockets (a 1 KiB request/response through the relay, and a bulk transfer).
//!
//! `cargo bench -p meshcap-agent`; not part of the test run.

use std::{hint::black_box, sync::Arc, time::Duration};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use meshcap_agent::{
    engine::{relay::relay, PodStats},
    identity::{peer_id, tls_identity, workload_id, DevCa, TlsIdentity},
};
use rustls::{pki_types::ServerName, ClientConnection, ServerConnection};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

fn identity(ca: &DevCa, sa: &str) -> TlsIdentity {
    let id = workload_id("democluster.internal", "default", sa).expect("valid id");
    let svid = ca.issue(&id, Duration::from_secs(3600)).expect("issued");
    tls_identity(&svid, &ca.bundles()).expect("tls identity")
}

/// Moves TLS records from one side to the other until neither has anything to send.
fn pump(client: &mut ClientConnection, server: &mut ServerConnection) {
    let mut wire = Vec::new();
    loop {
        let mut moved = false;
        while client.wants_write() {
            wire.clear();
            client.write_tls(&mut wire).expect("client writes");
            server.read_tls(&mut wire.as_slice()).expect("server reads");
            server.process_new_packets().expect("server accepts the client");
            moved = true;
        }
        while server.wants_write() {
            wire.clear();
            server.write_tls(&mut wire).expect("server writes");
            client.read_tls(&mut wire.as_slice()).expect("client reads");
            client.process_new_packets().expect("client accepts the server");
            moved = true;
        }
        if !moved {
            return;
        }
    }
}

fn handshake(c: &mut Criterion) {
    let ca = DevCa::new("democluster.internal").expect("dev CA");
    let (a, b) = (identity(&ca, "client"), identity(&ca, "server"));
    let name = ServerName::IpAddress(std::net::IpAddr::from([10, 0, 0, 7]).into());
    c.bench_function("mTLS handshake with SPIFFE verification (both sides)", |bench| {
        bench.iter(|| {
            let mut client = ClientConnection::new(a.client_for(&b.id), name.clone()).expect("client");
            let mut server = ServerConnection::new(b.server.clone()).expect("server");
            pump(&mut client, &mut server);
            assert!(!client.is_handshaking() && !server.is_handshaking());
            black_box(peer_id(server.peer_certificates()).expect("client's SPIFFE ID"))
        })
    });
}

/// app <-> relay <-> upstream over loopback; returns the app's and the upstream server's ends.
async fn relayed(stats: Arc<PodStats>) -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = TcpStream::connect(addr).await.unwrap();
    let (app_engine, _) = listener.accept().await.unwrap();
    let up_engine = TcpStream::connect(addr).await.unwrap();
    let (server, _) = listener.accept().await.unwrap();
    tokio::spawn(async move {
        let (_keep, abort) = tokio::sync::watch::channel(false);
        relay(app_engine, up_engine, &stats, abort, Duration::from_secs(60)).await;
    });
    app.set_nodelay(true).unwrap();
    server.set_nodelay(true).unwrap();
    (app, server)
}

fn relay_loop(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let stats = Arc::new(PodStats::default());
    let (mut app, mut server) = rt.block_on(relayed(stats.clone()));
    let (request, mut got) = (vec![7u8; 1024], vec![0u8; 1024]);
    c.bench_function("relay: 1 KiB request and response", |b| {
        b.iter(|| {
            rt.block_on(async {
                app.write_all(&request).await.unwrap();
                server.read_exact(&mut got).await.unwrap();
                server.write_all(&got).await.unwrap();
                app.read_exact(&mut got).await.unwrap();
            })
        })
    });
    const BULK: usize = 16 << 20;
    let chunk = vec![1u8; 256 * 1024];
    let mut sink = vec![0u8; 256 * 1024];
    let mut group = c.benchmark_group("relay");
    group.throughput(Throughput::Bytes(BULK as u64)).sample_size(20);
    group.bench_function("16 MiB one way", |b| {
        b.iter(|| {
            rt.block_on(async {
                let send = async {
                    for _ in 0..BULK / chunk.len() {
                        app.write_all(&chunk).await.unwrap();
                    }
                };
                let receive = async {
                    let mut left = BULK;
                    while left > 0 {
                        left -= server.read(&mut sink).await.unwrap();
                    }
                };
                tokio::join!(send, receive);
            })
        })
    });
    group.finish();
}

criterion_group!(benches, handshake, relay_loop);
criterion_main!(benches);
