//! The profile wins over the application's own options, touches only what it is meant for, can
//! be tried first (audit mode), and is counted (`status`, Prometheus).
use std::process::Command;
use std::time::Duration;

use tcpmgm::policy::compile::Enforcement;
use tcpmgm::policy::listener::Listeners;
use tcpmgm::policy::source::TableVersion;
use tcpmgm_tests::{
    Backend, Daemon, Probe, Sandbox, Scratch, TestDb, assert_samples, row, rules, sample, scrape,
    ss, two_hosts,
};

/// 127.0.0.2 is kept without keepalive; 127.0.0.3 gets keepalive 41 s / 13 s / 5.
fn table() -> Vec<tcpmgm::policy::rule::Row> {
    vec![
        row(1, &[("remote_addr", "127.0.0.2"), ("keepalive", "0")]),
        row(
            2,
            &[
                ("remote_addr", "127.0.0.3"),
                ("keepalive", "1"),
                ("keepidle", "41"),
                ("keepinterval", "13"),
                ("keepcount", "5"),
            ],
        ),
    ]
}

/// Both ends of a held pair on `addr` (the client bound to it too, so that the accepted side
/// meets the same rule), after the application set SO_KEEPALIVE 1 and TCP_KEEPIDLE 600 on each.
fn app_sets_its_own(probe: &mut Probe, addr: &str, port: u16) -> tcpmgm_tests::Reply {
    let id = probe
        .ask(&format!("hold-pair {addr}:{port} {addr}:{port} {addr}:0"))
        .get("id");
    probe.ask(&format!("app-opts {id} 1 600"))
}

/// The keepalive timer `ss` shows for the connection on `port`, in seconds (None: no timer).
fn keepalive_timer(sb: &Sandbox, port: u16) -> Vec<Option<u64>> {
    ss(sb, port)
        .lines()
        .skip(1)
        .map(|l| {
            let timer = l.split("timer:(keepalive,").nth(1)?;
            let spec = timer.split(',').next()?;
            let (min, sec) = match spec.split_once("min") {
                Some((m, rest)) => (m.parse::<u64>().ok()?, rest),
                None => (0, spec),
            };
            Some(min * 60 + sec.trim_end_matches("sec").parse::<u64>().unwrap_or(0))
        })
        .collect()
}

#[test]
fn the_rule_wins_over_the_applications_own_keepalive_settings() {
    let sb = Sandbox::new();
    let none = Listeners::default();
    let _e = sb.enforce(rules(&table(), &none), &none);
    let mut probe = sb.probe();

    let off = app_sets_its_own(&mut probe, "127.0.0.2", 7001);
    assert_eq!(
        (off.get("client_keepalive"), off.get("server_keepalive")),
        (0, 0),
        "{off:?}"
    );
    let on = app_sets_its_own(&mut probe, "127.0.0.3", 7002);
    for side in ["client", "server"] {
        assert_eq!(on.keepalive(side), (1, 41, 13, 5), "{side}: {on:?}");
    }
    assert_eq!(keepalive_timer(&sb, 7001), vec![None, None]);
    let timers = keepalive_timer(&sb, 7002);
    assert!(
        timers.len() == 2 && timers.iter().all(|t| t.is_some_and(|s| s <= 41)),
        "{timers:?}: {}",
        ss(&sb, 7002)
    );

    // Each call that would have changed an option the rule sets is counted for the rule:
    // SO_KEEPALIVE on both ends of rule 1's pair, TCP_KEEPIDLE on both ends of rule 2's.
    let pinned = tcpmgm::kernel::inspect(&sb.pin_dir).unwrap();
    let prevented = |id| {
        pinned
            .rules
            .iter()
            .find(|r| r.id == id)
            .map(|r| r.overrides_prevented)
    };
    assert_eq!((prevented(1), prevented(2)), (Some(2), Some(2)));
}

#[test]
fn with_app_options_allow_the_application_wins() {
    let sb = Sandbox::new();
    let none = Listeners::default();
    let allow = Enforcement {
        app_options_allow: true,
        ..Enforcement::default()
    };
    let _e = sb.enforce_with(rules(&table(), &none), &none, allow);
    let mut probe = sb.probe();
    let off = app_sets_its_own(&mut probe, "127.0.0.2", 7001);
    let on = app_sets_its_own(&mut probe, "127.0.0.3", 7002);
    for (r, port) in [(&off, 7001), (&on, 7002)] {
        for side in ["client", "server"] {
            assert_eq!(
                (
                    r.get(&format!("{side}_keepalive")),
                    r.get(&format!("{side}_idle"))
                ),
                (1, 600),
                "{side}: {r:?}"
            );
        }
        let timers = keepalive_timer(&sb, port);
        assert!(
            timers.iter().all(|t| t.is_some_and(|s| s > 41)),
            "{timers:?}: {}",
            ss(&sb, port)
        );
    }
}

/// `app_options` as operators set it: the config key (changed by a reload) and the flag, which
/// wins over the file.
#[tokio::test]
async fn app_options_follow_the_config_file_across_a_reload_and_the_flag_wins() {
    let db = TestDb::new(
        Backend::Sqlite,
        TableVersion::V1,
        "INSERT INTO tcp_mgm (id, remote_addr, keepidle, keepinterval, keepcount) \
         VALUES (2, '127.0.0.3', 41, 13, 5);",
    )
    .await;
    let sb = Sandbox::new();
    let config =
        std::env::temp_dir().join(format!("tcpmgm-app-options-{}.toml", std::process::id()));
    std::fs::write(&config, "app_options = \"allow\"\n").unwrap();
    let args = ["--config", config.to_str().unwrap()];
    let d = Daemon::start_with(&sb, &db.url, tcpmgm_tests::control_socket(&sb), &args);
    let mut probe = sb.probe();
    let idle =
        |probe: &mut Probe, port| app_sets_its_own(probe, "127.0.0.3", port).get("client_idle");
    assert_eq!(
        idle(&mut probe, 7101),
        600,
        "allow: the application's value"
    );
    std::fs::write(&config, "app_options = \"enforce\"\n").unwrap();
    let (code, out) = d.reload();
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        idle(&mut probe, 7102),
        41,
        "enforce after the reload: the rule's"
    );
    d.kill();
    tcpmgm::kernel::detach_pinned(&sb.pin_dir).unwrap();
    // The file says enforce; the command line says allow, and wins.
    let flag = [
        "--config",
        config.to_str().unwrap(),
        "--app-options",
        "allow",
    ];
    let _d = Daemon::start_with(&sb, &db.url, tcpmgm_tests::control_socket(&sb), &flag);
    assert_eq!(idle(&mut probe, 7103), 600, "--app-options allow");
    let _ = std::fs::remove_file(&config);
}

/// A catch-all rule written for SIP peers, with OpenSIPS's schema default connect_timeout of
/// 100 ms, meets a database connect of the same process to a peer that answers only after
/// 300 ms: by default the connect is left its own time; `tcpmgm run
/// --enforce-default-connect-timeout` cuts it.
#[test]
fn a_catch_all_rules_default_connect_timeout_leaves_other_connects_alone() {
    let sb = Sandbox::new();
    let (b, dev) = two_hosts(&sb);
    let mut database = Probe::spawn(None, &b.path());
    assert!(database.ask("serve 192.0.2.2:5432").has("listening"));
    let none = Listeners::default();
    // Every column at the table's default: any peer, connect_timeout 100 ms.
    let catch_all = rules(&[row(1, &[("keepidle", "30")])], &none);
    assert_eq!(catch_all[0].profile.connect_timeout_ms, 100);

    // The peer is silent for 300 ms, then answers (the SYN retried after it is heard).
    let connect_after_300ms = |p: &mut Probe| {
        sb.netns.ip(&format!(
            "neigh replace 192.0.2.2 lladdr 02:00:00:00:00:99 dev {dev} nud permanent"
        ));
        let heal = {
            let (ns, dev) = (sb.netns.name.clone(), dev.clone());
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                tcpmgm_tests::sh(Command::new("ip").args([
                    "-n",
                    &ns,
                    "neigh",
                    "del",
                    "192.0.2.2",
                    "dev",
                    &dev,
                ]));
            })
        };
        let r = p.ask("connect 192.0.2.2:5432 - 5000");
        heal.join().unwrap();
        r
    };

    let e = sb.enforce(catch_all.clone(), &none);
    let mut p = sb.probe();
    let r = connect_after_300ms(&mut p);
    assert!(
        !r.has("errno") && !r.has("pending") && r.get("ms") >= 300,
        "{r:?}"
    );
    assert_eq!(
        r.get("client_idle"),
        30,
        "the rule's keepalive applies: {r:?}"
    );
    e.1.detach().unwrap();

    // As operators ask for it: the flag, on the daemon.
    let db = rt().block_on(TestDb::new(
        Backend::Sqlite,
        TableVersion::V1,
        "INSERT INTO tcp_mgm (id, keepidle) VALUES (1, 30);",
    ));
    let _d = Daemon::start_with(
        &sb,
        &db.url,
        tcpmgm_tests::control_socket(&sb),
        &["--enforce-default-connect-timeout"],
    );
    let mut p = sb.probe();
    let r = connect_after_300ms(&mut p);
    assert_eq!(r.get("errno"), libc::ETIMEDOUT as i64, "{r:?}");
}

/// `enforce_default_connect_timeout` as operators set it, in the configuration file: a catch-all
/// rule keeping OpenSIPS's default connect_timeout (100 ms) then bounds a connect to a peer that
/// never answers; with the key off the connect is left the kernel's own SYN retries (over a
/// minute), while the rule's keepalive still applies. The daemon reads the key at its start (a
/// reload re-reads only `audit` and `app_options`): the file is changed across a restart.
#[tokio::test]
async fn the_default_connect_timeout_follows_the_config_file() {
    let db = TestDb::new(
        Backend::Sqlite,
        TableVersion::V1,
        "INSERT INTO tcp_mgm (id, keepidle) VALUES (1, 30);",
    )
    .await;
    let sb = Sandbox::new();
    // 192.0.2.3: its SYNs vanish.
    let (_b, _dev) = two_hosts(&sb);
    let scratch = Scratch::new("default-connect-timeout");
    let config = scratch.write("tcpmgm.toml", "enforce_default_connect_timeout = true\n");
    let args = ["--config", config.as_str()];
    let d = Daemon::start_with(&sb, &db.url, tcpmgm_tests::control_socket(&sb), &args);
    let mut probe = sb.probe();
    // Bounded: ETIMEDOUT soon after the rule's 100 ms. Unbounded, the kernel would not give up
    // for over a minute (its first SYN retry alone comes after 1 s); the margin is for a slow
    // emulated guest.
    let r = probe.ask("connect 192.0.2.3:5060 - 10000");
    assert_eq!(r.get("errno"), libc::ETIMEDOUT as i64, "{r:?}");
    assert!(r.get("ms") < 5000, "{r:?}");
    d.kill();
    tcpmgm::kernel::detach_pinned(&sb.pin_dir).unwrap();

    std::fs::write(&config, "enforce_default_connect_timeout = false\n").unwrap();
    let _d = Daemon::start_with(&sb, &db.url, tcpmgm_tests::control_socket(&sb), &args);
    let mut probe = sb.probe();
    // Thirty times the rule's connect_timeout, and the connect is still trying.
    let r = probe.ask("connect 192.0.2.3:5061 - 3000");
    assert!(r.has("pending"), "bounded with the key off: {r:?}");
    let r = probe.ask("pair 127.0.0.1:7301 127.0.0.1:7301");
    assert_eq!(r.get("client_idle"), 30, "the rule applies: {r:?}");
}

/// Listeners from a file of OpenSIPS `socket=` lines, given to the daemon by `--sockets-from`
/// and by the `sockets_from` key of its configuration file: a rule on the file's tagged tls
/// listener (`local_addr` names its tag) and a rule on the protocol of its tcp listener apply to
/// both ends of connections accepted on those listeners and made from their addresses; a
/// connection on an address the file does not declare gets neither.
#[tokio::test]
async fn sockets_from_gives_the_daemon_its_listeners_by_flag_and_by_config_key() {
    let db = TestDb::new(
        Backend::Sqlite,
        TableVersion::V1,
        "INSERT INTO tcp_mgm (id, proto, local_addr, keepalive, keepidle, keepinterval, keepcount)
           VALUES (1, 'tls', 'trunks', 1, 41, 13, 5);
         INSERT INTO tcp_mgm (id, proto, keepalive, keepidle, keepinterval, keepcount)
           VALUES (2, 'tcp', 1, 42, 14, 6);",
    )
    .await;
    let sb = Sandbox::new();
    let scratch = Scratch::new("sockets-from-run");
    let sockets = scratch.write(
        "opensips.cfg",
        "socket = udp:127.0.0.5:5060\n\
         socket = tcp:127.0.0.5:5060\n\
         socket = tls:127.0.0.4:5061 tag trunks\n",
    );
    let config = scratch.write("tcpmgm.toml", &format!("sockets_from = [\"{sockets}\"]\n"));
    let mut probe = sb.probe();
    // Each pair's client is bound to the server's address, so that both ends meet the listener.
    // (The probe keeps its listeners: the second daemon's pairs are accepted on the same ones.)
    let mut check = |how: &str| {
        let tls = probe.ask("pair 127.0.0.4:5061 127.0.0.4:5061 127.0.0.4:0");
        let tcp = probe.ask("pair 127.0.0.5:5060 127.0.0.5:5060 127.0.0.5:0");
        let elsewhere = probe.ask("pair 127.0.0.6:7400 127.0.0.6:7400 127.0.0.6:0");
        for side in ["client", "server"] {
            assert_eq!(
                tls.keepalive(side),
                (1, 41, 13, 5),
                "{how}: tls {side}: {tls:?}"
            );
            assert_eq!(
                tcp.keepalive(side),
                (1, 42, 14, 6),
                "{how}: tcp {side}: {tcp:?}"
            );
            assert_eq!(
                elsewhere.keepalive(side),
                (0, 7200, 75, 9),
                "{how}: no listener, {side}: {elsewhere:?}"
            );
        }
    };

    let flag = ["--sockets-from", sockets.as_str()];
    let d = Daemon::start_with(&sb, &db.url, tcpmgm_tests::control_socket(&sb), &flag);
    check("--sockets-from");
    d.kill();
    tcpmgm::kernel::detach_pinned(&sb.pin_dir).unwrap();

    let key = ["--config", config.as_str()];
    let _d = Daemon::start_with(&sb, &db.url, tcpmgm_tests::control_socket(&sb), &key);
    check("sockets_from in the config file");
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

/// Audit mode decides as enforcement does but refuses and sets nothing; the daemon's status and
/// its Prometheus endpoint count what it would have done. Switching to enforcement is a reload.
#[tokio::test]
async fn audit_mode_counts_what_it_would_refuse_and_a_reload_switches_to_enforcement() {
    let db = TestDb::new(
        Backend::Sqlite,
        TableVersion::V1,
        "INSERT INTO tcp_mgm (id, remote_addr, no_new_conn, keepidle) VALUES (1, '127.0.0.3', 1, 41);
         INSERT INTO tcp_mgm (id, remote_addr, no_new_conn, keepidle) VALUES (2, '::1', 1, 42);",
    )
    .await;
    let sb = Sandbox::new();
    let config = std::env::temp_dir().join(format!("tcpmgm-audit-{}.toml", std::process::id()));
    std::fs::write(&config, "audit = true\n").unwrap();
    let d = Daemon::start_with(
        &sb,
        &db.url,
        tcpmgm_tests::control_socket(&sb),
        &[
            "--config",
            config.to_str().unwrap(),
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    let metrics = d.metrics_addr();
    let mut probe = sb.probe();
    let r = probe.ask("pair 127.0.0.3:7001 127.0.0.3:7001");
    assert!(!r.has("errno"), "audit mode refused: {r:?}");
    assert_eq!(
        r.keepalive("client"),
        (0, 7200, 75, 9),
        "audit mode set options: {r:?}"
    );
    // The same over IPv6.
    let r6 = probe.ask("pair [::1]:7011 [::1]:7011");
    assert!(!r6.has("errno"), "audit mode refused over IPv6: {r6:?}");
    assert_eq!(r6.keepalive("client"), (0, 7200, 75, 9), "{r6:?}");
    let status = d.status(&sb);
    assert_eq!(status["state"]["audit"], true, "{status:#}");
    for id in [1, 2] {
        let rules = status["kernel"]["rules"].as_array().unwrap();
        let rule = rules.iter().find(|r| r["id"] == id).unwrap();
        assert_eq!(
            (&rule["would_refuse"], &rule["refused"]),
            (&1.into(), &0.into()),
            "rule {id}: {status:#}"
        );
    }
    let series = |name: &str| {
        format!(
            "tcpmgm_{name}{{cgroup=\"{}\",rule_id=\"1\"}}",
            sb.cgroup.display()
        )
    };
    let text = scrape(metrics);
    assert_samples(
        &text,
        &[
            (series("rule_connects_would_refuse_total"), 1.0),
            (
                format!("tcpmgm_audit_mode{{cgroup=\"{}\"}}", sb.cgroup.display()),
                1.0,
            ),
        ],
    );
    // Nothing refused: a counter at zero has no series (`--metrics-rules nonzero`).
    assert_eq!(
        sample(&text, &series("rule_connects_refused_total")),
        None,
        "{text}"
    );
    assert!(tcpmgm_tests::wait_logged(
        &d,
        "would be refused (audit mode) by rule 1",
        Duration::from_secs(10)
    ));

    std::fs::write(&config, "audit = false\n").unwrap();
    let (code, out) = d.reload();
    assert_eq!(code, 0, "{out}");
    let r = probe.ask("pair 127.0.0.3:7002 127.0.0.3:7002");
    assert_eq!(r.get("errno"), libc::EPERM as i64, "{r:?}");
    assert_samples(
        &scrape(metrics),
        &[
            (series("rule_connects_refused_total"), 1.0),
            (series("rule_connects_would_refuse_total"), 1.0),
        ],
    );
    let _ = std::fs::remove_file(&config);
}

/// The endpoint passes Prometheus's own linter, and a rule's counters there follow the
/// connections made.
#[tokio::test]
async fn the_metrics_endpoint_passes_promtool_and_counts_connections() {
    let db = TestDb::new(
        Backend::Sqlite,
        TableVersion::V1,
        "INSERT INTO tcp_mgm (id, remote_addr, keepidle) VALUES (7, '127.0.0.0/8', 41);
         INSERT INTO tcp_mgm (id, remote_addr, no_new_conn) VALUES (8, '127.0.0.9', 1);",
    )
    .await;
    let sb = Sandbox::new();
    let d = Daemon::start_with(
        &sb,
        &db.url,
        tcpmgm_tests::control_socket(&sb),
        &["--metrics", "127.0.0.1:0"],
    );
    let metrics = d.metrics_addr();
    let mut probe = sb.probe();
    for port in 7001..7004 {
        let r = probe.ask(&format!("pair 127.0.0.1:{port} 127.0.0.1:{port}"));
        assert_eq!(r.get("client_idle"), 41, "{r:?}");
    }
    assert_eq!(
        probe.ask("pair 127.0.0.9:7010 127.0.0.9:7010").get("errno"),
        1
    );
    let cgroup = sb.cgroup.display();
    let series = |name: &str, labels: &str| format!("tcpmgm_{name}{{cgroup=\"{cgroup}\"{labels}}}");
    let matched_7 = series("rule_sockets_matched_total", ",rule_id=\"7\"");
    // Three pairs, both ends: six sockets for rule 7; one refused connect for rule 8.
    assert_samples(
        &scrape(metrics),
        &[
            (matched_7.clone(), 6.0),
            (series("rule_connects_refused_total", ",rule_id=\"8\""), 1.0),
            (series("rules", ""), 2.0),
            (series("policy_attached", ""), 1.0),
        ],
    );
    let (code, out) = d.reload();
    assert_eq!(code, 0, "{out}");
    let text = scrape(metrics);
    // A reload does not reset the counters.
    assert_samples(
        &text,
        &[
            (series("reloads_total", ",result=\"ok\""), 1.0),
            (matched_7.clone(), 6.0),
        ],
    );
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; cargo xtask test installs it)");
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // What this build is (as --version says it), and whether the last reload succeeded.
    let (version, rest) = tcpmgm::VERSION.split_once(" (commit ").unwrap();
    let (commit, ebpf) = rest.trim_end_matches(')').split_once(", eBPF ").unwrap();
    let build = format!(
        "tcpmgm_build_info{{commit=\"{commit}\",ebpf_sha256=\"{ebpf}\",version=\"{version}\"}}"
    );
    assert_samples(&text, &[(build, 1.0)]);
    assert_samples(&text, &[(series("last_reload_success", ""), 1.0)]);
    // Which rule a rule_id is, as the table says.
    let info_7 = format!(
        "tcpmgm_rule_info{{cgroup=\"{cgroup}\",local=\"any\",priority=\"0\",proto=\"any\",\
         remote=\"127.0.0.0/8\",rule_id=\"7\"}}"
    );
    let info_8 = format!(
        "tcpmgm_rule_info{{cgroup=\"{cgroup}\",local=\"any\",priority=\"0\",proto=\"any\",\
         remote=\"127.0.0.9/32\",rule_id=\"8\"}}"
    );
    assert_samples(&text, &[(info_7.clone(), 1.0), (info_8, 1.0)]);
    // By default a rule's counter shows once it counted something: rule 7 refused nothing.
    let refused_7 = series("rule_connects_refused_total", ",rule_id=\"7\"");
    assert_eq!(sample(&text, &refused_7), None, "{text}");
    // A reload that fails (a bad row) says so; the rule set in force stays.
    db.sql("UPDATE tcp_mgm SET keepidle = -5 WHERE id = 7;")
        .await;
    let (code, out) = d.reload();
    assert_ne!(code, 0, "{out}");
    let text = scrape(metrics);
    assert_samples(
        &text,
        &[
            (series("last_reload_success", ""), 0.0),
            (series("reloads_total", ",result=\"failed\""), 1.0),
            (series("rules", ""), 2.0),
        ],
    );
    db.sql("UPDATE tcp_mgm SET keepidle = 41 WHERE id = 7;")
        .await;
    d.kill();
    // Every counter of every rule, zeros included; then none at all.
    for (rules, refused) in [("all", Some(0.0)), ("none", None)] {
        let d = Daemon::start_with(
            &sb,
            &db.url,
            tcpmgm_tests::control_socket(&sb),
            &["--metrics", "127.0.0.1:0", "--metrics-rules", rules],
        );
        let text = scrape(d.metrics_addr());
        assert_eq!(sample(&text, &refused_7), refused, "{rules}:\n{text}");
        for series in [&matched_7, &info_7] {
            assert_eq!(
                sample(&text, series).is_some(),
                rules == "all",
                "{series} with {rules}:\n{text}"
            );
        }
        d.kill();
    }
}
