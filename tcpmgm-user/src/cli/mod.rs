//! The `tcpmgm` command line: its arguments, and the commands that run the daemon or change what
//! is attached (`report` has those that only read and print).
mod events;
mod exit;
mod logging;
mod privileges;
mod report;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::config::{ConfigError, LogFormat};
use crate::daemon::{self, Daemon};
use crate::policy::pipeline::RuleArgs;
use crate::policy::source::{EXAMPLES, Source, TableName, TableVersion};
use crate::system;
use exit::Failure;
use report::{check, conns, explain, features, status};

/// What `--help` says after the commands: where the log goes and what the exit status means.
const AFTER_HELP: &str = "\
Logging: to stderr; RUST_LOG sets what is logged (default info; e.g. RUST_LOG=debug, or
RUST_LOG=tcpmgm=debug,sqlx=warn). On a terminal with colour and timestamps; elsewhere (under
systemd, into a pipe) plain, each line starting with its syslog priority (<3> error to <7>
debug) for journald. `run --log-format json` writes JSON lines for log shippers.

Exit status (sysexits.h):
  0   success
  1   any other failure; `reload` when the daemon refuses the reload (the reason is printed,
      and the previous policy stays in force)
  64  usage: the command line is wrong
  65  bad table data: a bad row (`check`, or `run` without --skip-invalid), no tcp_mgm table,
      a table too large for the memory limit
  69  the database is unavailable: refused, unreachable or too slow (a restart may mend it)
  77  missing privileges: root or CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON; EPERM from the kernel
  78  bad configuration: the config file, opensips.cfg, a listener, an option's value";

#[derive(Parser)]
#[command(
    name = "tcpmgm",
    version = crate::VERSION,
    about = "OpenSIPS tcp_mgm rules, enforced in the kernel for a cgroup",
    after_help = AFTER_HELP
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
        #[command(flatten)]
        daemon: DaemonRef,
        /// Read the whole table, even where its change log says which rows changed (after
        /// changes made with its triggers off, say).
        #[arg(long)]
        full: bool,
    },
    /// Follow what the policy does as it happens, from the cgroup's daemon: sockets decided
    /// (which rule, which direction), connects refused, and how connections end. Root and
    /// members of the daemon's --api-group may follow it.
    Events {
        #[command(flatten)]
        daemon: DaemonRef,
        /// Only events of this rule (repeat for more).
        #[arg(long = "rule", value_name = "ID")]
        rules: Vec<u32>,
        /// Only events whose remote or local address is in this prefix, or is this address
        /// (repeat for more).
        #[arg(long = "addr", value_name = "PREFIX", value_parser = events::parse_addr)]
        addrs: Vec<ipnet::IpNet>,
        /// Only events of this kind (repeat for more).
        #[arg(long = "kind", value_enum)]
        kinds: Vec<events::Kind>,
        /// One JSON object a line.
        #[arg(long)]
        json: bool,
        /// Exit after this many events.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
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
        /// A daemon's configuration file: its cgroup is reported too, with the pin directory
        /// and control socket it sets [default: /etc/tcpmgm/tcpmgm.toml when it exists and
        /// --cgroup is not given].
        #[arg(long, env = "TCPMGM_CONFIG", conflicts_with = "cgroup")]
        config: Option<PathBuf>,
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
    /// Validate every row; print one line per fault; exit 65 (EX_DATAERR) when any row is bad,
    /// 0 when none is (warnings do not change it).
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
        /// The rule database [default: the configuration's, as for `check`; no database
        /// named anywhere is an error, so a table never lands in a stray ./tcpmgm.db].
        #[arg(long, env = "TCPMGM_DB")]
        db: Option<String>,
        /// Configuration file (TOML), for its db or opensips_cfg [default:
        /// /etc/tcpmgm/tcpmgm.toml when it exists and --db is not given].
        #[arg(long, env = "TCPMGM_CONFIG")]
        config: Option<PathBuf>,
        /// 1: OpenSIPS 3.3 to 3.6 (with parallel_read); 2: OpenSIPS master.
        #[arg(long, value_enum, default_value = "1")]
        table_version: TableVersion,
        /// Also insert example rules (a TLS trunk, a NAT'ed pool, a replication peer, loopback).
        #[arg(long)]
        examples: bool,
        /// The table's name, when it is not tcp_mgm (the tcp_mgm module's db_table)
        /// [default: the configuration's table, else tcp_mgm].
        #[arg(long, value_name = "NAME")]
        table: Option<TableName>,
    },
}

/// The command line's definition, for what is generated from it (man pages, completions).
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

/// Parses the command line and runs the command; the exit status to end with.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage(&e),
    };
    if !matches!(cli.command, Command::Run { .. }) {
        // A command whose output goes to a pipe closed early (`tcpmgm match ... | head`) ends
        // quietly, as other Unix tools do, instead of failing on the write. Not the daemon: its
        // control socket's clients may go away, and that must not end it.
        // SAFETY: restoring the default disposition of a signal, before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    // `run` logs in the format its configuration says, once that is read.
    if !matches!(cli.command, Command::Run { .. }) {
        logging::init(LogFormat::Text);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let result = runtime
        .context("starting tokio")
        .and_then(|rt| rt.block_on(run(cli)));
    match result {
        Ok(code) => code,
        Err(e) => {
            logging::error(&error_text(&e));
            Failure::of(&e).code()
        }
    }
}

/// clap's answer to the command line: help and version on stdout (exit 0), a usage error on
/// stderr with EX_USAGE (clap's own exit would be 2).
fn usage(e: &clap::Error) -> ExitCode {
    if !e.use_stderr() {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    logging::usage(e);
    Failure::Usage.code()
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
            check(rules, &config.enforcement()).await
        }
        Command::Features { json } => features(json),
        Command::Status {
            cgroup,
            pin_dir,
            control,
            config,
            json,
        } => {
            let configured = match cgroup {
                Some(_) => None,
                None => {
                    let (_, file) = crate::config::Config::find(config.as_deref(), true)?;
                    file.cgroup
                        .map(|cg| system::Paths::of_maybe_gone(&cg, file.pin_dir, file.control))
                        .transpose()?
                }
            };
            status(cgroup, pin_dir, control, configured, json)
        }
        Command::Match {
            mut rules,
            remote,
            proto,
            local,
            direction,
        } => {
            let config = rules.with_config()?;
            explain(rules, &config, remote, proto, local, direction).await
        }
        Command::Db {
            command:
                DbCommand::Init {
                    db,
                    config,
                    table_version,
                    examples,
                    table,
                },
        } => {
            let mut rules = RuleArgs {
                db,
                config,
                listeners: Vec::new(),
                sockets_from: Vec::new(),
                opensips_cfg: None,
                table,
                opensips: None,
                columns: Default::default(),
            };
            rules.with_config()?;
            let (db, table) = (rules.db(), rules.table());
            let source = Source::open_table(db, true, &table)
                .await?
                .with_columns(&rules.columns);
            if source.init(table_version).await? {
                println!(
                    "created table {table} (version {}) in {}",
                    table_version.number(),
                    source.url()
                );
            } else {
                println!("table {table} already exists in {}", source.url());
            }
            if source.change_mark().await?.is_some() {
                println!(
                    "table {table} keeps a change log ({}): a reload reads only the rows that changed",
                    crate::policy::source::CHANGE_LOG
                );
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
            privileges::check_privileges(&[])?;
            let config = rules.with_config()?.overlay(&given);
            logging::init(config.log_format.unwrap_or_default());
            let on = |v: Option<bool>| v == Some(true);
            let cgroup = config.cgroup.clone().ok_or(ConfigError::Missing {
                key: "cgroup",
                flag: "cgroup",
            })?;
            let api_group = config
                .api_group
                .as_deref()
                .map(privileges::group_id)
                .transpose()?;
            privileges::check_privileges(&privileges::option_capabilities(
                config.netns.is_some(),
                on(config.reapply_existing),
            ))?;
            if let Some(gid) = api_group {
                privileges::check_api_group(gid)?;
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
                reapply_existing: on(config.reapply_existing),
                db_timeout: config.db_timeout.unwrap_or(daemon::DB_TIMEOUT),
                enforcement: config.enforcement(),
                metrics: config.metrics,
                metrics_rules: config.metrics_rules.unwrap_or_default(),
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
        Command::Events {
            daemon,
            rules,
            addrs,
            kinds,
            json,
            count,
        } => {
            let control = control_socket(daemon)?;
            let filter = events::Filter {
                rules,
                addrs,
                kinds,
            };
            let path = daemon::events::socket_path(&control);
            events::follow(&path, &filter, json, count).await
        }
        Command::Reload { daemon, full } => {
            let control = control_socket(daemon)?;
            let request = if full { "reload full" } else { "reload" };
            match daemon::request(&control, request).await {
                Ok(report) => {
                    println!("reloaded: {report}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(reason) => {
                    logging::error(&format!(
                        "reload failed, the previous policy stays in force: {reason}"
                    ));
                    Ok(ExitCode::from(1))
                }
            }
        }
    }
}

/// Which running daemon a command talks to.
#[derive(clap::Args)]
struct DaemonRef {
    /// The cgroup the daemon governs (finds its default control socket, and the events socket
    /// beside it).
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// The daemon's control socket.
    #[arg(long)]
    control: Option<PathBuf>,
    /// The daemon's configuration file, for its cgroup and control socket (what systemd's
    /// ExecReload= passes) [default: /etc/tcpmgm/tcpmgm.toml when it exists and neither
    /// --cgroup nor --control is given].
    #[arg(long, env = "TCPMGM_CONFIG")]
    config: Option<PathBuf>,
}

/// The control socket of the daemon that `--control`, `--cgroup` or the configuration file
/// names.
fn control_socket(
    DaemonRef {
        cgroup,
        control,
        config,
    }: DaemonRef,
) -> anyhow::Result<PathBuf> {
    let nothing_else = cgroup.is_none() && control.is_none();
    let (path, file) = crate::config::Config::find(config.as_deref(), nothing_else)?;
    Ok(match (control.or(file.control), cgroup.or(file.cgroup)) {
        (Some(c), _) => c,
        (None, Some(cg)) => system::Paths::of(&cg, None, None)?.control,
        (None, None) => Err(ConfigError::NoCgroup(path.map_or_else(
            || format!("{} (which does not exist)", crate::config::DEFAULT_PATH),
            |p| p.display().to_string(),
        )))?,
    })
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
