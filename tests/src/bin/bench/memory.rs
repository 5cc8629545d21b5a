//! `cargo xtask bench -- --memory`: what a running daemon holds once its policy is attached, in
//! its own memory (VmRSS) and in the kernel (the BPF maps it holds), for tables of 0, 100k and
//! 1M rules, flat and nested, and what a Prometheus scrape of it costs (time and size, with the
//! default `--metrics-rules nonzero`). Writes its own section of BENCHMARKS.md.
use std::fmt::Write as _;
use std::path::Path;

use tcpmgm::policy::source::TableVersion;
use tcpmgm_tests::{Backend, Daemon, Sandbox, TestDb, control_socket};

use crate::section::MEMORY;

/// The kernel memory a rule may take, and the daemon's memory against its maps'.
const PER_RULE_TARGET: f64 = 256.0;

struct Figures {
    table: &'static str,
    rules: usize,
    rss: u64,
    maps: u64,
    fds: usize,
    /// The median of `SCRAPES` scrapes, and the body's size.
    scrape: std::time::Duration,
    scrape_bytes: usize,
}

/// Scrapes per table, of which the median is reported.
const SCRAPES: usize = 5;

fn measure(table: &'static str, rules: usize, nested: u64) -> anyhow::Result<Figures> {
    let rt = tokio::runtime::Runtime::new()?;
    let db = rt.block_on(TestDb::new(
        Backend::Sqlite,
        TableVersion::V1,
        &crate::table_read::table_sql(rules, nested),
    ));
    let sb = Sandbox::new();
    let daemon = Daemon::start_with(
        &sb,
        &db.url,
        control_socket(&sb),
        &["--metrics", "127.0.0.1:0"],
    );
    let (rss, fds, maps) = crate::soak::read_settled(daemon.pid())?;
    let mut scrapes = Vec::new();
    let mut scrape_bytes = 0;
    for _ in 0..SCRAPES {
        let t = std::time::Instant::now();
        scrape_bytes = tcpmgm_tests::scrape(daemon.metrics_addr()).len();
        scrapes.push(t.elapsed());
    }
    scrapes.sort();
    let scrape = scrapes[SCRAPES / 2];
    daemon.kill();
    tcpmgm::kernel::detach_pinned(&sb.pin_dir)?;
    eprintln!(
        "memory, {table} {rules}: daemon RSS {:.1} MiB, BPF maps {:.1} MiB, {fds} fds; a scrape {:.1} ms, {scrape_bytes} bytes",
        mib(rss),
        mib(maps),
        scrape.as_secs_f64() * 1000.0
    );
    Ok(Figures {
        table,
        rules,
        rss,
        maps,
        fds,
        scrape,
        scrape_bytes,
    })
}

fn mib(b: u64) -> f64 {
    b as f64 / f64::from(1 << 20)
}

pub fn run(out: &Path) -> anyhow::Result<()> {
    let mut figures = vec![measure("(none)", 0, 0)?];
    for rules in [100_000, 1_000_000] {
        figures.push(measure("flat", rules, 0)?);
        figures.push(measure("nested", rules, 60)?);
    }
    MEMORY.write(out, &report(&figures)?)
}

fn report(figures: &[Figures]) -> anyhow::Result<String> {
    let base = &figures[0];
    let mut s = String::new();
    writeln!(s, "{}\n## Memory\n", MEMORY.begin)?;
    writeln!(
        s,
        "`cargo xtask bench -- --memory` on {} ({}): one `tcpmgm run` on a SQLite table, measured \
         once its policy is attached and its figures settle. *daemon* is its VmRSS; *BPF maps* \
         is the `memlock:` of every map fd it holds (the policy maps, the rule statistics, the \
         socket storage, the logs), which is the maps' kernel memory on Linux 6.4 and later. \
         *per rule* is the growth of the maps over the table with no rules, divided by the \
         rules. *flat* is distinct /32 peers; *nested* puts 60% of the rules on prefixes from \
         /11 to /32 inside one /10. Every rule of these tables has a profile of its own \
         (keepidle, keepinterval, keepcount and connect_timeout drawn at random), the worst case \
         for the profiles rules share: the cold-start tables above, with 1,000 distinct \
         profiles, show the usual case in their *per rule* column. *scrape* is the median of \
         {SCRAPES} `GET /metrics` of that daemon (no rule has acted, so the default \
         `--metrics-rules nonzero` shows no rule's series: what a scrape costs is the rule \
         statistics walked, not the table), and its size.\n",
        crate::machine(),
        crate::chrono_free_date()
    )?;
    writeln!(
        s,
        "| table | rules | daemon | BPF maps | per rule | daemon ≤ maps | per rule ≤ {PER_RULE_TARGET:.0} B | fds | scrape | scrape size |"
    )?;
    writeln!(s, "|---|---:|---:|---:|---:|---|---|---:|---:|---:|")?;
    for f in figures {
        let per_rule =
            (f.rules > 0).then(|| f.maps.saturating_sub(base.maps) as f64 / f.rules as f64);
        let yes = |met: bool| if met { "met" } else { "NOT met" };
        writeln!(
            s,
            "| {} | {} | {:.1} MiB | {:.1} MiB | {} | {} | {} | {} | {:.1} ms | {} B |",
            f.table,
            f.rules,
            mib(f.rss),
            mib(f.maps),
            per_rule.map_or(String::new(), |b| format!("{b:.0} B")),
            if f.rules > 0 {
                yes(f.rss <= f.maps)
            } else {
                ""
            },
            per_rule.map_or("", |b| yes(b <= PER_RULE_TARGET)),
            f.fds,
            f.scrape.as_secs_f64() * 1000.0,
            f.scrape_bytes
        )?;
    }
    writeln!(s, "{}", MEMORY.end)?;
    Ok(s)
}
