//! What a fresh machine lacks: the eBPF toolchain, the tools the tests call, the VM's tools and
//! the database servers. Each step installs only what is missing, and says what it needs when
//! it cannot install it (not root, no `nightly` toolchain).
use std::path::Path;
use std::process::Command;

use anyhow::bail;

use crate::{on_path, output, status, succeeds};

const BPF_LINKER_VERSION: &str = "0.13.0";
/// How long apt-get waits for another apt or dpkg (unattended-upgrades on a freshly booted
/// cloud machine holds the lock for minutes) instead of failing at once.
pub const APT_LOCK_WAIT: [&str; 2] = ["-o", "DPkg::Lock::Timeout=600"];
const LLVM: &str = "22";

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).trim() == "0"
}

/// Installs Debian packages (none: nothing to do), or says what is missing when not root.
pub fn apt_install<S: AsRef<std::ffi::OsStr> + std::fmt::Display>(
    packages: &[S],
) -> anyhow::Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = packages.iter().map(ToString::to_string).collect();
    let list = list.join(" ");
    if !is_root() {
        bail!("missing Debian packages {list}: run as root, or `apt-get install -y {list}`");
    }
    eprintln!("xtask: apt-get install {list}");
    status(
        Command::new("apt-get")
            .args(APT_LOCK_WAIT)
            .args(["update", "-qq"]),
    )?;
    status(
        Command::new("apt-get")
            .args(APT_LOCK_WAIT)
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// Installs the Debian packages that provide `tools` (command, package) when a command is
/// missing from PATH.
pub fn tools(tools: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(command, _)| !on_path(command))
        .map(|(_, package)| *package)
        .collect();
    apt_install(&missing)
}

/// PostgreSQL and MariaDB on loopback for the database tests: installed from Debian's packages
/// when missing, started when stopped, with a `tcpmgm` login that may create databases (each
/// test makes its own), and on PostgreSQL a `tcpmgm_reader` login that tests grant only reading
/// (as an operator gives tcpmgm a role that may not create triggers). Returns the admin URLs the
/// tests read from the environment.
pub fn databases() -> anyhow::Result<Vec<(&'static str, String)>> {
    let have = |path: &str| Path::new(path).exists();
    let mut apt = Vec::new();
    if !have("/usr/bin/pg_ctlcluster") {
        apt.push("postgresql");
    }
    if !have("/usr/sbin/mariadbd") {
        apt.push("mariadb-server");
    }
    apt_install(&apt)?;
    for service in ["postgresql", "mariadb"] {
        status(
            Command::new("service")
                .args([service, "start"])
                .stdout(std::process::Stdio::null()),
        )?;
    }
    let sql_ok = |cmd: &mut Command| -> anyhow::Result<()> {
        // The servers take a moment to accept connections after `service start`.
        for _ in 0..30 {
            if succeeds(cmd) {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
        status(cmd)
    };
    sql_ok(
        Command::new("runuser")
            .args(["-u", "postgres", "--", "psql", "-qc"])
            .arg(
                "DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tcpmgm') THEN \
         CREATE ROLE tcpmgm LOGIN PASSWORD 'tcpmgm' CREATEDB; END IF; \
         IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tcpmgm_reader') THEN \
         CREATE ROLE tcpmgm_reader LOGIN PASSWORD 'tcpmgm'; END IF; END$$;",
            ),
    )?;
    sql_ok(Command::new("mysql").arg("-e").arg(
        "CREATE USER IF NOT EXISTS 'tcpmgm'@'127.0.0.1' IDENTIFIED BY 'tcpmgm'; \
         GRANT ALL ON `tcpmgm%`.* TO 'tcpmgm'@'127.0.0.1';",
    ))?;
    Ok(vec![
        (
            "TCPMGM_TEST_POSTGRES",
            "postgres://tcpmgm:tcpmgm@127.0.0.1:5432/postgres".into(),
        ),
        (
            "TCPMGM_TEST_MYSQL",
            "mysql://tcpmgm:tcpmgm@127.0.0.1:3306".into(),
        ),
    ])
}

/// Installs whatever is missing: nightly rust-src, bpf-linker on LLVM 22, bpftool, iproute2.
pub fn toolchain() -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]));
    if installed.is_empty() {
        bail!(
            "the `nightly` toolchain is missing: the eBPF programs build with it \
             (rustup toolchain install nightly --component rust-src)"
        );
    }
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("xtask: installing rust-src for the nightly toolchain");
        status(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    let mut apt = Vec::new();
    let linker_ok =
        output(Command::new("bpf-linker").arg("--version")).contains(BPF_LINKER_VERSION);
    if !linker_ok && !Path::new(&format!("/usr/lib/llvm-{LLVM}/bin/llvm-config")).exists() {
        apt.extend([
            format!("llvm-{LLVM}-dev"),
            format!("libpolly-{LLVM}-dev"),
            "libzstd-dev".into(),
            "zlib1g-dev".into(),
        ]);
    }
    for (command, package) in [("bpftool", "bpftool"), ("ip", "iproute2")] {
        if !on_path(command) {
            apt.push(package.into());
        }
    }
    apt_install(&apt)?;
    if !linker_ok {
        eprintln!(
            "xtask: building bpf-linker {BPF_LINKER_VERSION} on LLVM {LLVM} (about a minute)"
        );
        let prefix = format!("/usr/lib/llvm-{LLVM}");
        let path = format!("{prefix}/bin:{}", std::env::var("PATH").unwrap_or_default());
        status(
            Command::new("cargo")
                .args([
                    "install",
                    "bpf-linker",
                    "--version",
                    BPF_LINKER_VERSION,
                    "--locked",
                    "--no-default-features",
                ])
                .args(["--features", &format!("llvm-{LLVM}")])
                .env("LLVM_PREFIX", &prefix)
                .env("PATH", path),
        )?;
    }
    Ok(())
}

/// The C example of the application ABI (`tcpmgm-common/examples/socket_profile.c`), built
/// against the generated header and libbpf into `target/debug/tcpmgm-socket-profile`, where the
/// tests find it (installing gcc and libbpf-dev when missing).
pub fn c_example(root: &Path) -> anyhow::Result<std::path::PathBuf> {
    let mut missing = Vec::new();
    if !on_path("cc") {
        missing.push("gcc");
    }
    if !Path::new("/usr/include/bpf/bpf.h").exists() {
        missing.push("libbpf-dev");
    }
    apt_install(&missing)?;
    let out = root.join("target/debug/tcpmgm-socket-profile");
    std::fs::create_dir_all(out.parent().expect("target/debug"))?;
    status(
        Command::new("cc")
            .args([
                "-O2",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-std=c11",
                "-D_DEFAULT_SOURCE",
            ])
            .arg("-I")
            .arg(root.join("tcpmgm-common/include"))
            .arg(root.join("tcpmgm-common/examples/socket_profile.c"))
            .arg("-lbpf")
            .arg("-o")
            .arg(&out),
    )?;
    Ok(out)
}
