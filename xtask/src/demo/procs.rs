//! Processes of the demo: entering a pod (netns and cgroup) between fork and exec, long-running daemons with
//! their output in a file, bounded waits, and Ctrl-C.
//!
//! Ctrl-C and SIGTERM only set a flag. Every wait in the demo polls it and turns it into an error, so the normal
//! error path (the teardown's Drop) cleans up, exactly as for any other failure.

use std::{
    ffi::OsStr,
    fs::{File, OpenOptions},
    io,
    os::unix::{io::AsRawFd as _, process::CommandExt as _},
    path::Path,
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT, SIGTERM and SIGHUP set the flag instead of killing the demo half-way through.
pub fn install_signal_handlers() {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction with a handler that only stores to an atomic is valid; sa_mask is emptied.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

pub fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted by a signal (everything the demo created is removed)");
    }
    Ok(())
}

/// Poll `cond` every 50 ms until it holds (true) or `timeout` passes (false); an interrupt is an error.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> anyhow::Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        check_interrupted()?;
        if cond() {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// A command that joins the cgroup (if given) and the network namespace before exec, as a pod's own process
/// would be: the agent's hooks capture by cgroup, and the sockets must live in the pod's namespace. The files
/// are opened here because between fork and exec only async-signal-safe calls are allowed.
pub fn in_netns<I, S>(
    program: impl AsRef<OsStr>,
    args: I,
    netns: &Path,
    cgroup: Option<&Path>,
) -> anyhow::Result<Command>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let netns_file = File::open(netns).with_context(|| format!("opening netns {}", netns.display()))?;
    let procs = match cgroup {
        Some(dir) => {
            let path = dir.join("cgroup.procs");
            Some(OpenOptions::new().write(true).open(&path).with_context(|| format!("opening {}", path.display()))?)
        }
        None => None,
    };
    let mut cmd = Command::new(program);
    cmd.args(args);
    let enter = move || -> io::Result<()> {
        // Cgroup first, so that even the exec is accounted to the pod. "0" means "the writing process".
        if let Some(procs) = &procs {
            // SAFETY: write(2) of a static byte to an fd the closure owns; async-signal-safe.
            if unsafe { libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) } != 1 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: setns(2) on an fd the closure owns; a raw syscall, async-signal-safe.
        if unsafe { libc::setns(netns_file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the closure only calls write and setns and reads errno; it allocates nothing.
    unsafe { cmd.pre_exec(enter) };
    Ok(cmd)
}

/// Start a long-running process with stdout and stderr appended to `log`, in its own process group: a Ctrl-C at
/// the terminal then reaches only the demo, which stops everything in order (and `--keep` leaves it running).
pub fn spawn_daemon(mut cmd: Command, log: &Path) -> anyhow::Result<Child> {
    let out = OpenOptions::new().create(true).append(true).open(log).with_context(|| format!("{}", log.display()))?;
    let err = out.try_clone()?;
    let shown = format!("{cmd:?}");
    cmd.stdin(Stdio::null()).stdout(out).stderr(err).process_group(0);
    cmd.spawn().with_context(|| format!("starting {shown}"))
}

/// Run to completion and collect the output; killed after `timeout` or on an interrupt.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> anyhow::Result<Output> {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {shown}"))?;
    let mut exited = false;
    let waited = wait_until(timeout, || {
        exited = child.try_wait().ok().flatten().is_some();
        exited
    });
    if !exited {
        let _ = child.kill();
    }
    // Reading after exit is fine: the clients here print one short line, well within a pipe's buffer.
    let output = child.wait_with_output().with_context(|| format!("waiting for {shown}"))?;
    if !waited? {
        bail!("{shown} did not finish within {timeout:?}");
    }
    Ok(output)
}

/// Wait until `child` listens on TCP `port`, read from its own view of /proc/net (no probe connection: that
/// would show up in the counters the demo reports).
pub fn wait_listening(child: &mut Child, port: u16, timeout: Duration) -> anyhow::Result<()> {
    let pid = child.id();
    let port_hex = format!(":{port:04X}");
    let mut exited = false;
    let listening = wait_until(timeout, || {
        exited = child.try_wait().ok().flatten().is_some();
        exited
            || ["tcp", "tcp6"].iter().any(|file| {
                let table = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")).unwrap_or_default();
                table.lines().skip(1).any(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    // Field 1 is the local "ADDR:PORT" in hex, field 3 the state; 0A is LISTEN.
                    fields.len() > 3 && fields[1].ends_with(&port_hex) && fields[3] == "0A"
                })
            })
    })?;
    if exited || !listening {
        bail!("pid {pid} is not listening on port {port} (exited: {exited})");
    }
    Ok(())
}

/// SIGTERM, wait up to `grace`, then SIGKILL; always reaps. Never fails: it runs during teardown.
pub fn terminate(child: &mut Child, grace: Duration) {
    if child.try_wait().ok().flatten().is_some() {
        return;
    }
    // SAFETY: kill(2) on our own unreaped child, so the pid cannot have been reused.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    eprintln!("demo: pid {} ignored SIGTERM for {grace:?}, killing it", child.id());
    let _ = child.kill();
    let _ = child.wait();
}
