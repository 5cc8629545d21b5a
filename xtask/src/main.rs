//! `cargo xtask run` and `cargo xtask test`: set up what a fresh machine lacks, then build and run.
//! `cargo xtask vm`: the same tests on Debian's own kernels in QEMU, and the systemd deployment.
//! `cargo xtask fuzz`: the fuzz targets of `fuzz/`, a while each.
//! `cargo xtask deb`: the Debian package, checked with lintian.
//!
//! Of tcpmgm's own crates this one depends only on tcpmgm-common (the ABI, for the C header),
//! which builds without the eBPF toolchain: xtask builds before that toolchain exists
//! and can install it.
mod deb;
mod fuzz;
mod header;
mod imports;
mod setup;
mod vm;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

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
        /// Only the soak: one daemon under steady load for MINUTES, its memory, fds and map
        /// memory sampled every 10 s; replaces BENCHMARKS.md's Soak section and nothing else.
        #[arg(long, value_name = "MINUTES")]
        soak: Option<u64>,
        /// Only the fleet: N daemons following one PostgreSQL table, from a commit to the
        /// change enforced in every cgroup; replaces BENCHMARKS.md's Fleet section only.
        #[arg(long, value_name = "N", conflicts_with = "soak")]
        fleet: Option<u64>,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// rustfmt and clippy (-D warnings) on every crate, the eBPF one on its own target; the C
    /// header of the application ABI checked against its source; no import loop between modules.
    Lint,
    /// Write the C header of the application ABI (tcpmgm-common/include/tcpmgm.h).
    Header,
    /// Run the fuzz targets of fuzz/ (cargo-fuzz on the nightly toolchain, installed when
    /// missing) for SECONDS each; fails naming each target that crashed and its input.
    Fuzz {
        /// How long each target runs.
        #[arg(long = "time", value_name = "SECONDS", default_value = "30")]
        seconds: u64,
        /// Build the targets unoptimised: a shorter build, whose runs try far fewer inputs a
        /// second. For CI's smoke run, where the build is most of the step; fuzzing for real
        /// wants the default, optimised build.
        #[arg(long)]
        dev: bool,
        /// Only these targets; all of them by default.
        #[arg(value_name = "TARGET")]
        targets: Vec<String>,
    },
    /// Build the Debian package (target/debian/tcpmgm_VERSION_amd64.deb: the binary, the unit,
    /// /etc/tcpmgm/tcpmgm.toml, man pages, completions) and check it with lintian, which must
    /// report no error.
    Deb {
        /// The Debian revision [default: 1].
        #[arg(long)]
        revision: Option<String>,
    },
    /// Only install what is missing.
    Setup,
    /// The Linux test VM: Debian's own kernels (5.10, 6.1, 6.12) in QEMU.
    Vm {
        #[command(subcommand)]
        task: VmTask,
    },
}

#[derive(Subcommand)]
enum VmTask {
    /// Run the kernel-facing tests inside the guest and print their results. Arguments after
    /// `--` go to each test binary (a name filter, `--exact`, ...).
    Test {
        /// 5.10 (Debian 11), 6.1 (Debian 12), 6.12 (Debian 13), or all of them in turn.
        #[arg(long, default_value = "all")]
        kernel: String,
        /// Only these test files (tests/tests/NAME.rs); all of them by default.
        #[arg(long = "test", value_name = "NAME")]
        tests: Vec<String>,
        #[command(flatten)]
        vm: VmArgs,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// A shell in the guest, with tcpmgm, the probe, the test binaries, bpftool and iproute2.
    Shell {
        #[arg(long, default_value = "6.1")]
        kernel: String,
        #[command(flatten)]
        vm: VmArgs,
    },
    /// The systemd deployment: a Debian 12 guest booting systemd, with tcpmgm installed from
    /// contrib/ exactly as shipped and Kamailio as the governed SIP service.
    Systemd {
        #[arg(long, default_value = "6.1")]
        kernel: String,
        /// Build the root image anew instead of reusing the cached one.
        #[arg(long)]
        rebuild: bool,
        #[command(flatten)]
        vm: VmArgs,
    },
}

#[derive(clap::Args)]
struct VmArgs {
    /// Look for the suite's current kernel package again instead of the cached one.
    #[arg(long)]
    refresh: bool,
    /// QEMU accelerator: tcg (software; KVM does not run guests on this kind of machine) or kvm.
    #[arg(long, default_value = "tcg")]
    accel: String,
    /// Stop a guest that runs longer than this many minutes.
    #[arg(long, default_value = "30")]
    minutes: u64,
}

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
        Task::Setup => setup::toolchain(),
        Task::Deb { revision } => deb::lintian(&deb::build(&root, revision.as_deref())?),
        Task::Vm { task } => vm_task(&root, task),
        Task::Bench { soak, fleet, args } => {
            setup::toolchain()?;
            // The PostgreSQL push latency needs the server; the soak's table is SQLite.
            let databases = if soak.is_none() {
                setup::databases()?
            } else {
                Vec::new()
            };
            status(cargo(&root).args([
                "build",
                "--release",
                "--package",
                "tcpmgm-tests",
                "--bin",
                "tcpmgm-bench",
                // The bench's peer process, and the daemon it measures the push latency of.
                "--bin",
                "tcpmgm-probe",
                "--package",
                "tcpmgm-user",
                "--bin",
                "tcpmgm",
            ]))?;
            status(
                Command::new(root.join("target/release/tcpmgm-bench"))
                    .arg("--out")
                    .arg(root.join("BENCHMARKS.md"))
                    .args(soak.map(|m| format!("--soak={m}")))
                    .args(fleet.map(|n| format!("--fleet={n}")))
                    .args(&args)
                    .envs(databases)
                    .current_dir(&root),
            )
        }
        Task::Header => header::write(&root),
        Task::Fuzz {
            seconds,
            dev,
            targets,
        } => {
            // The targets link tcpmgm-user, whose build script builds the eBPF programs.
            setup::toolchain()?;
            fuzz::run(&root, seconds, dev, &targets)
        }
        Task::Lint => {
            setup::toolchain()?;
            header::check(&root)?;
            imports::check(&root)?;
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
            )?;
            // The fuzz targets are a workspace of their own, which `--all` does not reach.
            let fuzz = root.join("fuzz/Cargo.toml");
            status(
                cargo(&root)
                    .arg("fmt")
                    .arg("--manifest-path")
                    .arg(&fuzz)
                    .args(["--all", "--", "--check"]),
            )?;
            status(
                cargo(&root)
                    .arg("clippy")
                    .arg("--manifest-path")
                    .arg(&fuzz)
                    .args(["--all-targets", "--", "-D", "warnings"]),
            )
        }
        Task::Test { args } => {
            setup::toolchain()?;
            // promtool lints the metrics endpoint's output.
            setup::tools(&[("promtool", "prometheus")])?;
            let databases = setup::databases()?;
            // The application ABI's test runs the C example.
            setup::c_example(&root)?;
            // The CLI tests run the `tcpmgm` binary, which `cargo test` alone does not build.
            status(cargo(&root).args([
                "build",
                "--workspace",
                "--exclude",
                "tcpmgm-ebpf",
                "--bins",
            ]))?;
            let mut cmd = cargo(&root);
            // Every test file runs even when one fails, so one run shows every failure.
            cmd.args([
                "test",
                "--workspace",
                "--exclude",
                "tcpmgm-ebpf",
                "--no-fail-fast",
            ])
            .args(&args)
            .envs(databases);
            let suite = status(&mut cmd);
            // The unit and property tests of the policy data path need neither root nor a
            // kernel: shown by running them again as nobody.
            let unprivileged = if args.is_empty() {
                unprivileged_unit_tests(&root)
            } else {
                Ok(())
            };
            suite.and(unprivileged)
        }
        Task::Run { args } => {
            setup::toolchain()?;
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

/// Runs tcpmgm-user's unit tests (the property tests of compiler and decision among them) as
/// the unprivileged user nobody, with no capability.
fn unprivileged_unit_tests(root: &Path) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt as _;
    let out = cargo(root)
        .args([
            "test",
            "--package",
            "tcpmgm-user",
            "--lib",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    let exe = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|m| m["reason"] == "compiler-artifact" && m["profile"]["test"] == true)
        .and_then(|m| m["executable"].as_str().map(PathBuf::from))
        .context("no unit-test executable for tcpmgm-user")?;
    eprintln!("xtask: {} as nobody", exe.display());
    // std drops the supplementary groups when root changes uid.
    status(
        Command::new(&exe)
            .uid(65534)
            .gid(65534)
            .env("HOME", "/nonexistent"),
    )
}

fn vm_task(root: &Path, task: VmTask) -> anyhow::Result<()> {
    setup::toolchain()?;
    vm::tools()?;
    let vm_dir = root.join("target/vm");
    std::fs::create_dir_all(&vm_dir)?;
    match task {
        VmTask::Test {
            kernel,
            tests,
            vm,
            args,
        } => {
            let series = vm::kernel::series(&kernel)?;
            let build = vm::build(root, &tests)?;
            let plan = vm::plan::plan(&build.tests, &args, tests.is_empty())?;
            let limit = Duration::from_secs(vm.minutes * 60);
            let mut results = Vec::new();
            let mut broken = Vec::new();
            for s in series {
                // One kernel that cannot be fetched or booted does not keep the others from
                // running; the summary names it.
                let run = vm::kernel::get(&vm_dir, s, vm.refresh).and_then(|kernel| {
                    let guest = vm::Guest::Test {
                        harness_args: args.clone(),
                        plan: plan.clone(),
                    };
                    let mut outcome = vm::run(&vm_dir, &kernel, &build, &guest, &vm.accel, limit)?;
                    // A kernel that stops while booting, before anything of the suite runs, is
                    // booted once more: once only, and said, so a kernel that cannot boot still
                    // fails the run.
                    if outcome.died_before_init() {
                        eprintln!(
                            "xtask: VM {}: the kernel stopped before the guest's init ran (its \
                             console is above); booting it once more",
                            s.name
                        );
                        outcome = vm::run(&vm_dir, &kernel, &build, &guest, &vm.accel, limit)?;
                    }
                    Ok((kernel, outcome))
                });
                match run {
                    Ok(result) => results.push(result),
                    Err(e) => broken.push(format!("vm {}: could not run: {e:#}", s.name)),
                }
            }
            println!();
            let readme = std::fs::read_to_string(root.join("README.md"))?;
            let mut ok = broken.is_empty();
            for line in &broken {
                println!("{line}");
            }
            let by_filters: u64 = plan.iter().map(|p| p.by_filters).sum();
            let host_only: u64 = plan.iter().map(|p| p.host_only).sum();
            let planned: u64 = plan.iter().map(|p| p.run).sum();
            for (kernel, o) in &results {
                let table = vm::table::differences(&readme, kernel.series.name, &o.features);
                for d in &table {
                    println!("vm {}: README kernel table: {d}", kernel.series.name);
                }
                let departures = o.departures(&plan);
                for d in &departures {
                    println!("vm {}: not as planned: {d}", kernel.series.name);
                }
                let verdict = if !o.finished {
                    "did not finish"
                } else if o.failed > 0 || !o.failed_binaries.is_empty() {
                    "FAILED"
                } else if o.passed == 0 {
                    "FAILED (no test ran)"
                } else if !departures.is_empty() {
                    "FAILED (the tests run differ from the plan)"
                } else if !table.is_empty() {
                    "FAILED (the README's kernel table differs from tcpmgm features)"
                } else {
                    "ok"
                };
                ok &= verdict == "ok";
                println!(
                    "vm {} ({}, {}): {verdict}. {} passed; {} failed; {} filtered out ({by_filters} by the filters given, {host_only} host-only); {planned} planned in {} binaries{}",
                    kernel.series.name,
                    kernel.series.debian,
                    kernel.release,
                    o.passed,
                    o.failed,
                    o.filtered,
                    plan.len(),
                    if o.failed_binaries.is_empty() {
                        String::new()
                    } else {
                        format!("; failing: {}", o.failed_binaries.join(", "))
                    }
                );
                for failure in &o.failures {
                    println!("vm {}: {failure}", kernel.series.name);
                }
            }
            let passed: u64 = results.iter().map(|(_, o)| o.passed).sum();
            let failed: u64 = results.iter().map(|(_, o)| o.failed).sum();
            println!("vm: {passed} passed, {failed} failed");
            if !ok {
                bail!("the kernel tests failed in the VM");
            }
            Ok(())
        }
        VmTask::Shell { kernel, vm } => {
            let [s] = vm::kernel::series(&kernel)?[..] else {
                bail!("vm shell takes one kernel");
            };
            let build = vm::build(root, &[])?;
            let kernel = vm::kernel::get(&vm_dir, s, vm.refresh)?;
            let limit = Duration::from_secs(vm.minutes * 60);
            vm::run(
                &vm_dir,
                &kernel,
                &build,
                &vm::Guest::Shell,
                &vm.accel,
                limit,
            )
            .map(drop)
        }
        VmTask::Systemd {
            kernel,
            rebuild,
            vm,
        } => {
            let [s] = vm::kernel::series(&kernel)?[..] else {
                bail!("vm systemd takes one kernel");
            };
            let kernel = vm::kernel::get(&vm_dir, s, vm.refresh)?;
            vm::systemd::run(
                root,
                &vm_dir,
                &kernel,
                rebuild,
                &vm.accel,
                Duration::from_secs(vm.minutes * 60),
            )
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
