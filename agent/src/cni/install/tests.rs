use serde_json::json;

use super::*;

/// A directory of its own under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("mc-cni-install-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("net.d")).unwrap();
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        TempDir(dir)
    }

    fn conf_dir(&self) -> PathBuf {
        self.0.join("net.d")
    }

    fn write(&self, name: &str, value: &Value) -> PathBuf {
        let path = self.conf_dir().join(name);
        std::fs::write(&path, serde_json::to_string_pretty(value).unwrap()).unwrap();
        path
    }

    fn read(&self, name: &str) -> Value {
        serde_json::from_str(&std::fs::read_to_string(self.conf_dir().join(name)).unwrap()).unwrap()
    }

    fn files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.conf_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn options(&self) -> InstallOptions {
        InstallOptions {
            source_binary: self.0.join("meshcap-cni-build"),
            bin_dir: self.0.join("bin"),
            conf_dir: self.conf_dir(),
            agent_socket: "/var/run/meshcap/cni.sock".into(),
            timeout: Duration::from_secs(30),
            exclude_namespaces: vec!["kube-system".into()],
        }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn bridge_list() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "plugins": [
            {"type": "bridge", "bridge": "cni0", "isGateway": true,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.0.0/24"}]]}},
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    })
}

fn meshcap_entry() -> Value {
    json!({"type": "meshcap-cni", "agentSocket": "/var/run/meshcap/cni.sock", "timeoutSeconds": 30,
           "excludeNamespaces": ["kube-system"]})
}

#[test]
fn appends_to_the_lexicographically_first_list_and_only_once() {
    let t = TempDir::new("list");
    t.write("10-bridge.conflist", &bridge_list());
    t.write("99-other.conflist", &bridge_list());
    std::fs::write(t.conf_dir().join("05-notes.txt"), "not a config").unwrap();
    std::fs::create_dir(t.conf_dir().join("00-dir.conf")).unwrap();

    let file = t.conf_dir().join("10-bridge.conflist");
    assert_eq!(install_config(&t.options()).unwrap(), ConfChange::Written { file: file.clone() });
    let mut expected = bridge_list();
    expected["plugins"].as_array_mut().unwrap().push(meshcap_entry());
    assert_eq!(t.read("10-bridge.conflist"), expected);
    assert_eq!(t.read("99-other.conflist"), bridge_list(), "only the primary is touched");

    let before = std::fs::read(&file).unwrap();
    assert_eq!(install_config(&t.options()).unwrap(), ConfChange::Unchanged { file: file.clone() });
    assert_eq!(std::fs::read(&file).unwrap(), before, "a second install leaves the bytes alone");
    assert_eq!(t.files(), ["00-dir.conf", "05-notes.txt", "10-bridge.conflist", "99-other.conflist"]);
}

#[test]
fn a_changed_setting_updates_the_entry_in_place() {
    let t = TempDir::new("update");
    let mut list = bridge_list();
    let plugins = list["plugins"].as_array_mut().unwrap();
    plugins.insert(1, json!({"type": "meshcap-cni", "agentSocket": "/old.sock"}));
    plugins.push(json!({"type": "meshcap-cni"}));
    t.write("10-bridge.conflist", &list);

    let mut opts = t.options();
    opts.timeout = Duration::from_secs(9);
    install_config(&opts).unwrap();
    let types: Vec<_> = t.read("10-bridge.conflist")["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(types, ["bridge", "meshcap-cni", "portmap"], "one entry, where the first was");
    assert_eq!(t.read("10-bridge.conflist")["plugins"][1]["timeoutSeconds"], 9);
}

#[test]
fn a_single_conf_becomes_a_list() {
    let t = TempDir::new("single");
    let conf = json!({"cniVersion": "0.3.1", "name": "kindnet", "type": "ptp",
                      "ipam": {"type": "host-local", "subnet": "10.244.1.0/24"}});
    t.write("10-kindnet.conf", &conf);
    let change = install_config(&t.options()).unwrap();
    assert_eq!(
        change,
        ConfChange::Converted {
            from: t.conf_dir().join("10-kindnet.conf"),
            to: t.conf_dir().join("10-kindnet.conflist"),
        }
    );
    assert_eq!(t.files(), ["10-kindnet.conflist"]);
    assert_eq!(
        t.read("10-kindnet.conflist"),
        json!({"cniVersion": "0.3.1", "name": "kindnet", "plugins": [conf, meshcap_entry()]})
    );
    // Now a list: installing again finds it and changes nothing.
    assert!(matches!(install_config(&t.options()).unwrap(), ConfChange::Unchanged { .. }));
}

#[test]
fn malformed_configurations_are_left_untouched_with_a_clear_error() {
    let cases: [(&str, &str, &str); 5] = [
        ("10-x.conflist", "{\"cniVersion\": \"1.0.0\", \"plugins\": [", "not JSON"),
        ("10-x.conflist", r#"{"cniVersion": "1.0.0", "plugins": {"type": "bridge"}}"#, "`plugins` is not a list"),
        ("10-x.conflist", r#"{"cniVersion": "1.0.0", "plugins": []}"#, "`plugins` is empty"),
        ("10-x.conflist", r#"{"cniVersion": "1.0.0", "plugins": [{"type": "bridge"}, 3]}"#, "`plugins[1]`"),
        ("10-x.conf", r#"{"cniVersion": "1.0.0", "name": "x"}"#, "neither a plugin list"),
    ];
    for (name, text, needle) in cases {
        let t = TempDir::new("bad");
        let path = t.conf_dir().join(name);
        std::fs::write(&path, text).unwrap();
        let err = install_config(&t.options()).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()) && err.contains(needle), "{name}: {err}");
        assert!(err.contains("left untouched"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text, "{name} changed");
        assert_eq!(t.files(), [name], "no temporary file left");
    }
}

#[test]
fn an_unknown_cni_version_is_refused_and_an_empty_directory_explained() {
    let t = TempDir::new("version");
    let err = install_config(&t.options()).unwrap_err().to_string();
    assert!(err.contains("no *.conflist") && err.contains(&t.conf_dir().display().to_string()), "{err}");

    let mut list = bridge_list();
    list["cniVersion"] = "0.2.0".into();
    t.write("10-bridge.conflist", &list);
    let err = install_config(&t.options()).unwrap_err().to_string();
    assert!(err.contains("cniVersion \"0.2.0\"") && err.contains("10-bridge.conflist"), "{err}");
    assert_eq!(t.read("10-bridge.conflist"), list);
}

#[test]
fn uninstall_removes_every_entry_and_keeps_the_rest() {
    let t = TempDir::new("uninstall");
    t.write("10-bridge.conflist", &bridge_list());
    t.write("20-single.conf", &json!({"cniVersion": "1.0.0", "name": "s", "type": "ptp"}));
    install_config(&t.options()).unwrap();
    let mut older = bridge_list();
    older["plugins"].as_array_mut().unwrap().push(meshcap_entry());
    t.write("30-older.conflist", &older);

    let changed = uninstall_config(&t.conf_dir()).unwrap();
    assert_eq!(changed, [t.conf_dir().join("10-bridge.conflist"), t.conf_dir().join("30-older.conflist")]);
    assert_eq!(t.read("10-bridge.conflist"), bridge_list());
    assert_eq!(t.read("30-older.conflist"), bridge_list());
    assert!(uninstall_config(&t.conf_dir()).unwrap().is_empty(), "idempotent");
}

#[test]
fn the_binary_is_copied_executable_and_only_when_it_differs() {
    let t = TempDir::new("bin");
    let opts = t.options();
    std::fs::write(&opts.source_binary, b"\x7fELF build 1").unwrap();
    assert!(install_binary(&opts.source_binary, &opts.bin_dir).unwrap());
    let target = opts.bin_dir.join("meshcap-cni");
    assert_eq!(std::fs::read(&target).unwrap(), b"\x7fELF build 1");
    assert_eq!(std::fs::metadata(&target).unwrap().permissions().mode() & 0o777, 0o755);
    assert!(!install_binary(&opts.source_binary, &opts.bin_dir).unwrap(), "identical: left alone");
    assert!(binary_present(&opts.source_binary, &opts.bin_dir));

    std::fs::write(&opts.source_binary, b"\x7fELF build two").unwrap();
    assert!(!binary_present(&opts.source_binary, &opts.bin_dir));
    assert!(install_binary(&opts.source_binary, &opts.bin_dir).unwrap());
    assert_eq!(std::fs::read(&target).unwrap(), b"\x7fELF build two");
    let names: Vec<_> = std::fs::read_dir(&opts.bin_dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["meshcap-cni"]);
    assert!(remove_binary(&opts.bin_dir).unwrap());
    assert!(!remove_binary(&opts.bin_dir).unwrap());
}

#[tokio::test]
async fn watch_puts_the_entry_back_after_the_primary_rewrites_its_file() {
    let t = TempDir::new("watch");
    let opts = t.options();
    std::fs::write(&opts.source_binary, b"\x7fELF").unwrap();
    let watcher = tokio::spawn(watch(opts.clone(), Duration::from_millis(50)));
    let chained = |t: &TempDir, name: &str| {
        std::fs::read_to_string(t.conf_dir().join(name)).is_ok_and(|s| s.contains("meshcap-cni"))
    };
    // Written late, as a primary CNI starting after the agent would.
    tokio::time::sleep(Duration::from_millis(120)).await;
    t.write("10-bridge.conflist", &bridge_list());
    let mut ok = false;
    for _ in 0..100 {
        if chained(&t, "10-bridge.conflist") {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "installed once the file appeared");
    assert!(opts.bin_dir.join("meshcap-cni").exists());

    t.write("10-bridge.conflist", &bridge_list());
    std::fs::remove_file(opts.bin_dir.join("meshcap-cni")).unwrap();
    let mut ok = false;
    for _ in 0..100 {
        if chained(&t, "10-bridge.conflist") && opts.bin_dir.join("meshcap-cni").exists() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    watcher.abort();
    assert!(ok, "entry and binary put back");
}
