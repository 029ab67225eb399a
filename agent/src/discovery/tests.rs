//! Fixture trees in a temp dir: plain directories with `cgroup.procs` files for cgroups, and a fake proc root
//! whose `<pid>/ns/net` are symlinks to `net:[inode]` as /proc shows them. No root needed.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

mod cgroup;
mod netns;

/// Inode of the host's network namespace in fixtures (the real init_net's number, for familiarity).
const HOST_NET: u64 = 4026531840;

/// A scratch tree, removed on drop (also when the test panics).
struct Fixture {
    root: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!("meshcap-discovery-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let root = std::env::temp_dir().join(name);
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("cgroup")).expect("creating the fixture root");
        Fixture { root }
    }

    fn cgroup_root(&self) -> PathBuf {
        self.root.join("cgroup")
    }

    fn proc_root(&self) -> PathBuf {
        self.root.join("proc")
    }

    /// A cgroup at `rel` below the cgroup root, with every directory on the way a cgroup too (empty cgroup.procs).
    fn cgroup(&self, rel: &str) -> PathBuf {
        let mut dir = self.cgroup_root();
        for part in Path::new(rel) {
            dir.push(part);
            fs::create_dir_all(&dir).expect("creating a fixture cgroup");
            if !dir.join("cgroup.procs").exists() {
                fs::write(dir.join("cgroup.procs"), "").expect("writing cgroup.procs");
            }
        }
        dir
    }

    /// A cgroup at `rel` holding `pids`.
    fn cgroup_with(&self, rel: &str, pids: &[u32]) -> PathBuf {
        let dir = self.cgroup(rel);
        let text: String = pids.iter().map(|p| format!("{p}\n")).collect();
        fs::write(dir.join("cgroup.procs"), text).expect("writing cgroup.procs");
        dir
    }

    /// Process `pid` in network namespace `net:[inode]`, started `start` ticks after boot if given.
    fn process(&self, pid: u32, inode: u64, start: Option<u64>) -> PathBuf {
        let dir = self.proc_root().join(pid.to_string());
        fs::create_dir_all(dir.join("ns")).expect("creating a fixture process");
        self.link(pid, &format!("net:[{inode}]"));
        if let Some(start) = start {
            // Real layout: the command name may hold spaces and parentheses; starttime is field 22.
            let stat =
                format!("{pid} (odd) name) S 1 {pid} {pid} 0 -1 4194560 10 0 0 0 0 0 0 0 20 0 1 0 {start} 1 2\n");
            fs::write(dir.join("stat"), stat).expect("writing stat");
        }
        dir.join("ns/net")
    }

    /// The kernel's kthreadd: pid 2, child of no one, in the initial namespaces.
    fn kthreadd(&self, inode: u64) {
        self.process(2, inode, None);
        let stat = "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0 1 0 0\n";
        fs::write(self.proc_root().join("2/stat"), stat).expect("writing stat");
    }

    fn link(&self, pid: u32, target: &str) {
        let link = self.proc_root().join(pid.to_string()).join("ns/net");
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(target, &link).expect("creating a fixture ns link");
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.root) {
            eprintln!("removing fixture {}: {e}", self.root.display());
        }
    }
}
