//! Where validated rules become the kernel's policy: the contents of every map, computed here so
//! that the programs only look up and act, in a bounded number of lookups however many rules
//! there are.
//!
//! Rules are sorted into match order (`matcher`); a rule's position is its rank, and the lowest
//! rank among the rules that match wins. The layout:
//!
//! - Lists. The rules whose remote side is any (or the family's /0) form the family's root list.
//!   Every other distinct remote prefix P gets a list of the rules of P alone, and a node that
//!   names its parent: the list of the nearest rule prefix containing P (the root at the top).
//!   A peer's rules are those of the lists on the way from the longest rule prefix holding it
//!   (found by the remote LPM tries, or, for /32 and /128, by exact-address hash maps looked up
//!   first) up to its family's root. The walk is bounded by the nesting of prefix lengths (at
//!   most 33 lists for IPv4, 129 for IPv6), and stops early: a node also knows the best rank
//!   of every rule above it (its floor), so once the walk holds a better one it is done.
//! - Buckets. A list is split by (proto, remote_port, local_port), each 0 for any: a connection
//!   meets at most 8 buckets per list, one per shape (which of the three are set), found by hash.
//!   Each list records the shapes it has, so absent ones cost nothing.
//! - Local tries. In a bucket, rules differ only by local address and rank. The bucket keeps the
//!   best rank of its rules without a local address; if some name one, a local LPM trie entry per
//!   distinct local prefix Q holds the best rank of the bucket's rules whose local side contains
//!   Q (local any included), so the longest match for the socket's address is the bucket's answer.
//!
//! Thousands of rules on one prefix that differ by port fall into separate buckets, and those that
//! differ by local address into one trie: no lookup walks a list. Every rule is stored once,
//! however its prefix nests: at most one member of one list, one bucket, one local trie entry,
//! plus its profile, and at most one list node and one prefix entry. The memory is linear in the
//! rules for any table shape; the price of nesting is paid at lookup, one list per level.
use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;
use tcpmgm_common::{
    Bucket, BucketKey, FAMILY_V4, FAMILY_V6, ListNode, ListenerInfo, ListenerKey, NO_LIST,
    NO_LOCAL, NO_RULE, PROTO_ANY, Profile, ROOT_V4, ROOT_V6, flags, settings, shape,
};

use crate::policy::column;
use crate::policy::listener::{Listener, Listeners};
use crate::policy::matcher;
use crate::policy::rule::Rule;

/// Everything the kernel maps will hold.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// The rules in match order; `profiles[rank]` belongs to `rules[rank]`.
    pub rules: Vec<Rule>,
    pub profiles: Vec<Profile>,
    /// The lists' nodes by list id: the two roots, then one per distinct remote prefix.
    pub lists: Vec<ListNode>,
    /// Each remote prefix with its list id.
    pub remote_v4: Vec<(IpNet, u32)>,
    pub remote_v6: Vec<(IpNet, u32)>,
    pub buckets: Vec<(BucketKey, Bucket)>,
    /// (local id, prefix, best rank).
    pub local_v4: Vec<(u32, IpNet, u32)>,
    pub local_v6: Vec<(u32, IpNet, u32)>,
    pub listeners: Vec<(ListenerKey, ListenerInfo)>,
    /// `settings::*` bits: how the generation is enforced.
    pub settings: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("{rules} rules: ranks are 32-bit, so a rule set holds fewer than {max}")]
    TooMany { rules: usize, max: u32 },
}

/// One rule as a member of one list.
struct Member {
    key: BucketKey,
    local: Option<IpNet>,
    rank: u32,
}

/// Whether a value of a `Use::UnlessDefault` column is enforced: not 0 (off), and not the
/// schema's default unless `default_too`.
fn unless_default(column: &column::Column, value: u32, default_too: bool) -> bool {
    value != 0 && (i64::from(value) != column.default_int() || default_too)
}

/// How the rules are enforced, beyond what their rows say: the daemon's options.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Enforcement {
    /// Enforce connect_timeout also where a rule keeps OpenSIPS's schema default (100 ms).
    /// Every OpenSIPS row carries it unless set, and OpenSIPS applies it to SIP connections
    /// only; applied by the kernel to every connection of the cgroup it would cut the SIP
    /// server's database or HTTP connects at 100 ms. So by default it is left alone.
    pub default_connect_timeout: bool,
    /// Enforce con_lifetime also where a rule keeps OpenSIPS's default (120 s), which would
    /// otherwise close every connection of the cgroup idle for two minutes.
    pub default_lifetime: bool,
    /// Decide and count, but refuse nothing, close nothing and set nothing.
    pub audit: bool,
    /// Let the application's own setsockopt() change the options a rule sets.
    pub app_options_allow: bool,
}

impl Enforcement {
    /// Whether a rule's connect_timeout (ms) bounds the handshake.
    pub fn connect_timeout(&self, ms: u32) -> bool {
        unless_default(&column::CONNECT_TIMEOUT, ms, self.default_connect_timeout)
    }

    /// Whether a rule's con_lifetime (s) closes its idle connections.
    pub fn con_lifetime(&self, s: u32) -> bool {
        unless_default(&column::CON_LIFETIME, s, self.default_lifetime)
    }

    /// The generation header's `settings::*` bits.
    fn settings(&self) -> u32 {
        let mut s = 0;
        if self.audit {
            s |= settings::AUDIT;
        }
        if self.app_options_allow {
            s |= settings::APP_OPTIONS_ALLOW;
        }
        s
    }
}

/// Compiles rules (any order) for a kernel whose tick rate is `hz`, with the default
/// enforcement.
pub fn compile(rules: Vec<Rule>, listeners: &Listeners, hz: u32) -> Result<Policy, CompileError> {
    compile_with(rules, listeners, hz, Enforcement::default())
}

/// Compiles rules (any order) for a kernel whose tick rate is `hz`.
pub fn compile_with(
    mut rules: Vec<Rule>,
    listeners: &Listeners,
    hz: u32,
    enforcement: Enforcement,
) -> Result<Policy, CompileError> {
    if rules.len() >= NO_RULE as usize {
        return Err(CompileError::TooMany {
            rules: rules.len(),
            max: NO_RULE,
        });
    }
    matcher::sort(&mut rules);
    let mut policy = Policy {
        profiles: rules
            .iter()
            .enumerate()
            .map(|(rank, r)| kernel_profile(r, rank as u32, hz, &enforcement))
            .collect(),
        settings: enforcement.settings(),
        listeners: listener_entries(listeners),
        lists: vec![
            ListNode {
                shapes: 0,
                parent: NO_LIST,
                floor: NO_RULE,
            };
            2
        ],
        ..Policy::default()
    };
    let member = |list: u32, rank: usize| {
        let r = &rules[rank];
        Member {
            key: BucketKey::new(
                list,
                r.proto.map_or(PROTO_ANY, |p| p.id()),
                r.remote_port,
                r.local_port,
            ),
            local: r.local_net(),
            rank: rank as u32,
        }
    };

    let mut members: Vec<Member> = Vec::with_capacity(rules.len());
    for (v4, root) in [(true, ROOT_V4), (false, ROOT_V6)] {
        let zero: IpNet = if v4 { "0.0.0.0/0" } else { "::/0" }
            .parse()
            .expect("literal");
        let is_root = |r: &Rule| r.remote.is_none_or(|n| n == zero);
        let root_members: Vec<usize> = (0..rules.len()).filter(|&i| is_root(&rules[i])).collect();
        // Ranks are indexes in match order: a list's best is its first member.
        let root_best = root_members.first().map_or(NO_RULE, |&i| i as u32);
        members.extend(root_members.into_iter().map(|i| member(root, i)));

        // Distinct prefixes of the family in (network, length) order: a prefix's ancestors come
        // before it, so a stack of the open ancestors gives each prefix its parent.
        let mut by_prefix: Vec<(IpNet, usize)> = (0..rules.len())
            .filter_map(|i| {
                let r = &rules[i];
                r.remote
                    .filter(|n| n.addr().is_ipv4() == v4 && !is_root(r))
                    .map(|n| (n, i))
            })
            .collect();
        by_prefix.sort_unstable();
        // (prefix, its list, the best rank of its rules and of every rule above it)
        let mut stack: Vec<(IpNet, u32, u32)> = Vec::new();
        for group in by_prefix.chunk_by(|a, b| a.0 == b.0) {
            let prefix = group[0].0;
            while stack.last().is_some_and(|(top, ..)| !top.contains(&prefix)) {
                stack.pop();
            }
            let (parent, floor) = stack
                .last()
                .map_or((root, root_best), |&(_, list, best)| (list, best));
            let list = policy.lists.len() as u32;
            policy.lists.push(ListNode {
                shapes: 0,
                parent,
                floor,
            });
            let own_best = group
                .iter()
                .map(|&(_, i)| i as u32)
                .min()
                .unwrap_or(NO_RULE);
            members.extend(group.iter().map(|&(_, i)| member(list, i)));
            if v4 {
                &mut policy.remote_v4
            } else {
                &mut policy.remote_v6
            }
            .push((prefix, list));
            stack.push((prefix, list, own_best.min(floor)));
        }
    }

    build_buckets(members, &mut policy);
    policy.rules = rules;
    Ok(policy)
}

fn shape_of(key: &BucketKey) -> u32 {
    let mut s = 0;
    if key.proto != PROTO_ANY {
        s |= shape::PROTO;
    }
    if key.remote_port != 0 {
        s |= shape::REMOTE_PORT;
    }
    if key.local_port != 0 {
        s |= shape::LOCAL_PORT;
    }
    s
}

/// Groups members into buckets and their local tries, recording each list's shapes.
fn build_buckets(mut members: Vec<Member>, policy: &mut Policy) {
    // Local any (None) sorts first; within one local, the best rank first.
    members.sort_unstable_by_key(|m| (m.key, m.local, m.rank));
    let mut next_local = 0u32;
    for run in members.chunk_by(|a, b| a.key == b.key) {
        let key = run[0].key;
        policy.lists[key.list as usize].shapes |= 1 << shape_of(&key);
        let best_any = run
            .iter()
            .find(|m| m.local.is_none())
            .map_or(NO_RULE, |m| m.rank);
        let mut locals: Vec<(IpNet, u32)> = Vec::new();
        for same in run.chunk_by(|a, b| a.local == b.local) {
            if let Some(net) = same[0].local {
                locals.push((net, same[0].rank));
            }
        }
        let local = if locals.is_empty() {
            NO_LOCAL
        } else {
            let id = next_local;
            next_local += 1;
            // Sorted by (network, length): fold each prefix's ancestors' best into its own.
            let mut stack: Vec<(IpNet, u32)> = Vec::new();
            for (net, own) in locals {
                while stack.last().is_some_and(|(top, _)| !top.contains(&net)) {
                    stack.pop();
                }
                let inherited = stack.last().map_or(best_any, |(_, r)| *r);
                let best = own.min(inherited).min(best_any);
                if net.addr().is_ipv4() {
                    &mut policy.local_v4
                } else {
                    &mut policy.local_v6
                }
                .push((id, net, best));
                stack.push((net, best));
            }
            id
        };
        policy.buckets.push((
            key,
            Bucket {
                best: best_any,
                local,
            },
        ));
    }
}

/// An address as the kernel hands it to BPF: network-order words, IPv4 in word 0.
pub fn addr_words(ip: IpAddr) -> [u32; 4] {
    let mut w = [0u32; 4];
    match ip {
        IpAddr::V4(a) => w[0] = u32::from_ne_bytes(a.octets()),
        IpAddr::V6(a) => {
            for (i, chunk) in a.octets().chunks_exact(4).enumerate() {
                w[i] = u32::from_ne_bytes(chunk.try_into().expect("4 bytes"));
            }
        }
    }
    w
}

fn family(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 }
}

/// The initial SYN retransmission timeout for a connect timeout: a third of it, so that the SYN
/// is retried within the timeout, in jiffies. 0 (keep the kernel's 1 s) when that is not shorter.
pub fn syn_rto_jiffies(connect_timeout_ms: u32, hz: u32) -> u32 {
    if connect_timeout_ms == 0 {
        return 0;
    }
    let jiffies = (u64::from(connect_timeout_ms) * u64::from(hz) / 3000).max(1);
    if jiffies >= u64::from(hz) {
        0
    } else {
        jiffies as u32
    }
}

/// The profile a socket of `rule` carries in its record, as applications and `tcpmgm conns` read
/// it: one conversion, so `tcpmgm match` shows what the kernel will record.
pub fn recorded_profile(rule: &Rule) -> tcpmgm_common::client::SocketProfile {
    // Rank, HZ and enforcement only touch fields the record's reader does not show.
    let p = kernel_profile(rule, 0, 250, &Enforcement::default());
    tcpmgm_common::client::SocketProfile::from(&p)
}

/// The kernel's profile of `rule` at `rank`.
pub(crate) fn kernel_profile(
    rule: &Rule,
    rank: u32,
    hz: u32,
    enforcement: &Enforcement,
) -> Profile {
    let p = &rule.profile;
    let mut f = if p.keepalive {
        flags::KEEPALIVE_ON
    } else {
        flags::KEEPALIVE_OFF
    };
    if p.no_new_conn {
        f |= flags::NO_NEW_CONN;
    }
    if enforcement.connect_timeout(p.connect_timeout_ms) {
        f |= flags::CONNECT_TIMEOUT;
    }
    Profile {
        rule_id: rule.id,
        rank,
        flags: f,
        keepidle: p.keepidle,
        keepintvl: p.keepinterval,
        keepcnt: p.keepcount,
        connect_timeout_ms: p.connect_timeout_ms,
        syn_rto_jiffies: syn_rto_jiffies(p.connect_timeout_ms, hz),
        con_lifetime_s: p.con_lifetime_s,
        msg_read_timeout_s: p.msg_read_timeout_s,
        send_threshold_us: p.send_threshold_us,
        alias_mode: p.alias_mode,
        parallel_read: p.parallel_read.unwrap_or(0),
        _pad: [0; 2],
        attrs: kernel_attrs(&p.attrs),
    }
}

/// Attrs as the kernel keeps them (validation bounds their number and key length).
fn kernel_attrs(attrs: &[(String, i64)]) -> [tcpmgm_common::Attr; tcpmgm_common::MAX_ATTRS] {
    let mut out = [tcpmgm_common::Attr::default(); tcpmgm_common::MAX_ATTRS];
    for (slot, (key, value)) in out.iter_mut().zip(attrs) {
        slot.value = *value;
        slot.key[..key.len()].copy_from_slice(key.as_bytes());
    }
    out
}

/// The listener map: accepting listeners by address and port, and the outbound attribution by
/// local address (port 0), each resolved with the functions `tcpmgm match` uses.
fn listener_entries(listeners: &Listeners) -> Vec<(ListenerKey, ListenerInfo)> {
    let key = |addr: [u32; 4], port: u16, family: u8| ListenerKey {
        addr,
        port,
        family,
        _pad: 0,
    };
    let info = |l: &Listener| ListenerInfo {
        port: l.port,
        proto: l.proto.id(),
        _pad: 0,
    };
    let mut out = Vec::new();
    let specified: BTreeSet<IpAddr> = listeners
        .iter()
        .map(|l| l.addr)
        .filter(|a| !a.is_unspecified())
        .collect();
    let wildcard_ports: BTreeSet<u16> = listeners
        .iter()
        .filter(|l| l.addr.is_unspecified())
        .map(|l| l.port)
        .collect();
    for l in listeners.iter().filter(|l| !l.addr.is_unspecified()) {
        out.push((key(addr_words(l.addr), l.port, family(l.addr)), info(l)));
    }
    for (v4, fam) in [(true, FAMILY_V4), (false, FAMILY_V6)] {
        for &port in &wildcard_ports {
            if let Some(l) = listeners.wildcard_accepting(v4, port) {
                out.push((key([0; 4], port, fam), info(l)));
            }
        }
        if let Some(l) = listeners.outbound_wildcard(v4) {
            out.push((key([0; 4], 0, fam), info(l)));
        }
    }
    for &addr in &specified {
        if let Some(l) = listeners.outbound_from(addr) {
            out.push((key(addr_words(addr), 0, family(addr)), info(l)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syn_rto_is_a_third_of_the_timeout_in_jiffies() {
        assert_eq!(syn_rto_jiffies(150, 250), 12);
        assert_eq!(syn_rto_jiffies(150, 1000), 50);
        assert_eq!(syn_rto_jiffies(1, 100), 1);
        assert_eq!(syn_rto_jiffies(3000, 250), 0);
        assert_eq!(syn_rto_jiffies(0, 250), 0);
    }
}
