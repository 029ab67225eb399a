//! The chained CNI plugin `meshcap-cni` and the agent's side of it.
//!
//! A container runtime runs the plugin during a pod sandbox's network setup,
//! after the primary plugin gave the pod its interface and before any app
//! container starts. The plugin asks the agent, over a unix socket on the
//! node, to enroll the pod, and fails the setup when the agent cannot: the
//! kubelet then retries, so a meshed pod never runs a moment uncaptured.
//!
//! - [`protocol`]: the versioned JSON exchanged on the socket.
//! - [`server`]: the agent side, [`server::serve`] with a [`server::Handler`].
//! - [`client`], [`env`], [`netconf`], [`plugin`]: the plugin side, from the
//!   runtime's environment and stdin to a CNI result or error.
//! - [`install`]: how the DaemonSet puts the plugin on the node.

pub mod client;
pub mod env;
pub mod install;
pub mod netconf;
pub mod plugin;
pub mod protocol;
pub mod server;

/// The `type` of the plugin in a network configuration list, and its binary's name.
pub const PLUGIN_TYPE: &str = "meshcap-cni";

/// Where the agent listens and the plugin connects, unless configured otherwise.
pub const DEFAULT_AGENT_SOCKET: &str = "/var/run/meshcap/cni.sock";

/// CNI specification versions the plugin speaks. Its ADD result is the
/// previous plugin's, passed on, so every version with `prevResult` chaining
/// works; 0.3.x stays because common primary CNIs (flannel, kindnet) still
/// write their lists in 0.3.1, and refusing it would fail every pod.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The newest version, used where no configuration says which (VERSION, errors before it is read).
pub const LATEST_VERSION: &str = "1.1.0";
