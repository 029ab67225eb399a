//! Clients: a data source with a checksum, a connection probe that reports what getpeername() says, and a
//! minimal HTTP GET.

use std::{
    collections::BTreeMap,
    io::{self, Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, SocketAddrV6, TcpStream},
    process::ExitCode,
    time::Duration,
};

use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

use crate::{
    net::{error_json, read_head},
    Flags,
};

/// Data is generated and sent in chunks of this size.
const CHUNK: usize = 1 << 20;

/// Print the one JSON line a client reports. Failures are results too (exit 0): the test reads the JSON.
fn report(value: Value) -> Result<ExitCode, String> {
    println!("{value}");
    Ok(ExitCode::SUCCESS)
}

fn timeout(flags: &Flags, default_ms: u64) -> Result<Duration, String> {
    Ok(Duration::from_millis(flags.parsed("timeout-ms", Some(default_ms))?))
}

fn parse_addr(flags: &Flags) -> Result<SocketAddr, String> {
    let addr = flags.required("addr")?;
    addr.parse().map_err(|_| format!("--addr: expected IP:PORT or [IPv6]:PORT, got {addr:?}"))
}

/// xorshift64: fast, and the same bytes for the same seed on both ends of a test.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        // Spread small seeds over the state, and keep it non-zero (zero is xorshift's fixed point).
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// Reads to EOF: blocking by default, or with `--poll-read` non-blocking
/// with poll() between reads, as event-loop applications do.
fn read_reply(stream: &mut TcpStream, flags: &Flags, out: &mut String) -> io::Result<usize> {
    let mut bytes = Vec::new();
    read_reply_bytes(stream, flags.has("poll-read"), timeout(flags, 60_000).map_err(io::Error::other)?, &mut bytes)?;
    out.push_str(&String::from_utf8_lossy(&bytes));
    Ok(bytes.len())
}

fn read_reply_bytes(stream: &mut TcpStream, poll_read: bool, limit: Duration, out: &mut Vec<u8>) -> io::Result<usize> {
    if !poll_read {
        return stream.read_to_end(out);
    }
    use std::os::fd::AsRawFd as _;
    stream.set_nonblocking(true)?;
    let deadline = std::time::Instant::now() + limit;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(out.len()),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "no EOF before the timeout"));
                }
                let mut pfd = libc::pollfd { fd: stream.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                // SAFETY: one valid pollfd for the duration of the call.
                unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn hex(digest: impl AsRef<[u8]>) -> String {
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

pub fn source(flags: &Flags) -> Result<ExitCode, String> {
    let addr = parse_addr(flags)?;
    let total: u64 = flags.parsed("bytes", None)?;
    let mut rng = XorShift::new(flags.parsed("seed", Some(1))?);
    let mut stream = match TcpStream::connect_timeout(&addr, timeout(flags, 5000)?) {
        Ok(s) => s,
        Err(e) => return report(error_json("connect", &e)),
    };
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut sent: u64 = 0;
    while sent < total {
        rng.fill(&mut buf);
        let n = usize::try_from(total - sent).map_or(CHUNK, |left| left.min(CHUNK));
        if let Err(e) = stream.write_all(&buf[..n]) {
            let mut failure = error_json("send", &e);
            failure["bytes"] = json!(sent);
            return report(failure);
        }
        hasher.update(&buf[..n]);
        sent += n as u64;
    }
    let mut reply = String::new();
    let read = stream.shutdown(Shutdown::Write).and_then(|()| read_reply(&mut stream, flags, &mut reply));
    if let Err(e) = read {
        let mut failure = error_json("read", &e);
        failure["bytes"] = json!(sent);
        return report(failure);
    }
    report(json!({"ok": true, "bytes": sent, "sha256": hex(hasher.finalize()), "reply": reply.trim_end()}))
}

pub fn connect(flags: &Flags) -> Result<ExitCode, String> {
    let mut addr = parse_addr(flags)?;
    let limit = timeout(flags, 3000)?;
    // std picks the socket's family from the address: dialling the IPv4-mapped form makes an AF_INET6 socket
    // connect to an IPv4 peer, the way dual-stack applications do.
    match (flags.get("family"), addr) {
        (Some("v6"), SocketAddr::V4(v4)) => {
            addr = SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0));
        }
        (None | Some("v4" | "v6"), _) => {}
        (Some(other), _) => return Err(format!("--family: expected v4 or v6, got {other:?}")),
    }
    let mut stream = match TcpStream::connect_timeout(&addr, limit) {
        Ok(s) => s,
        Err(e) => return report(error_json("connect", &e)),
    };
    // Straight from getpeername()/getsockname(), without mapping back to IPv4: the raw form is what a test checks.
    let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|e| format!("error: {e}"));
    let local = stream.local_addr().map(|a| a.to_string()).unwrap_or_else(|e| format!("error: {e}"));
    let mut exchange = || -> Result<String, (&'static str, io::Error)> {
        if let Some(text) = flags.get("send") {
            stream.write_all(text.as_bytes()).map_err(|e| ("send", e))?;
        }
        if flags.has("no-read") {
            return Ok(String::new());
        }
        stream.shutdown(Shutdown::Write).map_err(|e| ("send", e))?;
        stream.set_read_timeout(Some(limit)).map_err(|e| ("read", e))?;
        let mut reply = Vec::new();
        read_reply_bytes(&mut stream, flags.has("poll-read"), limit, &mut reply).map_err(|e| ("read", e))?;
        Ok(String::from_utf8_lossy(&reply).into_owned())
    };
    match exchange() {
        Ok(reply) => report(json!({"ok": true, "peer": peer, "local": local, "reply": reply})),
        Err((stage, e)) => {
            let mut failure = error_json(stage, &e);
            failure["peer"] = json!(peer);
            failure["local"] = json!(local);
            report(failure)
        }
    }
}

/// `http://HOST[:PORT][/PATH]` with HOST an IPv4 address or a bracketed IPv6 one.
fn parse_url(url: &str) -> Result<(SocketAddr, String, String), String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| format!("--url: only http:// URLs, got {url:?}"))?;
    let (authority, path) = rest.find('/').map_or((rest, "/"), |i| (&rest[..i], &rest[i..]));
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => {
            (host, port.parse::<u16>().map_err(|_| format!("--url: bad port in {url:?}"))?)
        }
        _ => (authority, 80),
    };
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let ip: IpAddr = bare.parse().map_err(|_| format!("--url: host must be an IP address, got {host:?}"))?;
    Ok((SocketAddr::new(ip, port), authority.to_string(), path.to_string()))
}

pub fn http_get(flags: &Flags) -> Result<ExitCode, String> {
    let (addr, authority, path) = parse_url(flags.required("url")?)?;
    let limit = timeout(flags, 5000)?;
    let mut stream = match TcpStream::connect_timeout(&addr, limit) {
        Ok(s) => s,
        Err(e) => return report(error_json("connect", &e)),
    };
    let request = format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    if let Err(e) = stream.set_write_timeout(Some(limit)).and_then(|()| stream.write_all(request.as_bytes())) {
        return report(error_json("send", &e));
    }
    let response = stream.set_read_timeout(Some(limit)).and_then(|()| {
        let (head, mut body) = read_head(&mut stream, 64 * 1024)?;
        stream.read_to_end(&mut body)?;
        Ok((head, body))
    });
    let (head, body) = match response {
        Ok(r) => r,
        Err(e) => return report(error_json("read", &e)),
    };
    let head = String::from_utf8_lossy(&head);
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split_whitespace().nth(1)?.parse::<u16>().ok());
    let Some(status) = status else {
        return report(json!({"ok": false, "stage": "read", "error": format!("no HTTP status line in {head:?}")}));
    };
    // Lower-case names, as HTTP header names are case-insensitive.
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    report(json!({"ok": true, "status": status, "body": String::from_utf8_lossy(&body), "headers": headers}))
}

/// The client side of a server-first protocol: reads the greeting before
/// sending anything, then sends one line and reads the answer to EOF.
pub fn banner_client(flags: &Flags) -> Result<ExitCode, String> {
    let addr = parse_addr(flags)?;
    let limit = timeout(flags, 5000)?;
    let run = || -> Result<Value, (&'static str, io::Error)> {
        let mut s = TcpStream::connect_timeout(&addr, limit).map_err(|e| ("connect", e))?;
        s.set_read_timeout(Some(limit)).map_err(|e| ("read", e))?;
        let mut banner = Vec::new();
        let mut byte = [0u8; 1];
        while s.read(&mut byte).map_err(|e| ("read", e))? == 1 && byte[0] != b'\n' {
            banner.push(byte[0]);
        }
        s.write_all(b"HELO meshcap\r\n").map_err(|e| ("send", e))?;
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).map_err(|e| ("read", e))?;
        Ok(json!({
            "ok": true,
            "banner": String::from_utf8_lossy(&banner).trim_end(),
            "reply": String::from_utf8_lossy(&rest).trim_end(),
        }))
    };
    match run() {
        Ok(v) => report(v),
        Err((stage, e)) => report(error_json(stage, &e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let (addr, authority, path) = parse_url("http://[fd00::2]:8080/x?y").expect("v6");
        assert_eq!(
            (addr.to_string(), authority.as_str(), path.as_str()),
            ("[fd00::2]:8080".into(), "[fd00::2]:8080", "/x?y")
        );
        let (addr, _, path) = parse_url("http://10.0.0.1").expect("v4");
        assert_eq!((addr.to_string(), path.as_str()), ("10.0.0.1:80".into(), "/"));
        let (addr, _, _) = parse_url("http://[::1]").expect("bare v6");
        assert_eq!(addr.port(), 80);
        assert!(parse_url("https://x").is_err());
    }

    #[test]
    fn data_is_deterministic_per_seed() {
        let (mut a, mut b, mut c) = (XorShift::new(7), XorShift::new(7), XorShift::new(8));
        let (mut x, mut y, mut z) = ([0u8; 37], [0u8; 37], [0u8; 37]);
        a.fill(&mut x);
        b.fill(&mut y);
        c.fill(&mut z);
        assert_eq!(x, y);
        assert_ne!(x, z);
    }
}
