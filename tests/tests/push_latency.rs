//! A committed PostgreSQL change reaches two daemons on two cgroups within a second, without any
//! command. On its own in this file: cargo runs test files one after another, so no other test
//! competes for the two cores while this one measures time.
use std::time::{Duration, Instant};

use tcpmgm::source::TableVersion;
use tcpmgm_tests::{
    Backend, Daemon, Sandbox, TestDb, control_socket as control, next_idle as idle,
    wait_for_idle as wait_for,
};

const RULE: &str = "INSERT INTO tcp_mgm (id, remote_addr, keepidle) VALUES (1, '127.0.0.0/8', 91);";

#[tokio::test]
async fn a_postgres_commit_reaches_two_daemons_within_a_second() {
    let db = TestDb::new(Backend::Postgres, TableVersion::V1, RULE).await;
    let (sb1, sb2) = (Sandbox::new(), Sandbox::new());
    let _d1 = Daemon::start(&sb1, &db.url, control(&sb1));
    let d2 = Daemon::start(&sb2, &db.url, control(&sb2));
    assert!(
        d2.startup_log.contains("PostgreSQL notifies"),
        "{}",
        d2.startup_log
    );
    let (mut p1, mut p2) = (sb1.probe(), sb2.probe());
    let mut port = 7000;
    assert_eq!(
        (idle(&mut p1, &mut port), idle(&mut p2, &mut port)),
        (91, 91)
    );

    db.sql("UPDATE tcp_mgm SET keepidle = 92 WHERE id = 1;")
        .await;
    let committed = Instant::now();
    let first = wait_for(&mut p1, &mut port, 92, Duration::from_secs(1));
    let second = wait_for(
        &mut p2,
        &mut port,
        92,
        Duration::from_secs(1).saturating_sub(committed.elapsed()),
    );
    assert!(
        first.is_some() && second.is_some(),
        "not enforced on both within 1 s: {first:?} {second:?}"
    );
    eprintln!(
        "enforced on both {:?} after the commit",
        committed.elapsed()
    );
}
