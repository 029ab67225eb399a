//! The kubelet probe exemption: sock_ops on the kubelet's cgroup records its
//! connections to enrolled pods so their sk_lookup hook lets those (and only
//! those) reach the app in plaintext. See `ebpf/programs/src/kubelet.rs`.

use std::{
    fs,
    path::{Path, PathBuf},
};

use super::{Capture, CaptureError, NodeCgroup, KUBELET_HOOK};
use crate::config::KubeletCgroup;

#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error(
        "kubelet process {pid} is in no cgroup found below {mount}; is the host's cgroup2 hierarchy mounted \
         there? Set --kubelet-cgroup to its directory, or none"
    )]
    NotFound { pid: u32, mount: PathBuf },
    #[error("--kubelet-cgroup {path}: {reason}")]
    Invalid { path: PathBuf, reason: &'static str },
    #[error(
        "the kubelet's cgroup {path} {reason}: exempting it would let those processes reach STRICT pods in \
         plaintext; run the kubelet in a cgroup of its own (systemd: kubelet.service) or set --kubelet-cgroup"
    )]
    TooWide { path: PathBuf, reason: &'static str },
}

/// The exemption covers a cgroup and everything below it, so it must hold
/// the kubelet alone: never the root (a kubelet without systemd may live
/// there), never an ancestor of the agent or of pods.
pub fn check_exemption_scope(mount: &Path, dir: &Path, agent_cgroup: &Path) -> Result<(), KubeletError> {
    let too_wide = |reason| Err(KubeletError::TooWide { path: dir.into(), reason });
    if dir == mount {
        return too_wide("is the root of the hierarchy, which holds every process of the node");
    }
    if agent_cgroup.starts_with(dir) {
        return too_wide("contains the agent's own cgroup");
    }
    if holds_pod_cgroups(dir, 3) {
        return too_wide("contains pod cgroups (kubepods)");
    }
    Ok(())
}

fn holds_pod_cgroups(dir: &Path, depth: u32) -> bool {
    let Ok(entries) = fs::read_dir(dir) else { return false };
    entries.filter_map(Result::ok).filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).any(|e| {
        e.file_name().to_string_lossy().contains("kubepods") || (depth > 1 && holds_pod_cgroups(&e.path(), depth - 1))
    })
}

/// The cgroup of the first process named `kubelet`, or None when no kubelet
/// runs here (a development machine). The directory is found by looking for
/// the pid in `cgroup.procs` below `mount`, because `/proc/<pid>/cgroup` is
/// relative to the reader's cgroup namespace, which in a pod is not the host's.
pub fn find_kubelet_cgroup(mount: &Path, proc_root: &Path) -> Result<Option<PathBuf>, KubeletError> {
    let Some(pid) = find_process(proc_root, "kubelet")? else { return Ok(None) };
    match crate::cgroup::find_pid_cgroup(mount, pid) {
        Some(dir) => Ok(Some(dir)),
        None => Err(KubeletError::NotFound { pid, mount: mount.into() }),
    }
}

/// A cgroup given on the command line: absolute under the mount, or relative to it.
pub fn given_kubelet_cgroup(mount: &Path, given: &Path) -> Result<PathBuf, KubeletError> {
    let full = if given.is_absolute() { given.to_path_buf() } else { mount.join(given) };
    if !full.starts_with(mount) || full == mount {
        return Err(KubeletError::Invalid { path: full, reason: "must be a cgroup below the cgroup2 mount" });
    }
    if !full.join("cgroup.procs").exists() {
        return Err(KubeletError::Invalid { path: full, reason: "does not exist (no cgroup.procs)" });
    }
    Ok(full)
}

fn find_process(proc_root: &Path, comm: &str) -> Result<Option<u32>, KubeletError> {
    let entries = fs::read_dir(proc_root).map_err(|source| KubeletError::Read { path: proc_root.into(), source })?;
    let mut pids: Vec<u32> =
        entries.filter_map(Result::ok).filter_map(|e| e.file_name().to_str()?.parse().ok()).collect();
    pids.sort_unstable();
    // Processes come and go while we read; a vanished one is just skipped.
    Ok(pids.into_iter().find(|pid| {
        fs::read_to_string(proc_root.join(pid.to_string()).join("comm")).is_ok_and(|c| c.trim_end() == comm)
    }))
}

impl Capture {
    /// Covers the kubelet's cgroup with the probe hook (None: removes the
    /// exemption an earlier run left). A cgroup given explicitly must be
    /// usable; `auto` that finds no kubelet only warns, since the agent
    /// serves everything else either way.
    pub(super) fn set_up_kubelet_exemption(
        &mut self,
        mount: &Path,
        wanted: &KubeletCgroup,
        agent_cgroup: &Path,
    ) -> Result<Option<PathBuf>, CaptureError> {
        let dir = match wanted {
            KubeletCgroup::Off => None,
            KubeletCgroup::Path(p) => {
                let usable = given_kubelet_cgroup(mount, p)
                    .and_then(|dir| check_exemption_scope(mount, &dir, agent_cgroup).map(|()| dir));
                match usable {
                    Ok(dir) => Some(dir),
                    Err(e) => {
                        // Refusing to start must not leave an earlier run's exemption in force.
                        self.pins.remove_other_node_links(NodeCgroup::Kubelet, None)?;
                        return Err(e.into());
                    }
                }
            }
            KubeletCgroup::Auto => match find_kubelet_cgroup(mount, Path::new("/proc")).and_then(|found| {
                found.map(|dir| check_exemption_scope(mount, &dir, agent_cgroup).map(|()| dir)).transpose()
            }) {
                Ok(Some(dir)) => Some(dir),
                Ok(None) => {
                    tracing::info!("no kubelet process on this machine: kubelet probe exemption off");
                    None
                }
                Err(e) => {
                    tracing::error!(
                        "{e}; kubelet probe exemption OFF: health probes of STRICT pods will fail until fixed"
                    );
                    None
                }
            },
        };
        match &dir {
            Some(dir) => {
                self.cover_node_cgroup(NodeCgroup::Kubelet, dir, KUBELET_HOOK)?;
                tracing::info!(cgroup = %dir.display(), "kubelet probe exemption on: its connections to enrolled pods reach the app directly");
            }
            None => self.pins.remove_other_node_links(NodeCgroup::Kubelet, None)?,
        }
        Ok(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory removed on drop (also when an assertion fails).
    struct Scratch(PathBuf);
    impl Scratch {
        fn new(tag: &str) -> Self {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("meshcap-kubelet-{tag}-{}-{n}", std::process::id()));
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
        fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn tree(root: &Path, dirs: &[(&str, &str)]) {
        for (dir, procs) in dirs {
            let d = root.join(dir);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("cgroup.procs"), procs).unwrap();
        }
    }

    #[test]
    fn finds_the_kubelet_cgroup_by_pid_in_nested_layouts() {
        let tmp = Scratch::new("t");
        let mount = tmp.path().join("cgroup");
        tree(
            &mount,
            &[
                ("", "1\n"),
                ("system.slice", ""),
                ("system.slice/containerd.service", "300\n"),
                ("system.slice/docker-abc.scope", "400\n"),
                ("system.slice/docker-abc.scope/kubelet.slice/kubelet.service", "417\n"),
            ],
        );
        let proc_root = tmp.path().join("proc");
        for (pid, comm) in [(1, "systemd"), (300, "containerd"), (417, "kubelet")] {
            fs::create_dir_all(proc_root.join(pid.to_string())).unwrap();
            fs::write(proc_root.join(pid.to_string()).join("comm"), format!("{comm}\n")).unwrap();
        }
        let found = find_kubelet_cgroup(&mount, &proc_root).unwrap();
        assert_eq!(found, Some(mount.join("system.slice/docker-abc.scope/kubelet.slice/kubelet.service")));
    }

    #[test]
    fn no_kubelet_is_none_and_a_lost_kubelet_is_an_error() {
        let tmp = Scratch::new("t");
        let mount = tmp.path().join("cgroup");
        tree(&mount, &[("", "1\n")]);
        let proc_root = tmp.path().join("proc");
        fs::create_dir_all(proc_root.join("1")).unwrap();
        fs::write(proc_root.join("1/comm"), "systemd\n").unwrap();
        assert_eq!(find_kubelet_cgroup(&mount, &proc_root).unwrap(), None);
        fs::create_dir_all(proc_root.join("99")).unwrap();
        fs::write(proc_root.join("99/comm"), "kubelet\n").unwrap();
        let err = find_kubelet_cgroup(&mount, &proc_root).unwrap_err().to_string();
        assert!(err.contains("kubelet process 99") && err.contains("--kubelet-cgroup"), "{err}");
    }

    #[test]
    fn given_cgroups_must_exist_below_the_mount() {
        let tmp = Scratch::new("t");
        let mount = tmp.path().join("cgroup");
        tree(&mount, &[("", ""), ("kubelet.slice", "")]);
        assert_eq!(given_kubelet_cgroup(&mount, Path::new("kubelet.slice")).unwrap(), mount.join("kubelet.slice"));
        assert!(given_kubelet_cgroup(&mount, Path::new("missing"))
            .unwrap_err()
            .to_string()
            .contains("no cgroup.procs"));
        assert!(given_kubelet_cgroup(&mount, Path::new("/etc")).is_err());
        assert!(given_kubelet_cgroup(&mount, &mount).is_err());
    }

    #[test]
    fn the_exemption_never_covers_the_root_the_agent_or_pods() {
        let tmp = Scratch::new("t");
        let mount = tmp.path().join("cgroup");
        tree(
            &mount,
            &[
                ("", ""),
                ("system.slice/kubelet.service", ""),
                ("system.slice/meshcap.scope", ""),
                ("kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice", ""),
                ("node/kubepods/burstable", ""),
            ],
        );
        let agent = mount.join("system.slice/meshcap.scope");
        let ok = mount.join("system.slice/kubelet.service");
        check_exemption_scope(&mount, &ok, &agent).expect("the kubelet's own service cgroup");
        let cases = [
            (mount.clone(), "root of the hierarchy"),
            (mount.join("system.slice"), "agent's own cgroup"),
            (mount.join("kubelet.slice"), "pod cgroups"),
            (mount.join("node"), "pod cgroups"),
        ];
        for (dir, why) in cases {
            let err = check_exemption_scope(&mount, &dir, &agent).unwrap_err().to_string();
            assert!(err.contains(why) && err.contains(&dir.display().to_string()), "{dir:?}: {err}");
        }
    }
}
