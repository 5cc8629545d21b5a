//! A compiled policy evaluated on the host by the kernel's own decision code
//! (`tcpmgm_common::decide`), over the map contents the loader writes: the longest-prefix
//! lookups of the tries done as the kernel does them. The property tests below compare it with
//! an independent reading of the match order over the rule list, without root or a kernel.
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ipnet::IpNet;
use tcpmgm_common::decide::{self, Conn, PolicyMaps};
use tcpmgm_common::{Bucket, BucketKey, ListNode, ListenerInfo, ListenerKey, NO_RULE};

use crate::policy::compile::Policy;
use crate::policy::rule::fold_v4_mapped;

/// A prefix as the tries hold it: (prefix length, network address as a number).
type Prefix = (u8, u128);

/// The maps of a compiled policy, in host memory.
pub struct Compiled<'a> {
    policy: &'a Policy,
    listeners: HashMap<ListenerKey, ListenerInfo>,
    buckets: HashMap<BucketKey, Bucket>,
    /// By family (0: IPv4, 1: IPv6).
    remote: [HashMap<((), Prefix), u32>; 2],
    /// By family, then (local trie id, prefix).
    local: [HashMap<(u32, Prefix), u32>; 2],
}

fn prefix(net: &IpNet) -> Prefix {
    let len = net.prefix_len();
    let bits = match net.network() {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    };
    (len, bits)
}

/// The number of an address given as network-order words (`Conn`'s form).
fn number(v6: bool, words: &[u32; 4]) -> u128 {
    if v6 {
        let mut bytes = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        u128::from_be_bytes(bytes)
    } else {
        u128::from(u32::from_be_bytes(words[0].to_ne_bytes()))
    }
}

/// The longest prefix of `table` under `key` holding `addr`, as an LPM trie answers.
fn longest<K: Copy + Eq + std::hash::Hash>(
    table: &HashMap<(K, Prefix), u32>,
    key: K,
    v6: bool,
    addr: u128,
) -> Option<u32> {
    let width: u8 = if v6 { 128 } else { 32 };
    (0..=width).rev().find_map(|len| {
        let shift = u32::from(width - len);
        let net = if shift >= 128 {
            0
        } else {
            addr >> shift << shift
        };
        table.get(&(key, (len, net))).copied()
    })
}

impl<'a> Compiled<'a> {
    pub fn new(policy: &'a Policy) -> Compiled<'a> {
        let family = |net: &IpNet| usize::from(matches!(net, IpNet::V6(_)));
        let mut remote = [HashMap::new(), HashMap::new()];
        for (net, list) in policy.remote_v4.iter().chain(&policy.remote_v6) {
            remote[family(net)].insert(((), prefix(net)), *list);
        }
        let mut local = [HashMap::new(), HashMap::new()];
        for (id, net, rank) in policy.local_v4.iter().chain(&policy.local_v6) {
            local[family(net)].insert((*id, prefix(net)), *rank);
        }
        Compiled {
            policy,
            listeners: policy.listeners.iter().copied().collect(),
            buckets: policy.buckets.iter().copied().collect(),
            remote,
            local,
        }
    }

    /// The id of the rule the kernel would choose for `conn`, or None.
    pub fn winner(&self, conn: &Conn) -> Option<u32> {
        let rank = decide::decide(self, conn);
        (rank != NO_RULE).then(|| self.policy.rules[rank as usize].id)
    }
}

impl PolicyMaps for Compiled<'_> {
    fn listener(&self, key: &ListenerKey) -> Option<ListenerInfo> {
        self.listeners.get(key).copied()
    }

    fn remote_list(&self, v6: bool, remote: &[u32; 4]) -> Option<u32> {
        longest(&self.remote[usize::from(v6)], (), v6, number(v6, remote))
    }

    fn list(&self, id: u32) -> Option<ListNode> {
        self.policy.lists.get(id as usize).copied()
    }

    fn bucket(&self, key: &BucketKey) -> Option<Bucket> {
        self.buckets.get(key).copied()
    }

    fn local_rank(&self, v6: bool, local: u32, addr: &[u32; 4]) -> Option<u32> {
        longest(&self.local[usize::from(v6)], local, v6, number(v6, addr))
    }
}

/// A connection as the kernel's hooks would see it: the peer, the socket's own address (None
/// before an unbound socket's connect()), and which way it goes.
pub fn conn(remote: SocketAddr, local: Option<SocketAddr>, passive: bool) -> Conn {
    let remote_ip = fold_v4_mapped(remote.ip());
    let v6 = remote_ip.is_ipv6();
    let (local_ip, local_port) = match local {
        // A v4-mapped local address goes with a v4-mapped peer; a native one as it is.
        Some(l) => {
            let ip = fold_v4_mapped(l.ip());
            let ip = match (v6, ip) {
                (false, IpAddr::V6(_)) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                (true, IpAddr::V4(a)) => IpAddr::V6(a.to_ipv6_mapped()),
                (_, ip) => ip,
            };
            (Some(ip), l.port())
        }
        None => (None, 0),
    };
    Conn {
        v6,
        remote: crate::policy::compile::addr_words(remote_ip),
        remote_port: remote.port(),
        local: local_ip
            .filter(|ip| !ip.is_unspecified())
            .map_or([0; 4], crate::policy::compile::addr_words),
        local_port,
        passive,
    }
}

#[cfg(test)]
mod tests {
    use std::cmp::Reverse;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    use super::*;
    use crate::policy::compile::compile;
    use crate::policy::listener::{Direction, Listeners, Lookup};
    use crate::policy::rule::{LocalMatch, Profile, Proto, Rule};

    /// Peers near the rules' prefixes, so that tables and connections meet often.
    const PEERS_V4: [&str; 7] = [
        "10.1.2.3",
        "10.1.2.200",
        "10.1.9.9",
        "10.200.0.1",
        "192.0.2.7",
        "198.51.100.1",
        "127.0.0.1",
    ];
    const PEERS_V6: [&str; 5] = [
        "2001:db8:1::5",
        "2001:db8:1::6",
        "2001:db8:2::1",
        "2001:db9::1",
        "::1",
    ];
    const LOCALS_V4: [&str; 4] = ["10.0.0.1", "10.0.0.7", "127.0.0.1", "0.0.0.0"];
    const LOCALS_V6: [&str; 3] = ["2001:db8::1", "2001:db8::7", "::"];
    const LISTENERS: [&str; 7] = [
        "tcp:10.0.0.1:5060",
        "tls:10.0.0.1:5061",
        "ws:*:5080",
        "tcp:[2001:db8::1]:5060",
        "tls:*:5061",
        "tcp:127.0.0.1:5060",
        "wss:[::]:5090",
    ];

    fn proto(name: &str) -> Option<Proto> {
        Proto::parse(name).unwrap()
    }

    /// A prefix of one of the peers, of any length: random tables of nested prefixes.
    fn arb_net(v4: &'static [&'static str], v6: &'static [&'static str]) -> BoxedStrategy<IpNet> {
        prop_oneof![
            (prop::sample::select(v4), 0u8..=32)
                .prop_map(|(a, len)| { IpNet::new(a.parse().unwrap(), len).unwrap().trunc() }),
            (prop::sample::select(v6), 0u8..=128)
                .prop_map(|(a, len)| { IpNet::new(a.parse().unwrap(), len).unwrap().trunc() }),
        ]
        .boxed()
    }

    fn arb_rule() -> impl Strategy<Value = Rule> {
        (
            prop::sample::select(vec![-1, 0, 0, 1]),
            prop::sample::select(vec!["any", "any", "tcp", "tls", "ws", "wss"]),
            prop::option::weighted(0.8, arb_net(&PEERS_V4, &PEERS_V6)),
            prop::sample::select(vec![0u16, 0, 5060, 5061]),
            prop::option::weighted(0.3, arb_net(&LOCALS_V4[..3], &LOCALS_V6[..2])),
            prop::sample::select(vec![0u16, 0, 5060, 5061, 5080]),
        )
            .prop_map(
                |(priority, p, remote, remote_port, local, local_port)| Rule {
                    id: 0,
                    priority,
                    proto: proto(p),
                    remote,
                    remote_port,
                    local: local.map(|net| LocalMatch { net, tag: None }),
                    local_port,
                    profile: Profile::default(),
                },
            )
    }

    /// A connection: peer, the socket's own address (None: unbound), accepted or opened.
    fn arb_conn() -> impl Strategy<Value = (SocketAddr, Option<SocketAddr>, bool)> {
        let port = || prop::sample::select(vec![5060u16, 5061, 40000]);
        let v4 = (
            prop::sample::select(&PEERS_V4[..]),
            any::<bool>(),
            prop::sample::select(&LOCALS_V4[..]),
        )
            .prop_map(|(peer, mapped, local)| {
                let peer: Ipv4Addr = peer.parse().unwrap();
                let local: Ipv4Addr = local.parse().unwrap();
                if mapped {
                    (
                        IpAddr::V6(peer.to_ipv6_mapped()),
                        IpAddr::V6(local.to_ipv6_mapped()),
                    )
                } else {
                    (IpAddr::V4(peer), IpAddr::V4(local))
                }
            });
        let v6 = (
            prop::sample::select(&PEERS_V6[..]),
            prop::sample::select(&LOCALS_V6[..]),
        )
            .prop_map(|(peer, local)| {
                (
                    peer.parse::<IpAddr>().unwrap(),
                    local.parse::<IpAddr>().unwrap(),
                )
            });
        (
            prop_oneof![3 => v4, 1 => v6],
            port(),
            any::<bool>(),
            any::<bool>(),
            prop::sample::select(vec![0u16, 5060, 5061, 5080, 5090, 45000]),
        )
            .prop_map(|((peer, local), peer_port, passive, bound, local_port)| {
                let local = SocketAddr::new(local, local_port);
                let local = if passive {
                    // An accepted socket has its full local address and port.
                    let ip = match local.ip() {
                        IpAddr::V4(a) if a.is_unspecified() => IpAddr::V4([10, 0, 0, 7].into()),
                        IpAddr::V6(a) if a.is_unspecified() => "2001:db8::7".parse().unwrap(),
                        IpAddr::V6(a) if a == Ipv4Addr::UNSPECIFIED.to_ipv6_mapped() => {
                            IpAddr::V6(Ipv4Addr::new(10, 0, 0, 7).to_ipv6_mapped())
                        }
                        ip => ip,
                    };
                    Some(SocketAddr::new(
                        ip,
                        if local_port == 0 { 5060 } else { local_port },
                    ))
                } else {
                    bound.then_some(local)
                };
                (SocketAddr::new(peer, peer_port), local, passive)
            })
    }

    /// The match order as the README states it, read over the rule list: the first matching
    /// rule by priority, a specific proto, a set remote, a longer remote prefix, a set remote
    /// port, a set local, a longer local prefix, a set local port, the lowest id.
    fn reference(rules: &[Rule], key: &Lookup) -> Option<u32> {
        let holds = |net: Option<IpNet>, ip: Option<IpAddr>| {
            net.is_none_or(|n| ip.is_some_and(|ip| n.contains(&ip)))
        };
        rules
            .iter()
            .filter(|r| {
                r.proto.is_none_or(|p| key.proto == Some(p))
                    && holds(r.remote, Some(key.remote))
                    && (r.remote_port == 0 || r.remote_port == key.remote_port)
                    && holds(r.local_net(), key.local)
                    && (r.local_port == 0 || r.local_port == key.local_port)
            })
            .min_by_key(|r| {
                (
                    r.priority,
                    r.proto.is_none(),
                    r.remote.is_none(),
                    Reverse(r.remote.map_or(0, |n| n.prefix_len())),
                    r.remote_port == 0,
                    r.local.is_none(),
                    Reverse(r.local_net().map_or(0, |n| n.prefix_len())),
                    r.local_port == 0,
                    r.id,
                )
            })
            .map(|r| r.id)
    }

    /// Random tables (nested prefixes of both families, ports, local addresses, listeners),
    /// compiled, then evaluated by the kernel's decision code for random connections (IPv4,
    /// IPv6 and v4-mapped peers, accepted and opened, bound and unbound), against the match
    /// order read over the rule list.
    #[test]
    fn compiled_tables_decide_as_the_match_order_says() {
        let connections = AtomicUsize::new(0);
        let tables = AtomicUsize::new(0);
        let case = (
            prop::collection::vec(arb_rule(), 1..40),
            prop::sample::subsequence(LISTENERS.to_vec(), 0..=4),
            prop::collection::vec(arb_conn(), 64),
        );
        let mut runner = TestRunner::new(Config {
            cases: 400,
            failure_persistence: None,
            ..Config::default()
        });
        let result = runner.run(&case, |(mut rules, specs, conns)| {
            for (i, r) in rules.iter_mut().enumerate() {
                r.id = i as u32 + 1;
            }
            let listeners = Listeners::parse_all(specs.iter().copied()).unwrap();
            let policy = compile(rules.clone(), &listeners, 250).unwrap();
            let kernel = Compiled::new(&policy);
            for (remote, local, passive) in conns {
                let direction = if passive {
                    Direction::Inbound
                } else {
                    Direction::Outbound
                };
                let key = listeners.lookup(direction, remote, local);
                let c = conn(remote, local, passive);
                prop_assert_eq!(
                    kernel.winner(&c),
                    reference(&rules, &key),
                    "{} -> {:?} ({:?}), listeners {:?}, rules {:#?}",
                    remote,
                    local,
                    direction,
                    specs,
                    rules
                );
                connections.fetch_add(1, Ordering::Relaxed);
            }
            tables.fetch_add(1, Ordering::Relaxed);
            Ok(())
        });
        if let Err(e) = result {
            panic!("{e}");
        }
        let (tables, connections) = (tables.into_inner(), connections.into_inner());
        eprintln!("{tables} random tables, {connections} connections: no disagreement");
        assert!(connections >= 10_000, "only {connections} connections");
    }

    /// The evaluator's own lookups: the longest prefix wins, in both families.
    #[test]
    fn the_tries_answer_the_longest_prefix() {
        let mut table = HashMap::new();
        for (net, v) in [("10.0.0.0/8", 1), ("10.1.0.0/16", 2), ("0.0.0.0/0", 0)] {
            table.insert(((), prefix(&net.parse().unwrap())), v);
        }
        let addr = |s: &str| u128::from(u32::from(s.parse::<Ipv4Addr>().unwrap()));
        assert_eq!(longest(&table, (), false, addr("10.1.2.3")), Some(2));
        assert_eq!(longest(&table, (), false, addr("10.2.2.3")), Some(1));
        assert_eq!(longest(&table, (), false, addr("11.0.0.1")), Some(0));
        let mut v6 = HashMap::new();
        v6.insert(((), prefix(&"2001:db8::/32".parse().unwrap())), 7);
        let a: std::net::Ipv6Addr = "2001:db8::1".parse().unwrap();
        assert_eq!(longest(&v6, (), true, u128::from(a)), Some(7));
        assert_eq!(longest(&v6, (), true, 1), None);
    }
}
