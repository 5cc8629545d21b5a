//! `cargo xtask vm systemd`: the deployment as an operator makes it, checked in a Debian 12 guest
//! that boots systemd.
//!
//! The root image is Debian 12 from debootstrap (systemd, Kamailio, iproute2, bpftool, man-db),
//! built once and cached under `target/vm/systemd`. Into a copy of it go the Debian package
//! (`cargo xtask deb`) and a newer build of it (the next Debian revision) for the upgrade, the
//! operator's tcpmgm.toml and a rule table, a Kamailio configuration that listens on TCP (with
//! its own keepalive settings, as operators write them), and a oneshot unit that runs
//! `tcpmgm-systemd-check` after boot. The guest boots twice. The first time the check installs
//! the package as an operator does (`apt install ./tcpmgm_*.deb`, then the configuration, the
//! SIP server's drop-in from the package's examples, `systemctl enable`) and powers off; the
//! second time it checks the deployment from boot on, then upgrades, removes and purges the
//! package. The check writes its results to the guest's second serial port, which QEMU writes
//! to a file here, and powers the guest off.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use super::initramfs::Initramfs;
use super::kernel::{Kernel, debian_mirror, walk};
use super::which;
use crate::{cargo, status};

/// The packages of the root image besides debootstrap's minimal base.
/// (dbus: systemd-run makes transient units through the bus.)
/// (man-db, bash-completion: the package's man pages and completions are checked in use.)
const PACKAGES: &str = "systemd,systemd-sysv,udev,dbus,iproute2,kamailio,kmod,bpftool,sqlite3,procps,man-db,bash-completion";

/// The virtio drivers the guest needs for its disk, in load order (the cloud kernel builds them
/// as modules and its package has no modules.dep for busybox's insmod).
const DISK_MODULES: [&str; 6] = [
    "virtio",
    "virtio_ring",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
];

const KAMAILIO_CFG: &str = r#"#!KAMAILIO
# Kamailio as the governed SIP server: TCP on loopback, with keepalive settings of its own that
# it applies to its connections itself, after accept() and around connect().
debug=2
log_stderror=no
fork=yes
children=1
tcp_children=2
disable_tcp=no
listen=tcp:127.0.0.1:5060
tcp_keepalive=yes
tcp_keepidle=600
tcp_keepintvl=60
tcp_keepcnt=3

request_route {
    # Every request goes on over TCP to 127.0.0.2:5070, so that Kamailio opens a connection.
    forward_tcp("127.0.0.2", 5070);
}
"#;

/// The rule the checks expect on Kamailio's connections: loopback peers get keepalive
/// 41 s / 13 s / 5.
const RULES: &str = "INSERT INTO tcp_mgm (id, proto, remote_addr, keepalive, keepidle, keepinterval, keepcount) \
                     VALUES (1, 'any', '127.0.0.0/8', 1, 41, 13, 5);";

/// The operator's configuration, which the guest puts in place of the package's after installing
/// it (see systemd_check.rs).
const TCPMGM_TOML: &str = r#"# The test deployment: Kamailio's slice, a SQLite table.
db = "sqlite:///var/lib/sip-rules/rules.db"
cgroup = "sip.slice"
create_cgroup = true
listeners = ["tcp:127.0.0.1:5060"]
"#;

const CHECK_UNIT: &str = r#"[Unit]
Description=tcpmgm deployment checks
After=multi-user.target
Wants=multi-user.target

[Service]
Type=oneshot
ExecStart=/usr/local/bin/tcpmgm-systemd-check /dev/ttyS1
ExecStopPost=/bin/systemctl --no-block poweroff
StandardOutput=journal+console

[Install]
WantedBy=multi-user.target
"#;

pub fn run(
    root: &Path,
    vm_dir: &Path,
    kernel: &Kernel,
    rebuild: bool,
    accel: &str,
    limit: Duration,
) -> anyhow::Result<()> {
    crate::setup::tools(&[
        ("debootstrap", "debootstrap"),
        ("mkfs.ext4", "e2fsprogs"),
        ("sqlite3", "sqlite3"),
    ])?;
    let dir = vm_dir.join("systemd");
    let base = base_image(&dir, rebuild)?;
    // The package, and the same build as the next Debian revision for the upgrade, each kept
    // aside at once: cargo-deb removes the other packages from its output directory.
    let kept = dir.join("packages");
    if kept.exists() {
        std::fs::remove_dir_all(&kept)?;
    }
    let mut packages = Vec::new();
    for (i, revision) in [None, Some(UPGRADE_REVISION)].into_iter().enumerate() {
        let deb = crate::deb::build(root, revision)?;
        let to = kept
            .join(i.to_string())
            .join(deb.file_name().context("a .deb file name")?);
        std::fs::create_dir_all(to.parent().expect("a parent"))?;
        std::fs::copy(&deb, &to).with_context(|| format!("copying {}", deb.display()))?;
        packages.push(to);
    }
    status(cargo(root).args([
        "build",
        "--package",
        "tcpmgm-tests",
        "--bin",
        "tcpmgm-probe",
        "--bin",
        "tcpmgm-systemd-check",
    ]))?;
    let stage = dir.join("stage");
    if stage.exists() {
        std::fs::remove_dir_all(&stage)?;
    }
    status(Command::new("cp").arg("-a").arg(&base).arg(&stage))?;
    install(root, &stage, kernel, &packages)?;
    let image = dir.join("root.img");
    status(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "root", "-d"])
            .arg(&stage)
            .arg(&image)
            .arg("2G"),
    )?;
    std::fs::remove_dir_all(&stage)?;
    let initrd = boot_initramfs(&dir, kernel)?;
    let started = Instant::now();
    // The first boot installs the package and powers off; its results come with the second's.
    boot(&dir, kernel, &initrd, &image, "install", accel, limit)?;
    let finished = boot(&dir, kernel, &initrd, &image, "checks", accel, limit)?;
    let text = std::fs::read_to_string(dir.join("results-checks.txt")).unwrap_or_default();
    for line in text.lines() {
        println!("[systemd] {}", line.trim_end_matches('\r'));
    }
    eprintln!("xtask: the systemd guest ran {:.0?}", started.elapsed());
    let console = dir.join("console-checks.txt");
    if !finished {
        bail!(
            "the systemd guest ran past {limit:?}; its console is in {}",
            console.display()
        );
    }
    let summary = text
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("systemd: "))
        .map(str::to_owned);
    let planned = format!("{CHECKS} passed, 0 failed");
    match summary {
        Some(s) if s == planned => Ok(()),
        // Fewer checks than planned is a run that skipped some: it proves less than it says.
        Some(s) if s.ends_with(" 0 failed") => bail!(
            "the systemd deployment checks: {s}, where {CHECKS} checks are planned (a check \
             added or removed in tests/src/bin/systemd_check.rs changes CHECKS in {})",
            file!()
        ),
        Some(s) => bail!("the systemd deployment checks failed: {s}"),
        None => bail!(
            "the checks never finished; the guest's console is in {}",
            console.display()
        ),
    }
}

/// The checks a deployment run makes, each one passed in a green run: both boots' together.
const CHECKS: u32 = 24;

/// The Debian revision of the newer build the guest upgrades to.
const UPGRADE_REVISION: &str = "2";

/// Boots the image once, its console in `console-NAME.txt` and its second serial port (the
/// check's results) in `results-NAME.txt`; false when it ran past `limit`.
fn boot(
    dir: &Path,
    kernel: &Kernel,
    initrd: &Path,
    image: &Path,
    name: &str,
    accel: &str,
    limit: Duration,
) -> anyhow::Result<bool> {
    let results = dir.join(format!("results-{name}.txt"));
    let console = dir.join(format!("console-{name}.txt"));
    for f in [&results, &console] {
        let _ = std::fs::remove_file(f);
    }
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", accel, "-smp", "2", "-m", "3072"])
        .args(["-nodefaults", "-display", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args([
            "-append",
            "console=ttyS0 root=/dev/vda rw quiet panic=-1 systemd.show_status=0",
        ])
        .arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", image.display()))
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-serial")
        .arg(format!("file:{}", results.display()));
    if accel == "kvm" {
        cmd.args(["-cpu", "host"]);
    }
    eprintln!(
        "xtask: booting Debian 12 with systemd on {} ({name}; console: {})",
        kernel.release,
        console.display()
    );
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .spawn()
        .context("qemu-system-x86_64")?;
    loop {
        if child.try_wait()?.is_some() {
            return Ok(true);
        }
        if started.elapsed() > limit {
            child.kill()?;
            child.wait()?;
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The cached Debian 12 tree, debootstrapped once.
fn base_image(dir: &Path, rebuild: bool) -> anyhow::Result<PathBuf> {
    let base = dir.join("base");
    let done = dir.join("base.packages");
    if !rebuild && std::fs::read_to_string(&done).is_ok_and(|p| p == PACKAGES) {
        return Ok(base);
    }
    if base.exists() {
        std::fs::remove_dir_all(&base)?;
    }
    std::fs::create_dir_all(dir)?;
    let mirror = debian_mirror()?;
    eprintln!("xtask: debootstrap of Debian 12 with {PACKAGES} (about a minute)");
    status(
        Command::new("debootstrap")
            .args(["--variant=minbase", &format!("--include={PACKAGES}")])
            .arg("bookworm")
            .arg(&base)
            .arg(&mirror)
            .stdout(Stdio::null()),
    )?;
    std::fs::write(&done, PACKAGES)?;
    Ok(base)
}

fn write(stage: &Path, path: &str, text: &str, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let dest = stage.join(path.trim_start_matches('/'));
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&dest, text).with_context(|| format!("writing {}", dest.display()))?;
    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn enable(stage: &Path, unit: &str, target: &str) -> anyhow::Result<()> {
    let wants = stage.join(format!("etc/systemd/system/{target}.wants"));
    std::fs::create_dir_all(&wants)?;
    let link = wants.join(unit);
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(format!("/etc/systemd/system/{unit}"), link)?;
    Ok(())
}

/// Puts the packages, the operator's configuration, the checks and the kernel's modules into
/// `stage`. The guest installs the first package itself, on its first boot.
fn install(root: &Path, stage: &Path, kernel: &Kernel, packages: &[PathBuf]) -> anyhow::Result<()> {
    let debug = root.join("target/debug");
    for (name, to) in [
        ("tcpmgm-probe", "usr/local/bin/tcpmgm-probe"),
        ("tcpmgm-systemd-check", "usr/local/bin/tcpmgm-systemd-check"),
    ] {
        super::strip(&debug.join(name), &stage.join(to))?;
    }
    // In the order the guest installs them (see systemd_check.rs).
    let debs = stage.join("root/debs");
    std::fs::create_dir_all(&debs)?;
    for (i, deb) in packages.iter().enumerate() {
        let name = deb.file_name().context("a .deb file name")?;
        let dir = debs.join(i.to_string());
        std::fs::create_dir_all(&dir)?;
        std::fs::copy(deb, dir.join(name))?;
    }
    write(stage, "root/tcpmgm.toml", TCPMGM_TOML, 0o644)?;
    write(stage, "etc/kamailio/kamailio.cfg", KAMAILIO_CFG, 0o644)?;
    let db = stage.join("var/lib/sip-rules/rules.db");
    std::fs::create_dir_all(db.parent().expect("a parent"))?;
    let _ = std::fs::remove_file(&db);
    status(
        Command::new(root.join("target/release/tcpmgm"))
            .args(["db", "init", "--db"])
            .arg(format!("sqlite://{}", db.display()))
            .stdout(Stdio::null()),
    )?;
    status(Command::new("sqlite3").arg(&db).arg(RULES))?;
    write(
        stage,
        "etc/systemd/system/tcpmgm-check.service",
        CHECK_UNIT,
        0o644,
    )?;
    enable(stage, "tcpmgm-check.service", "multi-user.target")?;
    // No login prompt on the console: the checks run unattended.
    let _ = std::fs::remove_file(
        stage.join("etc/systemd/system/getty.target.wants/getty@tty1.service"),
    );
    write(stage, "etc/hostname", "tcpmgm-systemd\n", 0o644)?;
    write(stage, "etc/fstab", "/dev/vda / ext4 rw 0 1\n", 0o644)?;
    // The kernel's modules (veth, sock_diag, ...) where kmod finds them, with their index.
    let modules = stage.join("usr/lib/modules").join(&kernel.release);
    std::fs::create_dir_all(modules.parent().expect("a parent"))?;
    status(
        Command::new("cp")
            .arg("-a")
            .arg(&kernel.module_tree)
            .arg(&modules),
    )?;
    status(
        Command::new("chroot")
            .arg(stage)
            .args(["depmod", &kernel.release]),
    )?;
    // tcpmgm reads HZ from the kernel's config, as on any Debian host.
    std::fs::copy(
        &kernel.config,
        stage.join(format!("boot/config-{}", kernel.release)),
    )?;
    Ok(())
}

/// A small initramfs that loads the disk drivers, mounts the root image and hands over to its
/// systemd.
fn boot_initramfs(dir: &Path, kernel: &Kernel) -> anyhow::Result<PathBuf> {
    let mut fs = Initramfs::new();
    fs.copy("bin/busybox", &which("busybox")?)?;
    let mut found = Vec::new();
    walk(&kernel.module_tree, &mut |path| {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        for m in DISK_MODULES {
            if name == format!("{m}.ko") || name == format!("{m}.ko.xz") {
                found.push((m, path.to_path_buf()));
            }
        }
    })?;
    let mut script = String::from(
        "#!/bin/busybox sh\n/bin/busybox --install -s /bin\nmount -t proc proc /proc\nmount -t sysfs sysfs /sys\nmount -t devtmpfs devtmpfs /dev\n",
    );
    for (i, m) in DISK_MODULES.iter().enumerate() {
        // Kernels that build one of these in have no module for it.
        let Some((_, path)) = found.iter().find(|(name, _)| name == m) else {
            continue;
        };
        let guest = format!("lib/modules/{i}-{m}.ko");
        if path.extension().and_then(|e| e.to_str()) == Some("xz") {
            let out = Command::new("xz").arg("-dc").arg(path).output()?;
            fs.file(&guest, out.stdout, 0o644);
        } else {
            fs.copy(&guest, path)?;
        }
        script.push_str(&format!("insmod /{guest}\n"));
    }
    script.push_str(
        "for i in $(seq 50); do [ -b /dev/vda ] && break; sleep 0.1; done\n\
         mkdir -p /newroot\nmount -t ext4 /dev/vda /newroot || { echo 'no root disk'; poweroff -f; }\n\
         mount --move /dev /newroot/dev\nexec switch_root /newroot /sbin/init\n",
    );
    fs.file("init", script.into_bytes(), 0o755);
    fs.write(&dir.join("boot.cpio"))
}
