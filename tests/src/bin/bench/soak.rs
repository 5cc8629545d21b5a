//! `cargo xtask bench --soak MINUTES`: one `tcpmgm run` under steady load for MINUTES minutes,
//! sampled every 10 s, to show that its memory, descriptors and maps stay flat.
//!
//! The daemon enforces a SQLite table of a few hundred rules on the sandbox's cgroup. Meanwhile,
//! each bounded in rate, count and time:
//! - this process (in the cgroup and namespace) opens 200 loopback connections a second, each
//!   checked for the loopback rule's keepidle, and one a second to a rule with a con_lifetime,
//!   left idle for the daemon's sweeper to close;
//! - the loopback rule's keepidle is toggled in the table and `tcpmgm reload` asked, every second;
//! - `tcpmgm status --json`, every second;
//! - control-socket clients that close at once, and between two samples a few that send nothing
//!   until the daemon drops them.
//!
//! A sample reads the daemon's VmRSS, counts its fds, and sums `memlock:` in /proc/PID/fdinfo
//! over its BPF map fds: every map the daemon holds, so a retired generation it failed to free
//! shows, where the pinned maps would show only the generation in force. Samples are taken with
//! the workers paused (a lock they hold while they talk to the daemon) and read until two reads
//! agree, so that a reload, a control connection or a sweep in flight is not taken for growth.
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::Read as _;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tcpmgm::daemon::status::DaemonState;
use tcpmgm::policy::source::{Source, TableVersion};
use tcpmgm_tests::{Backend, Daemon, Sandbox, TestDb, binary, control_socket};

use crate::section::SOAK;

const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// Rules of the table besides the two the soak's connections meet.
const OTHER_RULES: usize = 300;
/// The rule of the loopback connections (127.0.0.1), whose keepidle the reloads toggle.
const LOOPBACK_RULE: usize = OTHER_RULES + 1;
/// The rule of the idle connections (127.0.0.2), with a con_lifetime of `LIFETIME`.
const LIFETIME_RULE: usize = OTHER_RULES + 2;
const KEEPIDLE: [u64; 2] = [77, 78];
const LIFETIME: Duration = Duration::from_secs(2);
/// The sweeper closes within con_lifetime + 1 s; more than this is a failure.
const LIFETIME_LIMIT: Duration = Duration::from_secs(5);
const SERVER: &str = "127.0.0.1:7000";
const IDLE_SERVER: &str = "127.0.0.2:7001";
/// Connections a tick of `TICK`: 200 a second.
const CONNECTIONS_PER_TICK: usize = 20;
const TICK: Duration = Duration::from_millis(100);
/// The period of reloads, status calls and control-socket clients.
const SECOND: Duration = Duration::from_secs(1);
/// Silent control-socket clients opened together, once between two samples.
const SILENT_CLIENTS: usize = 5;
/// How long any one request to the daemon may take before it counts as failed.
const REQUEST_LIMIT: Duration = Duration::from_secs(30);
/// Flat: from the second sample (start-up done) to the last, RSS grows by at most this fraction
/// or `RSS_SLACK`, whichever is more; fds and map memory do not change.
const RSS_SLACK_FRACTION: f64 = 0.05;
const RSS_SLACK: u64 = 2 << 20;

/// What was done, by every worker, since the start.
#[derive(Default)]
struct Counts {
    connections: AtomicU64,
    swept: AtomicU64,
    reloads: AtomicU64,
    status: AtomicU64,
    control: AtomicU64,
    silent_dropped: AtomicU64,
    failures: AtomicU64,
}

struct Snapshot {
    connections: u64,
    swept: u64,
    reloads: u64,
    status: u64,
    control: u64,
    silent_dropped: u64,
    failures: u64,
}

impl Counts {
    fn snapshot(&self) -> Snapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Snapshot {
            connections: get(&self.connections),
            swept: get(&self.swept),
            reloads: get(&self.reloads),
            status: get(&self.status),
            control: get(&self.control),
            silent_dropped: get(&self.silent_dropped),
            failures: get(&self.failures),
        }
    }
}

/// What the workers share.
struct Shared {
    counts: Counts,
    /// The first failures, for the report.
    failed: Mutex<Vec<String>>,
    /// Held for reading while a worker talks to the daemon, for writing while a sample is read.
    quiet: RwLock<()>,
    start: Instant,
    deadline: Instant,
    stop: AtomicBool,
}

impl Shared {
    fn running(&self) -> bool {
        !self.stop.load(Ordering::Relaxed) && Instant::now() < self.deadline
    }

    fn count(&self, what: &AtomicU64) {
        what.fetch_add(1, Ordering::Relaxed);
    }

    fn fail(&self, what: String) {
        self.counts.failures.fetch_add(1, Ordering::Relaxed);
        eprintln!("soak: {what}");
        let mut failed = self.failed.lock().unwrap();
        if failed.len() < 5 {
            failed.push(what);
        }
    }

    /// Runs `work` once every `period`, at most `max` times and until the deadline.
    fn every(&self, period: Duration, max: u64, mut work: impl FnMut(u64)) {
        for i in 0..max {
            if !self.running() {
                return;
            }
            let started = Instant::now();
            work(i);
            std::thread::sleep(period.saturating_sub(started.elapsed()));
        }
    }
}

/// One sample of the daemon.
struct Sample {
    at: Duration,
    rules: usize,
    generation: u64,
    rss: u64,
    fds: usize,
    map_memory: u64,
    counts: Snapshot,
}

/// The table: `OTHER_RULES` distinct peers in 10.0.0.0/8 with protocols, ports, priorities and
/// some no_new_conn mixed, then the loopback rule and the con_lifetime rule.
fn table() -> String {
    let mut sql = String::new();
    for i in 1..=OTHER_RULES {
        let _ = writeln!(
            sql,
            "INSERT INTO tcp_mgm (id, proto, remote_addr, remote_port, priority, keepidle, no_new_conn) \
             VALUES ({i}, '{}', '{}', {}, {}, {}, {});",
            ["any", "tcp", "tls"][i % 3],
            Ipv4Addr::from((10 << 24) + i as u32),
            [0, 5060][i % 2],
            i % 3,
            100 + i,
            u8::from(i % 50 == 7)
        );
    }
    let _ = writeln!(
        sql,
        "INSERT INTO tcp_mgm (id, remote_addr, keepidle) VALUES ({LOOPBACK_RULE}, '127.0.0.1', {});",
        KEEPIDLE[0]
    );
    let _ = writeln!(
        sql,
        "INSERT INTO tcp_mgm (id, remote_addr, con_lifetime) VALUES ({LIFETIME_RULE}, '127.0.0.2', {});",
        LIFETIME.as_secs()
    );
    sql
}

/// Runs `cmd` for at most `REQUEST_LIMIT`, killing it by its pid past that: its exit status,
/// stdout and stderr.
fn bounded(cmd: &mut Command) -> anyhow::Result<(ExitStatus, String, String)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("{cmd:?}"))?;
    // Read beside the wait, so that a full pipe never holds the child up.
    let drain = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("piped")));
    let err = drain(Box::new(child.stderr.take().expect("piped")));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > REQUEST_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("{cmd:?} did not finish within {REQUEST_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok((
        status,
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    ))
}

/// One loopback connection, checked for the loopback rule's keepidle (either of the two the
/// reloads alternate). The client closes with RST so that no TIME_WAIT piles up.
fn connect_once(listener: &TcpListener) -> anyhow::Result<()> {
    let client = TcpStream::connect(SERVER).context("connect")?;
    let (server, _) = listener.accept().context("accept")?;
    let idle = socket2::SockRef::from(&server).keepalive_time()?.as_secs();
    anyhow::ensure!(
        KEEPIDLE.contains(&idle),
        "an accepted connection has keepidle {idle}, not the loopback rule's {KEEPIDLE:?}"
    );
    socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO))?;
    Ok(())
}

/// Whether the connection has been closed (by the sweeper: ECONNABORTED, or the peer's reset).
fn closed(s: &TcpStream) -> bool {
    !matches!(s.peek(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// Loopback connections at 200 a second, and an idle one a second for the sweeper.
fn connections(shared: &Shared, ticks: u64) -> anyhow::Result<()> {
    let listener = TcpListener::bind(SERVER)?;
    let idle_listener = TcpListener::bind(IDLE_SERVER)?;
    let mut idle: VecDeque<(TcpStream, TcpStream, Instant)> = VecDeque::new();
    shared.every(TICK, ticks, |tick| {
        for _ in 0..CONNECTIONS_PER_TICK {
            match connect_once(&listener) {
                Ok(()) => shared.count(&shared.counts.connections),
                Err(e) => shared.fail(format!("connection: {e:#}")),
            }
        }
        if tick % 10 == 0 {
            let pair = TcpStream::connect(IDLE_SERVER)
                .and_then(|c| Ok((c, idle_listener.accept()?.0)))
                .and_then(|(c, s)| c.set_nonblocking(true).map(|()| (c, s)));
            match pair {
                Ok((c, s)) => idle.push_back((c, s, Instant::now())),
                Err(e) => shared.fail(format!("idle connection: {e}")),
            }
        }
        idle.retain(|(client, _, opened)| {
            if closed(client) {
                shared.count(&shared.counts.swept);
                false
            } else if opened.elapsed() > LIFETIME_LIMIT {
                shared.fail(format!(
                    "an idle connection of rule {LIFETIME_RULE} (con_lifetime {LIFETIME:?}) was open after {LIFETIME_LIMIT:?}"
                ));
                false
            } else {
                true
            }
        });
    });
    Ok(())
}

/// Every second: the loopback rule's keepidle toggled in the table, then `tcpmgm reload`.
fn reloads(shared: &Shared, db: &str, control: &Path, max: u64) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    shared.every(SECOND, max, |i| {
        let _busy = shared.quiet.read().unwrap();
        let keepidle = KEEPIDLE[(i as usize + 1) % 2];
        let sql = format!("UPDATE tcp_mgm SET keepidle = {keepidle} WHERE id = {LOOPBACK_RULE};");
        let changed = rt.block_on(async {
            Source::open(db, false)
                .await?
                .execute_script(&sql)
                .await
                .map_err(anyhow::Error::from)
        });
        if let Err(e) = changed {
            shared.fail(format!("changing the table: {e:#}"));
            return;
        }
        match bounded(
            Command::new(binary("tcpmgm"))
                .arg("reload")
                .arg("--control")
                .arg(control),
        ) {
            Ok((st, _, _)) if st.success() => shared.count(&shared.counts.reloads),
            Ok((st, out, err)) => shared.fail(format!("reload: {st}: {out}{err}")),
            Err(e) => shared.fail(format!("reload: {e:#}")),
        }
    });
    Ok(())
}

/// Every second: `tcpmgm status --json`, which must find the daemon running.
fn status(shared: &Shared, sb: &Sandbox, control: &Path, max: u64) {
    shared.every(SECOND, max, |_| {
        let _busy = shared.quiet.read().unwrap();
        let answer = bounded(
            Command::new(binary("tcpmgm"))
                .args(["status", "--json", "--cgroup"])
                .arg(&sb.cgroup)
                .arg("--pin-dir")
                .arg(&sb.pin_dir)
                .arg("--control")
                .arg(control),
        );
        match answer {
            Ok((st, out, err)) if st.success() => {
                let json: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
                if json[0]["daemon_running"] == true {
                    shared.count(&shared.counts.status);
                } else {
                    shared.fail(format!("status: the daemon is not running: {out}{err}"));
                }
            }
            Ok((st, out, err)) => shared.fail(format!("status: {st}: {out}{err}")),
            Err(e) => shared.fail(format!("status: {e:#}")),
        }
    });
}

/// Every second a control-socket client that closes without a request; a second after each
/// sample, also `SILENT_CLIENTS` that send nothing and must be dropped by the daemon's read
/// timeout (5 s) before the next sample, which waits for them.
fn control_clients(shared: &Shared, control: &Path, max: u64) {
    let mut batched = None;
    shared.every(SECOND, max, |_| {
        let _busy = shared.quiet.read().unwrap();
        match UnixStream::connect(control) {
            Ok(s) => {
                drop(s);
                shared.count(&shared.counts.control);
            }
            Err(e) => shared.fail(format!("control socket: {e}")),
        }
        let elapsed = shared.start.elapsed().as_secs();
        let (period, phase) = (
            elapsed / SAMPLE_EVERY.as_secs(),
            elapsed % SAMPLE_EVERY.as_secs(),
        );
        if !(1..=3).contains(&phase) || batched == Some(period) {
            return;
        }
        batched = Some(period);
        let silent: Vec<_> = (0..SILENT_CLIENTS)
            .map(|_| UnixStream::connect(control))
            .collect();
        for s in silent {
            let reply = s.and_then(|mut s| {
                s.set_read_timeout(Some(REQUEST_LIMIT))?;
                let mut reply = String::new();
                s.read_to_string(&mut reply)?;
                Ok(reply)
            });
            match reply {
                Ok(r) if r.starts_with("error no request") => {
                    shared.count(&shared.counts.silent_dropped)
                }
                other => shared.fail(format!("a silent control client got {other:?}")),
            }
        }
    });
}

/// (VmRSS in bytes, open fds, memlock summed over the BPF maps it holds) of process `pid`.
fn read_process(pid: u32) -> anyhow::Result<(u64, usize, u64)> {
    let proc = format!("/proc/{pid}");
    let status = std::fs::read_to_string(format!("{proc}/status"))
        .with_context(|| format!("the daemon (pid {pid}) is gone"))?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")?;
    let (mut fds, mut memlock) = (0, 0);
    let mut seen = std::collections::HashSet::new();
    for fd in std::fs::read_dir(format!("{proc}/fd"))? {
        let fd = fd?;
        fds += 1;
        // An fd closed between the listing and these reads is simply not a map.
        let is_map = std::fs::read_link(fd.path())
            .is_ok_and(|target| target.as_os_str() == "anon_inode:bpf-map");
        if !is_map {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "{proc}/fdinfo/{}",
            fd.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
        };
        // A map held by two fds (the loaded object's and a pin's, say) is counted once.
        if field("map_id:").is_none_or(|id| seen.insert(id)) {
            memlock += field("memlock:").unwrap_or(0);
        }
    }
    Ok((rss_kib * 1024, fds, memlock))
}

/// The daemon's figures once two reads 100 ms apart agree on fds and map memory (at most 2 s).
pub fn read_settled(pid: u32) -> anyhow::Result<(u64, usize, u64)> {
    let mut last = read_process(pid)?;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(100));
        let next = read_process(pid)?;
        if (next.1, next.2) == (last.1, last.2) {
            return Ok(next);
        }
        last = next;
    }
    Ok(last)
}

/// Samples the daemon at 0, 10, 20 s ... up to `minutes`.
fn sample_all(
    shared: &Shared,
    pid: u32,
    control: &Path,
    minutes: u64,
) -> anyhow::Result<Vec<Sample>> {
    let start = shared.start;
    let mut samples = Vec::new();
    for k in 0..=(minutes * 60 / SAMPLE_EVERY.as_secs()) {
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        let at = start + SAMPLE_EVERY * k as u32;
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        let _quiet = shared.quiet.write().unwrap();
        // The daemon frees a replaced generation a moment after it answers the reload.
        std::thread::sleep(Duration::from_millis(200));
        let (rss, fds, map_memory) = read_settled(pid)?;
        let state = DaemonState::read(control).context("the daemon's state file")?;
        let s = Sample {
            at: start.elapsed(),
            rules: state.rules,
            generation: state.generation,
            rss,
            fds,
            map_memory,
            counts: shared.counts.snapshot(),
        };
        eprintln!("soak: {}", sample_row(&s).trim_end());
        samples.push(s);
    }
    Ok(samples)
}

/// Runs the soak and writes its section into `out`.
pub fn run(minutes: u64, out: &Path) -> anyhow::Result<()> {
    let sb = Sandbox::new();
    let db = tokio::runtime::Runtime::new()?.block_on(TestDb::new(
        Backend::Sqlite,
        TableVersion::V1,
        &table(),
    ));
    let control = control_socket(&sb);
    let netns = sb.netns.path();
    let daemon = Daemon::start_args(&sb, control.clone(), &["--db", &db.url, "--netns", &netns]);
    let pid = daemon.pid();
    // The connections are this process's: into the sandbox's namespace and cgroup, after the
    // daemon started outside them.
    let _leave = super::become_workload(&sb)?;

    let start = Instant::now();
    let seconds = minutes * 60;
    let shared = Shared {
        counts: Counts::default(),
        failed: Mutex::new(Vec::new()),
        quiet: RwLock::new(()),
        start,
        deadline: start + Duration::from_secs(seconds),
        stop: AtomicBool::new(false),
    };
    // A worker that cannot go on stops the others and the sampling.
    let stop_on_error = |r: anyhow::Result<()>| {
        if r.is_err() {
            shared.stop.store(true, Ordering::Relaxed);
        }
        r
    };
    let samples = std::thread::scope(|s| {
        let workers = [
            s.spawn(|| stop_on_error(connections(&shared, seconds * 10))),
            s.spawn(|| stop_on_error(reloads(&shared, &db.url, &control, seconds))),
            s.spawn(|| {
                status(&shared, &sb, &control, seconds);
                Ok(())
            }),
            s.spawn(|| {
                control_clients(&shared, &control, seconds);
                Ok(())
            }),
        ];
        let samples = sample_all(&shared, pid, &control, minutes);
        shared.stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().expect("a soak worker panicked")?;
        }
        samples
    })?;
    daemon.kill();
    tcpmgm::kernel::detach_pinned(&sb.pin_dir)?;

    let failed = shared.failed.into_inner().unwrap();
    let section = section(minutes, &samples, &failed)?;
    SOAK.write(out, &section)
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / f64::from(1 << 20))
}

fn mib2(b: u64) -> String {
    format!("{:.2} MiB", b as f64 / f64::from(1 << 20))
}

fn sample_row(s: &Sample) -> String {
    let c = &s.counts;
    format!(
        "| {} s | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
        s.at.as_secs(),
        s.rules,
        s.generation,
        mib(s.rss),
        s.fds,
        mib2(s.map_memory),
        c.connections,
        c.swept,
        c.reloads,
        c.status,
        c.control,
        c.silent_dropped,
        c.failures
    )
}

/// The soak's section of BENCHMARKS.md, markers included, with the flat targets judged.
fn section(minutes: u64, samples: &[Sample], failed: &[String]) -> anyhow::Result<String> {
    let (Some(start), Some(end)) = (samples.get(1), samples.last()) else {
        anyhow::bail!("the soak took fewer than two samples");
    };
    let span = (end.at - start.at).as_secs_f64();
    let per_10_min = |a: u64, b: u64| (b as f64 - a as f64) / span * 600.0;
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    let c = &end.counts;
    let mut s = String::new();
    writeln!(s, "{}\n## Soak\n", SOAK.begin)?;
    writeln!(
        s,
        "`cargo xtask bench --soak {minutes}` on {} ({}): one `tcpmgm run` on a cgroup and network \
         namespace of the bench's own, enforcing a SQLite table of {} rules, for {minutes} min \
         under, all at once: loopback connections from the governed cgroup ({} a second, each \
         checked for its rule's keepidle) and one a second left idle for con_lifetime ({} s) to \
         close; the loopback rule's keepidle toggled in the table and `tcpmgm reload` every second; \
         `tcpmgm status --json` every second; a control-socket client that closes at once every \
         second, and {SILENT_CLIENTS} silent ones between two samples that the daemon drops. Sampled every \
         {} s, with the load paused: VmRSS, open fds, and the map memory (the sum of `memlock:` in \
         /proc/PID/fdinfo over every BPF map fd the daemon holds).\n",
        super::machine(),
        super::chrono_free_date(),
        OTHER_RULES + 2,
        CONNECTIONS_PER_TICK as u64 * 1000 / TICK.as_millis() as u64,
        LIFETIME.as_secs(),
        SAMPLE_EVERY.as_secs()
    )?;
    writeln!(
        s,
        "| t | rules | generation | RSS | fds | map memory | connections | closed idle | reloads | status | control clients | silent clients dropped | failures |"
    )?;
    writeln!(
        s,
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )?;
    for sample in samples {
        s.push_str(&sample_row(sample));
    }
    let rss_slack = RSS_SLACK.max((start.rss as f64 * RSS_SLACK_FRACTION) as u64);
    let rss_ok = end.rss <= start.rss + rss_slack;
    let fds_ok = end.fds == start.fds;
    let maps_ok = end.rules == start.rules && end.map_memory == start.map_memory;
    writeln!(
        s,
        "\nFrom the second sample ({} s, start-up done) to the last ({} s):\n",
        start.at.as_secs(),
        end.at.as_secs()
    )?;
    writeln!(s, "| | start | end | growth per 10 min | flat | |")?;
    writeln!(s, "|---|---:|---:|---:|---|---|")?;
    writeln!(
        s,
        "| RSS | {} | {} | {:+.2} MiB | ≤ +{:.0}% or ≤ +{} | {} |",
        mib(start.rss),
        mib(end.rss),
        per_10_min(start.rss, end.rss) / f64::from(1 << 20),
        RSS_SLACK_FRACTION * 100.0,
        mib(RSS_SLACK),
        met(rss_ok)
    )?;
    writeln!(
        s,
        "| open fds | {} | {} | {:+.1} | equal | {} |",
        start.fds,
        end.fds,
        per_10_min(start.fds as u64, end.fds as u64),
        met(fds_ok)
    )?;
    writeln!(
        s,
        "| map memory ({} and {} rules) | {} B | {} B | {:+.1} KiB | equal at equal rule counts | {} |",
        start.rules,
        end.rules,
        start.map_memory,
        end.map_memory,
        per_10_min(start.map_memory, end.map_memory) / 1024.0,
        met(maps_ok)
    )?;
    writeln!(
        s,
        "| failures (a connection refused or without its keepidle, an idle connection not closed \
         within {} s, a reload not answered ok, a status without the daemon, a control client not \
         served) | | {} | | none | {} |",
        LIFETIME_LIMIT.as_secs(),
        c.failures,
        met(c.failures == 0)
    )?;
    writeln!(
        s,
        "\nDone: {} connections, {} idle ones closed by con_lifetime, {} reloads answered ok, {} \
         status calls, {} control clients closed at once and {} silent ones dropped by the daemon.",
        c.connections, c.swept, c.reloads, c.status, c.control, c.silent_dropped
    )?;
    for f in failed {
        writeln!(s, "- failure: {f}")?;
    }
    writeln!(s, "{}", SOAK.end)?;
    Ok(s)
}
