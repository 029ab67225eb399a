//! What runs in the mesh besides the agent: the pods' server apps (podctl) and tcpdump on the node's bridge.

use std::{
    path::{Path, PathBuf},
    process::Child,
    time::Duration,
};

use anyhow::{bail, Context as _};

use super::{
    mesh::{Mesh, Names},
    pcap, procs,
};

pub const HTTP_PORT: u16 = 8080;
pub const BANNER_PORT: u16 = 2525;
pub const BANNER: &str = "220 reports ready";
pub const BACKEND_BODY: &str = "3 open orders (served by backend)";
pub const LEGACY_BODY: &str = "catalog (served by legacy, outside the mesh)";

pub struct Apps {
    pub children: Vec<Child>,
    /// One line per connection the backend app accepted: proves refused connections never reached it.
    pub backend_peer_log: PathBuf,
}

/// http-server in backend and legacy, banner-server in reports; each waited for until it listens.
pub fn start(podctl: &Path, mesh: &Mesh, names: &Names) -> anyhow::Result<Apps> {
    let backend_peer_log = names.scratch().join("backend-peers.log");
    let peer_log = backend_peer_log.display().to_string();
    let (http, banner) = (HTTP_PORT.to_string(), BANNER_PORT.to_string());
    let servers: [(&str, Vec<&str>, u16); 3] = [
        ("backend", vec!["http-server", "--port", &http, "--body", BACKEND_BODY, "--peer-log", &peer_log], HTTP_PORT),
        ("legacy", vec!["http-server", "--port", &http, "--body", LEGACY_BODY], HTTP_PORT),
        ("reports", vec!["banner-server", "--port", &banner, "--banner", BANNER], BANNER_PORT),
    ];
    let mut children = Vec::new();
    // Pushed before waiting, so a server that never listens is still killed by the caller's teardown.
    let result = (|| {
        for (name, args, port) in servers {
            let pod = mesh.pod(name);
            let cmd = procs::in_netns(podctl, &args, &pod.netns_path(), Some(&pod.cgroup))?;
            let log = names.scratch().join(format!("{name}-app.log"));
            children.push(procs::spawn_daemon(cmd, &log)?);
            let child = children.last_mut().expect("just pushed");
            procs::wait_listening(child, port, Duration::from_secs(10)).with_context(|| format!("{name}'s app"))?;
            eprintln!("demo: {name} serves {args:?} on {}:{port}", pod.ip);
        }
        Ok(())
    })();
    match result {
        Ok(()) => Ok(Apps { children, backend_peer_log }),
        Err(e) => {
            for mut child in children {
                let _ = child.kill();
                let _ = child.wait();
            }
            Err(e)
        }
    }
}

/// tcpdump on every interface of the node namespace: each pod's veth and the bridge, i.e. everything that
/// crosses between pods.
pub struct Capture {
    file: PathBuf,
    log: PathBuf,
}

impl Capture {
    pub fn start(mesh: &Mesh, names: &Names) -> anyhow::Result<(Capture, Child)> {
        let file = names.scratch().join("wire.pcap");
        let log = names.scratch().join("tcpdump.log");
        let path = file.display().to_string();
        // -B: in immediate mode libpcap's ring has one full-snaplen (256 KiB) slot per packet, so the default
        // 2 MiB holds 8 packets, and a busy machine drops some of a burst. 64 MiB holds the whole demo.
        let args = ["-i", "any", "--immediate-mode", "-Z", "root", "-U", "-B", "65536", "-w", &path, "tcp"];
        let cmd = procs::in_netns("tcpdump", args, &mesh.node_netns_path(), None)?;
        let mut child = procs::spawn_daemon(cmd, &log)?;
        // tcpdump says "listening on" once its capture is open; packets before that would be missed.
        let listening = procs::wait_until(Duration::from_secs(10), || {
            std::fs::read_to_string(&log).is_ok_and(|t| t.contains("listening on"))
                || child.try_wait().ok().flatten().is_some()
        });
        if !matches!(listening, Ok(true)) || child.try_wait().ok().flatten().is_some() {
            let _ = child.kill();
            let _ = child.wait();
            listening?;
            bail!("tcpdump did not start: {}", std::fs::read_to_string(&log).unwrap_or_default().trim());
        }
        Ok((Capture { file, log }, child))
    }

    /// Stop tcpdump (SIGINT: it flushes and exits) and parse what it wrote; also how many packets it says the
    /// kernel dropped, which explains a missing packet.
    pub fn finish(self, child: &mut Child) -> anyhow::Result<(Vec<pcap::Segment>, u64)> {
        // Packets of the last path may still be in flight through the bridge.
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
        procs::terminate(child, Duration::from_secs(3));
        let bytes = std::fs::read(&self.file).with_context(|| format!("reading {}", self.file.display()))?;
        let segments = pcap::parse(&bytes).with_context(|| format!("parsing {}", self.file.display()))?;
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let dropped =
            log.lines().find_map(|l| l.strip_suffix(" packets dropped by kernel")?.trim().parse().ok()).unwrap_or(0);
        Ok((segments, dropped))
    }
}
