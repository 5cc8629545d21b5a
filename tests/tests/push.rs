//! `tcpmgm run` follows the table by itself: a PostgreSQL commit reaches every daemon that
//! follows the table, SQLite and MariaDB are polled, and a lost PostgreSQL connection is retried
//! while the last good policy stays in force.
//!
//! These tests show that a change arrives, not how fast: each waits up to `ARRIVES`, far beyond
//! any reload on a slow machine. `cargo xtask bench` measures the push latency.
use std::time::Duration;

use tcpmgm::source::TableVersion;
use tcpmgm_tests::{
    Backend, Daemon, Sandbox, TestDb, control_socket as control, next_idle as idle,
    wait_for_idle as wait_for,
};

const RULE: &str = "INSERT INTO tcp_mgm (id, remote_addr, keepidle) VALUES (1, '127.0.0.0/8', 91);";

/// How long a change may take to be enforced before the test calls it lost.
const ARRIVES: Duration = Duration::from_secs(60);

#[tokio::test]
async fn a_postgres_commit_reaches_every_daemon_following_the_table() {
    let db = TestDb::new(Backend::Postgres, TableVersion::V1, RULE).await;
    let (sb1, sb2) = (Sandbox::new(), Sandbox::new());
    let d1 = Daemon::start(&sb1, &db.url, control(&sb1));
    let d2 = Daemon::start(&sb2, &db.url, control(&sb2));
    for d in [&d1, &d2] {
        assert!(
            d.startup_log.contains("PostgreSQL notifies"),
            "{}",
            d.startup_log
        );
    }
    let (mut p1, mut p2) = (sb1.probe(), sb2.probe());
    let mut port = 7000;
    assert_eq!(
        (idle(&mut p1, &mut port), idle(&mut p2, &mut port)),
        (91, 91)
    );
    db.sql("UPDATE tcp_mgm SET keepidle = 92 WHERE id = 1;")
        .await;
    let first = wait_for(&mut p1, &mut port, 92, ARRIVES);
    let second = wait_for(&mut p2, &mut port, 92, ARRIVES);
    assert!(
        first.is_some() && second.is_some(),
        "the commit did not reach both daemons within {ARRIVES:?}: {first:?} {second:?}"
    );
    for d in [&d1, &d2] {
        let log = d.log.lock().unwrap().join("\n");
        assert!(log.contains("the rule table changed: reloading"), "{log}");
    }
}

#[tokio::test]
async fn a_lost_postgres_connection_is_retried_while_the_policy_stays() {
    let db = TestDb::new(Backend::Postgres, TableVersion::V1, RULE).await;
    let sb = Sandbox::new();
    let _d = Daemon::start(&sb, &db.url, control(&sb));
    let mut probe = sb.probe();
    let mut port = 7000;
    assert_eq!(idle(&mut probe, &mut port), 91);
    // Cut every connection the daemon has to its database, then change the table.
    let name = db.url.rsplit('/').next().unwrap().to_owned();
    db.sql(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}' AND pid <> pg_backend_pid();"
    ))
    .await;
    assert_eq!(
        idle(&mut probe, &mut port),
        91,
        "the policy must stay while the database is away"
    );
    db.sql("UPDATE tcp_mgm SET keepidle = 93 WHERE id = 1;")
        .await;
    let took = wait_for(&mut probe, &mut port, 93, ARRIVES);
    assert!(
        took.is_some(),
        "the change was not picked up after the connection came back"
    );
}

async fn polled(backend: Backend) {
    let db = TestDb::new(backend, TableVersion::V1, RULE).await;
    let sb = Sandbox::new();
    let d = Daemon::start_with(&sb, &db.url, control(&sb), &["--poll-interval", "0.2"]);
    assert!(
        d.startup_log.contains("polls it every"),
        "{}",
        d.startup_log
    );
    let mut probe = sb.probe();
    let mut port = 7000;
    assert_eq!(idle(&mut probe, &mut port), 91);
    for want in [94, 95] {
        db.sql(&format!(
            "UPDATE tcp_mgm SET keepidle = {want} WHERE id = 1;"
        ))
        .await;
        let took = wait_for(&mut probe, &mut port, want, ARRIVES);
        assert!(
            took.is_some(),
            "{backend:?}: keepidle {want} not enforced within {ARRIVES:?}"
        );
    }
}

#[tokio::test]
async fn sqlite_changes_are_polled() {
    polled(Backend::Sqlite).await;
}

#[tokio::test]
async fn mariadb_changes_are_polled() {
    polled(Backend::MariaDb).await;
}
