//! The configuration file and the command line, merged in one place: every option of
//! `tcpmgm run` (and the rule options of `check` and `match`) is a TOML key of the same name.
//! An option given on the command line wins over the file, either way (`--audit=false` turns
//! off `audit = true`); listeners from both are used.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::policy::compile::Enforcement;
use crate::policy::opensips_cfg::OpenSipsCfg;
use crate::policy::pipeline::RuleArgs;

/// `/etc/tcpmgm/tcpmgm.toml`, for example:
///
/// ```toml
/// db = "postgres://opensips:secret@127.0.0.1/opensips"
/// cgroup = "sip.slice"
/// create_cgroup = true
/// listeners = ["tls:10.0.0.1:5061 tag trunks", "tcp:10.0.0.1:5060"]
/// sockets_from = ["/etc/opensips/opensips.cfg"]
/// skip_invalid = false
/// poll_interval = 5.0
/// detach_on_exit = false
/// # pin_dir = "/sys/fs/bpf/tcpmgm/sip-slice"
/// # control = "/run/tcpmgm/sip-slice.sock"
/// ```
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub db: Option<String>,
    pub cgroup: Option<PathBuf>,
    #[serde(default)]
    pub listeners: Vec<String>,
    #[serde(default)]
    pub sockets_from: Vec<PathBuf>,
    pub skip_invalid: Option<bool>,
    pub pin_dir: Option<PathBuf>,
    pub control: Option<PathBuf>,
    #[serde(default, deserialize_with = "poll_interval")]
    pub poll_interval: Option<Duration>,
    pub detach_on_exit: Option<bool>,
    pub netns: Option<PathBuf>,
    pub enforce_default_lifetime: Option<bool>,
    pub reapply_existing: Option<bool>,
    pub create_cgroup: Option<bool>,
    #[serde(default, deserialize_with = "db_timeout")]
    pub db_timeout: Option<Duration>,
    pub audit: Option<bool>,
    pub app_options: Option<AppOptions>,
    pub enforce_default_connect_timeout: Option<bool>,
    pub metrics: Option<SocketAddr>,
    /// Which per-rule series the metrics carry (as `--metrics-rules`).
    pub metrics_rules: Option<MetricsRules>,
    /// OpenSIPS's configuration file (as `--opensips-cfg`).
    pub opensips_cfg: Option<PathBuf>,
    /// The rule table's name (as `--table`).
    pub table: Option<crate::policy::source::TableName>,
    /// The group that may read the per-socket records (as `--api-group`).
    pub api_group: Option<String>,
    /// How the log is written: `"text"` (default) or `"json"` (as `--log-format`).
    pub log_format: Option<LogFormat>,
    /// The table's columns by the names it gives them, where they are not OpenSIPS's (as the
    /// tcp_mgm module's `<column>_col`): `[columns]` then `keepidle = "ka_idle"`. Wins over
    /// --opensips-cfg's, column by column.
    #[serde(default)]
    pub columns: crate::policy::source::ColumnMap,
}

/// What a process's own setsockopt() may do to the options its socket's rule sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AppOptions {
    /// The rule's value stays (the call succeeds; the rule's value is what getsockopt reads).
    Enforce,
    /// The application's value takes over, as without tcpmgm.
    Allow,
}

/// Which per-rule series a scrape of the metrics carries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum MetricsRules {
    /// A rule's counter only once it counted something: a table of a million rules, most of
    /// them idle, does not make eight million series.
    #[default]
    Nonzero,
    /// Every counter of every rule of the rule set in force, zeros included.
    All,
    /// No per-rule series.
    None,
}

/// How the log is written to stderr (the command line says where each applies).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// A line of text an event.
    #[default]
    Text,
    /// A JSON object an event, for log shippers.
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("--opensips-cfg {0}")]
    OpenSips(#[from] crate::policy::opensips_cfg::CfgError),
    /// A setting the command needs, given neither on the command line nor in the file.
    #[error("no {key}: give --{flag}, or `{key}` in the config file")]
    Missing {
        key: &'static str,
        flag: &'static str,
    },
    /// `reload` with no cgroup or control socket anywhere: what was looked at.
    #[error("no cgroup: give --cgroup, --control or --config, or `cgroup` in {0}")]
    NoCgroup(String),
    #[error("no rule database: {0}")]
    NoDatabase(String),
    #[error("config {path}: [columns]: {reason}")]
    Columns { path: PathBuf, reason: String },
}

/// The configuration file read when no option names a configuration or a rule source, as
/// opensips-cli finds its own.
pub const DEFAULT_PATH: &str = "/etc/tcpmgm/tcpmgm.toml";

/// A value of an option outside what the option accepts: the value as given, and the range.
#[derive(Debug, thiserror::Error)]
#[error("{value} is not {unit} from {min} to {max}")]
pub struct BadValue {
    pub value: String,
    pub unit: &'static str,
    pub min: f64,
    pub max: f64,
}

/// An option that takes a number of seconds, and the range it accepts: the range keeps a
/// `Duration` from panicking (negative, NaN, infinite or too large) and a poll from spinning.
pub struct Seconds {
    /// The key in the configuration file (the command line's `--key-name`).
    pub key: &'static str,
    pub min: f64,
    pub max: f64,
}

pub const POLL_INTERVAL: Seconds = Seconds {
    key: "poll_interval",
    min: 0.01,
    max: 86_400.0,
};

pub const DB_TIMEOUT: Seconds = Seconds {
    key: "db_timeout",
    min: 0.1,
    max: 86_400.0,
};

impl Seconds {
    /// The command line's value (clap names the option with the error).
    pub fn parse(&self, text: &str) -> Result<Duration, BadValue> {
        let secs = text.trim().parse().unwrap_or(f64::NAN);
        self.check(secs, text)
    }

    fn check(&self, secs: f64, text: &str) -> Result<Duration, BadValue> {
        // NaN is in no range.
        if (self.min..=self.max).contains(&secs) {
            Ok(Duration::from_secs_f64(secs))
        } else {
            Err(BadValue {
                value: text.to_owned(),
                unit: "a number of seconds",
                min: self.min,
                max: self.max,
            })
        }
    }

    /// The configuration file's value, an integer or a float: an error names the key, and the
    /// TOML error around it the file and the line.
    fn deserialize<'de, D: Deserializer<'de>>(&self, d: D) -> Result<Option<Duration>, D::Error> {
        let value = toml::Value::deserialize(d)?;
        // As TOML writes them (toml's own Display gives 1e300 in 301 digits).
        let (secs, text) = match value {
            toml::Value::Integer(i) => (i as f64, i.to_string()),
            toml::Value::Float(f) if f.is_nan() => (f, "nan".to_owned()),
            toml::Value::Float(f) if f.is_infinite() => (f, format!("{f}")),
            toml::Value::Float(f) => (f, format!("{f:?}")),
            other => (f64::NAN, other.to_string()),
        };
        self.check(secs, &text)
            .map(Some)
            .map_err(|bad| serde::de::Error::custom(format!("{}: {bad}", self.key)))
    }
}

fn poll_interval<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    POLL_INTERVAL.deserialize(d)
}

fn db_timeout<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    DB_TIMEOUT.deserialize(d)
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(path, &text)
    }

    /// The file `given` (--config, TCPMGM_CONFIG), else `DEFAULT_PATH` when it exists and
    /// `nothing_else` was named; says which it read on stderr (the daemon's log), and returns
    /// its path with it. No file: the empty configuration.
    pub fn find(
        given: Option<&Path>,
        nothing_else: bool,
    ) -> Result<(Option<PathBuf>, Config), ConfigError> {
        let (path, how) = match given {
            Some(path) => (path, "given"),
            None if nothing_else && Path::new(DEFAULT_PATH).exists() => {
                (Path::new(DEFAULT_PATH), "found by default")
            }
            None => return Ok((None, Config::default())),
        };
        let config = Config::load(path)?;
        tracing::info!("configuration: {} ({how})", path.display());
        Ok((Some(path.to_path_buf()), config))
    }

    /// Reads the configuration from `text`, the contents of the file at `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// `tcpmgm run`'s own options, as given on its command line. An on/off option is `--NAME`
/// (on), `--NAME=true` or `--NAME=false`.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct RunFlags {
    /// The cgroup v2 to govern: a path below the cgroup2 mount, or an absolute path.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// Load the valid rows and log the bad ones, instead of refusing to start.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub skip_invalid: Option<bool>,
    /// bpffs directory for the pinned maps [default: <bpffs>/tcpmgm/<cgroup>].
    #[arg(long)]
    pub pin_dir: Option<PathBuf>,
    /// Create the cgroup when it does not exist, e.g. a slice systemd starts later
    /// (with --detach-on-exit it is removed at exit when empty).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub create_cgroup: Option<bool>,
    /// Control socket for `tcpmgm reload` [default: /run/tcpmgm/<cgroup>.sock].
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// On SIGINT/SIGTERM take the policy off the cgroup. By default it stays in force
    /// (pinned) after the daemon exits, and the next `run` takes it over.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub detach_on_exit: Option<bool>,
    /// With SQLite or MariaDB, look for changes to the table every SECONDS and reload when
    /// it changed (PostgreSQL needs no polling: it notifies). From 0.01 to 86400.
    #[arg(long, value_name = "SECONDS", allow_negative_numbers = true,
          value_parser = |s: &str| POLL_INTERVAL.parse(s))]
    pub poll_interval: Option<Duration>,
    /// The network namespace the cgroup's sockets live in, for con_lifetime (a
    /// /var/run/netns path) [default: tcpmgm's own].
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,
    /// Enforce con_lifetime also where a rule keeps OpenSIPS's default of 120 s.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub enforce_default_lifetime: Option<bool>,
    /// After each reload, give the cgroup's established connections the keepalive options of
    /// the rule that now matches them (by default a profile is kept for a connection's life,
    /// as in OpenSIPS).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub reapply_existing: Option<bool>,
    /// How long reading the table may take before a reload gives up (the policy in force
    /// stays), from 0.1 to 86400 [default: 30].
    #[arg(long, value_name = "SECONDS", allow_negative_numbers = true,
          value_parser = |s: &str| DB_TIMEOUT.parse(s))]
    pub db_timeout: Option<Duration>,
    /// Audit mode: decide as when enforcing, but refuse nothing, close nothing and set
    /// nothing; count and log, per rule, what would have been done.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub audit: Option<bool>,
    /// Whether the cgroup's processes may change, with their own setsockopt(), the options
    /// their socket's rule sets [default: enforce].
    #[arg(long, value_enum, value_name = "enforce|allow")]
    pub app_options: Option<AppOptions>,
    /// Enforce connect_timeout also where a rule keeps OpenSIPS's schema default of 100 ms.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub enforce_default_connect_timeout: Option<bool>,
    /// Serve Prometheus metrics at ADDR:PORT (/metrics).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<SocketAddr>,
    /// Which per-rule counters the metrics carry: those that counted something, every one
    /// (zeros included), or none [default: nonzero].
    #[arg(long, value_enum, value_name = "nonzero|all|none")]
    pub metrics_rules: Option<MetricsRules>,
    /// Let the members of GROUP (a name or a number) read the per-socket records, as a
    /// SIP server running as an unprivileged user reads its own sockets' profiles; nothing
    /// else of the pins becomes readable.
    #[arg(long, value_name = "GROUP")]
    pub api_group: Option<String>,
    /// How the log is written to stderr: text (colour and timestamps on a terminal; elsewhere
    /// plain, each line starting with its syslog priority, <3> to <7>, as journald reads it) or
    /// json (one object a line, for log shippers) [default: text].
    #[arg(long, value_enum, value_name = "text|json")]
    pub log_format: Option<LogFormat>,
}

impl Config {
    /// The file's settings with those given on the command line on top.
    pub fn overlay(mut self, given: &RunFlags) -> Config {
        macro_rules! over {
            ($($field:ident),* $(,)?) => {
                $(if given.$field.is_some() {
                    self.$field.clone_from(&given.$field);
                })*
            };
        }
        over!(
            cgroup,
            skip_invalid,
            pin_dir,
            create_cgroup,
            control,
            detach_on_exit,
            poll_interval,
            netns,
            enforce_default_lifetime,
            reapply_existing,
            db_timeout,
            audit,
            app_options,
            enforce_default_connect_timeout,
            metrics,
            metrics_rules,
            api_group,
            log_format,
        );
        self
    }

    /// How the rules are enforced beyond their rows.
    pub fn enforcement(&self) -> Enforcement {
        Enforcement {
            default_connect_timeout: self.enforce_default_connect_timeout == Some(true),
            default_lifetime: self.enforce_default_lifetime == Some(true),
            audit: self.audit == Some(true),
            app_options_allow: self.app_options == Some(AppOptions::Allow),
        }
    }
}

impl RuleArgs {
    /// Folds the configuration file (if any) in: the command line wins, listeners add up.
    /// Then reads `--opensips-cfg` (from either), for what the options left unset. Returns the
    /// file's contents, for the options beyond the rules.
    /// Without --config, --db or --opensips-cfg, the configuration is `DEFAULT_PATH` when it
    /// exists (and a reload reads it again). No database from any of them is an error naming
    /// what was looked at.
    pub fn with_config(&mut self) -> Result<Config, ConfigError> {
        let nothing_else = self.db.is_none() && self.opensips_cfg.is_none();
        let (path, config) = Config::find(self.config.as_deref(), nothing_else)?;
        self.config = path;
        if self.db.is_none() {
            self.db.clone_from(&config.db);
        }
        if self.table.is_none() {
            self.table.clone_from(&config.table);
        }
        if self.opensips_cfg.is_none() {
            self.opensips_cfg.clone_from(&config.opensips_cfg);
        }
        self.listeners.extend(config.listeners.iter().cloned());
        self.sockets_from
            .extend(config.sockets_from.iter().cloned());
        if let Some(path) = &self.opensips_cfg {
            let cfg = OpenSipsCfg::read(path)?;
            if self.table.is_none() {
                self.table = cfg.table()?;
            }
            if self.db.is_none() {
                self.db = Some(cfg.db()?);
            }
            self.columns = cfg.columns.clone();
            self.opensips = Some(cfg);
        }
        if let Some(path) = &self.config {
            self.columns
                .overlay(&config.columns)
                .map_err(|reason| ConfigError::Columns {
                    path: path.clone(),
                    reason,
                })?;
        }
        if self.db.is_none() {
            return Err(ConfigError::NoDatabase(match &self.config {
                Some(path) => format!(
                    "{} sets neither db nor opensips_cfg, and neither --db, TCPMGM_DB nor \
                     --opensips-cfg was given",
                    path.display()
                ),
                None => format!(
                    "give --db (or TCPMGM_DB), --opensips-cfg or --config (or TCPMGM_CONFIG); \
                     {DEFAULT_PATH} does not exist"
                ),
            }));
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `config` fuzz target too: a NaN, negative, endless or huge seconds value
    /// panicked in `Duration::from_secs_f64` once overlaid and turned into a duration.
    #[test]
    fn seconds_out_of_range_in_the_file_are_errors_naming_the_key() {
        for bad in ["-1.0", "0.0", "inf", "nan", "1e300"] {
            let err = Config::parse(Path::new("t.toml"), &format!("db_timeout = {bad}"))
                .expect_err(bad)
                .to_string();
            assert!(err.contains("db_timeout"), "{bad}: {err}");
        }
        let c = Config::parse(Path::new("t.toml"), "poll_interval = 0.5\ndb_timeout = 30").unwrap();
        assert_eq!(c.poll_interval, Some(Duration::from_millis(500)));
        assert_eq!(c.db_timeout, Some(Duration::from_secs(30)));
    }

    #[test]
    fn every_option_parses_and_unknown_keys_are_named() {
        let c: Config = toml::from_str(
            r#"
            db = "sqlite:///var/lib/tcpmgm/rules.db"
            cgroup = "opensips"
            listeners = ["tls:10.0.0.1:5061 tag trunks"]
            sockets_from = ["/etc/opensips/opensips.cfg"]
            skip_invalid = true
            pin_dir = "/sys/fs/bpf/x"
            control = "/run/x.sock"
            poll_interval = 2.5
            detach_on_exit = true
            netns = "/var/run/netns/sip"
            enforce_default_lifetime = true
            reapply_existing = true
            create_cgroup = true
            db_timeout = 7
            audit = true
            app_options = "allow"
            enforce_default_connect_timeout = true
            metrics = "127.0.0.1:9464"
            metrics_rules = "all"
            opensips_cfg = "/etc/opensips/opensips.cfg"
            table = "carrier_rules"
            api_group = "opensips"
            log_format = "json"
            [columns]
            keepidle = "ka_idle"
            "#,
        )
        .unwrap();
        assert_eq!(
            (c.poll_interval, c.skip_invalid, c.listeners.len()),
            (Some(Duration::from_millis(2500)), Some(true), 1)
        );
        assert_eq!(c.metrics_rules, Some(MetricsRules::All));
        // Every key is read into its field, as its flag would set it.
        assert_eq!(c.db.as_deref(), Some("sqlite:///var/lib/tcpmgm/rules.db"));
        assert_eq!(c.cgroup.as_deref(), Some(Path::new("opensips")));
        assert_eq!(c.sockets_from, [Path::new("/etc/opensips/opensips.cfg")]);
        assert_eq!(c.pin_dir.as_deref(), Some(Path::new("/sys/fs/bpf/x")));
        assert_eq!(c.control.as_deref(), Some(Path::new("/run/x.sock")));
        assert_eq!(c.detach_on_exit, Some(true));
        assert_eq!(c.netns.as_deref(), Some(Path::new("/var/run/netns/sip")));
        assert_eq!(
            (
                c.enforce_default_lifetime,
                c.reapply_existing,
                c.create_cgroup
            ),
            (Some(true), Some(true), Some(true))
        );
        assert_eq!(c.db_timeout, Some(Duration::from_secs(7)));
        assert_eq!(
            (c.audit, c.app_options, c.enforce_default_connect_timeout),
            (Some(true), Some(AppOptions::Allow), Some(true))
        );
        assert_eq!(c.metrics, Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(
            c.opensips_cfg.as_deref(),
            Some(Path::new("/etc/opensips/opensips.cfg"))
        );
        assert_eq!(c.table.as_ref().map(|t| t.as_str()), Some("carrier_rules"));
        assert_eq!(c.api_group.as_deref(), Some("opensips"));
        assert_eq!(c.log_format, Some(LogFormat::Json));
        assert_eq!(c.columns.actual("keepidle"), "ka_idle");
        let e = c.enforcement();
        assert!(e.audit && e.app_options_allow && e.default_connect_timeout);
        let given = c.clone().overlay(&given(&["--metrics-rules", "none"]));
        assert_eq!(given.metrics_rules, Some(MetricsRules::None));
        let shipped: Config = toml::from_str(include_str!("../../contrib/tcpmgm.toml")).unwrap();
        assert_eq!(shipped.cgroup.as_deref(), Some(Path::new("sip.slice")));
        let err = toml::from_str::<Config>("dbb = 'x'")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `dbb`"), "{err}");
    }

    #[derive(clap::Parser)]
    struct Run {
        #[command(flatten)]
        flags: RunFlags,
    }

    fn given(args: &[&str]) -> RunFlags {
        use clap::Parser as _;
        Run::try_parse_from(std::iter::once("run").chain(args.iter().copied()))
            .unwrap()
            .flags
    }

    #[test]
    fn the_command_line_wins_over_the_file_either_way() {
        let file: Config = toml::from_str(
            "audit = true\nreapply_existing = true\npoll_interval = 5.0\ncgroup = 'a'",
        )
        .unwrap();
        let merged = file.clone().overlay(&given(&[
            "--audit=false",
            "--detach-on-exit",
            "--cgroup",
            "b",
        ]));
        assert_eq!(
            merged.audit,
            Some(false),
            "--audit=false turns the file's audit off"
        );
        assert_eq!(
            merged.detach_on_exit,
            Some(true),
            "a bare flag turns an option on"
        );
        assert_eq!(
            merged.reapply_existing,
            Some(true),
            "what is not given keeps the file's"
        );
        assert_eq!(merged.poll_interval, Some(Duration::from_secs(5)));
        assert_eq!(merged.cgroup.as_deref(), Some(Path::new("b")));
        assert!(!merged.enforcement().audit);
        let off: Config = toml::from_str("audit = false").unwrap();
        assert!(off.overlay(&given(&["--audit=true"])).enforcement().audit);
        assert!(file.overlay(&given(&[])).enforcement().audit);
        // `--audit false` is not `--audit=false`: a value must be attached.
        use clap::Parser as _;
        assert!(Run::try_parse_from(["run", "--audit", "false"]).is_err());
    }

    #[test]
    fn seconds_out_of_range_are_refused_naming_the_option_and_the_range() {
        use clap::Parser as _;
        for (key, range) in [
            ("poll_interval", "from 0.01 to 86400"),
            ("db_timeout", "from 0.1 to 86400"),
        ] {
            for value in ["-1", "nan", "inf", "1e300", "0", "soon"] {
                let flag = format!("--{}", key.replace('_', "-"));
                let err = Run::try_parse_from(["run", &flag, value])
                    .err()
                    .unwrap_or_else(|| panic!("{flag} {value} was taken"))
                    .to_string();
                assert!(
                    err.contains(&flag)
                        && err.contains(&format!("{value} is not a number of seconds {range}")),
                    "{err}"
                );
                let toml_value = if value == "soon" { "\"soon\"" } else { value };
                let err = toml::from_str::<Config>(&format!("{key} = {toml_value}"))
                    .expect_err(value)
                    .to_string();
                assert!(
                    err.contains(&format!(
                        "{key}: {toml_value} is not a number of seconds {range}"
                    )),
                    "{err}"
                );
            }
        }
        let c: Config = toml::from_str("poll_interval = 1\ndb_timeout = 0.5").unwrap();
        assert_eq!(
            (c.poll_interval, c.db_timeout),
            (
                Some(Duration::from_secs(1)),
                Some(Duration::from_millis(500))
            )
        );
    }
}
