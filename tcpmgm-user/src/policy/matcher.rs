//! The reference matcher: the one specification of which rule wins. The compiler, `tcpmgm
//! match` and the tests are all checked against it.
//!
//! Rules are tried in OpenSIPS's order, made total: priority ascending; a specific proto before
//! `any`; a set remote_addr before any; longer remote prefix first; a set remote_port before 0;
//! a set local_addr before any; longer local prefix first; a set local_port before 0; and
//! finally the lowest id. The first rule that matches wins.
use std::cmp::{Ordering, Reverse};

use crate::policy::listener::Lookup;
use crate::policy::rule::Rule;

/// The sort key of a rule in match order.
type OrderKey = (
    i32,
    bool,
    bool,
    Reverse<u8>,
    bool,
    bool,
    Reverse<u8>,
    bool,
    u32,
);

fn order_key(r: &Rule) -> OrderKey {
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
}

/// Compares two rules in match order.
pub fn match_order(a: &Rule, b: &Rule) -> Ordering {
    order_key(a).cmp(&order_key(b))
}

/// Why `a` comes before `b` in match order: the first key of the order on which they differ.
pub fn deciding_key(a: &Rule, b: &Rule) -> &'static str {
    let keys: [(&'static str, Ordering); 9] = [
        ("lower priority", a.priority.cmp(&b.priority)),
        (
            "a specific proto",
            a.proto.is_none().cmp(&b.proto.is_none()),
        ),
        (
            "a set remote_addr",
            a.remote.is_none().cmp(&b.remote.is_none()),
        ),
        (
            "a longer remote prefix",
            Reverse(a.remote.map_or(0, |n| n.prefix_len()))
                .cmp(&Reverse(b.remote.map_or(0, |n| n.prefix_len()))),
        ),
        (
            "a set remote_port",
            (a.remote_port == 0).cmp(&(b.remote_port == 0)),
        ),
        (
            "a set local_addr",
            a.local.is_none().cmp(&b.local.is_none()),
        ),
        (
            "a longer local prefix",
            Reverse(a.local_net().map_or(0, |n| n.prefix_len()))
                .cmp(&Reverse(b.local_net().map_or(0, |n| n.prefix_len()))),
        ),
        (
            "a set local_port",
            (a.local_port == 0).cmp(&(b.local_port == 0)),
        ),
        ("a lower id", a.id.cmp(&b.id)),
    ];
    keys.iter()
        .find(|(_, o)| *o != Ordering::Equal)
        .map_or("the same rule", |(k, _)| k)
}

/// Sorts rules into match order.
pub fn sort(rules: &mut [Rule]) {
    rules.sort_by_cached_key(order_key);
}

/// Does `rule` apply to the connection `key` describes? The remote side is all but the remote
/// address, which `rule_contains_remote` checks.
pub fn matches(rule: &Rule, key: &Lookup) -> bool {
    rule_contains_remote(rule, key) && matches_except_remote(rule, key)
}

fn rule_contains_remote(rule: &Rule, key: &Lookup) -> bool {
    rule.remote.is_none_or(|net| net.contains(&key.remote))
}

/// Every key of the rule but its remote address.
pub fn matches_except_remote(rule: &Rule, key: &Lookup) -> bool {
    rule.proto.is_none_or(|p| key.proto == Some(p))
        && (rule.remote_port == 0 || rule.remote_port == key.remote_port)
        && rule
            .local_net()
            .is_none_or(|net| key.local.is_some_and(|ip| net.contains(&ip)))
        && (rule.local_port == 0 || rule.local_port == key.local_port)
}

/// The winning rule among `sorted` (in match order), or None: the system defaults apply.
pub fn first_match<'a>(sorted: &'a [Rule], key: &Lookup) -> Option<&'a Rule> {
    sorted.iter().find(|r| matches(r, key))
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use proptest::prelude::*;

    use super::*;
    use crate::policy::rule::{LocalMatch, Profile, Proto};

    fn rule(id: u32) -> Rule {
        Rule {
            id,
            priority: 0,
            proto: None,
            remote: None,
            remote_port: 0,
            local: None,
            local_port: 0,
            profile: Profile::default(),
        }
    }

    fn key(
        remote: &str,
        port: u16,
        proto: Option<&str>,
        local: Option<&str>,
        local_port: u16,
    ) -> Lookup {
        Lookup {
            proto: proto.map(|p| Proto::parse(p).unwrap().unwrap()),
            remote: remote.parse().unwrap(),
            remote_port: port,
            local: local.map(|l| l.parse().unwrap()),
            local_port,
            why: String::new(),
        }
    }

    fn winner(mut rules: Vec<Rule>, k: &Lookup) -> Option<u32> {
        sort(&mut rules);
        first_match(&rules, k).map(|r| r.id)
    }

    #[test]
    fn each_key_of_the_order_decides() {
        let k = key("192.0.2.7", 5060, Some("tls"), Some("10.0.0.1"), 5061);
        let tls = Some(Proto::parse("tls").unwrap().unwrap());
        let net = |s: &str| Some(s.parse().unwrap());
        let local = |s: &str| {
            Some(LocalMatch {
                net: s.parse().unwrap(),
                tag: None,
            })
        };
        // Each pair: the first rule beats the second on exactly one key of the order.
        let pairs: Vec<(Rule, Rule)> = vec![
            (
                Rule {
                    priority: -1,
                    ..rule(20)
                },
                Rule {
                    proto: tls,
                    ..rule(10)
                },
            ),
            (
                Rule {
                    proto: tls,
                    ..rule(20)
                },
                rule(10),
            ),
            (
                Rule {
                    remote: net("0.0.0.0/0"),
                    ..rule(20)
                },
                rule(10),
            ),
            (
                Rule {
                    remote: net("192.0.2.0/25"),
                    ..rule(20)
                },
                Rule {
                    remote: net("192.0.2.0/24"),
                    ..rule(10)
                },
            ),
            (
                Rule {
                    remote_port: 5060,
                    ..rule(20)
                },
                rule(10),
            ),
            (
                Rule {
                    local: local("10.0.0.0/8"),
                    ..rule(20)
                },
                rule(10),
            ),
            (
                Rule {
                    local: local("10.0.0.1/32"),
                    ..rule(20)
                },
                Rule {
                    local: local("10.0.0.0/8"),
                    ..rule(10)
                },
            ),
            (
                Rule {
                    local_port: 5061,
                    ..rule(20)
                },
                rule(10),
            ),
            (rule(10), rule(20)),
        ];
        for (better, worse) in pairs {
            let want = better.id;
            assert_eq!(
                winner(vec![worse.clone(), better.clone()], &k),
                Some(want),
                "{better:?} vs {worse:?}"
            );
            assert_eq!(winner(vec![better, worse], &k), Some(want));
        }
    }

    #[test]
    fn keys_that_do_not_match_are_skipped() {
        let k = key("192.0.2.7", 5060, None, None, 0);
        let tls = Some(Proto::parse("tls").unwrap().unwrap());
        let rules = vec![
            Rule {
                proto: tls,
                ..rule(1)
            },
            Rule {
                remote_port: 5061,
                ..rule(2)
            },
            Rule {
                local: Some(LocalMatch {
                    net: "10.0.0.0/8".parse().unwrap(),
                    tag: None,
                }),
                ..rule(3)
            },
            Rule {
                local_port: 5060,
                ..rule(4)
            },
            Rule {
                remote: Some("2001:db8::/32".parse().unwrap()),
                ..rule(5)
            },
        ];
        assert_eq!(winner(rules.clone(), &k), None);
        let mut with_any = rules;
        with_any.push(rule(6));
        assert_eq!(winner(with_any, &k), Some(6));
    }

    fn arb_rule() -> impl Strategy<Value = Rule> {
        (
            1u32..50,
            -2i32..3,
            prop::option::of(1u8..4),
            prop::option::of((any::<u32>(), 0u8..=32)),
            prop::sample::select(vec![0u16, 5060, 5061]),
            prop::option::of(0u8..=32),
            prop::sample::select(vec![0u16, 5060, 5061]),
        )
            .prop_map(
                |(id, priority, proto, remote, remote_port, local, local_port)| Rule {
                    id,
                    priority,
                    proto: proto.map(|p| {
                        Proto::parse(tcpmgm_common::PROTOCOLS[p as usize - 1])
                            .unwrap()
                            .unwrap()
                    }),
                    remote: remote.map(|(a, l)| {
                        ipnet::IpNet::new(IpAddr::from(a.to_be_bytes()), l)
                            .unwrap()
                            .trunc()
                    }),
                    remote_port,
                    local: local.map(|l| LocalMatch {
                        net: ipnet::IpNet::new("10.0.0.1".parse().unwrap(), l)
                            .unwrap()
                            .trunc(),
                        tag: None,
                    }),
                    local_port,
                    profile: Profile::default(),
                },
            )
    }

    proptest! {
        /// The order is total and consistent: sorting any permutation gives the same sequence,
        /// and the winner is a matching rule that no matching rule precedes.
        #[test]
        fn order_is_total_and_winner_is_minimal(mut rules in prop::collection::vec(arb_rule(), 1..30), addr in any::<u32>(), port in prop::sample::select(vec![5060u16, 5061, 7000])) {
            let mut seen = std::collections::HashSet::new();
            rules.retain(|r| seen.insert(r.id));
            let k = key(&IpAddr::from(addr.to_be_bytes()).to_string(), port, Some("tls"), Some("10.0.0.1"), 5061);
            let mut a = rules.clone();
            let mut b = rules.clone();
            b.reverse();
            sort(&mut a);
            sort(&mut b);
            prop_assert_eq!(&a, &b);
            for w in a.windows(2) {
                prop_assert_eq!(match_order(&w[0], &w[1]), Ordering::Less);
            }
            if let Some(win) = first_match(&a, &k) {
                prop_assert!(matches(win, &k));
                for r in rules.iter().filter(|r| matches(r, &k)) {
                    prop_assert!(match_order(win, r) != Ordering::Greater);
                }
            } else {
                prop_assert!(rules.iter().all(|r| !matches(r, &k)));
            }
        }
    }
}
