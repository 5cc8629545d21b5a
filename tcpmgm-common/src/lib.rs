//! Map layouts and constants shared by the eBPF programs and the loader.
//!
//! Everything here is `#[repr(C)]` plain data: the loader writes it into the kernel maps and the
//! programs read it back. Addresses are kept as the kernel hands them to BPF programs: `[u32; 4]`
//! words in network byte order (an IPv4 address is word 0, the rest zero). Ports are host order.
#![no_std]

pub mod abi;
#[cfg(feature = "client")]
pub mod client;
pub mod decide;
pub mod options;

pub use abi::{
    Attr, MAX_ATTR_KEY, MAX_ATTRS, Profile, SOCK_NO_RULE, SOCK_RECORD_VERSION, SOCK_RULE,
    SOCK_UNDECIDED, SOCKETS_PIN, SockPolicy, flags, marks,
};

/// Names of the maps and programs in the eBPF object, as the loader looks them up.
pub mod names {
    pub const REMOTE_V4: &str = "TCPMGM_REMOTE_V4";
    pub const REMOTE_V6: &str = "TCPMGM_REMOTE_V6";
    /// Full-length remote prefixes (/32, /128), by exact address: one hash lookup, whatever the
    /// number of peers, before the trie of the shorter prefixes.
    pub const HOST_V4: &str = "TCPMGM_HOST_V4";
    pub const HOST_V6: &str = "TCPMGM_HOST_V6";
    /// The generation's number, its facts and its root lists (one entry).
    pub const HEADER: &str = "TCPMGM_HEADER";
    /// The lists' nodes, by list id.
    pub const LISTS: &str = "TCPMGM_LISTS";
    pub const BUCKETS: &str = "TCPMGM_BUCKETS";
    pub const LOCAL_V4: &str = "TCPMGM_LOCAL_V4";
    pub const LOCAL_V6: &str = "TCPMGM_LOCAL_V6";
    /// The distinct profiles of the rule set (rules with the same profile share one).
    pub const PROFILES: &str = "TCPMGM_PROFILES";
    /// Each rule, by rank: its id and the index of its profile in `PROFILES`.
    pub const RANKS: &str = "TCPMGM_RANKS";
    pub const LISTENERS: &str = "TCPMGM_LISTENERS";
    /// The generation in force.
    pub const CURRENT: &str = "TCPMGM_CURRENT";
    /// What each rule did, by rule id, per CPU; shared by every generation and every run
    /// (pinned as `RULE_STATS_PIN`), so its counters only grow.
    pub const RULE_STATS: &str = "TCPMGM_RULE_STATS";
    /// Per-socket decisions; shared by every generation of the programs.
    pub const SOCKETS: &str = "TCPMGM_SOCKETS";
    /// The event stream (`tcpmgm events`, pinned as `EVENTS_PIN`) and its drops.
    pub const EVENTS: &str = "TCPMGM_EVENTS";
    pub const EVENT_DROPS: &str = "TCPMGM_EVENT_DROPS";
    /// How each rule's connections ended (pinned as `OUTCOMES_PIN`).
    pub const OUTCOMES: &str = "TCPMGM_OUTCOMES";
    /// When each governed connection started (socket storage).
    pub const STARTS: &str = "TCPMGM_STARTS";
    /// Cookies of the sockets the con_lifetime sweeper is closing, so that their end is told
    /// as con_lifetime's (pinned as `CLOSING_PIN`).
    pub const CLOSING: &str = "TCPMGM_CLOSING";
    /// The outcome tracers (see `settings::TRACED`): a reset received, close(), a destroy.
    pub const END_RESET: &str = "tcpmgm_rst";
    pub const END_CLOSE: &str = "tcpmgm_close";
    pub const END_ABORT: &str = "tcpmgm_abort";
    pub const SOCK_OPS: &str = "tcpmgm_sock_ops";
    pub const CONNECT4: &str = "tcpmgm_connect4";
    pub const CONNECT6: &str = "tcpmgm_connect6";
    /// Program names stay within the kernel's 15 characters, which older bpftool prints.
    pub const SETSOCKOPT: &str = "tcpmgm_sockopt";
    /// The policy maps, made anew for every rule set, in the order the loader writes them, each
    /// with the array of maps the programs find it in.
    pub const POLICY_MAPS: [(&str, &str); 12] = [
        (HEADER, "TCPMGM_GEN_HEADER"),
        (LISTS, "TCPMGM_GEN_LISTS"),
        (PROFILES, "TCPMGM_GEN_PROFILES"),
        (RANKS, "TCPMGM_GEN_RANKS"),
        (LOCAL_V4, "TCPMGM_GEN_LOCAL_V4"),
        (LOCAL_V6, "TCPMGM_GEN_LOCAL_V6"),
        (BUCKETS, "TCPMGM_GEN_BUCKETS"),
        (LISTENERS, "TCPMGM_GEN_LISTENERS"),
        (REMOTE_V4, "TCPMGM_GEN_REMOTE_V4"),
        (REMOTE_V6, "TCPMGM_GEN_REMOTE_V6"),
        (HOST_V4, "TCPMGM_GEN_HOST_V4"),
        (HOST_V6, "TCPMGM_GEN_HOST_V6"),
    ];
}

/// A rank (a rule's position in match order, its index in `PROFILES`) meaning "no rule".
pub const NO_RULE: u32 = u32::MAX;
/// `Bucket::local` when no candidate of the bucket names a local address.
pub const NO_LOCAL: u32 = u32::MAX;

/// The shapes of a bucket key: which of proto, remote_port and local_port are set (non-zero).
pub mod shape {
    pub const PROTO: u32 = 1;
    pub const REMOTE_PORT: u32 = 2;
    pub const LOCAL_PORT: u32 = 4;
    /// Shapes are 0..COUNT; a `ListNode::shapes` bit per shape.
    pub const COUNT: u32 = 8;
}

/// Protocol ids. `PROTO_ANY` in a candidate matches every connection; a connection whose protocol
/// is unknown (no listener) carries `PROTO_ANY` too and so only meets `any` rules.
pub const PROTO_ANY: u8 = 0;
/// The TCP-based OpenSIPS protocols, by id (index + 1).
pub const PROTOCOLS: [&str; 11] = [
    "tcp", "tls", "ws", "wss", "bin", "bins", "hep_tcp", "hep_tls", "msrp", "msrps", "smpp",
];

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// LPM trie key data for IPv4 prefixes (the trie key is `prefixlen: u32` then these bytes).
pub type Addr4 = [u8; 4];
/// LPM trie key data for IPv6 prefixes.
pub type Addr6 = [u8; 16];

/// List ids of the families' root lists (the rules whose remote side is any, or /0); the
/// lists of remote prefixes follow.
pub const ROOT_V4: u32 = 0;
pub const ROOT_V6: u32 = 1;
/// `ListNode::parent` of a root list.
pub const NO_LIST: u32 = u32::MAX;
/// The longest chain of lists a lookup walks: every prefix length of IPv6 below /128 nested in
/// one another, then the root.
pub const MAX_DEPTH: u32 = 129;

/// A list of rules: those of one remote prefix (or a family's root), by list id. The remote
/// tries and host maps give the list of the longest rule prefix holding a peer; from there a
/// lookup walks up `parent` to the root, so each rule is stored once however its prefix nests.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListNode {
    /// A bit for each bucket shape the list has.
    pub shapes: u32,
    /// The list of the nearest rule prefix containing this one (the family's root list at the
    /// top), or `NO_LIST` for a root.
    pub parent: u32,
    /// The best rank among the rules of every list above this one: once a lookup holds a better
    /// one, no list above can change its answer, and the walk stops.
    pub floor: u32,
}

/// A rule, by rank (its position in match order): its id, and its profile's index in
/// `PROFILES`. Rules share a profile where every field but the id and rank is the same, so a
/// table of many rules and few distinct profiles stores 8 bytes a rule, not a profile each.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RankEntry {
    pub rule_id: u32,
    pub profile: u32,
}

/// A bucket: the rules of one list with one (proto, remote_port, local_port), 0 meaning any.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BucketKey {
    pub list: u32,
    pub remote_port: u16,
    pub local_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl BucketKey {
    /// The key, padding zeroed. Made as three words: LLVM zeroes the 3-byte padding of a
    /// field-by-field key with a call to memset, which in BPF is one more call frame in the
    /// deepest call chain (sock_ops, tcpmgm_decide, tcpmgm_best_in), whose stack the verifier
    /// caps at 512 bytes in all.
    #[inline(always)]
    pub const fn new(list: u32, proto: u8, remote_port: u16, local_port: u16) -> BucketKey {
        let (r, l) = (remote_port.to_ne_bytes(), local_port.to_ne_bytes());
        let words = [
            list,
            u32::from_ne_bytes([r[0], r[1], l[0], l[1]]),
            u32::from_ne_bytes([proto, 0, 0, 0]),
        ];
        // SAFETY: BucketKey is repr(C) and 12 bytes: list at 0, the ports at 4 and 6, proto at
        // 8 and the padding after it, as the words lay them out; any bytes are valid for it.
        unsafe { core::mem::transmute::<[u32; 3], BucketKey>(words) }
    }
}

/// The best rank of a bucket's rules that name no local address (`NO_RULE` if none), and the id
/// of its local-address tries (`NO_LOCAL` if no rule of it names one).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    pub best: u32,
    pub local: u32,
}

/// LPM key data of the local tries: a bucket's local id, then the address. Every entry covers
/// the id whole, so its byte order does not matter; the value is the best rank of the bucket's
/// rules whose local side contains the entry's prefix (local any included).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalKey4 {
    pub local: u32,
    pub addr: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalKey6 {
    pub local: u32,
    pub addr: [u8; 16],
}

/// What a rule did, counted per CPU by the programs, by rule id, since its entry was made (the
/// map is shared by every generation and every run, so a reload does not reset it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleStats {
    /// Sockets the rule was chosen for (accepted or opened connections, refused ones included).
    pub matched: u64,
    /// connect() calls refused by the rule's no_new_conn.
    pub refused: u64,
    /// connect() calls the rule's no_new_conn would have refused, in audit mode.
    pub would_refuse: u64,
    /// Socket options the kernel refused to set for the rule (bpf_setsockopt failed).
    pub setsockopt_failures: u64,
    /// setsockopt() calls by the application that would have changed an option the rule sets.
    pub overrides_prevented: u64,
    /// Sends slower than the rule's send_threshold (RTT samples over it, retransmission
    /// timeouts).
    pub slow_sends: u64,
}

/// How the connections a rule governed ended, and how long they lived, by rule id (one entry a
/// rule, made at its first end; the programs add to it atomically). Shared by every generation
/// and every run (pinned as `OUTCOMES_PIN`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcomes {
    /// Ends, by `outcome::*`.
    pub ended: [u64; outcome::COUNT],
    /// The ended connections' lifetimes summed, in ms (from connect() or accept() to the end).
    pub lived_ms: u64,
    /// Ended connections by lifetime: at most `LIFETIME_BUCKETS_S[i]` seconds (and more than the
    /// bucket before), then those that lived longer than the last bound. Connections whose start
    /// tcpmgm did not see (made before it attached) are in `ended` only.
    pub lived: [u64; LIFETIME_BUCKETS_S.len() + 1],
}

/// The upper bounds of `Outcomes::lived`, in seconds.
pub const LIFETIME_BUCKETS_S: [u64; 6] = [1, 10, 60, 600, 3600, 86400];

/// Pin name of the outcome counters.
pub const OUTCOMES_PIN: &str = "TCPMGM_OUTCOMES_V1";
/// Pin name of the connections' start times.
pub const STARTS_PIN: &str = "TCPMGM_STARTS_V1";
/// Pin name of the cookies of the sockets the con_lifetime sweeper is closing (see
/// `names::CLOSING`).
pub const CLOSING_PIN: &str = "TCPMGM_CLOSING";
/// How many sockets the sweeper may have in `CLOSING` at once.
pub const CLOSING_MAX: u32 = 1024;

/// How a connection ended: indices of `Outcomes::ended`, told apart by the TCP state it left
/// and by marks left on its record (`marks::TIMED_OUT` ...).
pub mod outcome {
    /// Closed normally: FINs exchanged (the connection left FIN_WAIT, CLOSING or LAST_ACK).
    pub const CLOSED: usize = 0;
    /// Reset by the peer (a RST received); needs the outcome tracers (`settings::TRACED`).
    pub const RESET: usize = 1;
    /// The peer stopped answering while nothing was in flight: the keepalive probes went
    /// unanswered (or zero-window probes did); needs the outcome tracers.
    pub const KEEPALIVE: usize = 2;
    /// Data stayed unacknowledged past the user timeout (TCP_USER_TIMEOUT) or the kernel's
    /// retransmission limit.
    pub const TIMEOUT: usize = 3;
    /// The handshake timed out (connect_timeout, or the SYN retries ran out).
    pub const CONNECT_TIMEOUT: usize = 4;
    /// Closed by the rule's con_lifetime (the daemon's sweeper).
    pub const LIFETIME: usize = 5;
    /// The handshake failed otherwise: refused with a reset, or an ICMP error.
    pub const CONNECT_FAILED: usize = 6;
    /// Aborted on this host: close() with unread data or SO_LINGER 0, or destroyed (ss -K);
    /// needs the outcome tracers.
    pub const LOCAL_ABORT: usize = 7;
    /// Without the outcome tracers: a reset by the peer, unanswered keepalive probes or an
    /// abort on this host, which the state callbacks alone cannot tell apart.
    pub const ABORTED: usize = 8;
    pub const COUNT: usize = 9;
    /// The names the metrics, `status` and the events use, by index.
    pub const NAMES: [&str; COUNT] = [
        "closed",
        "reset",
        "keepalive",
        "timeout",
        "connect_timeout",
        "lifetime",
        "connect_failed",
        "local_abort",
        "aborted",
    ];
}

/// One event of the stream `tcpmgm events` shows, written by the programs into the ring buffer
/// `names::EVENTS` (at most `EVENTS_PER_SECOND` a CPU a second; the rest are counted in
/// `names::EVENT_DROPS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// When, in ns of the monotonic clock.
    pub ts_ns: u64,
    /// `ENDED`: how long the connection lived, in ms (u64::MAX: unknown).
    pub lived_ms: u64,
    /// `event::*`.
    pub kind: u32,
    pub rule_id: u32,
    /// `ENDED`: `outcome::*`.
    pub outcome: u32,
    /// `event::V6`, `event::INBOUND`.
    pub flags: u32,
    /// Network order; an IPv4 address in the first word.
    pub remote: [u32; 4],
    pub local: [u32; 4],
    pub remote_port: u16,
    pub local_port: u16,
    pub _pad: u32,
}

/// `Event::kind` values and `Event::flags` bits.
pub mod event {
    /// A socket was decided: its rule governs it.
    pub const DECIDED: u32 = 1;
    /// connect() refused by the rule's no_new_conn.
    pub const REFUSED: u32 = 2;
    /// connect() no_new_conn would have refused, in audit mode.
    pub const WOULD_REFUSE: u32 = 3;
    /// A governed connection ended (`Event::outcome` says how).
    pub const ENDED: u32 = 4;
    /// The names `tcpmgm events` uses, by kind (0: none).
    pub const NAMES: [&str; 5] = ["", "decided", "refused", "would_refuse", "ended"];
    pub const V6: u32 = 1 << 0;
    /// An accepted connection.
    pub const INBOUND: u32 = 1 << 1;
}

/// Events each CPU may write a second; the rest are counted as dropped.
pub const EVENTS_PER_SECOND: u32 = 2000;
/// Pin names of the event ring buffer and its drop counter.
pub const EVENTS_PIN: &str = "TCPMGM_EVENTS_V1";
pub const EVENT_DROPS_PIN: &str = "TCPMGM_EVENT_DROPS_V1";

/// What the daemon's con_lifetime sweeper did for a rule, by rule id (written by the daemon
/// only; pinned as `SWEEP_STATS_PIN`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepStats {
    /// Idle connections closed.
    pub idle_closes: u64,
    /// Idle connections left open in audit mode that would have been closed.
    pub would_close: u64,
}

/// Pin name of the sweeper's statistics.
pub const SWEEP_STATS_PIN: &str = "TCPMGM_SWEEP_STATS_V1";

/// Pin name of the rule statistics, shared by every generation and run.
pub const RULE_STATS_PIN: &str = "TCPMGM_RULE_STATS_V1";
/// The most rules the statistics hold (its memory grows with the rules that have events).
pub const RULE_STATS_MAX: usize = 1 << 22;

/// The per-CPU budget of log events (see `LOG_EVENTS_PER_SECOND`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogBudget {
    /// The second (of the monotonic clock) the count is for.
    pub second: u64,
    pub used: u32,
    pub _pad: u32,
}

/// Log events each CPU may send a second; the rest are dropped (the counters still count them).
pub const LOG_EVENTS_PER_SECOND: u32 = 20;

/// Pin name of the log ring buffer, shared by every generation of the programs.
pub const LOGS_PIN: &str = "TCPMGM_LOGS";

/// A generation's own entry: its number, which the programs check against `CURRENT`, how
/// the daemon was told to enforce it, and which tcpmgm wrote it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub generation: u32,
    /// `settings::*` bits.
    pub flags: u32,
    /// The version (`tcpmgm --version`'s text, NUL-padded) of the tcpmgm that loaded the
    /// programs and wrote this generation: `status` reads it from the pins, so it names what
    /// runs in the kernel whichever daemon (if any) runs now. The programs never read it.
    pub loader: [u8; LOADER_LEN],
}

/// The size of `Header::loader`. Pins of tcpmgm versions before it have a header of 8 bytes.
pub const LOADER_LEN: usize = 64;

impl Default for Header {
    fn default() -> Header {
        Header {
            generation: 0,
            flags: 0,
            loader: [0; LOADER_LEN],
        }
    }
}

/// The socket marks (`marks::AUDIT`, ...) that a generation's settings give the sockets it
/// decides, so that every later hook treats a socket the same way.
pub const fn settings_marks(settings: u32) -> u32 {
    let mut m = 0;
    if settings & settings::AUDIT != 0 {
        m |= marks::AUDIT;
    }
    if settings & settings::APP_OPTIONS_ALLOW != 0 {
        m |= marks::APP_OPTIONS_ALLOW;
    }
    if settings & settings::TRACED != 0 {
        m |= marks::TRACED;
    }
    m
}

/// `Header::flags` bits.
pub mod settings {
    /// Audit mode: decide and count, but refuse nothing and set nothing.
    pub const AUDIT: u32 = 1 << 0;
    /// The application's own setsockopt() may change the options a rule sets.
    pub const APP_OPTIONS_ALLOW: u32 = 1 << 1;
    /// The outcome tracers are attached (kernels whose tracing programs can read socket
    /// storage, Linux 5.11): a reset, an abort on this host and unanswered keepalive probes are
    /// told apart.
    pub const TRACED: u32 = 1 << 2;
}

/// Key of the listener map. A listener on a wildcard address has `addr` all zero. An entry with
/// `port` 0 is not a listener but the attribution of outbound connections made from `addr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u8,
    pub _pad: u8,
}

/// The listener a connection belongs to: its protocol, and the port the rules' local_port meets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenerInfo {
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

// Every map's key and value layout, checked by the compiler: the programs, the loader and
// bpftool's view of the pinned maps read the same bytes. What fails here is a new layout, which
// takes the map a new pin name.
const _: () = {
    use core::mem::size_of;
    assert!(size_of::<ListNode>() == 12);
    assert!(size_of::<RankEntry>() == 8);
    assert!(size_of::<BucketKey>() == 12);
    assert!(size_of::<Bucket>() == 8);
    assert!(size_of::<LocalKey4>() == 8);
    assert!(size_of::<LocalKey6>() == 20);
    assert!(size_of::<RuleStats>() == 48);
    assert!(size_of::<Outcomes>() == 136);
    assert!(size_of::<Event>() == 72);
    assert!(size_of::<SweepStats>() == 16);
    assert!(size_of::<LogBudget>() == 16);
    assert!(size_of::<Header>() == 72);
    assert!(size_of::<ListenerKey>() == 20);
    assert!(size_of::<ListenerInfo>() == 4);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    macro_rules! pod {
        ($($t:ty),* $(,)?) => {$(
            // SAFETY: repr(C) plain data, integers and arrays of them, with its padding spelled
            // out as fields (the sizes are asserted above) and no pointers: any bytes are a value.
            unsafe impl aya::Pod for $t {}
        )*};
    }
    pod!(
        ListNode,
        RankEntry,
        BucketKey,
        Bucket,
        LocalKey4,
        LocalKey6,
        SockPolicy,
        Header,
        RuleStats,
        SweepStats,
        Outcomes,
        Event,
        LogBudget,
        Attr,
        Profile,
        ListenerKey,
        ListenerInfo,
    );
}
