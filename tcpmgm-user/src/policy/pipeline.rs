//! The steps every command shares: read the table, validate, and (for `run`) compile.
use std::path::{Path, PathBuf};

use crate::memory::{Budget, TooLarge};
use crate::policy::listener::{ListenerError, Listeners};
use crate::policy::opensips_cfg::{OpenSipsCfg, Setting};
use crate::policy::rule::{Row, RowError, Rule, validate_row};
use crate::policy::source::{Changes, ColumnMap, Mark, Source, SourceError, TableName};

/// Where the rules and listeners come from.
#[derive(Clone, Debug, clap::Args)]
pub struct RuleArgs {
    /// Rule database: sqlite://PATH (or a plain path), postgres://... or mysql://...
    /// [default: the configuration's db, or its opensips_cfg's db_url]
    #[arg(long, env = "TCPMGM_DB")]
    pub db: Option<String>,
    /// Configuration file (TOML); the command line wins over it [default:
    /// /etc/tcpmgm/tcpmgm.toml when it exists and neither --db nor --opensips-cfg is given].
    #[arg(long, env = "TCPMGM_CONFIG")]
    pub config: Option<PathBuf>,
    /// A listener in OpenSIPS socket syntax, e.g. "tls:10.0.0.1:5061 tag trunks". Repeatable.
    #[arg(long = "listener", value_name = "SPEC")]
    pub listeners: Vec<String>,
    /// Read listeners from the socket= / listen= lines of a file (e.g. your opensips.cfg).
    #[arg(long, value_name = "FILE")]
    pub sockets_from: Vec<PathBuf>,
    /// OpenSIPS's configuration: its TCP-based socket= / listen= lines, and the tcp_mgm
    /// module's db_url (else db_default_url) and db_table. --db, --table and the config file
    /// win over it.
    #[arg(long, value_name = "FILE")]
    pub opensips_cfg: Option<PathBuf>,
    /// The rule table, when it is not called tcp_mgm [default: tcp_mgm, or the db_table of
    /// --opensips-cfg].
    #[arg(long, value_name = "NAME")]
    pub table: Option<TableName>,
    /// What --opensips-cfg gave, once read (`with_config`).
    #[arg(skip)]
    pub opensips: Option<OpenSipsCfg>,
    /// The table's renamed columns, from --opensips-cfg and the configuration file
    /// (`with_config`).
    #[arg(skip)]
    pub columns: ColumnMap,
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Listener(#[from] ListenerError),
    #[error(transparent)]
    Memory(#[from] TooLarge),
}

/// The table, validated.
pub struct RuleSet {
    pub rules: Vec<Rule>,
    pub errors: Vec<RowError>,
    pub listeners: Listeners,
    pub table_version: Option<i64>,
    /// The rows read, bad ones included.
    pub rows: usize,
    /// The table's change log position from before the read (see `Source::change_mark`), when
    /// it has one: a later reload may read only what changed after it.
    pub mark: Option<Mark>,
}

/// The rows that changed since a position of the table's change log (or that a notification
/// named), validated.
pub struct Changed {
    /// The position the log is now at, where the rows came from the log.
    pub mark: Option<Mark>,
    /// The ids the log names: rows changed, added or removed.
    pub ids: Vec<i64>,
    /// The rows of those ids still in the table, valid.
    pub rules: Vec<Rule>,
    /// Their faults.
    pub errors: Vec<RowError>,
    /// The table's rows now.
    pub rows: usize,
    pub listeners: Listeners,
}

impl RuleArgs {
    /// The rule database URL (`with_config` makes sure there is one).
    pub fn db(&self) -> &str {
        self.db.as_deref().unwrap_or_default()
    }

    /// The rule table's name.
    pub fn table(&self) -> TableName {
        self.table.clone().unwrap_or_default()
    }

    pub fn listeners(&self) -> Result<Listeners, ListenerError> {
        let mut listeners = Listeners::parse_all(self.listeners.iter().map(String::as_str))?;
        // Each socket line of a file, named by the file and line where it is at fault.
        let mut add = |path: &Path, sockets: &[Setting]| {
            sockets.iter().try_for_each(|socket| {
                listeners
                    .add_socket(&socket.value)
                    .map_err(|e| ListenerError {
                        spec: format!("{}:{}: {}", path.display(), socket.line, e.spec),
                        reason: e.reason,
                    })
            })
        };
        for file in &self.sockets_from {
            let sockets = OpenSipsCfg::read_sockets(file).map_err(|e| ListenerError {
                spec: match e.line {
                    Some(line) => format!("{}:{line}", e.path.display()),
                    None => e.path.display().to_string(),
                },
                reason: e.reason,
            })?;
            add(file, &sockets)?;
        }
        if let Some(cfg) = &self.opensips {
            add(&cfg.path, &cfg.sockets)?;
        }
        Ok(listeners)
    }

    /// Reads and validates the whole table, row by row as the database sends it, within the
    /// memory limit of this process's cgroup when it has one.
    pub async fn read(&self) -> Result<RuleSet, PipelineError> {
        let listeners = self.listeners()?;
        let source = Source::open_table(self.db(), false, &self.table())
            .await?
            .with_columns(&self.columns);
        let mark = source.change_mark().await?;
        let budget = Budget::of_self();
        let mut kept = Kept::default();
        let take = |row: Row, kept: &mut Kept| {
            kept.rows += 1;
            if kept.rows.is_multiple_of(BUDGET_EVERY)
                && let Some(budget) = &budget
            {
                budget.check(kept.rows)?;
            }
            match validate_row(&row, &listeners) {
                Ok(rule) => kept.rules.push(rule),
                Err(mut e) => kept.errors.append(&mut e),
            }
            Ok::<_, PipelineError>(())
        };
        // The fast read, unless it cannot read this table exactly. Where it can, it hands over
        // the cells the row by row read would (a test holds it to that), so a bad row is
        // reported the same either way.
        let table = match source.read_fast(|row| take(row, &mut kept)).await? {
            Some(table) => table,
            None => {
                kept = Kept::default();
                source.read_each(|row| take(row, &mut kept)).await?
            }
        };
        let Kept {
            rules,
            errors,
            rows,
        } = kept;
        if let Some(budget) = &budget {
            budget.check(rules.len())?;
        }
        if let Some(v) = table.version
            && (v == 1) != table.has_parallel_read
        {
            tracing::warn!(
                "{} is listed as version {v} but {} a parallel_read column",
                self.table(),
                if table.has_parallel_read {
                    "has"
                } else {
                    "lacks"
                }
            );
        }
        Ok(RuleSet {
            rules,
            errors,
            listeners,
            table_version: table.version,
            rows,
            mark,
        })
    }

    /// Reads and validates the rows that changed after position `mark` of the table's change
    /// log, when the log can say which (`Err` says why not), at most `limit` of them.
    pub async fn read_changed(
        &self,
        mark: Mark,
        limit: usize,
    ) -> Result<Result<Changed, String>, PipelineError> {
        let listeners = self.listeners()?;
        let source = Source::open_table(self.db(), false, &self.table())
            .await?
            .with_columns(&self.columns);
        let (mark, ids) = match source.changes_since(mark, limit).await? {
            Changes::Rows { mark, ids } => (mark, ids),
            Changes::Unknown(why) => return Ok(Err(why)),
        };
        Self::read_named(&source, listeners, Some(mark), ids)
            .await
            .map(Ok)
    }

    /// Reads and validates the rows `ids` that a notification named.
    pub async fn read_rows(&self, mut ids: Vec<i64>) -> Result<Changed, PipelineError> {
        let listeners = self.listeners()?;
        let source = Source::open_table(self.db(), false, &self.table())
            .await?
            .with_columns(&self.columns);
        ids.sort_unstable();
        ids.dedup();
        Self::read_named(&source, listeners, None, ids).await
    }

    async fn read_named(
        source: &Source,
        listeners: Listeners,
        mark: Option<Mark>,
        ids: Vec<i64>,
    ) -> Result<Changed, PipelineError> {
        let mut rules = Vec::new();
        let mut errors = Vec::new();
        source
            .read_ids(&ids, |row| {
                match validate_row(&row, &listeners) {
                    Ok(rule) => rules.push(rule),
                    Err(mut e) => errors.append(&mut e),
                }
                Ok::<_, PipelineError>(())
            })
            .await?;
        let rows = usize::try_from(source.row_count().await?).unwrap_or(usize::MAX);
        Ok(Changed {
            mark,
            ids,
            rules,
            errors,
            rows,
            listeners,
        })
    }
}

/// What a read keeps of the rows it was handed.
#[derive(Default)]
struct Kept {
    rows: usize,
    rules: Vec<Rule>,
    errors: Vec<RowError>,
}

/// How many rows are read between two looks at the memory limit (a look reads two files).
const BUDGET_EVERY: usize = 4096;
