//! Unique names for namespaces, cgroups and pin dirs, and removal of the ones a killed test run left behind.
//!
//! A name is `mc<pid><kind><counter>` (kind: `n` node, `p` pod, `a` agent), short enough that anything derived
//! from it still fits the 15-byte interface name limit, and parseable, so leftovers of a process that no longer
//! exists can be recognised and removed.

use std::{
    fs,
    path::Path,
    sync::{
        atomic::{AtomicU32, Ordering},
        Once,
    },
};

use super::cleanup;

static COUNTER: AtomicU32 = AtomicU32::new(0);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Node,
    Pod,
    Agent,
}

impl Kind {
    fn letter(self) -> char {
        match self {
            Kind::Node => 'n',
            Kind::Pod => 'p',
            Kind::Agent => 'a',
        }
    }
}

/// A fresh name of this kind. The first call in a process also sweeps stale leftovers, before anything of this
/// process exists that could be mistaken for one.
pub fn unique(kind: Kind) -> String {
    static SWEEP: Once = Once::new();
    SWEEP.call_once(sweep_stale);
    format!("mc{}{}{}", std::process::id(), kind.letter(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// A counter value for ids that need not be names (pod uids).
pub fn next_counter() -> u32 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// The pid and kind encoded in a harness name, or None for names the harness did not make.
fn parse(name: &str) -> Option<(u32, Kind)> {
    let rest = name.strip_prefix("mc")?;
    let split = rest.find(|c: char| !c.is_ascii_digit())?;
    let (pid, rest) = rest.split_at(split);
    let mut chars = rest.chars();
    let kind = match chars.next()? {
        'n' => Kind::Node,
        'p' => Kind::Pod,
        'a' => Kind::Agent,
        _ => return None,
    };
    let counter = chars.as_str();
    if counter.is_empty() || !counter.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((pid.parse().ok()?, kind))
}

/// Is this a harness name whose creating process is gone? Our own pid counts as gone: the sweep runs before this
/// process has made anything, so such a name was made by an earlier process that had the same pid.
fn is_stale(name: &str) -> bool {
    parse(name).is_some_and(|(pid, _)| pid == std::process::id() || !Path::new(&format!("/proc/{pid}")).exists())
}

fn stale_entries(dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else { return Vec::new() };
    entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|n| is_stale(n)).collect()
}

/// Remove what earlier, killed test processes left: their processes, network namespaces, cgroups, pins and
/// scratch dirs. Failures are reported and otherwise ignored; they cannot be worse than not sweeping.
fn sweep_stale() {
    if let Ok(cgroup2) = super::try_cgroup2_mount() {
        for name in stale_entries(&cgroup2) {
            eprintln!("harness: removing stale cgroup {name}");
            cleanup::remove_cgroup(&cgroup2.join(name));
        }
    }
    for name in stale_entries(Path::new("/run/netns")) {
        eprintln!("harness: removing stale netns {name}");
        cleanup::delete_netns(&name);
    }
    for dir in [Path::new("/sys/fs/bpf").to_path_buf(), std::env::temp_dir()] {
        for name in stale_entries(&dir) {
            eprintln!("harness: removing stale {}", dir.join(&name).display());
            if let Err(e) = fs::remove_dir_all(dir.join(&name)) {
                eprintln!("harness: removing {}: {e}", dir.join(&name).display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let name = format!("mc{}p{}", 4_194_304, 12);
        assert_eq!(parse(&name), Some((4_194_304, Kind::Pod)));
        assert_eq!(parse("mc12a0"), Some((12, Kind::Agent)));
        for foreign in ["mc", "mc12", "mc12p", "mc12x3", "mcp3", "mc12p3x", "docker0", "mc12n3/"] {
            assert_eq!(parse(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn names_fit_interface_limits() {
        assert!(format!("mc{}p{}", 4_194_304, 99_999).len() <= 15);
    }
}
