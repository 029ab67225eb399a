//! Putting the plugin on the node (run by the DaemonSet): the binary into the
//! CNI bin directory, a meshcap entry into the primary network configuration,
//! and with `watch`, keeping both there when the primary CNI rewrites its file.
//!
//! The entry is NOT removed when the agent's pod stops. Stopping covers
//! restarts, crashes and upgrades, and meshcap stays fail closed across them:
//! while the agent is away, new pods on the node fail their network setup
//! ("try again later", naming the socket) and the kubelet retries until the
//! agent is back, instead of starting uncaptured. Only `uninstall`, run on
//! purpose when meshcap leaves the node, takes the entry out.

mod conflist;

use std::{
    ffi::OsStr,
    io::{self, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::{Map, Value};

use self::conflist::Parsed;
use super::{
    netconf::{keys, DEFAULT_TIMEOUT},
    PLUGIN_TYPE, SUPPORTED_VERSIONS,
};

#[derive(Debug, Clone)]
pub struct InstallOptions {
    /// This binary, copied into `bin_dir`.
    pub source_binary: PathBuf,
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    /// The agent's socket as the node sees it (the plugin runs in the node's mount namespace).
    pub agent_socket: PathBuf,
    pub timeout: Duration,
    pub exclude_namespaces: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("listing the CNI configuration directory {dir}: {source}")]
    ReadDir { dir: PathBuf, source: io::Error },
    #[error("no *.conflist, *.conf or *.json in {dir}: the primary CNI has not written its configuration yet")]
    NoConfig { dir: PathBuf },
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} is not a usable CNI configuration ({reason}); left untouched")]
    Malformed { path: PathBuf, reason: String },
    #[error(
        "{path} uses cniVersion {version:?}, which meshcap-cni does not speak ({supported}); not chaining meshcap \
         into it, as every pod of the node would then fail to start"
    )]
    UnsupportedVersion { path: PathBuf, version: String, supported: String },
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("removing {path}: {source}")]
    Remove { path: PathBuf, source: io::Error },
}

/// What `install_config` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfChange {
    Unchanged {
        file: PathBuf,
    },
    /// The entry was added, or brought up to date.
    Written {
        file: PathBuf,
    },
    /// A single plugin's file became a list with the entry; the old file is gone.
    Converted {
        from: PathBuf,
        to: PathBuf,
    },
}

impl std::fmt::Display for ConfChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfChange::Unchanged { file } => write!(f, "{} already chains meshcap-cni", file.display()),
            ConfChange::Written { file } => write!(f, "chained meshcap-cni into {}", file.display()),
            ConfChange::Converted { from, to } => {
                write!(f, "chained meshcap-cni: {} is now the plugin list {}", from.display(), to.display())
            }
        }
    }
}

/// The plugin's entry in the list.
pub fn plugin_entry(opts: &InstallOptions) -> Map<String, Value> {
    let mut entry = Map::new();
    entry.insert("type".into(), PLUGIN_TYPE.into());
    entry.insert(keys::AGENT_SOCKET.into(), opts.agent_socket.to_string_lossy().into_owned().into());
    entry.insert(keys::TIMEOUT_SECONDS.into(), opts.timeout.as_secs().max(1).into());
    entry.insert(keys::EXCLUDE_NAMESPACES.into(), opts.exclude_namespaces.clone().into());
    entry
}

impl Default for InstallOptions {
    fn default() -> InstallOptions {
        InstallOptions {
            source_binary: PathBuf::new(),
            bin_dir: "/opt/cni/bin".into(),
            conf_dir: "/etc/cni/net.d".into(),
            agent_socket: super::DEFAULT_AGENT_SOCKET.into(),
            timeout: DEFAULT_TIMEOUT,
            exclude_namespaces: vec!["kube-system".into()],
        }
    }
}

/// The configuration the runtime uses, found as containerd and the kubelet find it: the lexicographically
/// first `*.conflist`, `*.conf` or `*.json` file of the directory.
pub fn primary_config(conf_dir: &Path) -> Result<PathBuf, InstallError> {
    config_files(conf_dir)?.into_iter().next().ok_or_else(|| InstallError::NoConfig { dir: conf_dir.to_path_buf() })
}

fn config_files(conf_dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let read_dir_err = |source| InstallError::ReadDir { dir: conf_dir.to_path_buf(), source };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(conf_dir).map_err(read_dir_err)? {
        let entry = entry.map_err(read_dir_err)?;
        let path = entry.path();
        let is_conf =
            path.extension().and_then(OsStr::to_str).is_some_and(|e| matches!(e, "conflist" | "conf" | "json"));
        // Follows symlinks, as the runtime's loader does.
        if is_conf && !path.is_dir() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Chains the plugin into the primary configuration, idempotently; a file that does not parse is left as it is.
pub fn install_config(opts: &InstallOptions) -> Result<ConfChange, InstallError> {
    let file = primary_config(&opts.conf_dir)?;
    let text = std::fs::read_to_string(&file).map_err(|source| InstallError::Read { path: file.clone(), source })?;
    let parsed = conflist::parse(&file, &text)?;
    let (Parsed::List(map) | Parsed::Single(map)) = &parsed;
    let version = conflist::cni_version(map).unwrap_or("");
    if !SUPPORTED_VERSIONS.contains(&version) {
        return Err(InstallError::UnsupportedVersion {
            path: file,
            version: version.to_string(),
            supported: SUPPORTED_VERSIONS.join(", "),
        });
    }
    let entry = plugin_entry(opts);
    match parsed {
        Parsed::List(list) => {
            let updated = conflist::with_entry(&list, &entry);
            if updated == list {
                return Ok(ConfChange::Unchanged { file });
            }
            write_json(&file, &updated)?;
            Ok(ConfChange::Written { file })
        }
        Parsed::Single(conf) => {
            let to = file.with_extension("conflist");
            write_json(&to, &conflist::with_entry(&conflist::single_to_list(conf), &entry))?;
            // After the list is in place: removing first would leave the node without any configuration.
            std::fs::remove_file(&file).map_err(|source| InstallError::Remove { path: file.clone(), source })?;
            Ok(ConfChange::Converted { from: file, to })
        }
    }
}

/// Takes the meshcap entry out of every configuration list in `conf_dir`; returns the files changed. Lists
/// left with only the primary plugin stay lists (a one-plugin list is valid).
pub fn uninstall_config(conf_dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut changed = Vec::new();
    for file in config_files(conf_dir)? {
        let text =
            std::fs::read_to_string(&file).map_err(|source| InstallError::Read { path: file.clone(), source })?;
        // Files meshcap cannot read are not files meshcap wrote into.
        let Ok(Parsed::List(list)) = conflist::parse(&file, &text) else { continue };
        if let Some(without) = conflist::without_entry(&list) {
            write_json(&file, &without)?;
            changed.push(file);
        }
    }
    Ok(changed)
}

/// Copies the plugin binary into `bin_dir` (temp file and rename, so the runtime never runs half a binary);
/// `false` when an identical copy is already there.
pub fn install_binary(source: &Path, bin_dir: &Path) -> Result<bool, InstallError> {
    let target = bin_dir.join(PLUGIN_TYPE);
    let bytes = std::fs::read(source).map_err(|e| InstallError::Read { path: source.to_path_buf(), source: e })?;
    if std::fs::read(&target).is_ok_and(|existing| existing == bytes) {
        return Ok(false);
    }
    write_atomic(&target, &bytes, 0o755)?;
    Ok(true)
}

/// Whether the installed binary still looks like ours (cheap: its size), for the watch loop.
fn binary_present(source: &Path, bin_dir: &Path) -> bool {
    let len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).ok();
    len(&bin_dir.join(PLUGIN_TYPE)).is_some_and(|l| Some(l) == len(source))
}

pub fn remove_binary(bin_dir: &Path) -> Result<bool, InstallError> {
    let target = bin_dir.join(PLUGIN_TYPE);
    match std::fs::remove_file(&target) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(InstallError::Remove { path: target, source }),
    }
}

/// Installs, then re-checks every `interval` until the task is dropped, logging each change and each new
/// error once (the primary CNI may write its file late, or rewrite it).
pub async fn watch(opts: InstallOptions, interval: Duration) {
    let mut last_error: Option<String> = None;
    let mut first = true;
    tracing::info!(conf_dir = %opts.conf_dir.display(), ?interval, "keeping meshcap-cni chained");
    loop {
        let step = (|| {
            // In full once (an upgrade may leave a same-sized older binary), then only the cheap check.
            if (first || !binary_present(&opts.source_binary, &opts.bin_dir))
                && install_binary(&opts.source_binary, &opts.bin_dir)?
            {
                tracing::info!(dir = %opts.bin_dir.display(), "installed the meshcap-cni binary");
            }
            install_config(&opts)
        })();
        match step {
            Ok(ConfChange::Unchanged { .. }) if !first => {}
            Ok(change) => tracing::info!("{change}"),
            Err(e) => {
                let message = e.to_string();
                if last_error.as_ref() != Some(&message) {
                    tracing::error!("{message}");
                }
                last_error = Some(message);
                tokio::time::sleep(interval).await;
                continue;
            }
        }
        first = false;
        if last_error.take().is_some() {
            tracing::info!("meshcap-cni is chained again");
        }
        tokio::time::sleep(interval).await;
    }
}

fn write_json(path: &Path, map: &Map<String, Value>) -> Result<(), InstallError> {
    let mut text = serde_json::to_string_pretty(map).expect("a JSON map always serializes");
    text.push('\n');
    let mode = std::fs::metadata(path).map(|m| m.permissions().mode() & 0o7777).unwrap_or(0o644);
    write_atomic(path, text.as_bytes(), mode)
}

/// Temp file beside `path` (an extension the runtime ignores), synced, then renamed over it.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    let write_err = |source| InstallError::Write { path: path.to_path_buf(), source };
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.meshcap-tmp", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(write_err)
}

#[cfg(test)]
#[path = "install/tests.rs"]
mod tests;
