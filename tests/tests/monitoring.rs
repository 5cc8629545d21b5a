//! The monitoring that drops in (`contrib/prometheus`, `contrib/grafana`): the alert rules pass
//! `promtool check rules` and their unit tests `promtool test rules`; every query of the
//! dashboard passes promtool's parser; every tcpmgm metric they name is one a real daemon's
//! endpoint serves; and `tcpmgm_policy_attached`, which the main alert reads, says what the
//! kernel holds when the governed cgroup goes and comes back; and with a large table, a scrape
//! holds the series of the rules that acted only.
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tcpmgm::policy::source::TableVersion;
use tcpmgm_tests::{Backend, Daemon, Sandbox, Scratch, TestDb, control_socket, sample, scrape};

const RULES: &str = include_str!("../../contrib/prometheus/tcpmgm.rules.yml");
const RULE_TESTS: &str = include_str!("../../contrib/prometheus/tcpmgm.rules.test.yml");
const DASHBOARD: &str = include_str!("../../contrib/grafana/tcpmgm.json");

fn promtool(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool (Debian's prometheus package; cargo xtask test installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}: {text}");
    text
}

/// Every query of the dashboard, as Grafana sends it with its variables set.
fn dashboard_queries() -> Vec<String> {
    let dashboard: serde_json::Value = serde_json::from_str(DASHBOARD).expect("the dashboard");
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("a query");
            queries.push(
                expr.replace("$__rate_interval", "5m")
                    .replace("$cgroup", ".*"),
            );
        }
    }
    queries
}

/// The tcpmgm metric names in `text`.
fn names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("tcpmgm_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        out.insert(name);
    }
    out
}

#[test]
fn the_alert_rules_and_the_dashboard_pass_promtool() {
    let dir = Scratch::new("monitoring");
    dir.write("tcpmgm.rules.yml", RULES);
    dir.write("tcpmgm.rules.test.yml", RULE_TESTS);
    let checked = promtool(&dir.0, &["check", "rules", "tcpmgm.rules.yml"]);
    assert!(checked.contains("SUCCESS: 8 rules found"), "{checked}");
    let tested = promtool(&dir.0, &["test", "rules", "tcpmgm.rules.test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");

    let queries = dashboard_queries();
    assert!(queries.len() >= 14, "{queries:?}");
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, q) in queries.iter().enumerate() {
        rules.push_str(&format!(
            "      - record: dashboard:query{i}\n        expr: {}\n",
            serde_json::to_string(q).unwrap()
        ));
    }
    dir.write("dashboard.rules.yml", &rules);
    let checked = promtool(&dir.0, &["check", "rules", "dashboard.rules.yml"]);
    assert!(
        checked.contains(&format!("SUCCESS: {} rules found", queries.len())),
        "{checked}"
    );
}

#[tokio::test]
async fn what_the_rules_read_is_served_and_policy_attached_follows_the_cgroup() {
    let db = TestDb::new(
        Backend::Sqlite,
        TableVersion::V1,
        "INSERT INTO tcp_mgm (id, remote_addr, keepidle) VALUES (7, '127.0.0.0/8', 41);",
    )
    .await;
    let sb = Sandbox::new();
    let d = Daemon::start_with(
        &sb,
        &db.url,
        control_socket(&sb),
        &["--metrics", "127.0.0.1:0", "--metrics-rules", "all"],
    );
    let addr = d.metrics_addr();
    let text = scrape(addr);
    // Each family by its name, a histogram also by the series it is read through.
    let served: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .flat_map(|(name, kind)| {
            let suffixes: &[&str] = if kind == "histogram" {
                &["", "_bucket", "_sum", "_count"]
            } else {
                &[""]
            };
            suffixes.iter().map(move |s| format!("{name}{s}"))
        })
        .collect();
    let named: BTreeSet<String> = names(RULES).union(&names(DASHBOARD)).cloned().collect();
    let missing: Vec<&String> = named.difference(&served).collect();
    assert!(
        missing.is_empty(),
        "the rules or the dashboard read {missing:?}, which the endpoint does not serve:\n{text}"
    );

    let cgroup = sb.cgroup.display().to_string();
    let attached = |text: &str| {
        sample(
            text,
            &format!("tcpmgm_policy_attached{{cgroup=\"{cgroup}\"}}"),
        )
    };
    assert_eq!(attached(&text), Some(1.0), "{text}");
    // The slice stops: its cgroup goes, and the links hold a cgroup that is gone.
    std::fs::remove_dir(&sb.cgroup).unwrap();
    assert_eq!(attached(&scrape(addr)), Some(0.0));
    // It starts again: the daemon governs the new cgroup, and the gauge says so.
    std::fs::create_dir(&sb.cgroup).unwrap();
    let start = Instant::now();
    while attached(&scrape(addr)) != Some(1.0) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the cgroup made again was not governed within 30 s: {:?}",
            d.log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A large table: by default a scrape shows the rules that counted something, not every rule
/// in force (at a million rules that would be millions of series per scrape).
#[tokio::test]
async fn a_large_table_scrapes_only_the_rules_that_acted() {
    const RULES_IN_TABLE: u32 = 50_000;
    let db = TestDb::new(
        Backend::Sqlite,
        TableVersion::V1,
        &format!(
            "INSERT INTO tcp_mgm (id, remote_addr, keepidle) VALUES (7, '127.0.0.2', 41);
             INSERT INTO tcp_mgm (id, remote_addr, keepidle)
               WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {RULES_IN_TABLE})
               SELECT i + 100, '10.' || (i / 65536) || '.' || ((i / 256) % 256) || '.' || (i % 256), 60
               FROM n;"
        ),
    )
    .await;
    let sb = Sandbox::new();
    // The table read is not what this test measures: a debug build in a guest under QEMU's
    // emulation has taken more than the default 30 s to read these 50,001 rows.
    let d = Daemon::start_with(
        &sb,
        &db.url,
        control_socket(&sb),
        &["--metrics", "127.0.0.1:0", "--db-timeout", "900"],
    );
    let mut probe = sb.probe();
    let r = probe.ask("pair 127.0.0.2:7060 127.0.0.2:7060");
    assert_eq!(r.keepalive("client").1, 41, "{r:?}");
    let text = scrape(d.metrics_addr());
    let rules = sample(
        &text,
        &format!("tcpmgm_rules{{cgroup=\"{}\"}}", sb.cgroup.display()),
    );
    assert_eq!(rules, Some(f64::from(RULES_IN_TABLE + 1)), "{text}");
    let ids: BTreeSet<&str> = text
        .lines()
        .filter(|l| l.starts_with("tcpmgm_rule_"))
        .filter_map(|l| l.split("rule_id=\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(ids, BTreeSet::from(["7"]), "{text}");
    eprintln!(
        "a scrape of {} rules in force, one of which acted: {} bytes",
        RULES_IN_TABLE + 1,
        text.len()
    );
    assert!(text.len() < 64 * 1024, "{} bytes:\n{text}", text.len());
}
