//! What the daemon says about the policy's life is true under faults: a second run is refused
//! before it changes anything, removed pins are pinned again (and the exit message says what
//! really stays), a cgroup removed and made again is governed again, and a small policy fits
//! a 64 MiB memory limit while a table too large for it is refused.
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use tcpmgm::policy::source::{Source, TableVersion};
use tcpmgm_tests::{
    Daemon, Sandbox, assert_one_program_per_hook, control_socket, idle_in as idle, refused,
    snapshot, wait_logged,
};

const WAIT: Duration = Duration::from_secs(30);

/// A SQLite rule table in a directory of the test's own: loopback with `keepidle`, and a
/// con_lifetime rule so that the sweeper runs.
async fn rules(tag: &str, keepidle: u32) -> (PathBuf, String, Source) {
    let dir = std::env::temp_dir().join(format!("tcpmgm-life-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}", dir.join("rules.db").display());
    let source = Source::open(&url, true).await.unwrap();
    source.init(TableVersion::V1).await.unwrap();
    source
        .execute_script(&format!(
            "INSERT INTO tcp_mgm (id, remote_addr, keepidle) VALUES (1, '127.0.0.0/8', {keepidle});
             INSERT INTO tcp_mgm (id, remote_addr, con_lifetime) VALUES (2, '192.0.2.0/24', 30);"
        ))
        .await
        .unwrap();
    (dir, url, source)
}

fn run_args<'a>(
    url: &'a str,
    cgroup: &'a Path,
    pins: &'a Path,
    control: &'a Path,
) -> Vec<&'a OsStr> {
    vec![
        "run".as_ref(),
        "--db".as_ref(),
        url.as_ref(),
        "--cgroup".as_ref(),
        cgroup.as_os_str(),
        "--pin-dir".as_ref(),
        pins.as_os_str(),
        "--control".as_ref(),
        control.as_os_str(),
    ]
}

#[tokio::test]
async fn a_second_run_is_refused_before_it_changes_anything() {
    let sb = Sandbox::new();
    let (dir, url, source) = rules("second", 41).await;
    let control = control_socket(&sb);
    let first = Daemon::start(&sb, &url, control.clone());
    let mut port = 7400;
    assert_eq!(idle(&sb, &mut port), 41);
    let before = snapshot(&sb);
    let other_control = dir.join("other.sock");
    let other_pins = sb.pin_dir.with_file_name(format!(
        "{}-other",
        sb.pin_dir.file_name().unwrap().to_string_lossy()
    ));
    let held = format!(
        "another tcpmgm run (pid {}) governs cgroup {}",
        first.pid(),
        sb.cgroup.display()
    );
    for (what, pins, control) in [
        ("the same command line", &sb.pin_dir, &control),
        ("another control socket", &sb.pin_dir, &other_control),
        ("another pin directory", &other_pins, &control),
    ] {
        let log = refused(&run_args(&url, &sb.cgroup, pins, control), &[]);
        assert!(log.contains(&held), "{what}: {log}");
        assert!(!log.contains("took over"), "{what}: {log}");
        assert_eq!(snapshot(&sb), before, "{what} changed the kernel");
        assert!(!other_pins.exists(), "{what} made {}", other_pins.display());
        assert!(
            !other_control.exists(),
            "{what} bound {}",
            other_control.display()
        );
    }
    // The first daemon still owns the policy: its reload is what is enforced.
    source
        .execute_script("UPDATE tcp_mgm SET keepidle = 43 WHERE id = 1;")
        .await
        .unwrap();
    let (code, out) = first.reload();
    assert_eq!(code, 0, "{out}");
    assert_eq!(idle(&sb, &mut port), 43);
    // status reads the generation from the kernel's maps: the reload's, not a refused run's.
    let status = first.status(&sb);
    assert_eq!(status["kernel"]["generation"], 2, "{status}");
    assert_eq!(status["state"]["generation"], 2, "{status}");
    assert_one_program_per_hook(&sb.attached_programs());

    // With the first daemon gone, its pinned policy still holds the cgroup: a run with another
    // pin directory is told where that policy is pinned, and changes nothing.
    first.kill();
    let before = snapshot(&sb);
    let log = refused(
        &run_args(&url, &sb.cgroup, &other_pins, &other_control),
        &[],
    );
    assert!(
        log.contains(&format!(
            "already has tcpmgm's programs attached through the links pinned in {}",
            sb.pin_dir.display()
        )),
        "{log}"
    );
    assert_eq!(snapshot(&sb), before);
    assert!(!other_pins.exists());
    assert_eq!(idle(&sb, &mut port), 43);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn removed_pins_are_pinned_again_and_the_exit_says_what_stays() {
    let sb = Sandbox::new();
    let (dir, url, _source) = rules("pins", 44).await;
    let mut port = 7500;
    let mut daemon = Daemon::start(&sb, &url, control_socket(&sb));
    // The daemon may pin a file again while the directory is being emptied, so that the
    // directory itself stays: either way its pins were removed.
    let _ = std::fs::remove_dir_all(&sb.pin_dir);
    assert!(
        wait_logged(&daemon, "were removed: pinned again", WAIT),
        "{:?}",
        daemon.log.lock().unwrap()
    );
    assert!(sb.pin_dir.join("TCPMGM_LINK_SOCK_OPS").exists());
    daemon.signal(Signal::SIGTERM);
    assert!(daemon.wait_exit(WAIT).is_some_and(|s| s.success()));
    assert!(
        daemon.logged("exiting; the policy stays enforced") == 1,
        "{:?}",
        daemon.log.lock().unwrap()
    );
    // It does: the pins hold the links after the daemon is gone.
    assert_one_program_per_hook(&sb.attached_programs());
    assert_eq!(idle(&sb, &mut port), 44);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn pins_that_cannot_be_restored_end_the_policy_with_the_process_as_said() {
    let sb = Sandbox::new();
    let (dir, url, _source) = rules("nopins", 45).await;
    let mut port = 7600;
    let mut daemon = Daemon::start_env(
        &sb,
        control_socket(&sb),
        &["--db", &url],
        &[("TCPMGM_FAULT", "repin")],
    );
    assert_eq!(idle(&sb, &mut port), 45);
    std::fs::remove_dir_all(&sb.pin_dir).unwrap();
    assert!(
        wait_logged(&daemon, "cannot be pinned again", WAIT),
        "{:?}",
        daemon.log.lock().unwrap()
    );
    // While it runs, its descriptors keep the policy in force.
    assert_eq!(idle(&sb, &mut port), 45);
    daemon.signal(Signal::SIGTERM);
    assert!(daemon.wait_exit(WAIT).is_some_and(|s| s.success()));
    assert!(
        daemon.logged("ends with this process") == 1,
        "{:?}",
        daemon.log.lock().unwrap()
    );
    // And it did end: nothing attached, the system's keepidle.
    let started = std::time::Instant::now();
    while sb.attached_programs().contains("tcpmgm_") && started.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!sb.attached_programs().contains("tcpmgm_"));
    assert_eq!(idle(&sb, &mut port), 7200);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_cgroup_made_again_is_governed_again() {
    let sb = Sandbox::new();
    let (dir, url, _source) = rules("cgroup", 46).await;
    let mut port = 7700;
    let daemon = Daemon::start(&sb, &url, control_socket(&sb));
    assert_eq!(daemon.status(&sb)["cgroup_governed"], true);
    // The probes have left; a slice stop removes the cgroup.
    let started = std::time::Instant::now();
    while std::fs::remove_dir(&sb.cgroup).is_err() {
        assert!(started.elapsed() < WAIT, "rmdir {}", sb.cgroup.display());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        wait_logged(&daemon, "was removed", WAIT),
        "{:?}",
        daemon.log.lock().unwrap()
    );
    let status = daemon.status(&sb);
    assert_eq!(status["cgroup_governed"], false, "{status}");
    // A slice start makes it again: governed again, with the same rules.
    std::fs::create_dir(&sb.cgroup).unwrap();
    assert!(
        wait_logged(&daemon, "is governed again", WAIT),
        "{:?}",
        daemon.log.lock().unwrap()
    );
    assert_eq!(daemon.status(&sb)["cgroup_governed"], true);
    assert_one_program_per_hook(&sb.attached_programs());
    assert_eq!(idle(&sb, &mut port), 46);
    // Said once, not every sweep.
    assert_eq!(daemon.logged("was removed"), 1);
    assert_eq!(daemon.logged("con_lifetime sweep"), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A memory-limited cgroup for the daemon itself (cgroup v2's memory.max where the cgroup2
/// tree has the memory controller, else cgroup v1's memory hierarchy): its `cgroup.procs`.
struct MemoryLimit {
    dir: PathBuf,
    /// The cgroup's name, as the daemon's messages show it.
    name: String,
}

impl MemoryLimit {
    fn new(bytes: u64) -> MemoryLimit {
        let name = format!("tcpmgm-test-mem-{}", std::process::id());
        let v2 = tcpmgm::system::cgroup2_root().expect("cgroup2");
        let controllers =
            std::fs::read_to_string(v2.join("cgroup.controllers")).unwrap_or_default();
        if controllers.split_whitespace().any(|c| c == "memory") {
            let _ = std::fs::write(v2.join("cgroup.subtree_control"), "+memory");
            let dir = v2.join(&name);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("memory.max"), bytes.to_string()).unwrap();
            return MemoryLimit { dir, name };
        }
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        let v1 = mounts
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| {
                f.get(2) == Some(&"cgroup")
                    && f.get(3)
                        .is_some_and(|o| o.split(',').any(|o| o == "memory"))
            })
            .map(|f| PathBuf::from(f[1]))
            .expect("a memory controller, in cgroup v2 or v1");
        let dir = v1.join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("memory.limit_in_bytes"), bytes.to_string()).unwrap();
        MemoryLimit { dir, name }
    }

    fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }
}

impl Drop for MemoryLimit {
    fn drop(&mut self) {
        for _ in 0..100 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[tokio::test]
async fn a_one_rule_policy_starts_under_a_64_mib_memory_limit() {
    let sb = Sandbox::new();
    let (dir, url, _source) = rules("memory", 47).await;
    let limit = MemoryLimit::new(64 << 20);
    let mut port = 7800;
    let daemon = Daemon::start_in(
        &sb,
        control_socket(&sb),
        &["--db", &url],
        &[],
        Some(&limit.procs()),
    );
    assert_eq!(idle(&sb, &mut port), 47);
    let procs = std::fs::read_to_string(limit.procs()).unwrap();
    assert!(
        procs.lines().any(|p| p == daemon.pid().to_string()),
        "the daemon ran outside the limit: {procs}"
    );
    daemon.kill();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Adds `rows` rules (ids from 1000) to a table: a /32 each, in 10.0.0.0/8.
async fn grow(source: &Source, rows: u32) {
    source
        .execute_script(&format!(
            "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < {rows})
             INSERT INTO tcp_mgm (id, remote_addr, keepidle)
             SELECT 1000 + x, '10.' || ((x >> 16) & 255) || '.' || ((x >> 8) & 255) || '.'
                 || (x & 255) || '/32', 30 FROM n"
        ))
        .await
        .unwrap();
}

const TOO_LARGE: &str = "the table is too large for this process's memory limit";

/// 200,000 rules need far more than 64 MiB to compile and load: the reload that meets them is
/// refused with the limit named, the daemon and its policy stay as they were; a first start on
/// them is refused with nothing attached and nothing pinned. (Without the check the kernel's OOM
/// killer ended the daemon in the middle of the read.)
#[tokio::test]
async fn a_table_too_large_for_the_memory_limit_is_refused() {
    let sb = Sandbox::new();
    let (dir, url, source) = rules("toolarge", 49).await;
    let limit = MemoryLimit::new(64 << 20);
    let mut port = 8000;
    // The refusal comes after some 20,000 rows; a debug build under QEMU's emulation reads them
    // slower than the default timeout allows.
    let daemon = Daemon::start_in(
        &sb,
        control_socket(&sb),
        &["--db", &url, "--db-timeout", "900"],
        &[],
        Some(&limit.procs()),
    );
    assert_eq!(idle(&sb, &mut port), 49);
    let before = snapshot(&sb);
    grow(&source, 200_000).await;
    let (code, said) = daemon.reload();
    assert_eq!(code, 1, "{said}");
    assert!(said.contains(TOO_LARGE), "{said}");
    assert!(
        said.contains(&limit.name),
        "the limit's cgroup is not named: {said}"
    );
    // Alive, in the limit, with the old policy whole.
    let procs = std::fs::read_to_string(limit.procs()).unwrap();
    assert!(
        procs.lines().any(|p| p == daemon.pid().to_string()),
        "the daemon is gone: {procs}; {:?}",
        daemon.log.lock().unwrap()
    );
    assert_eq!(snapshot(&sb), before);
    assert_eq!(idle(&sb, &mut port), 49);
    assert_eq!(daemon.status(&sb)["kernel"]["generation"], 1);
    daemon.kill();

    // A first start on the same table, on a cgroup of its own.
    let fresh = Sandbox::new();
    let control = control_socket(&fresh);
    let out = Command::new("sh")
        .args(["-c", "echo $$ > \"$0\" && exec \"$@\""])
        .arg(limit.procs())
        .arg(tcpmgm_tests::binary("tcpmgm"))
        .args(run_args(&url, &fresh.cgroup, &fresh.pin_dir, &control))
        .args(["--db-timeout", "900"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code().is_some_and(|c| c != 0 && c != 101),
        "not a refusal but {}: {log}",
        out.status
    );
    assert!(log.contains(TOO_LARGE), "{log}");
    assert_eq!(fresh.attached_programs().trim(), "", "{log}");
    assert!(!fresh.pin_dir.exists(), "{log}");
    assert!(!control.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_start_after_the_cgroup_was_made_again_pins_its_new_links() {
    let sb = Sandbox::new();
    let (dir, url, _source) = rules("remade", 48).await;
    let mut port = 7900;
    Daemon::start(&sb, &url, control_socket(&sb)).kill();
    // No daemon while the slice stops and starts: the pinned links hold a cgroup that is gone.
    std::fs::remove_dir(&sb.cgroup).unwrap();
    std::fs::create_dir(&sb.cgroup).unwrap();
    let daemon = Daemon::start(&sb, &url, control_socket(&sb));
    assert!(
        daemon
            .startup_log
            .contains("cgroup is gone; attaching anew"),
        "{}",
        daemon.startup_log
    );
    // Killed at once, before its keeper could pin anything again: what the start pinned is
    // what keeps the policy.
    daemon.kill();
    assert_one_program_per_hook(&sb.attached_programs());
    assert_eq!(idle(&sb, &mut port), 48);
    let _ = std::fs::remove_dir_all(&dir);
}
