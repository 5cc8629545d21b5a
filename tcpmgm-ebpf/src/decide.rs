//! The decision in the kernel: `tcpmgm_common::decide` (shared with the host, where the property
//! tests check it against the match order) over this generation's maps, behind two BPF global
//! functions that the verifier checks once each.
use aya_ebpf::bindings::{BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, bpf_sock_ops};
use aya_ebpf::btf_maps::lpm_trie::Key;
use tcpmgm_common::decide::{Conn, PolicyMaps, Search, best_in};
use tcpmgm_common::{
    Bucket, BucketKey, ListNode, ListenerInfo, ListenerKey, LocalKey4, LocalKey6, NO_RULE,
};

use crate::generation::Gen;

const AF_INET6: u32 = 10;

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

/// The address's bytes, in network order (each word's bytes as they lie in memory). A plain
/// copy: no zeroed buffer, which LLVM would fill with a call to memset, one more BPF call
/// frame in the deepest chain (sock_ops, tcpmgm_decide, tcpmgm_best_in), whose stack the
/// verifier caps at 512 bytes in all.
#[inline(always)]
pub fn v6_bytes(w: &[u32; 4]) -> [u8; 16] {
    // SAFETY: 16 bytes either way, and every bit pattern is a valid [u8; 16].
    unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(*w) }
}

/// One generation's maps, as the shared decision reads them.
struct Maps(Gen);

impl PolicyMaps for Maps {
    #[inline(always)]
    fn listener(&self, key: &ListenerKey) -> Option<ListenerInfo> {
        // SAFETY: the value is copied out at once.
        unsafe { self.0.listeners()?.get(*key) }.copied()
    }

    /// A full-length prefix is the longest there is: an exact hit needs no trie walk, which at
    /// a million peers is the difference (most rules name one peer).
    #[inline(always)]
    fn remote_list(&self, v6: bool, remote: &[u32; 4]) -> Option<u32> {
        let g = self.0;
        if v6 {
            let data = v6_bytes(remote);
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
            let data = remote[0].to_ne_bytes();
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
        }
    }

    #[inline(always)]
    fn list(&self, id: u32) -> Option<ListNode> {
        self.0.lists()?.get(id).copied()
    }

    #[inline(always)]
    fn bucket(&self, key: &BucketKey) -> Option<Bucket> {
        // SAFETY: the value is copied out at once.
        unsafe { self.0.buckets()?.get(*key) }.copied()
    }

    #[inline(always)]
    fn local_rank(&self, v6: bool, local: u32, addr: &[u32; 4]) -> Option<u32> {
        if v6 {
            let key = Key {
                prefix_len: 32 + 128,
                data: LocalKey6 {
                    local,
                    addr: v6_bytes(addr),
                },
            };
            self.0.local_v6()?.get(&key).copied()
        } else {
            let key = Key {
                prefix_len: 32 + 32,
                data: LocalKey4 {
                    local,
                    addr: addr[0].to_ne_bytes(),
                },
            };
            self.0.local_v4()?.get(&key).copied()
        }
    }

    #[inline(always)]
    fn best_in_list(&self, list: u32, shapes: u32, s: &Search) -> u32 {
        let (conn, local01, local23) = pack_search(s, self.0.number);
        tcpmgm_best_in(
            u64::from(list) | u64::from(shapes) << 32,
            conn,
            local01,
            local23,
        )
    }
}

/// A `Search` as arguments 2 to 4 of `tcpmgm_best_in` (argument 1 carries the list): proto in
/// bits 0-7, the remote port in 8-23, the local port in 24-39, IPv6 in bit 40, the generation's
/// slot in bit 41; then the local address's words.
#[inline(always)]
fn pack_search(s: &Search, slot: u32) -> (u64, u64, u64) {
    (
        u64::from(s.proto)
            | u64::from(s.remote_port) << 8
            | u64::from(s.local_port) << 24
            | u64::from(s.v6) << 40
            | u64::from(slot & 1) << 41,
        u64::from(s.local[0]) | u64::from(s.local[1]) << 32,
        u64::from(s.local[2]) | u64::from(s.local[3]) << 32,
    )
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
    let search = Search {
        proto: conn as u8,
        remote_port: (conn >> 8) as u16,
        local_port: (conn >> 24) as u16,
        v6: (conn >> 40) & 1 != 0,
        local: [
            local01 as u32,
            (local01 >> 32) as u32,
            local23 as u32,
            (local23 >> 32) as u32,
        ],
    };
    let maps = Maps(Gen::at_slot((conn >> 41) as u32 & 1));
    best_in(
        &maps,
        list_and_shapes as u32,
        (list_and_shapes >> 32) as u32,
        &search,
    )
}

/// The connection as the five scalar arguments of `tcpmgm_decide`: the ports, the flags and the
/// generation's slot in the first (remote port in bits 0-15, local port in 16-31, IPv6 in bit
/// 32, accepted in bit 33, the slot in bit 34), then the addresses' words in pairs.
#[inline(always)]
fn pack_conn(c: &Conn, slot: u32) -> [u64; 5] {
    let pair = |w: &[u32; 4], i: usize| u64::from(w[i]) | u64::from(w[i + 1]) << 32;
    [
        u64::from(c.remote_port)
            | u64::from(c.local_port) << 16
            | u64::from(c.v6) << 32
            | u64::from(c.passive) << 33
            | u64::from(slot & 1) << 34,
        pair(&c.remote, 0),
        pair(&c.remote, 2),
        pair(&c.local, 0),
        pair(&c.local, 2),
    ]
}

/// The rank of the winning rule (its index in `TCPMGM_PROFILES`), or None: no rule matches and
/// the system's settings stay.
#[inline(always)]
pub fn decide(g: &Gen, c: &Conn) -> Option<u32> {
    let [a, b, c2, d, e] = pack_conn(c, g.number);
    let rank = tcpmgm_decide(a, b, c2, d, e);
    (rank != NO_RULE).then_some(rank)
}

/// The decision itself, shared by every program: a global BPF function with scalar arguments
/// (the connection, see `pack_conn`), which the verifier checks once, on its own, rather than
/// inlined into each program (where, on Linux 5.10, LLVM's code read stack slots the verifier
/// took for uninitialised, and the walk up the lists multiplied each program's verification).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn tcpmgm_decide(a: u64, b: u64, c: u64, d: u64, e: u64) -> u32 {
    let words = |lo: u64, hi: u64| [lo as u32, (lo >> 32) as u32, hi as u32, (hi >> 32) as u32];
    let conn = Conn {
        remote_port: a as u16,
        local_port: (a >> 16) as u16,
        v6: (a >> 32) & 1 != 0,
        passive: (a >> 33) & 1 != 0,
        remote: words(b, c),
        local: words(d, e),
    };
    let maps = Maps(Gen::at_slot(((a >> 34) & 1) as u32));
    tcpmgm_common::decide::decide(&maps, &conn)
}

/// The connection a sock_ops callback is about (sock_ops and the outcome counters both ask).
/// Reads the addresses with one fixed-offset load per field (see `load_words`); for a v4-mapped
/// peer the kernel fills `remote_ip4`/`local_ip4` too, so those are read instead of picking
/// words out of the v6 fields.
#[inline(always)]
pub(crate) fn conn(ops: *const bpf_sock_ops) -> Conn {
    // SAFETY: `ops` is the program's context; each read is a plain ctx field load.
    unsafe {
        let rd = |p: *const u32| core::ptr::read_volatile(p);
        let passive = rd(&(*ops).op) == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB;
        let family = rd(&(*ops).family);
        let remote_port = u32::from_be(rd(&(*ops).remote_port)) as u16;
        let local_port = rd(&(*ops).local_port) as u16;
        let remote4 = rd(&(*ops).remote_ip4);
        let local4 = rd(&(*ops).local_ip4);
        let remote6 = load_words(&(*ops).remote_ip6);
        let local6 = load_words(&(*ops).local_ip6);
        if family == AF_INET6 && !is_v4_mapped(&remote6) {
            Conn {
                v6: true,
                remote: remote6,
                remote_port,
                local: local6,
                local_port,
                passive,
            }
        } else {
            Conn {
                v6: false,
                remote: [remote4, 0, 0, 0],
                remote_port,
                local: [local4, 0, 0, 0],
                local_port,
                passive,
            }
        }
    }
}
