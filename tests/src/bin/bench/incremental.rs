//! `cargo xtask bench -- --reload`: a one-rule change end to end, as an operator makes it, at
//! 100k and 1M rules: from `tcpmgm reload` until a new connection has the changed profile,
//! beside the daemon's cold start (from `tcpmgm run` to its policy attached), with the SQLite
//! change log `tcpmgm db init` installs (the reload reads and patches only the changed row) and
//! with `reload --full` (the whole table read and compiled). Writes its own section of
//! BENCHMARKS.md.
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use tcpmgm::policy::source::TableVersion;
use tcpmgm_tests::{Backend, Daemon, Probe, Sandbox, TestDb, control_socket};

use crate::section::RELOAD;

/// The ratio the issue sets: a one-rule reload ≤ 0.1 of a cold start.
const TARGET: f64 = 0.1;
const SAMPLES: usize = 5;

struct Figures {
    rules: usize,
    cold: Duration,
    patched: Duration,
    full: Duration,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Commits keepidle 100 + `n` for the loopback rule `id`, runs `tcpmgm reload ARGS` and opens
/// a new connection (to port 7300 + `n`) that must have it: the time from the command to that
/// connection.
fn one_change(
    rt: &tokio::runtime::Runtime,
    db: &TestDb,
    daemon: &Daemon,
    probe: &mut Probe,
    id: usize,
    n: u16,
    args: &[&str],
) -> anyhow::Result<Duration> {
    let (idle, port) = (100 + i64::from(n), 7300 + n);
    rt.block_on(db.sql(&format!(
        "UPDATE tcp_mgm SET keepidle = {idle} WHERE id = {id};"
    )));
    let started = Instant::now();
    let (code, report) = daemon.reload_with(args);
    anyhow::ensure!(code == 0, "reload: {report}");
    let patched = report.contains("changed in place");
    anyhow::ensure!(
        patched == args.is_empty(),
        "reload {args:?} was not what it should be: {report}"
    );
    let reply = probe.ask(&format!("pair 127.0.0.1:{port} 127.0.0.1:{port}"));
    let took = started.elapsed();
    anyhow::ensure!(
        reply.get("client_idle") == idle,
        "a new connection after {report} has keepidle {}, not {idle}",
        reply.get("client_idle")
    );
    eprintln!("{args:?}: {took:?} ({report})");
    Ok(took)
}

fn measure(rules: usize) -> anyhow::Result<Figures> {
    let rt = tokio::runtime::Runtime::new()?;
    let loopback = rules + 1;
    let mut sql = crate::table_read::table_sql(rules, 60);
    sql.push_str(&format!(
        "INSERT INTO tcp_mgm (id, remote_addr, priority, keepidle) VALUES ({loopback}, '127.0.0.0/8', 100, 100);"
    ));
    let db = rt.block_on(TestDb::new(Backend::Sqlite, TableVersion::V1, &sql));
    let sb = Sandbox::new();
    let mut colds = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let daemon = Daemon::start(&sb, &db.url, control_socket(&sb));
        colds.push(started.elapsed());
        daemon.kill();
        tcpmgm::kernel::detach_pinned(&sb.pin_dir)?;
    }
    let daemon = Daemon::start(&sb, &db.url, control_socket(&sb));
    let mut probe = sb.probe();
    let mut n = 0;
    let mut sample = |args: &[&str]| {
        // One change at a time, as an operator makes them: the daemon frees the generation a
        // switch replaced `GRACE` after it, and a reload right behind one waits for that.
        std::thread::sleep(Duration::from_millis(200));
        n += 1;
        one_change(&rt, &db, &daemon, &mut probe, loopback, n, args)
    };
    let patched = (0..SAMPLES)
        .map(|_| sample(&[]))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let full = (0..3)
        .map(|_| sample(&["--full"]))
        .collect::<anyhow::Result<Vec<_>>>()?;
    drop(probe);
    daemon.kill();
    tcpmgm::kernel::detach_pinned(&sb.pin_dir)?;
    Ok(Figures {
        rules: rules + 1,
        cold: median(colds),
        patched: median(patched),
        full: median(full),
    })
}

pub fn run(out: &Path) -> anyhow::Result<()> {
    let figures = [measure(100_000)?, measure(1_000_000)?];
    let (path, link) = crate::plots::place(out, "reload_end_to_end.svg")?;
    let ms =
        |f: &Figures, d: fn(&Figures) -> Duration| (f.rules as f64, d(f).as_secs_f64() * 1000.0);
    let line = |name: &str, d: fn(&Figures) -> Duration| {
        crate::plots::Series::new(name, figures.iter().map(|f| ms(f, d)).collect())
    };
    crate::plots::by_rules(
        &path,
        "A one-rule change, end to end",
        "ms",
        &[
            line("cold start", |f| f.cold),
            line("full reload", |f| f.full),
            line("one-rule reload (change log)", |f| f.patched),
        ],
        (true, crate::plots::Legend::UpperLeft),
    )?;
    RELOAD.write(out, &report(&figures, &link)?)
}

fn report(figures: &[Figures], picture: &str) -> anyhow::Result<String> {
    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
    let mut s = String::new();
    writeln!(s, "{}\n## Reload end to end\n", RELOAD.begin)?;
    writeln!(
        s,
        "`cargo xtask bench -- --reload` on {} ({}): a nested SQLite table (60% of the rules on \
         prefixes from /11 to /32 inside one /10) with the change log `tcpmgm db init` installs, \
         and one loopback rule whose keepidle is changed. *cold start* is from `tcpmgm run` to \
         its policy attached (median of 3). *one-rule reload* is from `tcpmgm reload` to a new \
         connection in the cgroup having the new keepidle (median of {SAMPLES}, 200 ms apart: \
         a reload within {} ms of the last switch first waits for the generation it replaced \
         to be freed): the reload reads the one changed row the log names and patches that \
         rule's profile. *full* is \
         the same with `tcpmgm reload --full`, which reads and compiles the whole table \
         (median of 3). A PostgreSQL table's row triggers name the changed rows in their \
         notifications, which patch the same way (the PostgreSQL push above); MariaDB tables \
         have neither: their reloads read the whole table.\n",
        crate::machine(),
        crate::chrono_free_date(),
        tcpmgm::kernel::GRACE.as_millis()
    )?;
    writeln!(
        s,
        "| rules | cold start | one-rule reload | ratio | full reload | ratio | one-rule reload ≤ {TARGET} × cold start |"
    )?;
    writeln!(s, "|---:|---:|---:|---:|---:|---:|---|")?;
    for f in figures {
        let ratio = |d: Duration| d.as_secs_f64() / f.cold.as_secs_f64();
        writeln!(
            s,
            "| {} | {} | {} | {:.3} | {} | {:.3} | {} |",
            f.rules,
            ms(f.cold),
            ms(f.patched),
            ratio(f.patched),
            ms(f.full),
            ratio(f.full),
            if ratio(f.patched) <= TARGET {
                "met"
            } else {
                "NOT met"
            }
        )?;
    }
    writeln!(
        s,
        "\n![cold start, full and one-rule reload against the rules]({picture})\n"
    )?;
    writeln!(s, "{}", RELOAD.end)?;
    Ok(s)
}
