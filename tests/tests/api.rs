//! The application ABI from C and from Rust: the C example (tcpmgm-common/examples/
//! socket_profile.c, built against the generated header and libbpf by `cargo xtask test`) and
//! the Rust client library (`tcpmgm_common::client`, through the probe) read their own socket's
//! rule and profile, as root and as an unprivileged member of `--api-group`; a user outside the
//! group cannot. The same holds for the event stream (`tcpmgm events`).
use std::path::Path;
use std::process::{Command, Output};

use tcpmgm::policy::source::TableVersion;
use tcpmgm_tests::{Backend, Daemon, Sandbox, TestDb, binary, control_socket};

/// Runs `program` inside the sandbox's cgroup and network namespace, through `identity` (a
/// `setpriv ...` prefix; empty: as root).
fn in_sandbox(sb: &Sandbox, identity: &[&str], program: &Path, args: &[&str]) -> Output {
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec \"$@\"",
        sb.cgroup.display()
    );
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("sh")
        .arg("nsenter")
        .arg(format!("--net={}", sb.netns.path()))
        .args(identity)
        .arg(program)
        .args(args)
        .output()
        .expect("run the C example")
}

/// The Rust client library (`tcpmgm_common::client`), as the probe uses it for its `profiles`
/// line: a pair of sockets to 127.0.0.2:7051, and what the records say of the client's.
fn rust_client(sb: &Sandbox, identity: &[&str]) -> Output {
    let script = format!(
        "echo 'profiles 127.0.0.2:7051 127.0.0.2:7051' | TCPMGM_TEST_PIN_DIR={} \"$0\"",
        sb.pin_dir.display()
    );
    let probe = binary("tcpmgm-probe");
    in_sandbox(
        sb,
        identity,
        Path::new("sh"),
        &["-c", &script, probe.to_str().unwrap()],
    )
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test]
async fn the_c_example_reads_its_sockets_rule_as_root_and_as_a_member_of_api_group() {
    let db = TestDb::new(
        Backend::Sqlite,
        TableVersion::V1,
        "INSERT INTO tcp_mgm (id, remote_addr, keepidle, attrs) VALUES (7, '127.0.0.2', 41, 'tenant=9');",
    )
    .await;
    let sb = Sandbox::new();
    let gid = (40_000 + std::process::id() % 10_000).to_string();
    let d = Daemon::start_with(&sb, &db.url, control_socket(&sb), &["--api-group", &gid]);
    let mut probe = sb.probe();
    probe.ask("serve 127.0.0.2:7050");
    let program = binary("tcpmgm-socket-profile");
    let pins = sb.pin_dir.to_str().unwrap();
    let args = [pins, "127.0.0.2", "7050"];

    let root = in_sandbox(&sb, &[], &program, &args);
    assert!(root.status.success(), "{}", text(&root));
    let said = text(&root);
    assert!(said.contains("rule_id=7 keepidle=41"), "{said}");
    assert!(said.contains("attr tenant=9"), "{said}");
    let rust = text(&rust_client(&sb, &[]));
    assert!(
        rust.contains("client_rule=7 ") && rust.contains("client_idle=41 client_attrs=tenant:9"),
        "{rust}"
    );

    let groups = format!("--groups={gid}");
    let member = [
        "/usr/bin/setpriv",
        "--reuid=65534",
        "--regid=65534",
        &groups,
        "--inh-caps=-all",
    ];
    let stranger = [
        "/usr/bin/setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
    ];
    let as_member = in_sandbox(&sb, &member, &program, &args);
    let as_stranger = in_sandbox(&sb, &stranger, &program, &args);
    let rust_member = rust_client(&sb, &member);
    let rust_stranger = rust_client(&sb, &stranger);
    if tcpmgm::kernel::features::unprivileged_bpf().unwrap() {
        assert!(as_member.status.success(), "{}", text(&as_member));
        assert!(
            text(&as_member).contains("rule_id=7 keepidle=41"),
            "{}",
            text(&as_member)
        );
        assert!(rust_member.status.success(), "{}", text(&rust_member));
        assert!(
            text(&rust_member).contains("client_rule=7 "),
            "{}",
            text(&rust_member)
        );
        // Only the group: the pin is not the world's.
        for out in [&as_stranger, &rust_stranger] {
            assert!(!out.status.success());
            assert!(text(out).contains("Permission denied"), "{}", text(out));
        }
    } else {
        // This kernel refuses bpf() to users without CAP_BPF, and the daemon said so.
        for out in [&as_member, &as_stranger, &rust_member, &rust_stranger] {
            assert!(!out.status.success());
            assert!(
                text(out).contains("Operation not permitted"),
                "{}",
                text(out)
            );
        }
        assert!(
            d.startup_log
                .contains("refuses bpf() to processes without CAP_BPF"),
            "{}",
            d.startup_log
        );
    }
    // The event stream: a member follows it (and sees a decision), a stranger is refused.
    let control = control_socket(&sb);
    let events = |identity: &[&str]| {
        Command::new("timeout")
            .arg("60")
            .args(identity)
            .arg(binary("tcpmgm"))
            .args(["events", "--count", "1", "--json", "--control"])
            .arg(&control)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("tcpmgm events")
    };
    let stranger_events = events(&stranger).wait_with_output().unwrap();
    assert!(!stranger_events.status.success());
    assert!(
        text(&stranger_events).contains("Permission denied"),
        "{}",
        text(&stranger_events)
    );
    let member_events = tcpmgm_tests::Spawned(events(&member));
    // Connections until the member's client has one event to show (it may not follow yet).
    let mut member_events = member_events;
    let started = std::time::Instant::now();
    let status = loop {
        probe.ask("pair 127.0.0.2:7050 127.0.0.2:7050");
        if let Some(status) = member_events.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "the member's `tcpmgm events` showed nothing"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let mut shown = String::new();
    std::io::Read::read_to_string(member_events.0.stdout.as_mut().unwrap(), &mut shown).unwrap();
    assert!(status.success(), "{shown}");
    let event: serde_json::Value = serde_json::from_str(shown.trim()).expect("one JSON line");
    assert_eq!(event["rule"], 7, "{shown}");
    assert_eq!(event["remote"], "127.0.0.2:7050", "{shown}");
    // The other pins stay root's alone.
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(&sb.pin_dir).unwrap().flatten() {
        let mode = entry.metadata().unwrap().permissions().mode() & 0o777;
        if entry.file_name() == tcpmgm::kernel::SOCKETS_PIN {
            assert_eq!(mode, 0o640);
        } else {
            assert_eq!(mode & 0o077, 0, "{:?} is {mode:o}", entry.file_name());
        }
    }
}
