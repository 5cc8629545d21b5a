//! `tcpmgm run` follows the table by itself: SQLite and MariaDB are polled, and a lost
//! PostgreSQL connection is retried while the last good policy stays in force. (The latency of
//! PostgreSQL's notifications is measured on its own in push_latency.rs.)
use std::time::Duration;

use tcpmgm::source::TableVersion;
use tcpmgm_tests::{
    Backend, Daemon, Sandbox, TestDb, control_socket as control, next_idle as idle,
    wait_for_idle as wait_for,
};

const RULE: &str = "INSERT INTO tcp_mgm (id, remote_addr, keepidle) VALUES (1, '127.0.0.0/8', 91);";

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
    let took = wait_for(&mut probe, &mut port, 93, Duration::from_secs(10));
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
        let took = wait_for(&mut probe, &mut port, want, Duration::from_secs(3));
        assert!(
            took.is_some(),
            "{backend:?}: keepidle {want} not enforced within 3 s"
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
