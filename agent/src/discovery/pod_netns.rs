//! The pod's network namespace, through a process in its cgroup.
//!
//! Namespaces are compared by the target of their `ns/net` link, `net:[inode]`, as /proc shows it: every network
//! namespace is an inode of the one nsfs, so the inode names it, and readlink gets it without opening the
//! namespace (stat would follow the magic link into nsfs). A test fixture makes the same thing with a plain
//! symlink whose target is that text, so one code path serves the real /proc and fixtures alike.

use std::{
    collections::BTreeSet,
    fs,
    io::ErrorKind,
    path::{Path, PathBuf},
};

use super::{DiscoveryError, MAX_DEPTH};

pub(super) fn find(proc_root: &Path, pod_cgroup: &Path) -> Result<PathBuf, DiscoveryError> {
    let pids = cgroup_pids(pod_cgroup)?;
    if pids.is_empty() {
        return Err(DiscoveryError::NoProcesses { cgroup: pod_cgroup.into() });
    }
    let host = host_netns(proc_root)?;

    let mut host_pids = Vec::new();
    let mut last_error = None;
    // The pod's sandbox (pause) process starts first and its containers join its namespace; a process that later
    // made a namespace of its own (`unshare -n` in an app) must not win, so the oldest process decides.
    let mut oldest: Option<((u64, u32), PathBuf)> = None;
    for pid in pids {
        let path = proc_root.join(pid.to_string()).join("ns/net");
        match netns_id(&path) {
            Ok(id) if id == host => host_pids.push(pid),
            Ok(_) => {
                let key = (start_time(proc_root, pid).unwrap_or(u64::MAX), pid);
                if oldest.as_ref().is_none_or(|(best, _)| key < *best) {
                    oldest = Some((key, path));
                }
            }
            Err(LinkError::NotANetns(err)) => return Err(err),
            // Exited since cgroup.procs was read, most likely; another process will do.
            Err(LinkError::Io(source)) => last_error = Some((path, source)),
        }
    }
    if let Some((_, path)) = oldest {
        return Ok(path);
    }
    match last_error {
        Some((path, source)) if host_pids.is_empty() => {
            Err(DiscoveryError::NetnsUnreadable { cgroup: pod_cgroup.into(), path, source })
        }
        _ => Err(DiscoveryError::HostNetwork { cgroup: pod_cgroup.into(), pids: host_pids, host }),
    }
}

/// The netns of `<proc_root>/1`. Reading it needs ptrace access to init, which a hardened init can deny even to
/// root; kthreadd (pid 2 of the host's pid namespace) lives in the initial namespaces by construction, so its
/// netns is the host's too and serves when init's cannot be read.
fn host_netns(proc_root: &Path) -> Result<String, DiscoveryError> {
    let init = proc_root.join("1/ns/net");
    let source = match netns_id(&init) {
        Ok(id) => return Ok(id),
        Err(LinkError::NotANetns(err)) => return Err(err),
        Err(LinkError::Io(source)) => source,
    };
    let kthreadd = stat_fields(proc_root, 2)
        .is_some_and(|(comm, rest)| comm == "kthreadd" && rest.get(1).is_some_and(|ppid| ppid == "0"));
    let unreadable = || DiscoveryError::HostNetns { proc_root: proc_root.into(), path: init.clone(), source };
    if !kthreadd {
        return Err(unreadable());
    }
    netns_id(&proc_root.join("2/ns/net")).map_err(|e| match e {
        LinkError::NotANetns(err) => err,
        LinkError::Io(_) => unreadable(),
    })
}

enum LinkError {
    Io(std::io::Error),
    NotANetns(DiscoveryError),
}

/// `net:[4026531840]` for a network namespace link; anything else there is an error in itself.
fn netns_id(path: &Path) -> Result<String, LinkError> {
    let target = fs::read_link(path).map_err(LinkError::Io)?;
    let target = target.to_string_lossy().into_owned();
    let inode = target.strip_prefix("net:[").and_then(|rest| rest.strip_suffix(']'));
    if inode.is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit())) {
        Ok(target)
    } else {
        Err(LinkError::NotANetns(DiscoveryError::NotANetns { path: path.into(), target }))
    }
}

/// When the process started, in clock ticks since boot (field 22 of `/proc/<pid>/stat`).
pub(super) fn start_time(proc_root: &Path, pid: u32) -> Option<u64> {
    let (_, rest) = stat_fields(proc_root, pid)?;
    rest.get(22 - 3)?.parse().ok()
}

/// `/proc/<pid>/stat` as the command name (field 2) and the fields after it (from field 3, the state). The name
/// sits in parentheses and may itself hold spaces and parentheses, so it ends at the last ')'.
fn stat_fields(proc_root: &Path, pid: u32) -> Option<(String, Vec<String>)> {
    let stat = fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
    let (head, rest) = stat.rsplit_once(')')?;
    let (_, comm) = head.split_once('(')?;
    Some((comm.to_string(), rest.split_whitespace().map(str::to_string).collect()))
}

/// Pids in `cgroup` and every cgroup below it (to [`MAX_DEPTH`] levels, no symlinks). cgroup v2 keeps processes
/// in leaves once controllers are enabled, so a pod's processes are normally in its container scopes, not in the
/// pod cgroup itself. A child cgroup that vanishes meanwhile (a container stopping) is skipped; the pod's own
/// cgroup must be readable.
fn cgroup_pids(cgroup: &Path) -> Result<BTreeSet<u32>, DiscoveryError> {
    let mut pids = BTreeSet::new();
    let mut pending = vec![(cgroup.to_path_buf(), 0)];
    while let Some((dir, depth)) = pending.pop() {
        let procs = dir.join("cgroup.procs");
        match fs::read_to_string(&procs) {
            Ok(text) => pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok())),
            Err(e) if e.kind() == ErrorKind::NotFound && dir != cgroup => continue,
            Err(source) => return Err(DiscoveryError::CgroupProcs { path: procs, source }),
        }
        if depth >= MAX_DEPTH {
            continue;
        }
        let Ok(entries) = fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pending.push((entry.path(), depth + 1));
            }
        }
    }
    Ok(pids)
}
