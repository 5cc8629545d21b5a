//! The commands that read and print: `conns`, `status`, `features`, `check` and `match`.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;

use super::DirectionArg;
use crate::policy::column;
use crate::policy::compile::Enforcement;
use crate::policy::listener::{Direction, Lookup};
use crate::policy::matcher;
use crate::policy::pipeline::RuleArgs;
use crate::policy::rule::{Proto, Rule, fold_v4_mapped};
use crate::system;

pub(super) fn conns(
    cgroup: PathBuf,
    pin_dir: Option<PathBuf>,
    netns: Option<PathBuf>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let paths = system::Paths::of(&cgroup, pin_dir, None)?;
    if let Some(ns) = &netns {
        crate::netns::enter(ns).with_context(|| format!("entering {}", ns.display()))?;
    }
    let list = crate::kernel::socket::connections(
        &paths.cgroup,
        &paths.pin_dir.join(crate::kernel::socket::SOCKETS_PIN),
    )
    .with_context(|| format!("listing the connections of {}", paths.cgroup.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<6} {:<46} {:<46} {:>9}  rule",
        "state", "local", "remote", "idle ms"
    );
    for c in &list {
        let state = if c.established { "ESTAB" } else { "other" };
        let rule = match &c.profile {
            None => "none (system settings)".to_owned(),
            Some(p) => format!("{}: {p}", p.rule_id),
        };
        println!(
            "{state:<6} {:<46} {:<46} {:>9}  {rule}",
            c.local.to_string(),
            c.remote.to_string(),
            c.idle_ms
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn status(
    cgroup: Option<PathBuf>,
    pin_dir: Option<PathBuf>,
    control: Option<PathBuf>,
    configured: Option<system::Paths>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut found = Vec::new();
    let of = |paths: system::Paths| {
        let mut s = crate::daemon::status::of(&paths.pin_dir, &paths.control);
        s.cgroup.get_or_insert(paths.cgroup);
        s
    };
    match cgroup {
        Some(cg) => found.push(of(system::Paths::of_maybe_gone(&cg, pin_dir, control)?)),
        None => {
            // The configuration's cgroup, with the pin directory and control socket it sets,
            // then every other one pinned in the default place.
            let mine = configured.as_ref().map(|p| p.pin_dir.clone());
            if let Some(paths) = configured {
                found.push(of(paths));
            }
            for (pins, control) in system::Paths::pinned()? {
                if Some(&pins) != mine.as_ref() {
                    found.push(crate::daemon::status::of(&pins, &control));
                }
            }
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&found)?);
    } else if found.is_empty() {
        println!("tcpmgm governs no cgroup");
    } else {
        for s in &found {
            print!("{s}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn features(json: bool) -> anyhow::Result<ExitCode> {
    let mut found = crate::kernel::features::probe();
    found.extend(crate::kernel::features::programs_load());
    let kernel = nix::sys::utsname::uname()?
        .release()
        .to_string_lossy()
        .into_owned();
    if json {
        println!("{}", serde_json::to_string_pretty(&found)?);
    } else {
        print!("{}", crate::kernel::features::report(&kernel, &found));
    }
    let runs = found
        .iter()
        .all(|f| f.supported || f.need != crate::kernel::features::Need::Core);
    Ok(if runs {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

pub(super) async fn check(args: RuleArgs, enforcement: &Enforcement) -> anyhow::Result<ExitCode> {
    let set = args.read().await?;
    for e in &set.errors {
        println!("{e}");
    }
    // Valid, but beyond this kernel: said, and not counted as bad rows.
    let kernel = crate::kernel::features::column_features();
    for u in crate::kernel::features::unenforceable(&set.rules, kernel, enforcement) {
        println!("warning: {u}");
    }
    // Where OpenSIPS would order the table otherwise: said, and not counted as bad rows.
    for level in crate::policy::opensips_order::ambiguous_levels(&set.rules) {
        println!("warning: {}", level.warning());
    }
    let bad: std::collections::BTreeSet<_> = set.errors.iter().map(|e| &e.id).collect();
    eprintln!("{} rules valid, {} rows bad", set.rules.len(), bad.len());
    Ok(if set.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        super::exit::Failure::Data.code()
    })
}

/// What `match` shows of a rule's profile but tcpmgm leaves alone, each with why: OpenSIPS's
/// schema defaults that are enforced only when asked (`config`), and the SIP-level columns,
/// which are only recorded for the application.
fn not_enforced(rule: &Rule, config: &crate::config::Config) -> Vec<(&'static str, String)> {
    let p = &rule.profile;
    let mut out = Vec::new();
    if p.connect_timeout_ms != 0 && !config.enforcement().connect_timeout(p.connect_timeout_ms) {
        out.push((
            "connect_timeout",
            "OpenSIPS's schema default (enforce_default_connect_timeout enforces it)".into(),
        ));
    }
    if p.con_lifetime_s != 0 && !config.enforcement().con_lifetime(p.con_lifetime_s) {
        out.push((
            "con_lifetime",
            "OpenSIPS's default (enforce_default_lifetime enforces it)".into(),
        ));
    }
    for column in column::TABLE
        .iter()
        .filter(|c| c.used == column::Use::Recorded)
    {
        out.push((
            column.name,
            "SIP-level, recorded per socket for the application".into(),
        ));
    }
    out
}

/// The profile as the table's columns, each value tcpmgm does not enforce marked `*`.
fn marked_profile(rule: &Rule, config: &crate::config::Config) -> (String, Vec<String>) {
    let unenforced = not_enforced(rule, config);
    let text = crate::policy::compile::recorded_profile(rule).to_string();
    let marked: Vec<String> = text
        .split(' ')
        .map(|column| {
            let name = column.split('=').next().unwrap_or_default();
            if unenforced.iter().any(|(n, _)| *n == name) {
                format!("{column}*")
            } else {
                column.to_owned()
            }
        })
        .collect();
    let shown: Vec<String> = unenforced
        .into_iter()
        .filter(|(name, _)| text.contains(&format!("{name}=")))
        .map(|(name, why)| format!("{name}: {why}"))
        .collect();
    (marked.join(" "), shown)
}

pub(super) async fn explain(
    args: RuleArgs,
    config: &crate::config::Config,
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
    let ambiguous = crate::policy::opensips_order::ambiguous_levels(&set.rules);
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
    let (profile, unenforced) = marked_profile(winner, config);
    println!("  profile: {profile}");
    if !unenforced.is_empty() {
        println!("  * not enforced: {}", unenforced.join("; "));
    }
    for other in matching.iter().skip(1) {
        println!(
            "  also matches rule {}, which loses: rule {} has {}",
            other.id,
            winner.id,
            matcher::deciding_key(winner, other)
        );
        if let Some(level) = ambiguous
            .iter()
            .find(|l| l.priority == winner.priority && other.priority == winner.priority)
        {
            let protocols: Vec<String> = level.protocols.iter().map(|p| p.to_string()).collect();
            println!(
                "    note: at priority {}, rules for {} mix: OpenSIPS's order between rules {} \
                 and {} is not defined (it may choose rule {}); tcpmgm's documented order \
                 chooses rule {}",
                level.priority,
                protocols.join(" and "),
                winner.id,
                other.id,
                other.id,
                winner.id
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
