//! The maps, all pinned by name under the agent's pin directory so capture
//! survives agent restarts. Sizes here are defaults; the agent sets the real
//! ones at load time.

use aya_ebpf::{
    macros::map,
    maps::{lpm_trie::Key, HashMap, LpmTrie, LruHashMap, PerCpuArray, SockHash},
};
use meshcap_common::{
    counter, default_size, Addr, FlowKey, ListenerKey, NetKey, OrigDst, PodConfig, PodOwner, PortKey,
};

#[map]
pub static POD_CONFIG: HashMap<u64, PodConfig> = HashMap::pinned(default_size::PODS, 0);

/// Read only by the agent; declared here so it is created and pinned with the rest.
#[map]
pub static POD_OWNER: HashMap<u64, PodOwner> = HashMap::pinned(default_size::PODS, 0);

#[map]
pub static PORT_RULES: HashMap<PortKey, u8> = HashMap::pinned(default_size::PORT_RULES, 0);

#[map]
pub static OUT_EXCLUDE_NETS: LpmTrie<NetKey, u8> = LpmTrie::pinned(default_size::NETS, 0);

#[map]
pub static OUT_INCLUDE_NETS: LpmTrie<NetKey, u8> = LpmTrie::pinned(default_size::NETS, 0);

/// Original destination by the app socket's cookie (for getpeername).
/// LRU: a socket that never closes cleanly cannot exhaust it.
#[map]
pub static ORIG_DST: LruHashMap<u64, OrigDst> = LruHashMap::pinned(default_size::FLOWS, 0);

/// Original destination by the 4-tuple the engine sees after accept().
#[map]
pub static FLOW_ORIG: LruHashMap<FlowKey, OrigDst> = LruHashMap::pinned(default_size::FLOWS, 0);

/// Local app↔engine connection ends for sk_msg splicing; the kernel removes
/// a socket from it when the socket closes.
#[map]
pub static SOCK_HASH: SockHash<FlowKey> = SockHash::pinned(default_size::FLOWS, 0);

/// Pod IP (IPv4-mapped for IPv4) → the pod's netns cookie, for sk_lookup,
/// which sees addresses but not which pod it runs for.
#[map]
pub static INBOUND_ADDRS: HashMap<Addr, u64> = HashMap::pinned(default_size::PODS, 0);

/// Each enrolled pod's inbound listeners, by (netns cookie, family).
#[map]
pub static INBOUND_LISTENERS: SockHash<ListenerKey> = SockHash::pinned(default_size::PODS, 0);

/// Connections the kubelet is opening to enrolled pods (its probes), keyed as
/// the pod's netns will see them, so sk_lookup can let exactly those through.
#[map]
pub static KUBELET_FLOWS: LruHashMap<FlowKey, u8> = LruHashMap::pinned(default_size::KUBELET_FLOWS, 0);

#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(counter::COUNT, 0);

#[inline(always)]
pub fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // Per-CPU slot: no other writer can race this increment.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
pub fn net_key(netns_cookie: u64, addr: &meshcap_common::Addr) -> Key<NetKey> {
    Key::new(meshcap_common::NET_PREFIX_HOST, NetKey { netns_cookie, addr: meshcap_common::addr_octets(addr) })
}
