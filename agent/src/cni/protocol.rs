//! What the plugin and the agent say to each other: one JSON request per
//! connection, the plugin half-closes, the agent answers with one JSON
//! response and closes. Both carry [`PROTOCOL_VERSION`]; a side that gets a
//! version it does not know answers or fails with an error naming both, so a
//! plugin binary left on the node by an older or newer agent fails clearly
//! instead of being misread.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Bumped on any incompatible change of [`Request`] or [`Response`].
pub const PROTOCOL_VERSION: u32 = 1;

/// Requests and responses are a few hundred bytes; anything far larger is not a plugin talking.
pub const MAX_MESSAGE_BYTES: u64 = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub version: u32,
    /// How long the plugin waits for the answer; the agent gives up on the request after that.
    pub timeout_ms: u64,
    #[serde(flatten)]
    pub op: Op,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Op {
    Add(AddRequest),
    Del(DelRequest),
    Check(CheckRequest),
    /// CNI STATUS: is the agent there to serve ADDs?
    Status,
}

/// A pod sandbox whose network was just set up (CNI ADD).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddRequest {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The sandbox's network namespace, as the runtime gave it (`CNI_NETNS`).
    pub netns: PathBuf,
    pub container_id: String,
    pub ifname: String,
}

/// CNI CHECK carries the same facts as ADD: is this pod still set up as ADD left it?
pub type CheckRequest = AddRequest;

/// A sandbox being torn down (CNI DEL). The runtime may no longer know its
/// netns, and may call DEL more than once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DelRequest {
    pub namespace: String,
    pub name: String,
    /// Empty when the runtime did not pass `K8S_POD_UID`.
    pub uid: String,
    pub netns: Option<PathBuf>,
    pub container_id: String,
    pub ifname: String,
}

/// What the agent did with an ADD (or found on a CHECK).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum AddOutcome {
    /// The pod's traffic is captured: its apps may start.
    Captured,
    /// The pod is not in the mesh (its labels do not ask for it); its traffic stays untouched.
    NotEnrolled { reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub version: u32,
    #[serde(flatten)]
    pub reply: Reply,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Reply {
    /// ADD or CHECK.
    Pod(AddOutcome),
    /// DEL handled.
    Deleted,
    /// STATUS: the agent answers.
    Ready,
    /// The request failed; `message` is for the pod's events, so it names the pod and the reason.
    Error { message: String },
}

impl Request {
    pub fn new(timeout_ms: u64, op: Op) -> Request {
        Request { version: PROTOCOL_VERSION, timeout_ms, op }
    }
}

impl Response {
    pub fn new(reply: Reply) -> Response {
        Response { version: PROTOCOL_VERSION, reply }
    }
}

impl Op {
    /// The CNI command this request stands for, for logs.
    pub fn command(&self) -> &'static str {
        match self {
            Op::Add(_) => "ADD",
            Op::Del(_) => "DEL",
            Op::Check(_) => "CHECK",
            Op::Status => "STATUS",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_is_flat_and_tagged() {
        let req = Request::new(
            30_000,
            Op::Add(AddRequest {
                namespace: "shop".into(),
                name: "web-0".into(),
                uid: "u-1".into(),
                netns: "/var/run/netns/cni-1".into(),
                container_id: "abc".into(),
                ifname: "eth0".into(),
            }),
        );
        let json: serde_json::Value = serde_json::to_value(&req).unwrap();
        assert_eq!(json["version"], 1);
        assert_eq!(json["op"], "add");
        assert_eq!(json["namespace"], "shop");
        assert_eq!(json["netns"], "/var/run/netns/cni-1");
        assert_eq!(serde_json::from_value::<Request>(json).unwrap(), req);

        let resp = Response::new(Reply::Pod(AddOutcome::NotEnrolled { reason: "no labels".into() }));
        let json = serde_json::to_value(&resp).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"version": 1, "result": "pod", "outcome": "not_enrolled", "reason": "no labels"})
        );
        assert_eq!(serde_json::from_value::<Response>(json).unwrap(), resp);
        let status = serde_json::to_value(Request::new(1000, Op::Status)).unwrap();
        assert_eq!(status, serde_json::json!({"version": 1, "timeout_ms": 1000, "op": "status"}));
    }
}
