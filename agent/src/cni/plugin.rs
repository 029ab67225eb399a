//! One plugin invocation, from the runtime's environment and stdin to what
//! goes to stdout and the exit code.
//!
//! ADD fails closed: when the agent cannot be asked or cannot capture the
//! pod, the sandbox's network setup fails and the kubelet retries, so no app
//! of a pod that should be meshed starts uncaptured. DEL never fails (the
//! spec requires it to tolerate what is already gone; the agent also learns
//! of deleted pods from the pod source).

use std::{path::Path, time::Duration};

use serde::Serialize;

use super::{
    client::{Agent, ClientError},
    env::{self, CniEnv, Command, EnvError, K8sPod},
    netconf::{NetConf, NetconfError},
    protocol::{AddOutcome, AddRequest, DelRequest, Op, Reply},
    LATEST_VERSION, SUPPORTED_VERSIONS,
};

/// Plugin-specific error codes (the spec reserves 1–99).
pub mod codes {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    /// The agent answered something the plugin cannot read (plugin and agent from different releases).
    pub const AGENT_PROTOCOL: u32 = 100;
    /// The agent could not capture the pod.
    pub const ENROLL_FAILED: u32 = 101;
    /// CHECK: the pod should be captured and is not.
    pub const NOT_CAPTURED: u32 = 102;
}

/// STATUS is asked often and should answer fast; it only needs the agent to pick up.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);
/// DEL is best effort: a slow agent must not hold up the sandbox's teardown.
const DEL_TIMEOUT: Duration = Duration::from_secs(5);

/// What the binary prints and returns.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub stdout: String,
    /// Diagnostics for stderr (the runtime logs them with a failure).
    pub stderr: Vec<String>,
    pub exit_code: i32,
}

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error(transparent)]
    Env(#[from] EnvError),
    #[error(transparent)]
    Netconf(#[from] NetconfError),
    #[error("reading the network configuration from stdin: {source}")]
    Stdin { source: std::io::Error },
    #[error("meshcap-cni is a chained plugin and got no prevResult: list it after the primary plugin in a .conflist")]
    NoPrevResult,
    #[error("pod {pod} is named in CNI_ARGS without K8S_POD_UID, which the agent needs to identify it")]
    NoPodUid { pod: String },
    #[error("pod {pod}: {source}")]
    Agent { pod: String, source: ClientError },
    #[error("the meshcap agent could not capture pod {pod}: {message}")]
    EnrollFailed { pod: String, message: String },
    #[error("pod {pod} should be captured by meshcap and is not: {message}")]
    NotCaptured { pod: String, message: String },
    #[error("the meshcap agent answered {command} for pod {pod} with {reply:?}, which does not answer {command}")]
    UnexpectedReply { command: &'static str, pod: String, reply: Reply },
    #[error("the meshcap agent is not available: {reason}")]
    AgentNotReady { reason: String },
}

impl PluginError {
    pub fn code(&self) -> u32 {
        match self {
            PluginError::Env(_) | PluginError::NoPodUid { .. } => codes::INVALID_ENV,
            PluginError::Stdin { .. } => codes::IO_FAILURE,
            PluginError::Netconf(NetconfError::Decode { .. } | NetconfError::NotAnObject) => codes::DECODE,
            PluginError::Netconf(NetconfError::UnsupportedVersion { .. }) => codes::INCOMPATIBLE_VERSION,
            PluginError::Netconf(_) | PluginError::NoPrevResult => codes::INVALID_CONFIG,
            PluginError::Agent { source, .. } if source.is_unavailable() => codes::TRY_AGAIN_LATER,
            PluginError::Agent { .. } | PluginError::UnexpectedReply { .. } => codes::AGENT_PROTOCOL,
            PluginError::EnrollFailed { .. } => codes::ENROLL_FAILED,
            PluginError::NotCaptured { .. } => codes::NOT_CAPTURED,
            PluginError::AgentNotReady { .. } => codes::PLUGIN_NOT_AVAILABLE,
        }
    }

    /// A hint for whoever reads the pod's events.
    fn details(&self) -> &'static str {
        match self.code() {
            codes::TRY_AGAIN_LATER | codes::PLUGIN_NOT_AVAILABLE => {
                "meshcap fails closed: pods on this node cannot start until the meshcap agent runs here \
                 (check the meshcap DaemonSet pod on this node); the kubelet retries"
            }
            codes::ENROLL_FAILED => "the meshcap agent's log on this node says more; the kubelet retries",
            codes::AGENT_PROTOCOL => "the meshcap-cni binary on the node and the agent should come from one release",
            _ => "",
        }
    }
}

/// The CNI error object.
#[derive(Serialize)]
struct ErrorResult<'a> {
    #[serde(rename = "cniVersion")]
    cni_version: &'a str,
    code: u32,
    msg: String,
    #[serde(skip_serializing_if = "str::is_empty")]
    details: &'a str,
}

/// Runs the command named in the environment (`lookup`) on the configuration in `stdin`.
pub fn run(lookup: impl Fn(&str) -> Option<String>, stdin: &[u8], agent: &impl Agent) -> Output {
    let command = match env::command(&lookup) {
        Ok(c) => c,
        Err(e) => return failure(LATEST_VERSION, &PluginError::Env(e)),
    };
    match command {
        Command::Version => return success(version_json()),
        // Nothing to collect: the agent forgets pods when the pod source says they are gone.
        Command::Gc => return success(String::new()),
        _ => {}
    }
    let conf = match NetConf::parse(stdin) {
        Ok(conf) => conf,
        Err(e) if command == Command::Del => return del_warning(format!("DEL passed through: {e}")),
        Err(e) => return failure(LATEST_VERSION, &PluginError::Netconf(e)),
    };
    let result = match command {
        Command::Status => status(&conf, agent).map(|()| String::new()),
        Command::Del => return del(&lookup, &conf, agent),
        _ => CniEnv::from_lookup(&lookup).map_err(PluginError::from).and_then(|env| match command {
            Command::Add => add(&env, &conf, agent),
            _ => check(&env, &conf, agent).map(|()| String::new()),
        }),
    };
    match result {
        Ok(stdout) => success(stdout),
        Err(e) => failure(&conf.cni_version, &e),
    }
}

/// When stdin cannot even be read. DEL still succeeds, as it must.
pub fn stdin_failure(source: std::io::Error) -> Output {
    if std::env::var("CNI_COMMAND").is_ok_and(|c| c == "DEL") {
        return del_warning(format!("DEL passed through: reading stdin: {source}"));
    }
    failure(LATEST_VERSION, &PluginError::Stdin { source })
}

fn add(env: &CniEnv, conf: &NetConf, agent: &impl Agent) -> Result<String, PluginError> {
    let result = conf.result().ok_or(PluginError::NoPrevResult)?;
    let stdout = serde_json::to_string(&result).expect("a JSON value always serializes");
    let Some(pod) = meshed_candidate(env, conf) else { return Ok(stdout) };
    let request = pod_request(env, &pod)?;
    match ask(agent, &conf.agent_socket, conf.timeout, Op::Add(request), &pod)? {
        Reply::Pod(_) => Ok(stdout),
        Reply::Error { message } => Err(PluginError::EnrollFailed { pod: pod.key(), message }),
        reply => Err(PluginError::UnexpectedReply { command: "ADD", pod: pod.key(), reply }),
    }
}

fn check(env: &CniEnv, conf: &NetConf, agent: &impl Agent) -> Result<(), PluginError> {
    let Some(pod) = meshed_candidate(env, conf) else { return Ok(()) };
    let request = pod_request(env, &pod)?;
    match ask(agent, &conf.agent_socket, conf.timeout, Op::Check(request), &pod)? {
        Reply::Pod(AddOutcome::Captured | AddOutcome::NotEnrolled { .. }) => Ok(()),
        Reply::Error { message } => Err(PluginError::NotCaptured { pod: pod.key(), message }),
        reply => Err(PluginError::UnexpectedReply { command: "CHECK", pod: pod.key(), reply }),
    }
}

/// ADD and CHECK: the runtime has checked the sandbox exists, so everything is there but possibly the uid.
fn pod_request(env: &CniEnv, pod: &K8sPod) -> Result<AddRequest, PluginError> {
    Ok(AddRequest {
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        uid: pod.uid.clone().ok_or_else(|| PluginError::NoPodUid { pod: pod.key() })?,
        netns: env.netns.clone().unwrap_or_default(),
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    })
}

fn del(lookup: impl Fn(&str) -> Option<String>, conf: &NetConf, agent: &impl Agent) -> Output {
    let env = match CniEnv::from_lookup(lookup) {
        Ok(env) => env,
        Err(e) => return del_warning(format!("DEL passed through: {e}")),
    };
    let Some(pod) = meshed_candidate(&env, conf) else { return success(String::new()) };
    let request = DelRequest {
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        uid: pod.uid.clone().unwrap_or_default(),
        netns: env.netns.clone(),
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    };
    match ask(agent, &conf.agent_socket, conf.timeout.min(DEL_TIMEOUT), Op::Del(request), &pod) {
        Ok(Reply::Deleted) => success(String::new()),
        Ok(Reply::Error { message }) => del_warning(format!("DEL of pod {}: the agent said: {message}", pod.key())),
        Ok(reply) => del_warning(format!("DEL of pod {}: unexpected answer {reply:?}", pod.key())),
        Err(e) => del_warning(format!("DEL: {e}")),
    }
}

fn status(conf: &NetConf, agent: &impl Agent) -> Result<(), PluginError> {
    let not_ready = |reason: String| PluginError::AgentNotReady { reason };
    match agent.call(&conf.agent_socket, conf.timeout.min(STATUS_TIMEOUT), Op::Status) {
        Ok(Reply::Ready) => Ok(()),
        Ok(Reply::Error { message }) => Err(not_ready(message)),
        Ok(reply) => Err(not_ready(format!("STATUS answered with {reply:?}"))),
        Err(e) => Err(not_ready(e.to_string())),
    }
}

/// The pod to ask the agent about; `None` to pass through (not a Kubernetes pod, or an excluded namespace).
fn meshed_candidate(env: &CniEnv, conf: &NetConf) -> Option<K8sPod> {
    env.args.k8s_pod().filter(|pod| !conf.exclude_namespaces.contains(&pod.namespace))
}

fn ask(agent: &impl Agent, socket: &Path, timeout: Duration, op: Op, pod: &K8sPod) -> Result<Reply, PluginError> {
    agent.call(socket, timeout, op).map_err(|source| PluginError::Agent { pod: pod.key(), source })
}

fn version_json() -> String {
    serde_json::json!({ "cniVersion": LATEST_VERSION, "supportedVersions": SUPPORTED_VERSIONS }).to_string()
}

fn success(stdout: String) -> Output {
    Output { stdout, stderr: Vec::new(), exit_code: 0 }
}

fn del_warning(message: String) -> Output {
    Output { stdout: String::new(), stderr: vec![format!("meshcap-cni: {message}")], exit_code: 0 }
}

fn failure(cni_version: &str, error: &PluginError) -> Output {
    let body = ErrorResult { cni_version, code: error.code(), msg: error.to_string(), details: error.details() };
    let stdout = serde_json::to_string(&body).expect("an error result always serializes");
    Output { stdout, stderr: vec![format!("meshcap-cni: {error}")], exit_code: 1 }
}

#[cfg(test)]
#[path = "plugin_tests.rs"]
mod tests;
