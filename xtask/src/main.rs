//! `cargo xtask run` and `cargo xtask test`: set up what a fresh machine lacks, then build and run.
//!
//! This crate depends on nothing of tcpmgm's own, so it builds before the eBPF toolchain exists
//! and can install it.
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "tcpmgm's developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Set up, build, seed an example SQLite database and run tcpmgm on a demo cgroup.
    /// Arguments after `--` go to `tcpmgm run`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, then run the whole test suite (the kernel tests need root).
    /// Arguments after `--` go to `cargo test`.
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Measure compile/load/reload times, per-invocation kernel cost, connection rates and map
    /// memory (root); writes BENCHMARKS.md. Arguments after `--` go to the bench.
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// rustfmt and clippy (-D warnings) on every crate, the eBPF one on its own target.
    Lint,
    /// Only install what is missing.
    Setup,
}

const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM: &str = "22";

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let root = workspace_root();
    match cli.task {
        Task::Setup => setup(),
        Task::Bench { args } => {
            setup()?;
            status(cargo(&root).args([
                "build",
                "--release",
                "--package",
                "tcpmgm-tests",
                "--bin",
                "tcpmgm-bench",
                // The bench's peer process.
                "--bin",
                "tcpmgm-probe",
            ]))?;
            status(
                Command::new(root.join("target/release/tcpmgm-bench"))
                    .arg("--out")
                    .arg(root.join("BENCHMARKS.md"))
                    .args(&args)
                    .current_dir(&root),
            )
        }
        Task::Lint => {
            setup()?;
            status(cargo(&root).args(["fmt", "--all", "--", "--check"]))?;
            status(cargo(&root).args([
                "clippy",
                "--workspace",
                "--exclude",
                "tcpmgm-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))?;
            status(
                Command::new("rustup")
                    .args([
                        "run",
                        "nightly",
                        "cargo",
                        "clippy",
                        "--target",
                        "bpfel-unknown-none",
                        "-Z",
                        "build-std=core",
                        "--",
                        "-D",
                        "warnings",
                    ])
                    .current_dir(root.join("tcpmgm-ebpf")),
            )
        }
        Task::Test { args } => {
            setup()?;
            let databases = databases()?;
            // The CLI tests run the `tcpmgm` binary, which `cargo test` alone does not build.
            status(cargo(&root).args([
                "build",
                "--workspace",
                "--exclude",
                "tcpmgm-ebpf",
                "--bins",
            ]))?;
            let mut cmd = cargo(&root);
            cmd.args(["test", "--workspace", "--exclude", "tcpmgm-ebpf"])
                .args(&args)
                .envs(databases);
            status(&mut cmd)
        }
        Task::Run { args } => {
            setup()?;
            status(cargo(&root).args(["build", "--release", "--package", "tcpmgm-user"]))?;
            let tcpmgm = root.join("target/release/tcpmgm");
            let has = |flag: &str| {
                args.iter()
                    .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
            };
            let mut cmd = Command::new(&tcpmgm);
            cmd.arg("run");
            if !has("--db") {
                let db = "tcpmgm.db";
                if !Path::new(db).exists() {
                    status(Command::new(&tcpmgm).args(["db", "init", "--examples", "--db", db]))?;
                }
                cmd.args(["--db", &format!("sqlite://{db}")]);
            }
            if !has("--cgroup") {
                // A demo: Ctrl-C takes the policy off and removes the demo cgroup.
                cmd.args([
                    "--cgroup",
                    "tcpmgm-demo",
                    "--create-cgroup",
                    "--detach-on-exit",
                ]);
            }
            cmd.args(&args);
            eprintln!("xtask: {cmd:?}");
            status(&mut cmd)
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_path_buf()
}

fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root);
    cmd
}

fn status(cmd: &mut Command) -> anyhow::Result<()> {
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed ({st})");
    }
    Ok(())
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn output(cmd: &mut Command) -> String {
    cmd.output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn on_path(tool: &str) -> bool {
    succeeds(Command::new("sh").args(["-c", &format!("command -v {tool}")]))
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).trim() == "0"
}

/// Installs Debian packages (none: nothing to do), or says what is missing when not root.
fn apt_install<S: AsRef<std::ffi::OsStr> + std::fmt::Display>(
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
    status(Command::new("apt-get").arg("update").arg("-qq"))?;
    status(
        Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// PostgreSQL and MariaDB on loopback for the database tests: installed from Debian's packages
/// when missing, started when stopped, with a `tcpmgm` login that may create databases (each
/// test makes its own). Returns the admin URLs the tests read from the environment.
fn databases() -> anyhow::Result<Vec<(&'static str, String)>> {
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
         CREATE ROLE tcpmgm LOGIN PASSWORD 'tcpmgm' CREATEDB; END IF; END$$;",
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
fn setup() -> anyhow::Result<()> {
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
    if !linker_ok {
        let llvm_dev = format!("llvm-{LLVM}-dev");
        if !Path::new(&format!("/usr/lib/llvm-{LLVM}/bin/llvm-config")).exists() {
            apt.extend([
                llvm_dev,
                format!("libpolly-{LLVM}-dev"),
                "libzstd-dev".into(),
                "zlib1g-dev".into(),
            ]);
        }
    }
    if !on_path("bpftool") {
        apt.push("bpftool".into());
    }
    if !on_path("ip") {
        apt.push("iproute2".into());
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
