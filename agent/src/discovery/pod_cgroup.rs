//! The pod's cgroup directory: the kubelet's usual places first, then a bounded walk.
//!
//! The systemd driver encodes the hierarchy in each slice name (`a.slice/a-b.slice/a-b-c.slice`) and, since '-'
//! is its separator, writes the UID with '_' (`kubepods-burstable-pod1a2b_3c.slice`); the cgroupfs driver uses
//! plain names (`kubepods/burstable/pod1a2b-3c`). kind's kubelet runs with `--cgroup-root=/kubelet`, which adds
//! a `kubelet` level in front of `kubepods`.

use std::{
    fs,
    io::ErrorKind,
    path::{Path, PathBuf},
};

use super::{DiscoveryError, QosClass, MAX_DEPTH};

/// The `--cgroup-root` values we know of: the default and kind's.
const CGROUP_ROOTS: [&[&str]; 2] = [&[], &["kubelet"]];

/// The names a pod's cgroup directory can have, for one UID.
struct PodNames {
    /// cgroupfs driver: `pod<uid>`.
    cgroupfs: String,
    /// systemd driver, last component of the slice name: `pod<uid_>`.
    systemd: String,
}

impl PodNames {
    fn new(uid: &str) -> Self {
        PodNames { cgroupfs: format!("pod{uid}"), systemd: format!("pod{}", uid.replace('-', "_")) }
    }

    /// Is `name` this pod's directory under either driver, whatever slices lead to it?
    fn matches(&self, name: &str) -> bool {
        if name == self.cgroupfs {
            return true;
        }
        let Some(slice) = name.strip_suffix(".slice") else { return false };
        slice == self.systemd || slice.strip_suffix(self.systemd.as_str()).is_some_and(|rest| rest.ends_with('-'))
    }

    /// Where the kubelet puts the pod's cgroup for each QoS class in `classes`, relative to the cgroup root.
    fn usual_places(&self, classes: &[QosClass]) -> Vec<PathBuf> {
        let mut places = Vec::new();
        for prefix in CGROUP_ROOTS {
            for class in classes {
                let mut parts: Vec<&str> = prefix.to_vec();
                parts.push("kubepods");
                parts.extend(class.cgroup_name());
                places.push(systemd_path(&parts, &self.systemd));
                places.push(parts.iter().copied().chain([self.cgroupfs.as_str()]).collect());
            }
        }
        places
    }
}

/// `["kubepods", "burstable"]` + `pod1_2` → `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1_2.slice`.
fn systemd_path(parents: &[&str], leaf: &str) -> PathBuf {
    let parts: Vec<&str> = parents.iter().copied().chain([leaf]).collect();
    (1..=parts.len()).map(|n| format!("{}.slice", parts[..n].join("-"))).collect()
}

fn is_cgroup(dir: &Path) -> bool {
    dir.join("cgroup.procs").exists()
}

pub(super) fn find(cgroup_root: &Path, uid: &str, qos: Option<QosClass>) -> Result<PathBuf, DiscoveryError> {
    let root = std::path::absolute(cgroup_root)
        .map_err(|source| DiscoveryError::CgroupRoot { root: cgroup_root.into(), source })?;
    let names = PodNames::new(uid);
    let classes = qos.as_ref().map_or(&QosClass::ALL[..], std::slice::from_ref);
    let known: Vec<PathBuf> =
        names.usual_places(classes).into_iter().map(|rel| root.join(rel)).filter(|dir| is_cgroup(dir)).collect();
    let found = if known.is_empty() { walk(&root, uid, &names)? } else { known };
    match found.as_slice() {
        [] => Err(DiscoveryError::PodCgroupNotFound {
            uid: uid.into(),
            root,
            systemd_name: format!("*-{}.slice", names.systemd),
            cgroupfs_name: names.cgroupfs,
        }),
        [one] => Ok(one.clone()),
        [first, second, ..] => Err(DiscoveryError::AmbiguousPodCgroup {
            uid: uid.into(),
            root,
            first: first.clone(),
            second: second.clone(),
        }),
    }
}

/// Every directory up to [`MAX_DEPTH`] below `root` named like the pod's cgroup, sorted. Symlinks are never
/// followed (cgroupfs has none; anything else is not the kubelet's), nor are matched directories entered (pods
/// do not nest). Cgroups vanish all the time as containers stop, so one gone mid-walk is skipped.
fn walk(root: &Path, uid: &str, names: &PodNames) -> Result<Vec<PathBuf>, DiscoveryError> {
    let mut found = Vec::new();
    let mut pending = vec![(root.to_path_buf(), 0)];
    while let Some((dir, depth)) = pending.pop() {
        let read_error = |source: std::io::Error| {
            if dir == root {
                DiscoveryError::CgroupRoot { root: root.into(), source }
            } else {
                DiscoveryError::ReadDir { uid: uid.into(), path: dir.clone(), source }
            }
        };
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == ErrorKind::NotFound && dir != root => continue,
            Err(e) => return Err(read_error(e)),
        };
        for entry in entries {
            let entry = match entry.and_then(|e| e.file_type().map(|t| (e, t))) {
                Ok((entry, kind)) if kind.is_dir() => entry,
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(read_error(e)),
            };
            let path = entry.path();
            if entry.file_name().to_str().is_some_and(|name| names.matches(name)) && is_cgroup(&path) {
                found.push(path);
            } else if depth + 1 < MAX_DEPTH {
                pending.push((path, depth + 1));
            }
        }
    }
    found.sort();
    Ok(found)
}
