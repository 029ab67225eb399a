//! Sockets inside pod network namespaces. A socket stays in the namespace it
//! was created in, so each pod gets a thread that entered its netns once and
//! creates sockets on request; the sockets are then used from the runtime.

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    sync::mpsc,
    thread,
};

use tokio::sync::oneshot;

mod lo_alias;
pub use lo_alias::add_loopback_v6;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("opening netns {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("setns({path}, CLONE_NEWNET): {source}")]
    Setns { path: PathBuf, source: std::io::Error },
    #[error("netns {path}: getsockopt(SO_NETNS_COOKIE): {source}")]
    Cookie { path: PathBuf, source: std::io::Error },
    #[error("netns {path}: worker thread is gone")]
    WorkerGone { path: PathBuf },
    #[error("netns {path}: spawning worker thread: {source}")]
    Spawn { path: PathBuf, source: std::io::Error },
}

/// A netns path as the container runtime named it (`CNI_NETNS`, e.g.
/// `/var/run/netns/cni-…`), made openable from the agent's mount namespace:
/// the agent runs in a pod, so the runtime's path may exist only on the
/// host. With hostPID, `<proc_root>/1/root` is the host's root (reading it
/// takes CAP_SYS_PTRACE). The path is used as given when it exists here.
pub fn runtime_netns_path(path: &Path, proc_root: &Path) -> PathBuf {
    if path.exists() || !path.is_absolute() {
        return path.to_path_buf();
    }
    let via_host = proc_root.join("1/root").join(path.strip_prefix("/").unwrap_or(path));
    if via_host.exists() {
        via_host
    } else {
        path.to_path_buf()
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// A thread living in one pod's network namespace.
#[derive(Debug, Clone)]
pub struct Netns {
    path: PathBuf,
    cookie: u64,
    jobs: mpsc::Sender<Job>,
}

impl Netns {
    /// Enters `path` on a new thread and learns the namespace's cookie.
    pub fn enter(path: &Path, label: &str) -> Result<Self, NetnsError> {
        let file = File::open(path).map_err(|source| NetnsError::Open { path: path.into(), source })?;
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let p = path.to_path_buf();
        thread::Builder::new()
            .name(format!("netns-{label}"))
            .spawn(move || {
                // SAFETY: setns on this thread only; the fd is valid for the call.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    let _ = ready_tx.send(Err(NetnsError::Setns { path: p, source: std::io::Error::last_os_error() }));
                    return;
                }
                drop(file);
                let _ = ready_tx.send(netns_cookie().map_err(|source| NetnsError::Cookie { path: p, source }));
                for job in rx {
                    job();
                }
            })
            .map_err(|source| NetnsError::Spawn { path: path.into(), source })?;
        let cookie = ready_rx.recv().map_err(|_| NetnsError::WorkerGone { path: path.into() })??;
        Ok(Self { path: path.into(), cookie, jobs })
    }

    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` inside the namespace and returns its result.
    pub async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, NetnsError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| NetnsError::WorkerGone { path: self.path.clone() })?;
        rx.await.map_err(|_| NetnsError::WorkerGone { path: self.path.clone() })
    }

    /// Blocking variant for code outside the runtime.
    pub fn run_blocking<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, NetnsError> {
        let (tx, rx) = mpsc::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| NetnsError::WorkerGone { path: self.path.clone() })?;
        rx.recv().map_err(|_| NetnsError::WorkerGone { path: self.path.clone() })
    }
}

/// The calling thread's netns cookie, the key the hooks use for the pod.
pub fn netns_cookie() -> std::io::Result<u64> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, pointer and length for a u64 option.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runtime_path_missing_here_is_reached_through_the_hosts_root() {
        let scratch = std::env::temp_dir().join(format!("meshcap-netns-path-{}", std::process::id()));
        let host_file = scratch.join("proc/1/root/var/run/netns/cni-1234");
        std::fs::create_dir_all(host_file.parent().unwrap()).unwrap();
        std::fs::write(&host_file, "").unwrap();
        let proc_root = scratch.join("proc");
        let resolved = runtime_netns_path(Path::new("/var/run/netns/cni-1234"), &proc_root);
        let missing = runtime_netns_path(Path::new("/var/run/netns/cni-gone"), &proc_root);
        let here = runtime_netns_path(Path::new("/proc/self/ns/net"), &proc_root);
        let _ = std::fs::remove_dir_all(&scratch);
        assert_eq!(resolved, host_file);
        assert_eq!(missing, Path::new("/var/run/netns/cni-gone"), "kept as given, so the error names it");
        assert_eq!(here, Path::new("/proc/self/ns/net"));
    }
}
