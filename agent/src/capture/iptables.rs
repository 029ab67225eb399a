//! `--capture-mode iptables`: the sidecar model's capture, as istio-iptables
//! installs it, for comparison with the eBPF hooks (the benchmark's baseline).
//!
//! Per enrolled pod, inside its netns, nat-table chains send outbound TCP to
//! the engine's 15001 and inbound TCP to its 15006 with `REDIRECT`; the
//! engine reads the original destination with `SO_ORIGINAL_DST`. Adapted to
//! this layout in one way: Istio tells Envoy's own traffic apart by its uid
//! (1337), but here the engine is the agent, outside the pod, so its sockets
//! carry `SO_MARK` [`ENGINE_MARK`] and the owner matches become mark matches.
//!
//! Chains are written with `iptables-restore --noflush` (one transaction per
//! family: a pod whose rules change is never without them), then the jumps
//! from `PREROUTING` and `OUTPUT` are added if missing.

use std::{
    collections::HashMap,
    io::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use ipnet::IpNet;
use serde::Serialize;

use super::PodCapture;
use crate::policy::{InboundRules, IncludeNets};

/// How enrolled pods' traffic reaches the engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum CaptureMode {
    /// cgroup/sk_lookup eBPF hooks (meshcap's own).
    #[default]
    Ebpf,
    /// Istio-style `REDIRECT` rules in each pod's netns.
    Iptables,
}

/// Marks every socket the engine opens in iptables mode, so its own
/// connections are not redirected back to it (Istio's uid 1337, as a mark).
pub const ENGINE_MARK: u32 = 1337;

/// Chains this mode owns in each pod's nat table.
pub const CHAINS: [&str; 4] = ["MESHCAP_INBOUND", "MESHCAP_IN_REDIRECT", "MESHCAP_OUTPUT", "MESHCAP_REDIRECT"];
/// Rules in the built-in chains that lead to ours.
pub const JUMPS: [(&str, &str); 2] = [("PREROUTING", "MESHCAP_INBOUND"), ("OUTPUT", "MESHCAP_OUTPUT")];

#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error("pod {pod}: cannot run {binary} in netns {netns}: {source} (install the Debian package `iptables`)")]
    Spawn { pod: String, binary: &'static str, netns: PathBuf, source: std::io::Error },
    #[error("pod {pod}: {binary} in netns {netns} rejected rule `{rule}`: {stderr}")]
    Rule { pod: String, binary: &'static str, netns: PathBuf, rule: String, stderr: String },
}

/// IPv4 or IPv6: which binary, which loopback and engine source addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn binary(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }

    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }

    /// The inbound engine's source address (see engine/inbound.rs).
    fn engine_source(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.6/32",
            Family::V6 => "::6/128",
        }
    }

    fn holds(self, net: &IpNet) -> bool {
        matches!((self, net), (Family::V4, IpNet::V4(_)) | (Family::V6, IpNet::V6(_)))
    }
}

/// The rules of our chains for one pod and family, in the form
/// `iptables-save` prints them (so what is installed can be compared as text).
pub fn chain_rules(pod: &PodCapture<'_>, family: Family, outbound_port: u16, inbound_port: u16) -> Vec<String> {
    let mut rules = Vec::new();
    let mut add = |rule: String| rules.push(rule);
    match pod.inbound {
        InboundRules::AllExcept(excluded) => {
            for port in excluded {
                add(format!("-A MESHCAP_INBOUND -p tcp -m tcp --dport {port} -j RETURN"));
            }
            add("-A MESHCAP_INBOUND -p tcp -j MESHCAP_IN_REDIRECT".into());
        }
        InboundRules::Only(included) => {
            for port in included {
                add(format!("-A MESHCAP_INBOUND -p tcp -m tcp --dport {port} -j MESHCAP_IN_REDIRECT"));
            }
        }
    }
    add(format!("-A MESHCAP_IN_REDIRECT -p tcp -j REDIRECT --to-ports {inbound_port}"));
    let (lo, source, mark) = (family.loopback(), family.engine_source(), format!("{ENGINE_MARK:#x}"));
    for port in &pod.outbound.exclude_ports {
        add(format!("-A MESHCAP_OUTPUT -p tcp -m tcp --dport {port} -j RETURN"));
    }
    // Istio's order: the engine's inbound hop, the engine dialing its own
    // pod (hairpin, to inbound), the app's loopback traffic, the engine's
    // own traffic, then loopback destinations stay uncaptured.
    add(format!("-A MESHCAP_OUTPUT -s {source} -o lo -j RETURN"));
    add(format!("-A MESHCAP_OUTPUT ! -d {lo} -o lo -p tcp -m mark --mark {mark} -j MESHCAP_IN_REDIRECT"));
    add(format!("-A MESHCAP_OUTPUT -o lo -m mark ! --mark {mark} -j RETURN"));
    add(format!("-A MESHCAP_OUTPUT -m mark --mark {mark} -j RETURN"));
    add(format!("-A MESHCAP_OUTPUT -d {lo} -j RETURN"));
    for net in pod.outbound.exclude_nets.iter().filter(|n| family.holds(n)) {
        add(format!("-A MESHCAP_OUTPUT -d {net} -j RETURN"));
    }
    match &pod.outbound.include_nets {
        IncludeNets::All => add("-A MESHCAP_OUTPUT -j MESHCAP_REDIRECT".into()),
        IncludeNets::Only(nets) => {
            for net in nets.iter().filter(|n| family.holds(n)) {
                add(format!("-A MESHCAP_OUTPUT -d {net} -j MESHCAP_REDIRECT"));
            }
        }
    }
    add(format!("-A MESHCAP_REDIRECT -p tcp -j REDIRECT --to-ports {outbound_port}"));
    rules
}

/// The jumps into our chains, as `iptables-save` prints them.
pub fn jump_rules() -> Vec<String> {
    JUMPS.iter().map(|(from, to)| format!("-A {from} -p tcp -j {to}")).collect()
}

/// The families a pod gets rules for: IPv4 always, IPv6 when it has an IPv6 address.
pub fn families(ips: &[IpAddr]) -> Vec<Family> {
    let mut out = vec![Family::V4];
    if ips.iter().any(IpAddr::is_ipv6) {
        out.push(Family::V6);
    }
    out
}

/// What this mode installed, by pod uid, so unenrolling knows where.
pub struct IptablesCapture {
    outbound_port: u16,
    inbound_port: u16,
    installed: HashMap<String, Installed>,
}

struct Installed {
    pod: String,
    netns: PathBuf,
    families: Vec<Family>,
}

impl IptablesCapture {
    pub fn new(outbound_port: u16, inbound_port: u16) -> Self {
        Self { outbound_port, inbound_port, installed: HashMap::new() }
    }

    /// Installs (or rewrites in place) a pod's rules; returns what now
    /// captures it, for status.
    pub fn enroll(&mut self, pod: &PodCapture<'_>) -> Result<Vec<String>, IptablesError> {
        let families = families(pod.ips);
        for family in [Family::V4, Family::V6] {
            if families.contains(&family) {
                let rules = chain_rules(pod, family, self.outbound_port, self.inbound_port);
                let run = Runner { pod: &pod.pod, netns: pod.netns, family };
                run.restore(&rules)?;
                run.ensure_jumps()?;
            } else {
                // Had IPv6 before, not now: no stale rules.
                Runner { pod: &pod.pod, netns: pod.netns, family }.remove();
            }
        }
        let installed = Installed { pod: pod.pod.clone(), netns: pod.netns.to_path_buf(), families };
        let hooks = installed.families.iter().map(|f| format!("{} nat MESHCAP_INBOUND/OUTPUT", f.binary())).collect();
        self.installed.insert(pod.uid.to_string(), installed);
        Ok(hooks)
    }

    /// Removes a pod's rules (nothing to do when its netns is gone: the rules went with it).
    pub fn unenroll(&mut self, uid: &str) {
        if let Some(i) = self.installed.remove(uid) {
            for family in i.families {
                Runner { pod: &i.pod, netns: &i.netns, family }.remove();
            }
        }
    }
}

/// Runs one family's binaries inside one pod's netns.
struct Runner<'a> {
    pod: &'a str,
    netns: &'a Path,
    family: Family,
}

impl Runner<'_> {
    fn command(&self, binary: &'static str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns.display())).arg(binary);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        cmd
    }

    fn spawn_error(&self, binary: &'static str) -> impl FnOnce(std::io::Error) -> IptablesError + '_ {
        move |source| IptablesError::Spawn { pod: self.pod.into(), binary, netns: self.netns.into(), source }
    }

    fn rule_error(&self, binary: &'static str, rule: String, stderr: &[u8]) -> IptablesError {
        IptablesError::Rule {
            pod: self.pod.into(),
            binary,
            netns: self.netns.into(),
            rule,
            stderr: String::from_utf8_lossy(stderr).trim().to_string(),
        }
    }

    /// Declaring a chain in a `--noflush` restore empties it, so the new
    /// rules replace the old ones in one transaction.
    fn restore(&self, rules: &[String]) -> Result<(), IptablesError> {
        let binary = self.family.restore();
        let mut payload = String::from("*nat\n");
        for chain in CHAINS {
            payload.push_str(&format!(":{chain} - [0:0]\n"));
        }
        for rule in rules {
            payload.push_str(rule);
            payload.push('\n');
        }
        payload.push_str("COMMIT\n");
        let mut cmd = self.command(binary);
        cmd.arg("--noflush").stdin(Stdio::piped());
        let mut child = cmd.spawn().map_err(self.spawn_error(binary))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(payload.as_bytes()).map_err(self.spawn_error(binary))?;
        }
        let out = child.wait_with_output().map_err(self.spawn_error(binary))?;
        if out.status.success() {
            return Ok(());
        }
        // "line N failed": name the rule on that line of the payload.
        let stderr = String::from_utf8_lossy(&out.stderr);
        let line = stderr
            .split("line ")
            .nth(1)
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse::<usize>().ok());
        let rule = line
            .and_then(|n| payload.lines().nth(n.saturating_sub(1)))
            .map_or_else(|| format!("the MESHCAP chains ({} rules)", rules.len()), str::to_string);
        Err(self.rule_error(binary, rule, &out.stderr))
    }

    fn ensure_jumps(&self) -> Result<(), IptablesError> {
        let binary = self.family.binary();
        for ((from, to), rule) in JUMPS.into_iter().zip(jump_rules()) {
            let spec = ["-p", "tcp", "-j", to];
            let present = self.command(binary).args(["-w", "-t", "nat", "-C", from]).args(spec).output();
            if present.map_err(self.spawn_error(binary))?.status.success() {
                continue;
            }
            let out = self.command(binary).args(["-w", "-t", "nat", "-A", from]).args(spec).output();
            let out = out.map_err(self.spawn_error(binary))?;
            if !out.status.success() {
                return Err(self.rule_error(binary, rule, &out.stderr));
            }
        }
        Ok(())
    }

    /// Best effort: jumps first (a referenced chain cannot go), then the chains.
    fn remove(&self) {
        let binary = self.family.binary();
        for (from, to) in JUMPS {
            // Until none is left (an agent killed mid-enroll may have added two).
            for _ in 0..4 {
                let out = self.command(binary).args(["-w", "-t", "nat", "-D", from, "-p", "tcp", "-j", to]).output();
                if !out.is_ok_and(|o| o.status.success()) {
                    break;
                }
            }
        }
        for chain in CHAINS {
            let _ = self.command(binary).args(["-w", "-t", "nat", "-F", chain]).output();
        }
        for chain in CHAINS {
            let out = self.command(binary).args(["-w", "-t", "nat", "-X", chain]).output();
            if let Ok(out) = out {
                let stderr = String::from_utf8_lossy(&out.stderr);
                if !out.status.success() && !stderr.contains("No chain") && !stderr.contains("No such file") {
                    tracing::warn!(pod = self.pod, chain, stderr = %stderr.trim(), "removing an iptables chain failed");
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "iptables_tests.rs"]
mod tests;
