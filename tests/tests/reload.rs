//! Reloads: through the daemon (control socket and SIGHUP), failed reloads that must change
//! nothing, and reloads under a stream of new connections.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tcpmgm::policy::compile::compile;
use tcpmgm::policy::listener::Listeners;
use tcpmgm::policy::source::{Source, TableVersion};
use tcpmgm::system;
use tcpmgm_tests::{Daemon, Sandbox, assert_one_program_per_hook, row, rules};

async fn sql(url: &str, statements: &str) {
    Source::open(url, false)
        .await
        .unwrap()
        .execute_script(statements)
        .await
        .unwrap();
}

#[tokio::test]
async fn reload_switches_atomically_and_a_failed_reload_changes_nothing() {
    let sb = Sandbox::new();
    let dir = std::env::temp_dir().join(format!("tcpmgm-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let db_path = dir.join("rules.db");
    let url = format!("sqlite://{}", db_path.display());
    let source = Source::open(&url, true).await.unwrap();
    source.init(TableVersion::V1).await.unwrap();
    source
        .execute_script(
            "INSERT INTO tcp_mgm (id, remote_addr, keepidle) VALUES (1, '127.0.0.0/8', 61);",
        )
        .await
        .unwrap();
    drop(source);
    let daemon = Daemon::start(&sb, &url, dir.join("control.sock"));
    let mut probe = sb.probe();
    let idle = |probe: &mut tcpmgm_tests::Probe, port: u16| {
        let r = probe.ask(&format!("pair 127.0.0.1:{port} 127.0.0.1:{port}"));
        (r.get("client_idle"), r.get("server_idle"))
    };
    assert_eq!(idle(&mut probe, 7001), (61, 61));

    sql(&url, "UPDATE tcp_mgm SET keepidle = 62 WHERE id = 1;").await;
    let (code, text) = daemon.reload();
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("reloaded: generation 2: 1 rules enforced"),
        "{text}"
    );
    assert_eq!(idle(&mut probe, 7002), (62, 62));
    let programs = sb.attached_programs();
    assert_one_program_per_hook(&programs);

    // A bad row: the reload fails, says why, and the kernel keeps the previous rules.
    sql(&url, "UPDATE tcp_mgm SET keepidle = 63 WHERE id = 1; INSERT INTO tcp_mgm (id, remote_port) VALUES (2, 70000);").await;
    let (code, text) = daemon.reload();
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("id 2: remote_port: 70000 is not a port")
            && text.contains("previous policy stays"),
        "{text}"
    );
    assert_eq!(idle(&mut probe, 7003), (62, 62));

    // The database gone: the same.
    std::fs::remove_file(&db_path).unwrap();
    let (code, text) = daemon.reload();
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("rules.db"), "{text}");
    assert_eq!(idle(&mut probe, 7004), (62, 62));

    // A good table again, by SIGHUP.
    let source = Source::open(&url, true).await.unwrap();
    source.init(TableVersion::V1).await.unwrap();
    source
        .execute_script(
            "INSERT INTO tcp_mgm (id, remote_addr, keepidle) VALUES (1, '127.0.0.0/8', 64);",
        )
        .await
        .unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    // That the reload happens, not how fast: the bound only stops a test that would never end.
    let limit = std::time::Duration::from_secs(60);
    let asked = std::time::Instant::now();
    let mut seen = (0, 0);
    let mut port = 7010;
    while asked.elapsed() < limit {
        port += 1;
        seen = idle(&mut probe, port);
        if seen == (64, 64) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(seen, (64, 64), "SIGHUP did not reload within {limit:?}");
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two rule sets differing in every keepalive value, and in whether 127.0.0.2 may be dialled (A
/// refuses it). Connections keep coming while the kernel is switched between them 100 times:
/// every socket must carry exactly one of the two profiles, and a connection to 127.0.0.2 must be
/// refused (A) or carry B's profile: one with A's profile would have been let through by one
/// generation at connect() and given its profile by the other.
#[test]
fn reload_under_churn_never_mixes_profiles() {
    const A: (i64, i64, i64, i64) = (1, 101, 11, 3);
    const B: (i64, i64, i64, i64) = (1, 202, 22, 5);
    let sb = Sandbox::new();
    let none = Listeners::default();
    let hz = system::kernel_hz().unwrap();
    let set = |(_, idle, intvl, cnt): (i64, i64, i64, i64), refuse: bool| {
        let (idle, intvl, cnt) = (idle.to_string(), intvl.to_string(), cnt.to_string());
        let profile = [
            ("keepidle", idle.as_str()),
            ("keepinterval", intvl.as_str()),
            ("keepcount", cnt.as_str()),
        ];
        let mut guarded = vec![
            ("remote_addr", "127.0.0.2"),
            ("no_new_conn", if refuse { "1" } else { "0" }),
        ];
        guarded.extend(profile);
        let mut loopback = vec![("remote_addr", "127.0.0.0/8")];
        loopback.extend(profile);
        let table = [row(1, &guarded), row(2, &loopback)];
        compile(rules(&table, &none), &none, hz).unwrap()
    };
    let (a, b) = (set(A, true), set(B, false));
    let (_, mut enforcer) = sb.enforce(a.rules.clone(), &none);

    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let guarded = Arc::new(Mutex::new(Vec::new()));
    let mut probe = sb.probe();
    let worker = {
        let (stop, seen, guarded) = (stop.clone(), seen.clone(), guarded.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let r = probe.ask("pair 127.0.0.1:7000 127.0.0.1:7000");
                seen.lock()
                    .unwrap()
                    .push((r.keepalive("client"), r.keepalive("server")));
                let r = probe.ask("pair 127.0.0.2:7001 127.0.0.2:7001");
                guarded.lock().unwrap().push(if r.has("errno") {
                    Err(r.get("errno"))
                } else {
                    Ok(r.keepalive("client"))
                });
            }
        })
    };
    for i in 0..100 {
        enforcer
            .replace(if i % 2 == 0 { &b } else { &a })
            .expect("reload");
    }
    stop.store(true, Ordering::Relaxed);
    worker.join().unwrap();
    assert_eq!(enforcer.generation(), 101);

    let seen = seen.lock().unwrap();
    let bad: Vec<_> = seen
        .iter()
        .filter(|(c, s)| ![A, B].contains(c) || ![A, B].contains(s))
        .collect();
    assert!(
        bad.is_empty(),
        "{} of {} connections carry neither profile: {:?}",
        bad.len(),
        seen.len(),
        &bad[..bad.len().min(5)]
    );
    let count = |p| seen.iter().filter(|(c, _)| *c == p).count();
    assert!(
        seen.len() >= 200 && count(A) > 0 && count(B) > 0,
        "{} connections, {} A, {} B",
        seen.len(),
        count(A),
        count(B)
    );
    let guarded = guarded.lock().unwrap();
    let mixed: Vec<_> = guarded
        .iter()
        .filter(|g| **g != Err(libc::EPERM.into()) && **g != Ok(B))
        .collect();
    assert!(
        mixed.is_empty(),
        "{} of {} connections to 127.0.0.2 were neither refused (A) nor given B's profile: {:?}",
        mixed.len(),
        guarded.len(),
        &mixed[..mixed.len().min(5)]
    );
    let refused = guarded.iter().filter(|g| g.is_err()).count();
    assert!(
        refused > 0 && refused < guarded.len(),
        "{refused} of {} connections to 127.0.0.2 refused: the run saw only one rule set",
        guarded.len()
    );
    eprintln!(
        "{} connections during 100 reloads: {} A, {} B; to 127.0.0.2: {refused} refused, {} with B",
        seen.len(),
        count(A),
        count(B),
        guarded.len() - refused
    );
}

#[tokio::test]
async fn reapply_existing_reaches_connections_made_before_the_reload() {
    let db = tcpmgm_tests::TestDb::new(
        tcpmgm_tests::Backend::Sqlite,
        TableVersion::V1,
        "INSERT INTO tcp_mgm (id, remote_addr, keepidle) VALUES (1, '127.0.0.0/8', 51);
         INSERT INTO tcp_mgm (id, remote_addr, keepidle) VALUES (2, '::1', 61);",
    )
    .await;
    let (with, without) = (Sandbox::new(), Sandbox::new());
    let dir = std::env::temp_dir().join(format!("tcpmgm-reapply-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let netns = with.netns.path();
    let d_with = Daemon::start_with(
        &with,
        &db.url,
        dir.join("with.sock"),
        &["--reapply-existing", "--netns", &netns],
    );
    let d_without = Daemon::start(&without, &db.url, dir.join("without.sock"));
    let (mut pw, mut po) = (with.probe(), without.probe());
    let old_w = pw.ask("hold-pair 127.0.0.1:7001 127.0.0.1:7001").get("id");
    let old_o = po.ask("hold-pair 127.0.0.1:7001 127.0.0.1:7001").get("id");
    let old_w6 = pw.ask("hold-pair [::1]:7011 [::1]:7011").get("id");
    let idle = |p: &mut tcpmgm_tests::Probe, id: i64| {
        let r = p.ask(&format!("opts {id}"));
        (r.get("client_idle"), r.get("server_idle"))
    };
    assert_eq!(
        (idle(&mut pw, old_w), idle(&mut po, old_o)),
        ((51, 51), (51, 51))
    );

    assert_eq!(idle(&mut pw, old_w6), (61, 61));
    db.sql("UPDATE tcp_mgm SET keepidle = keepidle + 1;").await;
    for d in [&d_with, &d_without] {
        let (code, text) = d.reload();
        assert_eq!(code, 0, "{text}");
    }
    let log = d_with.log.lock().unwrap().join("\n");
    assert_eq!(
        idle(&mut pw, old_w),
        (52, 52),
        "the old connection kept its values: {log}"
    );
    assert_eq!(
        idle(&mut pw, old_w6),
        (62, 62),
        "the old IPv6 connection kept its values: {log}"
    );
    assert_eq!(
        idle(&mut po, old_o),
        (51, 51),
        "without the flag the old connection must keep its values"
    );
    let new_o = po.ask("hold-pair 127.0.0.1:7002 127.0.0.1:7002").get("id");
    assert_eq!(idle(&mut po, new_o), (52, 52));
    let _ = std::fs::remove_dir_all(&dir);
}
