//! The `tcpmgm` command.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use tcpmgm::compile::compile;
use tcpmgm::kernel::Enforcer;
use tcpmgm::listener::{Direction, Lookup};
use tcpmgm::matcher;
use tcpmgm::pipeline::RuleArgs;
use tcpmgm::rule::{Proto, Rule, fold_v4_mapped};
use tcpmgm::source::{EXAMPLES, Source, TableVersion};
use tcpmgm::system;

#[derive(Parser)]
#[command(
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
        /// The cgroup v2 to govern: a path below the cgroup2 mount, or an absolute path.
        #[arg(long)]
        cgroup: PathBuf,
        /// Load the valid rows and log the bad ones, instead of refusing to start.
        #[arg(long)]
        skip_invalid: bool,
        /// bpffs directory for the pinned maps [default: <bpffs>/tcpmgm/<cgroup>].
        #[arg(long)]
        pin_dir: Option<PathBuf>,
        /// Create the cgroup when it does not exist (and remove it at exit if it is empty).
        #[arg(long)]
        create_cgroup: bool,
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
    /// Manage the rule database.
    Db {
        #[command(subcommand)]
        command: DbCommand,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum DirectionArg {
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
    },
}

fn main() -> ExitCode {
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
        .and_then(|rt| rt.block_on(run(Cli::parse())));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tcpmgm: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Check { rules } => check(rules).await,
        Command::Match {
            rules,
            remote,
            proto,
            local,
            direction,
        } => explain(rules, remote, proto, local, direction).await,
        Command::Db {
            command:
                DbCommand::Init {
                    db,
                    table_version,
                    examples,
                },
        } => {
            let source = Source::open(&db, true).await?;
            if source.init(table_version).await? {
                println!(
                    "created table tcp_mgm (version {}) in {}",
                    table_version.number(),
                    source.url()
                );
            } else {
                println!("table tcp_mgm already exists in {}", source.url());
            }
            if examples {
                source.execute_script(EXAMPLES).await?;
                println!("inserted the example rules");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            rules,
            cgroup,
            skip_invalid,
            pin_dir,
            create_cgroup,
        } => {
            let created = if create_cgroup {
                system::create_cgroup(&cgroup)?
            } else {
                None
            };
            let result = enforce(rules, cgroup, skip_invalid, pin_dir).await;
            if let Some(path) = created
                && std::fs::remove_dir(&path).is_ok()
            {
                tracing::info!("removed cgroup {}", path.display());
            }
            result
        }
    }
}

async fn check(args: RuleArgs) -> anyhow::Result<ExitCode> {
    let set = args.read().await?;
    for e in &set.errors {
        println!("{e}");
    }
    let bad: std::collections::BTreeSet<_> = set.errors.iter().map(|e| e.id).collect();
    eprintln!("{} rules valid, {} rows bad", set.rules.len(), bad.len());
    Ok(if set.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn enforce(
    args: RuleArgs,
    cgroup: PathBuf,
    skip_invalid: bool,
    pin_dir: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let cgroup = system::resolve_cgroup(&cgroup)?;
    let set = args.read().await?;
    if !set.errors.is_empty() {
        for e in &set.errors {
            tracing::error!("{e}");
        }
        if !skip_invalid {
            bail!(
                "{} faults in the table; nothing was loaded (fix them, or pass --skip-invalid)",
                set.errors.len()
            );
        }
        tracing::warn!(
            "skipping the bad rows, loading {} valid rules",
            set.rules.len()
        );
    }
    let hz = system::kernel_hz()?;
    let policy = compile(set.rules, &set.listeners, hz)?;
    let pin_dir = match pin_dir {
        Some(p) => p,
        None => system::default_pin_dir(&cgroup)?,
    };
    let enforcer = Enforcer::attach(&policy, &cgroup, &pin_dir)?;
    for l in set.listeners.iter() {
        tracing::info!("listener {l}");
    }
    tracing::info!(
        "{} rules enforced on {}; maps pinned in {} (bpftool map dump pinned {}/TCPMGM_PROFILES)",
        policy.rules.len(),
        enforcer.cgroup().display(),
        enforcer.pin_dir().display(),
        enforcer.pin_dir().display(),
    );
    tracing::info!(
        "to put a process under this policy: echo PID > {}/cgroup.procs",
        enforcer.cgroup().display()
    );
    wait_for_stop().await?;
    drop(enforcer);
    tracing::info!("detached; the cgroup is back to the system's TCP settings");
    Ok(ExitCode::SUCCESS)
}

async fn wait_for_stop() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
    Ok(())
}

async fn explain(
    args: RuleArgs,
    remote: SocketAddr,
    proto: Option<String>,
    local: Option<SocketAddr>,
    direction: DirectionArg,
) -> anyhow::Result<ExitCode> {
    let set = args.read().await?;
    for e in &set.errors {
        eprintln!("skipping bad row: {e}");
    }
    let key = match proto {
        Some(p) => {
            let proto = Proto::parse(&p)
                .map_err(anyhow::Error::msg)
                .context("--proto")?;
            Lookup {
                proto,
                remote: fold_v4_mapped(remote.ip()),
                remote_port: remote.port(),
                local: local
                    .map(|l| fold_v4_mapped(l.ip()))
                    .filter(|ip| !ip.is_unspecified()),
                local_port: local.map_or(0, |l| l.port()),
                why: "protocol and local side as given".into(),
            }
        }
        None => {
            let dir = match direction {
                DirectionArg::In => Direction::Inbound,
                DirectionArg::Out => Direction::Outbound,
            };
            set.listeners.lookup(dir, remote, local)
        }
    };
    let show = |v: Option<String>| v.unwrap_or_else(|| "unknown".into());
    println!(
        "connection: proto {}, remote {}, local {} port {}",
        show(key.proto.map(|p| p.to_string())),
        SocketAddr::new(key.remote, key.remote_port),
        show(key.local.map(|ip| ip.to_string())),
        key.local_port,
    );
    println!("  ({})", key.why);
    let mut rules = set.rules;
    matcher::sort(&mut rules);
    let matching: Vec<&Rule> = rules.iter().filter(|r| matcher::matches(r, &key)).collect();
    let Some(winner) = matching.first() else {
        println!(
            "no rule: none of the {} rules matches; the system's own TCP settings apply",
            rules.len()
        );
        return Ok(ExitCode::SUCCESS);
    };
    println!("rule {}: {}", winner.id, winner.describe());
    let p = &winner.profile;
    println!(
        "  profile: connect_timeout={}ms con_lifetime={}s msg_read_timeout={}s send_threshold={}us no_new_conn={} alias_mode={} keepalive={} keepcount={} keepidle={}s keepinterval={}s",
        p.connect_timeout_ms,
        p.con_lifetime_s,
        p.msg_read_timeout_s,
        p.send_threshold_us,
        u8::from(p.no_new_conn),
        p.alias_mode,
        u8::from(p.keepalive),
        p.keepcount,
        p.keepidle,
        p.keepinterval,
    );
    if !p.attrs.is_empty() {
        let attrs: Vec<String> = p.attrs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("  attrs: {}", attrs.join(";"));
    }
    for other in matching.iter().skip(1) {
        println!(
            "  also matches rule {}, which loses: rule {} has {}",
            other.id,
            winner.id,
            matcher::deciding_key(winner, other)
        );
    }
    Ok(ExitCode::SUCCESS)
}
