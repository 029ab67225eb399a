//! Command line. Every option has an environment variable, so a DaemonSet can
//! set them without rewriting the command.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "meshcap-agent", version, about = "Transparent mTLS for Kubernetes pods, captured with eBPF")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the node agent.
    Run(Box<RunArgs>),
    /// Show what a running agent has enrolled and attached.
    Status(StatusArgs),
    /// Check Kubernetes manifests for mistakes that leave traffic unprotected.
    Diagnose(DiagnoseArgs),
}

#[derive(Args, Debug, Clone)]
pub struct DiagnoseArgs {
    /// Manifest files or directories (read recursively: *.yaml, *.yml).
    #[arg(required_unless_present = "kubernetes")]
    pub paths: Vec<PathBuf>,
    /// Read the cluster instead (in-cluster config, or KUBECONFIG): pods, PeerAuthentications and ConfigMaps.
    #[arg(long, env = "MESHCAP_KUBERNETES")]
    pub kubernetes: bool,
    /// The trust domain meshcap runs with, to compare with Istio's and SPIRE's.
    #[arg(long, env = "MESHCAP_TRUST_DOMAIN", default_value = "democluster.internal")]
    pub trust_domain: String,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Kubernetes YAML with the pods to serve (v1 Pod documents); watched for changes.
    /// Either this or --kubernetes.
    #[arg(long, env = "MESHCAP_PODS_FILE")]
    pub pods: Option<PathBuf>,
    /// Take pods and PeerAuthentications from the Kubernetes API (in-cluster config, or KUBECONFIG).
    #[arg(long, env = "MESHCAP_KUBERNETES")]
    pub kubernetes: bool,
    /// This node's name (the downward API's spec.nodeName); required with --kubernetes.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Unix socket the meshcap-cni plugin asks to enroll pods on (mode 0600); unset: no CNI plugin.
    #[arg(long, env = "MESHCAP_CNI_SOCKET")]
    pub cni_socket: Option<PathBuf>,
    /// Where pod cgroups are searched for (Kubernetes source); default: the cgroup2 mount.
    #[arg(long, env = "MESHCAP_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,
    /// bpffs directory where maps and links are pinned.
    #[arg(long, env = "MESHCAP_PIN_DIR", default_value = "/sys/fs/bpf/meshcap")]
    pub pin_dir: PathBuf,
    /// cgroup (relative to the cgroup2 mount) the agent creates and joins when it starts
    /// at the root of the hierarchy; ignored when it already runs in a cgroup of its own.
    #[arg(long, env = "MESHCAP_AGENT_CGROUP", default_value = "meshcap-agent")]
    pub agent_cgroup: String,
    /// Admin endpoint: /status, /config_dump, /healthz/ready.
    #[arg(long, env = "MESHCAP_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// Prometheus metrics endpoint (/metrics).
    #[arg(long, env = "MESHCAP_METRICS_ADDR", default_value = "127.0.0.1:15020")]
    pub metrics_addr: SocketAddr,
    /// Readiness endpoint (/healthz/ready) for the DaemonSet's probe.
    #[arg(long, env = "MESHCAP_READINESS_ADDR", default_value = "127.0.0.1:15021")]
    pub readiness_addr: SocketAddr,
    /// Port of the outbound listener inside each pod.
    #[arg(long, env = "MESHCAP_OUTBOUND_PORT", default_value_t = 15001)]
    pub outbound_port: u16,
    /// Port of the inbound listener inside each pod.
    #[arg(long, env = "MESHCAP_INBOUND_PORT", default_value_t = 15006)]
    pub inbound_port: u16,
    /// Most pods one node can enroll (size of the per-pod maps).
    #[arg(long, env = "MESHCAP_MAX_PODS", default_value_t = meshcap_common::default_size::PODS)]
    pub max_pods: u32,
    /// Most in-flight captured connections tracked at once (LRU; oldest evicted).
    #[arg(long, env = "MESHCAP_MAX_FLOWS", default_value_t = meshcap_common::default_size::FLOWS)]
    pub max_flows: u32,
    /// Most port exclusions across all pods.
    #[arg(long, env = "MESHCAP_MAX_PORT_RULES", default_value_t = meshcap_common::default_size::PORT_RULES)]
    pub max_port_rules: u32,
    /// Most IP range rules across all pods (each of include and exclude).
    #[arg(long, env = "MESHCAP_MAX_NET_RULES", default_value_t = meshcap_common::default_size::NETS)]
    pub max_net_rules: u32,
    /// Splice the local app↔engine hop with sk_msg (skips TCP/IP on that hop), for every pod of
    /// the node. Off by default: on current kernels a socket in a sockmap can return EAGAIN from a
    /// *blocking* read, which breaks apps that use blocking sockets; turn it on only for nodes whose
    /// apps all use event loops (non-blocking sockets).
    #[arg(long, env = "MESHCAP_SOCKMAP")]
    pub sockmap: bool,
    /// How enrolled pods' traffic reaches the engine: `ebpf` (meshcap's hooks) or `iptables`
    /// (Istio-style REDIRECT rules in each pod's netns; the baseline the benchmark compares with).
    #[arg(long, env = "MESHCAP_CAPTURE_MODE", value_enum, default_value = "ebpf")]
    pub capture_mode: crate::capture::CaptureMode,
    /// SPIRE agent admin socket serving the Delegated Identity API (`unix:///path` or a path).
    /// Without it, SVIDs come from a built-in development CA (development and tests only).
    #[arg(long, env = "SPIRE_ADMIN_ENDPOINT_SOCKET")]
    pub spire_admin_socket: Option<String>,
    /// SPIFFE Workload API socket giving the agent its own identity (`unix:///path` or a path),
    /// e.g. the one the SPIFFE CSI driver mounts.
    #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET")]
    pub spiffe_endpoint_socket: Option<String>,
    /// SPIFFE trust domain of this mesh (`meshConfig.trustDomain`).
    #[arg(long, env = "MESHCAP_TRUST_DOMAIN", default_value = "democluster.internal")]
    pub trust_domain: String,
    /// Lifetime of SVIDs minted by the built-in development CA (refreshed at half-life).
    #[arg(long, env = "MESHCAP_SVID_TTL", default_value = "1h", value_parser = parse_duration)]
    pub svid_ttl: Duration,
    /// Namespace whose selector-less PeerAuthentication is mesh-wide.
    #[arg(long, env = "MESHCAP_ROOT_NAMESPACE", default_value = "istio-system")]
    pub root_namespace: String,
    /// How long an inbound connection under PERMISSIVE waits for the client's first byte
    /// (TLS or plaintext) before it is treated as a server-first protocol.
    #[arg(long, env = "MESHCAP_PROTOCOL_DETECT_TIMEOUT", default_value = "200ms", value_parser = parse_duration)]
    pub protocol_detect_timeout: Duration,
    /// How long a relayed connection that one side has half-closed may stay idle before both
    /// sides are reset.
    #[arg(long, env = "MESHCAP_HALF_CLOSED_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub half_closed_timeout: Duration,
    /// How often the pods file is checked for changes.
    #[arg(long, env = "MESHCAP_PODS_POLL", default_value = "500ms", value_parser = parse_duration)]
    pub pods_poll: Duration,
    /// How long shutdown waits for relayed connections to finish.
    #[arg(long, env = "MESHCAP_DRAIN_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// The kubelet's cgroup, whose connections to enrolled pods (health probes) reach the app
    /// directly even under STRICT: `auto` (find the process named kubelet), `none`, or a cgroup
    /// directory (absolute, or relative to the cgroup2 mount).
    #[arg(long, env = "MESHCAP_KUBELET_CGROUP", default_value = "auto")]
    pub kubelet_cgroup: String,
}

#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    /// Admin endpoint of the running agent.
    #[arg(long, env = "MESHCAP_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// Print the raw JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// `250ms`, `5s`, `2m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("`{s}` is not a duration like 500ms, 5s, 2m or 1h"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("`{s}`: unknown unit `{unit}` (use ms, s, m or h)")),
    }
}
