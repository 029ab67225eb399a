//! cgroup v2: finding the mount, resolving pod cgroup directories, and giving
//! the agent a cgroup of its own (loop avoidance is by cgroup: the agent's
//! sockets are never in a pod's cgroup, so its connects are never captured).

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup2 filesystem in /proc/self/mountinfo; meshcap needs cgroup v2")]
    NoCgroup2,
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cgroup {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("joining cgroup {path} (write to cgroup.procs): {source}")]
    Join { path: PathBuf, source: std::io::Error },
}

/// Mount point of the cgroup2 hierarchy (`/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` in hybrid mode).
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = fs::read_to_string(path).map_err(|source| CgroupError::Read { path: path.into(), source })?;
    find_cgroup2_in_mountinfo(&text).ok_or(CgroupError::NoCgroup2)
}

/// mountinfo: `id parent major:minor root mountpoint opts... - fstype source superopts`.
pub fn find_cgroup2_in_mountinfo(text: &str) -> Option<PathBuf> {
    text.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        Some(PathBuf::from(left.split_whitespace().nth(4)?))
    })
}

/// The calling process's cgroup v2 path, relative to the hierarchy root.
pub fn own_cgroup() -> Result<String, CgroupError> {
    let path = Path::new("/proc/self/cgroup");
    let text = fs::read_to_string(path).map_err(|source| CgroupError::Read { path: path.into(), source })?;
    Ok(text.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or("/").to_string())
}

/// A pod's cgroup directory: absolute under the mount, or relative to it.
/// Never the root: attaching there would capture every process on the node;
/// never the agent's own cgroup or an ancestor of it: the engine's own
/// connects would be captured and loop.
pub fn resolve_pod_cgroup(mount: &Path, given: &Path, agent: &Path) -> Result<PathBuf, CgroupError> {
    let full = if given.is_absolute() { given.to_path_buf() } else { mount.join(given) };
    let invalid = |reason: &str| CgroupError::Invalid { path: full.clone(), reason: reason.into() };
    if full.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(invalid("must not contain `..`"));
    }
    let rel = full
        .strip_prefix(mount)
        .map_err(|_| invalid(&format!("is not under the cgroup2 mount {}", mount.display())))?;
    if rel.as_os_str().is_empty() {
        return Err(invalid("is the root of the hierarchy; capture is only ever attached to a pod's own cgroup"));
    }
    if agent.starts_with(&full) {
        return Err(invalid(&format!(
            "contains the agent's own cgroup {}; capturing it would capture the engine itself",
            agent.display()
        )));
    }
    if !full.join("cgroup.procs").exists() {
        return Err(invalid("does not exist (no cgroup.procs)"));
    }
    Ok(full)
}

/// cgroup id as the kernel reports it (`bpf_get_current_cgroup_id`): the
/// cgroup directory's inode number.
pub fn cgroup_id(dir: &Path) -> Result<u64, CgroupError> {
    fs::metadata(dir).map(|m| m.ino()).map_err(|source| CgroupError::Read { path: dir.into(), source })
}

/// Gives the agent a cgroup of its own. In a pod it already has one; on a
/// bare machine every process sits at the root, so it creates `name` and
/// moves itself there. Must run before any thread is started.
///
/// `/proc/self/cgroup` is relative to the caller's cgroup namespace: in a
/// pod it says `/` while `mount` shows the host's whole tree. So the answer
/// is checked against the tree: the directory whose `cgroup.procs` lists
/// this process is the agent's cgroup.
pub fn ensure_agent_cgroup(mount: &Path, name: &str) -> Result<PathBuf, CgroupError> {
    let current = own_cgroup()?;
    let pid = std::process::id();
    let claimed = mount.join(current.trim_start_matches('/'));
    let found = if lists_pid(&claimed, pid) { Some(claimed.clone()) } else { find_pid_cgroup(mount, pid) };
    match found {
        Some(dir) if dir != mount => return Ok(dir),
        Some(_) => {}
        // Not in this tree at all (another pid namespace?): trust /proc.
        None if current != "/" => return Ok(claimed),
        None => {}
    }
    let dir = mount.join(name);
    fs::create_dir_all(&dir).map_err(|source| CgroupError::Join { path: dir.clone(), source })?;
    fs::write(dir.join("cgroup.procs"), "0").map_err(|source| CgroupError::Join { path: dir.clone(), source })?;
    Ok(dir)
}

/// Deep enough for kind's nodes seen from the host
/// (`system.slice/docker-<id>.scope/kubelet.slice/kubelet-kubepods.slice/...`).
const MAX_DEPTH: usize = 8;

/// The cgroup below `root` whose `cgroup.procs` lists `pid` (as this
/// process's pid namespace numbers it). Never follows symlinks.
pub fn find_pid_cgroup(root: &Path, pid: u32) -> Option<PathBuf> {
    fn walk(dir: &Path, pid: u32, depth: usize) -> Option<PathBuf> {
        if lists_pid(dir, pid) {
            return Some(dir.to_path_buf());
        }
        if depth >= MAX_DEPTH {
            return None;
        }
        fs::read_dir(dir)
            .ok()?
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .find_map(|e| walk(&e.path(), pid, depth + 1))
    }
    walk(root, pid, 0)
}

fn lists_pid(dir: &Path, pid: u32) -> bool {
    fs::read_to_string(dir.join("cgroup.procs")).is_ok_and(|procs| procs.lines().any(|l| l.trim().parse() == Ok(pid)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_and_unified_mounts() {
        let hybrid = "25 24 0:22 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755\n\
                      26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(find_cgroup2_in_mountinfo(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let unified = "35 24 0:30 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(find_cgroup2_in_mountinfo(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(find_cgroup2_in_mountinfo("1 0 0:1 / / rw - ext4 /dev/vda rw\n"), None);
    }

    #[test]
    fn pod_cgroup_must_be_a_real_child() {
        let mount = std::env::temp_dir().join(format!("mc-cg-{}", std::process::id()));
        let pod = mount.join("kubepods/pod1");
        fs::create_dir_all(&pod).unwrap();
        fs::write(pod.join("cgroup.procs"), "").unwrap();
        let agent = mount.join("system/meshcap");
        let resolve = |p: &Path| resolve_pod_cgroup(&mount, p, &agent);
        assert_eq!(resolve(Path::new("kubepods/pod1")).unwrap(), pod);
        assert!(resolve(&mount).unwrap_err().to_string().contains("root"));
        assert!(resolve(Path::new("/elsewhere/x")).unwrap_err().to_string().contains("not under"));
        assert!(resolve(Path::new("kubepods/../x")).unwrap_err().to_string().contains(".."));
        assert!(resolve(Path::new("missing")).unwrap_err().to_string().contains("does not exist"));
        assert!(resolve(Path::new("system")).unwrap_err().to_string().contains("agent's own cgroup"));
        assert!(resolve(Path::new("system/meshcap")).unwrap_err().to_string().contains("agent's own cgroup"));
        fs::remove_dir_all(&mount).unwrap();
    }
}
