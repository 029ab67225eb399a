//! The network configuration on the plugin's stdin: the standard keys, the
//! previous plugin's result, and meshcap's own keys. Read from a JSON value
//! field by field, so a bad value is reported with the key that holds it.

use std::{path::PathBuf, time::Duration};

use serde_json::{Map, Value};

use super::{DEFAULT_AGENT_SOCKET, SUPPORTED_VERSIONS};

/// The plugin's own keys in its entry of the configuration list.
pub mod keys {
    pub const AGENT_SOCKET: &str = "agentSocket";
    pub const TIMEOUT_SECONDS: &str = "timeoutSeconds";
    pub const EXCLUDE_NAMESPACES: &str = "excludeNamespaces";
}

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Past this the kubelet's own sandbox deadline (4 minutes) would cut the plugin off without a word.
const MAX_TIMEOUT_SECONDS: u64 = 180;

#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    /// The result of the plugins before this one, passed on unchanged.
    pub prev_result: Option<Map<String, Value>>,
    pub agent_socket: PathBuf,
    /// How long ADD waits for the agent.
    pub timeout: Duration,
    /// Pods of these namespaces are passed through without asking the agent.
    pub exclude_namespaces: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum NetconfError {
    #[error("the network configuration on stdin is not JSON: {source}")]
    Decode { source: serde_json::Error },
    #[error("the network configuration on stdin is not a JSON object")]
    NotAnObject,
    #[error("network configuration: `{field}` is missing")]
    Missing { field: &'static str },
    #[error("network configuration: `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("network configuration: cniVersion {version:?} is not supported (meshcap-cni speaks {supported})")]
    UnsupportedVersion { version: String, supported: String },
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> Result<NetConf, NetconfError> {
        let value: Value = serde_json::from_slice(stdin).map_err(|source| NetconfError::Decode { source })?;
        let Value::Object(map) = value else { return Err(NetconfError::NotAnObject) };
        let cni_version = string(&map, "cniVersion")?.ok_or(NetconfError::Missing { field: "cniVersion" })?;
        if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
            return Err(NetconfError::UnsupportedVersion {
                version: cni_version,
                supported: SUPPORTED_VERSIONS.join(", "),
            });
        }
        let name = string(&map, "name")?.unwrap_or_default();
        let prev_result = match map.get("prevResult") {
            None | Some(Value::Null) => None,
            Some(Value::Object(prev)) => Some(prev.clone()),
            Some(other) => return Err(invalid("prevResult", format!("expected an object, got {other}"))),
        };
        let agent_socket = match string(&map, keys::AGENT_SOCKET)? {
            None => PathBuf::from(DEFAULT_AGENT_SOCKET),
            Some(s) if s.starts_with('/') => PathBuf::from(s),
            Some(s) => return Err(invalid(keys::AGENT_SOCKET, format!("{s:?} is not an absolute path"))),
        };
        let timeout = match map.get(keys::TIMEOUT_SECONDS) {
            None | Some(Value::Null) => DEFAULT_TIMEOUT,
            Some(v) => match v.as_u64() {
                Some(s @ 1..=MAX_TIMEOUT_SECONDS) => Duration::from_secs(s),
                _ => {
                    return Err(invalid(
                        keys::TIMEOUT_SECONDS,
                        format!("expected whole seconds from 1 to {MAX_TIMEOUT_SECONDS}, got {v}"),
                    ))
                }
            },
        };
        let exclude_namespaces = match map.get(keys::EXCLUDE_NAMESPACES) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| match i {
                    Value::String(s) if !s.is_empty() => Ok(s.clone()),
                    other => Err(invalid(keys::EXCLUDE_NAMESPACES, format!("expected namespace names, got {other}"))),
                })
                .collect::<Result<_, _>>()?,
            Some(other) => {
                return Err(invalid(keys::EXCLUDE_NAMESPACES, format!("expected a list of namespaces, got {other}")))
            }
        };
        Ok(NetConf { cni_version, name, prev_result, agent_socket, timeout, exclude_namespaces })
    }

    /// The previous result as this plugin's own: unchanged but for `cniVersion`, which is the configuration's.
    pub fn result(&self) -> Option<Value> {
        let mut prev = self.prev_result.clone()?;
        prev.insert("cniVersion".into(), Value::String(self.cni_version.clone()));
        Some(Value::Object(prev))
    }
}

fn string(map: &Map<String, Value>, field: &'static str) -> Result<Option<String>, NetconfError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(invalid(field, format!("expected a string, got {other}"))),
    }
}

fn invalid(field: &'static str, reason: String) -> NetconfError {
    NetconfError::Invalid { field, reason }
}
