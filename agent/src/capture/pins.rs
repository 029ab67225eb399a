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

    /// Links on node cgroups that are not pods: `agent` (the engine's own
    /// sockets) and `kubelet` (probe exemption).
    pub fn node_links_dir(&self, owner: NodeCgroup, cgroup_id: u64) -> PathBuf {
        self.links_dir().join(format!("{}@{cgroup_id}", owner.as_str()))
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
                if NodeCgroup::ALL.iter().any(|o| o.as_str() == uid) {
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

    /// Links of `owner` left on other cgroups (the agent's pod was
    /// replaced, the kubelet moved or the exemption was turned off: `keep`
    /// is None): that cgroup is gone or must not be covered any more.
    pub fn remove_other_node_links(&self, owner: NodeCgroup, keep: Option<u64>) -> Result<(), CaptureError> {
        let keep = keep.map(|cgid| self.node_links_dir(owner, cgid));
        let prefix = format!("{}@", owner.as_str());
        let Ok(entries) = fs::read_dir(self.links_dir()) else { return Ok(()) };
        for e in entries.filter_map(Result::ok) {
            if e.file_name().to_string_lossy().starts_with(&prefix) && Some(e.path()) != keep {
                self.remove_links(&e.path())?;
            }
        }
        Ok(())
    }
}

/// Node cgroups (not pods) that carry a pinned sock_ops link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeCgroup {
    Agent,
    Kubelet,
}

impl NodeCgroup {
    pub const ALL: [NodeCgroup; 2] = [NodeCgroup::Agent, NodeCgroup::Kubelet];

    pub fn as_str(self) -> &'static str {
        match self {
            NodeCgroup::Agent => "agent",
            NodeCgroup::Kubelet => "kubelet",
        }
    }
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else { return false };
    // SAFETY: statfs writes into the zeroed struct we pass.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}
