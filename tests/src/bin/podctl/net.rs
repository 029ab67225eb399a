//! Socket helpers shared by podctl's servers and clients.

use std::{
    io::{self, Read},
    mem,
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::Duration,
};

use serde_json::{json, Value};

/// Listen on `bind`:`port`. An IPv6 address (the default `::`) gives a dual-stack socket: IPV6_V6ONLY is cleared
/// explicitly, since the system default (net.ipv6.bindv6only) may say otherwise.
pub fn listen(bind: &str, port: u16) -> Result<TcpListener, String> {
    let ip: IpAddr = bind.parse().map_err(|_| format!("--bind: not an IP address: {bind:?}"))?;
    let listener = match ip {
        IpAddr::V4(v4) => TcpListener::bind((v4, port)),
        IpAddr::V6(v6) => listen_v6(v6, port),
    };
    listener.map_err(|e| format!("listening on {}: {e}", SocketAddr::new(ip, port)))
}

fn setsockopt_int(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: fd is a valid socket and the option value is a c_int of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn listen_v6(ip: Ipv6Addr, port: u16) -> io::Result<TcpListener> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let raw = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: raw is a fresh socket that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    setsockopt_int(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0)?;
    // SAFETY: sockaddr_in6 is plain old data; all-zero is a valid starting value.
    let mut sa: libc::sockaddr_in6 = unsafe { mem::zeroed() };
    sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    sa.sin6_port = port.to_be();
    sa.sin6_addr.s6_addr = ip.octets();
    // SAFETY: sa is a properly initialised sockaddr_in6 and the length passed is its size.
    let rc = unsafe {
        libc::bind(fd.as_raw_fd(), (&sa as *const libc::sockaddr_in6).cast(), mem::size_of_val(&sa) as libc::socklen_t)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen(2) on a bound socket we own.
    if unsafe { libc::listen(fd.as_raw_fd(), 4096) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(TcpListener::from(fd))
}

/// The peer as the application-level address: an IPv4 client of a dual-stack socket shows as `::ffff:a.b.c.d`
/// at the socket layer, but is reported in its IPv4 form.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// The JSON a client prints when an operation failed. The errno is the OS error when there is one; std reports
/// a connect timeout without one, so that case is mapped to ETIMEDOUT.
pub fn error_json(stage: &str, e: &io::Error) -> Value {
    let errno = e.raw_os_error().or((e.kind() == io::ErrorKind::TimedOut).then_some(libc::ETIMEDOUT));
    json!({"ok": false, "stage": stage, "error": format!("{:?}: {e}", e.kind()), "errno": errno})
}

/// Read an HTTP request or response head: up to and including the blank line, or whatever came before EOF.
/// Returns the head and any bytes read past it.
pub fn read_head(stream: &mut TcpStream, limit: usize) -> io::Result<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok((buf, rest));
        }
        if buf.len() >= limit {
            return Ok((buf, Vec::new()));
        }
        match stream.read(&mut chunk)? {
            0 => return Ok((buf, Vec::new())),
            n => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// After our last write: send FIN, then read (and drop) what the peer still sends until it closes too. Closing a
/// socket with unread data makes the kernel send RST, which can destroy a response the peer has not read yet.
pub fn finish(stream: &mut TcpStream) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = io::copy(stream, &mut io::sink());
}
