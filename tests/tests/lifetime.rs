//! con_lifetime: idle connections of a rule are closed at both ends within con_lifetime + 1 s;
//! busy ones and those without a rule are never closed.
use std::time::{Duration, Instant};

use tcpmgm::policy::source::TableVersion;
use tcpmgm_tests::{Backend, Daemon, Sandbox, TestDb, control_socket};

/// A daemon on a sandbox of its own, with two rules: 127.0.0.2 and ::1, con_lifetime 2 s. Fields
/// drop in order: the daemon first.
struct Setup {
    _daemon: Daemon,
    sb: Sandbox,
    _db: TestDb,
}

impl Setup {
    async fn new() -> Setup {
        let db = TestDb::new(
            Backend::Sqlite,
            TableVersion::V1,
            "INSERT INTO tcp_mgm (id, remote_addr, con_lifetime) VALUES (1, '127.0.0.2', 2);
             INSERT INTO tcp_mgm (id, remote_addr, con_lifetime) VALUES (2, '::1', 2);",
        )
        .await;
        let sb = Sandbox::new();
        let daemon = Daemon::start_with(
            &sb,
            &db.url,
            control_socket(&sb),
            &["--netns", &sb.netns.path()],
        );
        Setup {
            _daemon: daemon,
            sb,
            _db: db,
        }
    }
}

#[tokio::test]
async fn idle_connections_close_after_their_con_lifetime() {
    let setup = Setup::new().await;
    let mut p = setup.sb.probe();
    let id = |r: tcpmgm_tests::Reply| r.get("id");
    let start = Instant::now();
    let idle = id(p.ask("hold-pair 127.0.0.2:7001 127.0.0.2:7001 127.0.0.1:0"));
    let busy = id(p.ask("hold-pair 127.0.0.2:7002 127.0.0.2:7002 127.0.0.1:0"));
    let unmatched = id(p.ask("hold-pair 127.0.0.3:7003 127.0.0.3:7003 127.0.0.1:0"));
    let mut closed_at = None;
    while start.elapsed() < Duration::from_millis(6200) {
        assert_eq!(
            p.ask(&format!("ping {busy}")).get("ok"),
            1,
            "the busy connection broke"
        );
        let r = p.ask(&format!("closed {idle}"));
        if closed_at.is_none() && r.get("client_closed") == 1 {
            assert_eq!(
                r.get("server_closed"),
                1,
                "the peer did not see the close: {r:?}"
            );
            closed_at = Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let closed_at = closed_at.expect("the idle connection was not closed within 6 s");
    eprintln!("the idle connection was closed {closed_at:?} after it was opened");
    // The sweep runs every 500 ms for a 2 s lifetime; a second more for a slow (TCG) guest.
    assert!(
        closed_at >= Duration::from_secs(2) && closed_at <= Duration::from_secs(4),
        "closed after {closed_at:?}, expected between 2 and 4 s"
    );
    for conn in [busy, unmatched] {
        let r = p.ask(&format!("closed {conn}"));
        assert_eq!(
            (r.get("client_closed"), r.get("server_closed")),
            (0, 0),
            "connection {conn}: {r:?}"
        );
    }
}

/// The programs govern every cgroup below the one tcpmgm is attached to (a SIP server's unit in a
/// slice); con_lifetime and `tcpmgm conns` reach the same sockets.
#[tokio::test]
async fn a_child_cgroup_is_listed_and_swept() {
    let setup = Setup::new().await;
    let sb = &setup.sb;
    let mut p = sb.probe_in_child("sip-server");
    let start = Instant::now();
    let idle = p
        .ask("hold-pair 127.0.0.2:7011 127.0.0.2:7011 127.0.0.1:0")
        .get("id");
    let list = sb.conns();
    let listed = list
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["remote"] == "127.0.0.2:7011")
        .unwrap_or_else(|| panic!("the child cgroup's connection is not listed: {list:#}"));
    assert_eq!(listed["profile"]["rule_id"], 1, "{listed:#}");
    loop {
        let r = p.ask(&format!("closed {idle}"));
        if r.get("client_closed") == 1 {
            eprintln!("closed {:?} after it was opened", start.elapsed());
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the child cgroup's idle connection was not closed within 5 s: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The same over IPv6: `conns` lists the connection with its rule (sock_diag's IPv6 answers),
/// and the sweep closes it at both ends.
#[tokio::test]
async fn idle_ipv6_connections_are_listed_and_closed() {
    let setup = Setup::new().await;
    let sb = &setup.sb;
    let mut p = sb.probe();
    let start = Instant::now();
    let idle = p.ask("hold-pair [::1]:7021 [::1]:7021 [::1]:0").get("id");
    let list = sb.conns();
    let listed: Vec<&serde_json::Value> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| {
            c["established"] == true && (c["remote"] == "[::1]:7021" || c["local"] == "[::1]:7021")
        })
        .collect();
    assert_eq!(listed.len(), 2, "both ends of the pair: {list:#}");
    for c in listed {
        assert_eq!(c["profile"]["rule_id"], 2, "{c:#}");
    }
    loop {
        let r = p.ask(&format!("closed {idle}"));
        if r.get("client_closed") == 1 && r.get("server_closed") == 1 {
            eprintln!("closed {:?} after it was opened", start.elapsed());
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(6),
            "the idle IPv6 connection was not closed within 6 s: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        start.elapsed() >= Duration::from_secs(2),
        "closed before its con_lifetime"
    );
}

#[test]
fn the_opensips_default_is_not_enforced_unless_asked() {
    use tcpmgm::policy::compile::Enforcement;
    let opensips = Enforcement::default();
    let every = Enforcement {
        default_lifetime: true,
        ..Enforcement::default()
    };
    assert!(
        !opensips.con_lifetime(120),
        "a table written for OpenSIPS would close every idle connection"
    );
    assert!(every.con_lifetime(120));
    assert!(opensips.con_lifetime(30));
    assert!(!every.con_lifetime(0));
}

/// Audit mode closes nothing: the idle connection outlives its con_lifetime, and the rule counts
/// it as one it would have closed.
#[tokio::test]
async fn audit_mode_closes_nothing_and_counts_what_it_would_close() {
    let db = TestDb::new(
        Backend::Sqlite,
        TableVersion::V1,
        "INSERT INTO tcp_mgm (id, remote_addr, con_lifetime) VALUES (1, '127.0.0.2', 2);",
    )
    .await;
    let sb = Sandbox::new();
    let _daemon = Daemon::start_with(
        &sb,
        &db.url,
        control_socket(&sb),
        &["--netns", &sb.netns.path(), "--audit"],
    );
    let mut p = sb.probe();
    let idle = p
        .ask("hold-pair 127.0.0.2:7031 127.0.0.2:7031 127.0.0.1:0")
        .get("id");
    let start = Instant::now();
    let would_close = || {
        tcpmgm::kernel::inspect(&sb.pin_dir)
            .unwrap()
            .rules
            .iter()
            .find(|r| r.id == 1)
            .map_or(0, |r| r.would_close)
    };
    while would_close() == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(6),
            "the idle connection was not counted as one to close within 6 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Well past its lifetime, and past the sweep that counted it: still open at both ends.
    std::thread::sleep(Duration::from_secs(1));
    let r = p.ask(&format!("closed {idle}"));
    assert_eq!(
        (r.get("client_closed"), r.get("server_closed")),
        (0, 0),
        "audit mode closed it: {r:?}"
    );
    assert_eq!(idle_closes(&sb), 0);
}

fn idle_closes(sb: &Sandbox) -> u64 {
    tcpmgm::kernel::inspect(&sb.pin_dir)
        .unwrap()
        .rules
        .iter()
        .map(|r| r.idle_closes)
        .sum()
}
