//! Which rule, if any, governs a connection, in a bounded number of map lookups whatever the
//! number of rules (the layout is built and explained in tcpmgm-user's `compile.rs`):
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
use aya_ebpf::btf_maps::lpm_trie::Key;
use tcpmgm_common::{
    BucketKey, FAMILY_V4, FAMILY_V6, ListenerKey, LocalKey4, LocalKey6, MAX_DEPTH, NO_LIST,
    NO_LOCAL, NO_RULE, PROTO_ANY, ROOT_V4, ROOT_V6, shape,
};

use crate::generation::Gen;

/// A connection as the hooks see it. Addresses are network-order words; an IPv4-mapped IPv6
/// address has already been folded to IPv4 (`v6 == false`, address in word 0).
pub struct Conn {
    pub v6: bool,
    pub remote: [u32; 4],
    pub remote_port: u16,
    /// All zero when the socket is not bound yet (connect() of an unbound socket).
    pub local: [u32; 4],
    /// The socket's own port: the listener port for accepted connections; for outbound ones the
    /// bound or ephemeral port, or 0 before the kernel picked one.
    pub local_port: u16,
    pub passive: bool,
}

impl Conn {
    /// The connection as the five scalar arguments of `tcpmgm_decide`: the ports, the flags and
    /// the generation's slot in the first (remote port in bits 0-15, local port in 16-31, IPv6
    /// in bit 32, accepted in bit 33, the slot in bit 34), then the addresses' words in pairs.
    #[inline(always)]
    fn pack(&self, slot: u32) -> [u64; 5] {
        let pair = |w: &[u32; 4], i: usize| u64::from(w[i]) | u64::from(w[i + 1]) << 32;
        [
            u64::from(self.remote_port)
                | u64::from(self.local_port) << 16
                | u64::from(self.v6) << 32
                | u64::from(self.passive) << 33
                | u64::from(slot & 1) << 34,
            pair(&self.remote, 0),
            pair(&self.remote, 2),
            pair(&self.local, 0),
            pair(&self.local, 2),
        ]
    }

    #[inline(always)]
    fn unpack(a: [u64; 5]) -> (Conn, u32) {
        let words = |lo: u64, hi: u64| [lo as u32, (lo >> 32) as u32, hi as u32, (hi >> 32) as u32];
        (
            Conn {
                remote_port: a[0] as u16,
                local_port: (a[0] >> 16) as u16,
                v6: (a[0] >> 32) & 1 != 0,
                passive: (a[0] >> 33) & 1 != 0,
                remote: words(a[1], a[2]),
                local: words(a[3], a[4]),
            },
            ((a[0] >> 34) & 1) as u32,
        )
    }

    fn local_known(&self) -> bool {
        (self.local[0] | self.local[1] | self.local[2] | self.local[3]) != 0
    }

    fn family(&self) -> u8 {
        if self.v6 { FAMILY_V6 } else { FAMILY_V4 }
    }
}

/// Reads an IPv6 address field of a context as four fixed-offset loads. Left to itself LLVM may
/// merge neighbouring ctx loads into one at a variable offset, which the verifier refuses.
///
/// # Safety
/// `p` must point at a readable `[u32; 4]` field of the program's context.
#[inline(always)]
pub unsafe fn load_words(p: *const [u32; 4]) -> [u32; 4] {
    let w = p as *const u32;
    // SAFETY: the caller's contract; each read stays inside the field.
    unsafe {
        [
            core::ptr::read_volatile(w),
            core::ptr::read_volatile(w.add(1)),
            core::ptr::read_volatile(w.add(2)),
            core::ptr::read_volatile(w.add(3)),
        ]
    }
}

/// `::ffff:a.b.c.d` as network-order words: 0, 0, 0x0000ffff.
#[inline(always)]
pub fn is_v4_mapped(w: &[u32; 4]) -> bool {
    w[0] == 0 && w[1] == 0 && w[2] == u32::from_be(0x0000_ffff)
}

pub fn v6_bytes(w: &[u32; 4]) -> [u8; 16] {
    let mut data = [0u8; 16];
    for (i, word) in w.iter().enumerate() {
        data[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    data
}

#[inline(always)]
fn listener(g: &Gen, key: ListenerKey) -> Option<(u8, u16)> {
    // SAFETY: the value is copied out at once.
    unsafe { g.listeners()?.get(key) }.map(|l| (l.proto, l.port))
}

/// The protocol of the connection and the local port the rules' local_port is compared with.
/// Accepted connections belong to the listener they arrived on. Outbound ones belong to the
/// listener bound at their own address and port (a reused listener port), else to the listener
/// the loader attributed to their local address (port 0 entries), else to none.
#[inline(always)]
fn protocol_and_port(g: &Gen, c: &Conn) -> (u8, u16) {
    let family = c.family();
    let key = |addr: [u32; 4], port: u16| ListenerKey {
        addr,
        port,
        family,
        _pad: 0,
    };
    if c.passive {
        return listener(g, key(c.local, c.local_port))
            .or_else(|| listener(g, key([0; 4], c.local_port)))
            .unwrap_or((PROTO_ANY, c.local_port));
    }
    let bound = if c.local_known() && c.local_port != 0 {
        listener(g, key(c.local, c.local_port))
    } else {
        None
    };
    bound
        .or_else(|| listener(g, key(c.local, 0)))
        .or_else(|| listener(g, key([0; 4], 0)))
        .unwrap_or((PROTO_ANY, 0))
}

/// What a list is searched with: one connection, packed into scalars for `tcpmgm_best_in`.
#[derive(Clone, Copy)]
struct Search {
    generation: u32,
    proto: u8,
    remote_port: u16,
    local_port: u16,
    v6: bool,
    local: [u32; 4],
}

impl Search {
    /// Arguments 2 to 4 of `tcpmgm_best_in` (argument 1 carries the list): proto in bits 0-7,
    /// the remote port in 8-23, the local port in 24-39, IPv6 in bit 40, the generation's slot
    /// in bit 41; then the local address's words.
    #[inline(always)]
    fn pack(&self) -> (u64, u64, u64) {
        (
            u64::from(self.proto)
                | u64::from(self.remote_port) << 8
                | u64::from(self.local_port) << 24
                | u64::from(self.v6) << 40
                | u64::from(self.generation & 1) << 41,
            u64::from(self.local[0]) | u64::from(self.local[1]) << 32,
            u64::from(self.local[2]) | u64::from(self.local[3]) << 32,
        )
    }
}

/// The best rank in one list for a connection (`NO_RULE` if none matches).
///
/// A global BPF function with scalar arguments: the verifier checks it once, on its own, where
/// inlined into the walk up the lists it was checked once per level (up to 129) in every program,
/// which took the sock_ops program past the verifier's million instructions.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn tcpmgm_best_in(
    list_and_shapes: u64,
    conn: u64,
    local01: u64,
    local23: u64,
) -> u32 {
    let list = list_and_shapes as u32;
    let shapes = (list_and_shapes >> 32) as u32;
    let proto = conn as u8;
    let remote_port = (conn >> 8) as u16;
    let local_port = (conn >> 24) as u16;
    let v6 = (conn >> 40) & 1 != 0;
    let g = Gen::at_slot((conn >> 41) as u32 & 1);
    let local_known = (local01 | local23) != 0;
    // The local-trie keys, built once: each bucket fills in its own trie id.
    let mut key4 = Key {
        prefix_len: 32 + 32,
        data: LocalKey4 {
            local: 0,
            addr: (local01 as u32).to_ne_bytes(),
        },
    };
    let mut key6 = Key {
        prefix_len: 32 + 128,
        data: LocalKey6 {
            local: 0,
            addr: v6_bytes(&[
                local01 as u32,
                (local01 >> 32) as u32,
                local23 as u32,
                (local23 >> 32) as u32,
            ]),
        },
    };
    let mut best = NO_RULE;
    let Some(buckets) = g.buckets() else {
        return best;
    };
    for s in 0..shape::COUNT {
        if shapes & (1 << s) == 0
            || (s & shape::PROTO != 0 && proto == PROTO_ANY)
            || (s & shape::LOCAL_PORT != 0 && local_port == 0)
        {
            continue;
        }
        let key = BucketKey {
            list,
            remote_port: if s & shape::REMOTE_PORT != 0 {
                remote_port
            } else {
                0
            },
            local_port: if s & shape::LOCAL_PORT != 0 {
                local_port
            } else {
                0
            },
            proto: if s & shape::PROTO != 0 {
                proto
            } else {
                PROTO_ANY
            },
            _pad: [0; 3],
        };
        // SAFETY: the value is copied out at once.
        let Some(bucket) = (unsafe { buckets.get(key) }).copied() else {
            continue;
        };
        let mut rank = bucket.best;
        if bucket.local != NO_LOCAL && local_known {
            let found = if v6 {
                key6.data.local = bucket.local;
                g.local_v6().and_then(|m| m.get(&key6).copied())
            } else {
                key4.data.local = bucket.local;
                g.local_v4().and_then(|m| m.get(&key4).copied())
            };
            if let Some(r) = found {
                rank = r;
            }
        }
        if rank < best {
            best = rank;
        }
    }
    best
}

/// The rank of the winning rule (its index in `TCPMGM_PROFILES`), or None: no rule matches and
/// the system's settings stay.
#[inline(always)]
pub fn decide(g: &Gen, c: &Conn) -> Option<u32> {
    let [a, b, c2, d, e] = c.pack(g.number);
    let rank = tcpmgm_decide(a, b, c2, d, e);
    (rank != NO_RULE).then_some(rank)
}

/// The decision itself, shared by every program: a global BPF function with scalar arguments
/// (the connection, see `Conn::pack`), which the verifier checks once, on its own, rather than
/// inlined into each program (where, on Linux 5.10, LLVM's code read stack slots the verifier
/// took for uninitialised, and the walk up the lists multiplied each program's verification).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn tcpmgm_decide(a: u64, b: u64, c: u64, d: u64, e: u64) -> u32 {
    let (c, slot) = Conn::unpack([a, b, c, d, e]);
    let g = Gen::at_slot(slot);
    let (proto, local_port) = protocol_and_port(&g, &c);
    // A full-length prefix is the longest there is: an exact hit needs no trie walk, which at a
    // million peers is the difference (most rules name one peer).
    let prefix = if c.v6 {
        let data = v6_bytes(&c.remote);
        // SAFETY: the value is copied out at once.
        unsafe { g.host_v6().and_then(|m| m.get(data)) }
            .copied()
            .or_else(|| {
                g.remote_v6()?
                    .get(&Key {
                        prefix_len: 128,
                        data,
                    })
                    .copied()
            })
    } else {
        let data = c.remote[0].to_ne_bytes();
        // SAFETY: the value is copied out at once.
        unsafe { g.host_v4().and_then(|m| m.get(data)) }
            .copied()
            .or_else(|| {
                g.remote_v4()?
                    .get(&Key {
                        prefix_len: 32,
                        data,
                    })
                    .copied()
            })
    };
    let (conn, local01, local23) = Search {
        generation: slot,
        proto,
        remote_port: c.remote_port,
        local_port,
        v6: c.v6,
        local: c.local,
    }
    .pack();
    let root = if c.v6 { ROOT_V6 } else { ROOT_V4 };
    let mut id = prefix.unwrap_or(root);
    let Some(lists) = g.lists() else {
        return NO_RULE;
    };
    let mut best = NO_RULE;
    for _ in 0..MAX_DEPTH {
        let Some(node) = lists.get(id) else {
            break;
        };
        let rank = tcpmgm_best_in(
            u64::from(id) | u64::from(node.shapes) << 32,
            conn,
            local01,
            local23,
        );
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
