//! `cargo xtask demo` end to end, twice in a row: every path behaves, and after each run nothing of the demo is
//! left (acceptance: "after the demo nothing is left"). Privileged: needs root, like the agent's tests.
//!
//! It runs the demo with `--no-build` because it runs inside `cargo test`, which holds the build lock; `cargo
//! xtask test` builds every binary (the agent, podctl) before it runs the tests.

use std::{
    fs,
    io::Read as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

const PATHS: [&str; 5] =
    ["frontend -> backend", "legacy -> backend", "legacy -> reports", "frontend -> reports", "frontend -> legacy"];

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn cgroup2_mount() -> PathBuf {
    let info = fs::read_to_string("/proc/self/mountinfo").expect("reading /proc/self/mountinfo");
    info.lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .expect("a cgroup2 mount")
}

/// Everything named `mcdemo*` where the demo creates things, and every live process that belongs to a demo (its
/// command line names a demo path, or it sits in a demo cgroup).
fn leftovers() -> Vec<String> {
    let mut found = Vec::new();
    let cgroup2 = cgroup2_mount();
    for dir in
        [Path::new("/run/netns"), cgroup2.as_path(), Path::new("/sys/fs/bpf"), Path::new("/tmp"), Path::new("/run")]
    {
        for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("mcdemo") {
                found.push(dir.join(name).display().to_string());
            }
        }
    }
    let me = std::process::id().to_string();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
            continue;
        }
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains("mcdemo") || cgroup.contains("mcdemo") {
            found.push(format!("process {pid}: {}", String::from_utf8_lossy(&cmdline).replace('\0', " ")));
        }
    }
    found
}

/// Runs `xtask demo --no-build`, killing it after five minutes; returns (success, stdout, stderr).
fn run_demo() -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["demo", "--no-build"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting xtask demo");
    let pipes = [
        child.stdout.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        child.stderr.take().map(|p| Box::new(p) as _),
    ];
    let readers: Vec<_> = pipes
        .into_iter()
        .map(|pipe| {
            thread::spawn(move || {
                let mut text = String::new();
                if let Some(mut pipe) = pipe {
                    let _ = pipe.read_to_string(&mut text);
                }
                text
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for xtask demo") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            // SIGTERM: the demo cleans up on it, which is what the leftover check then looks at.
            // SAFETY: kill(2) on our own unreaped child.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(100));
    };
    let mut texts = readers.into_iter().map(|r| r.join().unwrap_or_default());
    let (stdout, stderr) = (texts.next().unwrap_or_default(), texts.next().unwrap_or_default());
    (status.is_some_and(|s| s.success()), stdout, stderr)
}

#[test]
fn demo_passes_and_leaves_nothing_behind_twice_in_a_row() {
    if !is_root() {
        if std::env::var_os("CI").is_some() {
            panic!("the demo test needs root in CI");
        }
        eprintln!("skipping: the demo needs root");
        return;
    }
    let before = leftovers();
    assert!(
        before.is_empty(),
        "demo leftovers before the test (`cargo xtask demo --cleanup` removes them): {before:#?}"
    );
    for run in 1..=2 {
        let (ok, stdout, stderr) = run_demo();
        println!("--- run {run} stdout ---\n{stdout}");
        eprintln!("--- run {run} stderr ---\n{stderr}");
        assert!(ok, "run {run}: the demo failed");
        for path in PATHS {
            let row = stdout.lines().find(|l| l.starts_with(path));
            assert!(
                row.is_some_and(|r| r.split_whitespace().any(|w| w == "OK")),
                "run {run}: no OK row for {path}: {row:?}"
            );
        }
        let left = leftovers();
        assert!(left.is_empty(), "run {run} left: {left:#?}");
    }
}
