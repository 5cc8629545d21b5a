//! `cargo xtask vm`: tcpmgm on Debian's own kernels, in QEMU.
//!
//! The guest boots a Debian cloud kernel (`kernel.rs`) straight into an initramfs
//! (`initramfs.rs`) that holds busybox, the tools the tests call (ip, bpftool, ss), tcpmgm, the
//! probe and the kernel-facing test binaries of this workspace's debug build. Its init mounts
//! what a Debian host has (cgroup v2 at /sys/fs/cgroup, bpffs, tmpfs), loads the modules the
//! tests need, runs the test binaries and powers off; the host reads the serial console.
//!
//! KVM does not run guests on this kind of machine, so the guest runs under TCG (software
//! emulation) unless `--accel kvm` is given: about 2.5 s to userspace.
//!
//! The tests that need PostgreSQL or MariaDB run on the host only (`plan::HOST_ONLY` names them):
//! the guest has no database servers, and those tests exercise the databases, not the kernel.
//! Each guest's run is held to the plan: every other selected test of every binary must run.
pub mod initramfs;
pub mod kernel;
pub mod plan;
pub mod systemd;
pub mod table;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::{cargo, setup, status};
use initramfs::Initramfs;
use kernel::Kernel;

/// What the guest's init does after setting up.
pub enum Guest {
    /// Run the test binaries with these harness arguments, each as `plan` says, then power off.
    Test {
        harness_args: Vec<String>,
        plan: Vec<plan::Planned>,
    },
    /// An interactive shell on the console; `poweroff -f` (or exit) ends it.
    Shell,
}

/// The Debian packages the VM needs on the host.
pub fn tools() -> anyhow::Result<()> {
    setup::tools(&[
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("busybox", "busybox-static"),
        ("strip", "binutils"),
        ("xz", "xz-utils"),
        ("dpkg-deb", "dpkg"),
        ("ss", "iproute2"),
        ("nsenter", "util-linux"),
        ("promtool", "prometheus"),
    ])?;
    // A dynamically linked busybox (Debian's `busybox`) cannot serve as the guest's /bin.
    let ldd = Command::new("ldd").arg(which("busybox")?).output()?;
    if ldd.status.success() {
        setup::apt_install(&["busybox-static"])?;
    }
    Ok(())
}

pub fn which(tool: &str) -> anyhow::Result<PathBuf> {
    let out = crate::output(Command::new("sh").args(["-c", &format!("command -v {tool}")]));
    let path = out.trim();
    if path.is_empty() {
        bail!("{tool} is not on PATH");
    }
    Ok(std::fs::canonicalize(path)?)
}

/// The test binaries and the probe (a debug build) and tcpmgm (optimised), built first.
pub struct Build {
    pub tcpmgm: PathBuf,
    pub probe: PathBuf,
    /// The application ABI's C example.
    pub c_example: PathBuf,
    /// Integration test executables, with their target names.
    pub tests: Vec<(String, PathBuf)>,
}

pub fn build(root: &Path, only: &[String]) -> anyhow::Result<Build> {
    status(cargo(root).args(["build", "--workspace", "--exclude", "tcpmgm-ebpf", "--bins"]))?;
    // The daemon optimised, as users run it: under QEMU's emulation every instruction costs,
    // and a debug daemon spends several times an optimised one's on a start, a reload or a
    // large table. It is the build `cargo xtask deb` packages (CI runs that just before).
    let release = crate::deb::release_build(root)?;
    let out = cargo(root)
        .args([
            "test",
            "--package",
            "tcpmgm-tests",
            "--tests",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the tests failed");
    }
    let mut tests = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_test = msg["reason"] == "compiler-artifact"
            && msg["profile"]["test"] == true
            && msg["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "test"));
        if let (true, Some(exe), Some(name)) = (
            is_test,
            msg["executable"].as_str(),
            msg["target"]["name"].as_str(),
        ) && (only.is_empty() || only.iter().any(|o| o == name))
        {
            tests.push((name.to_owned(), PathBuf::from(exe)));
        }
    }
    if tests.is_empty() {
        bail!("no test binary matched {only:?}");
    }
    // Stripped copies, taken now: every kernel then runs the same build, whatever happens to
    // target/ meanwhile.
    let debug = root.join("target/debug");
    let scratch = root.join("target/vm/stripped");
    std::fs::create_dir_all(&scratch)?;
    let tests = tests
        .into_iter()
        .map(|(name, exe)| Ok((name.clone(), strip(&exe, &scratch.join(&name))?)))
        .collect::<anyhow::Result<_>>()?;
    Ok(Build {
        c_example: crate::setup::c_example(root)?,
        tcpmgm: strip(&release.join("tcpmgm"), &scratch.join("tcpmgm"))?,
        probe: strip(&debug.join("tcpmgm-probe"), &scratch.join("tcpmgm-probe"))?,
        tests,
    })
}

/// A copy of `from` without its debug info (a debug test binary shrinks about sevenfold;
/// symbols stay for backtraces).
fn strip(from: &Path, to: &Path) -> anyhow::Result<PathBuf> {
    status(
        Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(to)
            .arg(from),
    )?;
    Ok(to.to_path_buf())
}

/// The guest's root filesystem for `kernel`.
fn initramfs(
    vm_dir: &Path,
    kernel: &Kernel,
    build: &Build,
    guest: &Guest,
) -> anyhow::Result<PathBuf> {
    let mut fs = Initramfs::new();
    fs.copy("bin/busybox", &which("busybox")?)?;
    for (tool, at) in [
        ("ip", "usr/bin/ip"),
        ("ss", "usr/bin/ss"),
        ("nsenter", "usr/bin/nsenter"),
        ("promtool", "usr/bin/promtool"),
        ("setpriv", "usr/bin/setpriv"),
    ] {
        fs.program(at, &which(tool)?)?;
    }
    let bpftool = match &kernel.bpftool {
        Some(own) => own.clone(),
        None => which("bpftool")?,
    };
    fs.program("usr/sbin/bpftool", &bpftool)?;
    fs.program("t/tcpmgm", &build.tcpmgm)?;
    fs.program("t/tcpmgm-probe", &build.probe)?;
    fs.program("t/tcpmgm-socket-profile", &build.c_example)?;
    // The tests find tcpmgm and the probe in the parent of their own directory, as in target/.
    for (name, exe) in &build.tests {
        fs.program(&format!("t/deps/{name}"), exe)?;
    }
    for (i, module) in kernel.modules.iter().enumerate() {
        fs.copy(&format!("lib/modules/{i}.ko"), module)?;
    }
    // Where tcpmgm reads HZ from, as on a Debian host.
    fs.copy(&format!("boot/config-{}", kernel.release), &kernel.config)?;
    fs.file(
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
            .to_vec(),
        0o644,
    );
    fs.file(
        "etc/group",
        b"root:x:0:\nnogroup:x:65534:\n".to_vec(),
        0o644,
    );
    fs.file(
        "init",
        init_script(guest, kernel.series.name).into_bytes(),
        0o755,
    );
    let path = vm_dir.join(format!("initramfs-{}.cpio", kernel.series.name));
    fs.write(&path)
}

/// Marks the guest prints for the host.
const EXIT_MARK: &str = "TCPMGM-VM-EXIT";
const DONE_MARK: &str = "TCPMGM-VM-DONE";

/// The guest's init for kernel series `series`. Debian's kernels from 6.1 on run the outcome
/// tracers (BTF tracing programs that read socket storage), which the tests then require.
fn init_script(guest: &Guest, series: &str) -> String {
    let tracers = u8::from(series != "5.10");
    let mut s = format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root NO_COLOR=1
export TCPMGM_TEST_EXPECT_TRACERS={tracers}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /dev/shm
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
hostname tcpmgm-vm
ip link set lo up
for m in /lib/modules/*.ko; do insmod "$m" || echo "insmod $m failed"; done
echo "kernel $(uname -r)"
/t/tcpmgm features || echo "tcpmgm features failed"
"#
    );
    match guest {
        Guest::Shell => s.push_str(
            r#"echo "tcpmgm is /t/tcpmgm; the test binaries are in /t/deps; poweroff -f ends the VM"
cd /t
setsid cttyhack sh -l
poweroff -f
"#,
        ),
        Guest::Test { harness_args, plan } => {
            s.push_str("cd /t\n");
            for planned in plan {
                let name = &planned.name;
                let args: Vec<String> = ["--test-threads=2".to_owned()]
                    .iter()
                    .chain(&planned.skips)
                    .chain(harness_args)
                    .map(|a| sh_quote(a))
                    .collect();
                s.push_str(&format!(
                    "echo \"==> {name}\"\n./deps/{name} {args} 2>&1\necho \"{EXIT_MARK} {name} $?\"\n",
                    args = args.join(" ")
                ));
            }
            s.push_str(&format!("echo {DONE_MARK}\npoweroff -f\n"));
        }
    }
    s
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// What one kernel's run showed.
#[derive(Default)]
pub struct Outcome {
    pub passed: u64,
    pub failed: u64,
    /// Tests the harness left out: the filters given, and the host-only tests.
    pub filtered: u64,
    /// What each test binary's harness reported, by the binary's name.
    pub binaries: Vec<(String, Counts)>,
    /// Test binaries that exited non-zero.
    pub failed_binaries: Vec<String>,
    /// Each panic the guest printed: the test, where, and the first line of its message.
    pub failures: Vec<String>,
    pub finished: bool,
    pub features: Vec<String>,
}

/// One harness's "test result" line.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Counts {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
    pub filtered: u64,
}

impl Counts {
    fn read(result: &str) -> Counts {
        Counts {
            passed: count(result, " passed"),
            failed: count(result, " failed"),
            ignored: count(result, " ignored"),
            filtered: count(result, " filtered out"),
        }
    }
}

impl Outcome {
    /// Whether the guest's kernel stopped before its init printed anything (a panic or an oops
    /// while booting, as QEMU's emulation has caused on 6.12: an `int3` oops in the scheduler's
    /// clock, no tcpmgm code loaded yet). Such a run says nothing of the tests.
    pub fn died_before_init(&self) -> bool {
        !self.finished && self.features.is_empty() && self.binaries.is_empty() && self.passed == 0
    }

    /// How this run departs from `plan`: a binary with no result, or one that ran (passed,
    /// failed or ignored) or left out a number of tests other than planned.
    pub fn departures(&self, plan: &[plan::Planned]) -> Vec<String> {
        let mut out = Vec::new();
        for p in plan {
            let Some((_, c)) = self.binaries.iter().find(|(name, _)| *name == p.name) else {
                out.push(format!("{}: no test result", p.name));
                continue;
            };
            let ran = c.passed + c.failed + c.ignored;
            if ran != p.run || c.filtered != p.by_filters + p.host_only {
                out.push(format!(
                    "{}: ran {ran} and left out {}, planned {} and {} ({} by the filters, {} host-only)",
                    p.name,
                    c.filtered,
                    p.run,
                    p.by_filters + p.host_only,
                    p.by_filters,
                    p.host_only
                ));
            }
        }
        out
    }
}

/// The QEMU command line for a guest that boots `kernel` with `initrd`.
pub fn qemu(kernel: &Path, initrd: Option<&Path>, append: &str, accel: &str) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", accel, "-smp", "2", "-m", "3072"])
        .args(["-nographic", "-no-reboot", "-nodefaults"])
        .args(["-serial", "stdio"])
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", append]);
    if accel == "kvm" {
        cmd.args(["-cpu", "host"]);
    }
    if let Some(initrd) = initrd {
        cmd.arg("-initrd").arg(initrd);
    }
    cmd
}

const APPEND: &str = "console=ttyS0 panic=-1 quiet loglevel=3";

/// Boots the guest for `kernel` and runs what `guest` says. With `Guest::Test`, prints the
/// console as it comes and returns the tally.
pub fn run(
    vm_dir: &Path,
    kernel: &Kernel,
    build: &Build,
    guest: &Guest,
    accel: &str,
    limit: Duration,
) -> anyhow::Result<Outcome> {
    let initrd = initramfs(vm_dir, kernel, build, guest)?;
    let mut cmd = qemu(&kernel.vmlinuz, Some(&initrd), APPEND, accel);
    if let Guest::Shell = guest {
        status(&mut cmd)?;
        return Ok(Outcome::default());
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("qemu-system-x86_64")?;
    let pid = child.id();
    let started = Instant::now();
    // A watchdog: the guest is killed (by its pid) when it overruns, so a hung kernel fails
    // the run instead of holding CI.
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(limit).is_err() {
            eprintln!("xtask: the VM ran past {limit:?}; stopping it");
            let _ = nix_kill(pid);
        }
    });
    let series = kernel.series.name;
    let mut outcome = Outcome::default();
    let mut in_features = false;
    let mut panicked: Option<String> = None;
    // The binary whose output this is, until its harness reports its result.
    let mut binary: Option<String> = None;
    let reader = BufReader::new(child.stdout.take().context("qemu's stdout")?);
    for line in reader.split(b'\n') {
        let line = String::from_utf8_lossy(&line?)
            .trim_end_matches('\r')
            .to_owned();
        // Strip the terminal codes the firmware prints before the kernel.
        let clean: String = line.chars().filter(|c| !c.is_control()).collect();
        println!("[{series}] {clean}");
        if clean.starts_with("tcpmgm features") || clean.starts_with("kernel ") {
            in_features = true;
        } else if let Some(name) = clean.strip_prefix("==> ") {
            in_features = false;
            binary = Some(name.to_owned());
        }
        if in_features {
            outcome.features.push(clean.clone());
        }
        if let Some(at) = panicked.take() {
            let message: String = clean.chars().take(300).collect();
            outcome.failures.push(format!("{at} {message}"));
        }
        if let Some(at) = panic_site(&clean) {
            panicked = Some(at);
        }
        if let Some(rest) = clean.strip_prefix("test result: ") {
            let counts = Counts::read(rest);
            outcome.passed += counts.passed;
            outcome.failed += counts.failed;
            outcome.filtered += counts.filtered;
            if let Some(name) = binary.take() {
                outcome.binaries.push((name, counts));
            }
        } else if let Some(rest) = clean.strip_prefix(EXIT_MARK) {
            let mut words = rest.split_whitespace();
            if let (Some(name), Some(code)) = (words.next(), words.next())
                && code != "0"
            {
                outcome
                    .failed_binaries
                    .push(format!("{name} (exit {code})"));
            }
        } else if clean == DONE_MARK {
            outcome.finished = true;
        }
    }
    let st = child.wait()?;
    let _ = done_tx.send(());
    let _ = watchdog.join();
    eprintln!(
        "xtask: VM {series} ({}) ended after {:.0?} ({st})",
        kernel.release,
        started.elapsed()
    );
    Ok(outcome)
}

fn nix_kill(pid: u32) -> std::io::Result<()> {
    let st = Command::new("kill").arg(pid.to_string()).status()?;
    if st.success() {
        Ok(())
    } else {
        Err(std::io::Error::other("kill failed"))
    }
}

/// "TEST at FILE:LINE:COL:" from the harness's "thread 'TEST' panicked at FILE:LINE:COL:".
fn panic_site(line: &str) -> Option<String> {
    let rest = line.strip_prefix("thread '")?;
    let (test, rest) = rest.split_once("' panicked at ")?;
    Some(format!("{test} at {rest}"))
}

/// The number before `what` in "ok. 12 passed; 0 failed; ...".
fn count(text: &str, what: &str) -> u64 {
    text.split(';')
        .find_map(|part| part.trim().strip_suffix(what.trim()))
        .and_then(|n| {
            n.trim()
                .trim_start_matches("ok.")
                .trim_start_matches("FAILED.")
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::{Counts, Outcome, count, panic_site, plan::Planned};

    #[test]
    fn a_run_is_held_to_its_plan() {
        let plan = |name: &str, run, host_only| Planned {
            name: name.to_owned(),
            skips: Vec::new(),
            run,
            by_filters: 1,
            host_only,
        };
        let plans = [plan("kernel", 20, 0), plan("push", 3, 6)];
        let result = |r: &str| Counts::read(r);
        let mut o = Outcome::default();
        // Nothing from the guest's init: its kernel stopped while booting.
        assert!(o.died_before_init());
        // The init's report came: the kernel booted, whatever happened next.
        o.features.push("kernel 6.12.117+deb13-cloud-amd64".into());
        assert!(!o.died_before_init());
        o.features.clear();
        o.binaries.push((
            "kernel".into(),
            result(
                "ok. 20 passed; 0 failed; 0 ignored; 0 measured; 1 filtered out; finished in 9s",
            ),
        ));
        assert_eq!(o.departures(&plans), ["push: no test result"]);
        // A run that left out more than the plan (a skip that matched too much) departs.
        o.binaries.push((
            "push".into(),
            result("ok. 2 passed; 0 failed; 0 ignored; 0 measured; 8 filtered out; finished in 1s"),
        ));
        assert_eq!(
            o.departures(&plans),
            ["push: ran 2 and left out 8, planned 3 and 7 (1 by the filters, 6 host-only)"]
        );
        assert!(!o.died_before_init(), "binaries reported");
        o.binaries[1].1 =
            result("ok. 3 passed; 0 failed; 0 ignored; 0 measured; 7 filtered out; finished in 1s");
        assert!(o.departures(&plans).is_empty());
    }

    #[test]
    fn the_harness_counts_are_read() {
        let line =
            "ok. 20 passed; 1 failed; 0 ignored; 0 measured; 10 filtered out; finished in 23.59s";
        assert_eq!(count(line, " passed"), 20);
        assert_eq!(count(line, " failed"), 1);
        assert_eq!(count(line, " filtered out"), 10);
        let failed =
            "FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 2.88s";
        assert_eq!(count(failed, " passed"), 0);
        assert_eq!(
            panic_site("thread 'ends' panicked at tests/tests/outcomes.rs:254:5:").as_deref(),
            Some("ends at tests/tests/outcomes.rs:254:5:")
        );
        assert_eq!(panic_site("test ends ... FAILED"), None);
        assert_eq!(count(failed, " failed"), 1);
    }
}
