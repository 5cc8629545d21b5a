//! The systemd deployment's checks, run inside the Debian 12 guest that `cargo xtask vm systemd`
//! boots twice. On the first boot it installs the Debian package as an operator does (the
//! configuration, Kamailio's drop-in from the package's examples, `systemctl enable`). On the
//! second, tcpmgm's unit governs `sip.slice`, where Kamailio runs; after the deployment's checks
//! the package is upgraded while the daemon runs, removed, installed again and purged. Each
//! check prints `ok - NAME` or `FAILED - NAME: why` to the file given (the guest's second serial
//! port), then a closing `systemd: N passed, M failed`; the first boot's checks are kept in the
//! image and reported on the second.
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use tcpmgm_tests::{PROGRAMS, Probe};

/// The rule of the guest's table for loopback peers (see xtask's vm/systemd.rs).
const RULE: (i32, i32, i32, i32) = (1, 41, 13, 5);
const CGROUP: &str = "/sys/fs/cgroup/sip.slice";
const KAMAILIO: &str = "127.0.0.1:5060";
/// Kamailio's own keepalive settings (its configuration in xtask's vm/systemd.rs), which its
/// connections carry when no rule governs them.
const KAMAILIO_OWN: (i32, i32, i32, i32) = (1, 600, 60, 3);
/// The packages xtask put in the image, one per directory, in the order they are installed:
/// the first on the first boot, the second (a newer build) as the upgrade.
const DEBS: &str = "/root/debs";
/// The first boot's results, kept for the second.
const INSTALLED: &str = "/root/install-results.txt";

struct Report {
    out: File,
    passed: u32,
    failed: u32,
}

impl Report {
    fn check(&mut self, name: &str, result: Result<String, String>) {
        let line = match result {
            Ok(detail) if detail.is_empty() => {
                self.passed += 1;
                format!("ok - {name}")
            }
            Ok(detail) => {
                self.passed += 1;
                format!("ok - {name} ({detail})")
            }
            Err(why) => {
                self.failed += 1;
                format!("FAILED - {name}: {why}")
            }
        };
        println!("{line}");
        let _ = writeln!(self.out, "{line}");
    }

    /// Reports again the checks that `path` holds, as they were.
    fn replay(&mut self, path: &str) {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        for line in text.lines() {
            if let Some(name) = line.strip_prefix("ok - ") {
                self.check(name, Ok(String::new()));
            } else if let Some(failure) = line.strip_prefix("FAILED - ") {
                let (name, why) = failure.split_once(": ").unwrap_or((failure, ""));
                self.check(name, Err(why.to_owned()));
            }
        }
    }
}

/// The first boot: the package installed as an operator does, from its file. The unit must
/// come installed but neither enabled nor started; then the operator's configuration, the SIP
/// server's drop-in from the package's examples, and `systemctl enable` (started at the next
/// boot, before Kamailio).
fn install(r: &mut Report) {
    let first = match package(0) {
        Ok(p) => p,
        Err(e) => return r.check("the package is in the image", Err(e)),
    };
    r.check(
        &format!("apt-get install ./{} installs it", first.1),
        apt_get(&["install", &format!("./{}", first.1)], &first.0),
    );
    r.check(
        "the unit is installed, neither enabled nor started, and nothing is attached",
        not_started(),
    );
    r.check("man tcpmgm shows its exit statuses", man_page());
    r.check("bash completes tcpmgm's commands", bash_completion());
    r.check(
        "the shipped /etc/tcpmgm/tcpmgm.toml is a conffile, reads opensips.cfg and holds no password",
        shipped_config(),
    );
    r.check("the operator configures and enables tcpmgm", configure());
}

/// The directory and file name of the `n`th package xtask put in the image.
fn package(n: usize) -> Result<(String, String), String> {
    let dir = format!("{DEBS}/{n}");
    let name = std::fs::read_dir(&dir)
        .map_err(|e| format!("{dir}: {e}"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.ends_with(".deb"))
        .ok_or_else(|| format!("no .deb in {dir}"))?;
    Ok((dir, name))
}

/// apt-get, unattended (a changed conffile keeps the operator's version), in `dir`.
fn apt_get(args: &[&str], dir: &str) -> Result<String, String> {
    let out = Command::new("apt-get")
        .args(["-y", "-q", "-o", "Dpkg::Options::=--force-confold"])
        .args(args)
        .current_dir(dir)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .map_err(|e| format!("apt-get: {e}"))?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(String::new())
    } else {
        Err(format!("apt-get {}: {said}", args.join(" ")))
    }
}

fn not_started() -> Result<String, String> {
    let unit = "/usr/lib/systemd/system/tcpmgm.service";
    if !std::path::Path::new(unit).exists() {
        return Err(format!("no {unit}"));
    }
    let enabled = show("tcpmgm.service", "UnitFileState");
    let active = show("tcpmgm.service", "ActiveState");
    if enabled != "disabled" || active != "inactive" {
        return Err(format!("UnitFileState {enabled}, ActiveState {active}"));
    }
    let attached = tcpmgm_programs()?;
    if !attached.is_empty() {
        return Err(format!("attached: {attached}"));
    }
    Ok(format!("{enabled}, {active}"))
}

/// The tcpmgm programs attached anywhere, from `bpftool cgroup tree`.
fn tcpmgm_programs() -> Result<String, String> {
    let out = Command::new("bpftool")
        .args(["cgroup", "tree"])
        .output()
        .map_err(|e| format!("bpftool: {e}"))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("tcpmgm_"))
        .collect::<Vec<_>>()
        .join("; "))
}

fn man_page() -> Result<String, String> {
    let out = Command::new("man")
        .args(["-P", "cat", "tcpmgm"])
        .env("MANWIDTH", "100")
        .output()
        .map_err(|e| format!("man: {e}"))?;
    let page = String::from_utf8_lossy(&out.stdout);
    let sub = Command::new("man")
        .args(["-w", "tcpmgm-run"])
        .output()
        .map_err(|e| format!("man: {e}"))?;
    if page.contains("EXIT STATUS") && page.contains("78") && sub.status.success() {
        Ok(String::from_utf8_lossy(&sub.stdout).trim().to_owned())
    } else {
        Err(format!(
            "man tcpmgm: {page}{}; man -w tcpmgm-run: {}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&sub.stderr)
        ))
    }
}

/// Completes `tcpmgm de` in bash through the installed completion.
fn bash_completion() -> Result<String, String> {
    let script = r#". /usr/share/bash-completion/completions/tcpmgm
COMP_WORDS=(tcpmgm de); COMP_CWORD=1; COMP_LINE='tcpmgm de'; COMP_POINT=9
_tcpmgm tcpmgm de tcpmgm
echo "${COMPREPLY[@]}""#;
    let out = Command::new("bash")
        .args(["-c", script])
        .output()
        .map_err(|e| format!("bash: {e}"))?;
    let words = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if words.split_whitespace().any(|w| w == "detach") {
        Ok(format!("tcpmgm de<TAB>: {words}"))
    } else {
        Err(format!(
            "tcpmgm de<TAB>: \"{words}\" {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn shipped_config() -> Result<String, String> {
    let path = "/etc/tcpmgm/tcpmgm.toml";
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let conffiles = Command::new("dpkg-query")
        .args(["-W", "-f", "${Conffiles}", "tcpmgm"])
        .output()
        .map_err(|e| e.to_string())?;
    let conffiles = String::from_utf8_lossy(&conffiles.stdout);
    let settings: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && l.contains('='))
        .collect();
    if !conffiles.contains(path) {
        return Err(format!("not a conffile: {conffiles}"));
    }
    if !settings.contains(&r#"opensips_cfg = "/etc/opensips/opensips.cfg""#)
        || !settings.contains(&r#"cgroup = "sip.slice""#)
        || settings.iter().any(|l| l.contains('@'))
    {
        return Err(format!("its settings: {settings:?}"));
    }
    Ok(String::new())
}

fn configure() -> Result<String, String> {
    std::fs::copy("/root/tcpmgm.toml", "/etc/tcpmgm/tcpmgm.toml").map_err(|e| e.to_string())?;
    let drop_in = "/etc/systemd/system/kamailio.service.d";
    std::fs::create_dir_all(drop_in).map_err(|e| e.to_string())?;
    std::fs::copy(
        "/usr/share/doc/tcpmgm/examples/sip-service.conf",
        format!("{drop_in}/tcpmgm.conf"),
    )
    .map_err(|e| format!("the example drop-in: {e}"))?;
    systemctl(&["daemon-reload"])?;
    systemctl(&["enable", "tcpmgm.service"]).map(drop)?;
    Ok(String::new())
}

fn main() {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/dev/stdout".into());
    let out = File::options()
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut r = Report {
        out,
        passed: 0,
        failed: 0,
    };
    let first_boot = !std::path::Path::new(INSTALLED).exists();
    if first_boot {
        match File::create(INSTALLED) {
            Ok(kept) => r.out = kept,
            Err(e) => r.check("keeping the first boot's results", Err(e.to_string())),
        }
    } else {
        r.replay(INSTALLED);
    }
    let mut report = std::panic::AssertUnwindSafe(&mut r);
    let phase = if first_boot { install } else { run };
    if let Err(panic) = std::panic::catch_unwind(move || phase(&mut report)) {
        let why = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        r.check("the checks ran to the end", Err(format!("panicked: {why}")));
    }
    let _ = writeln!(r.out, "systemd: {} passed, {} failed", r.passed, r.failed);
    println!("systemd: {} passed, {} failed", r.passed, r.failed);
}

fn run(r: &mut Report) {
    let started = wait_active("tcpmgm.service").and_then(|()| wait_active("kamailio.service"));
    r.check(
        "tcpmgm and Kamailio start at boot",
        started.map(|()| String::new()),
    );
    r.check("tcpmgm is ready before Kamailio starts", ready_first());
    r.check(
        "Kamailio's first accepted TCP connection carries the rule's keepalive",
        kamailio_options().and_then(|got| expect_rule(got, RULE)),
    );
    r.check(
        "one program per hook on the slice",
        one_per_hook().map(|_| String::new()),
    );

    r.check("systemctl reload applies a changed table", reload());
    r.check("a failed reload keeps the policy", failed_reload());
    r.check(
        "Kamailio's outbound connection carries the rule's keepalive despite its own tcp_keepidle",
        kamailio_outbound().and_then(|got| expect_rule(got, (1, 42, 13, 5))),
    );

    let mut probe = slice_probe();
    let mut port = 7000;
    r.check(
        "systemctl restart adopts the pinned policy with no gap",
        gapless(&mut probe, &mut port, || {
            systemctl(&["restart", "tcpmgm.service"]).map(drop)
        }),
    );
    r.check(
        "kill -9 of the daemon: Restart= brings it back and it adopts the policy with no gap",
        gapless(&mut probe, &mut port, kill_daemon),
    );
    r.check(
        "an upgrade to a newer build while the daemon runs: the new daemon adopts the policy with no gap",
        upgrade(&mut probe, &mut port),
    );
    drop(probe);
    r.check(
        "a restart of Kamailio stays governed",
        systemctl(&["restart", "kamailio.service"])
            .and_then(|_| wait_active("kamailio.service"))
            .and_then(|()| kamailio_options())
            .and_then(|got| expect_rule(got, (1, 42, 13, 5))),
    );
    r.check("the unit's hardening holds", hardening());
    r.check(
        "--reapply-existing is refused with the unit's capabilities alone, and works with CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH and pidfd_getfd added",
        reapply_existing(),
    );
    r.check(
        "api_group is refused without the group, and with SupplementaryGroups= Kamailio's user reads its socket's rule",
        api_group(),
    );
    r.check(
        "journalctl -p warning shows a warning tcpmgm logged and none of its info lines; no escape codes in the journal",
        journal_priorities(),
    );
    r.check(
        "a bad configuration fails the unit with status 78 and no restart loop",
        bad_config_fails_once(),
    );
    r.check(
        "apt remove stops the daemon and detaches the policy; Kamailio's connections get its own keepalive again; the configuration stays",
        remove(),
    );
    r.check(
        "apt purge of a governing install: no daemon, pins, links, state or configuration left",
        purge(),
    );
}

/// tcpmgm's own entries in its unit's journal (not systemd's about the unit), at `priority` or
/// more urgent: (PRIORITY, MESSAGE) each.
fn tcpmgm_entries(priority: &str) -> Result<Vec<(String, String)>, String> {
    let out = Command::new("journalctl")
        .args([
            "-u",
            "tcpmgm.service",
            "-p",
            priority,
            "-o",
            "json",
            "--no-pager",
        ])
        .output()
        .map_err(|e| format!("journalctl: {e}"))?;
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        // journald gives a message with control characters as its bytes.
        serde_json::Value::Array(bytes) => String::from_utf8_lossy(
            &bytes
                .iter()
                .map(|b| b.as_u64().unwrap_or(0) as u8)
                .collect::<Vec<_>>(),
        )
        .into_owned(),
        _ => String::new(),
    };
    let mut entries = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let entry: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("{e}: {line}"))?;
        if entry["SYSLOG_IDENTIFIER"] == "tcpmgm" {
            entries.push((text(&entry["PRIORITY"]), text(&entry["MESSAGE"])));
        }
    }
    Ok(entries)
}

/// A rule with host bits set is valid and warned about at each read: a reload with one makes a
/// warning, which `-p warning` must show, without any of the info lines tcpmgm logged.
fn journal_priorities() -> Result<String, String> {
    let warned = "192.0.2.77/24: host bits set";
    sql("INSERT INTO tcp_mgm (id, remote_addr, keepidle) VALUES (97, '192.0.2.77/24', 50);")?;
    let reloaded = systemctl(&["reload", "tcpmgm.service"]);
    sql("DELETE FROM tcp_mgm WHERE id = 97;")?;
    reloaded?;
    systemctl(&["reload", "tcpmgm.service"])?;
    let start = Instant::now();
    let warnings = loop {
        let warnings = tcpmgm_entries("warning")?;
        if warnings.iter().any(|(_, m)| m.contains(warned)) {
            break warnings;
        }
        if start.elapsed() > Duration::from_secs(10) {
            return Err(format!(
                "no \"{warned}\" in journalctl -p warning: {warnings:?}; journal: {}",
                journal_tail()
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let all = tcpmgm_entries("debug")?;
    let info: Vec<&(String, String)> = all.iter().filter(|(p, _)| p == "6").collect();
    if !info.iter().any(|(_, m)| m.contains("rules enforced")) {
        return Err(format!(
            "no info line \"rules enforced\" at priority 6: {all:?}"
        ));
    }
    let wrong: Vec<&(String, String)> = warnings
        .iter()
        .filter(|(p, m)| {
            let level = m.trim_start();
            p.as_str() > "4" || level.starts_with("INFO") || level.starts_with("DEBUG")
        })
        .collect();
    if !wrong.is_empty() {
        return Err(format!("journalctl -p warning shows {wrong:?}"));
    }
    let cat = Command::new("journalctl")
        .args(["-u", "tcpmgm.service", "-o", "cat", "--no-pager"])
        .output()
        .map_err(|e| format!("journalctl: {e}"))?;
    if cat.stdout.contains(&0x1b) {
        return Err(format!(
            "an escape code in journalctl -o cat: {}",
            String::from_utf8_lossy(&cat.stdout)
        ));
    }
    Ok(format!(
        "{} of tcpmgm's {} entries at warning or worse, {} at info",
        warnings.len(),
        all.len(),
        info.len()
    ))
}

/// A TOML error in tcpmgm.toml: `systemctl restart` fails, the unit ends failed with exit status
/// 78 (EX_CONFIG), and RestartPreventExitStatus= keeps systemd from restarting it in a loop.
/// Then the file is put back and tcpmgm started again (it adopts the pinned policy), for the
/// checks that follow.
fn bad_config_fails_once() -> Result<String, String> {
    let config = "/etc/tcpmgm/tcpmgm.toml";
    let good = std::fs::read_to_string(config).map_err(|e| e.to_string())?;
    std::fs::write(config, format!("{good}listeners = [\n")).map_err(|e| e.to_string())?;
    let restarted = systemctl(&["restart", "tcpmgm.service"]);
    let restarts_then = show("tcpmgm.service", "NRestarts");
    // Several times RestartSec=1s: a restart loop would have shown by now.
    std::thread::sleep(Duration::from_secs(5));
    let seen =
        ["ActiveState", "Result", "ExecMainStatus", "NRestarts"].map(|p| show("tcpmgm.service", p));
    let journal = journal_tail();
    std::fs::write(config, good).map_err(|e| e.to_string())?;
    systemctl(&["reset-failed", "tcpmgm.service"])?;
    systemctl(&["start", "tcpmgm.service"])?;
    wait_active("tcpmgm.service")?;
    if restarted.is_ok() {
        return Err("tcpmgm restarted with a TOML error in its configuration".into());
    }
    let [state, result, status, restarts] = seen;
    if state != "failed" || result != "exit-code" || status != "78" {
        return Err(format!(
            "ActiveState={state} Result={result} ExecMainStatus={status}; journal: {journal}"
        ));
    }
    if restarts != restarts_then {
        return Err(format!(
            "NRestarts {restarts_then} then {restarts}: systemd restarted it; journal: {journal}"
        ));
    }
    if !journal.contains(&format!("config {config}")) {
        return Err(format!("the journal does not name {config}: {journal}"));
    }
    Ok(format!("failed with status {status}, NRestarts {restarts}"))
}

/// The next build, installed while the probe keeps connecting: the package's postinst restarts
/// the running daemon (try-restart), and the new one swaps its programs into the pinned links.
fn upgrade(probe: &mut Probe, port: &mut u16) -> Result<String, String> {
    let (dir, name) = package(1)?;
    let pid = show("tcpmgm.service", "MainPID");
    let done = gapless(probe, port, move || {
        apt_get(&["install", &format!("./{name}")], &dir).map(drop)
    })?;
    let version = Command::new("dpkg-query")
        .args(["-W", "-f", "${Version}", "tcpmgm"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .map_err(|e| e.to_string())?;
    let now = show("tcpmgm.service", "MainPID");
    if now == pid {
        return Err(format!(
            "the daemon was not restarted (pid {pid}); {version}"
        ));
    }
    Ok(format!("{version}, daemon pid {pid} -> {now}; {done}"))
}

/// What is left of tcpmgm in the kernel and on disk: the pins, the programs on any cgroup, the
/// control sockets and state records.
fn leftovers() -> Result<Vec<String>, String> {
    let mut left = Vec::new();
    let programs = tcpmgm_programs()?;
    if !programs.is_empty() {
        left.push(format!("programs attached: {programs}"));
    }
    for dir in ["/sys/fs/bpf/tcpmgm", "/run/tcpmgm"] {
        let entries: Vec<String> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().display().to_string())
            .collect();
        if !entries.is_empty() {
            left.push(format!("in {dir}: {}", entries.join(" ")));
        }
    }
    Ok(left)
}

/// `apt remove`, as the README says: the daemon stops and the policy comes off every cgroup
/// (nothing would be left to manage it), the configuration stays for a later install.
fn remove() -> Result<String, String> {
    apt_get(&["remove", "tcpmgm"], "/")?;
    let mut faults = leftovers()?;
    let active = show("tcpmgm.service", "ActiveState");
    if active == "active" {
        faults.push("tcpmgm.service is still active".into());
    }
    if !std::path::Path::new("/etc/tcpmgm/tcpmgm.toml").exists() {
        faults.push("/etc/tcpmgm/tcpmgm.toml went".into());
    }
    let got = kamailio_options()?;
    if got != KAMAILIO_OWN {
        faults.push(format!(
            "a new Kamailio connection carries {got:?}, not Kamailio's own {KAMAILIO_OWN:?}"
        ));
    }
    if faults.is_empty() {
        Ok(format!("a new Kamailio connection: {got:?}"))
    } else {
        Err(faults.join("; "))
    }
}

/// `apt purge` from a running install: the package installed again (its configuration kept by
/// the remove), tcpmgm governing the slice, then purged.
fn purge() -> Result<String, String> {
    let (dir, name) = package(1)?;
    apt_get(&["install", &format!("./{name}")], &dir)?;
    systemctl(&["start", "tcpmgm.service"])?;
    one_per_hook().map_err(|e| format!("not governing before the purge: {e}"))?;
    apt_get(&["purge", "tcpmgm"], "/")?;
    let mut faults = leftovers()?;
    for path in [
        "/etc/tcpmgm",
        "/usr/bin/tcpmgm",
        "/usr/lib/systemd/system/tcpmgm.service",
        "/etc/systemd/system/multi-user.target.wants/tcpmgm.service",
        "/var/lib/systemd/deb-systemd-helper-enabled/tcpmgm.service.dsh-also",
    ] {
        if std::path::Path::new(path).exists() {
            faults.push(format!("{path} is left"));
        }
    }
    if faults.is_empty() {
        // The operator's own drop-ins for the unit (the checks above wrote two) are theirs.
        let own: Vec<String> = std::fs::read_dir("/etc/systemd/system/tcpmgm.service.d")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        Ok(format!("the operator's drop-ins stay: {}", own.join(" ")))
    } else {
        Err(faults.join("; "))
    }
}

/// `api_group`: the unit's capabilities lack CAP_CHOWN, so the daemon refuses to start until a
/// drop-in puts it in the group; then a process of the slice running as Kamailio's user reads
/// its own socket's rule through the Rust client library (the probe's `profiles` line), as root
/// does, and a user outside the group cannot.
fn api_group() -> Result<String, String> {
    refused_until_dropped_in(
        "api_group = \"kamailio\"",
        "needs CAP_CHOWN, or this process in group",
        "api-group.conf",
        "[Service]\nSupplementaryGroups=kamailio\n",
    )?;
    // systemd mounts bpffs 0700; the README's step for an unprivileged reader lets others pass.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions("/sys/fs/bpf", std::fs::Permissions::from_mode(0o711))
        .map_err(|e| e.to_string())?;
    let read_as = |user: &str, port: u16| -> Result<String, String> {
        let mut child = Command::new("systemd-run")
            .args([
                "--quiet",
                "--pipe",
                "--wait",
                "--collect",
                "--slice=sip.slice",
                &format!("--uid={user}"),
                "--setenv=TCPMGM_TEST_PIN_DIR=/sys/fs/bpf/tcpmgm/sip-slice",
                "/usr/local/bin/tcpmgm-probe",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("systemd-run: {e}"))?;
        let line = format!("profiles 127.0.0.1:{port} 127.0.0.1:{port}\n");
        let mut stdin = child.stdin.take().expect("piped");
        std::io::Write::write_all(&mut stdin, line.as_bytes()).map_err(|e| e.to_string())?;
        drop(stdin);
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            Ok(said)
        } else {
            Err(said)
        }
    };
    let fields = |said: &str| -> Vec<String> {
        said.split_whitespace()
            .filter(|w| w.starts_with("client_rule=") || w.starts_with("client_idle="))
            .map(str::to_owned)
            .collect()
    };
    let root = read_as("root", 7301).map_err(|e| format!("as root: {e}"))?;
    let member = read_as("kamailio", 7302).map_err(|e| format!("as kamailio: {e}"))?;
    if fields(&root).len() != 2 || fields(&root)[0] == "client_rule=0" {
        return Err(format!("root read no rule: {root}"));
    }
    if fields(&member) != fields(&root) {
        return Err(format!("kamailio read {member}, root {root}"));
    }
    match read_as("nobody", 7303) {
        Ok(said) => Err(format!("nobody read the records: {said}")),
        Err(said) if said.contains("Permission denied") => Ok(format!(
            "kamailio and root read {}",
            fields(&member).join(" ")
        )),
        Err(said) => Err(format!("nobody failed otherwise: {said}")),
    }
}

/// The daemon's own answer to an option it lacks capabilities for, then the option at work
/// once a drop-in adds them: a connection Kamailio accepted before a reload gets the new rule.
fn reapply_existing() -> Result<String, String> {
    refused_until_dropped_in(
        "reapply_existing = true",
        "--reapply-existing needs CAP_SYS_PTRACE, --reapply-existing needs CAP_DAC_READ_SEARCH, \
         --reapply-existing needs the pidfd_getfd system call, which a system-call filter refuses",
        "reapply.conf",
        "[Service]\nCapabilityBoundingSet=CAP_SYS_PTRACE CAP_DAC_READ_SEARCH\nAmbientCapabilities=CAP_SYS_PTRACE CAP_DAC_READ_SEARCH\nSystemCallFilter=pidfd_getfd\n",
    )?;
    let held = std::net::TcpStream::connect(KAMAILIO).map_err(|e| format!("connect: {e}"))?;
    let port = held.local_addr().map_err(|e| e.to_string())?.port();
    let before = wait_for_socket(port).map(|s| options(&s))?;
    sql("UPDATE tcp_mgm SET keepidle = 43 WHERE id = 1;")?;
    systemctl(&["reload", "tcpmgm.service"])?;
    let after = wait_for_socket(port).map(|s| options(&s))?;
    if before.1 == 42 && after == (1, 43, 13, 5) {
        Ok(format!(
            "held connection: keepidle {} -> {}",
            before.1, after.1
        ))
    } else {
        Err(format!(
            "held connection before {before:?}, after the reload {after:?}; journal: {}",
            journal_tail()
        ))
    }
}

/// An option the unit alone cannot grant: `setting` added to tcpmgm.toml, the restart must fail
/// with `said` in the journal; then the drop-in `name` (`body`) is added and tcpmgm restarts.
fn refused_until_dropped_in(
    setting: &str,
    said: &str,
    name: &str,
    body: &str,
) -> Result<(), String> {
    let config = "/etc/tcpmgm/tcpmgm.toml";
    let text = std::fs::read_to_string(config).map_err(|e| e.to_string())?;
    std::fs::write(config, format!("{text}{setting}\n")).map_err(|e| e.to_string())?;
    if systemctl(&["restart", "tcpmgm.service"]).is_ok() {
        return Err(format!(
            "tcpmgm started with `{setting}` and the unit's privileges alone"
        ));
    }
    let journal = journal_tail();
    if !journal.contains(said) {
        return Err(format!("the journal does not say \"{said}\": {journal}"));
    }
    let dir = "/etc/systemd/system/tcpmgm.service.d";
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    std::fs::write(format!("{dir}/{name}"), body).map_err(|e| e.to_string())?;
    systemctl(&["daemon-reload"])?;
    systemctl(&["reset-failed", "tcpmgm.service"])?;
    systemctl(&["restart", "tcpmgm.service"]).map(drop)
}

fn journal_tail() -> String {
    Command::new("journalctl")
        .args(["-u", "tcpmgm.service", "-n", "20", "--no-pager"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Kamailio's side of the connection from `port`, once Kamailio has accepted it.
fn wait_for_socket(port: u16) -> Result<OwnedFd, String> {
    let start = Instant::now();
    loop {
        match accepted_socket(port)? {
            Some(socket) => return Ok(socket),
            None if start.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(50));
            }
            None => return Err(format!("no Kamailio process holds the socket of :{port}")),
        }
    }
}

fn systemctl(args: &[&str]) -> Result<String, String> {
    let out = Command::new("systemctl")
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!(
            "systemctl {}: {}{text}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn show(unit: &str, property: &str) -> String {
    systemctl(&["show", "-p", property, "--value", unit]).unwrap_or_default()
}

fn wait_active(unit: &str) -> Result<(), String> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(120) {
        if systemctl(&["is-active", "--quiet", unit]).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let journal = Command::new("journalctl")
        .args(["-u", unit, "-n", "15", "--no-pager", "-o", "cat"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    Err(format!(
        "{unit} is {} after 120 s: {}; its journal:\n{journal}",
        show(unit, "ActiveState"),
        show(unit, "StatusText")
    ))
}

/// systemd's own record: tcpmgm became active (READY, after attaching) before Kamailio's main
/// process started.
fn ready_first() -> Result<String, String> {
    let ready: u64 = show("tcpmgm.service", "ActiveEnterTimestampMonotonic")
        .parse()
        .map_err(|e| format!("tcpmgm's ActiveEnterTimestampMonotonic: {e}"))?;
    let kamailio: u64 = show("kamailio.service", "ExecMainStartTimestampMonotonic")
        .parse()
        .map_err(|e| format!("Kamailio's ExecMainStartTimestampMonotonic: {e}"))?;
    if ready != 0 && ready < kamailio {
        Ok(format!(
            "ready {} ms before Kamailio",
            (kamailio - ready) / 1000
        ))
    } else {
        Err(format!(
            "tcpmgm ready at {ready} µs, Kamailio started at {kamailio} µs"
        ))
    }
}

fn expect_rule(got: (i32, i32, i32, i32), want: (i32, i32, i32, i32)) -> Result<String, String> {
    if got == want {
        Ok(format!("keepalive/idle/intvl/cnt {got:?}"))
    } else {
        Err(format!(
            "keepalive/idle/intvl/cnt {got:?}, the rule says {want:?}"
        ))
    }
}

/// Opens a connection to Kamailio and reads the options of the socket Kamailio accepted, from
/// inside Kamailio (pidfd_getfd).
fn kamailio_options() -> Result<(i32, i32, i32, i32), String> {
    let client = std::net::TcpStream::connect(KAMAILIO).map_err(|e| format!("connect: {e}"))?;
    let port = client.local_addr().map_err(|e| e.to_string())?.port();
    wait_for_socket(port).map(|s| options(&s))
}

/// An IPv4 socket address as /proc/net/tcp writes it.
fn proc_net(addr: std::net::SocketAddrV4) -> String {
    format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(addr.ip().octets()),
        addr.port()
    )
}

/// The inode of the TCP socket `local` -> `remote`, from /proc/net/tcp.
fn socket_inode(local: std::net::SocketAddrV4, remote: std::net::SocketAddrV4) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let (local, remote) = (proc_net(local), proc_net(remote));
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.get(1) == Some(&local.as_str()) && f.get(2) == Some(&remote.as_str()))
            .then(|| f.get(9)?.parse().ok())
            .flatten()
    })
}

/// A copy of Kamailio's socket `local` -> `remote`, taken from whichever of its processes holds
/// it.
fn kamailio_socket(
    local: std::net::SocketAddrV4,
    remote: std::net::SocketAddrV4,
) -> Result<Option<OwnedFd>, String> {
    let Some(inode) = socket_inode(local, remote) else {
        return Ok(None);
    };
    let link = format!("socket:[{inode}]");
    let procs = std::fs::read_to_string(format!("{CGROUP}/kamailio.service/cgroup.procs"))
        .map_err(|e| format!("Kamailio's cgroup: {e}"))?;
    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|t| t.to_string_lossy() == link) {
                let num: i32 = fd.file_name().to_string_lossy().parse().unwrap_or(-1);
                return borrow(pid, num).map(Some);
            }
        }
    }
    Ok(None)
}

/// The socket Kamailio accepted from our `peer_port`.
fn accepted_socket(peer_port: u16) -> Result<Option<OwnedFd>, String> {
    let kamailio: std::net::SocketAddrV4 = KAMAILIO.parse().expect("literal");
    kamailio_socket(
        kamailio,
        std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, peer_port),
    )
}

/// Sends Kamailio a request, which it forwards over a TCP connection of its own to a listener
/// here (see its configuration in xtask's vm/systemd.rs), and reads that connection's options
/// from inside Kamailio.
fn kamailio_outbound() -> Result<(i32, i32, i32, i32), String> {
    use std::io::Write as _;
    let relay = std::net::TcpListener::bind("127.0.0.2:5070").map_err(|e| e.to_string())?;
    let mut client = std::net::TcpStream::connect(KAMAILIO).map_err(|e| format!("connect: {e}"))?;
    client
        .write_all(
            b"OPTIONS sip:relay@127.0.0.1 SIP/2.0\r\n\
              Via: SIP/2.0/TCP 127.0.0.1:5099;branch=z9hG4bK-tcpmgm-1\r\n\
              Max-Forwards: 70\r\n\
              From: <sip:check@127.0.0.1>;tag=1\r\n\
              To: <sip:relay@127.0.0.1>\r\n\
              Call-ID: tcpmgm-check-1\r\n\
              CSeq: 1 OPTIONS\r\n\
              Content-Length: 0\r\n\r\n",
        )
        .map_err(|e| format!("sending the request: {e}"))?;
    // Kamailio forwards within the same 10 s the other checks give it, or the check fails.
    relay.set_nonblocking(true).map_err(|e| e.to_string())?;
    let start = Instant::now();
    let (_forwarded, from) = loop {
        match relay.accept() {
            Ok(accepted) => break accepted,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if start.elapsed() > Duration::from_secs(10) {
                    return Err("Kamailio did not forward the request within 10 s".into());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    };
    let std::net::SocketAddr::V4(from) = from else {
        return Err(format!("a connection from {from}"));
    };
    let to: std::net::SocketAddrV4 = "127.0.0.2:5070".parse().expect("literal");
    let start = Instant::now();
    loop {
        if let Some(socket) = kamailio_socket(from, to)? {
            return Ok(options(&socket));
        }
        if start.elapsed() > Duration::from_secs(10) {
            return Err(format!(
                "no Kamailio process holds the socket {from} -> {to}"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// pidfd_getfd (Linux 5.6): a descriptor of another process's socket.
fn borrow(pid: i32, fd: i32) -> Result<OwnedFd, String> {
    // SAFETY: plain syscalls; each returned descriptor is owned at once.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0);
        if pidfd < 0 {
            return Err(format!(
                "pidfd_open {pid}: {}",
                std::io::Error::last_os_error()
            ));
        }
        let pidfd = OwnedFd::from_raw_fd(pidfd as i32);
        let copy = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0);
        if copy < 0 {
            return Err(format!(
                "pidfd_getfd {pid}/{fd}: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(OwnedFd::from_raw_fd(copy as i32))
    }
}

fn getsockopt(fd: &OwnedFd, level: i32, name: i32) -> i32 {
    let mut v: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: an int-sized option into an int.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r == 0 { v } else { -1 }
}

fn options(fd: &OwnedFd) -> (i32, i32, i32, i32) {
    let tcp = libc::IPPROTO_TCP;
    (
        getsockopt(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE),
        getsockopt(fd, tcp, libc::TCP_KEEPIDLE),
        getsockopt(fd, tcp, libc::TCP_KEEPINTVL),
        getsockopt(fd, tcp, libc::TCP_KEEPCNT),
    )
}

/// The links on the slice (from `tcpmgm status`), after checking that bpftool lists one tcpmgm
/// program per hook.
fn one_per_hook() -> Result<Vec<(u64, u64)>, String> {
    let out = Command::new("bpftool")
        .args(["cgroup", "show", CGROUP])
        .output()
        .map_err(|e| e.to_string())?;
    let listing = String::from_utf8_lossy(&out.stdout);
    for p in PROGRAMS {
        if listing.matches(p).count() != 1 {
            return Err(format!("{p}: {listing}"));
        }
    }
    if listing.matches("tcpmgm_").count() != PROGRAMS.len() {
        return Err(listing.into_owned());
    }
    let status = Command::new("tcpmgm")
        .args(["status", "--cgroup", "sip.slice", "--json"])
        .output()
        .map_err(|e| e.to_string())?;
    let json: serde_json::Value =
        serde_json::from_slice(&status.stdout).map_err(|e| format!("status --json: {e}"))?;
    let programs = json[0]["kernel"]["programs"]
        .as_array()
        .ok_or_else(|| format!("no programs in {json}"))?;
    Ok(programs
        .iter()
        .map(|p| {
            (
                p["link_id"].as_u64().unwrap_or(0),
                p["program_id"].as_u64().unwrap_or(0),
            )
        })
        .collect())
}

fn sql(statement: &str) -> Result<(), String> {
    let out = Command::new("sqlite3")
        .args(["/var/lib/sip-rules/rules.db", statement])
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn reload() -> Result<String, String> {
    sql("UPDATE tcp_mgm SET keepidle = 42 WHERE id = 1;")?;
    systemctl(&["reload", "tcpmgm.service"])?;
    expect_rule(kamailio_options()?, (1, 42, 13, 5))
}

fn failed_reload() -> Result<String, String> {
    sql("INSERT INTO tcp_mgm (id, remote_addr) VALUES (99, 'not-an-address');")?;
    let refused = systemctl(&["reload", "tcpmgm.service"]).is_err();
    sql("DELETE FROM tcp_mgm WHERE id = 99;")?;
    if !refused {
        return Err("systemctl reload succeeded with a bad row in the table".into());
    }
    let still = expect_rule(kamailio_options()?, (1, 42, 13, 5))?;
    Ok(format!("systemctl reload failed, and {still}"))
}

/// A probe in a transient unit of the slice, so that both ends of its connections are governed.
fn slice_probe() -> Probe {
    let mut cmd = Command::new("systemd-run");
    cmd.args([
        "--quiet",
        "--pipe",
        "--collect",
        "--slice=sip.slice",
        "--unit=tcpmgm-check-probe",
        "/usr/local/bin/tcpmgm-probe",
    ]);
    Probe::start(cmd)
}

/// Runs `disrupt` on another thread while the probe keeps opening connections in the slice:
/// every connection made meanwhile must carry the rule, and afterwards the same links must hold
/// one program per hook (adopted, not attached a second time).
fn gapless(
    probe: &mut Probe,
    port: &mut u16,
    disrupt: impl FnOnce() -> Result<(), String> + Send + 'static,
) -> Result<String, String> {
    let before = one_per_hook()?;
    let worker = std::thread::spawn(disrupt);
    let mut made = 0;
    let mut wrong = Vec::new();
    // One listener for the whole run: the probe keeps each listener it opens.
    *port += 1;
    while !worker.is_finished() {
        let reply = probe.ask(&format!("pair 127.0.0.1:{port} 127.0.0.1:{port}"));
        made += 1;
        if reply.get("server_idle") != 42 || reply.get("client_idle") != 42 {
            wrong.push(format!("{reply:?}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    worker.join().map_err(|_| "the disruption panicked")??;
    wait_active("tcpmgm.service")?;
    let after = one_per_hook()?;
    // A disruption over before one connection was made proves nothing of a gap.
    if made == 0 {
        return Err("no connection was made while the daemon was disrupted".into());
    }
    if !wrong.is_empty() {
        return Err(format!(
            "{} of {made} connections made meanwhile did not carry the rule: {}",
            wrong.len(),
            wrong[0]
        ));
    }
    let links = |v: &[(u64, u64)]| v.iter().map(|(l, _)| *l).collect::<Vec<_>>();
    if links(&before) != links(&after) {
        return Err(format!("the links changed: {before:?} -> {after:?}"));
    }
    if before.iter().zip(&after).any(|(b, a)| b.1 == a.1) {
        return Err(format!(
            "the new daemon did not swap its programs in: {before:?} -> {after:?}"
        ));
    }
    Ok(format!(
        "{made} connections meanwhile, all governed; same links"
    ))
}

fn kill_daemon() -> Result<(), String> {
    let pid: i32 = show("tcpmgm.service", "MainPID")
        .parse()
        .map_err(|e| format!("MainPID: {e}"))?;
    let restarts = show("tcpmgm.service", "NRestarts");
    // SAFETY: a plain kill of the daemon's main process, by its id.
    if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
        return Err(format!(
            "kill -9 {pid}: {}",
            std::io::Error::last_os_error()
        ));
    }
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        let now: i32 = show("tcpmgm.service", "MainPID").parse().unwrap_or(0);
        if now != 0 && now != pid && systemctl(&["is-active", "--quiet", "tcpmgm.service"]).is_ok()
        {
            let after = show("tcpmgm.service", "NRestarts");
            if after == restarts {
                return Err(format!("NRestarts stayed {after}"));
            }
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err("tcpmgm did not come back within 60 s".into())
}

/// What the unit promises: exactly its capabilities, no new privileges, a system-call filter, a
/// read-only system except bpffs.
fn hardening() -> Result<String, String> {
    let pid = show("tcpmgm.service", "MainPID");
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let want = format!(
        "{:016x}",
        (1u64 << CAP_NET_ADMIN) | (1u64 << CAP_PERFMON) | (1u64 << CAP_BPF)
    );
    let mut faults = Vec::new();
    for cap in ["CapEff:", "CapPrm:", "CapBnd:"] {
        if field(cap) != want {
            faults.push(format!("{cap} {} (want {want})", field(cap)));
        }
    }
    if field("NoNewPrivs:") != "1" {
        faults.push(format!("NoNewPrivs: {}", field("NoNewPrivs:")));
    }
    if field("Seccomp:") != "2" {
        faults.push(format!("Seccomp: {}", field("Seccomp:")));
    }
    let mounts =
        std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).map_err(|e| e.to_string())?;
    let options = |mount_point: &str| {
        mounts.lines().rev().find_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.get(4) == Some(&mount_point)).then(|| f.get(5).map(|o| o.to_string()))?
        })
    };
    if !options("/").is_some_and(|o| o.starts_with("ro")) {
        faults.push(format!("/ is mounted {:?} for the daemon", options("/")));
    }
    if !options("/sys/fs/bpf").is_some_and(|o| o.starts_with("rw")) {
        faults.push(format!("/sys/fs/bpf is {:?}", options("/sys/fs/bpf")));
    }
    if faults.is_empty() {
        let exposure = Command::new("systemd-analyze")
            .args(["security", "--no-pager", "tcpmgm.service"])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .last()
                    .unwrap_or("")
                    .trim()
                    .to_owned()
            })
            .unwrap_or_default();
        Ok(format!(
            "capabilities {want}, NoNewPrivs, seccomp, read-only /; {exposure}"
        ))
    } else {
        Err(faults.join("; "))
    }
}
