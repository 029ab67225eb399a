//! Servers: an HTTP server that tells the client who it saw, an echo server, and a one-shot sink that hashes
//! what it receives.

use std::{
    fs::{File, OpenOptions},
    io::{self, Read, Write},
    net::{Shutdown, TcpStream},
    process::ExitCode,
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use serde_json::json;
use sha2::{Digest as _, Sha256};

use crate::{
    net::{canonical, finish, listen, read_head},
    Flags,
};

const DEFAULT_BIND: &str = "::";

pub fn http_server(flags: &Flags) -> Result<ExitCode, String> {
    let port: u16 = flags.parsed("port", None)?;
    let body = flags.required("body")?.to_string();
    let listener = listen(flags.get("bind").unwrap_or(DEFAULT_BIND), port)?;
    let peer_log = match flags.get("peer-log") {
        Some(path) => Some(Arc::new(Mutex::new(
            OpenOptions::new().create(true).append(true).open(path).map_err(|e| format!("opening {path}: {e}"))?,
        ))),
        None => None,
    };
    let body = Arc::new(body);
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let (body, peer_log) = (Arc::clone(&body), peer_log.clone());
                thread::spawn(move || {
                    if let Err(e) = serve_http(stream, &body, peer_log.as_deref()) {
                        eprintln!("podctl http-server: {e}");
                    }
                });
            }
            Err(e) => eprintln!("podctl http-server: accept: {e}"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn serve_http(mut stream: TcpStream, body: &str, peer_log: Option<&Mutex<File>>) -> io::Result<()> {
    let peer = canonical(stream.peer_addr()?).ip();
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    // Answer even a request that never completed (a client that only connects and closes its side), so a plain
    // connection probe also learns which peer address the server saw.
    let _ = read_head(&mut stream, 64 * 1024);
    // Logged before answering: once the client has its response, the log already has the line.
    if let Some(log) = peer_log {
        let mut file = log.lock().unwrap_or_else(|p| p.into_inner());
        writeln!(file, "{peer}")?;
        file.flush()?;
    }
    let length = body.len();
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {length}\r\nX-Peer: {peer}\r\n\
         Connection: close\r\n\r\n{body}"
    );
    stream.write_all(response.as_bytes())?;
    finish(&mut stream);
    Ok(())
}

pub fn echo_server(flags: &Flags) -> Result<ExitCode, String> {
    crate::load::raise_fd_limit();
    let port: u16 = flags.parsed("port", None)?;
    let listener = listen(flags.get("bind").unwrap_or(DEFAULT_BIND), port)?;
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                thread::spawn(move || {
                    if let Err(e) = echo(stream) {
                        eprintln!("podctl echo-server: {e}");
                    }
                });
            }
            Err(e) => eprintln!("podctl echo-server: accept: {e}"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn echo(stream: TcpStream) -> io::Result<()> {
    let mut writer = stream.try_clone()?;
    io::copy(&mut &stream, &mut writer)?;
    writer.shutdown(Shutdown::Write)
}

pub fn sink(flags: &Flags) -> Result<ExitCode, String> {
    let port: u16 = flags.parsed("port", None)?;
    let delay = Duration::from_millis(flags.parsed("read-delay-ms", Some(0))?);
    let listener = listen(flags.get("bind").unwrap_or(DEFAULT_BIND), port)?;
    let (mut stream, peer) = listener.accept().map_err(|e| format!("accept: {e}"))?;
    drop(listener);
    let mut hasher = Sha256::new();
    let mut total: u64 = 0;
    let mut buf = vec![0u8; 64 * 1024];
    // With a delay, each read takes at most 64 KiB and then pauses: a slow reader, so the sender's buffers fill.
    let outcome = loop {
        match stream.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                hasher.update(&buf[..n]);
                total += n as u64;
                if !delay.is_zero() {
                    thread::sleep(delay);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    let sha256: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let mut report = json!({"bytes": total, "sha256": sha256, "peer": canonical(peer).to_string()});
    if let Err(e) = &outcome {
        report["error"] = json!(format!("{:?}: {e}", e.kind()));
    }
    println!("{report}");
    if outcome.is_ok() {
        let _ = stream.write_all(format!("{report}\n").as_bytes());
        finish(&mut stream);
    }
    Ok(ExitCode::SUCCESS)
}

/// A server-first protocol, SMTP-style: greets with `--banner` before reading
/// anything, then answers one line with `250 <line>` and closes.
pub fn banner_server(flags: &Flags) -> Result<ExitCode, String> {
    let port: u16 = flags.parsed("port", None)?;
    let banner = flags.required("banner")?.to_string();
    let listener = listen(flags.get("bind").unwrap_or(DEFAULT_BIND), port)?;
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let banner = banner.clone();
        thread::spawn(move || {
            let mut run = || -> io::Result<()> {
                stream.write_all(format!("{banner}\r\n").as_bytes())?;
                let mut line = Vec::new();
                let mut byte = [0u8; 1];
                while stream.read(&mut byte)? == 1 && byte[0] != b'\n' {
                    line.push(byte[0]);
                }
                let text = String::from_utf8_lossy(&line).trim_end().to_string();
                stream.write_all(format!("250 {text}\r\n").as_bytes())?;
                stream.shutdown(Shutdown::Write)
            };
            if let Err(e) = run() {
                eprintln!("podctl banner-server: {e}");
            }
        });
    }
    Ok(ExitCode::SUCCESS)
}

/// Answers each connection with `--send` and then an abortive close
/// (SO_LINGER 0): the client sees a reset mid-stream.
pub fn reset_server(flags: &Flags) -> Result<ExitCode, String> {
    let port: u16 = flags.parsed("port", None)?;
    let payload = flags.get("send").unwrap_or("partial").to_string();
    let listener = listen(flags.get("bind").unwrap_or(DEFAULT_BIND), port)?;
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let _ = stream.write_all(payload.as_bytes());
        // Let the payload leave before the reset (a RST discards unsent data).
        thread::sleep(Duration::from_millis(100));
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        drop(stream);
    }
    Ok(ExitCode::SUCCESS)
}

/// Reads each connection to EOF and then holds it open, never answering or
/// closing: a peer that half-closed and went quiet.
pub fn hold_server(flags: &Flags) -> Result<ExitCode, String> {
    let port: u16 = flags.parsed("port", None)?;
    let listener = listen(flags.get("bind").unwrap_or(DEFAULT_BIND), port)?;
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        thread::spawn(move || {
            let _ = io::copy(&mut stream, &mut io::sink());
            thread::sleep(Duration::from_secs(3600));
            drop(stream);
        });
    }
    Ok(ExitCode::SUCCESS)
}

/// A TLS server presenting whatever certificate it is given (DER files),
/// asking nothing of the client: a misbehaving peer for the engine to refuse.
pub fn tls_server(flags: &Flags) -> Result<ExitCode, String> {
    let port: u16 = flags.parsed("port", None)?;
    let read = |flag: &str| -> Result<Vec<u8>, String> {
        let path = flags.required(flag)?;
        std::fs::read(path).map_err(|e| format!("--{flag} {path}: {e}"))
    };
    let cert = rustls::pki_types::CertificateDer::from(read("cert")?);
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(read("key")?.into());
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .map_err(|e| format!("certificate: {e}"))?;
    config.alpn_protocols = vec![b"meshcap/1".to_vec()];
    let config = std::sync::Arc::new(config);
    let listener = listen(flags.get("bind").unwrap_or(DEFAULT_BIND), port)?;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let config = config.clone();
        thread::spawn(move || {
            let Ok(conn) = rustls::ServerConnection::new(config) else { return };
            let mut tls = rustls::StreamOwned::new(conn, stream);
            // The client is expected to abort the handshake; if it does not, say so.
            let _ = tls.write_all(b"rogue server reached\n");
        });
    }
    Ok(ExitCode::SUCCESS)
}
