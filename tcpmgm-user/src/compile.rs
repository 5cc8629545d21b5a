//! Where validated rules become the kernel's policy: the contents of every map, computed here so
//! that the programs only look up and act.
//!
//! Remote matching is the expensive part, so it is precomputed per remote prefix: for every
//! distinct remote prefix P of the rule set (plus the /0 of each family, which stands for rules
//! with remote_addr any), the candidate list of P holds, in match order, every rule whose remote
//! side contains P. A peer address's rules are exactly the candidates of the longest P holding
//! it (every rule prefix holding the address also holds that P), so an LPM trie lookup and a walk
//! of that list for the first rule whose other keys match gives the reference matcher's answer.
use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;
use tcpmgm_common::{
    Candidate, CandidateRange, FAMILY_V4, FAMILY_V6, LOCAL_ANY, ListenerInfo, ListenerKey,
    MAX_CANDIDATES, PROTO_ANY, Profile, flags,
};

use crate::listener::{Listener, Listeners};
use crate::matcher;
use crate::rule::Rule;

/// Everything the kernel maps will hold.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// The rules in match order; `profiles[i]` belongs to `rules[i]`.
    pub rules: Vec<Rule>,
    pub profiles: Vec<Profile>,
    pub candidates: Vec<Candidate>,
    pub remote_v4: Vec<(IpNet, CandidateRange)>,
    pub remote_v6: Vec<(IpNet, CandidateRange)>,
    pub listeners: Vec<(ListenerKey, ListenerInfo)>,
}

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error(
        "{count} rules apply to remote prefix {prefix} (rule ids {sample}...), more than the {max} one lookup may walk"
    )]
    TooManyCandidates {
        prefix: IpNet,
        count: usize,
        max: u32,
        sample: String,
    },
}

/// Compiles rules (any order) for a kernel whose tick rate is `hz`.
pub fn compile(
    mut rules: Vec<Rule>,
    listeners: &Listeners,
    hz: u32,
) -> Result<Policy, CompileError> {
    matcher::sort(&mut rules);
    let profiles = rules.iter().map(|r| kernel_profile(r, hz)).collect();
    let mut policy = Policy {
        profiles,
        listeners: listener_entries(listeners),
        ..Policy::default()
    };
    for v4 in [true, false] {
        let zero: IpNet = if v4 { "0.0.0.0/0" } else { "::/0" }
            .parse()
            .expect("literal");
        let prefixes: BTreeSet<IpNet> = rules
            .iter()
            .filter_map(|r| r.remote)
            .filter(|n| n.addr().is_ipv4() == v4)
            .chain([zero])
            .collect();
        for prefix in prefixes {
            let list: Vec<usize> = (0..rules.len())
                .filter(|&i| rules[i].remote.is_none_or(|n| n.contains(&prefix)))
                .collect();
            if list.is_empty() {
                continue;
            }
            if list.len() > MAX_CANDIDATES as usize {
                let sample: Vec<String> = list
                    .iter()
                    .take(5)
                    .map(|&i| rules[i].id.to_string())
                    .collect();
                return Err(CompileError::TooManyCandidates {
                    prefix,
                    count: list.len(),
                    max: MAX_CANDIDATES,
                    sample: sample.join(", "),
                });
            }
            let range = CandidateRange {
                first: policy.candidates.len() as u32,
                len: list.len() as u32,
            };
            policy
                .candidates
                .extend(list.iter().map(|&i| candidate(&rules[i], i as u32)));
            if v4 {
                &mut policy.remote_v4
            } else {
                &mut policy.remote_v6
            }
            .push((prefix, range));
        }
    }
    policy.rules = rules;
    Ok(policy)
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

fn candidate(rule: &Rule, profile: u32) -> Candidate {
    let (local_family, local_addr, local_mask) = match rule.local_net() {
        None => (LOCAL_ANY, [0; 4], [0; 4]),
        Some(net) => (
            family(net.addr()),
            addr_words(net.network()),
            addr_words(net.netmask()),
        ),
    };
    Candidate {
        local_addr,
        local_mask,
        profile,
        remote_port: rule.remote_port,
        local_port: rule.local_port,
        proto: rule.proto.map_or(PROTO_ANY, |p| p.id()),
        local_family,
        _pad: [0; 2],
    }
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

fn kernel_profile(rule: &Rule, hz: u32) -> Profile {
    let p = &rule.profile;
    let mut f = if p.keepalive {
        flags::KEEPALIVE_ON
    } else {
        flags::KEEPALIVE_OFF
    };
    if p.no_new_conn {
        f |= flags::NO_NEW_CONN;
    }
    Profile {
        rule_id: rule.id,
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
    }
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
