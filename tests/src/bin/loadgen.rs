//! loadgen: the benchmark's load generator and its server, run inside simulated pods by `cargo xtask bench`.
//!
//! One thread each, tokio event loop (non-blocking reads, as wrk and most servers do), so the same client
//! drives every capture mode, including sk_msg splicing (whose sockets can wake blocking readers with EAGAIN).
//! Every connection starts with a 5-byte header, the mode ('R' request/response, 'S' sink) and a u32 size:
//! - R: the server answers every `size` bytes it reads with `size` bytes, until EOF;
//! - S: the server reads to EOF, then answers the byte count as a u64 and closes.
//!
//! Latencies go into an HDR histogram (µs, 3 significant digits). Each command prints one JSON line.

use std::{
    net::SocketAddr,
    process::ExitCode,
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

const USAGE: &str = "usage: loadgen <command> [--flag value]...
  serve --port P                                          (answers R and S connections)
  rr --addr IP:PORT --conns N --size B --secs S [--warmup-secs W]   (persistent connections, one request in flight each)
  connrate --addr IP:PORT --conns N --size B --secs S      (a new connection per request; time to first byte)
  bulk --addr IP:PORT --bytes N                            (one stream of N bytes, acknowledged by the server)
  hold --addr IP:PORT --conns N                            (N idle connections after one exchange each; until stdin closes)";

type Flags = std::collections::HashMap<String, String>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let flags = match parse_flags(rest) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("loadgen {command}: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    let result = runtime.block_on(async {
        match command.as_str() {
            "serve" => serve(&flags).await,
            "rr" => rr(&flags).await,
            "connrate" => connrate(&flags).await,
            "bulk" => bulk(&flags).await,
            "hold" => hold(&flags).await,
            other => Err(format!("unknown command {other:?}")),
        }
    });
    match result {
        Ok(Value::Null) => ExitCode::SUCCESS,
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("{}", json!({"ok": false, "error": e}));
            ExitCode::FAILURE
        }
    }
}

fn parse_flags(args: &[String]) -> Result<Flags, String> {
    let mut flags = Flags::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let name = arg.strip_prefix("--").ok_or_else(|| format!("unexpected argument {arg:?}"))?;
        let value = it.next().ok_or_else(|| format!("--{name} needs a value"))?;
        flags.insert(name.to_string(), value.clone());
    }
    Ok(flags)
}

fn flag<T: std::str::FromStr>(flags: &Flags, name: &str, default: Option<T>) -> Result<T, String> {
    match (flags.get(name), default) {
        (Some(v), _) => v.parse().map_err(|_| format!("--{name}: cannot parse {v:?}")),
        (None, Some(d)) => Ok(d),
        (None, None) => Err(format!("--{name} is required")),
    }
}

/// Holding ten thousand connections needs more descriptors than the usual default.
fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: get/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

async fn serve(flags: &Flags) -> Result<Value, String> {
    let port: u16 = flag(flags, "port", None)?;
    let listener = TcpListener::bind(("0.0.0.0", port)).await.map_err(|e| format!("bind :{port}: {e}"))?;
    eprintln!("loadgen: serving on :{port}");
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            if let Err(e) = answer(stream).await {
                if e.kind() != std::io::ErrorKind::UnexpectedEof && e.kind() != std::io::ErrorKind::ConnectionReset {
                    eprintln!("loadgen serve: {e}");
                }
            }
        });
    }
}

async fn answer(mut stream: TcpStream) -> std::io::Result<()> {
    let mut header = [0u8; 5];
    stream.read_exact(&mut header).await?;
    let size = u32::from_be_bytes(header[1..5].try_into().expect("4 bytes")) as usize;
    match header[0] {
        b'R' => {
            let mut buf = vec![0u8; size];
            let response = vec![b'r'; size];
            loop {
                match stream.read_exact(&mut buf).await {
                    Ok(_) => stream.write_all(&response).await?,
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
        }
        b'S' => {
            let mut buf = vec![0u8; 256 * 1024];
            let mut total = 0u64;
            loop {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            stream.write_all(&total.to_be_bytes()).await?;
            stream.shutdown().await
        }
        other => Err(std::io::Error::other(format!("unknown mode byte {other}"))),
    }
}

async fn connect(addr: SocketAddr, mode: u8, size: u32) -> std::io::Result<TcpStream> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut header = [mode, 0, 0, 0, 0];
    header[1..].copy_from_slice(&size.to_be_bytes());
    stream.write_all(&header).await?;
    Ok(stream)
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

fn percentiles(h: &Histogram<u64>) -> Value {
    json!({"p50_us": h.value_at_quantile(0.50), "p99_us": h.value_at_quantile(0.99), "max_us": h.max()})
}

/// Request/response over `conns` persistent connections, one request in flight on each.
async fn rr(flags: &Flags) -> Result<Value, String> {
    let addr: SocketAddr = flag(flags, "addr", None)?;
    let conns: usize = flag(flags, "conns", Some(1))?;
    let size: u32 = flag(flags, "size", Some(1024))?;
    let secs: f64 = flag(flags, "secs", Some(5.0))?;
    let warmup: f64 = flag(flags, "warmup-secs", Some(0.5))?;
    let start = Instant::now() + Duration::from_secs_f64(warmup);
    let end = start + Duration::from_secs_f64(secs);
    let workers: Vec<_> = (0..conns)
        .map(|_| {
            tokio::spawn(async move {
                let mut h = histogram();
                let mut s = connect(addr, b'R', size).await.map_err(|e| format!("connect {addr}: {e}"))?;
                let request = vec![b'q'; size as usize];
                let mut response = vec![0u8; size as usize];
                loop {
                    let t0 = Instant::now();
                    if t0 >= end {
                        return Ok::<_, String>(h);
                    }
                    s.write_all(&request).await.map_err(|e| format!("write: {e}"))?;
                    s.read_exact(&mut response).await.map_err(|e| format!("read: {e}"))?;
                    if t0 >= start {
                        let _ = h.record(t0.elapsed().as_micros().max(1) as u64);
                    }
                }
            })
        })
        .collect();
    let mut total = histogram();
    for w in workers {
        total.add(w.await.map_err(|e| e.to_string())??).map_err(|e| e.to_string())?;
    }
    let mut report = percentiles(&total);
    report["ok"] = json!(true);
    report["requests"] = json!(total.len());
    report["per_sec"] = json!(total.len() as f64 / secs);
    Ok(report)
}

/// A new connection per request from `conns` workers: connections per second and time to first byte
/// (from the connect call to the first byte of the response).
async fn connrate(flags: &Flags) -> Result<Value, String> {
    let addr: SocketAddr = flag(flags, "addr", None)?;
    let conns: usize = flag(flags, "conns", Some(8))?;
    let size: u32 = flag(flags, "size", Some(1024))?;
    let secs: f64 = flag(flags, "secs", Some(5.0))?;
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let workers: Vec<_> = (0..conns)
        .map(|_| {
            tokio::spawn(async move {
                let mut h = histogram();
                let request = vec![b'q'; size as usize];
                let mut response = vec![0u8; size as usize];
                while Instant::now() < end {
                    let t0 = Instant::now();
                    let mut s = connect(addr, b'R', size).await.map_err(|e| format!("connect {addr}: {e}"))?;
                    s.write_all(&request).await.map_err(|e| format!("write: {e}"))?;
                    let n = s.read(&mut response).await.map_err(|e| format!("read: {e}"))?;
                    if n == 0 {
                        return Err("connection closed before the response".to_string());
                    }
                    let _ = h.record(t0.elapsed().as_micros().max(1) as u64);
                    s.read_exact(&mut response[n..]).await.map_err(|e| format!("read: {e}"))?;
                }
                Ok(h)
            })
        })
        .collect();
    let mut total = histogram();
    for w in workers {
        total.add(w.await.map_err(|e| e.to_string())??).map_err(|e| e.to_string())?;
    }
    let mut report = percentiles(&total);
    report["ok"] = json!(true);
    report["connections"] = json!(total.len());
    report["per_sec"] = json!(total.len() as f64 / secs);
    Ok(report)
}

/// One stream of `bytes` bytes; done when the server has acknowledged every byte.
async fn bulk(flags: &Flags) -> Result<Value, String> {
    let addr: SocketAddr = flag(flags, "addr", None)?;
    let bytes: u64 = flag(flags, "bytes", Some(1 << 30))?;
    let chunk = vec![b'b'; 256 * 1024];
    let t0 = Instant::now();
    let mut s = connect(addr, b'S', 0).await.map_err(|e| format!("connect {addr}: {e}"))?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        s.write_all(&chunk[..n]).await.map_err(|e| format!("write: {e}"))?;
        left -= n as u64;
    }
    s.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
    let mut ack = [0u8; 8];
    s.read_exact(&mut ack).await.map_err(|e| format!("reading the acknowledgement: {e}"))?;
    let secs = t0.elapsed().as_secs_f64();
    let got = u64::from_be_bytes(ack);
    if got != bytes {
        return Err(format!("server received {got} bytes of {bytes}"));
    }
    Ok(json!({"ok": true, "bytes": bytes, "secs": secs, "gbit_per_sec": bytes as f64 * 8.0 / secs / 1e9}))
}

/// Opens `conns` connections, each proven end to end by one 1-byte exchange, reports, then holds them idle
/// until stdin closes (the benchmark reads the agent's memory meanwhile).
async fn hold(flags: &Flags) -> Result<Value, String> {
    let addr: SocketAddr = flag(flags, "addr", None)?;
    let conns: usize = flag(flags, "conns", Some(1000))?;
    let mut held = Vec::with_capacity(conns);
    // In batches: a burst of thousands of SYNs would overflow the accept queues.
    for batch in (0..conns).collect::<Vec<_>>().chunks(200) {
        let opening: Vec<_> = batch
            .iter()
            .map(|_| {
                tokio::spawn(async move {
                    let mut s = connect(addr, b'R', 1).await?;
                    s.write_all(b"h").await?;
                    let mut one = [0u8; 1];
                    s.read_exact(&mut one).await?;
                    Ok::<_, std::io::Error>(s)
                })
            })
            .collect();
        for o in opening {
            held.push(o.await.map_err(|e| e.to_string())?.map_err(|e| format!("connection {}: {e}", held.len()))?);
        }
    }
    println!("{}", json!({"ok": true, "held": held.len()}));
    let _ = tokio::task::spawn_blocking(|| std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new())).await;
    // The report was the line above; whoever read it may be gone by now.
    Ok(Value::Null)
}
