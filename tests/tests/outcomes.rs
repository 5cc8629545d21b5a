//! How connections end, per rule: each outcome caused for real (a peer that resets, a peer that
//! goes silent, a blackholed handshake, a con_lifetime close, ...) between a client in the
//! sandbox's cgroup and a peer in a namespace of its own, then read back from `tcpmgm status
//! --json` and from the metrics endpoint.
//!
//! `tcpmgm events` follows the same: every decision, refusal and end comes as an event (or is
//! counted as dropped), and its filters select by rule and kind.
//!
//! Where the kernel does not let tcpmgm tell a reset, an abort on this host and unanswered
//! keepalive probes apart (no outcome tracers: Linux before 5.11, or a kernel that refuses
//! fentry programs), the test checks that tcpmgm says so (its log and `tcpmgm features`) and
//! counts those three as `aborted`. `TCPMGM_TEST_EXPECT_TRACERS=1` (the test VM's 6.1 and 6.12
//! guests) makes a missing tracer a failure.
use std::process::Command;
use std::time::{Duration, Instant};

use tcpmgm::policy::source::TableVersion;
use tcpmgm_tests::{
    Backend, Daemon, Probe, Sandbox, Spawned, TestDb, binary, control_socket, two_hosts,
};

const ETIMEDOUT: i64 = 110;
const ECONNREFUSED: i64 = 111;
const EPERM: i64 = 1;

/// The rules: one a way to end, all for the peer 192.0.2.2 (or the silent 192.0.2.3).
const TABLE: &str = "
    INSERT INTO tcp_mgm (id, remote_addr, remote_port) VALUES (51, '192.0.2.2', 7151);
    INSERT INTO tcp_mgm (id, remote_addr, remote_port) VALUES (52, '192.0.2.2', 7152);
    INSERT INTO tcp_mgm (id, remote_addr, remote_port) VALUES (53, '192.0.2.2', 7153);
    INSERT INTO tcp_mgm (id, remote_addr, remote_port, connect_timeout)
        VALUES (54, '192.0.2.3', 7154, 300);
    INSERT INTO tcp_mgm (id, remote_addr, remote_port, con_lifetime)
        VALUES (55, '192.0.2.2', 7155, 1);
    INSERT INTO tcp_mgm (id, remote_addr, remote_port, no_new_conn)
        VALUES (56, '192.0.2.2', 7156, 1);
    INSERT INTO tcp_mgm (id, remote_addr, remote_port, keepalive, keepidle, keepinterval, keepcount)
        VALUES (57, '192.0.2.2', 7157, 1, 1, 1, 2);
    INSERT INTO tcp_mgm (id, remote_addr, remote_port) VALUES (58, '192.0.2.2', 7158);
    INSERT INTO tcp_mgm (id, remote_addr, remote_port) VALUES (59, '192.0.2.2', 7159);";

/// `tcpmgm status --json`'s entry for rule `id`.
fn rule(status: &serde_json::Value, id: u64) -> serde_json::Value {
    status[0]["kernel"]["rules"]
        .as_array()
        .expect("the kernel's rules")
        .iter()
        .find(|r| r["id"] == id)
        .unwrap_or_else(|| panic!("no rule {id} in {status:#}"))
        .clone()
}

/// The outcomes counted for a rule, non-zero ones only, sorted by name.
fn ended(status: &serde_json::Value, id: u64) -> Vec<(String, u64)> {
    let r = rule(status, id);
    let mut out: Vec<(String, u64)> = r["ended"]
        .as_object()
        .expect("ended")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().expect("a count")))
        .filter(|(_, n)| *n > 0)
        .collect();
    out.sort();
    out
}

fn one(outcome: &str) -> Vec<(String, u64)> {
    vec![(outcome.to_owned(), 1)]
}

/// A `tcpmgm events ARGS` client of the daemon at `control`, its output in files; returned once
/// it says it follows the stream.
fn follow(control: &std::path::Path, name: &str, args: &[&str]) -> (Spawned, std::path::PathBuf) {
    let out = std::env::temp_dir().join(format!("tcpmgm-events-{}-{name}", std::process::id()));
    let err = out.with_extension("err");
    let child = Command::new(binary("tcpmgm"))
        .arg("events")
        .arg("--control")
        .arg(control)
        .args(args)
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("tcpmgm events");
    let client = Spawned(child);
    let started = Instant::now();
    while !std::fs::read_to_string(&err)
        .unwrap_or_default()
        .contains("following the events")
    {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "tcpmgm events did not start: {}",
            std::fs::read_to_string(&err).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (client, out)
}

#[tokio::test]
async fn each_way_a_connection_ends_is_counted_for_its_rule() {
    let db = TestDb::new(Backend::Sqlite, TableVersion::V1, TABLE).await;
    let sb = Sandbox::new();
    let (b, dev) = two_hosts(&sb);
    let control = control_socket(&sb);
    let daemon = Daemon::start_with(
        &sb,
        &db.url,
        control.clone(),
        &["--netns", &sb.netns.path(), "--metrics", "127.0.0.1:0"],
    );
    let untold = "counted together as \"aborted\"";
    let traced = !daemon.startup_log.contains(untold);
    let features: serde_json::Value = serde_json::from_slice(
        &Command::new(binary("tcpmgm"))
            .args(["features", "--json"])
            .output()
            .expect("tcpmgm features")
            .stdout,
    )
    .expect("features JSON");
    let tracers = features
        .as_array()
        .expect("a list")
        .iter()
        .find(|f| {
            f["name"]
                .as_str()
                .unwrap_or("")
                .starts_with("outcome tracers")
        })
        .unwrap_or_else(|| panic!("features do not mention the outcome tracers: {features:#}"));
    assert_eq!(
        tracers["supported"].as_bool(),
        Some(traced),
        "the daemon's log and `tcpmgm features` disagree: {tracers:#}"
    );
    if std::env::var("TCPMGM_TEST_EXPECT_TRACERS").as_deref() == Ok("1") {
        assert!(
            traced,
            "this kernel should run the outcome tracers: {tracers:#}"
        );
    }
    eprintln!("outcome tracers attached: {traced}");

    let (all, all_out) = follow(&control, "all", &["--json"]);
    let (keepalive_only, keepalive_out) =
        follow(&control, "57", &["--rule", "57", "--kind", "ended"]);
    let (as_text, text_out) = follow(&control, "text", &["--kind", "decided", "--kind", "ended"]);

    let mut peer = Probe::spawn(None, &b.path());
    for port in [7151, 7152, 7153, 7155, 7157, 7158] {
        assert_eq!(
            peer.ask(&format!("serve 192.0.2.2:{port}"))
                .get("listening"),
            1
        );
    }
    let mut c = sb.probe();
    let pair = |c: &mut Probe, peer: &mut Probe, port: u16, user_timeout: &str| {
        let mine = c
            .ask(&format!("dial 192.0.2.2:{port} {user_timeout}"))
            .get("id");
        let theirs = peer.ask(&format!("take 192.0.2.2:{port}")).get("id");
        (mine, theirs)
    };

    // 51: FINs both ways.
    let (mine, theirs) = pair(&mut c, &mut peer, 7151, "");
    c.ask(&format!("close {mine}"));
    peer.ask(&format!("close {theirs}"));
    // 52: the peer resets.
    let (_, theirs) = pair(&mut c, &mut peer, 7152, "");
    peer.ask(&format!("abort {theirs}"));
    // 53: this host resets (SO_LINGER 0).
    let (mine, _) = pair(&mut c, &mut peer, 7153, "");
    c.ask(&format!("abort {mine}"));
    // 54: the handshake meets silence: the 300 ms connect timeout.
    let r = c.ask("dial 192.0.2.3:7154");
    assert_eq!(r.get("errno"), ETIMEDOUT, "{r:?}");
    // 55: idle past its con_lifetime of 1 s: the daemon closes it.
    let (lifetime, _) = pair(&mut c, &mut peer, 7155, "");
    // 56: no_new_conn.
    let r = c.ask("dial 192.0.2.2:7156");
    assert_eq!(r.get("errno"), EPERM, "{r:?}");
    // 59: nothing listens: refused with a reset.
    let r = c.ask("dial 192.0.2.2:7159");
    assert_eq!(r.get("errno"), ECONNREFUSED, "{r:?}");
    // 57 (keepalive after 1 s idle, 2 probes 1 s apart) and 58 (the application's 1 s
    // TCP_USER_TIMEOUT): the peer falls silent, 58 with data outstanding.
    let (keepalive, _) = pair(&mut c, &mut peer, 7157, "");
    let (timeout, _) = pair(&mut c, &mut peer, 7158, "1000");
    sb.netns.ip(&format!(
        "neigh replace 192.0.2.2 lladdr 02:00:00:00:00:99 dev {dev} nud permanent"
    ));
    assert_eq!(c.ask(&format!("send {timeout}")).get("sent"), 1);

    // Every end counted, or 30 s (keepalive: about 3 s; con_lifetime: 1 to 2 s).
    let status = || sb.status_json(&control);
    let started = Instant::now();
    let mut now = status();
    while [51, 52, 53, 54, 55, 57, 58, 59]
        .iter()
        .any(|&id| ended(&now, id).is_empty())
        && started.elapsed() < Duration::from_secs(30)
    {
        std::thread::sleep(Duration::from_millis(250));
        now = status();
    }
    for (id, conn) in [(55, lifetime), (57, keepalive), (58, timeout)] {
        assert_ne!(
            c.ask(&format!("state {conn}")).get("state"),
            1,
            "rule {id}'s connection is still established"
        );
    }
    let (reset, local, silent) = if traced {
        ("reset", "local_abort", "keepalive")
    } else {
        ("aborted", "aborted", "aborted")
    };
    let expected = [
        (51, one("closed")),
        (52, one(reset)),
        (53, one(local)),
        (54, one("connect_timeout")),
        (55, one("lifetime")),
        (56, vec![]),
        (57, one(silent)),
        (58, one("timeout")),
        (59, one("connect_failed")),
    ];
    // What an operator reads (printed for the failure report).
    let text = sb.status(&control, false);
    eprintln!("{text}");
    assert!(
        text.contains("ended 1: connect_timeout 1"),
        "tcpmgm status does not show rule 54's end: {text}"
    );
    let got: Vec<(u64, Vec<(String, u64)>)> = expected
        .iter()
        .map(|(id, _)| (*id, ended(&now, *id)))
        .collect();
    assert_eq!(got, expected.to_vec(), "{now:#}");
    assert_eq!(rule(&now, 56)["refused"], 1, "{now:#}");

    // Lifetimes: the con_lifetime close came after more than a second, the silent handshake
    // within ten; each rule's histogram holds its one connection.
    let lived = |id: u64| -> Vec<(u64, u64)> {
        serde_json::from_value(rule(&now, id)["lived_at_most_s"].clone()).expect("buckets")
    };
    assert_eq!(
        lived(55)[0],
        (1, 0),
        "rule 55 lived under 1 s: {:?}",
        lived(55)
    );
    assert_eq!(lived(55)[1], (10, 1), "{:?}", lived(55));
    assert_eq!(lived(54)[1], (10, 1), "{:?}", lived(54));
    assert!(
        rule(&now, 55)["lived_ms"].as_u64().unwrap() >= 1000,
        "{now:#}"
    );

    // The metrics say the same, non-zero series only.
    let addr = daemon.metrics_addr();
    let metrics = tcpmgm_tests::scrape(addr);
    let cg = sb.cgroup.display();
    let series = |id: u64, outcome: &str| {
        format!(
            "tcpmgm_rule_connections_ended_total{{cgroup=\"{cg}\",outcome=\"{outcome}\",rule_id=\"{id}\"}}"
        )
    };
    assert_eq!(
        tcpmgm_tests::sample(&metrics, &series(57, silent)),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        tcpmgm_tests::sample(&metrics, &series(57, "closed")),
        None,
        "{metrics}"
    );
    let count =
        format!("tcpmgm_rule_connection_lifetime_seconds_count{{cgroup=\"{cg}\",rule_id=\"55\"}}");
    assert_eq!(
        tcpmgm_tests::sample(&metrics, &count),
        Some(1.0),
        "{metrics}"
    );
    let bucket = format!(
        "tcpmgm_rule_connection_lifetime_seconds_bucket{{cgroup=\"{cg}\",rule_id=\"55\",le=\"10\"}}"
    );
    assert_eq!(
        tcpmgm_tests::sample(&metrics, &bucket),
        Some(1.0),
        "{metrics}"
    );

    // The event stream: a storm of refused connects first, so that some events are over the
    // programs' budget; then every decision, refusal and end the counters hold is an event
    // line or counted as dropped (or lagged), none lost without a word.
    const STORM: i64 = 3000;
    let r = c.ask(&format!("storm 192.0.2.2:7156 {STORM}"));
    assert_eq!(r.get("refused"), STORM, "{r:?}");
    let now = sb.status_json(&control);
    let rules = now[0]["kernel"]["rules"].as_array().expect("rules").clone();
    let sum = |key: &str| -> u64 { rules.iter().map(|r| r[key].as_u64().unwrap_or(0)).sum() };
    let ends: u64 = rules
        .iter()
        .map(|r| {
            r["ended"]
                .as_object()
                .unwrap()
                .values()
                .map(|v| v.as_u64().unwrap())
                .sum::<u64>()
        })
        .sum();
    let expected = sum("matched") + sum("refused") + ends;
    let lines = |path: &std::path::Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    };
    let started = Instant::now();
    let accounted = |events: &[serde_json::Value]| -> u64 {
        events
            .iter()
            .map(|e| match e["kind"].as_str() {
                Some("dropped" | "lagged") => e["count"].as_u64().unwrap(),
                _ => 1,
            })
            .sum()
    };
    // The daemon reports drops once a second.
    while accounted(&lines(&all_out)) < expected && started.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(all);
    drop(keepalive_only);
    drop(as_text);
    // What an operator reads (printed for the failure report).
    eprintln!("{}", std::fs::read_to_string(&text_out).unwrap_or_default());
    let _ = std::fs::remove_file(&text_out);
    let events = lines(&all_out);
    let notices: u64 = events
        .iter()
        .filter(|e| e["kind"] == "dropped" || e["kind"] == "lagged")
        .map(|e| e["count"].as_u64().unwrap())
        .sum();
    eprintln!(
        "{} event lines, {notices} events dropped or lagged, {expected} counted by the kernel",
        events.len()
    );
    assert_eq!(
        accounted(&events),
        expected,
        "events (and drops) against the counters: {} decided + refused + ended",
        expected
    );
    // How many go over the budget depends on the machine's speed: the account above holds
    // either way.
    if notices == 0 {
        eprintln!(
            "the storm stayed within {} events a CPU a second: nothing dropped",
            tcpmgm_common::EVENTS_PER_SECOND
        );
    }
    let find = |kind: &str, rule: u64| {
        events
            .iter()
            .find(|e| e["kind"] == kind && e["rule"] == rule)
            .unwrap_or_else(|| panic!("no {kind} event of rule {rule}"))
            .clone()
    };
    let decided = find("decided", 51);
    assert_eq!(
        (decided["direction"].as_str(), decided["remote"].as_str()),
        (Some("out"), Some("192.0.2.2:7151"))
    );
    assert_eq!(find("refused", 56)["remote"], "192.0.2.2:7156");
    for (id, outcome) in [
        (51, "closed"),
        (52, reset),
        (53, local),
        (54, "connect_timeout"),
        (55, "lifetime"),
        (57, silent),
        (58, "timeout"),
        (59, "connect_failed"),
    ] {
        let e = find("ended", id);
        assert_eq!(e["outcome"], outcome, "rule {id}: {e}");
        assert_eq!(e["direction"], "out", "rule {id}: {e}");
    }
    assert!(find("ended", 55)["lived_ms"].as_u64().unwrap() >= 1000);
    // The filtered client saw rule 57's end and nothing else of the stream but notices.
    let text = std::fs::read_to_string(&keepalive_out).unwrap();
    let shown: Vec<&str> = text.lines().filter(|l| !l.contains(" dropped ")).collect();
    assert_eq!(shown.len(), 1, "{text}");
    assert!(
        shown[0].contains(" ended ") && shown[0].contains("rule 57 ") && shown[0].contains(silent),
        "{text}"
    );
    let _ = std::fs::remove_file(&all_out);
    let _ = std::fs::remove_file(&keepalive_out);
}
