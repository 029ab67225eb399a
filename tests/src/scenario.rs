//! Building blocks the agent tests share: a node with a pods file and an
//! agent watching it, enrolled pods, podctl apps and their JSON answers.

use std::{
    path::PathBuf,
    process::Output,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    parse_json_line, podctl, pods_yaml_with, wait_until, write_atomic, Agent, AgentOptions, Node, Pod, PodProcess,
};

pub const WAIT: Duration = Duration::from_secs(15);
pub const INJECT: &str = "sidecar.istio.io/inject";
pub const IDENTITY: &str = "spire-managed-identity";

/// Labels a pod the way the mesh's users do: injection plus a SPIRE identity.
pub fn enroll(pod: &mut Pod) {
    pod.labels.insert(INJECT.into(), "true".into());
    pod.labels.insert(IDENTITY.into(), "true".into());
}

/// Which side of a client/server pair is labelled for the mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enrolled {
    Client,
    Server,
    Both,
}

/// A node, its pods file and (once started) the agent serving it.
pub struct Scenario {
    pub node: Node,
    pub pods_file: PathBuf,
}

impl Scenario {
    pub fn new(test: &str) -> Self {
        let node = Node::new(test);
        let pods_file = node.scratch_dir().join("pods.yaml");
        Self { node, pods_file }
    }

    /// The common setup: pods `client` and `server`, one or both enrolled, and
    /// an agent (started with `agent_args`) that has captured it.
    pub fn client_server(test: &str, enrolled: Enrolled, agent_args: &[&str]) -> (Self, Pod, Pod, Agent) {
        let s = Self::new(test);
        let mut client = s.node.add_pod("client");
        let mut server = s.node.add_pod("server");
        if enrolled != Enrolled::Server {
            enroll(&mut client);
        }
        if enrolled != Enrolled::Client {
            enroll(&mut server);
        }
        s.write_pods(&[&client, &server], &[]);
        let agent = s.start_agent(agent_args);
        for pod in [&client, &server] {
            if pod.labels.contains_key(INJECT) {
                agent.must_capture(&pod.name);
                agent.must_have_svid(&pod.name);
            }
        }
        (s, client, server, agent)
    }

    /// Rewrites the pods file atomically (the agent sees old or new, never half).
    pub fn write_pods(&self, local: &[&Pod], remote: &[&Pod]) {
        write_atomic(&self.pods_file, &pods_yaml_with(local, remote)).expect("writing the pods file");
    }

    pub fn write_raw(&self, text: &str) {
        write_atomic(&self.pods_file, text).expect("writing the pods file");
    }

    /// Starts the agent and waits for its admin endpoint.
    pub fn start_agent(&self, extra: &[&str]) -> Agent {
        let mut opts = AgentOptions::new(&self.pods_file).arg("--pods-poll").arg("100ms");
        for a in extra {
            opts = opts.arg(*a);
        }
        let mut agent = Agent::start(opts);
        assert!(agent.wait_ready_or_answering(WAIT), "agent did not come up:\n{}", agent.logs());
        agent
    }
}

impl Agent {
    /// The admin endpoint answers (ready or not).
    pub fn wait_ready_or_answering(&mut self, timeout: Duration) -> bool {
        wait_until(timeout, || self.status().is_ok())
    }

    /// A number from the pod's outbound relay counters (0 when absent).
    pub fn outbound(&self, pod: &str, counter: &str) -> u64 {
        self.pod_status(pod).and_then(|p| p["outbound"][counter].as_u64()).unwrap_or(0)
    }

    /// A number from the pod's inbound relay counters (0 when absent).
    pub fn inbound(&self, pod: &str, counter: &str) -> u64 {
        self.pod_status(pod).and_then(|p| p["inbound"][counter].as_u64()).unwrap_or(0)
    }

    /// Entries in use in one of the agent's maps.
    pub fn map_entries(&self, map: &str) -> u64 {
        let status = self.status().expect("status");
        status["maps"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["name"] == map)
            .and_then(|m| m["entries"].as_u64())
            .unwrap_or_else(|| panic!("no map {map} in status"))
    }

    pub fn must_capture(&self, pod: &str) {
        assert!(
            self.wait_pod_captured(pod, WAIT),
            "pod {pod} not captured: {:?}\n{}",
            self.pod_status(pod),
            self.logs()
        );
    }

    /// Waits until the agent holds an SVID for `pod`: issuance runs after capture, and until then the
    /// pod's mTLS connections are refused.
    pub fn must_have_svid(&self, pod: &str) {
        let ok = wait_until(WAIT, || self.pod_status(pod).is_some_and(|p| p["svid_expires"].is_u64()));
        assert!(ok, "pod {pod} has no SVID: {:?}\n{}", self.pod_status(pod), self.logs());
    }

    /// Waits until `pod` is known to the agent and not captured.
    pub fn must_not_capture(&self, pod: &str) {
        let ok = wait_until(WAIT, || self.pod_status(pod).is_some_and(|p| p["captured"] == false));
        assert!(ok, "pod {pod} still captured: {:?}", self.pod_status(pod));
    }
}

/// Runs podctl in a pod and parses its JSON answer.
pub fn podctl_json(pod: &Pod, args: &[&str]) -> Value {
    json_of(&pod.run(podctl(), args))
}

pub fn json_of(out: &Output) -> Value {
    assert!(out.status.success(), "podctl failed: {}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    parse_json_line(&out.stdout).expect("podctl prints a JSON line")
}

/// Starts a podctl server in a pod and waits until it listens.
pub fn serve(pod: &Pod, command: &str, port: u16, extra: &[&str]) -> PodProcess {
    let port_arg = port.to_string();
    let mut args = vec![command, "--port", &port_arg];
    args.extend_from_slice(extra);
    let mut server = pod.spawn(podctl(), &args);
    assert!(server.wait_listening(port, WAIT), "{command} in {} is not listening on {port}", pod.name);
    server
}

/// An HTTP server whose peer log records every connection's source.
pub struct LoggedServer {
    pub process: PodProcess,
    pub log: PathBuf,
}

impl LoggedServer {
    pub fn start(scenario: &Scenario, pod: &Pod, port: u16, body: &str) -> Self {
        let log = scenario.node.scratch_dir().join(format!("{}-{port}.peers", pod.name));
        let log_arg = log.to_str().expect("utf-8 path").to_string();
        let process = serve(pod, "http-server", port, &["--body", body, "--peer-log", &log_arg]);
        Self { process, log }
    }

    /// Source addresses of the connections seen so far.
    pub fn peers(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log).unwrap_or_default().lines().map(str::to_string).collect()
    }

    /// Waits for `n` connections in total.
    pub fn wait_peers(&self, n: usize) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline && self.peers().len() < n {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.peers()
    }
}

/// `curl` in a pod; returns (exit code, body).
pub fn curl(pod: &Pod, url: &str) -> (i32, String) {
    // A generous limit: an mTLS first request on a loaded machine can take seconds; refusals come
    // back as resets long before it.
    let out = pod.run("curl", ["-s", "-m", "15", url]);
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Programs attached to a cgroup, by attach type, as bpftool reports them.
pub fn attached(cgroup: &std::path::Path) -> Vec<String> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cgroup)
        .output()
        .expect("running bpftool (cargo xtask setup installs it)");
    assert!(out.status.success(), "bpftool: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Array(vec![]));
    let mut types: Vec<String> =
        v.as_array().into_iter().flatten().filter_map(|p| p["attach_type"].as_str().map(str::to_string)).collect();
    types.sort();
    types
}

/// Id of a pinned bpf link, as bpftool reports it.
pub fn pinned_link_id(pin: &std::path::Path) -> u64 {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "link", "show", "pinned"])
        .arg(pin)
        .output()
        .expect("running bpftool (cargo xtask setup installs it)");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("bpftool link show pinned {}: {e}: {}", pin.display(), String::from_utf8_lossy(&out.stderr))
    });
    v["id"].as_u64().expect("link id")
}
