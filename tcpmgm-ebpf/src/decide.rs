//! Which rule, if any, governs a connection. The loader did the hard part: each remote prefix in
//! the tries points at the rules that contain it, already in match order, so this walks that
//! list and takes the first rule whose other keys match.
use aya_ebpf::btf_maps::lpm_trie::Key;
use tcpmgm_common::{
    Candidate, FAMILY_V4, FAMILY_V6, LOCAL_ANY, ListenerKey, MAX_CANDIDATES, PROTO_ANY, Profile,
};

use crate::maps::{
    TCPMGM_CANDIDATES, TCPMGM_LISTENERS, TCPMGM_PROFILES, TCPMGM_REMOTE_V4, TCPMGM_REMOTE_V6,
};

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

#[inline(always)]
fn listener(key: ListenerKey) -> Option<(u8, u16)> {
    // SAFETY: the value is copied out at once; the entry may be replaced concurrently.
    unsafe { TCPMGM_LISTENERS.get(key) }.map(|l| (l.proto, l.port))
}

/// The protocol of the connection and the local port the rules' local_port is compared with.
/// Accepted connections belong to the listener they arrived on. Outbound ones belong to the
/// listener bound at their own address and port (a reused listener port), else to the listener
/// the loader attributed to their local address (port 0 entries), else to none.
#[inline(always)]
fn protocol_and_port(c: &Conn) -> (u8, u16) {
    let family = if c.v6 { FAMILY_V6 } else { FAMILY_V4 };
    let key = |addr: [u32; 4], port: u16| ListenerKey {
        addr,
        port,
        family,
        _pad: 0,
    };
    if c.passive {
        return listener(key(c.local, c.local_port))
            .or_else(|| listener(key([0; 4], c.local_port)))
            .unwrap_or((PROTO_ANY, c.local_port));
    }
    let local_known = (c.local[0] | c.local[1] | c.local[2] | c.local[3]) != 0;
    let bound = if local_known && c.local_port != 0 {
        listener(key(c.local, c.local_port))
    } else {
        None
    };
    bound
        .or_else(|| listener(key(c.local, 0)))
        .or_else(|| listener(key([0; 4], 0)))
        .unwrap_or((PROTO_ANY, 0))
}

#[inline(always)]
fn candidate_matches(cand: &Candidate, c: &Conn, proto: u8, local_port: u16) -> bool {
    if cand.proto != PROTO_ANY && cand.proto != proto {
        return false;
    }
    if cand.remote_port != 0 && cand.remote_port != c.remote_port {
        return false;
    }
    if cand.local_port != 0 && cand.local_port != local_port {
        return false;
    }
    if cand.local_family == LOCAL_ANY {
        return true;
    }
    let family = if c.v6 { FAMILY_V6 } else { FAMILY_V4 };
    let local_known = (c.local[0] | c.local[1] | c.local[2] | c.local[3]) != 0;
    cand.local_family == family
        && local_known
        && c.local[0] & cand.local_mask[0] == cand.local_addr[0]
        && c.local[1] & cand.local_mask[1] == cand.local_addr[1]
        && c.local[2] & cand.local_mask[2] == cand.local_addr[2]
        && c.local[3] & cand.local_mask[3] == cand.local_addr[3]
}

/// The profile of the winning rule, or None: no rule matches and the system's settings stay.
#[inline(always)]
pub fn decide(c: &Conn) -> Option<&'static tcpmgm_common::Profile> {
    let range = if c.v6 {
        let mut data = [0u8; 16];
        for (i, w) in c.remote.iter().enumerate() {
            data[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        TCPMGM_REMOTE_V6.get(&Key {
            prefix_len: 128,
            data,
        })?
    } else {
        TCPMGM_REMOTE_V4.get(&Key {
            prefix_len: 32,
            data: c.remote[0].to_ne_bytes(),
        })?
    };
    let (first, len) = (range.first, range.len);
    let (proto, local_port) = protocol_and_port(c);
    for i in 0..MAX_CANDIDATES {
        if i >= len {
            break;
        }
        let cand = TCPMGM_CANDIDATES.get(first.wrapping_add(i))?;
        if candidate_matches(cand, c, proto, local_port) {
            return profile(cand.profile);
        }
    }
    None
}

#[inline(always)]
fn profile(index: u32) -> Option<&'static Profile> {
    TCPMGM_PROFILES.get(index)
}
