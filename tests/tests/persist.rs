//! The policy outlives the daemon: SIGKILL leaves it enforced, and a new daemon takes the pinned
//! links over instead of attaching a second set.
use std::process::Command;

use tcpmgm::policy::source::{Source, TableVersion};
use tcpmgm_tests::{Daemon, PROGRAMS, Sandbox, assert_one_program_per_hook, binary};

#[tokio::test]
async fn sigkill_keeps_the_policy_and_a_restart_adopts_it() {
    let sb = Sandbox::new();
    let dir = std::env::temp_dir().join(format!("tcpmgm-persist-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}", dir.join("rules.db").display());
    let source = Source::open(&url, true).await.unwrap();
    source.init(TableVersion::V1).await.unwrap();
    source
        .execute_script(
            "INSERT INTO tcp_mgm (id, remote_addr, keepidle) VALUES (1, '127.0.0.0/8', 71);",
        )
        .await
        .unwrap();
    let control = dir.join("control.sock");
    let mut probe = sb.probe();
    let idle = |probe: &mut tcpmgm_tests::Probe, port: u16| {
        probe
            .ask(&format!("pair 127.0.0.1:{port} 127.0.0.1:{port}"))
            .get("client_idle")
    };

    let first = Daemon::start(&sb, &url, control.clone());
    assert_eq!(idle(&mut probe, 7001), 71);
    first.kill();
    // No daemon: the pinned links still enforce the policy on new connections.
    assert_eq!(idle(&mut probe, 7002), 71);
    assert_one_program_per_hook(&sb.attached_programs());

    source
        .execute_script("UPDATE tcp_mgm SET keepidle = 72;")
        .await
        .unwrap();
    let second = Daemon::start(&sb, &url, control.clone());
    assert!(
        second.startup_log.contains("took over the policy pinned"),
        "{}",
        second.startup_log
    );
    let programs = sb.attached_programs();
    assert_eq!(programs.matches("tcpmgm_sock_ops").count(), 1, "{programs}");
    assert_eq!(programs.matches("tcpmgm_connect4").count(), 1, "{programs}");
    assert_eq!(programs.matches("tcpmgm_connect6").count(), 1, "{programs}");
    assert_eq!(idle(&mut probe, 7003), 72);

    // And it reloads.
    source
        .execute_script("UPDATE tcp_mgm SET keepidle = 73;")
        .await
        .unwrap();
    let out = Command::new(binary("tcpmgm"))
        .arg("reload")
        .arg("--control")
        .arg(&control)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(idle(&mut probe, 7004), 73);
    assert_one_program_per_hook(&sb.attached_programs());

    second.kill();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn status_counts_exactly_the_connections_made() {
    let sb = Sandbox::new();
    let dir = std::env::temp_dir().join(format!("tcpmgm-status-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}", dir.join("rules.db").display());
    let source = Source::open(&url, true).await.unwrap();
    source.init(TableVersion::V1).await.unwrap();
    source
        .execute_script(
            "INSERT INTO tcp_mgm (id, remote_addr, keepidle) VALUES (1, '127.0.0.2', 81);
             INSERT INTO tcp_mgm (id, remote_addr, no_new_conn) VALUES (2, '127.0.0.3', 1);
             INSERT INTO tcp_mgm (id, remote_addr) VALUES (3, '192.0.2.0/24');",
        )
        .await
        .unwrap();
    let control = dir.join("control.sock");
    let daemon = Daemon::start(&sb, &url, control.clone());
    let mut probe = sb.probe();
    const OPENED: u64 = 7;
    const REFUSED: u64 = 5;
    for port in 0..OPENED {
        // From 127.0.0.1: only the client socket meets a rule (rule 1); the server's peer does not.
        let r = probe.ask(&format!(
            "pair 127.0.0.2:{p} 127.0.0.2:{p} 127.0.0.1:0",
            p = 7000 + port
        ));
        assert_eq!(r.get("client_idle"), 81, "{r:?}");
    }
    for port in 0..REFUSED {
        assert_eq!(
            probe
                .ask(&format!(
                    "pair 127.0.0.3:{p} 127.0.0.3:{p}",
                    p = 7100 + port
                ))
                .get("errno"),
            1
        );
    }
    let status = |json: bool| {
        let mut cmd = Command::new(binary("tcpmgm"));
        cmd.arg("status")
            .arg("--cgroup")
            .arg(&sb.cgroup)
            .arg("--pin-dir")
            .arg(&sb.pin_dir)
            .arg("--control")
            .arg(&control);
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let report: serde_json::Value = serde_json::from_str(&status(true)).unwrap();
    let cgroup = &report[0];
    assert_eq!(cgroup["daemon_running"], true, "{report:#}");
    assert_eq!(cgroup["state"]["generation"], 1);
    assert_eq!(cgroup["state"]["rules"], 3);
    assert_eq!(
        cgroup["kernel"]["programs"].as_array().map(Vec::len),
        Some(PROGRAMS.len()),
        "{report:#}"
    );
    let rule = |id: u64| {
        let rules = cgroup["kernel"]["rules"].as_array().unwrap();
        let r = rules
            .iter()
            .find(|r| r["id"] == id)
            .unwrap_or_else(|| panic!("rule {id} in {report:#}"));
        (
            r["matched"].as_u64().unwrap(),
            r["refused"].as_u64().unwrap(),
        )
    };
    assert_eq!(rule(1), (OPENED, 0));
    assert_eq!(rule(2), (REFUSED, REFUSED));
    assert_eq!(rule(3), (0, 0));
    let text = status(false);
    assert!(
        text.contains("rules: 3 enforced (generation 1), from sqlite://")
            && text.contains("refused          5"),
        "{text}"
    );
    // The version that loaded the programs is read from the pins: it outlives the daemon, and
    // is the one `--version` names (commit and eBPF object included).
    daemon.kill();
    let version = tcpmgm_tests::tcpmgm(&["--version"]).1;
    let version = version
        .trim()
        .strip_prefix("tcpmgm ")
        .expect("tcpmgm VERSION");
    assert!(
        version.contains("(commit ") && version.contains(", eBPF "),
        "{version}"
    );
    let report: serde_json::Value = serde_json::from_str(&status(true)).unwrap();
    assert_eq!(report[0]["daemon_running"], false, "{report:#}");
    assert_eq!(report[0]["kernel"]["loader"], version, "{report:#}");
    assert!(
        status(false).contains(&format!("loaded by: tcpmgm {version}")),
        "{}",
        status(false)
    );
    // Pins of a tcpmgm before the header recorded it: an 8-byte header (generation, flags).
    let header = sb.pin_dir.join("TCPMGM_HEADER");
    std::fs::remove_file(&header).unwrap();
    tcpmgm_tests::sh(
        Command::new("bpftool")
            .args(["map", "create"])
            .arg(&header)
            .args([
                "type",
                "array",
                "key",
                "4",
                "value",
                "8",
                "entries",
                "1",
                "name",
                "TCPMGM_HEADER",
            ]),
    );
    let report: serde_json::Value = serde_json::from_str(&status(true)).unwrap();
    assert!(report[0]["kernel"]["loader"].is_null(), "{report:#}");
    assert!(status(false).contains("loaded by: tcpmgm unknown"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The programs' log events reach the daemon's log, at most LOG_EVENTS_PER_SECOND a CPU a
/// second however many connects are refused, while the counters still count every one.
#[tokio::test]
async fn refusals_are_logged_rate_limited_and_all_counted() {
    let sb = Sandbox::new();
    let db = tcpmgm_tests::TestDb::new(
        tcpmgm_tests::Backend::Sqlite,
        TableVersion::V1,
        "INSERT INTO tcp_mgm (id, remote_addr, no_new_conn) VALUES (5, '127.0.0.3', 1);",
    )
    .await;
    let control = std::env::temp_dir().join(format!("tcpmgm-logs-{}.sock", std::process::id()));
    let daemon = Daemon::start(&sb, &db.url, control.clone());
    let mut probe = sb.probe();
    let cpus = std::thread::available_parallelism().unwrap().get();
    let per_second = cpus * tcpmgm_common::LOG_EVENTS_PER_SECOND as usize;
    // The most lines the limiter lets through while refusals come for `seconds`: a budget a
    // second, and one more for the second a storm starts in and the one it ends in.
    let ceiling = |seconds: u64| per_second * (seconds as usize + 2);
    // Storms of 300 refusals, each in one tight loop of the probe's, until twice as many were
    // refused as the limiter can let through in the time taken: then the limiter must have
    // dropped some, however slow the machine.
    const STORM: usize = 300;
    let started = std::time::Instant::now();
    let mut refused = 0;
    while refused <= 2 * ceiling(started.elapsed().as_secs()) {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(120),
            "{refused} refusals in {:?}: too slow to outrun the limiter",
            started.elapsed()
        );
        let storm = probe.ask(&format!("storm 127.0.0.3:7000 {STORM}"));
        assert_eq!(
            (storm.get("refused"), storm.get("connected")),
            (STORM as i64, 0),
            "{storm:?}"
        );
        refused += STORM;
    }
    let seconds = started.elapsed().as_secs();
    // The log lines arrive through the ring buffer after the refusals: count them once no new
    // one has come for a second.
    assert!(
        tcpmgm_tests::wait_logged(
            &daemon,
            "refused by rule 5",
            std::time::Duration::from_secs(10)
        ),
        "no refusal logged"
    );
    let count = || daemon.logged("refused by rule 5");
    let mut logged = count();
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
        let now = count();
        if now == logged {
            break;
        }
        logged = now;
    }
    assert!(
        logged >= 1 && logged <= ceiling(seconds) && logged < refused,
        "{logged} lines for {refused} refusals in {seconds} s (ceiling {})",
        ceiling(seconds)
    );
    eprintln!("{logged} log lines for {refused} refusals in about {seconds} s");
    let report = sb.status_json(&control);
    assert_eq!(
        report[0]["kernel"]["rules"][0]["refused"], refused as u64,
        "{report:#}"
    );
}

#[tokio::test]
async fn a_pin_directory_is_one_cgroups_and_pins_of_old_layouts_go() {
    let (a, b) = (Sandbox::new(), Sandbox::new());
    let db = tcpmgm_tests::TestDb::new(
        tcpmgm_tests::Backend::Sqlite,
        TableVersion::V1,
        "INSERT INTO tcp_mgm (id, remote_addr, keepidle) VALUES (1, '127.0.0.0/8', 74);",
    )
    .await;
    let control = std::env::temp_dir().join(format!("tcpmgm-owner-{}.sock", std::process::id()));
    Daemon::start(&a, &db.url, control.clone()).kill();
    // A pin an older layout left behind (this name is no longer used).
    let stale = a.pin_dir.join("TCPMGM_CANDIDATES");
    tcpmgm_tests::sh(
        Command::new("bpftool")
            .args(["map", "create"])
            .arg(&stale)
            .args([
                "type", "array", "key", "4", "value", "4", "entries", "1", "name", "stale",
            ]),
    );
    let again = Daemon::start(&a, &db.url, control.clone());
    assert!(!stale.exists(), "the old layout's pin is still there");
    assert_eq!(
        a.probe()
            .ask("pair 127.0.0.1:7001 127.0.0.1:7001")
            .get("client_idle"),
        74
    );

    // Another cgroup pointed at the same pins: refused, nothing changes on either.
    let out = Command::new(binary("tcpmgm"))
        .args(["run", "--db", &db.url, "--cgroup"])
        .arg(&b.cgroup)
        .arg("--pin-dir")
        .arg(&a.pin_dir)
        .arg("--control")
        .arg(control.with_extension("other"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("each cgroup needs a pin directory of its own"),
        "{stderr}"
    );
    assert!(
        !b.attached_programs().contains("tcpmgm"),
        "{}",
        b.attached_programs()
    );
    assert_one_program_per_hook(&a.attached_programs());
    again.kill();
}

/// send_threshold: sends slower than a rule's threshold are counted in `status` and logged;
/// a generous threshold or none counts nothing.
#[tokio::test]
async fn slow_sends_are_reported_for_rules_that_ask() {
    let sb = Sandbox::new();
    let db = tcpmgm_tests::TestDb::new(
        tcpmgm_tests::Backend::Sqlite,
        TableVersion::V1,
        "INSERT INTO tcp_mgm (id, remote_addr, send_threshold) VALUES (31, '127.0.0.2', 1);
         INSERT INTO tcp_mgm (id, remote_addr, send_threshold) VALUES (32, '127.0.0.3', 10000000);
         INSERT INTO tcp_mgm (id, remote_addr) VALUES (33, '127.0.0.4');",
    )
    .await;
    let control = std::env::temp_dir().join(format!("tcpmgm-slow-{}.sock", std::process::id()));
    let daemon = Daemon::start(&sb, &db.url, control.clone());
    let mut probe = sb.probe();
    for (i, addr) in ["127.0.0.2", "127.0.0.3", "127.0.0.4"].iter().enumerate() {
        let id = probe
            .ask(&format!(
                "hold-pair {addr}:{p} {addr}:{p} 127.0.0.1:0",
                p = 7040 + i
            ))
            .get("id");
        for _ in 0..10 {
            assert_eq!(probe.ask(&format!("ping {id}")).get("ok"), 1);
        }
    }
    let report = sb.status_json(&control);
    let slow = |id: u64| {
        let rules = report[0]["kernel"]["rules"].as_array().unwrap();
        rules.iter().find(|r| r["id"] == id).unwrap()["slow"]
            .as_u64()
            .unwrap()
    };
    assert!(
        slow(31) > 0,
        "a 1 µs threshold on loopback must see slow sends: {report:#}"
    );
    assert_eq!((slow(32), slow(33)), (0, 0), "{report:#}");
    let said = tcpmgm_tests::wait_logged(
        &daemon,
        "over rule 31's send_threshold of 1 us",
        std::time::Duration::from_secs(10),
    );
    assert!(said, "{}", daemon.log.lock().unwrap().join("\n"));
}
