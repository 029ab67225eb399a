//! `echo-load`: many concurrent connections to an echo server, each sending a
//! distinct pattern and checking it comes back intact.

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpStream},
    process::ExitCode,
    sync::{Arc, Barrier},
    time::Duration,
};

use serde_json::json;

use crate::Flags;

/// Lets one process hold a thousand sockets and more.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: get/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn one(addr: SocketAddr, id: u32, bytes: usize, start: &Barrier) -> Result<(), String> {
    let payload: Vec<u8> = (0..bytes).map(|i| (i as u32).wrapping_mul(31).wrapping_add(id) as u8).collect();
    start.wait();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(20)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| e.to_string())?;
    let mut writer = s.try_clone().map_err(|e| e.to_string())?;
    let send = std::thread::spawn(move || {
        writer.write_all(&payload).and_then(|()| writer.shutdown(Shutdown::Write)).map(|()| payload)
    });
    let mut back = Vec::with_capacity(bytes);
    s.read_to_end(&mut back).map_err(|e| format!("read: {e}"))?;
    let payload = send.join().map_err(|_| "writer panicked".to_string())?.map_err(|e| format!("write: {e}"))?;
    if back != payload {
        return Err(format!("echo differs: sent {} bytes, got {}", payload.len(), back.len()));
    }
    Ok(())
}

pub fn echo_load(flags: &Flags) -> Result<ExitCode, String> {
    raise_fd_limit();
    let addr: SocketAddr = flags.required("addr")?.parse().map_err(|_| "--addr: expected IP:PORT".to_string())?;
    let conns: u32 = flags.parsed("conns", Some(100))?;
    let bytes: usize = flags.parsed("bytes", Some(65536))?;
    let start = Arc::new(Barrier::new(conns as usize));
    let workers: Vec<_> = (0..conns)
        .map(|id| {
            let start = start.clone();
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || one(addr, id, bytes, &start))
                .expect("spawning a client thread")
        })
        .collect();
    let mut errors: Vec<String> = Vec::new();
    for w in workers {
        if let Err(e) = w.join().unwrap_or_else(|_| Err("client thread panicked".into())) {
            errors.push(e);
        }
    }
    errors.sort();
    errors.dedup();
    let failed = errors.len();
    println!("{}", json!({"ok": failed == 0, "conns": conns, "bytes": bytes, "errors": errors}));
    Ok(ExitCode::SUCCESS)
}
