//! `cargo xtask bench -- --table-read`: how long reading and validating a 100k-row table takes,
//! from SQLite, PostgreSQL and MariaDB, beside what each database's own client takes to print
//! the same rows. Writes its own section of BENCHMARKS.md.
//!
//! The table is nested: 60% of the rules on a prefix from /11 to /32 inside one /10, the rest
//! distinct /32 peers, with ports, protocols, priorities and keepalive values mixed.
use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::Context as _;
use clap::Parser as _;
use tcpmgm::policy::pipeline::RuleArgs;
use tcpmgm::policy::rule::{Row, validate_row};
use tcpmgm::policy::source::{Source, SourceError, TableVersion};
use tcpmgm_tests::{Backend, TestDb, binary};

use crate::section::TABLE_READ;

const ROWS: usize = 100_000;
const SAMPLES: usize = 5;

/// The rule arguments as `tcpmgm check --db URL` has them.
#[derive(clap::Parser)]
struct Check {
    #[command(flatten)]
    rules: RuleArgs,
}

/// One database's figures, each the median of `SAMPLES` runs in ms.
struct Figures {
    backend: &'static str,
    /// `RuleArgs::read`: the read `check`, `run` and a reload do, validation included.
    read: f64,
    /// The fast read alone: the rows as `Row`s, not validated; None where the database has none.
    fast: Option<f64>,
    /// The row by row read, validation included (the fallback, and the read before).
    row_by_row: f64,
    /// `tcpmgm check --db URL` as a process, from start to exit.
    check: f64,
    /// The database's own client printing every row.
    client: f64,
}

/// A table of `rows` rules as `INSERT` statements of up to a thousand rows: `nested` percent of
/// them on a prefix from /11 to /32 inside 10.64.0.0/10, the rest distinct /32 peers.
pub fn table_sql(rows: usize, nested: u64) -> String {
    let mut sql = String::new();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let protos = ["any", "tcp", "tls", "ws", "wss"];
    for chunk in 0..rows.div_ceil(1000) {
        sql.push_str(
            "INSERT INTO tcp_mgm (id, proto, remote_addr, remote_port, local_addr, local_port, \
             priority, keepidle, keepinterval, keepcount, connect_timeout) VALUES ",
        );
        let last = (rows - chunk * 1000).min(1000) - 1;
        for i in 0..=last {
            let id = chunk * 1000 + i + 1;
            let r = next();
            let remote = if r % 100 < nested {
                // Inside 10.64.0.0/10, on a prefix of /11 to /32.
                let len = 11 + (r >> 8) % 22;
                let addr = (10u32 << 24 | 64 << 16) | ((r >> 32) as u32 & 0x003f_ffff);
                let addr = addr & (u32::MAX << (32 - len));
                format!("{}/{len}", std::net::Ipv4Addr::from(addr))
            } else {
                let addr = (11u32 << 24) + id as u32;
                format!("{}/32", std::net::Ipv4Addr::from(addr))
            };
            let sep = if i == last { ";\n" } else { ", " };
            write!(
                sql,
                "({id}, '{}', '{remote}', {}, NULL, 0, {}, {}, {}, {}, {}){sep}",
                protos[(r >> 40) as usize % protos.len()],
                [0, 5060, 5061][(r >> 44) as usize % 3],
                (r >> 48) % 10,
                30 + (r >> 52) % 600,
                5 + (r >> 56) % 30,
                3 + (r >> 60) % 6,
                100 + (r >> 20) % 4000,
            )
            .expect("a String");
        }
    }
    sql
}

fn median_ms(mut run: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    run()?; // warm-up: the database's caches, the page cache
    let mut samples = Vec::new();
    for _ in 0..SAMPLES {
        let started = Instant::now();
        run()?;
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(crate::median(samples))
}

/// The database's own client printing every row of the table at `url` to /dev/null.
fn client(backend: Backend, url: &str) -> anyhow::Result<Command> {
    let select = "SELECT * FROM tcp_mgm";
    Ok(match backend {
        Backend::Sqlite => {
            let mut c = Command::new("sqlite3");
            c.arg(url.trim_start_matches("sqlite://")).arg(select);
            c
        }
        Backend::Postgres => {
            let mut c = Command::new("psql");
            c.args([url, "-Atc", select]);
            c
        }
        Backend::MariaDb => {
            // mysql://USER:PASSWORD@HOST:PORT/DB
            let rest = url.trim_start_matches("mysql://");
            let (auth, rest) = rest.split_once('@').context("mysql://user:password@...")?;
            let (user, password) = auth.split_once(':').context("mysql://user:password@...")?;
            let (host, db) = rest.split_once('/').context("mysql://.../db")?;
            let (host, port) = host.split_once(':').unwrap_or((host, "3306"));
            let mut c = Command::new("mariadb");
            c.args([
                "-h", host, "-P", port, "-u", user, "--quick", "-N", "-e", select, db,
            ])
            .env("MYSQL_PWD", password);
            c
        }
    })
}

fn run_quiet(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .stdout(Stdio::null())
        .status()
        .with_context(|| format!("{cmd:?}"))?;
    anyhow::ensure!(status.success(), "{cmd:?}: {status}");
    Ok(())
}

fn measure(backend: Backend, name: &'static str, sql: &str) -> anyhow::Result<Figures> {
    let rt = tokio::runtime::Runtime::new()?;
    let db = rt.block_on(TestDb::new(backend, TableVersion::V1, sql));
    let args = Check::parse_from(["check", "--db", &db.url]).rules;
    let listeners = args.listeners()?;
    let read = median_ms(|| {
        let set = rt.block_on(args.read())?;
        anyhow::ensure!(
            set.rules.len() == ROWS && set.errors.is_empty(),
            "{name}: {} rules, {} errors",
            set.rules.len(),
            set.errors.len()
        );
        Ok(())
    })?;
    let source = rt.block_on(Source::open(&db.url, false))?;
    // Where the database has a fast read: the rows parsed and dropped, as validation drops them.
    let fast = match rt.block_on(source.read_fast(|_| Ok::<_, SourceError>(())))? {
        Some(_) => Some(median_ms(|| {
            let mut rows = 0;
            let done = rt.block_on(source.read_fast(|row: Row| {
                rows += usize::from(row.get("id").is_some());
                Ok::<_, SourceError>(())
            }))?;
            anyhow::ensure!(done.is_some(), "{name}: the fast read declined");
            anyhow::ensure!(rows == ROWS, "{name}: {rows} rows");
            Ok(())
        })?),
        None => None,
    };
    let row_by_row = median_ms(|| {
        let mut rules = Vec::with_capacity(ROWS);
        rt.block_on(source.read_each(|row| {
            if let Ok(rule) = validate_row(&row, &listeners) {
                rules.push(rule);
            }
            Ok::<_, SourceError>(())
        }))?;
        anyhow::ensure!(rules.len() == ROWS, "{name}: {} rules", rules.len());
        Ok(())
    })?;
    let tcpmgm = binary("tcpmgm");
    let check = median_ms(|| run_quiet(Command::new(&tcpmgm).args(["check", "--db", &db.url])))?;
    let client = median_ms(|| run_quiet(&mut client(backend, &db.url)?))?;
    eprintln!(
        "table read, {name}: read {read:.0} ms (fast read alone {fast:?} ms, row by row \
         {row_by_row:.0} ms), tcpmgm check {check:.0} ms, client {client:.0} ms"
    );
    Ok(Figures {
        backend: name,
        read,
        fast,
        row_by_row,
        check,
        client,
    })
}

pub fn run(out: &Path) -> anyhow::Result<()> {
    let sql = table_sql(ROWS, 60);
    let mut figures = Vec::new();
    let mut left_out = Vec::new();
    for (backend, name, var) in [
        (Backend::Sqlite, "SQLite", None),
        (
            Backend::Postgres,
            "PostgreSQL",
            Some("TCPMGM_TEST_POSTGRES"),
        ),
        (Backend::MariaDb, "MariaDB", Some("TCPMGM_TEST_MYSQL")),
    ] {
        match var {
            Some(var) if std::env::var_os(var).is_none() => {
                left_out.push(format!("{name} ({var} is not set)"))
            }
            _ => figures.push(measure(backend, name, &sql)?),
        }
    }
    let section = report(&figures, &left_out)?;
    TABLE_READ.write(out, &section)
}

fn report(figures: &[Figures], left_out: &[String]) -> anyhow::Result<String> {
    let mut s = String::new();
    writeln!(s, "{}\n## Table read\n", TABLE_READ.begin)?;
    writeln!(
        s,
        "`cargo xtask bench -- --table-read` on {} ({}): a nested table of {ROWS} rows \
         (60% on prefixes from /11 to /32 inside one /10), read and validated into rules as \
         `check`, `run` and a reload do. Median of {SAMPLES} after a warm-up, in ms. *read* is \
         the whole step; *fast read alone* is the query and the JSON parsed into rows, not \
         validated (SQLite only: PostgreSQL and MariaDB build JSON more slowly than they send \
         rows, so their tables are read row by row); *row by row* is the read the fast one falls back to (and the read before \
         it), validation included; *client* is the database's own client printing every row \
         (`sqlite3`, `psql -A`, `mariadb --quick`), the floor the issue set.\n",
        crate::machine(),
        crate::chrono_free_date()
    )?;
    writeln!(
        s,
        "| database | read | fast read alone | validation | row by row | `tcpmgm check` process | client | read ≤ 150 ms |"
    )?;
    writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---|")?;
    for f in figures {
        let (fast, validation) = match f.fast {
            Some(fast) => (
                format!("{fast:.0}"),
                format!("{:.0}", (f.read - fast).max(0.0)),
            ),
            None => ("(none)".to_owned(), String::new()),
        };
        writeln!(
            s,
            "| {} | {:.0} | {fast} | {validation} | {:.0} | {:.0} | {:.0} | {} |",
            f.backend,
            f.read,
            f.row_by_row,
            f.check,
            f.client,
            if f.read <= 150.0 { "met" } else { "NOT met" }
        )?;
    }
    if !left_out.is_empty() {
        writeln!(s, "\nNot measured: {}.", left_out.join(", "))?;
    }
    writeln!(s, "{}", TABLE_READ.end)?;
    Ok(s)
}
