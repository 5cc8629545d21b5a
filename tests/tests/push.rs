//! `tcpmgm run` follows the table by itself: a PostgreSQL commit reaches every daemon that
//! follows the table, SQLite and MariaDB are polled, and a lost PostgreSQL connection is retried
//! while the last good policy stays in force.
//!
//! These tests show that a change arrives, not how fast: each waits up to `ARRIVES`, far beyond
//! any reload on a slow machine. `cargo xtask bench` measures the push latency.
use std::time::Duration;

use tcpmgm::policy::source::TableVersion;
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

/// A table made by OpenSIPS's own scripts has no change trigger. Read through a role that may
/// only read it, the daemon says it will not be notified and polls instead: a change arrives.
#[tokio::test]
async fn a_postgres_table_without_the_trigger_is_polled_when_the_role_cannot_add_it() {
    let db = TestDb::new(Backend::Postgres, TableVersion::V1, RULE).await;
    db.sql(
        "DROP TRIGGER tcpmgm_notify ON tcp_mgm;
         GRANT SELECT ON tcp_mgm, version TO tcpmgm_reader;",
    )
    .await;
    let reader = db
        .url
        .replacen("tcpmgm:tcpmgm@", "tcpmgm_reader:tcpmgm@", 1);
    let sb = Sandbox::new();
    let d = Daemon::start_with(&sb, &reader, control(&sb), &["--poll-interval", "0.5"]);
    assert!(
        d.startup_log.contains("PostgreSQL will not notify")
            && d.startup_log.contains("this role cannot create it")
            && d.startup_log.contains("polling it every 500ms"),
        "{}",
        d.startup_log
    );
    let mut probe = sb.probe();
    let mut port = 7000;
    assert_eq!(idle(&mut probe, &mut port), 91);
    db.sql("UPDATE tcp_mgm SET keepidle = 96 WHERE id = 1;")
        .await;
    assert!(
        wait_for(&mut probe, &mut port, 96, ARRIVES).is_some(),
        "the change was not polled within {ARRIVES:?}"
    );
}

/// The same table read by its owner: the daemon installs the trigger and is notified.
#[tokio::test]
async fn a_postgres_table_without_the_trigger_gets_it_when_the_role_may() {
    let db = TestDb::new(Backend::Postgres, TableVersion::V1, RULE).await;
    db.sql("DROP TRIGGER tcpmgm_notify ON tcp_mgm;").await;
    let sb = Sandbox::new();
    let d = Daemon::start(&sb, &db.url, control(&sb));
    assert!(
        d.startup_log.contains("installed the change trigger")
            && d.startup_log.contains("PostgreSQL notifies"),
        "{}",
        d.startup_log
    );
    let mut probe = sb.probe();
    let mut port = 7000;
    assert_eq!(idle(&mut probe, &mut port), 91);
    db.sql("UPDATE tcp_mgm SET keepidle = 97 WHERE id = 1;")
        .await;
    assert!(
        wait_for(&mut probe, &mut port, 97, ARRIVES).is_some(),
        "the change was not notified within {ARRIVES:?}"
    );
    assert!(d.logged("the rule table changed: reloading") >= 1);
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

/// A SQLite file at the polled path, made aside with `keepidle` for rule 1.
async fn sqlite_file(path: &std::path::Path, keepidle: i64) {
    let url = format!("sqlite://{}", path.display());
    let source = tcpmgm::policy::source::Source::open(&url, true)
        .await
        .unwrap();
    source.init(TableVersion::V1).await.unwrap();
    source
        .execute_script(&format!(
            "INSERT INTO tcp_mgm (id, remote_addr, keepidle) VALUES (1, '127.0.0.0/8', {keepidle});"
        ))
        .await
        .unwrap();
}

/// Waits up to `ARRIVES` for `status --json`'s source health to satisfy `ok`: the last health.
fn wait_for_health(
    d: &Daemon,
    sb: &Sandbox,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let start = std::time::Instant::now();
    loop {
        let health = d.status(sb)["state"]["source_health"].take();
        if ok(&health) || start.elapsed() > ARRIVES {
            return health;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Editors and `mv` replace a file with a new one (a new inode); a restore after a delete does
/// too. The polled path is followed: the new file's rules are enforced, and meanwhile `status`
/// says the file was gone, since when, and then when it was read again.
#[tokio::test]
async fn a_polled_sqlite_file_replaced_or_deleted_and_restored_is_followed() {
    let db = TestDb::new(Backend::Sqlite, TableVersion::V1, RULE).await;
    let path = std::path::PathBuf::from(db.url.strip_prefix("sqlite://").unwrap());
    let sb = Sandbox::new();
    let d = Daemon::start_with(&sb, &db.url, control(&sb), &["--poll-interval", "0.2"]);
    let mut probe = sb.probe();
    let mut port = 7000;
    assert_eq!(idle(&mut probe, &mut port), 91);

    let aside = path.with_file_name("aside.db");
    sqlite_file(&aside, 92).await;
    std::fs::rename(&aside, &path).unwrap();
    assert!(
        wait_for(&mut probe, &mut port, 92, ARRIVES).is_some(),
        "a file moved over the polled one was not followed within {ARRIVES:?}"
    );

    sqlite_file(&aside, 93).await;
    let started = d.status(&sb)["state"]["started_at"].as_u64().unwrap();
    std::fs::remove_file(&path).unwrap();
    let health = wait_for_health(&d, &sb, |h| h["last_error"]["ongoing"] == true);
    let error = &health["last_error"];
    assert!(
        error["ongoing"] == true
            && error["message"].as_str().unwrap().contains("rules.db")
            && error["since"].as_u64().unwrap() >= started,
        "status while the file is gone: {health}"
    );
    let (_, text, _) = tcpmgm_tests::tcpmgm(&[
        "status",
        "--cgroup",
        sb.cgroup.to_str().unwrap(),
        "--pin-dir",
        sb.pin_dir.to_str().unwrap(),
        "--control",
        d.control.to_str().unwrap(),
    ]);
    assert!(text.contains("  source: FAILING for "), "{text}");
    assert_eq!(
        idle(&mut probe, &mut port),
        92,
        "the policy stays while the file is gone"
    );

    let read_before = health["last_read"].as_u64().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    std::fs::rename(&aside, &path).unwrap();
    assert!(
        wait_for(&mut probe, &mut port, 93, ARRIVES).is_some(),
        "the restored file was not followed within {ARRIVES:?}"
    );
    let health = wait_for_health(&d, &sb, |h| h["last_error"]["ongoing"] == false);
    assert!(
        health["last_error"]["ongoing"] == false
            && health["last_read"].as_u64().unwrap() > read_before,
        "status once the file is back: {health}"
    );
}

/// A PostgreSQL database that goes away (dropped here; an outage looks the same to the
/// daemon): `status` says the source fails, and since when, while the policy stays.
#[tokio::test]
async fn status_says_when_postgres_cannot_be_reached() {
    let db = TestDb::new(Backend::Postgres, TableVersion::V1, RULE).await;
    let sb = Sandbox::new();
    let d = Daemon::start(&sb, &db.url, control(&sb));
    let health = d.status(&sb)["state"]["source_health"].take();
    assert!(
        health["last_read"].is_u64() && health["last_error"].is_null(),
        "{health}"
    );
    let name = db.url.rsplit('/').next().unwrap();
    // Not in a transaction, which DROP DATABASE refuses.
    let admin = std::env::var("TCPMGM_TEST_POSTGRES").unwrap();
    let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&admin)
        .await
        .unwrap();
    sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .execute(&mut conn)
        .await
        .unwrap();
    let health = wait_for_health(&d, &sb, |h| h["last_error"]["ongoing"] == true);
    assert!(
        health["last_error"]["ongoing"] == true
            && health["last_error"]["message"]
                .as_str()
                .unwrap()
                .contains(name),
        "status while the database is gone: {health}"
    );
    let mut probe = sb.probe();
    let mut port = 7000;
    assert_eq!(idle(&mut probe, &mut port), 91);
}
