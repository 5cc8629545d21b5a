//! The control socket under abuse: a request far over the size limit, more idle connections
//! than the daemon serves at once, and a daemon pushed to its open-file limit. Each time the
//! daemon answers `reload` once the abuse stops, and its log stays short.
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use tcpmgm::daemon::control::{MAX_CONNECTIONS, MAX_REQUEST};
use tcpmgm::policy::source::TableVersion;
use tcpmgm_tests::{Backend, Daemon, Sandbox, TestDb, control_socket as control};

const RULES: &str =
    "INSERT INTO tcp_mgm (id, remote_addr, keepidle) VALUES (1, '127.0.0.0/8', 91);";

/// A limit for waiting on what must happen; never reached when the daemon works.
const SOON: Duration = Duration::from_secs(60);

/// Everything the daemon sends on `conn` until it closes it (or SOON passes).
fn reply(conn: &mut UnixStream) -> String {
    conn.set_read_timeout(Some(SOON)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // The daemon may close with our unread request in its buffer: the reply comes first, then
    // ECONNRESET, which ends the reply as EOF does.
    while let Ok(n @ 1..) = conn.read(&mut buf) {
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Asks for reloads until one succeeds, or SOON passes: the last answer.
fn reload_until_ok(d: &Daemon) -> (i32, String) {
    let start = Instant::now();
    loop {
        let (code, text) = d.reload();
        if code == 0 || start.elapsed() > SOON {
            return (code, text);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test]
async fn a_ten_megabyte_request_gets_a_short_error_that_does_not_echo_it() {
    let db = TestDb::new(Backend::Sqlite, TableVersion::V1, RULES).await;
    let sb = Sandbox::new();
    let d = Daemon::start(&sb, &db.url, control(&sb));

    let mut conn = UnixStream::connect(&d.control).unwrap();
    let mut writer = conn.try_clone().unwrap();
    // The daemon stops reading after MAX_REQUEST bytes, so this write fails part way.
    let sending = std::thread::spawn(move || {
        let mut line = vec![b'A'; 10 << 20];
        line.push(b'\n');
        let _ = writer.write_all(&line);
    });
    let answer = reply(&mut conn);
    sending.join().unwrap();
    assert_eq!(
        answer,
        format!(
            "error request longer than {MAX_REQUEST} bytes (expected: reload, reload full, detach)\n"
        )
    );

    // An unknown request is quoted, cut short.
    let mut conn = UnixStream::connect(&d.control).unwrap();
    conn.write_all(format!("{}\n", "B".repeat(1000)).as_bytes())
        .unwrap();
    let answer = reply(&mut conn);
    assert!(answer.starts_with("error unknown request 'BBB"), "{answer}");
    assert!(answer.len() < 200, "{} bytes: {answer}", answer.len());

    let (code, text) = d.reload();
    assert_eq!(code, 0, "{text}");
}

#[tokio::test]
async fn idle_connections_over_the_cap_and_at_the_fd_limit_leave_reload_answering_and_the_log_short()
 {
    let db = TestDb::new(Backend::Sqlite, TableVersion::V1, RULES).await;
    let sb = Sandbox::new();
    let d = Daemon::start(&sb, &db.url, control(&sb));
    let pid = d.status(&sb)["state"]["pid"].as_i64().expect("pid") as libc::pid_t;

    // More idle clients than the daemon serves: those over the cap are told so and closed.
    let mut idle: Vec<UnixStream> = (0..MAX_CONNECTIONS + 6)
        .map(|_| UnixStream::connect(&d.control).unwrap())
        .collect();
    let over: Vec<UnixStream> = idle.split_off(MAX_CONNECTIONS);
    let busy = over
        .into_iter()
        .map(|mut c| reply(&mut c))
        .filter(|r| r.starts_with("error busy"))
        .count();
    assert!(busy >= 1, "no connection over the cap was told it was busy");

    // The daemon at its open-file limit: the limit is its lowest free fd number, so accept()
    // fails while more clients wait in the listen backlog. The daemon's descriptors are not
    // contiguous (loading the programs opens and closes many), so a limit low enough to fail
    // accept() may lie below some it holds for good: the old limit is put back once the
    // clients are gone, as an operator would raise it.
    let fds = daemon_fds(pid);
    let lowest_free = (0..).find(|n| !fds.contains(n)).unwrap();
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: reads another process's limit into a valid struct.
    let r = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
    assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());
    // The soft limit only, so that putting it back needs no privilege.
    let limit = libc::rlimit {
        rlim_cur: lowest_free,
        rlim_max: old.rlim_max,
    };
    // SAFETY: sets another process's limit from a valid struct.
    let r = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &limit, std::ptr::null_mut()) };
    assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());
    let waiting: Vec<UnixStream> = (0..100)
        .map(|_| UnixStream::connect(&d.control).unwrap())
        .collect();
    // Long enough for a spinning accept loop to log thousands of lines.
    std::thread::sleep(Duration::from_secs(3));
    drop(waiting);
    drop(idle);
    // SAFETY: as above.
    let r = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &old, std::ptr::null_mut()) };
    assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());

    let (code, text) = reload_until_ok(&d);
    assert_eq!(code, 0, "{text}");
    // Nothing changed in the table: the reload says so, with the generation in force.
    assert!(text.contains("reloaded: generation 1"), "{text}");
    let status = d.status(&sb);
    assert_eq!(status["daemon_running"], true, "{status:#}");

    let log = d.log.lock().unwrap().clone();
    assert!(
        d.logged("accept failed") >= 1,
        "the daemon never reached its fd limit:\n{}",
        log.join("\n")
    );
    assert!(
        log.len() < 50,
        "{} log lines:\n{}",
        log.len(),
        log.join("\n")
    );
}

/// The daemon's open descriptor numbers.
fn daemon_fds(pid: libc::pid_t) -> std::collections::HashSet<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().parse().unwrap())
        .collect()
}
