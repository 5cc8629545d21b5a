//! The configuration file: every option of `tcpmgm run` (and the rule options of `check` and
//! `match`), in TOML. The command line wins over the file; listeners from both are used.
use std::path::{Path, PathBuf};

use serde::Deserialize;

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
    pub poll_interval: Option<f64>,
    pub detach_on_exit: Option<bool>,
    pub netns: Option<PathBuf>,
    pub enforce_default_lifetime: Option<bool>,
    pub reapply_existing: Option<bool>,
    pub create_cgroup: Option<bool>,
    pub db_timeout: Option<f64>,
    pub audit: Option<bool>,
    pub app_options: Option<AppOptions>,
    pub enforce_default_connect_timeout: Option<bool>,
    pub metrics: Option<std::net::SocketAddr>,
    /// OpenSIPS's configuration file (as `--opensips-cfg`).
    pub opensips_cfg: Option<PathBuf>,
    /// The rule table's name (as `--table`).
    pub table: Option<crate::source::TableName>,
    /// The group that may read the per-socket records (as `--api-group`).
    pub api_group: Option<String>,
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
    OpenSips(#[from] crate::opensips_cfg::CfgError),
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            "#,
        )
        .unwrap();
        assert_eq!(
            (c.poll_interval, c.skip_invalid, c.listeners.len()),
            (Some(2.5), Some(true), 1)
        );
        let shipped: Config = toml::from_str(include_str!("../../contrib/tcpmgm.toml")).unwrap();
        assert_eq!(shipped.cgroup.as_deref(), Some(Path::new("sip.slice")));
        let err = toml::from_str::<Config>("dbb = 'x'")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `dbb`"), "{err}");
    }
}
