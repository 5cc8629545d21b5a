//! The daemon keeps answering while a reload is held up: another session locks the PostgreSQL
//! table, so the daemon's read of it waits. Meanwhile `tcpmgm status`, the programs' log events
//! and SIGTERM are all served, and the reload requests that arrive are folded into one more
//! reload once the table is free.
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use sqlx::{Connection, Executor, PgConnection};
use tcpmgm::policy::source::TableVersion;
use tcpmgm_tests::{Backend, Daemon, Sandbox, TestDb, binary, control_socket as control};

const RULES: &str = "INSERT INTO tcp_mgm (id, remote_addr, keepidle) VALUES (1, '127.0.0.0/8', 91);
INSERT INTO tcp_mgm (id, remote_addr, no_new_conn) VALUES (2, '127.0.0.3', 1);";

/// A limit for waiting on what must happen; never reached when the daemon works.
const SOON: Duration = Duration::from_secs(60);

/// A session that holds an exclusive lock on tcp_mgm until it is dropped.
async fn lock_table(url: &str) -> PgConnection {
    let mut conn = PgConnection::connect(url).await.expect("connect");
    conn.execute("BEGIN; LOCK TABLE tcp_mgm IN ACCESS EXCLUSIVE MODE;")
        .await
        .expect("lock");
    conn
}

/// Waits until `what` holds of the daemon's status.
fn wait_status(
    d: &Daemon,
    sb: &Sandbox,
    what: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let start = std::time::Instant::now();
    loop {
        let s = d.status(sb);
        if what(&s) || start.elapsed() > SOON {
            return s;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn a_reload_held_by_a_postgres_lock_leaves_status_and_logs_answering_and_requests_fold_into_one_more()
 {
    let db = TestDb::new(Backend::Postgres, TableVersion::V1, RULES).await;
    let sb = Sandbox::new();
    let d = Daemon::start_with(&sb, &db.url, control(&sb), &["--db-timeout", "300"]);
    let lock = lock_table(&db.url).await;

    // The first request waits on the table; `tcpmgm reload` waits with it.
    let first = {
        let control = d.control.clone();
        std::thread::spawn(move || {
            Command::new(binary("tcpmgm"))
                .arg("reload")
                .arg("--control")
                .arg(control)
                .output()
                .unwrap()
        })
    };
    let held = wait_status(&d, &sb, |s| !s["state"]["reloading_since"].is_null());
    assert!(!held["state"]["reloading_since"].is_null(), "{held:#}");
    assert_eq!(held["daemon_running"], true, "{held:#}");
    assert_eq!(held["state"]["generation"], 1, "{held:#}");

    // Log forwarding: a refused connect is logged while the reload waits.
    let mut probe = sb.probe();
    assert_eq!(
        probe.ask("pair 127.0.0.3:7001 127.0.0.3:7001").get("errno"),
        1
    );
    let start = std::time::Instant::now();
    while d.logged("refused by rule 2") == 0 && start.elapsed() < SOON {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        d.logged("refused by rule 2"),
        1,
        "the refusal was not logged during the reload"
    );

    // Three more requests meanwhile: one more reload will answer them all.
    for _ in 0..3 {
        d.signal(Signal::SIGHUP);
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !first.is_finished(),
        "the reload did not wait for the table"
    );
    drop(lock);

    let out = first.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("generation 2"),
        "{text}"
    );
    let after = wait_status(&d, &sb, |s| s["state"]["generation"] == 3);
    assert_eq!(after["state"]["generation"], 3, "{after:#}");
    // And no more than that one: the three requests were folded.
    std::thread::sleep(Duration::from_secs(1));
    let settled = d.status(&sb);
    assert_eq!(settled["state"]["generation"], 3, "{settled:#}");
    assert!(settled["state"]["reloading_since"].is_null(), "{settled:#}");
}

#[tokio::test]
async fn sigterm_is_answered_while_a_reload_waits_on_a_postgres_lock() {
    let db = TestDb::new(Backend::Postgres, TableVersion::V1, RULES).await;
    let sb = Sandbox::new();
    let mut d = Daemon::start_with(&sb, &db.url, control(&sb), &["--db-timeout", "300"]);
    let _lock = lock_table(&db.url).await;
    d.signal(Signal::SIGHUP);
    let held = wait_status(&d, &sb, |s| !s["state"]["reloading_since"].is_null());
    assert!(!held["state"]["reloading_since"].is_null(), "{held:#}");

    d.signal(Signal::SIGTERM);
    // The table stays locked far longer than this wait: the daemon exits without its reload.
    let exited = d.wait_exit(SOON);
    assert!(exited.is_some_and(|st| st.success()), "{exited:?}");
    assert_eq!(d.logged("SIGTERM"), 1);
    // The policy stays in force.
    let mut probe = sb.probe();
    let r = probe.ask("pair 127.0.0.1:7001 127.0.0.1:7001");
    assert_eq!(r.get("client_idle"), 91, "{r:?}");
}
