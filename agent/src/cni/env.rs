//! What the container runtime passes in the environment: the command, the
//! sandbox, and `CNI_ARGS`, where containerd and CRI-O name the pod.

use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

/// The environment of one invocation, checked for what its command needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniEnv {
    pub command: Command,
    pub container_id: String,
    /// Empty for DEL when the runtime no longer knows the sandbox's netns (the spec allows that).
    pub netns: Option<PathBuf>,
    pub ifname: String,
    pub args: CniArgs,
}

/// `CNI_ARGS`: `KEY=VALUE` pairs separated by `;`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs(Vec<(String, String)>);

/// The pod a Kubernetes runtime names in `CNI_ARGS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct K8sPod {
    pub namespace: String,
    pub name: String,
    /// `K8S_POD_UID`: containerd and CRI-O pass it; older runtimes did not.
    pub uid: Option<String>,
}

impl K8sPod {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvError {
    #[error("environment variable {var} is not set (the container runtime sets it for {command})")]
    Missing { var: &'static str, command: &'static str },
    #[error("environment variable {var}={value:?}: {reason}")]
    Invalid { var: &'static str, value: String, reason: String },
}

impl Command {
    pub fn parse(value: &str) -> Result<Command, EnvError> {
        Ok(match value {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            _ => {
                return Err(EnvError::Invalid {
                    var: "CNI_COMMAND",
                    value: value.to_string(),
                    reason: "not a CNI command (ADD, DEL, CHECK, VERSION, STATUS, GC)".into(),
                })
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
            Command::Status => "STATUS",
            Command::Gc => "GC",
        }
    }

    /// Commands about one sandbox, which need its container id and interface.
    fn is_per_sandbox(self) -> bool {
        matches!(self, Command::Add | Command::Del | Command::Check)
    }
}

/// Reads `CNI_COMMAND` alone: VERSION, STATUS and GC need nothing else.
pub fn command(lookup: impl Fn(&str) -> Option<String>) -> Result<Command, EnvError> {
    let value = lookup("CNI_COMMAND").ok_or(EnvError::Missing { var: "CNI_COMMAND", command: "every command" })?;
    Command::parse(&value)
}

impl CniEnv {
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<CniEnv, EnvError> {
        let command = command(&lookup)?;
        let get = |var: &'static str| lookup(var).filter(|v| !v.is_empty());
        let required = |var: &'static str| get(var).ok_or(EnvError::Missing { var, command: command.as_str() });
        let (container_id, ifname) = if command.is_per_sandbox() {
            let id = required("CNI_CONTAINERID")?;
            validate_container_id(&id)?;
            (id, required("CNI_IFNAME")?)
        } else {
            (get("CNI_CONTAINERID").unwrap_or_default(), get("CNI_IFNAME").unwrap_or_default())
        };
        let netns = match command {
            Command::Add | Command::Check => Some(required("CNI_NETNS")?),
            _ => get("CNI_NETNS"),
        };
        if let Some(ns) = &netns {
            if !ns.starts_with('/') {
                return Err(EnvError::Invalid {
                    var: "CNI_NETNS",
                    value: ns.clone(),
                    reason: "not an absolute path to a network namespace".into(),
                });
            }
        }
        let args = CniArgs::parse(&get("CNI_ARGS").unwrap_or_default())?;
        Ok(CniEnv { command, container_id, netns: netns.map(PathBuf::from), ifname, args })
    }
}

/// The spec's rule: a letter or digit, then letters, digits, `_`, `.`, `-`.
fn validate_container_id(id: &str) -> Result<(), EnvError> {
    let mut chars = id.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        return Ok(());
    }
    Err(EnvError::Invalid {
        var: "CNI_CONTAINERID",
        value: id.to_string(),
        reason: "must start with a letter or digit and hold only letters, digits, '_', '.' and '-'".into(),
    })
}

impl CniArgs {
    pub fn parse(value: &str) -> Result<CniArgs, EnvError> {
        let mut pairs = Vec::new();
        for part in value.split(';').filter(|p| !p.is_empty()) {
            let Some((key, val)) = part.split_once('=') else {
                return Err(EnvError::Invalid {
                    var: "CNI_ARGS",
                    value: value.to_string(),
                    reason: format!("`{part}` is not KEY=VALUE"),
                });
            };
            pairs.push((key.to_string(), val.to_string()));
        }
        Ok(CniArgs(pairs))
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// The pod, when a Kubernetes runtime invoked the plugin; `None` means any other caller, passed through.
    pub fn k8s_pod(&self) -> Option<K8sPod> {
        let non_empty = |key| self.get(key).filter(|v| !v.is_empty()).map(str::to_string);
        Some(K8sPod {
            namespace: non_empty("K8S_POD_NAMESPACE")?,
            name: non_empty("K8S_POD_NAME")?,
            uid: non_empty("K8S_POD_UID"),
        })
    }
}
