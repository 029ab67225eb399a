//! Loads, attaches, pins and adopts the eBPF programs and maps; enrolls and
//! unenrolls pods.
//!
//! Pin layout under the pin directory:
//! - `maps/<NAME>`: every map, reused by the next agent;
//! - `links/<pod uid>@<cgroup id>/<hook>`: a pod's cgroup links;
//! - `links/agent@<cgroup id>/sock_ops`: sock_ops on the agent's own cgroup;
//! - `links/kubelet@<cgroup id>/sock_ops`: the kubelet probe exemption.
//!
//! Links outlive the agent: `kill -9` leaves capture in place (new connects
//! are refused because the in-pod listener died with the agent), and a
//! restarted agent adopts them instead of attaching twice.

mod iptables;
mod kubelet;
mod pins;
mod pod;
mod sys;

use std::{
    collections::BTreeMap,
    fs::File,
    path::{Path, PathBuf},
};

use aya::{
    maps::{lpm_trie::LpmTrie, HashMap, Map, MapData, PerCpuArray, SockHash},
    programs::{CgroupAttachMode, SkMsg, SockOps},
    Ebpf, EbpfLoader,
};
pub use iptables::{CaptureMode, IptablesCapture, IptablesError, ENGINE_MARK};
pub use kubelet::{find_kubelet_cgroup, KubeletError};
use meshcap_common::{counter, names, FlowKey, ListenerKey, NetKey, OrigDst, PodConfig, PodOwner, PortKey};
use pins::NodeCgroup;
pub use pins::Pins;
pub use pod::PodCapture;
use serde::Serialize;

use crate::config::Config;

/// The eBPF object built by `cargo xtask build-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("MESHCAP_EBPF_OBJECT"));

/// Hooks attached to each enrolled pod's cgroup, by program name.
pub const CGROUP_HOOKS: [&str; 5] = ["connect4", "connect6", "getpeername4", "getpeername6", "track_sock"];
/// Hook attached to each enrolled pod's network namespace.
pub const NETNS_HOOK: &str = "steer_inbound";
/// sock_ops on the kubelet's cgroup: its probes of enrolled pods reach the app.
pub const KUBELET_HOOK: &str = "note_kubelet_connect";
/// Every hook a captured pod carries.
pub const POD_HOOKS: [&str; 6] = ["connect4", "connect6", "getpeername4", "getpeername6", "track_sock", NETNS_HOOK];

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("pin directory {path} is not on a bpf filesystem (mount one: `mount -t bpf bpf /sys/fs/bpf`)")]
    NotBpffs { path: PathBuf },
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
    #[error("loading the eBPF object: {0}")]
    Load(Box<aya::EbpfError>),
    #[error("program {program}: {source}")]
    Program { program: &'static str, source: Box<aya::programs::ProgramError> },
    #[error("map {map}: {source}")]
    Map { map: &'static str, source: aya::maps::MapError },
    #[error(
        "pinned map {path} has key/value size {found:?} but this agent expects {expected:?}: \
         it was made by an incompatible version; remove it to start afresh (capture is lost until pods re-enroll)"
    )]
    IncompatiblePin { path: PathBuf, expected: (u32, u32), found: (u32, u32) },
    #[error(
        "pod {pod}: map {map} is full ({max_entries} entries); raise --{flag} (maps keep the size they were \
         pinned with: the new size applies once the pin directory is removed, which drops capture until pods re-enroll)"
    )]
    MapFull { pod: String, map: &'static str, max_entries: u32, flag: &'static str },
    #[error("pod {pod}: attaching {hook} to {cgroup}: {source}")]
    Attach { pod: String, hook: &'static str, cgroup: PathBuf, source: Box<aya::programs::ProgramError> },
    #[error("pod {pod}: link of {hook}: {source}")]
    Link { pod: String, hook: &'static str, source: aya::programs::links::LinkError },
    #[error("pinning link {path}: {source}")]
    PinLink { path: PathBuf, source: aya::pin::PinError },
    #[error("kubelet probe exemption: {0}")]
    Kubelet(#[from] KubeletError),
    #[error(transparent)]
    Iptables(#[from] IptablesError),
}

pub struct Capture {
    ebpf: Ebpf,
    pins: Pins,
    flags: u32,
    outbound_port: u16,
    inbound_port: u16,
    pod_config: HashMap<MapData, u64, PodConfig>,
    pod_owner: HashMap<MapData, u64, PodOwner>,
    port_rules: HashMap<MapData, PortKey, u8>,
    exclude_nets: LpmTrie<MapData, NetKey, u8>,
    include_nets: LpmTrie<MapData, NetKey, u8>,
    inbound_addrs: HashMap<MapData, meshcap_common::Addr, u64>,
    inbound_listeners: SockHash<MapData, ListenerKey>,
    counters: PerCpuArray<MapData, u64>,
    max_entries: BTreeMap<&'static str, u32>,
    /// The kubelet cgroup whose probes are exempted, if any.
    kubelet_cgroup: Option<PathBuf>,
    /// `--capture-mode iptables`: pods are captured by REDIRECT rules, not the hooks.
    iptables: Option<IptablesCapture>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MapOccupancy {
    pub name: &'static str,
    pub entries: usize,
    pub max_entries: u32,
}

impl Capture {
    /// Loads the programs, reusing pinned maps, and makes sure the agent's own
    /// cgroup is covered by sock_ops (accepted sockets inherit the listener's
    /// cgroup) and SOCK_HASH has its sk_msg program.
    pub fn load(config: &Config, agent_cgroup: &Path) -> Result<Self, CaptureError> {
        let pins = Pins::prepare(&config.pin_dir)?;
        let expected = expected_layouts();
        let mut max_entries = BTreeMap::new();
        for (name, (key, value)) in &expected {
            if let Some(found) = pins.pinned_map_layout(name)? {
                if (found.0, found.1) != (*key, *value) {
                    return Err(CaptureError::IncompatiblePin {
                        path: pins.map_path(name),
                        expected: (*key, *value),
                        found: (found.0, found.1),
                    });
                }
                max_entries.insert(*name, found.2);
            }
        }
        let s = config.map_sizes;
        let mut loader = EbpfLoader::new();
        loader
            .default_map_pin_directory(pins.maps_dir())
            .map_max_entries(names::POD_CONFIG, s.pods)
            .map_max_entries(names::POD_OWNER, s.pods)
            // Two listeners and a few addresses per pod.
            .map_max_entries(names::INBOUND_ADDRS, s.pods.saturating_mul(4))
            .map_max_entries(names::INBOUND_LISTENERS, s.pods.saturating_mul(2))
            .map_max_entries(names::PORT_RULES, s.port_rules)
            .map_max_entries(names::OUT_EXCLUDE_NETS, s.net_rules)
            .map_max_entries(names::OUT_INCLUDE_NETS, s.net_rules)
            .map_max_entries(names::ORIG_DST, s.flows)
            .map_max_entries(names::FLOW_ORIG, s.flows)
            .map_max_entries(names::SOCK_HASH, s.flows);
        let mut ebpf = loader.load(OBJECT).map_err(|e| CaptureError::Load(Box::new(e)))?;
        match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => forward_kernel_logs(logger),
            Err(e) => tracing::warn!(error = %e, "eBPF log forwarding unavailable"),
        }
        for (name, want) in [
            (names::POD_CONFIG, s.pods),
            (names::PORT_RULES, s.port_rules),
            (names::OUT_EXCLUDE_NETS, s.net_rules),
            (names::ORIG_DST, s.flows),
        ] {
            match max_entries.get(name) {
                Some(&have) if have != want => tracing::warn!(
                    map = name,
                    pinned = have,
                    configured = want,
                    "pinned map keeps its size; remove the pin directory to resize (capture is re-created)"
                ),
                _ => {}
            }
        }
        for name in names::ALL {
            max_entries.entry(name).or_insert(match name {
                names::POD_CONFIG | names::POD_OWNER => s.pods,
                names::PORT_RULES => s.port_rules,
                names::OUT_EXCLUDE_NETS | names::OUT_INCLUDE_NETS => s.net_rules,
                names::COUNTERS => counter::COUNT,
                names::INBOUND_ADDRS => s.pods.saturating_mul(4),
                names::INBOUND_LISTENERS => s.pods.saturating_mul(2),
                names::KUBELET_FLOWS => meshcap_common::default_size::KUBELET_FLOWS,
                _ => s.flows,
            });
        }
        for name in POD_HOOKS.into_iter().chain([KUBELET_HOOK]) {
            pod::load_program(&mut ebpf, name)?;
        }
        let sock_hash: SockHash<MapData, FlowKey> = take(&mut ebpf, names::SOCK_HASH)?;
        let sk_msg: &mut SkMsg = program(&mut ebpf, "splice_msg")?;
        sk_msg.load().map_err(|source| CaptureError::Program { program: "splice_msg", source: Box::new(source) })?;
        let link = sk_msg
            .attach(sock_hash.fd())
            .map_err(|source| CaptureError::Program { program: "splice_msg", source: Box::new(source) })?;
        // The attachment lives as long as the pinned map; do not detach it when
        // this process exits.
        let link = sk_msg
            .take_link(link)
            .map_err(|source| CaptureError::Program { program: "splice_msg", source: Box::new(source) })?;
        std::mem::forget(link);

        let mut capture = Self {
            pod_config: take(&mut ebpf, names::POD_CONFIG)?,
            pod_owner: take(&mut ebpf, names::POD_OWNER)?,
            port_rules: take(&mut ebpf, names::PORT_RULES)?,
            exclude_nets: take(&mut ebpf, names::OUT_EXCLUDE_NETS)?,
            include_nets: take(&mut ebpf, names::OUT_INCLUDE_NETS)?,
            inbound_addrs: take(&mut ebpf, names::INBOUND_ADDRS)?,
            inbound_listeners: take(&mut ebpf, names::INBOUND_LISTENERS)?,
            counters: take(&mut ebpf, names::COUNTERS)?,
            ebpf,
            pins,
            flags: if config.sockmap { meshcap_common::POD_SOCKMAP } else { 0 },
            outbound_port: config.outbound_port,
            inbound_port: config.inbound_port,
            max_entries,
            kubelet_cgroup: None,
            iptables: (config.capture_mode == CaptureMode::Iptables)
                .then(|| IptablesCapture::new(config.outbound_port, config.inbound_port)),
        };
        capture.cover_agent_cgroup(agent_cgroup)?;
        let mount = crate::cgroup::cgroup2_mount().map_err(|e| CaptureError::Io {
            op: "finding",
            path: "cgroup2 mount".into(),
            source: std::io::Error::other(e),
        })?;
        capture.kubelet_cgroup = capture.set_up_kubelet_exemption(&mount, &config.kubelet_cgroup, agent_cgroup)?;
        Ok(capture)
    }

    fn cover_agent_cgroup(&mut self, dir: &Path) -> Result<(), CaptureError> {
        self.cover_node_cgroup(NodeCgroup::Agent, dir, "track_sock")
    }

    /// Attaches `program` (sock_ops) to a node cgroup and pins the link, or
    /// adopts the pinned one; drops that owner's links on other cgroups.
    fn cover_node_cgroup(
        &mut self,
        owner: NodeCgroup,
        dir: &Path,
        program_name: &'static str,
    ) -> Result<(), CaptureError> {
        let cgid = crate::cgroup::cgroup_id(dir).map_err(|e| CaptureError::Io {
            op: "stat",
            path: dir.into(),
            source: std::io::Error::other(e),
        })?;
        let link_dir = self.pins.node_links_dir(owner, cgid);
        self.pins.remove_other_node_links(owner, Some(cgid))?;
        let pin = link_dir.join("sock_ops");
        if self.adopt_link(&pin, program_name) {
            tracing::info!(cgroup = %dir.display(), owner = owner.as_str(), "adopted pinned sock_ops link");
            return Ok(());
        }
        self.pins.create_dir(&link_dir)?;
        let cgroup = File::open(dir).map_err(|source| CaptureError::Io { op: "open", path: dir.into(), source })?;
        let prog: &mut SockOps = program(&mut self.ebpf, program_name)?;
        let attach = |source| CaptureError::Attach {
            pod: format!("meshcap {}", owner.as_str()),
            hook: program_name,
            cgroup: dir.into(),
            source: Box::new(source),
        };
        // bpf_link attachments to cgroups take no flags; they always coexist with others.
        let id = prog.attach(&cgroup, CgroupAttachMode::Single).map_err(attach)?;
        let link = prog.take_link(id).map_err(attach)?;
        let fd: aya::programs::links::FdLink = link.try_into().map_err(|source| CaptureError::Link {
            pod: format!("meshcap {}", owner.as_str()),
            hook: program_name,
            source,
        })?;
        fd.pin(&pin).map_err(|source| CaptureError::PinLink { path: pin.clone(), source })?;
        Ok(())
    }

    /// Adopts a pinned link: it keeps its attachment (no second link, no
    /// moment without the hook) and from now on runs this agent's program,
    /// so an upgraded agent reaches pods enrolled by its predecessor. False
    /// when there is no usable pin.
    fn adopt_link(&self, pin: &Path, program: &'static str) -> bool {
        let Ok(link) = sys::obj_get(pin) else { return false };
        let Some(Ok(prog)) = self.ebpf.program(program).map(|p| p.fd()) else { return false };
        match sys::link_update(std::os::fd::AsFd::as_fd(&link), std::os::fd::AsFd::as_fd(prog)) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(pin = %pin.display(), error = %e, "pinned link cannot take the new program; re-attaching");
                false
            }
        }
    }

    pub fn kubelet_cgroup(&self) -> Option<&Path> {
        self.kubelet_cgroup.as_deref()
    }

    pub fn pins(&self) -> &Pins {
        &self.pins
    }

    /// Kernel-side counters summed over CPUs, by name.
    pub fn counters(&self) -> BTreeMap<&'static str, u64> {
        (0..counter::COUNT)
            .map(|i| {
                let sum = self.counters.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0);
                (counter::NAMES[i as usize], sum)
            })
            .collect()
    }

    /// Entries in use per map (walks the keys: for status, not hot paths).
    pub fn occupancy(&self) -> Vec<MapOccupancy> {
        let count =
            |name: &str| -> usize { MapData::from_pin(self.pins.map_path(name)).map(|m| count_keys(&m)).unwrap_or(0) };
        names::ALL
            .iter()
            .filter(|n| **n != names::COUNTERS)
            .map(|n| MapOccupancy { name: n, entries: count(n), max_entries: self.max_entries[n] })
            .collect()
    }
}

/// Kernel-side log records (only the hooks' error paths log) go to tracing
/// through the `log` bridge.
fn forward_kernel_logs<L: log::Log + Send + 'static>(logger: aya_log::EbpfLogger<L>) {
    // SAFETY: the logger owns its ring buffer fd and never replaces or closes
    // it while the AsyncFd holds it.
    let registered = unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let Ok(mut fd) = registered else {
        tracing::warn!("eBPF log forwarding unavailable: cannot poll its ring buffer");
        return;
    };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else { return };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

/// Opens FLOW_ORIG from its pin: each pod's accept loop owns a handle, so
/// looking up a flow takes no lock shared with other pods.
pub fn open_flow_table(pins: &Pins) -> Result<HashMap<MapData, FlowKey, OrigDst>, CaptureError> {
    let data = MapData::from_pin(pins.map_path(names::FLOW_ORIG))
        .map_err(|source| CaptureError::Map { map: names::FLOW_ORIG, source })?;
    HashMap::try_from(Map::LruHashMap(data)).map_err(|source| CaptureError::Map { map: names::FLOW_ORIG, source })
}

fn count_keys(map: &MapData) -> usize {
    let Ok(info) = map.info() else { return 0 };
    // Generic key walk with the raw syscall: the map's Rust types do not matter here.
    let key_size = info.key_size() as usize;
    let fd = std::os::fd::AsFd::as_fd(map.fd());
    let mut n = 0usize;
    let mut key = vec![0u8; key_size];
    let mut next = vec![0u8; key_size];
    let mut first = true;
    loop {
        let rc = sys::map_get_next_key(fd, if first { None } else { Some(&key) }, &mut next);
        if !rc {
            break;
        }
        first = false;
        n += 1;
        std::mem::swap(&mut key, &mut next);
        if n > 10_000_000 {
            break;
        }
    }
    n
}

fn expected_layouts() -> Vec<(&'static str, (u32, u32))> {
    use std::mem::size_of;
    let lpm = (4 + size_of::<NetKey>() as u32, 1);
    vec![
        (names::POD_CONFIG, (8, size_of::<PodConfig>() as u32)),
        (names::POD_OWNER, (8, size_of::<PodOwner>() as u32)),
        (names::PORT_RULES, (size_of::<PortKey>() as u32, 1)),
        (names::OUT_EXCLUDE_NETS, lpm),
        (names::OUT_INCLUDE_NETS, lpm),
        (names::ORIG_DST, (8, size_of::<OrigDst>() as u32)),
        (names::FLOW_ORIG, (size_of::<FlowKey>() as u32, size_of::<OrigDst>() as u32)),
        (names::SOCK_HASH, (size_of::<FlowKey>() as u32, 4)),
        (names::COUNTERS, (4, 8)),
        (names::INBOUND_ADDRS, (16, 8)),
        (names::INBOUND_LISTENERS, (size_of::<ListenerKey>() as u32, 4)),
        (names::KUBELET_FLOWS, (size_of::<FlowKey>() as u32, 1)),
    ]
}

fn take<T: TryFrom<Map, Error = aya::maps::MapError>>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, CaptureError> {
    let map = ebpf.take_map(name).ok_or(CaptureError::Map { map: name, source: aya::maps::MapError::KeyNotFound })?;
    T::try_from(map).map_err(|source| CaptureError::Map { map: name, source })
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, CaptureError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or_else(|| CaptureError::Program {
        program: name,
        source: Box::new(aya::programs::ProgramError::UnexpectedProgramType),
    })?;
    prog.try_into().map_err(|source| CaptureError::Program { program: name, source: Box::new(source) })
}
