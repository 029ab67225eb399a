//! meshcap node agent: captures enrolled pods' TCP with eBPF and relays it
//! through an engine whose sockets live in each pod's network namespace.

pub mod admin;
pub mod agent;
pub mod capture;
pub mod cgroup;
pub mod cli;
pub mod cni;
pub mod config;
pub mod diagnose;
pub mod discovery;
pub mod engine;
pub mod identity;
pub mod mesh;
pub mod metrics;
pub mod netns;
pub mod pods;
pub mod policy;
pub mod status;

pub use agent::run;
