//! kubelet health probes under STRICT: the kubelet's own connections to an
//! enrolled pod reach the app directly (recorded by sock_ops on the
//! kubelet's cgroup, let through by the pod's sk_lookup), while any other
//! process on the node, from the same IP, still meets STRICT.

use std::{
    fs,
    path::{Path, PathBuf},
};

use meshcap_tests::{
    cgroup2_mount, podctl, privileged_or_skip,
    scenario::{enroll, json_of, LoggedServer, Scenario, WAIT},
    wait_until, Agent, Node,
};
use serde_json::Value;

/// A cgroup standing in for `kubelet.service`, removed on drop.
struct KubeletCgroup(PathBuf);

impl KubeletCgroup {
    fn new(test: &str) -> Self {
        let dir = cgroup2_mount().join(format!("meshcap-test-kubelet-{test}-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        Self(dir)
    }

    /// A podctl run on the node (its netns), as a process of this cgroup
    /// from its first instruction: a shell joins the cgroup, then execs.
    fn run(&self, node: &Node, args: &[&str]) -> Value {
        let script = format!("echo $$ > {}/cgroup.procs && exec \"$0\" \"$@\"", self.0.display());
        let mut full = vec!["-c".to_string(), script, podctl().display().to_string()];
        full.extend(args.iter().map(|a| a.to_string()));
        json_of(&node.run("sh", &full))
    }
}

impl Drop for KubeletCgroup {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.0);
    }
}

fn strict_for(app: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: strict-{app}\n  \
         namespace: default\nspec:\n  selector:\n    matchLabels:\n      app: {app}\n  mtls:\n    mode: STRICT\n"
    )
}

fn link_pins(pins: &Path) -> Vec<String> {
    fs::read_dir(pins.join("links"))
        .map(|rd| rd.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

#[test]
fn kubelet_probes_reach_strict_pods_and_nothing_else_does() {
    if !privileged_or_skip() {
        return;
    }
    let kubelet = KubeletCgroup::new("probes");
    let s = Scenario::new("kubelet_probes");
    let mut server = s.node.add_pod("server");
    enroll(&mut server);
    server.labels.insert("app".into(), "server".into());
    s.write_raw(&format!("{}{}", meshcap_tests::pods_yaml(&[&server]), strict_for("server")));
    let mut agent = s.start_agent(&["--kubelet-cgroup", &kubelet.0.display().to_string()]);
    agent.must_capture("server");
    assert!(wait_until(WAIT, || agent.pod_status("server").is_some_and(|p| p["mtls"]["mode"] == "STRICT")));
    let app = LoggedServer::start(&s, &server, 8080, "healthy");
    let status = agent.status().expect("status");
    assert_eq!(status["kubelet_probe_cgroup"], kubelet.0.display().to_string(), "{status}");

    // The kubelet's probes, over both families, reach the app from the node's own address.
    let urls = [format!("http://{}:8080/healthz", server.ip4()), format!("http://[{}]:8080/healthz", server.ip6())];
    for (i, url) in urls.iter().enumerate() {
        let r = kubelet.run(&s.node, &["http-get", "--url", url]);
        assert_eq!(r["ok"], true, "kubelet probe {url}: {r}\n{}", agent.logs());
        assert_eq!(r["body"], "healthy");
        let peer = &app.wait_peers(i + 1)[i];
        assert!(peer != "127.0.0.6" && peer != "::6", "probe went through the engine: app saw {peer}");
    }
    assert_eq!(app.peers()[0], s.node.ip4().to_string(), "the app sees the kubelet's own address");
    assert_eq!(agent.counter("inbound_kubelet_probe"), Some(2));

    // Anything else on the node, same address, same port: STRICT refuses plaintext.
    let r =
        json_of(&s.node.run(
            podctl(),
            ["connect", "--addr", &format!("{}:8080", server.ip4()), "--send", "GET / HTTP/1.0\r\n\r\n"],
        ));
    assert_eq!(r["ok"], false, "a non-kubelet process on the node got plaintext through: {r}");
    assert!(wait_until(WAIT, || agent.inbound("server", "plaintext_refused") == 1));
    assert_eq!(app.peers().len(), 2, "only the two probes reached the app");

    // The exemption is pinned like the rest of capture, and `none` removes it.
    let cgid = fs::metadata(&kubelet.0).map(|m| std::os::unix::fs::MetadataExt::ino(&m)).unwrap();
    assert!(link_pins(agent.pins()).contains(&format!("kubelet@{cgid}")), "{:?}", link_pins(agent.pins()));
    let _pins = agent.pin_guard();
    // A kubelet cgroup the agent must refuse (here the root of the hierarchy) keeps it from starting, and the
    // exemption pinned by the run before does not outlive the refusal.
    let mut wide = agent.options().clone();
    let at = wide.extra_args.iter().position(|a| a == "--kubelet-cgroup").expect("the flag given above");
    wide.extra_args[at + 1] = "/sys/fs/cgroup".into();
    agent.stop();
    let mut refused = Agent::start(wide);
    assert!(wait_until(WAIT, || !refused.is_running()), "{}", refused.logs());
    assert!(refused.wait_for_log("must be a cgroup below the cgroup2 mount", WAIT), "{}", refused.logs());
    assert!(!link_pins(agent.pins()).iter().any(|l| l.starts_with("kubelet@")), "{:?}", link_pins(agent.pins()));
    drop(refused);
    let mut opts = agent.options().clone();
    let at = opts.extra_args.iter().position(|a| a == "--kubelet-cgroup").expect("the flag given above");
    opts.extra_args[at + 1] = "none".into();
    agent.stop();
    let mut agent = Agent::start(opts);
    assert!(agent.wait_ready_or_answering(WAIT), "{}", agent.logs());
    agent.must_capture("server");
    assert!(!link_pins(agent.pins()).iter().any(|l| l.starts_with("kubelet@")), "{:?}", link_pins(agent.pins()));
    assert!(agent.status().expect("status")["kubelet_probe_cgroup"].is_null());
    let send = ["connect", "--addr", &format!("{}:8080", server.ip4()), "--send", "GET / HTTP/1.0\r\n\r\n"];
    let r = kubelet.run(&s.node, &send);
    assert_eq!(r["ok"], false, "with the exemption off the kubelet meets STRICT too: {r}");
    assert!(wait_until(WAIT, || agent.inbound("server", "plaintext_refused") == 1));
}
