//! `cargo xtask bench -- --rate`: the connection rate with tcpmgm attached beside the kernel's
//! own, and where the programs' time goes.
//!
//! Rates are sampled with `kernel.bpf_stats_enabled` off: the kernel's accounting reads the
//! clock twice around every program run, a cost the bench would otherwise charge to tcpmgm.
//! The programs' run times come from a pass of their own with the accounting on. Each setup
//! differs from the one before it by one thing, so that the differences are the cost of that
//! thing: the decision over 100k rules, the socket storage of a matched connection, the
//! keepalive options, a refused connect() and its log line.
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use tcpmgm::kernel::Enforcer;
use tcpmgm::policy::compile::{Policy, compile};
use tcpmgm::policy::listener::Listeners;
use tcpmgm::policy::rule::Rule;
use tcpmgm::system;
use tcpmgm_common::names;
use tcpmgm_tests::Sandbox;

use crate::section::RATE;
use crate::{SERVER, become_workload, machine, median, opensips_way, rate, rules};

const STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";
const RULES: usize = 100_000;
const SAMPLES: usize = 5;

/// What the programs cost over one pass: ns per run and runs per connection, by program.
#[derive(Default, Clone, Copy)]
struct Cost {
    connect4_ns: f64,
    sock_ops_ns: f64,
    sock_ops_runs: f64,
    sockopt_ns: f64,
    sockopt_runs: f64,
}

impl Cost {
    /// Program time per connection, both ends.
    fn per_connection(&self) -> f64 {
        self.connect4_ns
            + self.sock_ops_ns * self.sock_ops_runs
            + self.sockopt_ns * self.sockopt_runs
    }
}

struct Setup {
    name: &'static str,
    /// None: no programs attached.
    policy: Option<Policy>,
    rates: Vec<f64>,
    cost: Cost,
}

/// The bench's 100k-rule flat table with its loopback rule (last in match order) changed by
/// `change`.
fn table(change: impl FnOnce(&mut Rule)) -> Vec<Rule> {
    let mut rules = rules(RULES);
    change(rules.last_mut().expect("the loopback rule"));
    rules
}

pub fn run(out: &std::path::Path, n: usize) -> anyhow::Result<()> {
    let stats_before = std::fs::read_to_string(STATS)?;
    let result = measure(n, out);
    std::fs::write(STATS, stats_before.trim())?;
    RATE.write(out, &result?)
}

fn stats(on: bool) -> anyhow::Result<()> {
    std::fs::write(STATS, if on { "1" } else { "0" })
        .map_err(|e| anyhow::anyhow!("setting kernel.bpf_stats_enabled (needs root): {e}"))
}

fn measure(n: usize, out: &std::path::Path) -> anyhow::Result<String> {
    let sb = Sandbox::new();
    let _leave = become_workload(&sb)?;
    let listener = TcpListener::bind(SERVER)?;
    let listeners = Listeners::parse_all(["tcp:127.0.0.1:7000"])?;
    let hz = system::kernel_hz()?;
    let policy = |rules: Vec<Rule>| compile(rules, &listeners, hz);

    let keepalive_rule = table(|_| {});
    let sorted = policy(keepalive_rule.clone())?.rules;
    let mut setups = vec![
        Setup {
            name: "no programs",
            policy: None,
            rates: Vec::new(),
            cost: Cost::default(),
        },
        Setup {
            name: "tcpmgm attached, no rules",
            policy: Some(policy(Vec::new())?),
            rates: Vec::new(),
            cost: Cost::default(),
        },
        Setup {
            name: "100k rules, none matches",
            policy: Some(policy(table(|r| {
                r.remote = Some("192.0.2.99/32".parse().unwrap())
            }))?),
            rates: Vec::new(),
            cost: Cost::default(),
        },
        Setup {
            name: "100k rules, a matching rule without socket options (keepalive 0)",
            policy: Some(policy(table(|r| r.profile.keepalive = false))?),
            rates: Vec::new(),
            cost: Cost::default(),
        },
        Setup {
            name: "100k rules, a matching rule with keepalive (4 options a socket)",
            policy: Some(policy(keepalive_rule)?),
            rates: Vec::new(),
            cost: Cost::default(),
        },
    ];

    // The programs' time, one pass a setup, with the kernel's accounting on.
    stats(true)?;
    for s in setups.iter_mut().skip(1) {
        let e = Enforcer::attach(
            s.policy.as_ref().expect("programs"),
            &sb.cgroup,
            &sb.pin_dir,
        )?;
        rate(&listener, n / 10, |_| {});
        s.cost = cost(&e, &listener, n);
        e.detach()?;
    }
    // A refused connect() (no_new_conn) and its log line, rate-limited in the kernel.
    let refusing = policy(table(|r| r.profile.no_new_conn = true))?;
    let e = Enforcer::attach(&refusing, &sb.cgroup, &sb.pin_dir)?;
    let refused_ns = refused_cost(&e, n)?;
    e.detach()?;

    // The rates, interleaved, with the accounting off.
    stats(false)?;
    let mut opensips = Vec::new();
    for _ in 0..SAMPLES {
        for s in setups.iter_mut() {
            let e = match &s.policy {
                Some(p) => Some(Enforcer::attach(p, &sb.cgroup, &sb.pin_dir)?),
                None => None,
            };
            s.rates.push(rate(&listener, n, |_| {}));
            if let Some(e) = e {
                e.detach()?;
            }
        }
        opensips.push(rate(&listener, n, opensips_way(&sorted, &listeners)));
    }
    let (path, link) = crate::plots::place(out, "rate.svg")?;
    let mut bars: Vec<(String, f64)> = setups
        .iter()
        .map(|s| (s.name.to_owned(), median(s.rates.clone())))
        .collect();
    bars.push((
        "OpenSIPS's way in userspace".to_owned(),
        median(opensips.clone()),
    ));
    crate::plots::bars(
        &path,
        "Connections a second, connect + accept over loopback (the first: no programs)",
        "connections/s",
        &bars,
    )?;
    Ok(report(&setups, median(opensips), refused_ns, n, &link))
}

/// The programs' cost per run over `n` connections (accounting on).
fn cost(e: &Enforcer, listener: &TcpListener, n: usize) -> Cost {
    let before = e.program_stats();
    rate(listener, n, |_| {});
    let after = e.program_stats();
    let per = |name: &str| {
        let find = |v: &[(&str, Duration, u64)]| {
            v.iter()
                .find(|s| s.0 == name)
                .map_or((Duration::ZERO, 0), |s| (s.1, s.2))
        };
        let ((t0, r0), (t1, r1)) = (find(&before), find(&after));
        let runs = r1 - r0;
        (
            (t1 - t0).as_nanos() as f64 / runs.max(1) as f64,
            runs as f64 / n as f64,
        )
    };
    let (connect4_ns, _) = per(names::CONNECT4);
    let (sock_ops_ns, sock_ops_runs) = per(names::SOCK_OPS);
    let (sockopt_ns, sockopt_runs) = per(names::SETSOCKOPT);
    Cost {
        connect4_ns,
        sock_ops_ns,
        sock_ops_runs,
        sockopt_ns,
        sockopt_runs,
    }
}

/// connect4's ns per run over `n` connect() calls that the rule refuses.
fn refused_cost(e: &Enforcer, n: usize) -> anyhow::Result<f64> {
    let to = SocketAddr::from((Ipv4Addr::LOCALHOST, 7000));
    let runs = |e: &Enforcer| {
        e.program_stats()
            .into_iter()
            .find(|s| s.0 == names::CONNECT4)
            .map_or((Duration::ZERO, 0), |s| (s.1, s.2))
    };
    let (t0, r0) = runs(e);
    for _ in 0..n {
        let err = TcpStream::connect(to).expect_err("no_new_conn refuses the connect()");
        anyhow::ensure!(
            err.raw_os_error() == Some(libc::EPERM),
            "connect() failed otherwise: {err}"
        );
    }
    let (t1, r1) = runs(e);
    Ok((t1 - t0).as_nanos() as f64 / (r1 - r0).max(1) as f64)
}

fn report(setups: &[Setup], opensips: f64, refused_ns: f64, n: usize, picture: &str) -> String {
    use std::fmt::Write as _;
    let mut r = String::new();
    let none = median(setups[0].rates.clone());
    let rate_of = |i: usize| median(setups[i].rates.clone());
    let _ = writeln!(r, "{}\n", RATE.begin);
    let _ = writeln!(
        r,
        "## Connection rate\n\n`cargo xtask bench -- --rate` on {} ({}): connect + accept over \
         loopback in the bench's own cgroup and network namespace, {n} connections a sample, \
         median of {SAMPLES} interleaved samples, with `kernel.bpf_stats_enabled` off (its clock \
         reads would be charged to tcpmgm). The programs' ns per run are from a pass of their \
         own with it on. Both ends of each connection are in the governed cgroup, so a matching \
         rule governs two sockets a connection (the outbound one decided in connect4, the \
         accepted one in sock_ops).\n",
        machine(),
        crate::chrono_free_date()
    );
    let _ = writeln!(
        r,
        "| setup | connections/s | ratio to no programs | connect4 ns/run | sock_ops ns/run | sock_ops runs a connection | program time a connection |"
    );
    let _ = writeln!(r, "|---|---:|---:|---:|---:|---:|---:|");
    for (i, s) in setups.iter().enumerate() {
        let rate = rate_of(i);
        if s.policy.is_none() {
            let _ = writeln!(r, "| {} | {rate:.0} | 1.00 | | | | |", s.name);
            continue;
        }
        let c = s.cost;
        let _ = writeln!(
            r,
            "| {} | {rate:.0} | {:.2} | {:.0} | {:.0} | {:.1} | {:.0} ns |",
            s.name,
            rate / none,
            c.connect4_ns,
            c.sock_ops_ns,
            c.sock_ops_runs,
            c.per_connection()
        );
    }
    let _ = writeln!(
        r,
        "| OpenSIPS's way in userspace (accept, linear scan of the 100k rules in match order, 4 setsockopt) | {opensips:.0} | {:.2} | | | | |",
        opensips / none
    );

    let [_, empty, unmatched, storage, keepalive] = [0, 1, 2, 3, 4].map(|i| setups[i].cost);
    let _ = writeln!(
        r,
        "\nWhere the time goes, each line the difference between two setups above (program time \
         a connection, both ends):\n"
    );
    let _ = writeln!(r, "| part | cost |");
    let _ = writeln!(r, "|---|---:|");
    let _ = writeln!(
        r,
        "| the hooks with no rules (a generation read, nothing decided; {:.1} sock_ops runs a connection, most returning at once) | {:.0} ns |",
        empty.sock_ops_runs,
        empty.per_connection()
    );
    let _ = writeln!(
        r,
        "| the decision over 100k rules, no rule matching (connect4 and the accepted socket's sock_ops) | {:.0} ns |",
        unmatched.per_connection() - empty.per_connection()
    );
    let _ = writeln!(
        r,
        "| a matching rule's socket storage: made, filled and counted at both ends (its free at close is outside the programs, in the rate) | {:.0} ns |",
        storage.per_connection() - unmatched.per_connection()
    );
    let _ = writeln!(
        r,
        "| the keepalive options: 4 `bpf_setsockopt` at each end | {:.0} ns ({:.0} ns each) |",
        keepalive.per_connection() - storage.per_connection(),
        (keepalive.per_connection() - storage.per_connection()) / 8.0
    );
    let _ = writeln!(
        r,
        "| a refused connect() (no_new_conn), its count and its log line (rate-limited in the kernel) | connect4 {refused_ns:.0} ns/run |"
    );

    let matched = rate_of(4) / none;
    let worst_unmatched = unmatched.connect4_ns.max(unmatched.sock_ops_ns);
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    let _ = writeln!(r, "\n| target | measured | |\n|---|---|---|");
    let _ = writeln!(
        r,
        "| connection rate with 100k rules and a matching rule ≥ 0.95 × no programs | {matched:.2} | {} |",
        met(matched >= 0.95)
    );
    let _ = writeln!(
        r,
        "| no matching rule: each program run ≤ 150 ns | connect4 {:.0} ns, sock_ops {:.0} ns | {} |",
        unmatched.connect4_ns,
        unmatched.sock_ops_ns,
        met(worst_unmatched <= 150.0)
    );
    let _ = writeln!(
        r,
        "\n![connections a second, with and without tcpmgm]({picture})"
    );
    let _ = writeln!(r, "\n{}", RATE.end);
    r
}
