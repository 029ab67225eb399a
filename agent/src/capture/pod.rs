//! Per-pod capture: config and rule map entries, and the pinned cgroup links.

use std::{collections::HashSet, fs::File, net::IpAddr, os::fd::RawFd, path::Path};

use aya::{
    maps::lpm_trie::{Key, LpmTrie},
    maps::MapData,
    programs::{links::FdLink, CgroupAttachMode, CgroupSockAddr, SkLookup, SockOps},
    Ebpf,
};
use ipnet::IpNet;
use meshcap_common::{
    names, net_prefix_v4, net_prefix_v6, v4_mapped, Addr, ListenerKey, NetKey, PodConfig, PodOwner, PortKey,
    DIRECTION_INBOUND, DIRECTION_OUTBOUND, POD_CAPTURE_INBOUND, POD_CAPTURE_OUTBOUND, POD_INCLUDE_ALL_INBOUND,
    POD_INCLUDE_ALL_OUTBOUND, PORT_EXCLUDED, PORT_INCLUDED,
};

use super::{program, Capture, CaptureError, Pins};
use crate::{
    engine::to_addr,
    policy::{InboundRules, IncludeNets, OutboundRules},
};

/// What capture needs to know to enroll one pod.
#[derive(Debug, Clone)]
pub struct PodCapture<'a> {
    /// `namespace/name`, for errors.
    pub pod: String,
    pub uid: &'a str,
    pub cgroup: &'a Path,
    pub cgroup_id: u64,
    pub netns_cookie: u64,
    /// The pod's network namespace (sk_lookup attaches there).
    pub netns: &'a Path,
    pub ips: &'a [IpAddr],
    pub outbound: &'a OutboundRules,
    pub inbound: &'a InboundRules,
    /// The engine's inbound listeners in the pod: (address family, fd).
    pub listeners: &'a [(u32, RawFd)],
}

pub(super) fn load_program(ebpf: &mut Ebpf, name: &'static str) -> Result<(), CaptureError> {
    let err = |source| CaptureError::Program { program: name, source: Box::new(source) };
    if name == "track_sock" || name == super::KUBELET_HOOK {
        let p: &mut SockOps = program(ebpf, name)?;
        p.load().map_err(err)
    } else if name == super::NETNS_HOOK {
        let p: &mut SkLookup = program(ebpf, name)?;
        p.load().map_err(err)
    } else {
        let p: &mut CgroupSockAddr = program(ebpf, name)?;
        p.load().map_err(err)
    }
}

fn is_full(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::SyscallError(s) => {
            matches!(s.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC | libc::ENOMEM))
        }
        _ => false,
    }
}

impl Capture {
    /// Writes the pod's map entries, then attaches (or adopts) its links.
    /// On any error nothing of the pod is left behind.
    pub fn enroll(&mut self, pod: &PodCapture<'_>) -> Result<Vec<String>, CaptureError> {
        if let Some(iptables) = &mut self.iptables {
            return Ok(iptables.enroll(pod)?);
        }
        if let Err(e) = self.write_entries(pod) {
            self.remove_entries(pod.netns_cookie);
            return Err(e);
        }
        match self.attach_links(pod) {
            Ok(hooks) => Ok(hooks),
            Err(e) => {
                let _ = self.pins.remove_links(&self.pins.pod_links_dir(pod.uid, pod.cgroup_id));
                self.remove_entries(pod.netns_cookie);
                Err(e)
            }
        }
    }

    /// Rewrites a pod's rules in place (annotations or IPs changed).
    pub fn reconfigure(&mut self, pod: &PodCapture<'_>) -> Result<(), CaptureError> {
        if let Some(iptables) = &mut self.iptables {
            return Ok(iptables.enroll(pod).map(drop)?);
        }
        self.write_entries(pod)
    }

    /// Detaches the pod's links first (so no hook sees a half-removed pod),
    /// then drops its map entries.
    pub fn unenroll(&mut self, uid: &str, netns_cookie: Option<u64>) -> Result<(), CaptureError> {
        if let Some(iptables) = &mut self.iptables {
            iptables.unenroll(uid);
        }
        for pinned in self.pins.pinned_pods().into_iter().filter(|p| p.uid == uid) {
            self.pins.remove_links(&pinned.dir)?;
        }
        if let Some(cookie) = netns_cookie {
            self.remove_entries(cookie);
        }
        let owned: Vec<u64> = self.owned_cookies().into_iter().filter(|(_, u)| u == uid).map(|(c, _)| c).collect();
        for cookie in owned {
            self.remove_entries(cookie);
        }
        Ok(())
    }

    /// After a restart: removes pins and entries of pods that are no longer
    /// enrolled (deleted or relabelled while the agent was down).
    pub fn collect_garbage(&mut self, live: &HashSet<String>) -> Vec<String> {
        let mut removed = Vec::new();
        for pinned in self.pins.pinned_pods() {
            if !live.contains(&pinned.uid) && self.pins.remove_links(&pinned.dir).is_ok() {
                removed.push(pinned.uid.clone());
            }
        }
        for (cookie, uid) in self.owned_cookies() {
            if !live.contains(&uid) {
                self.remove_entries(cookie);
                if !removed.contains(&uid) {
                    removed.push(uid);
                }
            }
        }
        removed
    }

    fn owned_cookies(&self) -> Vec<(u64, String)> {
        self.pod_owner
            .iter()
            .filter_map(Result::ok)
            .map(|(cookie, owner)| {
                let end = owner.uid.iter().position(|b| *b == 0).unwrap_or(owner.uid.len());
                (cookie, String::from_utf8_lossy(&owner.uid[..end]).into_owned())
            })
            .collect()
    }

    fn write_entries(&mut self, pod: &PodCapture<'_>) -> Result<(), CaptureError> {
        let cookie = pod.netns_cookie;
        // The same pod in a new netns (sandbox recreated): drop the old one.
        for (old, uid) in self.owned_cookies() {
            if uid == pod.uid && old != cookie {
                self.remove_entries(old);
            }
        }
        let mut owner = PodOwner { uid: [0; 48] };
        owner.uid[..pod.uid.len().min(47)].copy_from_slice(&pod.uid.as_bytes()[..pod.uid.len().min(47)]);
        let sizes = self.max_entries.clone();
        let full = |map: &'static str, flag: &'static str| CaptureError::MapFull {
            pod: pod.pod.clone(),
            map,
            max_entries: sizes[map],
            flag,
        };
        let map_err = |map: &'static str, flag: &'static str| {
            move |e: aya::maps::MapError| {
                if is_full(&e) {
                    full(map, flag)
                } else {
                    CaptureError::Map { map, source: e }
                }
            }
        };
        self.pod_owner.insert(cookie, owner, 0).map_err(map_err(names::POD_OWNER, "max-pods"))?;
        let mut flags = POD_CAPTURE_OUTBOUND | POD_CAPTURE_INBOUND | self.flags;
        if pod.outbound.include_nets == IncludeNets::All {
            flags |= POD_INCLUDE_ALL_OUTBOUND;
        }
        let mut port_rules: Vec<(u16, u8, u8)> =
            pod.outbound.exclude_ports.iter().map(|p| (*p, DIRECTION_OUTBOUND, PORT_EXCLUDED)).collect();
        match pod.inbound {
            InboundRules::AllExcept(ports) => {
                flags |= POD_INCLUDE_ALL_INBOUND;
                port_rules.extend(ports.iter().map(|p| (*p, DIRECTION_INBOUND, PORT_EXCLUDED)));
            }
            InboundRules::Only(ports) => {
                port_rules.extend(ports.iter().map(|p| (*p, DIRECTION_INBOUND, PORT_INCLUDED)))
            }
        }
        let cfg = PodConfig { flags, outbound_port: self.outbound_port, inbound_port: self.inbound_port };
        let ports: Vec<(PortKey, u8)> = port_rules
            .into_iter()
            .map(|(port, direction, rule)| (PortKey { netns_cookie: cookie, port, direction, _pad: [0; 5] }, rule))
            .collect();
        let addrs: Vec<Addr> = pod.ips.iter().map(|ip| to_addr(*ip)).collect();
        let exclude: Vec<Key<NetKey>> = pod.outbound.exclude_nets.iter().map(|n| net_key(cookie, n)).collect();
        let include: Vec<Key<NetKey>> = match &pod.outbound.include_nets {
            IncludeNets::Only(nets) => nets.iter().map(|n| net_key(cookie, n)).collect(),
            IncludeNets::All => Vec::new(),
        };
        // New entries first, stale ones after: a pod whose rules change never
        // passes through a moment with no rules at all.
        for (key, rule) in &ports {
            self.port_rules.insert(key, rule, 0).map_err(map_err(names::PORT_RULES, "max-port-rules"))?;
        }
        for (family, fd) in pod.listeners {
            let key = ListenerKey { netns_cookie: cookie, family: *family, _pad: 0 };
            self.inbound_listeners.insert(key, *fd, 0).map_err(map_err(names::INBOUND_LISTENERS, "max-pods"))?;
        }
        for addr in &addrs {
            self.inbound_addrs.insert(addr, cookie, 0).map_err(map_err(names::INBOUND_ADDRS, "max-pods"))?;
        }
        for key in &exclude {
            self.exclude_nets.insert(key, 1, 0).map_err(map_err(names::OUT_EXCLUDE_NETS, "max-net-rules"))?;
        }
        for key in &include {
            self.include_nets.insert(key, 1, 0).map_err(map_err(names::OUT_INCLUDE_NETS, "max-net-rules"))?;
        }
        // Config after the rules: the hooks act on a pod only once its rules are complete.
        self.pod_config.insert(cookie, cfg, 0).map_err(map_err(names::POD_CONFIG, "max-pods"))?;

        let stale_ports: Vec<PortKey> = self
            .port_rules
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.netns_cookie == cookie && !ports.iter().any(|(p, _)| p == k))
            .collect();
        for k in stale_ports {
            let _ = self.port_rules.remove(&k);
        }
        let stale_addrs: Vec<Addr> = self
            .inbound_addrs
            .iter()
            .filter_map(Result::ok)
            .filter(|(a, c)| *c == cookie && !addrs.contains(a))
            .map(|(a, _)| a)
            .collect();
        for a in stale_addrs {
            let _ = self.inbound_addrs.remove(&a);
        }
        prune_trie(&mut self.exclude_nets, cookie, &exclude);
        prune_trie(&mut self.include_nets, cookie, &include);
        Ok(())
    }

    fn remove_rules(&mut self, cookie: u64) {
        let ports: Vec<PortKey> =
            self.port_rules.keys().filter_map(Result::ok).filter(|k| k.netns_cookie == cookie).collect();
        for k in ports {
            let _ = self.port_rules.remove(&k);
        }
        for trie in [&mut self.exclude_nets, &mut self.include_nets] {
            remove_trie_entries(trie, cookie);
        }
        // Only this pod's addresses: a new pod may already hold one of its IPs.
        let addrs: Vec<_> =
            self.inbound_addrs.iter().filter_map(Result::ok).filter(|(_, c)| *c == cookie).map(|(a, _)| a).collect();
        for addr in addrs {
            let _ = self.inbound_addrs.remove(&addr);
        }
    }

    fn remove_entries(&mut self, cookie: u64) {
        let _ = self.pod_config.remove(&cookie);
        self.remove_rules(cookie);
        for family in [libc::AF_INET as u32, libc::AF_INET6 as u32] {
            let _ = self.inbound_listeners.remove(&ListenerKey { netns_cookie: cookie, family, _pad: 0 });
        }
        let _ = self.pod_owner.remove(&cookie);
    }

    fn attach_links(&mut self, pod: &PodCapture<'_>) -> Result<Vec<String>, CaptureError> {
        // Links pinned for an earlier cgroup of this pod are stale.
        for pinned in self.pins.pinned_pods() {
            if pinned.uid == pod.uid && pinned.cgroup_id != pod.cgroup_id {
                self.pins.remove_links(&pinned.dir)?;
            }
        }
        let dir = self.pins.pod_links_dir(pod.uid, pod.cgroup_id);
        self.pins.create_dir(&dir)?;
        let mut cgroup_fd = None;
        self.attach_netns_hook(pod, &dir)?;
        for hook in super::CGROUP_HOOKS {
            let pin = dir.join(hook);
            if self.adopt_link(&pin, hook) {
                continue;
            }
            let _ = std::fs::remove_file(&pin);
            let cgroup = match &cgroup_fd {
                Some(fd) => fd,
                None => cgroup_fd.insert(File::open(pod.cgroup).map_err(|source| CaptureError::Io {
                    op: "opening cgroup",
                    path: pod.cgroup.into(),
                    source,
                })?),
            };
            let attach = |source| CaptureError::Attach {
                pod: pod.pod.clone(),
                hook,
                cgroup: pod.cgroup.into(),
                source: Box::new(source),
            };
            let link_err = |source| CaptureError::Link { pod: pod.pod.clone(), hook, source };
            let link: FdLink = if hook == "track_sock" {
                let p: &mut SockOps = program(&mut self.ebpf, hook)?;
                let id = p.attach(cgroup, CgroupAttachMode::Single).map_err(attach)?;
                p.take_link(id).map_err(attach)?.try_into().map_err(link_err)?
            } else {
                let p: &mut CgroupSockAddr = program(&mut self.ebpf, hook)?;
                let id = p.attach(cgroup, CgroupAttachMode::Single).map_err(attach)?;
                p.take_link(id).map_err(attach)?.try_into().map_err(link_err)?
            };
            link.pin(&pin).map_err(|source| CaptureError::PinLink { path: pin.clone(), source })?;
        }
        Ok(Pins::hooks_in(&dir))
    }
}

impl Capture {
    /// sk_lookup on the pod's netns, pinned beside its cgroup links.
    fn attach_netns_hook(&mut self, pod: &PodCapture<'_>, dir: &Path) -> Result<(), CaptureError> {
        let hook = super::NETNS_HOOK;
        let pin = dir.join(hook);
        if self.adopt_link(&pin, hook) {
            return Ok(());
        }
        let _ = std::fs::remove_file(&pin);
        let netns = File::open(pod.netns).map_err(|source| CaptureError::Io {
            op: "opening netns",
            path: pod.netns.into(),
            source,
        })?;
        let attach = |source| CaptureError::Attach {
            pod: pod.pod.clone(),
            hook,
            cgroup: pod.netns.into(),
            source: Box::new(source),
        };
        let p: &mut SkLookup = program(&mut self.ebpf, hook)?;
        let id = p.attach(netns).map_err(attach)?;
        let link: FdLink = p.take_link(id).map_err(attach)?.into();
        link.pin(&pin).map_err(|source| CaptureError::PinLink { path: pin.clone(), source })?;
        Ok(())
    }
}

fn net_key(cookie: u64, net: &IpNet) -> Key<NetKey> {
    match net {
        IpNet::V4(n) => Key::new(
            net_prefix_v4(n.prefix_len()),
            NetKey {
                netns_cookie: cookie,
                addr: meshcap_common::addr_octets(&v4_mapped(u32::from_ne_bytes(n.network().octets()))),
            },
        ),
        IpNet::V6(n) => {
            Key::new(net_prefix_v6(n.prefix_len()), NetKey { netns_cookie: cookie, addr: n.network().octets() })
        }
    }
}

/// Removes the pod's entries that are not in `keep`.
fn prune_trie(trie: &mut LpmTrie<MapData, NetKey, u8>, cookie: u64, keep: &[Key<NetKey>]) {
    let same = |a: &Key<NetKey>, b: &Key<NetKey>| a.prefix_len() == b.prefix_len() && a.data() == b.data();
    let stale: Vec<Key<NetKey>> = trie
        .keys()
        .filter_map(Result::ok)
        .filter(|k| k.data().netns_cookie == cookie && !keep.iter().any(|w| same(w, k)))
        .collect();
    for k in stale {
        let _ = trie.remove(&k);
    }
}

fn remove_trie_entries(trie: &mut LpmTrie<MapData, NetKey, u8>, cookie: u64) {
    let keys: Vec<Key<NetKey>> =
        trie.keys().filter_map(Result::ok).filter(|k| k.data().netns_cookie == cookie).collect();
    for k in keys {
        let _ = trie.remove(&k);
    }
}
