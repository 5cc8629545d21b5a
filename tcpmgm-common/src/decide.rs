//! Which rule, if any, governs a connection, in a bounded number of map lookups whatever the
//! number of rules (the layout is built and explained in tcpmgm-user's `compile.rs`). The same
//! code runs in the kernel, over the programs' maps, and on the host, over the compiled
//! contents, where the property tests compare it with the match order read from the rule list.
//!
//! 1. the host map, else the remote-prefix trie, gives the list of the longest rule prefix
//!    holding the peer (else the family's root list, the rules for any remote); from there the
//!    walk goes up each list's parent, the next rule prefix containing it, to the root, and
//!    stops early once no list above can hold a better rule;
//! 2. in each list, for each shape of (proto, remote_port, local_port) the list has, one hash
//!    lookup gives the bucket of rules with exactly those values;
//! 3. a bucket knows the best rank of its rules without a local address, and, if some have one,
//!    a local-address trie gives the best rank for the socket's local address.
//!
//! The lowest rank found is the winner: ranks are positions in the match order.
use crate::{
    Bucket, BucketKey, FAMILY_V4, FAMILY_V6, ListNode, ListenerInfo, ListenerKey, MAX_DEPTH,
    NO_LIST, NO_LOCAL, NO_RULE, PROTO_ANY, ROOT_V4, ROOT_V6, shape,
};

/// A connection as the hooks see it. Addresses are network-order words; an IPv4-mapped IPv6
/// address has already been folded to IPv4 (`v6 == false`, address in word 0).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Conn {
    pub v6: bool,
    pub remote: [u32; 4],
    pub remote_port: u16,
    /// All zero when the socket is not bound yet (connect() of an unbound socket).
    pub local: [u32; 4],
    /// The socket's own port: the listener port for accepted connections; for outbound ones the
    /// bound or ephemeral port, or 0 before the kernel picked one.
    pub local_port: u16,
    /// Accepted (true) or opened (false).
    pub passive: bool,
}

impl Conn {
    pub fn local_known(&self) -> bool {
        (self.local[0] | self.local[1] | self.local[2] | self.local[3]) != 0
    }

    pub fn family(&self) -> u8 {
        if self.v6 { FAMILY_V6 } else { FAMILY_V4 }
    }
}

/// What one list is searched with: the connection as the rules' keys see it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Search {
    /// The listener's protocol, `PROTO_ANY` when unknown.
    pub proto: u8,
    pub remote_port: u16,
    /// The port the rules' local_port meets (0: unknown).
    pub local_port: u16,
    pub v6: bool,
    pub local: [u32; 4],
}

/// The policy maps a decision reads: the kernel's, in the programs; the compiled contents, in
/// the host's tests. Each lookup copies its value out.
pub trait PolicyMaps {
    fn listener(&self, key: &ListenerKey) -> Option<ListenerInfo>;
    /// The list of the longest rule prefix holding the peer (`remote` as in `Conn`).
    fn remote_list(&self, v6: bool, remote: &[u32; 4]) -> Option<u32>;
    fn list(&self, id: u32) -> Option<ListNode>;
    fn bucket(&self, key: &BucketKey) -> Option<Bucket>;
    /// The best rank of the local trie `local` for the address `addr` (longest prefix match).
    fn local_rank(&self, v6: bool, local: u32, addr: &[u32; 4]) -> Option<u32>;

    /// The best rank in one list (`best_in`); the programs route it through a BPF global
    /// function, which the verifier checks once rather than at every level of the walk.
    fn best_in_list(&self, list: u32, shapes: u32, search: &Search) -> u32 {
        best_in(self, list, shapes, search)
    }
}

/// The protocol of the connection and the local port the rules' local_port is compared with.
/// Accepted connections belong to the listener they arrived on. Outbound ones belong to the
/// listener bound at their own address and port (a reused listener port), else to the listener
/// the loader attributed to their local address (port 0 entries), else to none.
#[inline(always)]
pub fn protocol_and_port<M: PolicyMaps + ?Sized>(m: &M, c: &Conn) -> (u8, u16) {
    let family = c.family();
    let find = |addr: [u32; 4], port: u16| {
        m.listener(&ListenerKey {
            addr,
            port,
            family,
            _pad: 0,
        })
        .map(|l| (l.proto, l.port))
    };
    if c.passive {
        return find(c.local, c.local_port)
            .or_else(|| find([0; 4], c.local_port))
            .unwrap_or((PROTO_ANY, c.local_port));
    }
    let bound = if c.local_known() && c.local_port != 0 {
        find(c.local, c.local_port)
    } else {
        None
    };
    bound
        .or_else(|| find(c.local, 0))
        .or_else(|| find([0; 4], 0))
        .unwrap_or((PROTO_ANY, 0))
}

/// The best rank in one list for a connection (`NO_RULE` if none matches): one bucket lookup per
/// shape the list has, and a local trie lookup where the bucket has one.
#[inline(always)]
pub fn best_in<M: PolicyMaps + ?Sized>(m: &M, list: u32, shapes: u32, s: &Search) -> u32 {
    let local_known = (s.local[0] | s.local[1] | s.local[2] | s.local[3]) != 0;
    let mut best = NO_RULE;
    for shape in 0..shape::COUNT {
        if shapes & (1 << shape) == 0
            || (shape & shape::PROTO != 0 && s.proto == PROTO_ANY)
            || (shape & shape::LOCAL_PORT != 0 && s.local_port == 0)
        {
            continue;
        }
        let pick = |bit: u32, value: u16| if shape & bit != 0 { value } else { 0 };
        let key = BucketKey::new(
            list,
            if shape & shape::PROTO != 0 {
                s.proto
            } else {
                PROTO_ANY
            },
            pick(shape::REMOTE_PORT, s.remote_port),
            pick(shape::LOCAL_PORT, s.local_port),
        );
        let Some(bucket) = m.bucket(&key) else {
            continue;
        };
        let mut rank = bucket.best;
        if bucket.local != NO_LOCAL
            && local_known
            && let Some(r) = m.local_rank(s.v6, bucket.local, &s.local)
        {
            rank = r;
        }
        if rank < best {
            best = rank;
        }
    }
    best
}

/// The rank of the winning rule (its index in the profiles), or `NO_RULE`: no rule matches and
/// the system's settings stay.
#[inline(always)]
pub fn decide<M: PolicyMaps + ?Sized>(m: &M, c: &Conn) -> u32 {
    let (proto, local_port) = protocol_and_port(m, c);
    let search = Search {
        proto,
        remote_port: c.remote_port,
        local_port,
        v6: c.v6,
        local: c.local,
    };
    let root = if c.v6 { ROOT_V6 } else { ROOT_V4 };
    let mut id = m.remote_list(c.v6, &c.remote).unwrap_or(root);
    let mut best = NO_RULE;
    for _ in 0..MAX_DEPTH {
        let Some(node) = m.list(id) else {
            break;
        };
        let rank = m.best_in_list(id, node.shapes, &search);
        if rank < best {
            best = rank;
        }
        if node.parent == NO_LIST || best < node.floor {
            break;
        }
        id = node.parent;
    }
    best
}
