//! `cargo xtask bench`: the numbers behind tcpmgm's claims, measured on this machine, printed as
//! one table and written to BENCHMARKS.md.
//!
//! Runs as root in a cgroup and network namespace of its own (all traffic is loopback inside it).
//! - cold start (compile, then verification, map fill and attach) of a flat and a nested table
//!   of 1k, 100k and 1M rules, with the kernel memory of their policy maps;
//! - kernel cost per program invocation, from the kernel's accounting (kernel.bpf_stats_enabled);
//! - the latency of a one-rule change at 10, 100k and 1M rules;
//! - PostgreSQL's push latency, from a commit to the change enforced by a running daemon;
//! - the con_lifetime sweep's cost with 10,000 idle connections.
//!
//! Then, in sections of their own, the connection rate beside the kernel's (see `rate`), the
//! table read (see `table_read`) and the daemon's memory (see `memory`). `--rate`,
//! `--table-read` and `--memory` run only that section; `--soak MINUTES` only the soak (see
//! `soak`) and `--fleet N` only N daemons following one PostgreSQL table (see `fleet`). Each
//! section is replaced by its own run and kept by the others.
mod fleet;
mod incremental;
mod memory;
mod plots;
mod rate;
mod section;
mod soak;
mod table_read;

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use tcpmgm::kernel::Enforcer;
use tcpmgm::policy::compile::{Policy, compile};
use tcpmgm::policy::listener::{Direction, Listeners};
use tcpmgm::policy::matcher;
use tcpmgm::policy::rule::{LocalMatch, Profile, Proto, Rule};
use tcpmgm::system;
use tcpmgm_tests::Sandbox;

#[derive(Parser)]
struct Args {
    /// Where to write the report.
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: std::path::PathBuf,
    /// Connections per rate sample.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Leave out the PostgreSQL push latency (it needs the server `cargo xtask bench` starts).
    #[arg(long)]
    skip_push: bool,
    /// Only the soak: a daemon under steady load for this many minutes, sampled every 10 s;
    /// replaces the Soak section of the report and nothing else.
    #[arg(long, value_name = "MINUTES", value_parser = clap::value_parser!(u64).range(1..))]
    soak: Option<u64>,
    /// Only the table read: 100k rows read and validated from SQLite, PostgreSQL and MariaDB;
    /// replaces the Table read section of the report and nothing else.
    #[arg(long, conflicts_with = "soak")]
    table_read: bool,
    /// Only the connection rate: connect + accept with no programs, with tcpmgm and 100k rules
    /// (none matching, a matching one), with the programs' ns per run; replaces the Connection
    /// rate section of the report and nothing else.
    #[arg(long, conflicts_with_all = ["soak", "table_read"])]
    rate: bool,
    /// Only the memory: a daemon's RSS and BPF map memory at 0, 100k and 1M rules, flat and
    /// nested; replaces the Memory section of the report and nothing else.
    #[arg(long, conflicts_with_all = ["soak", "table_read", "rate"])]
    memory: bool,
    /// Only the reloads end to end: a one-rule change at 100k and 1M rules, from `tcpmgm
    /// reload` to a new connection with it, beside the cold start; replaces the Reload end to
    /// end section of the report and nothing else.
    #[arg(long, conflicts_with_all = ["soak", "table_read", "rate", "memory"])]
    reload: bool,
    /// Only the fleet: N daemons following one PostgreSQL table, from a commit to the change
    /// enforced in every cgroup; replaces the Fleet section of the report and nothing else.
    #[arg(long, value_name = "N", conflicts_with_all = ["soak", "table_read", "rate", "memory", "reload"],
          value_parser = clap::value_parser!(u64).range(1..=1000))]
    fleet: Option<u64>,
}

const SERVER: &str = "127.0.0.1:7000";

/// `n` rules of a trunk-heavy table: distinct /32 peers in 10.0.0.0/8, one in a hundred a /24
/// that holds some of them (so lists nest), ports, protocols, local addresses, priorities and
/// some no_new_conn mixed; then one rule for loopback, last in match order, which the measured
/// connections meet.
fn rules(n: usize) -> Vec<Rule> {
    let protos = [
        None,
        Proto::parse("tcp").unwrap(),
        Proto::parse("tls").unwrap(),
    ];
    let mut out: Vec<Rule> = (0..n)
        .map(|i| {
            let (ip, len) = if i % 100 == 0 {
                // Every hundredth /24 of 10.0.0.0/8, which holds the /32 peers numbered there.
                (Ipv4Addr::from((10 << 24) + ((i as u32) << 8)), 24)
            } else {
                (Ipv4Addr::from((10 << 24) + i as u32 + 1), 32)
            };
            Rule {
                id: i as u32 + 1,
                priority: (i % 3) as i32,
                proto: protos[i % 3],
                remote: Some(ipnet::IpNet::new(IpAddr::V4(ip), len).unwrap().trunc()),
                remote_port: [0, 0, 5060, 5061][i % 4],
                local: (i % 7 == 0).then(|| LocalMatch {
                    net: "192.0.2.0/24".parse().unwrap(),
                    tag: None,
                }),
                local_port: 0,
                // Some peers must never be dialled: connect4 then has to decide every connect().
                profile: Profile {
                    keepidle: 100 + (i % 1000) as u32,
                    no_new_conn: i % 50 == 7,
                    ..Profile::default()
                },
            }
        })
        .collect();
    out.push(Rule {
        id: n as u32 + 1,
        priority: 10,
        proto: None,
        remote: Some("127.0.0.0/8".parse().unwrap()),
        remote_port: 0,
        local: None,
        local_port: 0,
        profile: Profile {
            keepidle: 77,
            ..Profile::default()
        },
    });
    out
}

/// `n` rules of a nested table: 60% with a remote prefix from /11 to /32 inside 10.64.0.0/10,
/// drawn at random (seeded), so that prefixes nest many levels deep and short ones hold many
/// rules; the rest distinct /32 peers in 10.0.0.0/10; ports, protocols, local addresses and
/// priorities as in the flat table; then the loopback rule, last in match order.
fn nested_rules(n: usize) -> Vec<Rule> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut out = rules(n);
    for (i, r) in out.iter_mut().take(n).enumerate() {
        let (ip, len) = if i % 5 < 3 {
            let len = 11 + (next() % 22) as u8;
            let addr = (10 << 24) | (64 << 16) | (next() as u32 & 0x003f_ffff);
            (Ipv4Addr::from(addr), len)
        } else {
            (Ipv4Addr::from((10 << 24) + i as u32 + 1), 32)
        };
        r.remote = Some(ipnet::IpNet::new(IpAddr::V4(ip), len).unwrap().trunc());
    }
    out
}

/// Opens `n` loopback connections one after another, handing each accepted socket to
/// `on_accept`; returns connections per second. The client closes with RST (linger 0) so that
/// no TIME_WAIT piles up across samples.
fn rate(listener: &TcpListener, n: usize, mut on_accept: impl FnMut(&TcpStream)) -> f64 {
    let addr = listener.local_addr().unwrap();
    let start = Instant::now();
    for _ in 0..n {
        let client = TcpStream::connect(addr).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        on_accept(&server);
        socket2::SockRef::from(&client)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn setsockopt(s: &TcpStream, level: i32, name: i32, value: i32) {
    // SAFETY: an int option on a live socket.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            size_of::<i32>() as u32,
        );
    }
}

/// OpenSIPS's way: after accept, scan the rules in match order for the first match, then set
/// the four keepalive options.
fn opensips_way(sorted: &[Rule], listeners: &Listeners) -> impl FnMut(&TcpStream) {
    move |s| {
        let key = listeners.lookup(
            Direction::Inbound,
            s.peer_addr().unwrap(),
            Some(s.local_addr().unwrap()),
        );
        let rule = sorted
            .iter()
            .find(|r| matcher::matches(r, &key))
            .expect("the loopback rule matches");
        let p = &rule.profile;
        setsockopt(s, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
        setsockopt(s, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, p.keepidle as i32);
        setsockopt(
            s,
            libc::IPPROTO_TCP,
            libc::TCP_KEEPINTVL,
            p.keepinterval as i32,
        );
        setsockopt(s, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, p.keepcount as i32);
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

const IDLE: usize = 10_000;

/// The con_lifetime sweeper's cost with `IDLE` idle connections that all have a rule with an
/// enforced con_lifetime (an hour, so none is closed): median wall and CPU ms of 5 sweeps.
fn idle_sweep_cost(sb: &Sandbox, listeners: &Listeners, hz: u32) -> anyhow::Result<(f64, f64)> {
    let rule = Rule {
        id: 1,
        priority: 0,
        proto: None,
        remote: Some("127.0.0.0/8".parse().unwrap()),
        remote_port: 0,
        local: None,
        local_port: 0,
        profile: Profile {
            con_lifetime_s: 3600,
            ..Profile::default()
        },
    };
    let policy = compile(vec![rule], listeners, hz)?;
    let enforcer = Enforcer::attach(&policy, &sb.cgroup, &sb.pin_dir)?;
    // The peers live in a process of their own outside the cgroup: one process could not hold
    // both ends (the fd limit here is 20,000), and only the cgroup's ends have records.
    let mut peer = tcpmgm_tests::Probe::spawn(None, &sb.netns.path());
    let server = std::thread::spawn(move || {
        let reply = peer.ask(&format!("accept 127.0.0.1:7100 {IDLE}"));
        (peer, reply)
    });
    std::thread::sleep(Duration::from_millis(300));
    let mut held = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        held.push(TcpStream::connect("127.0.0.1:7100")?);
    }
    let (_peer, reply) = server.join().expect("the peer process");
    anyhow::ensure!(reply.get("accepted") == IDLE as i64, "{reply:?}");
    let setup = tcpmgm::daemon::lifetime::SweepSetup {
        cgroup: sb.cgroup.clone(),
        pin_dir: sb.pin_dir.clone(),
        enforcement: tcpmgm::policy::compile::Enforcement::default(),
    };
    let (mut wall, mut cpu) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let (t, c) = (Instant::now(), cpu_time());
        let closed = tcpmgm::daemon::lifetime::sweep(&setup, &mut Default::default())?;
        anyhow::ensure!(closed == 0, "the sweep closed {closed} connections");
        wall.push(t.elapsed().as_secs_f64() * 1000.0);
        cpu.push((cpu_time() - c).as_secs_f64() * 1000.0);
    }
    drop(held);
    enforcer.detach()?;
    Ok((median(wall), median(cpu)))
}

/// CPU time of this process (user + system).
fn cpu_time() -> Duration {
    // SAFETY: rusage is plain integers, for which all zeroes is a value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct it is given.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Mean run time per invocation (ns) of sock_ops and connect4 over `n` connections.
fn cost_per_invocation(enforcer: &Enforcer, listener: &TcpListener, n: usize) -> (f64, f64, f64) {
    let before = enforcer.program_stats();
    rate(listener, n, |_| {});
    let after = enforcer.program_stats();
    let per = |name: &str| {
        let (b, a) = (
            before.iter().find(|s| s.0 == name).unwrap(),
            after.iter().find(|s| s.0 == name).unwrap(),
        );
        let runs = a.2 - b.2;
        ((a.1 - b.1).as_nanos() as f64 / runs.max(1) as f64, runs)
    };
    let (sock_ops, sock_ops_runs) = per(tcpmgm_common::names::SOCK_OPS);
    let (connect4, _) = per(tcpmgm_common::names::CONNECT4);
    (sock_ops, connect4, sock_ops_runs as f64 / n as f64)
}

struct Row {
    table: &'static str,
    rules: usize,
    compile: Duration,
    timings: tcpmgm::kernel::Timings,
    sock_ops_ns: f64,
    connect4_ns: f64,
    memory: u64,
}

impl Row {
    fn cold_start(&self) -> Duration {
        self.compile + self.timings.programs + self.timings.maps + self.timings.attach
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().next().map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse::<u64>()
                    .unwrap_or(0)
                    / 1024
                    / 1024
            })
        })
        .unwrap_or(0);
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("{cpu}, {cores} cores, {mem} GiB, Linux {kernel}")
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(minutes) = args.soak {
        return soak::run(minutes, &args.out);
    }
    if args.table_read {
        return table_read::run(&args.out);
    }
    if args.rate {
        return rate::run(&args.out, args.connections);
    }
    if args.memory {
        return memory::run(&args.out);
    }
    if args.reload {
        return incremental::run(&args.out);
    }
    if let Some(count) = args.fleet {
        return fleet::run(count as usize, &args.out);
    }
    let stats_path = "/proc/sys/kernel/bpf_stats_enabled";
    let stats_before = std::fs::read_to_string(stats_path).context("bpf_stats_enabled")?;
    std::fs::write(stats_path, "1").context("enabling kernel.bpf_stats_enabled (needs root)")?;
    let result = run(&args);
    std::fs::write(stats_path, stats_before.trim())?;
    result?;
    // The sections of their own, which a full run writes too.
    incremental::run(&args.out)?;
    rate::run(&args.out, args.connections)?;
    table_read::run(&args.out)?;
    memory::run(&args.out)
}

/// Puts this process back in the root cgroup and in the network namespace it came from when
/// dropped, so that the sandbox can remove its own and a later part of the run reaches the
/// databases on the host's loopback.
struct LeaveCgroup {
    netns: std::fs::File,
}

/// This process becomes the workload: into the sandbox's network namespace and cgroup, until
/// the guard returned is dropped.
fn become_workload(sb: &Sandbox) -> anyhow::Result<LeaveCgroup> {
    let netns = std::fs::File::open("/proc/thread-self/ns/net")?;
    tcpmgm::netns::enter(std::path::Path::new(&sb.netns.path()))?;
    let leave = LeaveCgroup { netns };
    std::fs::write(
        sb.cgroup.join("cgroup.procs"),
        std::process::id().to_string(),
    )?;
    Ok(leave)
}

impl Drop for LeaveCgroup {
    fn drop(&mut self) {
        if let Ok(root) = system::cgroup2_root() {
            let _ = std::fs::write(root.join("cgroup.procs"), std::process::id().to_string());
        }
        let _ = nix::sched::setns(&self.netns, nix::sched::CloneFlags::CLONE_NEWNET);
    }
}

/// Compiles and attaches `rules` (a cold start), checks that the loopback rule applies, and
/// measures the programs' cost per invocation over `n` connections.
fn measure(
    sb: &Sandbox,
    listener: &TcpListener,
    listeners: &Listeners,
    table: &'static str,
    rules: Vec<Rule>,
    n: usize,
) -> anyhow::Result<(Row, Policy, Enforcer)> {
    let size = rules.len() - 1;
    let hz = system::kernel_hz()?;
    let t = Instant::now();
    let policy: Policy = compile(rules, listeners, hz)?;
    let compile_time = t.elapsed();
    let enforcer = Enforcer::attach(&policy, &sb.cgroup, &sb.pin_dir)?;
    let check = TcpStream::connect(SERVER)?;
    let (accepted, _) = listener.accept()?;
    let idle = socket2::SockRef::from(&accepted).keepalive_time()?;
    anyhow::ensure!(
        idle == Duration::from_secs(77),
        "the loopback rule did not apply ({idle:?})"
    );
    drop((check, accepted));
    let (so, c4, _) = cost_per_invocation(&enforcer, listener, n);
    let row = Row {
        table,
        rules: size,
        compile: compile_time,
        timings: enforcer.timings(),
        sock_ops_ns: so,
        connect4_ns: c4,
        memory: enforcer.map_memory(),
    };
    eprintln!(
        "{table} {size}: compile {:?}, {:?}, sock_ops {so:.0} ns, connect4 {c4:.0} ns, {} bytes",
        row.compile, row.timings, row.memory
    );
    Ok((row, policy, enforcer))
}

/// A one-rule change (rule 1's keepidle) compiled and switched to, three times: the median.
fn one_rule_reload(
    enforcer: &mut Enforcer,
    policy: &Policy,
    listeners: &Listeners,
) -> anyhow::Result<Duration> {
    let hz = system::kernel_hz()?;
    let mut samples = Vec::new();
    let mut rules = policy.rules.clone();
    for i in 0..3 {
        let one = rules.iter_mut().find(|r| r.id == 1).context("rule 1")?;
        one.profile.keepidle = 5000 + i;
        let t = Instant::now();
        let next = compile(rules.clone(), listeners, hz)?;
        enforcer.replace(&next)?;
        samples.push(t.elapsed().as_secs_f64());
        enforcer.release_retired();
    }
    Ok(Duration::from_secs_f64(median(samples)))
}

/// PostgreSQL's push: a daemon follows a table, and each commit's change is timed until a new
/// connection of a probe in the governed cgroup carries it. Median of 5. Runs before this
/// process joins the sandbox, whose network namespace cannot reach the database.
fn push_latency(sb: &Sandbox) -> anyhow::Result<Duration> {
    anyhow::ensure!(
        std::env::var_os("TCPMGM_TEST_POSTGRES").is_some(),
        "TCPMGM_TEST_POSTGRES is not set: `cargo xtask bench` starts PostgreSQL (or pass --skip-push)"
    );
    let rt = tokio::runtime::Runtime::new()?;
    let db = rt.block_on(tcpmgm_tests::TestDb::new(
        tcpmgm_tests::Backend::Postgres,
        tcpmgm::policy::source::TableVersion::V1,
        "INSERT INTO tcp_mgm (id, remote_addr, keepidle) VALUES (1, '127.0.0.0/8', 300);",
    ));
    let daemon = tcpmgm_tests::Daemon::start(sb, &db.url, tcpmgm_tests::control_socket(sb));
    let mut probe = sb.probe();
    let mut port = 7200;
    let mut samples = Vec::new();
    for want in 301..306 {
        rt.block_on(db.sql(&format!(
            "UPDATE tcp_mgm SET keepidle = {want} WHERE id = 1;"
        )));
        let committed = Instant::now();
        while tcpmgm_tests::next_idle(&mut probe, &mut port) != want {
            anyhow::ensure!(
                committed.elapsed() < Duration::from_secs(30),
                "keepidle {want} not enforced within 30 s"
            );
        }
        samples.push(committed.elapsed().as_secs_f64());
    }
    drop(probe);
    daemon.kill();
    tcpmgm::kernel::detach_pinned(&sb.pin_dir)?;
    Ok(Duration::from_secs_f64(median(samples)))
}

fn run(args: &Args) -> anyhow::Result<()> {
    let sb = Sandbox::new();
    let push = if args.skip_push {
        None
    } else {
        let latency = push_latency(&sb)?;
        eprintln!("PostgreSQL push: {latency:?}");
        Some(latency)
    };
    let _leave = become_workload(&sb)?;
    let listener = TcpListener::bind(SERVER)?;
    let listeners = Listeners::parse_all(["tcp:127.0.0.1:7000"])?;
    let hz = system::kernel_hz()?;
    let n = args.connections;
    let mut table = Vec::new();

    // Attached with no rules: the floor of the per-invocation cost and of the connection rate.
    let empty = compile(Vec::new(), &listeners, hz)?;
    let enforcer = Enforcer::attach(&empty, &sb.cgroup, &sb.pin_dir)?;
    let (so, c4, per_conn) = cost_per_invocation(&enforcer, &listener, n);
    enforcer.detach()?;
    eprintln!(
        "0 rules: sock_ops {so:.0} ns, connect4 {c4:.0} ns ({per_conn:.1} sock_ops runs a connection)"
    );

    // One-rule reloads, each beside the cold start of the same table.
    let mut reloads = Vec::new();
    let (row, policy, mut enforcer) = measure(&sb, &listener, &listeners, "flat", rules(10), n)?;
    reloads.push((
        10,
        row.cold_start(),
        one_rule_reload(&mut enforcer, &policy, &listeners)?,
    ));
    enforcer.detach()?;

    // Every table's one-rule reload, for the picture.
    let mut reload_curve = Vec::new();
    for size in [1_000, 10_000, 100_000, 1_000_000] {
        for (name, rules) in [("flat", rules(size)), ("nested", nested_rules(size))] {
            let (row, policy, mut enforcer) = measure(&sb, &listener, &listeners, name, rules, n)?;
            let reload = one_rule_reload(&mut enforcer, &policy, &listeners)?;
            eprintln!("one-rule reload, {name} {size}: {reload:?}");
            if name == "flat" {
                reloads.push((size, row.cold_start(), reload));
            }
            reload_curve.push((name, size, reload));
            enforcer.detach()?;
            table.push(row);
        }
    }
    let pictures = draw(&args.out, &table, &reload_curve)?;

    let (sweep_ms, sweep_cpu_ms) = idle_sweep_cost(&sb, &listeners, hz)?;
    eprintln!(
        "con_lifetime sweep of {IDLE} idle connections: {sweep_ms:.1} ms wall, {sweep_cpu_ms:.1} ms CPU"
    );

    let report = report(
        &table,
        (so, c4),
        &reloads,
        push,
        (sweep_ms, sweep_cpu_ms),
        &pictures,
    )?;
    print!("{report}");
    // The sections of runs of their own (the table read, the soak): keep them.
    let old = std::fs::read_to_string(&args.out).unwrap_or_default();
    let mut report = report;
    for section in section::ALL {
        if let Some(kept) = section.of(&old) {
            report = format!("{}\n\n{kept}\n", report.trim_end());
        }
    }
    std::fs::write(&args.out, &report)
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("written to {}", args.out.display());
    Ok(())
}

/// The report's pictures, by the paths it names them.
struct Pictures {
    cold_start: String,
    per_run: String,
    reload: String,
}

/// Draws the cold start, the programs' cost a run and the one-rule reload against the rules,
/// flat and nested.
fn draw(
    out: &std::path::Path,
    table: &[Row],
    reloads: &[(&str, usize, Duration)],
) -> anyhow::Result<Pictures> {
    use plots::Series;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let of = |t: &str, value: &dyn Fn(&Row) -> f64| {
        table
            .iter()
            .filter(|r| r.table == t)
            .map(|r| (r.rules as f64, value(r)))
            .collect::<Vec<_>>()
    };
    let (cold_path, cold_start) = plots::place(out, "cold_start.svg")?;
    plots::by_rules(
        &cold_path,
        "Cold start: compile, load, fill the maps, attach",
        "ms",
        &[
            Series::new("flat", of("flat", &|r| ms(r.cold_start()))),
            Series::new("nested", of("nested", &|r| ms(r.cold_start()))),
        ],
        (true, plots::Legend::UpperLeft),
    )?;
    let (per_run_path, per_run) = plots::place(out, "per_run.svg")?;
    plots::by_rules(
        &per_run_path,
        "Program time a run (kernel accounting on)",
        "ns a run",
        &[
            Series::new("connect4, flat", of("flat", &|r| r.connect4_ns)),
            Series::new("connect4, nested", of("nested", &|r| r.connect4_ns)),
            Series::new("sock_ops, flat", of("flat", &|r| r.sock_ops_ns)),
            Series::new("sock_ops, nested", of("nested", &|r| r.sock_ops_ns)),
        ],
        (false, plots::Legend::MiddleRight),
    )?;
    let (reload_path, reload) = plots::place(out, "reload.svg")?;
    let curve = |t: &str| {
        reloads
            .iter()
            .filter(|r| r.0 == t)
            .map(|r| (r.1 as f64, ms(r.2)))
            .collect::<Vec<_>>()
    };
    plots::by_rules(
        &reload_path,
        "One-rule reload: compile and switch (the table read apart)",
        "ms",
        &[
            Series::new("flat", curve("flat")),
            Series::new("nested", curve("nested")),
        ],
        (true, plots::Legend::UpperLeft),
    )?;
    Ok(Pictures {
        cold_start,
        per_run,
        reload,
    })
}

fn report(
    table: &[Row],
    empty: (f64, f64),
    reloads: &[(usize, Duration, Duration)],
    push: Option<Duration>,
    (sweep_ms, sweep_cpu_ms): (f64, f64),
    pictures: &Pictures,
) -> anyhow::Result<String> {
    let mut report = String::new();
    let row = |t: &str, rules: usize| {
        table
            .iter()
            .find(|r| r.table == t && r.rules == rules)
            .expect("measured")
    };
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1 << 20) as f64);

    writeln!(report, "# tcpmgm benchmarks\n")?;
    writeln!(
        report,
        "Measured by `cargo xtask bench` on {} ({}).\n",
        machine(),
        chrono_free_date()
    )?;
    writeln!(
        report,
        "## Cold start\n\nCompile, then load the object and verify the programs (once per start), \
         make and fill the policy maps, install them and attach. Tables: *flat* (distinct /32 peers, \
         one rule in a hundred a /24 holding some of them) and *nested* (60% of the rules on a \
         random prefix from /11 to /32 inside one /10).\n"
    )?;
    writeln!(
        report,
        "| table | rules | compile | verify | maps | attach | cold start | sock_ops ns/run | connect4 ns/run | policy maps | per rule |"
    )?;
    writeln!(
        report,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )?;
    writeln!(
        report,
        "| (attached, no rules) | 0 | | | | | | {:.0} | {:.0} | | |",
        empty.0, empty.1
    )?;
    for r in table {
        writeln!(
            report,
            "| {} | {} | {} | {} | {} | {} | {} | {:.0} | {:.0} | {} | {} B |",
            r.table,
            r.rules,
            ms(r.compile),
            ms(r.timings.programs),
            ms(r.timings.maps),
            ms(r.timings.attach),
            ms(r.cold_start()),
            r.sock_ops_ns,
            r.connect4_ns,
            mib(r.memory),
            r.memory / r.rules.max(1) as u64
        )?;
    }
    writeln!(
        report,
        "\n![cold start against the rules]({})\n\n![program cost a run against the rules]({})",
        pictures.cold_start, pictures.per_run
    )?;
    writeln!(
        report,
        "\n## Reload\n\nA one-rule change (one rule's keepidle), compiled and switched to: the new \
         generation's maps made and filled, then installed; no program is loaded again. Median of 3.\n"
    )?;
    writeln!(report, "| rules | one-rule reload | cold start | ratio |")?;
    writeln!(report, "|---:|---:|---:|---:|")?;
    for (rules, cold, reload) in reloads {
        writeln!(
            report,
            "| {rules} | {} | {} | {:.3} |",
            ms(*reload),
            ms(*cold),
            reload.as_secs_f64() / cold.as_secs_f64()
        )?;
    }
    match push {
        Some(p) => writeln!(
            report,
            "\nPostgreSQL push: from a commit to the change enforced on a new connection, {} \
             (median of 5; the daemon's reload of a one-rule table included).",
            ms(p)
        )?,
        None => writeln!(report, "\nPostgreSQL push: not measured (--skip-push).")?,
    }
    writeln!(
        report,
        "\n![one-rule reload against the rules]({})",
        pictures.reload
    )?;
    writeln!(report, "\n## con_lifetime sweep\n")?;
    writeln!(
        report,
        "con_lifetime with {IDLE} idle connections of a rule (sock_diag dump with each socket's record,\n\
         then nothing to close): one sweep takes {sweep_ms:.1} ms ({sweep_cpu_ms:.1} ms of CPU). The daemon\n\
         sweeps once a second when every enforced con_lifetime is 4 s or more ({:.1}% of one core),\n\
         at most four times a second for shorter ones ({:.1}%).",
        sweep_cpu_ms / 1000.0 * 100.0,
        sweep_cpu_ms / 250.0 * 100.0
    )?;

    let reload_at = |rules: usize| reloads.iter().find(|r| r.0 == rules).expect("measured");
    let (r10, r100k) = (reload_at(10), reload_at(100_000));
    let (flat100k, nested100k) = (row("flat", 100_000), row("nested", 100_000));
    writeln!(report, "\n## Targets\n")?;
    writeln!(report, "| target | measured | |")?;
    writeln!(report, "|---|---|---|")?;
    writeln!(
        report,
        "| a one-rule reload at 10 rules ≤ 1/20 of a cold start | {:.3} | {} |",
        r10.2.as_secs_f64() / r10.1.as_secs_f64(),
        met(r10.2 * 20 <= r10.1)
    )?;
    writeln!(
        report,
        "| at 100k rules, a reload ≤ 0.3 × a cold start | {:.3} | {} |",
        r100k.2.as_secs_f64() / r100k.1.as_secs_f64(),
        met(r100k.2.as_secs_f64() <= 0.3 * r100k.1.as_secs_f64())
    )?;
    writeln!(
        report,
        "| nested 100k compile + load ≤ 1.5 × flat 100k | {:.2}× | {} |",
        nested100k.cold_start().as_secs_f64() / flat100k.cold_start().as_secs_f64(),
        met(nested100k.cold_start().as_secs_f64() <= 1.5 * flat100k.cold_start().as_secs_f64())
    )?;
    writeln!(
        report,
        "| flat 100k cold start (compile + load + attach) ≤ 1 s | {} | {} |",
        ms(flat100k.cold_start()),
        met(flat100k.cold_start() <= Duration::from_secs(1))
    )?;
    for t in ["flat", "nested"] {
        let m1 = row(t, 1_000_000);
        writeln!(
            report,
            "| {t} 1M cold start (compile + load + attach) ≤ 10 s | {} | {} |",
            ms(m1.cold_start()),
            met(m1.cold_start() <= Duration::from_secs(10))
        )?;
    }
    for t in ["flat", "nested"] {
        let (k1, m1) = (row(t, 1_000), row(t, 1_000_000));
        writeln!(
            report,
            "| {t}: per-invocation cost at 1M rules ≤ 2 × at 1k | sock_ops {:.2}×, connect4 {:.2}× | {} |",
            m1.sock_ops_ns / k1.sock_ops_ns,
            m1.connect4_ns / k1.connect4_ns,
            met(m1.sock_ops_ns <= 2.0 * k1.sock_ops_ns && m1.connect4_ns <= 2.0 * k1.connect4_ns)
        )?;
    }
    writeln!(
        report,
        "\nNotes: the sock_ops figure is the mean over every callback the program sees (most return at\n\
         once); the rule lookup itself runs once a socket, in connect4 for outbound sockets and at\n\
         the handshake's end for accepted ones. These figures are taken with the kernel's\n\
         accounting on, which adds its own clock reads to each run. \"per rule\" is the policy\n\
         maps' kernel memory divided by the rules: a rule is stored once whatever the nesting."
    )?;
    Ok(report)
}

/// Today's date from the system clock, as YYYY-MM-DD.
fn chrono_free_date() -> String {
    let out = std::process::Command::new("date").arg("+%Y-%m-%d").output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}
