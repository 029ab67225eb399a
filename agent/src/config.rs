//! The agent's effective configuration: typed, validated all at once (every
//! problem reported together), logged at start and served at /config_dump.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::Serialize;

use crate::cli::RunArgs;

#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub pods_file: PathBuf,
    pub pin_dir: PathBuf,
    pub agent_cgroup: String,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub map_sizes: MapSizes,
    pub sockmap: bool,
    pub spire_admin_socket: Option<String>,
    pub spiffe_endpoint_socket: Option<String>,
    pub trust_domain: String,
    #[serde(with = "duration_ms")]
    pub svid_ttl: Duration,
    pub root_namespace: String,
    #[serde(with = "duration_ms")]
    pub protocol_detect_timeout: Duration,
    #[serde(with = "duration_ms")]
    pub half_closed_timeout: Duration,
    #[serde(with = "duration_ms")]
    pub pods_poll: Duration,
    #[serde(with = "duration_ms")]
    pub drain_timeout: Duration,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct MapSizes {
    pub pods: u32,
    pub flows: u32,
    pub port_rules: u32,
    pub net_rules: u32,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", problems.join("\n  - "))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl Config {
    pub fn from_args(args: &RunArgs) -> Result<Self, ConfigError> {
        let mut problems = Vec::new();
        if !args.pin_dir.is_absolute() {
            problems
                .push(format!("--pin-dir {}: must be an absolute path on a bpf filesystem", args.pin_dir.display()));
        }
        let cg = args.agent_cgroup.trim_matches('/');
        if cg.is_empty() || cg.split('/').any(|c| c == ".." || c == ".") {
            problems.push(format!(
                "--agent-cgroup {:?}: must name a cgroup below the root (no `..`, not the root itself)",
                args.agent_cgroup
            ));
        }
        for (flag, port) in [("--outbound-port", args.outbound_port), ("--inbound-port", args.inbound_port)] {
            if port == 0 {
                problems.push(format!("{flag} 0: must be a real port"));
            }
        }
        if args.outbound_port == args.inbound_port {
            problems
                .push(format!("--outbound-port and --inbound-port are both {}: they must differ", args.inbound_port));
        }
        for (flag, n) in [
            ("--max-pods", args.max_pods),
            ("--max-flows", args.max_flows),
            ("--max-port-rules", args.max_port_rules),
            ("--max-net-rules", args.max_net_rules),
        ] {
            if n == 0 {
                problems.push(format!("{flag} 0: a map needs at least one entry"));
            }
        }
        if let Err(e) = crate::identity::workload_id(&args.trust_domain, "ns", "sa") {
            problems.push(format!("--trust-domain {:?}: {e}", args.trust_domain));
        }
        if args.svid_ttl < Duration::from_secs(10) {
            problems.push(format!("--svid-ttl {:?}: at least 10s (SVIDs are refreshed at half-life)", args.svid_ttl));
        }
        if args.root_namespace.is_empty() {
            problems.push("--root-namespace: must name a namespace".into());
        }
        if args.protocol_detect_timeout.is_zero() || args.protocol_detect_timeout > Duration::from_secs(10) {
            problems.push(format!(
                "--protocol-detect-timeout {:?}: between 1ms and 10s (server-first protocols wait this long)",
                args.protocol_detect_timeout
            ));
        }
        if args.half_closed_timeout.is_zero() {
            problems.push("--half-closed-timeout 0: would reset every half-close at once".into());
        }
        if args.pods_poll.is_zero() {
            problems.push("--pods-poll 0: would spin; use e.g. 500ms".into());
        }
        if !problems.is_empty() {
            return Err(ConfigError { problems });
        }
        Ok(Self {
            pods_file: args.pods.clone(),
            pin_dir: args.pin_dir.clone(),
            agent_cgroup: cg.to_string(),
            admin_addr: args.admin_addr,
            metrics_addr: args.metrics_addr,
            readiness_addr: args.readiness_addr,
            outbound_port: args.outbound_port,
            inbound_port: args.inbound_port,
            map_sizes: MapSizes {
                pods: args.max_pods,
                flows: args.max_flows,
                port_rules: args.max_port_rules,
                net_rules: args.max_net_rules,
            },
            sockmap: args.sockmap,
            spire_admin_socket: args.spire_admin_socket.clone().filter(|s| !s.is_empty()),
            spiffe_endpoint_socket: args.spiffe_endpoint_socket.clone().filter(|s| !s.is_empty()),
            trust_domain: args.trust_domain.clone(),
            svid_ttl: args.svid_ttl,
            root_namespace: args.root_namespace.clone(),
            protocol_detect_timeout: args.protocol_detect_timeout,
            half_closed_timeout: args.half_closed_timeout,
            pods_poll: args.pods_poll,
            drain_timeout: args.drain_timeout,
        })
    }
}

mod duration_ms {
    pub fn serialize<S: serde::Serializer>(d: &std::time::Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    fn args(extra: &[&str]) -> RunArgs {
        let mut argv = vec!["meshcap-agent", "run", "--pods", "/tmp/p.yaml"];
        argv.extend_from_slice(extra);
        match Cli::parse_from(argv).command {
            Command::Run(a) => *a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::from_args(&args(&[])).expect("defaults");
        assert_eq!(c.outbound_port, 15001);
        assert_eq!(c.inbound_port, 15006);
        assert!(!c.sockmap, "splicing is opt-in");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let err = Config::from_args(&args(&[
            "--pin-dir",
            "relative",
            "--outbound-port",
            "15006",
            "--max-pods",
            "0",
            "--agent-cgroup",
            "../escape",
        ]))
        .unwrap_err();
        assert_eq!(err.problems.len(), 4, "{err}");
        let text = err.to_string();
        assert!(text.contains("--pin-dir relative"));
        assert!(text.contains("--max-pods 0"));
        assert!(text.contains("--agent-cgroup"));
    }
}
