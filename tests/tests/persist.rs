//! The policy outlives the daemon: SIGKILL leaves it enforced, and a new daemon takes the pinned
//! links over instead of attaching a second set.
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use tcpmgm::source::{Source, TableVersion};
use tcpmgm_tests::{Sandbox, binary};

fn start(sb: &Sandbox, url: &str, control: &std::path::Path) -> (Child, String) {
    let mut child = Command::new(binary("tcpmgm"))
        .args(["run", "--db", url])
        .arg("--cgroup")
        .arg(&sb.cgroup)
        .arg("--pin-dir")
        .arg(&sb.pin_dir)
        .arg("--control")
        .arg(control)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    while !seen.contains("reload with SIGHUP") {
        let mut line = String::new();
        if log.read_line(&mut line).unwrap() == 0 {
            let _ = child.kill();
            panic!("tcpmgm run exited: {seen}");
        }
        seen.push_str(&line);
    }
    std::thread::spawn(move || for _ in log.lines() {});
    (child, seen)
}

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

    let (mut first, _) = start(&sb, &url, &control);
    assert_eq!(idle(&mut probe, 7001), 71);
    first.kill().unwrap();
    first.wait().unwrap();
    // No daemon: the pinned links still enforce the policy on new connections.
    assert_eq!(idle(&mut probe, 7002), 71);
    assert_eq!(
        sb.attached_programs().matches("tcpmgm_").count(),
        3,
        "{}",
        sb.attached_programs()
    );

    source
        .execute_script("UPDATE tcp_mgm SET keepidle = 72;")
        .await
        .unwrap();
    let (mut second, log) = start(&sb, &url, &control);
    assert!(log.contains("took over the policy pinned"), "{log}");
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
    assert_eq!(
        sb.attached_programs().matches("tcpmgm_").count(),
        3,
        "{}",
        sb.attached_programs()
    );

    second.kill().unwrap();
    second.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
