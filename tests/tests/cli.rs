//! The `tcpmgm` command as an operator uses it: check a table, refuse a bad one, run and detach.
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, Stdio};

use tcpmgm::policy::source::TableVersion;
use tcpmgm_tests::{
    Backend, Daemon, Sandbox, Scratch, Spawned, TestDb, assert_one_program_per_hook, binary,
    control_socket, tcpmgm,
};

/// Runs a rule test once per database: SQLite, PostgreSQL and MariaDB.
macro_rules! on_every_database {
    ($test:ident) => {
        mod $test {
            use super::*;
            #[tokio::test]
            async fn sqlite() {
                $test(Backend::Sqlite).await
            }
            #[tokio::test]
            async fn postgres() {
                $test(Backend::Postgres).await
            }
            #[tokio::test]
            async fn mariadb() {
                $test(Backend::MariaDb).await
            }
        }
    };
}

const BAD_ROWS: &str = "
INSERT INTO tcp_mgm (id, remote_addr) VALUES (1, '10.0.0.300/24');
INSERT INTO tcp_mgm (id, remote_addr) VALUES (2, '10.0.0.0/33');
INSERT INTO tcp_mgm (id, remote_port) VALUES (3, 70000);
INSERT INTO tcp_mgm (id, connect_timeout) VALUES (4, -5);
INSERT INTO tcp_mgm (id, proto) VALUES (5, 'udp');
INSERT INTO tcp_mgm (id, proto) VALUES (6, 'quic');
INSERT INTO tcp_mgm (id, keepalive) VALUES (7, 2);
INSERT INTO tcp_mgm (id, local_addr) VALUES (8, 'nosuch');
INSERT INTO tcp_mgm (id, remote_addr, local_addr) VALUES (9, '192.0.2.0/24', '[2001:db8::1]');
INSERT INTO tcp_mgm (id, attrs) VALUES (10, 'max_msg_chunks');
INSERT INTO tcp_mgm (id, remote_addr, local_addr, keepidle) VALUES (11, '127.0.0.0/8', 'trunks', 55);
";

const LISTENER: &str = "tls:10.0.0.1:5061 tag trunks";

/// The exit statuses of sysexits.h that tcpmgm uses (README, "Exit status").
const EX_USAGE: i32 = 64;
const EX_DATAERR: i32 = 65;
const EX_UNAVAILABLE: i32 = 69;
const EX_NOPERM: i32 = 77;
const EX_CONFIG: i32 = 78;

/// BAD_ROWS as `backend` can hold them: MariaDB's columns are UNSIGNED, so its schema refuses
/// the negative connect_timeout of row 4 before tcpmgm could.
fn bad_rows(backend: Backend) -> String {
    BAD_ROWS
        .lines()
        .filter(|l| backend != Backend::MariaDb || !l.contains("(4, -5)"))
        .collect::<Vec<_>>()
        .join("\n")
}

on_every_database!(check_names_every_bad_row);
async fn check_names_every_bad_row(backend: Backend) {
    let db = TestDb::new(backend, TableVersion::V1, &bad_rows(backend)).await;
    let (code, stdout, _) = tcpmgm(&["check", "--db", &db.url, "--listener", LISTENER]);
    assert_eq!(code, EX_DATAERR, "{stdout}");
    let want = [
        "id 1: remote_addr: '10.0.0.300/24' is not an IP address or CIDR",
        "id 2: remote_addr: '10.0.0.0/33': prefix length /33 is longer than /32",
        "id 3: remote_port: 70000 is not a port",
        "id 4: connect_timeout: -5 must not be negative",
        "id 5: proto: 'udp' is not a TCP-based protocol",
        "id 6: proto: unknown protocol 'quic'",
        "id 7: keepalive: 2 is out of range (0 to 1)",
        "id 8: local_addr: unknown listener tag 'nosuch' (declared: trunks)",
        "id 9: local_addr: IPv6 local 2001:db8::1/128 cannot meet IPv4 remote 192.0.2.0/24",
        "id 10: attrs: 'max_msg_chunks' is not key=integer",
    ];
    let want: Vec<&str> = want
        .into_iter()
        .filter(|w| backend != Backend::MariaDb || !w.starts_with("id 4:"))
        .collect();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), want.len(), "{stdout}");
    for (line, want) in lines.iter().zip(want) {
        assert!(line.starts_with(want), "got '{line}', want '{want}...'");
    }
}

on_every_database!(both_table_versions_are_read);
async fn both_table_versions_are_read(backend: Backend) {
    for (version, extra) in [
        (TableVersion::V1, ", parallel_read"),
        (TableVersion::V2, ""),
    ] {
        let insert = format!(
            "INSERT INTO tcp_mgm (id, remote_addr, keepidle{extra}) VALUES (1, '192.0.2.0/24', 60{});",
            if extra.is_empty() { "" } else { ", 2" }
        );
        let db = TestDb::new(backend, version, &insert).await;
        let (code, stdout, stderr) = tcpmgm(&["check", "--db", &db.url]);
        assert_eq!(code, 0, "{version:?}: {stdout}{stderr}");
        let (code, stdout, stderr) = tcpmgm(&[
            "match",
            "--db",
            &db.url,
            "--remote",
            "192.0.2.9:5060",
            "--proto",
            "tcp",
        ]);
        assert_eq!(code, 0, "{stdout}{stderr}");
        assert!(
            stdout.contains("rule 1:") && stdout.contains("keepidle=60s"),
            "{version:?}: {stdout}"
        );
    }
    let db = TestDb::new(
        backend,
        TableVersion::V1,
        "INSERT INTO tcp_mgm (id, parallel_read) VALUES (4, 3);",
    )
    .await;
    let (code, stdout, _) = tcpmgm(&["check", "--db", &db.url]);
    assert_eq!(
        (code, stdout.trim()),
        (
            EX_DATAERR,
            "id 4: parallel_read: 3 is out of range (0 to 2)"
        )
    );
}

#[tokio::test]
async fn match_explains_the_winner_and_the_protocol() {
    let db = TestDb::new(
        Backend::Sqlite,
        TableVersion::V1,
        "INSERT INTO tcp_mgm (id, proto, remote_addr, keepidle) VALUES (1, 'tls', '203.0.113.0/24', 60);
         INSERT INTO tcp_mgm (id, remote_addr, keepidle) VALUES (2, '203.0.113.0/24', 70);",
    )
    .await;
    let url = db.url.clone();
    let (code, out, stderr) = tcpmgm(&[
        "match",
        "--db",
        &url,
        "--remote",
        "203.0.113.5:5061",
        "--proto",
        "tls",
    ]);
    assert_eq!(code, 0, "{out}{stderr}");
    assert!(
        out.contains("rule 1: priority 0, proto tls, remote 203.0.113.0/24"),
        "{out}"
    );
    assert!(
        out.contains("also matches rule 2, which loses: rule 1 has a specific proto"),
        "{out}"
    );
    let (code, out, stderr) = tcpmgm(&[
        "match",
        "--db",
        &url,
        "--remote",
        "198.51.100.1:5060",
        "--proto",
        "tcp",
    ]);
    assert_eq!(code, 0, "{out}{stderr}");
    assert!(out.contains("no rule"), "{out}");
    // Outbound from a listener's address takes that listener's protocol.
    let (code, out, stderr) = tcpmgm(&[
        "match",
        "--db",
        &url,
        "--remote",
        "[::ffff:203.0.113.5]:5061",
        "--local",
        "10.0.0.1:40000",
        "--listener",
        LISTENER,
    ]);
    assert_eq!(code, 0, "{out}{stderr}");
    assert!(
        out.contains("connection: proto tls, remote 203.0.113.5:5061, local 10.0.0.1 port 5061"),
        "{out}"
    );
    assert!(
        out.contains("attributed to tls:10.0.0.1:5061 tag trunks") && out.contains("rule 1:"),
        "{out}"
    );
}

#[tokio::test]
async fn a_rejected_table_reaches_nothing_in_the_kernel() {
    let backend = Backend::Sqlite;
    let sb = Sandbox::new();
    let db = TestDb::new(backend, TableVersion::V1, &bad_rows(backend)).await;
    let cgroup = sb.cgroup.to_str().unwrap();
    let pins = sb.pin_dir.to_str().unwrap();
    let (code, _, stderr) = tcpmgm(&[
        "run",
        "--db",
        &db.url,
        "--cgroup",
        cgroup,
        "--pin-dir",
        pins,
        "--listener",
        LISTENER,
    ]);
    assert_eq!(code, EX_DATAERR, "{stderr}");
    assert!(
        stderr.contains("id 3: remote_port") && stderr.contains("nothing of it was loaded"),
        "{stderr}"
    );
    assert!(
        !sb.attached_programs().contains("tcpmgm"),
        "{}",
        sb.attached_programs()
    );
    assert!(!Path::new(pins).exists());
}

on_every_database!(run_enforces_skips_bad_rows_keeps_the_policy_on_sigterm_and_detach_removes_it);
async fn run_enforces_skips_bad_rows_keeps_the_policy_on_sigterm_and_detach_removes_it(
    backend: Backend,
) {
    let sb = Sandbox::new();
    let db = TestDb::new(backend, TableVersion::V1, &bad_rows(backend)).await;
    let mut run = Spawned(
        Command::new(binary("tcpmgm"))
            .args([
                "run",
                "--db",
                &db.url,
                "--skip-invalid",
                "--listener",
                LISTENER,
            ])
            .arg("--cgroup")
            .arg(&sb.cgroup)
            .arg("--pin-dir")
            .arg(&sb.pin_dir)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let pid = nix::unistd::Pid::from_raw(run.0.id() as i32);
    let mut log = BufReader::new(run.0.stderr.take().unwrap());
    let mut seen = String::new();
    while !seen.contains("rules enforced") {
        let mut line = String::new();
        if log.read_line(&mut line).unwrap() == 0 {
            let _ = run.0.kill();
            panic!("tcpmgm run exited: {seen}");
        }
        seen.push_str(&line);
    }
    assert!(
        seen.contains("id 1: remote_addr") && seen.contains("1 rules enforced"),
        "{seen}"
    );
    assert_one_program_per_hook(&sb.attached_programs());
    // Rule 11 (local_addr names the listener tag 'trunks', 10.0.0.1) applies from that address.
    sb.netns.add_local(&["10.0.0.1"]);
    let mut probe = sb.probe();
    let r = probe.ask("pair 127.0.0.1:7001 127.0.0.1:7001 10.0.0.1:0");
    assert_eq!(r.get("client_idle"), 55, "{r:?}");

    // SIGTERM: the daemon exits, the policy stays in force.
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = run.0.wait().unwrap();
    assert!(status.success(), "{status}");
    assert_one_program_per_hook(&sb.attached_programs());
    let r = probe.ask("pair 127.0.0.1:7002 127.0.0.1:7002 10.0.0.1:0");
    assert_eq!(r.get("client_idle"), 55, "{r:?}");

    // `tcpmgm detach`: the system's settings are back.
    let detach = || {
        tcpmgm(&[
            "detach",
            "--cgroup",
            sb.cgroup.to_str().unwrap(),
            "--pin-dir",
            sb.pin_dir.to_str().unwrap(),
            "--control",
            "/nonexistent/tcpmgm.sock",
        ])
    };
    let (code, out, err) = detach();
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        !sb.attached_programs().contains("tcpmgm"),
        "{}",
        sb.attached_programs()
    );
    assert!(!sb.pin_dir.exists());
    assert!(out.starts_with("detached from"), "{out}");
    let r = probe.ask("pair 127.0.0.1:7003 127.0.0.1:7003 10.0.0.1:0");
    assert_eq!(r.keepalive("client"), (0, 7200, 75, 9), "{r:?}");
    // A second detach finds nothing, and says so.
    let (code, out, err) = detach();
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("nothing was attached to"), "{out}");
}

/// A reader that goes away early (`tcpmgm ... | head`) ends the command quietly, by SIGPIPE, as
/// other Unix tools end, not with a panic.
#[test]
fn a_closed_stdout_ends_a_command_quietly() {
    use std::os::unix::process::ExitStatusExt as _;
    let mut child = Command::new(binary("tcpmgm"))
        .arg("features")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "{:?}: {err}",
        out.status
    );
}

#[tokio::test]
async fn run_without_privileges_says_what_it_needs() {
    let sb = Sandbox::new();
    let db = TestDb::new(Backend::Sqlite, TableVersion::V1, "").await;
    // As nobody, without any capability.
    let out = Command::new(binary("tcpmgm"))
        .args(["run", "--db", &db.url, "--cgroup"])
        .arg(&sb.cgroup)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(EX_NOPERM), "{stderr}");
    assert!(
        stderr.contains("needs root, or the capabilities CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON"),
        "{stderr}"
    );
    assert!(!sb.attached_programs().contains("tcpmgm"));
}

#[tokio::test]
async fn a_config_file_gives_every_run_option() {
    let sb = Sandbox::new();
    let db = TestDb::new(
        Backend::Sqlite,
        TableVersion::V1,
        "INSERT INTO tcp_mgm (id, local_addr, keepidle) VALUES (1, 'trunks', 66);
         INSERT INTO tcp_mgm (id, remote_port) VALUES (2, 70000);",
    )
    .await;
    let dir = std::env::temp_dir().join(format!("tcpmgm-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let control = dir.join("ctl.sock");
    let config = dir.join("tcpmgm.toml");
    std::fs::write(
        &config,
        format!(
            "db = {:?}\ncgroup = {:?}\nlisteners = [\"tls:10.0.0.1:5061 tag trunks\"]\nskip_invalid = true\n\
             pin_dir = {:?}\ncontrol = {:?}\npoll_interval = 0.5\ndetach_on_exit = true\n",
            db.url, sb.cgroup, sb.pin_dir, control
        ),
    )
    .unwrap();
    let (code, out, _) = tcpmgm(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(
        (code, out.trim()),
        (
            EX_DATAERR,
            "id 2: remote_port: 70000 is not a port (0 to 65535, 0 = any)"
        )
    );

    let mut run = Spawned(
        Command::new(binary("tcpmgm"))
            .args(["run", "--config"])
            .arg(&config)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut log = BufReader::new(run.0.stderr.take().unwrap());
    let mut seen = String::new();
    while !seen.contains("reload with SIGHUP") {
        let mut line = String::new();
        if log.read_line(&mut line).unwrap() == 0 {
            let _ = run.0.kill();
            panic!("tcpmgm run exited: {seen}");
        }
        seen.push_str(&line);
    }
    assert!(
        seen.contains("polls it every 500ms") && seen.contains(&format!("{}", control.display())),
        "{seen}"
    );
    sb.netns.add_local(&["10.0.0.1"]);
    let mut probe = sb.probe();
    assert_eq!(
        probe
            .ask("pair 127.0.0.1:7001 127.0.0.1:7001 10.0.0.1:0")
            .get("client_idle"),
        66
    );
    // detach_on_exit: SIGTERM takes the policy off.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(run.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(run.0.wait().unwrap().success());
    assert!(
        !sb.attached_programs().contains("tcpmgm"),
        "{}",
        sb.attached_programs()
    );
    let (code, _, err) = tcpmgm(&["check", "--config", "/nonexistent/tcpmgm.toml"]);
    assert!(
        code == EX_CONFIG && err.contains("config /nonexistent/tcpmgm.toml"),
        "{err}"
    );
    std::fs::write(&config, "dbb = 'x'\n").unwrap();
    let (code, _, err) = tcpmgm(&["check", "--config", config.to_str().unwrap()]);
    assert!(
        code == EX_CONFIG && err.contains("unknown field `dbb`"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A number of seconds out of its option's range, on the command line or in the config file, is
/// refused before anything starts: the error names the option (and the file), the value, the
/// range and the unit; no value makes the command panic (exit code 101).
#[test]
fn seconds_out_of_range_are_refused_naming_the_option() {
    let dir = std::env::temp_dir().join(format!("tcpmgm-seconds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("tcpmgm.toml");
    let file = config.to_str().unwrap();
    for (flag, key, range) in [
        ("--poll-interval", "poll_interval", "from 0.01 to 86400"),
        ("--db-timeout", "db_timeout", "from 0.1 to 86400"),
    ] {
        for value in ["-1", "nan", "inf", "1e300"] {
            let expected = format!("{value} is not a number of seconds {range}");
            let (code, _, err) = tcpmgm(&["run", "--cgroup", "tcpmgm-never", flag, value]);
            assert!(
                code == EX_USAGE && err.contains(&format!("'{value}' for '{flag} <SECONDS>'")),
                "{flag} {value}: exit {code}: {err}"
            );
            assert!(err.contains(&expected), "{flag} {value}: {err}");
            std::fs::write(&config, format!("{key} = {value}\n")).unwrap();
            for command in ["run", "check"] {
                let (code, _, err) = tcpmgm(&[command, "--config", file]);
                assert!(
                    code == EX_CONFIG
                        && err.contains(&format!("config {file}"))
                        && err.contains(&format!("{key}: {expected}")),
                    "{command}, {key} = {value}: exit {code}: {err}"
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// What a megabyte in a cell and an integer beyond 64 bits look like in `check`'s report and in
/// a refused start: the value quoted short, the integer said to be out of range, in full.
#[tokio::test]
async fn huge_values_are_quoted_short_and_big_integers_in_full() {
    let huge = "x".repeat(1 << 20);
    let db = TestDb::new(
        Backend::Sqlite,
        TableVersion::V1,
        &format!(
            "INSERT INTO tcp_mgm (id, proto) VALUES (1, '{huge}');
             INSERT INTO tcp_mgm (id, keepidle) VALUES (2, '9223372036854775808');"
        ),
    )
    .await;
    let (code, out, _) = tcpmgm(&["check", "--db", &db.url]);
    assert_eq!(
        (code, out.lines().collect::<Vec<_>>()),
        (
            EX_DATAERR,
            vec![
                format!(
                    "id 1: proto: unknown protocol '{}…' (1048576 characters) (expected any or one of {})",
                    "x".repeat(100),
                    tcpmgm_common::PROTOCOLS.join(", ")
                )
                .as_str(),
                "id 2: keepidle: 9223372036854775808 is out of range (0 to 32767)",
            ]
        )
    );
    let sb = Sandbox::new();
    let (code, _, err) = run_on(&sb, &["--db", &db.url]);
    assert!(
        code == EX_DATAERR && err.contains("(1048576 characters)") && err.len() < 4000,
        "exit {code}, {} bytes: {}",
        err.len(),
        &err[..err.len().min(4000)]
    );
}

/// `tcpmgm run ARGS` on the sandbox's cgroup and pins, to its end: (exit code, stdout, stderr).
fn run_on(sb: &Sandbox, args: &[&str]) -> (i32, String, String) {
    let sandbox = [
        "--cgroup",
        sb.cgroup.to_str().unwrap(),
        "--pin-dir",
        sb.pin_dir.to_str().unwrap(),
    ];
    let all: Vec<&str> = ["run"]
        .iter()
        .chain(args)
        .chain(&sandbox)
        .copied()
        .collect();
    tcpmgm(&all)
}

/// EX_USAGE for whatever clap refuses (clap's own exit would be 2); `--help` exits 0 and names
/// RUST_LOG and every exit status.
#[test]
fn a_usage_error_exits_64() {
    for args in [
        &["run", "--no-such-option"][..],
        &[],
        &["check", "--log-format", "xml"],
        &["match", "--db", "x.db", "--remote", "not-an-address"],
    ] {
        let (code, out, err) = tcpmgm(args);
        assert_eq!(code, EX_USAGE, "tcpmgm {args:?}: {out}{err}");
    }
    let (code, out, _) = tcpmgm(&["--help"]);
    assert_eq!(code, 0, "{out}");
    for said in [
        "RUST_LOG",
        "64  usage",
        "65  bad table data",
        "69  the database",
    ] {
        assert!(out.contains(said), "--help does not say {said:?}: {out}");
    }
    assert!(out.contains("77  missing privileges") && out.contains("78  bad configuration"));
}

/// EX_CONFIG: a TOML error, a listener that is not one, no cgroup anywhere; before anything
/// reaches the kernel.
#[test]
fn a_bad_configuration_exits_78() {
    let scratch = Scratch::new("exit-config");
    let toml_error = scratch.write(
        "bad.toml",
        "db = \"sqlite:///nonexistent.db\"\ncgroup = [\n",
    );
    for command in ["run", "check"] {
        let (code, _, err) = tcpmgm(&[command, "--config", &toml_error]);
        assert_eq!(code, EX_CONFIG, "{command}: {err}");
        assert!(err.contains(&format!("config {toml_error}")), "{err}");
    }
    let no_listener = scratch.write("listener.toml", "listeners = [\"carrier pigeon\"]\n");
    let (code, _, err) = tcpmgm(&["check", "--config", &no_listener, "--db", "x.db"]);
    assert_eq!(code, EX_CONFIG, "{err}");
    let no_cgroup = scratch.write("none.toml", "db = \"x.db\"\n");
    let (code, _, err) = tcpmgm(&["run", "--config", &no_cgroup]);
    assert!(
        code == EX_CONFIG && err.contains("no cgroup"),
        "exit {code}: {err}"
    );
}

/// EX_DATAERR: a table with a bad row, refused by `run` and reported by `check`; a database
/// with no tcp_mgm table at all.
#[tokio::test]
async fn bad_table_data_exits_65() {
    let sb = Sandbox::new();
    let db = TestDb::new(
        Backend::Sqlite,
        TableVersion::V1,
        "INSERT INTO tcp_mgm (id, remote_addr) VALUES (1, 'not-an-address');",
    )
    .await;
    let (code, out, _) = tcpmgm(&["check", "--db", &db.url]);
    assert_eq!(code, EX_DATAERR, "{out}");
    let (code, _, err) = run_on(&sb, &["--db", &db.url]);
    assert!(
        code == EX_DATAERR && err.contains("id 1: remote_addr"),
        "exit {code}: {err}"
    );
    assert!(!sb.attached_programs().contains("tcpmgm"));
    let (code, _, err) = tcpmgm(&["check", "--db", &db.url, "--table", "elsewhere"]);
    assert!(
        code == EX_DATAERR && err.contains("there is no table elsewhere"),
        "exit {code}: {err}"
    );
}

/// EX_UNAVAILABLE: a database that refuses connections, for as long as --db-timeout allows (the
/// unit restarts on it: the database may come back).
#[tokio::test]
async fn an_unavailable_database_exits_69() {
    let sb = Sandbox::new();
    let started = std::time::Instant::now();
    let (code, _, err) = run_on(
        &sb,
        &[
            "--db",
            "postgres://tcpmgm:tcpmgm@127.0.0.1:1/x",
            "--db-timeout",
            "1",
        ],
    );
    assert_eq!(code, EX_UNAVAILABLE, "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    assert!(!sb.attached_programs().contains("tcpmgm"));
    // A SQLite file that is not there (yet) is an unavailable database too.
    let (code, _, err) = tcpmgm(&["check", "--db", "sqlite:///nonexistent/rules.db"]);
    assert_eq!(code, EX_UNAVAILABLE, "{err}");
}

/// `run` as an unprivileged user: without the capabilities (or with part of them) it exits 77
/// naming what is missing; with CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON, as `--help` says, it
/// attaches (before Linux 5.11 it may instead exit 77 naming RLIMIT_MEMLOCK, which bounds BPF maps
/// there).
#[tokio::test]
async fn missing_privileges_exit_77() {
    use std::os::unix::fs::PermissionsExt as _;
    let sb = Sandbox::new();
    let db = TestDb::new(Backend::Sqlite, TableVersion::V1, "").await;
    // The control socket in a directory the user may write, so that only capabilities decide.
    let scratch = Scratch::new("nobody");
    std::fs::set_permissions(&scratch.0, std::fs::Permissions::from_mode(0o777)).unwrap();
    let run = |caps: &str| {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(format!("--inh-caps={caps}"));
        if caps != "-all" {
            cmd.arg(format!("--ambient-caps={caps}"));
        }
        cmd.arg(binary("tcpmgm"))
            .args(["run", "--db", &db.url, "--cgroup"])
            .arg(&sb.cgroup)
            .arg("--pin-dir")
            .arg(&sb.pin_dir)
            .arg("--control")
            .arg(scratch.0.join("c.sock"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    };
    let refused = |caps: &str| {
        let out = run(caps).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = refused("-all");
    assert_eq!(code, Some(EX_NOPERM), "{err}");
    assert!(err.contains("needs root, or the capabilities"), "{err}");
    let (code, err) = refused("+bpf,+perfmon");
    assert_eq!(code, Some(EX_NOPERM), "{err}");
    assert!(err.contains("without CAP_NET_ADMIN"), "{err}");
    assert!(!sb.attached_programs().contains("tcpmgm"));

    // Killed and reaped if the test fails before it ends.
    let mut child = Spawned(run("+bpf,+net_admin,+perfmon").spawn().unwrap());
    let stderr = child.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            seen.push_str(&line);
            seen.push('\n');
            if line.contains("reload with SIGHUP") {
                let _ = tx.send((true, seen.clone()));
            }
        }
        let _ = tx.send((false, seen));
    });
    let (started, log) = rx
        .recv_timeout(std::time::Duration::from_secs(120))
        .unwrap_or_else(|_| panic!("tcpmgm run as uid 65534 neither started nor exited in 120 s"));
    if started {
        let attached = sb.attached_programs();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = child.0.wait().unwrap();
        assert!(status.success(), "{status:?}: {log}");
        assert!(attached.contains("tcpmgm"), "{attached}\n{log}");
        eprintln!("uid 65534 with the three capabilities: attached");
    } else {
        let status = child.0.wait().unwrap();
        let (major, minor) = tcpmgm::kernel::features::kernel_version().unwrap();
        assert!(
            (major, minor) < (5, 11),
            "uid 65534 with CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON: {status:?}: {log}"
        );
        assert_eq!(status.code(), Some(EX_NOPERM), "{log}");
        assert!(log.contains("RLIMIT_MEMLOCK"), "{log}");
        // Pins the failed load never made are not reported as failures to undo.
        assert!(!log.contains("undoing"), "{log}");
        eprintln!("uid 65534 with the three capabilities: {log}");
    }
}

/// Runs a daemon on `sb` (its stderr a pipe), stops it with SIGTERM and returns its log.
fn daemon_log(sb: &Sandbox, db: &TestDb, extra: &[&str]) -> String {
    let args: Vec<&str> = ["--db", &db.url, "--detach-on-exit"]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
    let mut daemon = Daemon::start_args(sb, control_socket(sb), &args);
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    let status = daemon.wait_exit(std::time::Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let after = daemon.log.lock().unwrap().join("\n");
    format!("{}{after}", daemon.startup_log)
}

/// A rule whose address has host bits set: valid, and warned about at every read.
const WARNED_RULE: &str =
    "INSERT INTO tcp_mgm (id, remote_addr, keepidle) VALUES (1, '127.0.0.1/8', 30);";

/// Where stderr is not a terminal (journald, a pipe): no colour, no timestamp, and each line
/// starts with its syslog priority, which journald files it under (`journalctl -p warning`).
#[tokio::test]
async fn a_log_that_is_not_on_a_terminal_carries_priorities_and_no_escapes() {
    let sb = Sandbox::new();
    let db = TestDb::new(Backend::Sqlite, TableVersion::V1, WARNED_RULE).await;
    let log = daemon_log(&sb, &db, &[]);
    assert!(!log.contains('\x1b'), "an escape code: {log:?}");
    for line in log.lines() {
        let priority = line
            .strip_prefix('<')
            .and_then(|rest| rest.split_once('>'))
            .map(|(p, _)| p);
        assert!(
            matches!(priority, Some("3" | "4" | "6" | "7")),
            "a line without its priority: {line:?}"
        );
        // The level follows (padded to five characters): no timestamp before it.
        assert!(
            ["ERROR", "WARN", "INFO", "DEBUG"]
                .iter()
                .any(|l| line[3..].trim_start().starts_with(l)),
            "{line:?}"
        );
    }
    let warning = log.lines().find(|l| l.contains("host bits set"));
    assert!(
        warning.is_some_and(|l| l.starts_with("<4> WARN")),
        "the warning: {warning:?} in {log}"
    );
    assert!(
        log.lines()
            .any(|l| l.starts_with("<6> INFO") && l.contains("rules enforced")),
        "{log}"
    );
}

/// `--log-format json` (or `log_format` in the file): one JSON object a line with its level;
/// the priority goes in front only when stderr is the journal stream JOURNAL_STREAM names,
/// which journald strips.
#[tokio::test]
async fn log_format_json_writes_an_object_a_line() {
    let sb = Sandbox::new();
    let db = TestDb::new(Backend::Sqlite, TableVersion::V1, WARNED_RULE).await;
    let scratch = Scratch::new("log-json");
    let config = scratch.write("tcpmgm.toml", "log_format = \"json\"\n");
    let plain = daemon_log(&sb, &db, &["--config", &config]);
    let mut levels = Vec::new();
    for line in plain.lines() {
        let object: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        levels.push(object["level"].as_str().unwrap_or_default().to_owned());
        if line.contains("host bits set") {
            assert_eq!(object["level"], "WARN", "{line}");
        }
    }
    assert!(levels.iter().any(|l| l == "WARN") && levels.iter().any(|l| l == "INFO"));
    // --log-format wins over the file, either way.
    let text = daemon_log(&sb, &db, &["--config", &config, "--log-format", "text"]);
    assert!(text.lines().all(|l| l.starts_with('<')), "{text}");
}

/// `tcpmgm ARGS` in a mount namespace of its own whose /etc/tcpmgm is `conf` (an overlay over
/// /etc, on a tmpfs of the namespace, makes the mount point without touching the host's /etc),
/// in the working directory `cwd`, with no TCPMGM_* variable: the host is left as it was.
fn tcpmgm_with_etc(conf: &Path, cwd: &Path, args: &[&str]) -> (i32, String, String) {
    use nix::mount::{MsFlags, mount};
    let layers = cwd.join("layers");
    std::fs::create_dir_all(&layers).unwrap();
    let (upper, work) = (layers.join("upper"), layers.join("work"));
    let options = format!(
        "lowerdir=/etc,upperdir={},workdir={}",
        upper.display(),
        work.display()
    );
    let conf = conf.to_path_buf();
    let mut cmd = Command::new(binary("tcpmgm"));
    cmd.args(args)
        .current_dir(cwd)
        .env_remove("TCPMGM_CONFIG")
        .env_remove("TCPMGM_DB");
    // SAFETY: only system calls between fork and exec, on paths made before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let io = |e: nix::Error| std::io::Error::from_raw_os_error(e as i32);
            let mkdir = |p: &Path| match nix::unistd::mkdir(p, nix::sys::stat::Mode::S_IRWXU) {
                Err(nix::Error::EEXIST) => Ok(()),
                other => other.map_err(io),
            };
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).map_err(io)?;
            let none: Option<&str> = None;
            mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none).map_err(io)?;
            mount(
                Some("tmpfs"),
                &layers,
                Some("tmpfs"),
                MsFlags::empty(),
                none,
            )
            .map_err(io)?;
            mkdir(&upper)?;
            mkdir(&work)?;
            mount(
                Some("overlay"),
                "/etc",
                Some("overlay"),
                MsFlags::empty(),
                Some(options.as_str()),
            )
            .map_err(io)?;
            mkdir(Path::new("/etc/tcpmgm"))?;
            mount(Some(&conf), "/etc/tcpmgm", none, MsFlags::MS_BIND, none).map_err(io)
        });
    }
    let out = cmd.output().expect("run tcpmgm");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// With no option naming a configuration or a database, `check` reads /etc/tcpmgm/tcpmgm.toml
/// and says so; without that file it is an error naming what was looked at, and no
/// ./tcpmgm.db appears.
#[tokio::test]
async fn check_without_options_reads_etc_tcpmgm() {
    let db = TestDb::new(
        Backend::Sqlite,
        TableVersion::V1,
        "INSERT INTO tcp_mgm (id, remote_port) VALUES (7, 70000);",
    )
    .await;
    let dir = std::env::temp_dir().join(format!("tcpmgm-etc-{}", std::process::id()));
    let conf = dir.join("conf");
    std::fs::create_dir_all(&conf).unwrap();
    let (code, out, err) = tcpmgm_with_etc(&conf, &dir, &["check"]);
    let stray = dir.join("tcpmgm.db").exists();
    assert!(
        code == EX_CONFIG
            && err.contains("no rule database")
            && err.contains("/etc/tcpmgm/tcpmgm.toml does not exist"),
        "exit {code}: {out}{err}"
    );
    assert!(!stray, "check made ./tcpmgm.db");

    std::fs::write(conf.join("tcpmgm.toml"), format!("db = {:?}\n", db.url)).unwrap();
    let (code, out, err) = tcpmgm_with_etc(&conf, &dir, &["check"]);
    assert_eq!(
        (code, out.trim()),
        (
            EX_DATAERR,
            "id 7: remote_port: 70000 is not a port (0 to 65535, 0 = any)"
        ),
        "{err}"
    );
    assert!(
        err.contains("configuration: /etc/tcpmgm/tcpmgm.toml (found by default)"),
        "{err}"
    );
    // A database named on the command line leaves the file alone.
    let (code, _, err) = tcpmgm_with_etc(&conf, &dir, &["check", "--db", "/nonexistent.db"]);
    assert!(
        code == EX_UNAVAILABLE && !err.contains("configuration:"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        !Path::new("/etc/tcpmgm").exists(),
        "the test left /etc/tcpmgm on the host"
    );
}

/// Both reads of a table, as `Row`s: the fast one (None when it declines) and row by row.
async fn both_reads(
    url: &str,
) -> (
    Option<Vec<tcpmgm::policy::rule::Row>>,
    Vec<tcpmgm::policy::rule::Row>,
) {
    use tcpmgm::policy::source::{Source, SourceError};
    let source = Source::open(url, false).await.unwrap();
    let mut fast = Vec::new();
    let declined = source
        .read_fast(|row| {
            fast.push(row);
            Ok::<_, SourceError>(())
        })
        .await
        .unwrap()
        .is_none();
    let mut slow = Vec::new();
    source
        .read_each(|row| {
            slow.push(row);
            Ok::<_, SourceError>(())
        })
        .await
        .unwrap();
    ((!declined).then_some(fast), slow)
}

/// The fast read (the table as JSON, a few thousand rows a result row) hands over exactly the
/// rows, in the order and with the values, of the row by row read: over chunk boundaries with
/// ids inserted out of order, for the extremes of 64-bit integers, NULLs, empty, quoted,
/// escaped, non-ASCII and long text. PostgreSQL's and MariaDB's columns are first widened as an
/// operator may have (BIGINT, TEXT): OpenSIPS's own are INT and CHAR(n); MariaDB's TEXT columns
/// reach sqlx's Any driver as BLOBs and must still read as text.
async fn the_fast_read_gives_what_the_row_by_row_read_gives(backend: Backend) {
    let widen = match backend {
        Backend::Sqlite => "",
        Backend::Postgres => {
            "ALTER TABLE tcp_mgm ALTER COLUMN id TYPE BIGINT, \
             ALTER COLUMN connect_timeout TYPE BIGINT, ALTER COLUMN keepidle TYPE BIGINT, \
             ALTER COLUMN attrs TYPE TEXT, ALTER COLUMN remote_addr TYPE TEXT;"
        }
        Backend::MariaDb => {
            "ALTER TABLE tcp_mgm MODIFY id BIGINT NOT NULL, MODIFY connect_timeout BIGINT, \
             MODIFY keepidle BIGINT, MODIFY attrs TEXT, MODIFY remote_addr TEXT;"
        }
    };
    let mut values = Vec::new();
    for i in 0..5000i64 {
        // Ids 1..=5000, out of order: 3517 is prime to 5000.
        let id = (i * 3517) % 5000 + 1;
        values.push(format!(
            "({id}, 'tcp', '10.{}.{}.0/24', {}, NULL, {}, '')",
            id / 256 % 256,
            id % 256,
            5060 + id % 3,
            id % 7
        ));
    }
    // MariaDB's string literals take backslash escapes; SQLite's and PostgreSQL's do not.
    let backslash = if backend == Backend::MariaDb {
        "\\\\"
    } else {
        "\\"
    };
    let sql = format!(
        "{widen}
         INSERT INTO tcp_mgm (id, proto, remote_addr, remote_port, local_addr, priority, attrs) \
         VALUES {};
         INSERT INTO tcp_mgm (id, connect_timeout, con_lifetime, keepidle, attrs)
             VALUES (9223372036854775807, -9223372036854775808, 0, -1, 'it''s \"quoted\" {backslash} é ✓');
         INSERT INTO tcp_mgm (id, attrs, remote_addr) VALUES (-7, '{}', 'line
break');",
        values.join(", "),
        "x".repeat(20_000)
    );
    let db = TestDb::new(backend, TableVersion::V2, &sql).await;
    let (fast, slow) = both_reads(&db.url).await;
    assert_eq!(slow.len(), 5002);
    // SQLite's JSON beats its rows through the driver; PostgreSQL's and MariaDB's do not, and
    // their tables are read row by row.
    let fast = match (backend, fast) {
        (Backend::Sqlite, Some(fast)) => fast,
        (Backend::Sqlite, None) => panic!("the fast read declined a table of integers and text"),
        (_, Some(_)) => panic!("a fast read on {backend:?}"),
        (_, None) => slow.clone(),
    };
    assert!(fast == slow, "the reads differ");
    let cell = |row: &tcpmgm::policy::rule::Row, column| row.get(column).cloned();
    use tcpmgm::policy::rule::Cell;
    assert_eq!(cell(&fast[0], "id"), Some(Cell::Int(-7)));
    assert_eq!(cell(&fast[2048], "id"), Some(Cell::Int(2048)));
    assert_eq!(
        cell(&fast[5001], "attrs"),
        Some(Cell::Text("it's \"quoted\" \\ é ✓".into()))
    );
    assert_eq!(
        cell(&fast[5001], "connect_timeout"),
        Some(Cell::Int(i64::MIN))
    );
}
on_every_database!(the_fast_read_gives_what_the_row_by_row_read_gives);

/// Where JSON would not carry a value exactly (a REAL, which SQLite's JSON rounds to 15
/// digits; a BLOB, which it refuses) or at all (text in an integer column reads as text both
/// ways), the fast read declines or agrees: `check` reports every row as the row by row read
/// does.
#[tokio::test]
async fn the_fast_read_declines_what_json_would_change() {
    for (sql, declines) in [
        (
            "INSERT INTO tcp_mgm (id, keepidle) VALUES (1, 'sixty');",
            false,
        ),
        (
            "INSERT INTO tcp_mgm (id, keepidle) VALUES (1, 9223372036854775808);",
            true,
        ),
        ("INSERT INTO tcp_mgm (id, keepidle) VALUES (1, 60.5);", true),
        ("INSERT INTO tcp_mgm (id, attrs) VALUES (1, X'00ff');", true),
    ] {
        let db = TestDb::new(Backend::Sqlite, TableVersion::V1, sql).await;
        let (fast, slow) = both_reads(&db.url).await;
        assert_eq!(fast.is_none(), declines, "{sql}");
        if let Some(fast) = fast {
            assert!(fast == slow, "{sql}");
        }
    }
}

/// PostgreSQL and MariaDB are read through their own drivers: a column of a type tcpmgm has no
/// reading for (NUMERIC, DECIMAL) is a fault of each row with a value there, the type named;
/// the other rows are read (before, sqlx's Any driver refused the whole table).
async fn a_column_of_another_type_is_named_in_its_rows(backend: Backend) {
    let (alter, type_name) = match backend {
        Backend::Postgres => (
            "ALTER TABLE tcp_mgm ALTER COLUMN attrs DROP DEFAULT, \
             ALTER COLUMN attrs TYPE NUMERIC USING NULL;",
            "NUMERIC",
        ),
        _ => (
            "ALTER TABLE tcp_mgm MODIFY attrs DECIMAL(10, 2) NULL;",
            "DECIMAL",
        ),
    };
    let db = TestDb::new(
        backend,
        TableVersion::V1,
        &format!(
            "{alter}
             INSERT INTO tcp_mgm (id, remote_addr, attrs) VALUES (1, '192.0.2.0/24', 60);
             INSERT INTO tcp_mgm (id, remote_addr, attrs) VALUES (2, '192.0.2.9/32', NULL);"
        ),
    )
    .await;
    let (code, out, err) = tcpmgm(&["check", "--db", &db.url]);
    assert_eq!(code, EX_DATAERR, "{out}{err}");
    assert!(
        out.contains("id 1: attrs: an unreadable value")
            && out.contains(&format!("a value of type {type_name}")),
        "{out}{err}"
    );
    assert!(!out.contains("id 2"), "{out}");
}

mod a_column_of_another_type_is_named_in_its_rows {
    use super::*;
    #[tokio::test]
    async fn postgres() {
        a_column_of_another_type_is_named_in_its_rows(Backend::Postgres).await
    }
    #[tokio::test]
    async fn mariadb() {
        a_column_of_another_type_is_named_in_its_rows(Backend::MariaDb).await
    }
}

/// `tcpmgm detach` with a daemon running: the daemon is told, takes the policy off and exits
/// cleanly; the pins go and new connections get the system's settings.
#[tokio::test]
async fn detach_tells_the_running_daemon_to_take_the_policy_off_and_exit() {
    let db = TestDb::new(
        Backend::Sqlite,
        TableVersion::V1,
        "INSERT INTO tcp_mgm (id, remote_addr, keepidle) VALUES (1, '127.0.0.0/8', 44);",
    )
    .await;
    let sb = Sandbox::new();
    let control = control_socket(&sb);
    let mut daemon = Daemon::start(&sb, &db.url, control.clone());
    let mut probe = sb.probe();
    let r = probe.ask("pair 127.0.0.1:7001 127.0.0.1:7001");
    assert_eq!(r.get("client_idle"), 44, "{r:?}");
    let (code, out, err) = tcpmgm(&[
        "detach",
        "--cgroup",
        sb.cgroup.to_str().unwrap(),
        "--pin-dir",
        sb.pin_dir.to_str().unwrap(),
        "--control",
        control.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("detached from"), "{out}");
    let status = daemon
        .wait_exit(std::time::Duration::from_secs(10))
        .expect("the daemon exits once told to detach");
    assert!(status.success(), "{status}");
    assert!(
        !sb.attached_programs().contains("tcpmgm"),
        "{}",
        sb.attached_programs()
    );
    assert!(!sb.pin_dir.exists());
    assert!(!control.exists(), "the control socket stays behind");
    let r = probe.ask("pair 127.0.0.1:7002 127.0.0.1:7002");
    assert_eq!(r.keepalive("client"), (0, 7200, 75, 9), "{r:?}");
}

on_every_database!(db_init_makes_a_named_table_with_the_example_rules);
/// `db init --table NAME --examples`: the table under the module's db_table name, with the
/// example rules, which `check` then reads as valid rules.
async fn db_init_makes_a_named_table_with_the_example_rules(backend: Backend) {
    let db = TestDb::new(backend, TableVersion::V1, "").await;
    let init = |examples: bool| {
        let mut args = vec!["db", "init", "--db", &db.url, "--table", "carrier_rules"];
        if examples {
            args.push("--examples");
        }
        tcpmgm(&args)
    };
    let (code, out, err) = init(true);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("created table carrier_rules") && out.contains("inserted the example rules"),
        "{out}"
    );
    let (code, _, err) = tcpmgm(&["check", "--db", &db.url, "--table", "carrier_rules"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("4 rules valid, 0 rows bad"), "{err}");
    // Again: the table is kept as it is.
    let (code, out, err) = init(false);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("table carrier_rules already exists"), "{out}");
    let (_, _, err) = tcpmgm(&["check", "--db", &db.url, "--table", "carrier_rules"]);
    assert!(err.contains("4 rules valid, 0 rows bad"), "{err}");
}

/// `--sockets-from`: the listeners of an opensips.cfg's socket= lines (comments of both kinds
/// left out) give an accepted connection its protocol, as the kernel finds it.
#[tokio::test]
async fn sockets_from_reads_the_listeners_of_a_file() {
    let db = TestDb::new(
        Backend::Sqlite,
        TableVersion::V1,
        "INSERT INTO tcp_mgm (id, proto, remote_addr, keepidle) VALUES (1, 'tls', '192.0.2.0/24', 21);
         INSERT INTO tcp_mgm (id, proto, remote_addr, keepidle) VALUES (2, 'tcp', '192.0.2.0/24', 22);",
    )
    .await;
    let scratch = Scratch::new("sockets-from");
    let cfg = scratch.write(
        "opensips.cfg",
        // A listener commented out with its tag (a block comment too) is not one: the tag
        // would be declared twice.
        "socket = tls:127.0.0.1:5061 tag edge\n# socket = tcp:127.0.0.1:5061 tag edge\n/* socket = tcp:127.0.0.1:5062 tag edge */\nsocket=tcp:127.0.0.1:5060\n",
    );
    let ask = |local: &str| {
        tcpmgm(&[
            "match",
            "--db",
            &db.url,
            "--sockets-from",
            &cfg,
            "--remote",
            "192.0.2.9:40000",
            "--local",
            local,
            "--direction",
            "in",
        ])
    };
    let (code, out, err) = ask("127.0.0.1:5061");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("rule 1:"), "the tls listener: {out}");
    let (code, out, err) = ask("127.0.0.1:5060");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("rule 2:"), "the tcp listener: {out}");
}
