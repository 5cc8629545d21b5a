//! All or nothing in the kernel step: a start, an adoption and a reload made to fail at each
//! hook and pin (through the daemon's test-only fault points, `TCPMGM_FAULT`) leave exactly
//! what was there before, as bpftool, the pins and a real connection show.
use std::ffi::OsStr;
use std::path::Path;

use tcpmgm::policy::source::{Source, TableVersion};
use tcpmgm_tests::{
    Daemon, Sandbox, assert_one_program_per_hook, control_socket, idle_in as idle, refused,
    snapshot,
};

/// A SQLite table of `rules` rules: rule 1 governs loopback with `keepidle`, the others
/// distinct peers in 10.0.0.0/8.
async fn table(url: &str, keepidle: u32, rules: u32, init: bool) {
    let source = Source::open(url, init).await.unwrap();
    if init {
        source.init(TableVersion::V1).await.unwrap();
    }
    let mut sql = format!(
        "DELETE FROM tcp_mgm; INSERT INTO tcp_mgm (id, remote_addr, keepidle) VALUES (1, '127.0.0.0/8', {keepidle});"
    );
    for i in 2..=rules {
        sql.push_str(&format!(
            "INSERT INTO tcp_mgm (id, remote_addr, keepidle) VALUES ({i}, '10.{}.{}.{}', 50);",
            i >> 16,
            (i >> 8) & 255,
            i & 255
        ));
    }
    source.execute_script(&sql).await.unwrap();
}

/// `tcpmgm run` on the sandbox with `TCPMGM_FAULT=point`, which must fail with the fault named:
/// its log.
fn failed_run(sb: &Sandbox, url: &str, point: &str) -> String {
    let control = control_socket(sb);
    let args: Vec<&OsStr> = vec![
        "run".as_ref(),
        "--db".as_ref(),
        url.as_ref(),
        "--cgroup".as_ref(),
        sb.cgroup.as_os_str(),
        "--pin-dir".as_ref(),
        sb.pin_dir.as_os_str(),
        "--control".as_ref(),
        control.as_os_str(),
    ];
    let log = refused(&args, &[("TCPMGM_FAULT", point)]);
    let name = point.split('#').next().unwrap();
    assert!(
        log.contains(&format!("fault injected at {name}")),
        "{point}: {log}"
    );
    log
}

fn db_url(dir: &Path) -> String {
    std::fs::create_dir_all(dir).unwrap();
    format!("sqlite://{}", dir.join("rules.db").display())
}

/// One of each step of a first start, every hook and every pin kind.
const START: &[&str] = &[
    "pin-dir",
    "load",
    "stage:TCPMGM_PROFILES",
    "switch",
    "link-create:tcpmgm_sock_ops",
    "link-create:tcpmgm_connect4",
    "link-create:tcpmgm_connect6",
    "link-create:tcpmgm_sockopt",
    "pin:TCPMGM_LINK_SOCK_OPS",
    "pin:TCPMGM_LINK_CONNECT4",
    "pin:TCPMGM_LINK_CONNECT6",
    "pin:TCPMGM_LINK_SETSOCKOPT",
    "pin:TCPMGM_PROG_SOCK_OPS",
    "pin:TCPMGM_PROG_SETSOCKOPT",
    "pin:TCPMGM_HEADER",
    "pin:TCPMGM_HOST_V6",
];

#[tokio::test]
async fn a_failed_first_start_leaves_nothing() {
    let sb = Sandbox::new();
    let dir = std::env::temp_dir().join(format!("tcpmgm-faults-start-{}", std::process::id()));
    let url = db_url(&dir);
    table(&url, 41, 1, true).await;
    let mut port = 7100;
    let nothing = snapshot(&sb);
    assert!(nothing.contains("(no pin directory)"), "{nothing}");
    for point in START {
        failed_run(&sb, &url, point);
        assert_eq!(snapshot(&sb), nothing, "after a fault at {point}");
        assert_eq!(idle(&sb, &mut port), 7200, "after a fault at {point}");
    }
    // The same start without a fault enforces the table.
    let daemon = Daemon::start(&sb, &url, control_socket(&sb));
    assert_eq!(idle(&sb, &mut port), 41);
    daemon.kill();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Each step of adopting the links a killed run left pinned, with rule statistics that must
/// grow (the new table is larger).
const ADOPT: &[&str] = &[
    "load",
    "stats-copy",
    "pin:TCPMGM_RULE_STATS_V1",
    "pin:TCPMGM_OUTCOMES_V1",
    "switch",
    "link-update:tcpmgm_sock_ops",
    "link-update:tcpmgm_connect4",
    "link-update:tcpmgm_connect6",
    "link-update:tcpmgm_sockopt",
    "pin:TCPMGM_PROG_SOCK_OPS",
    "pin:TCPMGM_PROG_SETSOCKOPT",
    "pin:TCPMGM_HEADER",
    "pin:TCPMGM_HOST_V6",
];

#[tokio::test]
async fn a_failed_adoption_leaves_the_earlier_policy() {
    let sb = Sandbox::new();
    let dir = std::env::temp_dir().join(format!("tcpmgm-faults-adopt-{}", std::process::id()));
    let url = db_url(&dir);
    table(&url, 41, 1, true).await;
    let mut port = 7200;
    Daemon::start(&sb, &url, control_socket(&sb)).kill();
    assert_eq!(idle(&sb, &mut port), 41);
    let before = snapshot(&sb);
    table(&url, 42, 600, false).await;
    for point in ADOPT {
        let log = failed_run(&sb, &url, point);
        assert_eq!(snapshot(&sb), before, "after a fault at {point}: {log}");
        assert_eq!(idle(&sb, &mut port), 41, "after a fault at {point}");
    }
    let daemon = Daemon::start(&sb, &url, control_socket(&sb));
    for what in ["rule statistics", "connection outcomes"] {
        assert!(
            daemon
                .startup_log
                .contains(&format!("{what} grown to 2048")),
            "{}",
            daemon.startup_log
        );
    }
    assert_eq!(idle(&sb, &mut port), 42);
    assert_one_program_per_hook(&sb.attached_programs());
    daemon.kill();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Each step of a reload (`#2`: the start reached it first), and of a reload whose table
/// outgrew the rule statistics (the programs are loaded again and swapped into the links).
const RELOAD: &[(&str, u32)] = &[
    ("stage:TCPMGM_PROFILES#2", 1),
    ("pin:TCPMGM_PROFILES#2", 1),
    ("pin:TCPMGM_HOST_V6#2", 1),
    ("switch#2", 1),
    ("load#2", 600),
    ("stats-copy#1", 600),
    ("link-update:tcpmgm_sock_ops#1", 600),
    ("link-update:tcpmgm_sockopt#1", 600),
    ("pin:TCPMGM_PROG_CONNECT4#2", 600),
    ("pin:TCPMGM_HOST_V6#2", 600),
];

#[tokio::test]
async fn a_failed_reload_leaves_the_policy_in_force() {
    let mut port = 7300;
    for &(point, rules) in RELOAD {
        let sb = Sandbox::new();
        let dir = std::env::temp_dir().join(format!(
            "tcpmgm-faults-reload-{}-{port}",
            std::process::id()
        ));
        let url = db_url(&dir);
        table(&url, 41, 1, true).await;
        let daemon = Daemon::start_env(
            &sb,
            control_socket(&sb),
            &["--db", &url],
            &[("TCPMGM_FAULT", point)],
        );
        let before = snapshot(&sb);
        table(&url, 42, rules, false).await;
        let (code, out) = daemon.reload();
        assert_ne!(code, 0, "{point}: {out}");
        let name = point.split('#').next().unwrap();
        assert!(
            out.contains(&format!("fault injected at {name}")),
            "{point}: {out}"
        );
        assert_eq!(snapshot(&sb), before, "after a fault at {point}");
        assert_eq!(idle(&sb, &mut port), 41, "after a fault at {point}");
        // The fault was for that one time: the next reload goes through.
        let (code, out) = daemon.reload();
        assert_eq!(code, 0, "{point}: {out}");
        assert_eq!(
            idle(&sb, &mut port),
            42,
            "after {point}'s reload went through"
        );
        assert_one_program_per_hook(&sb.attached_programs());
        daemon.kill();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
