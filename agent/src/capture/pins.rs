//! The pin directory: where maps and links live between agent runs.

use std::{
    fs,
    path::{Path, PathBuf},
};

use aya::maps::MapData;

use super::CaptureError;

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

#[derive(Debug, Clone)]
pub struct Pins {
    root: PathBuf,
}

/// A pod's pinned links, as found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinnedPod {
    pub uid: String,
    pub cgroup_id: u64,
    pub dir: PathBuf,
}

impl Pins {
    pub fn prepare(root: &Path) -> Result<Self, CaptureError> {
        // Check before creating anything: a wrong --pin-dir leaves no litter.
        let existing = root.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
        if !is_bpffs(existing) {
            return Err(CaptureError::NotBpffs { path: root.into() });
        }
        let pins = Self { root: root.into() };
        for dir in [root.to_path_buf(), pins.maps_dir(), pins.links_dir()] {
            pins.create_dir(&dir)?;
        }
        Ok(pins)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    pub fn map_path(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    pub fn pod_links_dir(&self, uid: &str, cgroup_id: u64) -> PathBuf {
        self.links_dir().join(format!("{uid}@{cgroup_id}"))
    }

    pub fn agent_links_dir(&self, cgroup_id: u64) -> PathBuf {
        self.links_dir().join(format!("agent@{cgroup_id}"))
    }

    pub fn create_dir(&self, dir: &Path) -> Result<(), CaptureError> {
        fs::create_dir_all(dir).map_err(|source| CaptureError::Io { op: "mkdir", path: dir.into(), source })
    }

    /// (key size, value size, max entries) of a pinned map, if there is one.
    pub fn pinned_map_layout(&self, name: &str) -> Result<Option<(u32, u32, u32)>, CaptureError> {
        let path = self.map_path(name);
        if !path.exists() {
            return Ok(None);
        }
        let map = MapData::from_pin(&path).map_err(|e| CaptureError::Io {
            op: "opening pinned map",
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        let info = map.info().map_err(|e| CaptureError::Io {
            op: "reading map info of",
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        Ok(Some((info.key_size(), info.value_size(), info.max_entries())))
    }

    /// Pods with links pinned here.
    pub fn pinned_pods(&self) -> Vec<PinnedPod> {
        let Ok(entries) = fs::read_dir(self.links_dir()) else { return Vec::new() };
        entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let (uid, cgid) = name.rsplit_once('@')?;
                if uid == "agent" {
                    return None;
                }
                Some(PinnedPod { uid: uid.into(), cgroup_id: cgid.parse().ok()?, dir: e.path() })
            })
            .collect()
    }

    /// Hook names pinned in one pod's link directory.
    pub fn hooks_in(dir: &Path) -> Vec<String> {
        let mut hooks: Vec<String> = fs::read_dir(dir)
            .map(|rd| rd.filter_map(Result::ok).filter_map(|e| e.file_name().into_string().ok()).collect())
            .unwrap_or_default();
        hooks.sort();
        hooks
    }

    /// Unpins a link directory: with no other holder the links detach.
    pub fn remove_links(&self, dir: &Path) -> Result<(), CaptureError> {
        match fs::remove_dir_all(dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(CaptureError::Io { op: "unpinning", path: dir.into(), source }),
        }
    }

    /// sock_ops links left on cgroups the agent no longer runs in (its pod
    /// was replaced): that cgroup is gone or will be reused by nobody.
    pub fn remove_other_agent_links(&self, cgroup_id: u64) -> Result<(), CaptureError> {
        let keep = self.agent_links_dir(cgroup_id);
        let Ok(entries) = fs::read_dir(self.links_dir()) else { return Ok(()) };
        for e in entries.filter_map(Result::ok) {
            if e.file_name().to_string_lossy().starts_with("agent@") && e.path() != keep {
                self.remove_links(&e.path())?;
            }
        }
        Ok(())
    }
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else { return false };
    // SAFETY: statfs writes into the zeroed struct we pass.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}
