//! Seeded random rule sets against the real kernel: at least 1,000 rules (remote prefixes of
//! every length for IPv4 and IPv6, ports, protocols through listeners, local addresses and
//! listener tags, priorities and ties) and at least 2,000 connections between addresses of a
//! test namespace. Every socket's outcome must be the reference matcher's decision.
//!
//! `TCPMGM_SEED=<n>` replays one run; without it the seed is new each run and printed.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tcpmgm::policy::listener::Listeners;
use tcpmgm::policy::rule::{Row, validate_rows};
use tcpmgm_tests::{Rng, Sandbox, compare_with_reference, row};

const RULES: usize = 1200;
const CONNECTIONS: usize = 2100;
const PORTS: [u16; 5] = [5060, 5061, 5080, 8443, 9000];
const PROTOS: [&str; 5] = ["tcp", "tls", "ws", "wss", "bin"];

/// The addresses of the test namespace: servers (peers of outbound connections) and clients.
struct Pools {
    servers4: Vec<IpAddr>,
    clients4: Vec<IpAddr>,
    servers6: Vec<IpAddr>,
    clients6: Vec<IpAddr>,
}

impl Pools {
    fn new(rng: &mut Rng) -> Pools {
        let v4 = |a: u8, n: usize, rng: &mut Rng| -> Vec<IpAddr> {
            let mut out: Vec<IpAddr> = (0..n)
                .map(|_| {
                    IpAddr::V4(Ipv4Addr::new(
                        a,
                        rng.below(3) as u8,
                        rng.below(4) as u8,
                        1 + rng.below(250) as u8,
                    ))
                })
                .collect();
            out.sort();
            out.dedup();
            out
        };
        let servers4 = v4(10, 40, rng);
        let clients4 = v4(172, 12, rng);
        let v6 = |net: u16, n: usize, rng: &mut Rng| -> Vec<IpAddr> {
            let mut out: Vec<IpAddr> = (0..n)
                .map(|_| {
                    IpAddr::V6(Ipv6Addr::new(
                        0xfd00,
                        net,
                        rng.below(2) as u16,
                        0,
                        0,
                        0,
                        rng.below(3) as u16,
                        1 + rng.below(0xfff0) as u16,
                    ))
                })
                .collect();
            out.sort();
            out.dedup();
            out
        };
        let servers6 = v6(1, 16, rng);
        let clients6 = v6(2, 6, rng);
        Pools {
            servers4,
            clients4,
            servers6,
            clients6,
        }
    }

    fn all(&self) -> impl Iterator<Item = &IpAddr> {
        self.servers4
            .iter()
            .chain(&self.clients4)
            .chain(&self.servers6)
            .chain(&self.clients6)
    }
}

fn listeners(rng: &mut Rng, pools: &Pools) -> (Listeners, Vec<String>) {
    let mut specs = Vec::new();
    let mut tags = Vec::new();
    let fmt = |ip: &IpAddr| match ip {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    };
    for (i, ip) in pools.servers4.iter().chain(&pools.servers6).enumerate() {
        for port in PORTS {
            if rng.chance(40) {
                specs.push(format!("{}:{}:{port}", rng.pick(&PROTOS), fmt(ip)));
            }
        }
        if i % 7 == 0 {
            let tag = format!("s{i}");
            specs.push(format!("{}:{}:7777 tag {tag}", rng.pick(&PROTOS), fmt(ip)));
            tags.push(tag);
        }
    }
    // Outbound connections take the protocol of the listener declared on their local address.
    for (i, ip) in pools.clients4.iter().chain(&pools.clients6).enumerate() {
        if rng.chance(70) {
            let tag = format!("c{i}");
            specs.push(format!(
                "{}:{}:{} tag {tag}",
                rng.pick(&PROTOS),
                fmt(ip),
                rng.pick(&PORTS)
            ));
            tags.push(tag);
        }
    }
    specs.push("ws:*:9000".to_owned());
    let listeners =
        Listeners::parse_all(specs.iter().map(String::as_str)).expect("generated listeners");
    (listeners, tags)
}

/// A prefix of `len` bits around `ip`, written as the table would hold it.
fn prefix(ip: IpAddr, len: u8) -> String {
    format!("{}", ipnet::IpNet::new(ip, len).unwrap().trunc())
}

fn table(rng: &mut Rng, pools: &Pools, tags: &[String]) -> Vec<Row> {
    let addrs: Vec<IpAddr> = pools.all().copied().collect();
    let mut rows = Vec::new();
    for id in 1..=RULES as i64 {
        let v6 = rng.chance(35);
        let family: Vec<IpAddr> = addrs
            .iter()
            .copied()
            .filter(|a| a.is_ipv6() == v6)
            .collect();
        // Cycle through every prefix length of the family, around an address of the pool.
        let len = if v6 {
            (id % 129) as u8
        } else {
            (id % 33) as u8
        };
        let remote = if rng.chance(5) {
            "any".to_owned()
        } else {
            prefix(rng.pick(&family), len)
        };
        // Wide rules (remote any or a short prefix) always name a protocol and mostly come later
        // in priority, as in real tables; otherwise a few of them take every connection and the
        // run tests little.
        let wide = remote == "any" || usize::from(len) < if v6 { 64 } else { 16 };
        let local = match rng.below(10) {
            0..=5 => "any".to_owned(),
            6 => tags[rng.below(tags.len())].clone(),
            _ => {
                let ip = rng.pick(&family);
                let max = if v6 { 128 } else { 32 };
                prefix(ip, max - rng.below(usize::from(max) / 4 + 1) as u8)
            }
        };
        let proto = if wide || rng.chance(40) {
            rng.pick(&PROTOS)
        } else {
            "any"
        };
        let remote_port = if rng.chance(if wide { 70 } else { 35 }) {
            rng.pick(&PORTS)
        } else {
            0
        };
        let priority = if wide {
            rng.pick(&["1", "2"])
        } else {
            rng.pick(&["-1", "0", "0", "1"])
        };
        let cols: Vec<(&str, String)> = vec![
            ("priority", priority.to_owned()),
            ("proto", proto.to_owned()),
            ("remote_addr", remote),
            ("remote_port", remote_port.to_string()),
            ("local_addr", local),
            (
                "local_port",
                if rng.chance(75) {
                    "0".to_owned()
                } else {
                    rng.pick(&[5060u16, 5061, 7777, 9000]).to_string()
                },
            ),
            (
                "no_new_conn",
                if rng.chance(8) { "1" } else { "0" }.to_owned(),
            ),
            ("keepidle", (1000 + id).to_string()),
        ];
        let cols: Vec<(&str, &str)> = cols
            .iter()
            .filter(|(_, v)| v != "any")
            .map(|(k, v)| (*k, v.as_str()))
            .collect();
        rows.push(row(id, &cols));
    }
    // A few peers that must never be dialled, ahead of everything: every run then has refusals
    // to check, whatever the draw.
    for (i, ip) in [pools.servers4[0], pools.servers6[0]]
        .into_iter()
        .enumerate()
    {
        let id = (RULES + 1 + i) as i64;
        let remote = ip.to_string();
        let idle = (1000 + id).to_string();
        rows.push(row(
            id,
            &[
                ("priority", "-2"),
                ("remote_addr", &remote),
                ("no_new_conn", "1"),
                ("keepidle", &idle),
            ],
        ));
    }
    rows
}

fn connections(rng: &mut Rng, pools: &Pools) -> Vec<Vec<(SocketAddr, SocketAddr)>> {
    // Two runs: plain sockets, then v4-mapped ones (their listeners take the same addresses).
    let mut runs = vec![Vec::new(), Vec::new()];
    for _ in 0..CONNECTIONS {
        let v6 = rng.chance(30);
        let (servers, clients) = if v6 {
            (&pools.servers6, &pools.clients6)
        } else {
            (&pools.servers4, &pools.clients4)
        };
        let server = SocketAddr::new(rng.pick(servers), rng.pick(&PORTS));
        let bind = SocketAddr::new(rng.pick(clients), 0);
        let mapped = |a: SocketAddr| match a.ip() {
            IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
            IpAddr::V6(_) => a,
        };
        if !v6 && rng.chance(20) {
            runs[1].push((mapped(server), mapped(bind)));
        } else {
            runs[0].push((server, bind));
        }
    }
    runs
}

#[test]
fn kernel_agrees_with_the_reference_matcher_on_random_rule_sets() {
    let (seed, mut rng) = Rng::seeded();
    let pools = Pools::new(&mut rng);
    let (listeners, tags) = listeners(&mut rng, &pools);
    let (rules, errors) = validate_rows(&table(&mut rng, &pools, &tags), &listeners);
    assert!(
        errors.len() < RULES / 4,
        "seed {seed}: too many generated rows invalid: {:?}",
        &errors[..3]
    );
    assert!(
        rules.len() >= 1000 || errors.is_empty(),
        "seed {seed}: only {} valid rules",
        rules.len()
    );

    let sb = Sandbox::new();
    let addrs: Vec<String> = pools.all().map(ToString::to_string).collect();
    sb.netns
        .add_local(&addrs.iter().map(String::as_str).collect::<Vec<_>>());
    // The reference is the table's valid rules in the reference matcher's order, not the
    // compiler's output: a rule the compiler dropped would be missing from both.
    let reference = tcpmgm_tests::in_match_order(rules.clone());
    let (policy, _enforcer) = sb.enforce(rules, &listeners);
    assert!(
        policy.rules == reference,
        "seed {seed}: the compiled rule set is not the table's"
    );

    let mut total = tcpmgm_tests::Comparison::default();
    let mut connections_made = 0;
    for run in connections(&mut rng, &pools) {
        let mut probe = sb.probe();
        connections_made += run.len();
        total.add(compare_with_reference(
            &mut probe, &listeners, &reference, &run,
        ));
    }
    let t = &total;
    assert!(
        t.disagreements.is_empty(),
        "TCPMGM_SEED={seed}: {} of {} decisions disagree:\n{}",
        t.disagreements.len(),
        t.decisions,
        t.disagreements[..t.disagreements.len().min(30)].join("\n")
    );
    assert!(
        connections_made >= 2000 && policy.rules.len() >= 1000,
        "{connections_made} connections, {} rules",
        policy.rules.len()
    );
    // A run where a few rules take everything, or nothing is refused, tests little.
    assert!(
        t.winners.len() >= 25 && t.refused > 0,
        "TCPMGM_SEED={seed}: too uniform: {} distinct winners, {} refused",
        t.winners.len(),
        t.refused
    );
    eprintln!(
        "TCPMGM_SEED={seed}: {} rules, {connections_made} connections, {} decisions agree ({} distinct winners, {} refused, {} without a rule)",
        policy.rules.len(),
        t.decisions,
        t.winners.len(),
        t.refused,
        t.unmatched
    );
}
