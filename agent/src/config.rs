//! The agent's effective configuration: typed, validated all at once (every
//! problem reported together), logged at start and served at /config_dump.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::Serialize;

use crate::cli::RunArgs;

#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// Where pods come from.
    pub source: SourceConfig,
    /// Where pod cgroups are searched for when the source does not name them; None: the cgroup2 mount.
    pub cgroup_root: Option<PathBuf>,
    /// Where the CNI plugin reaches the agent; None: no plugin.
    pub cni_socket: Option<PathBuf>,
    pub pin_dir: PathBuf,
    pub agent_cgroup: String,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub map_sizes: MapSizes,
    pub sockmap: bool,
    pub capture_mode: crate::capture::CaptureMode,
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
    pub kubelet_cgroup: KubeletCgroup,
}

/// Where the kubelet runs, for the probe exemption.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KubeletCgroup {
    /// Find the process named `kubelet` at start.
    Auto,
    /// No exemption: probes of STRICT pods must speak mTLS.
    Off,
    Path(PathBuf),
}

impl KubeletCgroup {
    fn parse(raw: &str) -> Result<Self, String> {
        match raw.trim() {
            "auto" => Ok(Self::Auto),
            "none" | "off" => Ok(Self::Off),
            "" => Err("--kubelet-cgroup: empty (use auto, none or a cgroup directory)".into()),
            p if p.split('/').any(|c| c == "..") => Err(format!("--kubelet-cgroup {p}: must not contain `..`")),
            p => Ok(Self::Path(p.into())),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SourceConfig {
    /// `--pods FILE`, polled every `pods_poll`.
    File { path: PathBuf },
    /// `--kubernetes`: pods of `node_name` (and the mesh's enrolled pods) from the API server.
    Kubernetes { node_name: String },
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
        let source = source_config(args, &mut problems);
        for (flag, path) in [("--cgroup-root", &args.cgroup_root), ("--cni-socket", &args.cni_socket)] {
            if let Some(path) = path.as_ref().filter(|p| !p.is_absolute()) {
                problems.push(format!("{flag} {}: must be an absolute path", path.display()));
            }
        }
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
        if args.sockmap && args.capture_mode == crate::capture::CaptureMode::Iptables {
            problems.push("--sockmap splices the eBPF capture's hop: it needs --capture-mode ebpf".into());
        }
        if args.pods_poll.is_zero() {
            problems.push("--pods-poll 0: would spin; use e.g. 500ms".into());
        }
        let kubelet_cgroup = KubeletCgroup::parse(&args.kubelet_cgroup).unwrap_or_else(|e| {
            problems.push(e);
            KubeletCgroup::Off
        });
        let Some(source) = source.filter(|_| problems.is_empty()) else {
            return Err(ConfigError { problems });
        };
        Ok(Self {
            source,
            cgroup_root: args.cgroup_root.clone(),
            cni_socket: args.cni_socket.clone(),
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
            capture_mode: args.capture_mode,
            spire_admin_socket: args.spire_admin_socket.clone().filter(|s| !s.is_empty()),
            spiffe_endpoint_socket: args.spiffe_endpoint_socket.clone().filter(|s| !s.is_empty()),
            trust_domain: args.trust_domain.clone(),
            svid_ttl: args.svid_ttl,
            root_namespace: args.root_namespace.clone(),
            protocol_detect_timeout: args.protocol_detect_timeout,
            half_closed_timeout: args.half_closed_timeout,
            pods_poll: args.pods_poll,
            drain_timeout: args.drain_timeout,
            kubelet_cgroup,
        })
    }
}

/// Exactly one pod source; the node name is checked here so a DaemonSet that forgot the downward API says so at
/// start instead of watching nothing.
fn source_config(args: &RunArgs, problems: &mut Vec<String>) -> Option<SourceConfig> {
    match (&args.pods, args.kubernetes) {
        (Some(path), false) => {
            if args.node_name.is_some() {
                problems
                    .push("--node-name: only used with --kubernetes (the pods file says which pods are local)".into());
            }
            Some(SourceConfig::File { path: path.clone() })
        }
        (None, true) => match args.node_name.as_deref().map(str::trim) {
            None | Some("") => {
                problems.push(
                    "--node-name (env NODE_NAME) is required with --kubernetes: set it from the downward API \
                     (fieldRef spec.nodeName)"
                        .into(),
                );
                None
            }
            Some(node) if !is_node_name(node) => {
                problems.push(format!(
                    "--node-name {node:?}: not a Kubernetes node name (lowercase letters, digits, '-' and '.', \
                     at most 253)"
                ));
                None
            }
            Some(node) => Some(SourceConfig::Kubernetes { node_name: node.to_string() }),
        },
        (Some(path), true) => {
            problems.push(format!(
                "--pods {} and --kubernetes: choose one pod source (MESHCAP_PODS_FILE / MESHCAP_KUBERNETES)",
                path.display()
            ));
            None
        }
        (None, false) => {
            problems.push("no pod source: give --pods FILE or --kubernetes (with --node-name)".into());
            None
        }
    }
}

/// A DNS subdomain (RFC 1123), as node names are.
fn is_node_name(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
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
        parse(argv)
    }

    fn parse(argv: Vec<&str>) -> RunArgs {
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

    #[test]
    fn kubernetes_source_needs_a_node_name_and_excludes_the_pods_file() {
        let kube = |extra: &[&str]| {
            let mut argv = vec!["meshcap-agent", "run", "--kubernetes"];
            argv.extend_from_slice(extra);
            Config::from_args(&parse(argv))
        };
        let c = kube(&["--node-name", "node-1.example", "--cgroup-root", "/sys/fs/cgroup/kubelet.slice"]).unwrap();
        assert_eq!(c.source, SourceConfig::Kubernetes { node_name: "node-1.example".into() });
        assert_eq!(c.cgroup_root.as_deref(), Some(std::path::Path::new("/sys/fs/cgroup/kubelet.slice")));

        let err = kube(&[]).unwrap_err().to_string();
        assert!(err.contains("--node-name (env NODE_NAME) is required with --kubernetes"), "{err}");
        let err = kube(&["--node-name", "Node_1", "--cgroup-root", "relative"]).unwrap_err();
        assert_eq!(err.problems.len(), 2, "{err}");
        assert!(err.to_string().contains("--node-name \"Node_1\": not a Kubernetes node name"), "{err}");
        assert!(err.to_string().contains("--cgroup-root relative: must be an absolute path"), "{err}");
        let err = kube(&["--node-name", "n", "--pods", "/p.yaml"]).unwrap_err().to_string();
        assert!(err.contains("--pods /p.yaml and --kubernetes: choose one pod source"), "{err}");
        let err = Config::from_args(&parse(vec!["meshcap-agent", "run"])).unwrap_err().to_string();
        assert!(err.contains("no pod source: give --pods FILE or --kubernetes"), "{err}");
    }
}
