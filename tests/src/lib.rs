//! Test support for meshcap: a simulated Kubernetes node built from network namespaces, a bridge and cgroup v2
//! directories on this machine, plus a handle for running the agent binary against it.
//!
//! Everything here needs root; tests call [`privileged_or_skip`] first.

pub mod harness;
pub mod kube_api;
pub mod scenario;
pub mod spire;
pub mod workload_api;

pub use harness::{
    agent::{Agent, AgentOptions, PinDirGuard},
    bin_path, cgroup2_mount, free_ports,
    node::{Node, Pod, PodProcess},
    parse_json_line, podctl, privileged_or_skip, wait_until, write_atomic,
    yaml::{pods_yaml, pods_yaml_with},
};
