//! Teardown of cgroups and network namespaces. These run from Drop (also while a test panics), so they report
//! problems on stderr and never panic.

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use super::wait_until;

/// Pids listed in a cgroup's cgroup.procs (empty if the cgroup is gone).
pub fn cgroup_pids(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

fn sigkill(pid: i32) {
    // SAFETY: kill has no memory-safety preconditions; a pid that already exited just yields ESRCH.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

/// Kill every process in the cgroup and its descendants, then remove the directories bottom-up.
pub fn remove_cgroup(dir: &Path) {
    if !dir.exists() {
        return;
    }
    // Children first: rmdir of a cgroup with child cgroups fails with EBUSY.
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&entry.path());
            }
        }
    }
    // cgroup.kill (Linux 5.14+) kills atomically, also processes forking meanwhile; the pid loop is the fallback.
    let _ = fs::write(dir.join("cgroup.kill"), "1");
    let emptied = wait_until(Duration::from_secs(5), || {
        let pids = cgroup_pids(dir);
        pids.iter().copied().for_each(sigkill);
        pids.is_empty()
    });
    if !emptied {
        eprintln!("harness: cgroup {} still has processes {:?}", dir.display(), cgroup_pids(dir));
    }
    // A killed process leaves the cgroup a little after it vanishes from cgroup.procs; rmdir says EBUSY until then.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(20))
            }
            Err(e) => {
                eprintln!("harness: removing cgroup {}: {e}", dir.display());
                return;
            }
        }
    }
}

/// SIGKILL every process whose network namespace is the one bound at `netns_path`, and wait until they are gone.
/// A namespace lives as long as a process is in it, so this is what makes deleting it final.
pub fn kill_netns_processes(netns_path: &Path) {
    let Ok(target) = fs::metadata(netns_path).map(|m| (m.dev(), m.ino())) else { return };
    let members = || -> Vec<i32> {
        let Ok(procs) = fs::read_dir("/proc") else { return Vec::new() };
        procs
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| (m.dev(), m.ino()) == target))
            .collect()
    };
    let gone = wait_until(Duration::from_secs(5), || {
        let pids = members();
        pids.iter().copied().for_each(sigkill);
        pids.is_empty()
    });
    if !gone {
        eprintln!("harness: processes {:?} survive in {}", members(), netns_path.display());
    }
}

/// Kill what runs in the named network namespace and delete it. Its interfaces (veth ends, the bridge) go with it.
pub fn delete_netns(name: &str) {
    let path = Path::new("/run/netns").join(name);
    if !path.exists() {
        return;
    }
    kill_netns_processes(&path);
    match Command::new("ip").args(["netns", "delete", name]).output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => eprintln!("harness: ip netns delete {name}: {}", String::from_utf8_lossy(&out.stderr).trim()),
        Err(e) => eprintln!("harness: running ip netns delete {name}: {e}"),
    }
}
