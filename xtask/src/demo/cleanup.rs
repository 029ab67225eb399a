//! Removal of what a demo created, by name: pod processes and cgroups, network namespaces, pins, scratch dirs
//! and pid files. The end of every run uses it for its own names; `--cleanup` uses it for every `mcdemo` name
//! (after stopping the agents recorded in pid files). Teardown never fails: problems are reported and the rest
//! is still removed.

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use super::mesh::{cgroup2_mount, PREFIX};

/// `cargo xtask demo --cleanup`: agents first (they hold pod namespaces and would re-enroll pods), then the rest.
pub fn sweep_everything() -> anyhow::Result<()> {
    let mut agents = 0;
    for name in entries(Path::new("/run"), &|n: &str| n.starts_with(PREFIX) && n.ends_with(".pid")) {
        let pid_file = Path::new("/run").join(&name);
        if let Some(pid) = fs::read_to_string(&pid_file).ok().and_then(|s| s.trim().parse::<i32>().ok()) {
            agents += usize::from(stop_agent(pid));
        }
    }
    // An agent whose pid file is gone (or a demo killed before it wrote one) is still recognisable by its pins.
    for pid in pids() {
        if is_demo_agent(pid) {
            agents += usize::from(stop_agent(pid));
        }
    }
    let removed = sweep(&|n: &str| n.starts_with(PREFIX));
    println!("demo cleanup: stopped {agents} agent(s), removed {removed} leftover(s) named {PREFIX}*");
    Ok(())
}

/// Remove everything whose name satisfies `owned`; returns how many things were removed.
pub fn sweep(owned: &dyn Fn(&str) -> bool) -> usize {
    let mut removed = 0;
    // Cgroups before namespaces: killing the pods' processes is what lets their namespaces go.
    if let Ok(cgroup2) = cgroup2_mount() {
        for name in entries(&cgroup2, owned) {
            remove_cgroup(&cgroup2.join(name));
            removed += 1;
        }
    }
    for name in entries(Path::new("/run/netns"), owned) {
        delete_netns(&name);
        removed += 1;
    }
    for dir in ["/sys/fs/bpf", "/tmp"] {
        for name in entries(Path::new(dir), owned) {
            // remove_dir_all works on bpffs: unlinking the pins detaches the links and frees the maps.
            let path = Path::new(dir).join(name);
            match fs::remove_dir_all(&path).or_else(|_| fs::remove_file(&path)) {
                Ok(()) => removed += 1,
                Err(e) => eprintln!("demo: removing {}: {e}", path.display()),
            }
        }
    }
    for name in entries(Path::new("/run"), &|n: &str| owned(n) && n.ends_with(".pid")) {
        if fs::remove_file(Path::new("/run").join(name)).is_ok() {
            removed += 1;
        }
    }
    removed
}

fn entries(dir: &Path, owned: &dyn Fn(&str) -> bool) -> Vec<String> {
    let Ok(list) = fs::read_dir(dir) else { return Vec::new() };
    list.filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|n| owned(n)).collect()
}

fn pids() -> Vec<i32> {
    let Ok(list) = fs::read_dir("/proc") else { return Vec::new() };
    list.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect()
}

/// A `meshcap-agent` whose command line names a demo pin dir. Checked before signalling, so a pid file whose pid
/// was reused by an unrelated process never gets that process killed.
fn is_demo_agent(pid: i32) -> bool {
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    let pins = format!("/sys/fs/bpf/{PREFIX}");
    args.first().is_some_and(|a| a.ends_with(b"meshcap-agent")) && args.iter().any(|a| a.starts_with(pins.as_bytes()))
}

/// SIGTERM, up to 8 s to drain, then SIGKILL. Returns whether it was a demo agent.
fn stop_agent(pid: i32) -> bool {
    if !is_demo_agent(pid) {
        return false;
    }
    // SAFETY: kill(2) has no memory-safety preconditions; the pid was just checked to be a demo agent.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(8);
    while is_demo_agent(pid) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    if is_demo_agent(pid) {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    true
}

fn cgroup_pids(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

fn sigkill_all(pids: &[i32]) {
    for &pid in pids {
        // SAFETY: kill(2) has no memory-safety preconditions; a pid that already exited yields ESRCH.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Poll until `done` or `timeout`; teardown must never wait forever (nor be cut short by Ctrl-C).
fn poll(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Kill every process in the cgroup (and below), then rmdir bottom-up.
fn remove_cgroup(dir: &Path) {
    if let Ok(children) = fs::read_dir(dir) {
        for child in children.flatten() {
            if child.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&child.path());
            }
        }
    }
    // cgroup.kill (5.14+) also gets processes forking meanwhile; the SIGKILL loop is the fallback.
    let _ = fs::write(dir.join("cgroup.kill"), "1");
    if !poll(Duration::from_secs(5), || {
        let pids = cgroup_pids(dir);
        sigkill_all(&pids);
        pids.is_empty()
    }) {
        eprintln!("demo: cgroup {} still has processes {:?}", dir.display(), cgroup_pids(dir));
    }
    // A killed process leaves the cgroup a moment after it leaves cgroup.procs: rmdir says EBUSY until then.
    let mut last = None;
    let gone = poll(Duration::from_secs(5), || match fs::remove_dir(dir) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => {
            last = Some(e);
            false
        }
    });
    if !gone {
        eprintln!("demo: removing cgroup {}: {}", dir.display(), last.map(|e| e.to_string()).unwrap_or_default());
    }
}

/// Kill the processes living in the namespace (tcpdump in the node's, anything started by hand in a pod's), then
/// delete it; its veths and the bridge go with it.
fn delete_netns(name: &str) {
    let path = Path::new("/run/netns").join(name);
    if let Ok(target) = fs::metadata(&path).map(|m| (m.dev(), m.ino())) {
        let members = || -> Vec<i32> {
            pids()
                .into_iter()
                .filter(|pid| fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| (m.dev(), m.ino()) == target))
                .collect()
        };
        if !poll(Duration::from_secs(5), || {
            let pids = members();
            sigkill_all(&pids);
            pids.is_empty()
        }) {
            eprintln!("demo: processes {:?} survive in netns {name}", members());
        }
    }
    match Command::new("ip").args(["netns", "delete", name]).output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => eprintln!("demo: ip netns delete {name}: {}", String::from_utf8_lossy(&out.stderr).trim()),
        Err(e) => eprintln!("demo: running ip netns delete {name}: {e}"),
    }
}
