//! The steps every command shares: read the table, validate, and (for `run`) compile.
use std::path::PathBuf;

use crate::listener::{ListenerError, Listeners};
use crate::rule::{RowError, Rule, validate_rows};
use crate::source::{Source, SourceError};

/// Where the rules and listeners come from.
#[derive(Clone, Debug, clap::Args)]
pub struct RuleArgs {
    /// Rule database: sqlite://PATH (or a plain file path).
    #[arg(long, env = "TCPMGM_DB", default_value = "sqlite://tcpmgm.db")]
    pub db: String,
    /// A listener in OpenSIPS socket syntax, e.g. "tls:10.0.0.1:5061 tag trunks". Repeatable.
    #[arg(long = "listener", value_name = "SPEC")]
    pub listeners: Vec<String>,
    /// Read listeners from the socket= / listen= lines of a file (e.g. your opensips.cfg).
    #[arg(long, value_name = "FILE")]
    pub sockets_from: Vec<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Listener(#[from] ListenerError),
}

/// The table, validated.
pub struct RuleSet {
    pub rules: Vec<Rule>,
    pub errors: Vec<RowError>,
    pub listeners: Listeners,
    pub table_version: Option<i64>,
}

impl RuleArgs {
    pub fn listeners(&self) -> Result<Listeners, ListenerError> {
        let mut listeners = Listeners::parse_all(self.listeners.iter().map(String::as_str))?;
        for file in &self.sockets_from {
            listeners.read_file(file)?;
        }
        Ok(listeners)
    }

    /// Reads and validates the whole table.
    pub async fn read(&self) -> Result<RuleSet, PipelineError> {
        let listeners = self.listeners()?;
        let source = Source::open(&self.db, false).await?;
        let table = source.read().await?;
        if let Some(v) = table.version
            && (v == 1) != table.has_parallel_read
        {
            tracing::warn!(
                "tcp_mgm is listed as version {v} but {} a parallel_read column",
                if table.has_parallel_read {
                    "has"
                } else {
                    "lacks"
                }
            );
        }
        let (rules, errors) = validate_rows(&table.rows, &listeners);
        Ok(RuleSet {
            rules,
            errors,
            listeners,
            table_version: table.version,
        })
    }
}
