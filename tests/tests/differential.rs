//! The kernel against the reference matcher: rules that differ in each key of the match order,
//! and connections between addresses of a test namespace; every socket's observed outcome must
//! be the reference matcher's decision.
use std::net::SocketAddr;

use tcpmgm::policy::listener::{Direction, Listeners};
use tcpmgm::policy::matcher;
use tcpmgm::policy::rule::{Row, Rule};
use tcpmgm_tests::{Probe, Sandbox, compare_with_reference, idle_of, row, rules};

/// A small deterministic generator (xorshift64*), so a failing run can be replayed by seed.
struct Gen(u64);

impl Gen {
    fn pick<'a>(&mut self, options: &[&'a str]) -> &'a str {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let r = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        options[(r >> 33) as usize % options.len()]
    }
}

const LISTENERS: [&str; 7] = [
    "tcp:198.51.100.7:5060",
    "tls:198.51.100.7:5061",
    "tcp:192.0.2.1:5060 tag alpha",
    "tls:192.0.2.2:5061 tag beta",
    "ws:*:7000",
    "tls:[2001:db8:1::7]:5061",
    "tcp:[2001:db8::1]:5060 tag gamma",
];

fn table(seed: u64, count: i64) -> Vec<Row> {
    let mut g = Gen(seed);
    (1..=count)
        .map(|id| {
            let idle = (1000 + id).to_string();
            let remote = g.pick(&[
                "any",
                "any",
                "198.51.100.0/24",
                "198.51.100.0/25",
                "198.51.100.7",
                "198.51.100.128/25",
                "0.0.0.0/0",
                "192.0.2.0/24",
                "192.0.2.1",
                "192.0.2.0/30",
                "2001:db8::/32",
                "2001:db8:1::/48",
                "2001:db8:1::7",
                "2001:db8::/64",
            ]);
            // Rules for every remote name a port, so that some connections meet no rule at all.
            let wide = matches!(remote, "any" | "0.0.0.0/0");
            let cols = [
                ("priority", g.pick(&["0", "0", "0", "1", "-1"])),
                ("proto", g.pick(&["any", "any", "tcp", "tls", "ws"])),
                ("remote_addr", remote),
                (
                    "remote_port",
                    if wide {
                        g.pick(&["5060", "5061"])
                    } else {
                        g.pick(&["0", "0", "5060", "5061", "7000"])
                    },
                ),
                (
                    "local_addr",
                    g.pick(&[
                        "any",
                        "any",
                        "192.0.2.0/24",
                        "192.0.2.1",
                        "198.51.100.0/24",
                        "198.51.100.7",
                        "alpha",
                        "beta",
                        "2001:db8::/32",
                        "2001:db8:1::/48",
                    ]),
                ),
                ("local_port", g.pick(&["0", "0", "5060", "5061", "7000"])),
                ("no_new_conn", if id % 5 == 0 { "1" } else { "0" }),
                ("keepidle", idle.as_str()),
            ];
            let cols: Vec<(&str, &str)> =
                cols.iter().filter(|(_, v)| *v != "any").copied().collect();
            row(id, &cols)
        })
        .collect()
}

#[test]
fn kernel_agrees_with_the_reference_matcher_on_a_mixed_rule_set() {
    let seed = 0x7c9_2026;
    let listeners = Listeners::parse_all(LISTENERS).unwrap();
    // Rows whose local and remote families differ are rejected by validation: leave them out.
    let (mut good, _bad) = tcpmgm::policy::rule::validate_rows(&table(seed, 90), &listeners);
    good.truncate(70);
    let sb = Sandbox::new();
    sb.netns.add_local(&[
        "192.0.2.1",
        "192.0.2.2",
        "192.0.2.9",
        "198.51.100.7",
        "198.51.100.130",
        "203.0.113.5",
        "2001:db8::1",
        "2001:db8::9",
        "2001:db8:1::7",
    ]);
    let (policy, _e) = sb.enforce(good.clone(), &listeners);
    // The reference is the table's valid rules in the reference matcher's order, not the
    // compiler's output: a rule the compiler dropped would be missing from both.
    let sorted = &tcpmgm_tests::in_match_order(good);
    assert_eq!(
        policy.rules, *sorted,
        "the compiled rule set is not the table's"
    );

    let v4_local = ["192.0.2.1", "192.0.2.2", "192.0.2.9"];
    let v4_server = ["198.51.100.7", "198.51.100.130", "203.0.113.5"];
    let ports = [5060u16, 5061, 7000];
    let mut runs: Vec<Vec<(String, String)>> = vec![Vec::new(), Vec::new()];
    for l in v4_local {
        for s in v4_server {
            for p in ports {
                runs[0].push((format!("{s}:{p}"), format!("{l}:0")));
                runs[1].push((format!("[::ffff:{s}]:{p}"), format!("[::ffff:{l}]:0")));
            }
        }
    }
    for l in ["2001:db8::1", "2001:db8::9"] {
        for p in ports {
            runs[0].push((format!("[2001:db8:1::7]:{p}"), format!("[{l}]:0")));
        }
    }

    let mut total = tcpmgm_tests::Comparison::default();
    for run in &runs {
        // A fresh probe per run: the v4-mapped listeners take the same addresses as the v4 ones.
        let mut probe: Probe = sb.probe();
        let pairs: Vec<(SocketAddr, SocketAddr)> = run
            .iter()
            .map(|(s, b)| (s.parse().unwrap(), b.parse().unwrap()))
            .collect();
        total.add(compare_with_reference(
            &mut probe, &listeners, sorted, &pairs,
        ));
    }
    let t = &total;
    assert!(
        t.disagreements.is_empty(),
        "seed {seed:#x}: {} disagreements:\n{}",
        t.disagreements.len(),
        t.disagreements.join("\n")
    );
    assert!(t.refused > 0 && t.unmatched > 0, "{t:?}");
    eprintln!(
        "{} decisions agree; {} refused, {} without a rule",
        t.decisions, t.refused, t.unmatched
    );
}

/// For each key of the match order, two rules that both match one connection and differ in that
/// key only (the better one has the higher id, so the id cannot be what decides). The kernel must
/// pick the rule the reference matcher picks, which must be the better one.
#[test]
fn each_key_of_the_match_order_decides_in_the_kernel() {
    let listeners = Listeners::parse_all(LISTENERS).unwrap();
    let sb = Sandbox::new();
    sb.netns.add_local(&["192.0.2.1", "198.51.100.7"]);
    let (server, bind) = ("198.51.100.7:5061", "192.0.2.1:0");
    type Columns<'a> = &'a [(&'a str, &'a str)];
    let cases: [(&str, Columns, Columns); 9] = [
        ("lower priority", &[("priority", "-1")], &[("proto", "tcp")]),
        ("a specific proto", &[("proto", "tcp")], &[]),
        ("a set remote_addr", &[("remote_addr", "0.0.0.0/0")], &[]),
        (
            "a longer remote prefix",
            &[("remote_addr", "198.51.100.0/25")],
            &[("remote_addr", "198.51.100.0/24")],
        ),
        ("a set remote_port", &[("remote_port", "5061")], &[]),
        ("a set local_addr", &[("local_addr", "192.0.2.0/24")], &[]),
        (
            "a longer local prefix",
            &[("local_addr", "alpha")],
            &[("local_addr", "192.0.2.0/24")],
        ),
        ("a set local_port", &[("local_port", "5060")], &[]),
        ("a lower id", &[], &[]),
    ];
    for (key, better, worse) in cases {
        let (better_id, worse_id) = if key == "a lower id" { (1, 2) } else { (2, 1) };
        let table = [
            row(better_id, &[better, &[("keepidle", "101")]].concat()),
            row(worse_id, &[worse, &[("keepidle", "202")]].concat()),
        ];
        // The reference's rules are the table's, validated and in match order; the compiler's
        // output must be the same set.
        let valid = tcpmgm_tests::in_match_order(rules(&table, &listeners));
        let (policy, enforcer) = sb.enforce(valid.clone(), &listeners);
        assert_eq!(
            policy.rules, valid,
            "{key}: the compiled rule set is not the table's"
        );
        let mut probe = sb.probe();
        let reply = probe.ask(&format!("pair {server} {server} {bind}"));
        let out_key = listeners.lookup(
            Direction::Outbound,
            server.parse().unwrap(),
            Some(bind.parse().unwrap()),
        );
        let reference = matcher::first_match(&valid, &out_key).map(|r| r.id);
        assert_eq!(
            reference,
            Some(better_id as u32),
            "{key}: the reference picked {reference:?}"
        );
        let matching: Vec<&Rule> = valid
            .iter()
            .filter(|r| matcher::matches(r, &out_key))
            .collect();
        assert_eq!(matching.len(), 2, "{key}: both rules must match");
        assert_eq!(matcher::deciding_key(matching[0], matching[1]), key);
        assert_eq!(
            reply.get("client_idle"),
            101,
            "{key}: kernel picked otherwise: {reply:?}"
        );

        let client = SocketAddr::new(
            "192.0.2.1".parse().unwrap(),
            reply.get("client_port") as u16,
        );
        let in_key = listeners.lookup(Direction::Inbound, client, Some(server.parse().unwrap()));
        let (_, want_server) = idle_of(matcher::first_match(&valid, &in_key));
        assert_eq!(
            reply.get("server_idle"),
            want_server,
            "{key} (server side): {reply:?}"
        );
        drop(probe);
        drop(enforcer);
    }
}
