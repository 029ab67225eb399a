//! Processes started inside a pod or node: entering the namespace and cgroup between fork and exec, and a handle
//! that kills its process when the test is done with it.

use std::{
    ffi::OsStr,
    fs::{File, OpenOptions},
    io::{self, Read},
    os::unix::{io::AsRawFd as _, process::CommandExt as _},
    path::Path,
    process::{Child, Command, ExitStatus, Output, Stdio},
    thread::{self, JoinHandle},
    time::Duration,
};

use crate::harness::wait_until;

/// A command that, after fork and before exec, joins the network namespace at `netns` and (if given) the cgroup
/// whose `cgroup.procs` path is given. Both files are opened here, in the parent, because the child may only make
/// async-signal-safe calls (raw syscalls) between fork and exec. Rust opens them close-on-exec, so the program
/// does not inherit them.
pub(super) fn entering_command<I, S>(
    program: impl AsRef<OsStr>,
    args: I,
    netns: &Path,
    cgroup_procs: Option<&Path>,
) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let netns_file = File::open(netns).unwrap_or_else(|e| panic!("opening netns {}: {e}", netns.display()));
    let cgroup_file = cgroup_procs.map(|path| {
        OpenOptions::new().write(true).open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
    });
    let mut cmd = Command::new(program);
    cmd.args(args);
    let pre_exec = move || -> io::Result<()> {
        // Cgroup first: then even the exec and whatever the program does at startup are accounted to the pod.
        if let Some(procs) = &cgroup_file {
            // SAFETY: writing a static byte to an fd owned by the closure; write(2) is async-signal-safe.
            // "0" means "the writing process".
            if unsafe { libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) } != 1 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: setns(2) on an fd owned by the closure; a raw syscall, async-signal-safe.
        if unsafe { libc::setns(netns_file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the closure only calls write, setns and reads errno, all async-signal-safe, and allocates nothing.
    unsafe { cmd.pre_exec(pre_exec) };
    cmd
}

/// Drain a pipe on a thread, so a chatty child cannot block on a full pipe while we wait for it.
fn drain(pipe: Option<impl Read + Send + 'static>) -> Option<JoinHandle<Vec<u8>>> {
    pipe.map(|mut p| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = p.read_to_end(&mut buf);
            buf
        })
    })
}

fn join(handle: Option<JoinHandle<Vec<u8>>>) -> Vec<u8> {
    handle.and_then(|h| h.join().ok()).unwrap_or_default()
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> io::Result<ExitStatus> {
    let mut status = None;
    wait_until(timeout, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    match status {
        Some(status) => Ok(status),
        None => {
            eprintln!("harness: pid {} still running after {timeout:?}, killing it", child.id());
            let _ = child.kill();
            child.wait()
        }
    }
}

/// Like `Command::output`, but a program that outlives `timeout` is killed; its output so far is returned.
pub(super) fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Output {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {shown}: {e}"));
    let (stdout, stderr) = (drain(child.stdout.take()), drain(child.stderr.take()));
    let status = wait_timeout(&mut child, timeout).unwrap_or_else(|e| panic!("waiting for {shown}: {e}"));
    Output { status, stdout: join(stdout), stderr: join(stderr) }
}

/// A process running in a pod (or node). Dropping the handle SIGKILLs and reaps it.
pub struct PodProcess {
    child: Option<Child>,
    label: String,
}

impl PodProcess {
    pub(super) fn spawn(mut cmd: Command, label: &str) -> PodProcess {
        let shown = format!("{cmd:?}");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {shown} in {label}: {e}"));
        PodProcess { child: Some(child), label: label.to_string() }
    }

    /// Adopt a child started from a customised [`Pod::command`](super::Pod::command).
    pub fn from_child(child: Child, label: &str) -> PodProcess {
        PodProcess { child: Some(child), label: label.to_string() }
    }

    fn child_ref(&self) -> &Child {
        self.child.as_ref().expect("the child is only taken by consuming methods")
    }

    pub fn pid(&self) -> u32 {
        self.child_ref().id()
    }

    /// The underlying child, e.g. to take its stdout.
    pub fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("the child is only taken by consuming methods")
    }

    /// Has the process exited (it is reaped if so)?
    pub fn has_exited(&mut self) -> bool {
        self.child().try_wait().ok().flatten().is_some()
    }

    /// Wait until the process has a TCP socket listening on `port` (any address, IPv4 or IPv6). Read from the
    /// process's own view of /proc/net, so nothing connects to the server to find out (a probe connection would
    /// be a real connection to servers that accept only one).
    pub fn wait_listening(&mut self, port: u16, timeout: Duration) -> bool {
        let pid = self.pid();
        let port_hex = format!(":{port:04X}");
        wait_until(timeout, || {
            if self.has_exited() {
                return false;
            }
            ["tcp", "tcp6"].iter().any(|file| {
                let table = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")).unwrap_or_default();
                table.lines().skip(1).any(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    // Field 1 is local "ADDR:PORT" in hex, field 3 the state; 0A is LISTEN.
                    fields.len() > 3 && fields[1].ends_with(&port_hex) && fields[3] == "0A"
                })
            })
        })
    }

    /// Wait for the process to exit by itself (killing it after `timeout`) and collect its stdout (and stderr if
    /// it was piped).
    pub fn wait_output(mut self, timeout: Duration) -> Output {
        let mut child = self.child.take().expect("the child is only taken by consuming methods");
        let (stdout, stderr) = (drain(child.stdout.take()), drain(child.stderr.take()));
        let status = wait_timeout(&mut child, timeout)
            .unwrap_or_else(|e| panic!("waiting for pid {} in {}: {e}", child.id(), self.label));
        Output { status, stdout: join(stdout), stderr: join(stderr) }
    }

    /// SIGKILL the process and reap it.
    pub fn kill(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            if let Err(e) = child.wait() {
                eprintln!("harness: reaping pid {} in {}: {e}", child.id(), self.label);
            }
        }
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
