//! `cargo xtask bench --fleet N`: N daemons, each on a cgroup, network namespace, pin directory
//! and control socket of its own, follow one PostgreSQL table. One change is committed, and the
//! time from the commit to the change being enforced on a new connection is measured in every
//! cgroup; beside it, the same for one daemon alone. Writes its own section of BENCHMARKS.md.
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tcpmgm::policy::source::TableVersion;
use tcpmgm_tests::{Backend, Daemon, Probe, Sandbox, TestDb, control_socket, next_idle};

use crate::section::FLEET;

/// Changes committed per run; the latencies of every daemon for every change are pooled.
const CHANGES: i64 = 5;
/// How long one daemon may take to enforce a change before the run fails.
const LIMIT: Duration = Duration::from_secs(60);

struct Node {
    sb: Sandbox,
    daemon: Daemon,
    probe: Probe,
    port: u16,
}

/// What the database's statistics say of this database: (connections other than the asking
/// one, transactions committed or rolled back so far).
async fn pg_counts(pool: &sqlx::PgPool) -> anyhow::Result<(i64, i64)> {
    // The cumulative statistics are flushed by each backend within a second of its work.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let connections: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .fetch_one(pool)
    .await?;
    sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(pool)
        .await?;
    let transactions: i64 = sqlx::query_scalar(
        "SELECT CAST(xact_commit + xact_rollback AS BIGINT) FROM pg_stat_database \
         WHERE datname = current_database()",
    )
    .fetch_one(pool)
    .await?;
    Ok((connections, transactions))
}

/// Commits keepidle `want` and returns, for each node, how long until a new connection in its
/// cgroup had it.
fn change(
    rt: &tokio::runtime::Runtime,
    db: &TestDb,
    nodes: &mut [Node],
    want: i64,
) -> anyhow::Result<Vec<Duration>> {
    rt.block_on(db.sql(&format!(
        "UPDATE tcp_mgm SET keepidle = {want} WHERE id = 1;"
    )));
    let committed = Instant::now();
    std::thread::scope(|scope| {
        let waits: Vec<_> = nodes
            .iter_mut()
            .map(|node| {
                scope.spawn(move || {
                    while next_idle(&mut node.probe, &mut node.port) != want {
                        anyhow::ensure!(
                            committed.elapsed() < LIMIT,
                            "keepidle {want} not enforced in {} within {LIMIT:?}",
                            node.sb.cgroup.display()
                        );
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Ok(committed.elapsed())
                })
            })
            .collect();
        waits
            .into_iter()
            .map(|w| w.join().expect("a waiting thread"))
            .collect()
    })
}

fn start(db: &TestDb, count: usize) -> Vec<Node> {
    (0..count)
        .map(|i| {
            let sb = Sandbox::new();
            let daemon = Daemon::start(&sb, &db.url, control_socket(&sb));
            let probe = sb.probe();
            Node {
                sb,
                daemon,
                probe,
                port: 7300 + (i as u16 % 100) * 100,
            }
        })
        .collect()
}

fn stop(nodes: Vec<Node>) -> anyhow::Result<()> {
    for node in nodes {
        drop(node.probe);
        node.daemon.kill();
        tcpmgm::kernel::detach_pinned(&node.sb.pin_dir)?;
    }
    Ok(())
}

/// The `q` quantile of sorted `v` (nearest rank).
fn quantile(v: &[Duration], q: f64) -> Duration {
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// Latencies of `count` daemons over `CHANGES` changes, sorted, with the connections they hold
/// and the transactions they make per change, per daemon.
fn measure(
    rt: &tokio::runtime::Runtime,
    db: &TestDb,
    pool: &sqlx::PgPool,
    count: usize,
    first: i64,
) -> anyhow::Result<(Vec<Duration>, f64, f64)> {
    let mut nodes = start(db, count);
    let (connections, before) = rt.block_on(pg_counts(pool))?;
    let mut all = Vec::new();
    for want in first..first + CHANGES {
        all.extend(change(rt, db, &mut nodes, want)?);
    }
    let (_, after) = rt.block_on(pg_counts(pool))?;
    stop(nodes)?;
    all.sort();
    // Less the UPDATEs and the statistics queries of this bench.
    let ours = CHANGES + 4;
    let per_change = (after - before - ours) as f64 / (CHANGES as f64 * count as f64);
    Ok((all, connections as f64 / count as f64, per_change))
}

pub fn run(count: usize, out: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(
        std::env::var_os("TCPMGM_TEST_POSTGRES").is_some(),
        "TCPMGM_TEST_POSTGRES is not set: `cargo xtask bench` starts PostgreSQL"
    );
    let rt = tokio::runtime::Runtime::new()?;
    let db = rt.block_on(TestDb::new(
        Backend::Postgres,
        TableVersion::V1,
        "INSERT INTO tcp_mgm (id, remote_addr, keepidle) VALUES (1, '127.0.0.0/8', 300);",
    ));
    // One connection: `pg_counts` leaves out only the one asking.
    let pool = rt
        .block_on(
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .connect(&db.url),
        )
        .context("the bench's own connection")?;
    let (single, single_connections, single_queries) = measure(&rt, &db, &pool, 1, 301)?;
    eprintln!(
        "fleet, 1 daemon: p50 {:?}, {single_connections} connections, {single_queries:.1} transactions a change",
        quantile(&single, 0.5)
    );
    let (fleet, connections, queries) = measure(&rt, &db, &pool, count, 401)?;
    eprintln!(
        "fleet, {count} daemons: p50 {:?} p99 {:?} max {:?}, {connections:.1} connections and \
         {queries:.1} transactions a change per daemon",
        quantile(&fleet, 0.5),
        quantile(&fleet, 0.99),
        fleet.last().copied().unwrap_or_default()
    );
    let section = report(
        count,
        (&single, single_connections, single_queries),
        (&fleet, connections, queries),
    )?;
    FLEET.write(out, &section)
}

fn report(
    count: usize,
    (single, single_connections, single_queries): (&[Duration], f64, f64),
    (fleet, connections, queries): (&[Duration], f64, f64),
) -> anyhow::Result<String> {
    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
    let single_p99 = quantile(single, 0.99);
    let p99 = quantile(fleet, 0.99);
    let ratio = p99.as_secs_f64() / single_p99.as_secs_f64();
    let yes = |met: bool| if met { "met" } else { "NOT met" };
    let mut s = String::new();
    writeln!(s, "{}\n## Fleet\n", FLEET.begin)?;
    writeln!(
        s,
        "`cargo xtask bench --fleet {count}` on {} ({}): {count} daemons on one machine, each on \
         a cgroup, network namespace, pin directory and control socket of its own, follow one \
         PostgreSQL table (a one-rule table). {CHANGES} changes are committed one after another; \
         for each, every cgroup opens loopback connections until one has the new keepidle. The \
         latencies of every daemon for every change are pooled. *connections* are the table \
         database's connections in `pg_stat_activity` per daemon, counted at rest (the one that \
         listens for changes; a reload opens one more for its read and closes it); *transactions a change* are \
         `pg_stat_database`'s commits and rollbacks per daemon per change (each of tcpmgm's \
         queries is a transaction of its own). All the daemons share this machine's cores, so \
         at {count} daemons the latency is mostly their reloads queued for the CPU, which \
         daemons on machines of their own do not see.\n",
        crate::machine(),
        crate::chrono_free_date()
    )?;
    writeln!(
        s,
        "| daemons | p50 | p99 | max | connections per daemon | transactions a change per daemon |"
    )?;
    writeln!(s, "|---:|---:|---:|---:|---:|---:|")?;
    for (n, v, c, q) in [
        (1, single, single_connections, single_queries),
        (count, fleet, connections, queries),
    ] {
        writeln!(
            s,
            "| {n} | {} | {} | {} | {c:.2} | {q:.1} |",
            ms(quantile(v, 0.5)),
            ms(quantile(v, 0.99)),
            ms(v.last().copied().unwrap_or_default())
        )?;
    }
    writeln!(s, "\n| target | measured | |\n|---|---|---|")?;
    writeln!(
        s,
        "| p99 at {count} daemons ≤ 2 × one daemon's | {ratio:.2}× | {} |",
        yes(ratio <= 2.0)
    )?;
    writeln!(
        s,
        "| one connection per daemon | {connections:.2} | {} |",
        yes(connections <= 1.0)
    )?;
    writeln!(s, "{}", FLEET.end)?;
    Ok(s)
}
