//! The simulated-pod harness: small helpers shared by the node, pod and agent handles.

pub mod agent;
mod cleanup;
mod names;
pub mod node;
pub mod yaml;

use std::{
    fs,
    io::Write as _,
    net::{Ipv4Addr, TcpListener},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicU32, Ordering},
        OnceLock,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

/// Poll `cond` every 20 ms until it holds or `timeout` passes; the result says which.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// `N` distinct ports on 127.0.0.1 that were free a moment ago, for listeners the test starts later (the agent's
/// admin, metrics and readiness ports). They come from below the kernel's ephemeral range, handed out in turn by
/// a counter of this process: a port from `bind(:0)` would be free again once released, and the kernel could give
/// it to any of the tests' outgoing connections before the agent binds it.
pub fn free_ports<const N: usize>() -> [u16; N] {
    std::array::from_fn(|_| next_unused_port())
}

fn next_unused_port() -> u16 {
    static NEXT: OnceLock<AtomicU32> = OnceLock::new();
    let (low, high) = listener_port_range();
    // Test binaries run one after another, but an earlier one's listeners may still be closing: start each
    // process at its own place in the range.
    let next = NEXT.get_or_init(|| AtomicU32::new(std::process::id() * 37 % (high - low)));
    for _ in 0..(high - low) {
        let port = (low + next.fetch_add(1, Ordering::Relaxed) % (high - low)) as u16;
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 in {low}..{high}")
}

/// Ports the kernel never hands out to `connect()` or `bind(:0)`: from 10000 up to the start of
/// `net.ipv4.ip_local_port_range`.
fn listener_port_range() -> (u32, u32) {
    const LOW: u32 = 10_000;
    let ephemeral_start = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    assert!(
        ephemeral_start > LOW + 1_000,
        "net.ipv4.ip_local_port_range starts at {ephemeral_start}: the tests need ports {LOW}..{} outside it",
        LOW + 1_000
    );
    (LOW, ephemeral_start)
}

/// Where the cgroup v2 hierarchy is mounted. Hybrid machines put it below /sys/fs/cgroup (e.g. `unified`), so it
/// is looked up instead of assumed.
pub fn cgroup2_mount() -> PathBuf {
    try_cgroup2_mount().expect("a cgroup2 mount in /proc/self/mountinfo")
}

fn try_cgroup2_mount() -> anyhow::Result<PathBuf> {
    static MOUNT: OnceLock<Option<PathBuf>> = OnceLock::new();
    MOUNT
        .get_or_init(|| {
            let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
            info.lines().find_map(|line| {
                // The filesystem type is the first field after the " - " separator; the mount point is field 5.
                let (left, right) = line.split_once(" - ")?;
                let mount_point = left.split_whitespace().nth(4)?;
                (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(unescape_mount_path(mount_point)))
            })
        })
        .clone()
        .context("no cgroup2 filesystem in /proc/self/mountinfo")
}

/// Mount tables escape space, tab, newline and backslash as three-digit octal.
fn unescape_mount_path(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok());
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Can this process run the privileged tests? Without root, cgroup v2, a bpf filesystem at /sys/fs/bpf and
/// iproute2, it cannot. Outside CI that is a skip (returns false, says why); in CI (env `CI` set) it panics,
/// because a privileged test that silently skips there would hide a broken machine setup.
pub fn privileged_or_skip() -> bool {
    match privileged_check() {
        Ok(()) => true,
        Err(reason) if std::env::var_os("CI").is_some() => {
            panic!("privileged test cannot run in CI: {reason:#}")
        }
        Err(reason) => {
            eprintln!("skipping: {reason:#}");
            false
        }
    }
}

fn privileged_check() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("not running as root");
    }
    let cgroup = try_cgroup2_mount()?;
    if !cgroup.join("cgroup.procs").exists() {
        bail!("{} has no cgroup.procs", cgroup.display());
    }
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    let bpffs = mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        (f.nth(1), f.next()) == (Some("/sys/fs/bpf"), Some("bpf"))
    });
    if !bpffs {
        bail!("no bpf filesystem at /sys/fs/bpf (`cargo xtask setup` mounts one)");
    }
    for (tool, args) in [("ip", ["-V"]), ("nsenter", ["--version"])] {
        let ok = Command::new(tool).args(args).output().is_ok_and(|o| o.status.success());
        if !ok {
            bail!("`{tool}` is not installed (`cargo xtask setup` installs it)");
        }
    }
    Ok(())
}

/// Path of a binary of this workspace: env `env_override` if set, else next to the running test executable.
/// Test executables live in `target/<profile>/deps`, binaries one level up.
pub fn bin_path(name: &str, env_override: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env_override) {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("path of the running executable");
    let mut dir = exe.parent().expect("executable has a parent directory").to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir.join(name)
}

/// The `podctl` helper binary. Integration tests in this package should prefer `env!("CARGO_BIN_EXE_podctl")`,
/// which cargo guarantees is built; this lookup (or env `MESHCAP_PODCTL_BIN`) serves the library itself.
pub fn podctl() -> PathBuf {
    bin_path("podctl", "MESHCAP_PODCTL_BIN")
}

/// Parse the last non-empty line of a program's stdout as JSON (podctl prints exactly one such line).
pub fn parse_json_line(stdout: &[u8]) -> anyhow::Result<serde_json::Value> {
    let text = String::from_utf8_lossy(stdout);
    let line = text.lines().rev().find(|l| !l.trim().is_empty()).context("no output line to parse as JSON")?;
    serde_json::from_str(line).with_context(|| format!("not JSON: {line:?}"))
}

/// Replace `path` with `contents` in one step, so a process watching the file never reads half of it.
pub fn write_atomic(path: &Path, contents: &str) -> anyhow::Result<()> {
    let name = path.file_name().context("path has no file name")?.to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp{}", std::process::id()));
    let mut file = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path(r"/a\040b\134c"), r"/a b\c");
        assert_eq!(unescape_mount_path(r"/plain\"), r"/plain\");
    }

    #[test]
    fn json_line_is_the_last_non_empty_one() {
        let v = parse_json_line(b"noise\n{\"ok\":true}\n\n").expect("parses");
        assert_eq!(v["ok"], true);
        assert!(parse_json_line(b"").is_err());
    }

    #[test]
    fn ports_for_later_listeners_are_distinct_and_outside_the_ephemeral_range() {
        let (low, high) = listener_port_range();
        let ports: Vec<u16> = (0..50).flat_map(|_| free_ports::<3>()).collect();
        let distinct: std::collections::HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "a port handed out twice: {ports:?}");
        assert!(ports.iter().all(|&p| (low..high).contains(&u32::from(p))), "{ports:?} outside {low}..{high}");
        // A port in use is skipped.
        let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, free_ports::<1>()[0] + 1)).expect("binding the next port");
        let taken = taken.local_addr().expect("bound address").port();
        assert!(!free_ports::<3>().contains(&taken), "port {taken} is in use");
    }
}
