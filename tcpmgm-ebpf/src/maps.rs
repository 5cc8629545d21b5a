//! The maps.
//!
//! A rule set is a generation of policy maps, each sized to its contents by the loader. The
//! programs reach them through one array of maps per kind, at slot `generation % 2`, and
//! `TCPMGM_CURRENT` says which generation is in force: writing it switches every hook to a new
//! rule set in one step, with no program reloaded. Each kind is also declared on its own
//! (`TCPMGM_PROFILES`, ...): the loader makes each generation's maps from those declarations, so
//! they carry BTF for bpftool, and they are the template the arrays of maps check them against.
//!
//! `TCPMGM_SOCKETS`, the rule statistics and the log ring buffer are shared by every
//! generation and every run (pinned).
use aya_ebpf::{
    bindings::{BPF_F_INNER_MAP, BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    btf_maps::{
        Array, ArrayOfMaps, HashMap, LpmTrie, PerCpuArray, PerCpuHashMap, RingBuf, SkStorage,
    },
    macros::btf_map,
};
use tcpmgm_common::{
    Addr4, Addr6, Bucket, BucketKey, Event, Header, ListNode, ListenerInfo, ListenerKey, LocalKey4,
    LocalKey6, LogBudget, Outcomes, Profile, RULE_STATS_MAX, RankEntry, RuleStats, SockPolicy,
};

/// Arrays as inner maps: without BPF_F_INNER_MAP every generation would need the template's
/// size (Linux 5.10 relaxed this for the other map types).
const INNER: usize = BPF_F_INNER_MAP as usize;

pub type HeaderMap = Array<Header, 1, INNER>;
pub type ListMap = Array<ListNode, 1, INNER>;
pub type ProfileMap = Array<Profile, 1, INNER>;
/// The loader writes a generation's ranks, a table's length of them, through a mapping of the
/// map (one copy, where a batch update copies and checks each entry).
pub type RankMap = Array<RankEntry, 1, { INNER | BPF_F_MMAPABLE as usize }>;
pub type BucketMap = HashMap<BucketKey, Bucket, 1>;
pub type ListenerMap = HashMap<ListenerKey, ListenerInfo, 1>;
/// The remote prefixes, each to its list id.
pub type Host4Map = HashMap<Addr4, u32, 1>;
pub type Host6Map = HashMap<Addr6, u32, 1>;
pub type Remote4Map = LpmTrie<Addr4, u32, 1>;
pub type Remote6Map = LpmTrie<Addr6, u32, 1>;
pub type Local4Map = LpmTrie<LocalKey4, u32, 1>;
pub type Local6Map = LpmTrie<LocalKey6, u32, 1>;

/// One kind of policy map: its declaration (the template) and the array of maps the programs
/// look each generation's map up in.
macro_rules! policy_map {
    ($(#[$doc:meta])* $template:ident, $outer:ident: $ty:ty) => {
        $(#[$doc])*
        #[btf_map]
        #[allow(dead_code, reason = "the loader makes each generation's map from it")]
        pub static $template: $ty = <$ty>::new();

        #[btf_map]
        pub static $outer: ArrayOfMaps<$ty, 2> = ArrayOfMaps::new();
    };
}

policy_map!(
    /// The generation's number and facts about the whole rule set (one entry).
    TCPMGM_HEADER, TCPMGM_GEN_HEADER: HeaderMap
);
policy_map!(
    /// The lists' nodes, by list id.
    TCPMGM_LISTS, TCPMGM_GEN_LISTS: ListMap
);
policy_map!(
    /// The distinct profiles, which rules share.
    TCPMGM_PROFILES, TCPMGM_GEN_PROFILES: ProfileMap
);
policy_map!(
    /// Each rule by rank (position in match order): its id and its profile's index.
    TCPMGM_RANKS, TCPMGM_GEN_RANKS: RankMap
);
policy_map!(TCPMGM_BUCKETS, TCPMGM_GEN_BUCKETS: BucketMap);
policy_map!(TCPMGM_LISTENERS, TCPMGM_GEN_LISTENERS: ListenerMap);
policy_map!(
    /// The /32 and /128 remote prefixes, looked up by exact address before the tries.
    TCPMGM_HOST_V4, TCPMGM_GEN_HOST_V4: Host4Map
);
policy_map!(TCPMGM_HOST_V6, TCPMGM_GEN_HOST_V6: Host6Map);
policy_map!(TCPMGM_REMOTE_V4, TCPMGM_GEN_REMOTE_V4: Remote4Map);
policy_map!(TCPMGM_REMOTE_V6, TCPMGM_GEN_REMOTE_V6: Remote6Map);
policy_map!(TCPMGM_LOCAL_V4, TCPMGM_GEN_LOCAL_V4: Local4Map);
policy_map!(TCPMGM_LOCAL_V6, TCPMGM_GEN_LOCAL_V6: Local6Map);

/// The generation in force (0: none yet).
#[btf_map]
pub static TCPMGM_CURRENT: Array<u32, 1> = Array::new();

/// What each rule did, by rule id, per CPU; entries are made as rules first act, so memory grows
/// with the rules that do.
#[btf_map]
pub static TCPMGM_RULE_STATS: PerCpuHashMap<
    u32,
    RuleStats,
    RULE_STATS_MAX,
    { BPF_F_NO_PREALLOC as usize },
> = PerCpuHashMap::new();

#[btf_map]
pub static TCPMGM_LOG_BUDGET: PerCpuArray<LogBudget, 1> = PerCpuArray::new();

#[btf_map]
pub static TCPMGM_SOCKETS: SkStorage<SockPolicy> = SkStorage::new();

/// How each rule's connections ended, by rule id: one entry a rule (not per CPU: ends are rare
/// next to decisions), added to atomically.
#[btf_map]
pub static TCPMGM_OUTCOMES: HashMap<u32, Outcomes, RULE_STATS_MAX, { BPF_F_NO_PREALLOC as usize }> =
    HashMap::new();

/// When each governed connection started (connect() or its acceptance), in ns of the
/// monotonic clock.
#[btf_map]
pub static TCPMGM_STARTS: SkStorage<u64> = SkStorage::new();

/// The cookies of the sockets the con_lifetime sweeper is destroying (written by the daemon).
#[btf_map]
pub static TCPMGM_CLOSING: HashMap<u64, u32, { tcpmgm_common::CLOSING_MAX as usize }> =
    HashMap::new();

/// The event stream: 256 KiB, about 3,600 events the daemon has not read yet.
#[btf_map]
pub static TCPMGM_EVENTS: RingBuf<Event, { 256 * 1024 }> = RingBuf::new();

#[btf_map]
pub static TCPMGM_EVENT_BUDGET: PerCpuArray<LogBudget, 1> = PerCpuArray::new();

/// Events not written: over the budget, or the ring buffer full.
#[btf_map]
pub static TCPMGM_EVENT_DROPS: PerCpuArray<u64, 1> = PerCpuArray::new();
