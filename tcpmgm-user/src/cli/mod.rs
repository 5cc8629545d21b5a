//! The `tcpmgm` command line: its arguments, and the commands that run the daemon or change what
//! is attached (`report` has those that only read and print).
mod report;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::daemon::{self, Daemon};
use crate::policy::pipeline::RuleArgs;
use crate::policy::source::{EXAMPLES, Source, TableName, TableVersion};
use crate::system;
use report::{check, conns, explain, features, status};

#[derive(Parser)]
#[command(
    name = "tcpmgm",
    version,
    about = "OpenSIPS tcp_mgm rules, enforced in the kernel for a cgroup"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the rules, attach them to a cgroup and stay in the foreground until SIGINT/SIGTERM.
    Run {
        #[command(flatten)]
        rules: RuleArgs,
        #[command(flatten)]
        given: crate::config::RunFlags,
    },
    /// Take tcpmgm off a cgroup: programs and pins go, the system's TCP settings are back. A
    /// running `tcpmgm run` for it is told to detach and exit.
    Detach {
        #[arg(long, required_unless_present = "all")]
        cgroup: Option<PathBuf>,
        /// Every cgroup tcpmgm governs (each pin directory under <bpffs>/tcpmgm, as `status`
        /// lists them): what the package's removal runs.
        #[arg(long, conflicts_with_all = ["cgroup", "pin_dir", "control"])]
        all: bool,
        /// bpffs directory of the pins [default: <bpffs>/tcpmgm/<cgroup>].
        #[arg(long)]
        pin_dir: Option<PathBuf>,
        /// The daemon's control socket [default: /run/tcpmgm/<cgroup>.sock].
        #[arg(long)]
        control: Option<PathBuf>,
    },
    /// Ask the running `tcpmgm run` to re-read the table and switch to it atomically. Exits 1
    /// (with the reason) when the reload failed; the previous policy then stays in force.
    Reload {
        /// The cgroup the daemon governs (finds its default control socket).
        #[arg(long, required_unless_present_any = ["control", "config"])]
        cgroup: Option<PathBuf>,
        /// The daemon's control socket.
        #[arg(long)]
        control: Option<PathBuf>,
        /// The daemon's configuration file, for its cgroup and control socket (what systemd's
        /// ExecReload= passes).
        #[arg(long, env = "TCPMGM_CONFIG")]
        config: Option<PathBuf>,
    },
    /// What tcpmgm enforces: for each cgroup (or the one given), the daemon, rule source, rule
    /// count, generation, last reload, programs, and per-rule counters from the kernel.
    Status {
        /// Only this cgroup.
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// bpffs directory of its pins [default: <bpffs>/tcpmgm/<cgroup>].
        #[arg(long, requires = "cgroup")]
        pin_dir: Option<PathBuf>,
        /// Its daemon's control socket [default: /run/tcpmgm/<cgroup>.sock].
        #[arg(long, requires = "cgroup")]
        control: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// List the TCP connections of a cgroup with the rule and profile each was given (like `ss`).
    Conns {
        #[arg(long)]
        cgroup: PathBuf,
        /// bpffs directory of its pins [default: <bpffs>/tcpmgm/<cgroup>].
        #[arg(long)]
        pin_dir: Option<PathBuf>,
        /// The network namespace of the cgroup's sockets [default: this one].
        #[arg(long, value_name = "PATH")]
        netns: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Validate every row; print one line per fault; exit 1 when any row is bad.
    Check {
        #[command(flatten)]
        rules: RuleArgs,
    },
    /// Show which rule governs a connection, and why.
    Match {
        #[command(flatten)]
        rules: RuleArgs,
        /// The peer, IP:PORT or [IPv6]:PORT.
        #[arg(long)]
        remote: SocketAddr,
        /// The protocol, as OpenSIPS would pass it. Without it, the protocol comes from the
        /// listeners, as the kernel finds it (see --direction).
        #[arg(long)]
        proto: Option<String>,
        /// The local side, IP:PORT: the listener for accepted connections, the socket's own
        /// address (and port, 0 if unknown) for outbound ones.
        #[arg(long)]
        local: Option<SocketAddr>,
        /// Which way the connection goes, when the protocol is found from the listeners.
        #[arg(long, value_enum, default_value = "out")]
        direction: DirectionArg,
    },
    /// What the running kernel supports of what tcpmgm uses, probed (like bpftune -S): what
    /// each feature is for and what provides it. Exits 1 when tcpmgm cannot run here.
    Features {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Manage the rule database.
    Db {
        #[command(subcommand)]
        command: DbCommand,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum DirectionArg {
    In,
    Out,
}

#[derive(Subcommand)]
enum DbCommand {
    /// Create the OpenSIPS tcp_mgm table (and the version table) when missing.
    Init {
        #[arg(long, env = "TCPMGM_DB", default_value = "sqlite://tcpmgm.db")]
        db: String,
        /// 1: OpenSIPS 3.3 to 3.6 (with parallel_read); 2: OpenSIPS master.
        #[arg(long, value_enum, default_value = "1")]
        table_version: TableVersion,
        /// Also insert example rules (a TLS trunk, a NAT'ed pool, a replication peer, loopback).
        #[arg(long)]
        examples: bool,
        /// The table's name, when it is not tcp_mgm (the tcp_mgm module's db_table).
        #[arg(long, value_name = "NAME", default_value = "tcp_mgm")]
        table: TableName,
    },
}

/// The command line's definition, for what is generated from it (man pages, completions).
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

/// Parses the command line and runs the command; the exit status to end with.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run { .. }) {
        // A command whose output goes to a pipe closed early (`tcpmgm match ... | head`) ends
        // quietly, as other Unix tools do, instead of failing on the write. Not the daemon: its
        // control socket's clients may go away, and that must not end it.
        // SAFETY: restoring the default disposition of a signal, before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let result = runtime
        .context("starting tokio")
        .and_then(|rt| rt.block_on(run(cli)));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tcpmgm: {}", error_text(&e));
            ExitCode::from(2)
        }
    }
}

/// An error and its causes, each said once: most of tcpmgm's errors quote their cause in their
/// own message already (a database error, then the driver's), so a cause is added only when
/// the text so far does not hold it.
fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let said = cause.to_string();
        if !text.contains(&said) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&said);
        }
    }
    text
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Conns {
            cgroup,
            pin_dir,
            netns,
            json,
        } => conns(cgroup, pin_dir, netns, json),
        Command::Check { mut rules } => {
            let config = rules.with_config()?;
            check(rules, config.enforce_default_lifetime == Some(true)).await
        }
        Command::Features { json } => features(json),
        Command::Status {
            cgroup,
            pin_dir,
            control,
            json,
        } => status(cgroup, pin_dir, control, json),
        Command::Match {
            mut rules,
            remote,
            proto,
            local,
            direction,
        } => {
            rules.with_config()?;
            explain(rules, remote, proto, local, direction).await
        }
        Command::Db {
            command:
                DbCommand::Init {
                    db,
                    table_version,
                    examples,
                    table,
                },
        } => {
            let source = Source::open_table(&db, true, &table).await?;
            if source.init(table_version).await? {
                println!(
                    "created table {table} (version {}) in {}",
                    table_version.number(),
                    source.url()
                );
            } else {
                println!("table {table} already exists in {}", source.url());
            }
            if examples {
                let examples =
                    EXAMPLES.replace("INSERT INTO tcp_mgm ", &format!("INSERT INTO {table} "));
                source.execute_script(&examples).await?;
                println!("inserted the example rules");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { mut rules, given } => {
            system::check_privileges(&[])?;
            let config = rules.with_config()?.overlay(&given);
            let on = |v: Option<bool>| v == Some(true);
            let cgroup = config
                .cgroup
                .clone()
                .context("no cgroup: give --cgroup, or `cgroup` in the config file")?;
            let api_group = config
                .api_group
                .as_deref()
                .map(system::group_id)
                .transpose()?;
            system::check_privileges(&system::option_capabilities(
                config.netns.is_some(),
                on(config.reapply_existing),
            ))?;
            if let Some(gid) = api_group {
                system::check_api_group(gid)?;
            }
            let created = if on(config.create_cgroup) {
                system::create_cgroup(&cgroup)?
            } else {
                None
            };
            let detach_on_exit = on(config.detach_on_exit);
            let reread = rules.config.clone().map(|config| daemon::Reread {
                config,
                given: given.clone(),
            });
            let options = daemon::Options {
                rules,
                cgroup,
                skip_invalid: on(config.skip_invalid),
                pin_dir: config.pin_dir.clone(),
                control: config.control.clone(),
                detach_on_exit,
                poll_interval: config.poll_interval,
                netns: config.netns.clone(),
                enforce_default_lifetime: on(config.enforce_default_lifetime),
                reapply_existing: on(config.reapply_existing),
                db_timeout: config.db_timeout.unwrap_or(daemon::DB_TIMEOUT),
                enforcement: config.enforcement(),
                metrics: config.metrics,
                api_group,
                reread,
            };
            let result = match Daemon::start(options).await {
                Ok(d) => d.serve().await,
                Err(e) => Err(e),
            };
            // A cgroup tcpmgm made stays while its policy does: systemd may start a slice in
            // it later, and a restart adopts the policy there.
            if let Some(path) = created.filter(|_| detach_on_exit)
                && std::fs::remove_dir(&path).is_ok()
            {
                tracing::info!("removed cgroup {}", path.display());
            }
            result?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Detach {
            cgroup: Some(cgroup),
            pin_dir,
            control,
            all: false,
        } => {
            let paths = system::Paths::of(&cgroup, pin_dir, control)?;
            detach(&paths.cgroup, &paths.pin_dir, &paths.control).await
        }
        Command::Detach { .. } => {
            // A cgroup may be gone while its pins stay: named then by its pin directory.
            for (pin_dir, control) in system::Paths::pinned()? {
                let name = crate::daemon::status::of(&pin_dir, &control)
                    .cgroup
                    .unwrap_or_else(|| pin_dir.clone());
                detach(&name, &pin_dir, &control).await?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Reload {
            cgroup,
            control,
            config,
        } => {
            let file = match &config {
                Some(path) => crate::config::Config::load(path)?,
                None => crate::config::Config::default(),
            };
            let control = match (control.or(file.control), cgroup.or(file.cgroup)) {
                (Some(c), _) => c,
                (None, Some(cg)) => system::Paths::of(&cg, None, None)?.control,
                (None, None) => anyhow::bail!(
                    "no cgroup: give --cgroup or --control, or `cgroup` in the config file"
                ),
            };
            match daemon::request(&control, "reload").await {
                Ok(report) => {
                    println!("reloaded: {report}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(reason) => {
                    eprintln!(
                        "tcpmgm: reload failed, the previous policy stays in force: {reason}"
                    );
                    Ok(ExitCode::from(1))
                }
            }
        }
    }
}

/// Tells the cgroup's daemon to detach and exit, then detaches what is still pinned.
async fn detach(
    name: &std::path::Path,
    pin_dir: &std::path::Path,
    control: &std::path::Path,
) -> anyhow::Result<ExitCode> {
    let name = name.display();
    let daemon_detached = daemon::request(control, "detach").await.is_ok();
    if daemon_detached {
        // The daemon detaches as it exits; wait for its socket to go.
        for _ in 0..100 {
            if !control.exists() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    let pinned = crate::kernel::detach_pinned(pin_dir)?;
    if daemon_detached || pinned {
        println!("detached from {name}: the system's TCP settings apply");
    } else {
        println!(
            "nothing was attached to {name}: no daemon answered on {} and no tcpmgm links \
             were pinned in {}",
            control.display(),
            pin_dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_error_says_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let e = anyhow::Error::new(io).context("config /x: No such file");
        assert_eq!(super::error_text(&e), "config /x: No such file");
        let e = anyhow::anyhow!("the cause").context("reading the table");
        assert_eq!(super::error_text(&e), "reading the table: the cause");
    }
}
