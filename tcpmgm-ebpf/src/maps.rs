//! The maps. The policy maps are made anew for every rule set and sized to it by the loader (the
//! sizes here are placeholders); `TCPMGM_SOCKETS` is shared by every generation of the programs.
use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruPerCpuHashMap, PerCpuArray, SkStorage},
    macros::btf_map,
};
use tcpmgm_common::{
    Addr4, Addr6, Bucket, BucketKey, ListRef, ListenerInfo, ListenerKey, LocalKey4, LocalKey6,
    LogBudget, Profile, RuleCounters, Settings, SockPolicy,
};

#[btf_map]
pub static TCPMGM_REMOTE_V4: LpmTrie<Addr4, ListRef, 1> = LpmTrie::new();

#[btf_map]
pub static TCPMGM_REMOTE_V6: LpmTrie<Addr6, ListRef, 1> = LpmTrie::new();

/// The /32 and /128 remote prefixes, looked up by exact address before the tries.
#[btf_map]
pub static TCPMGM_HOST_V4: HashMap<Addr4, ListRef, 1> = HashMap::new();

#[btf_map]
pub static TCPMGM_HOST_V6: HashMap<Addr6, ListRef, 1> = HashMap::new();

/// [IPv4 root, IPv6 root]: the lists of rules whose remote side is any (or /0).
#[btf_map]
pub static TCPMGM_ROOTS: Array<ListRef, 2> = Array::new();

#[btf_map]
pub static TCPMGM_BUCKETS: HashMap<BucketKey, Bucket, 1> = HashMap::new();

#[btf_map]
pub static TCPMGM_LOCAL_V4: LpmTrie<LocalKey4, u32, 1> = LpmTrie::new();

#[btf_map]
pub static TCPMGM_LOCAL_V6: LpmTrie<LocalKey6, u32, 1> = LpmTrie::new();

/// Profiles by rank (position in match order).
#[btf_map]
pub static TCPMGM_PROFILES: Array<Profile, 1> = Array::new();

#[btf_map]
pub static TCPMGM_LISTENERS: HashMap<ListenerKey, ListenerInfo, 1> = HashMap::new();

/// Per rank, per CPU.
#[btf_map]
pub static TCPMGM_COUNTERS: PerCpuArray<RuleCounters, 1> = PerCpuArray::new();

/// Sends slower than send_threshold, by rule id.
#[btf_map]
pub static TCPMGM_SLOW: LruPerCpuHashMap<u32, u64, 65536> = LruPerCpuHashMap::new();

#[btf_map]
pub static TCPMGM_LOG_BUDGET: PerCpuArray<LogBudget, 1> = PerCpuArray::new();

#[btf_map]
pub static TCPMGM_SETTINGS: Array<Settings, 1> = Array::new();

#[btf_map]
pub static TCPMGM_SOCKETS: SkStorage<SockPolicy> = SkStorage::new();
