//! Map layouts and constants shared by the eBPF programs and the loader.
//!
//! Everything here is `#[repr(C)]` plain data: the loader writes it into the kernel maps and the
//! programs read it back. Addresses are kept as the kernel hands them to BPF programs: `[u32; 4]`
//! words in network byte order (an IPv4 address is word 0, the rest zero). Ports are host order.
#![no_std]

/// Names of the maps and programs in the eBPF object, as the loader looks them up.
pub mod names {
    pub const REMOTE_V4: &str = "TCPMGM_REMOTE_V4";
    pub const REMOTE_V6: &str = "TCPMGM_REMOTE_V6";
    pub const CANDIDATES: &str = "TCPMGM_CANDIDATES";
    pub const PROFILES: &str = "TCPMGM_PROFILES";
    pub const LISTENERS: &str = "TCPMGM_LISTENERS";
    pub const SOCK_OPS: &str = "tcpmgm_sock_ops";
    pub const CONNECT4: &str = "tcpmgm_connect4";
    pub const CONNECT6: &str = "tcpmgm_connect6";
    /// All maps, in the order the loader writes them.
    pub const MAPS: [&str; 5] = [PROFILES, CANDIDATES, LISTENERS, REMOTE_V4, REMOTE_V6];
}

/// Longest candidate list the programs walk for one remote prefix. The compiler refuses a rule set
/// that would need more, rather than truncating it.
pub const MAX_CANDIDATES: u32 = 256;

/// Protocol ids. `PROTO_ANY` in a candidate matches every connection; a connection whose protocol
/// is unknown (no listener) carries `PROTO_ANY` too and so only meets `any` rules.
pub const PROTO_ANY: u8 = 0;
/// The TCP-based OpenSIPS protocols, by id (index + 1).
pub const PROTOCOLS: [&str; 11] = [
    "tcp", "tls", "ws", "wss", "bin", "bins", "hep_tcp", "hep_tls", "msrp", "msrps", "smpp",
];

/// `Candidate::local_family`: the rule names no local address.
pub const LOCAL_ANY: u8 = 0;
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// `Profile::flags` bits.
pub mod flags {
    /// The rule says keepalive=1: SO_KEEPALIVE on, and the non-zero keep* values applied.
    pub const KEEPALIVE_ON: u32 = 1 << 0;
    /// The rule says keepalive=0: SO_KEEPALIVE off.
    pub const KEEPALIVE_OFF: u32 = 1 << 1;
    /// no_new_conn=1: connect() to a matching destination fails with EPERM.
    pub const NO_NEW_CONN: u32 = 1 << 2;
}

/// LPM trie key data for IPv4 prefixes (the trie key is `prefixlen: u32` then these bytes).
pub type Addr4 = [u8; 4];
/// LPM trie key data for IPv6 prefixes.
pub type Addr6 = [u8; 16];

/// The value of a remote-prefix trie entry: the slice of `CANDIDATES` holding, in match order,
/// every rule whose remote side contains this prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CandidateRange {
    pub first: u32,
    pub len: u32,
}

/// One rule as seen from a remote prefix: the remaining match keys, pre-masked.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Candidate {
    /// Local address, already masked, network order words.
    pub local_addr: [u32; 4],
    /// Local prefix mask, network order words.
    pub local_mask: [u32; 4],
    /// Index into `PROFILES`.
    pub profile: u32,
    /// 0 = any.
    pub remote_port: u16,
    /// 0 = any.
    pub local_port: u16,
    /// `PROTO_ANY` or a protocol id.
    pub proto: u8,
    /// `LOCAL_ANY`, `FAMILY_V4` or `FAMILY_V6`.
    pub local_family: u8,
    pub _pad: [u8; 2],
}

/// What the programs apply for a rule. Every column of the OpenSIPS profile is carried so that
/// `bpftool map dump` shows the whole profile; the programs act on the keepalive and connect
/// fields and on `flags`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Profile {
    /// The rule's `id` in the table.
    pub rule_id: u32,
    pub flags: u32,
    /// TCP_KEEPIDLE seconds; 0 leaves the system value.
    pub keepidle: u32,
    /// TCP_KEEPINTVL seconds; 0 leaves the system value.
    pub keepintvl: u32,
    /// TCP_KEEPCNT; 0 leaves the system value.
    pub keepcnt: u32,
    /// TCP_USER_TIMEOUT in ms while the handshake runs; 0 leaves the system behaviour.
    pub connect_timeout_ms: u32,
    /// Initial SYN retransmission timeout in jiffies (TIMEOUT_INIT reply); 0 leaves the default.
    pub syn_rto_jiffies: u32,
    pub con_lifetime_s: u32,
    pub msg_read_timeout_s: u32,
    pub send_threshold_us: u32,
    pub alias_mode: u8,
    pub parallel_read: u8,
    pub _pad: [u8; 2],
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

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C) with explicit padding fields and no pointers.
    unsafe impl aya::Pod for CandidateRange {}
    unsafe impl aya::Pod for Candidate {}
    unsafe impl aya::Pod for Profile {}
    unsafe impl aya::Pod for ListenerKey {}
    unsafe impl aya::Pod for ListenerInfo {}
}
