//! Noticing that the rule table changed, so `tcpmgm run` reloads by itself: PostgreSQL tells us
//! (LISTEN/NOTIFY, through the trigger `tcpmgm db init` installs, or that the daemon installs
//! when its role may); SQLite and MariaDB are asked every `--poll-interval`, with a query that
//! costs little when nothing changed, and so is a PostgreSQL table without the trigger whose
//! role may not create it. A polled SQLite file is followed by its name: an editor or `mv` that
//! replaces it, or a restore after it was deleted, gives a new file, which a connection to the
//! old one would never see.
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::{AnyConnection, Connection};

use crate::policy::source::{
    Dialect, NOTIFY_CHANNEL, ROWS_CHANNEL, Redacted, Source, SourceError, TableName, normalize_url,
};

/// How often a PostgreSQL table without the change trigger is polled when no `--poll-interval`
/// was given.
pub const POSTGRES_POLL: Duration = Duration::from_secs(5);

/// What a poll compares.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Fingerprint {
    version: String,
    /// Computed only while the table's update time is recent (MariaDB).
    checksum: Option<String>,
}

impl Fingerprint {
    fn differs(&self, other: &Fingerprint) -> bool {
        self.version != other.version
            || matches!((&self.checksum, &other.checksum), (Some(a), Some(b)) if a != b)
    }
}

enum How {
    /// Reload only on request.
    Manual,
    /// `rows`: on `ROWS_CHANNEL`, whose notifications name the rows; else on `NOTIFY_CHANNEL`.
    Notify {
        listener: Box<PgListener>,
        table: TableName,
        rows: bool,
    },
    Poll {
        conn: AnyConnection,
        /// What `conn` was opened from, to open it again when a SQLite file is replaced.
        url: String,
        /// The SQLite file `conn` has open.
        file: Option<FileId>,
        dialect: Dialect,
        table: TableName,
        every: Duration,
        last: Option<Fingerprint>,
        /// Why a PostgreSQL table is polled rather than followed.
        why: Option<String>,
    },
}

pub struct Watcher {
    how: How,
}

/// A SQLite file by its path and the inode it had when it was opened.
struct FileId {
    path: PathBuf,
    inode: Inode,
}

/// Device, inode number and birth time (where the file system keeps one): a file deleted and
/// made again between two polls may get the same inode number, not the same birth time.
type Inode = (u64, u64, Option<std::time::SystemTime>);

impl FileId {
    /// The file a `sqlite:` URL names, as it is now; None for an in-memory database (or a file
    /// that is missing now, which the connection then fails to open).
    fn of(url: &str) -> Option<FileId> {
        use std::str::FromStr as _;
        let options = sqlx::sqlite::SqliteConnectOptions::from_str(url).ok()?;
        let path = options.get_filename().to_path_buf();
        let inode = inode(&path).ok()?;
        Some(FileId { path, inode })
    }
}

fn inode(path: &Path) -> std::io::Result<Inode> {
    std::fs::metadata(path).map(|m| (m.dev(), m.ino(), m.created().ok()))
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("{}: {source}", path.display())]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The change detector's verdict.
pub enum Change {
    /// The table changed.
    Table,
    /// These rows of the table changed, were added or removed, and nothing else.
    Rows(Vec<i64>),
    /// We may have missed changes (the listener's connection dropped): reload to be sure.
    Unknown,
}

impl Watcher {
    /// Watches `table` at `url`: notifications with PostgreSQL, else polling when `poll` is set.
    pub async fn new(
        url: &str,
        table: &TableName,
        poll: Option<Duration>,
    ) -> Result<Watcher, SourceError> {
        let url = normalize_url(url);
        let redacted = Redacted::new(&url);
        let fail = |source| SourceError::Connect {
            url: redacted.clone(),
            source,
        };
        let dialect = Dialect::of(&url);
        let mut why = None;
        if dialect == Some(Dialect::Postgres) {
            match notify_trigger(&url, table).await? {
                Ok(rows) => {
                    let mut listener = PgListener::connect(&url).await.map_err(fail)?;
                    let channel = if rows { ROWS_CHANNEL } else { NOTIFY_CHANNEL };
                    listener.listen(channel).await.map_err(fail)?;
                    return Ok(Watcher {
                        how: How::Notify {
                            listener: Box::new(listener),
                            table: table.clone(),
                            rows,
                        },
                    });
                }
                Err(reason) => why = Some(reason),
            }
        }
        let every = match (dialect, poll) {
            (Some(Dialect::Postgres), None) => Some(POSTGRES_POLL),
            (_, every) => every,
        };
        let how = match (dialect, every) {
            (Some(dialect), Some(every)) => {
                sqlx::any::install_default_drivers();
                let url = url.replacen("mariadb:", "mysql:", 1);
                // Before connecting: a file replaced in between is then seen as replaced at the
                // first poll, which costs one reload more, never a change missed.
                let file = (dialect == Dialect::Sqlite)
                    .then(|| FileId::of(&url))
                    .flatten();
                let mut conn = AnyConnection::connect(&url).await.map_err(fail)?;
                let last = Some(
                    fingerprint(&mut conn, dialect, table, every)
                        .await
                        .map_err(fail)?,
                );
                How::Poll {
                    conn,
                    url,
                    file,
                    dialect,
                    table: table.clone(),
                    every,
                    last,
                    why,
                }
            }
            _ => How::Manual,
        };
        Ok(Watcher { how })
    }

    /// Whether its notifications name the rows that changed.
    pub fn names_rows(&self) -> bool {
        matches!(self.how, How::Notify { rows: true, .. })
    }

    pub fn describe(&self) -> String {
        match &self.how {
            How::Manual => "reloads on request only (SIGHUP, `tcpmgm reload`; --poll-interval to follow the table)".into(),
            How::Notify { rows: true, .. } => format!("follows the table: PostgreSQL notifies channel {ROWS_CHANNEL} of the rows each commit changed"),
            How::Notify { rows: false, .. } => format!("follows the table: PostgreSQL notifies channel {NOTIFY_CHANNEL} at each commit (without the row triggers `tcpmgm db init` installs, each reload reads the whole table)"),
            How::Poll {
                every, why: None, ..
            } => format!("follows the table: polls it every {every:?}"),
            How::Poll {
                every,
                why: Some(why),
                ..
            } => format!(
                "PostgreSQL will not notify: {why}; follows the table by polling it every {every:?} instead (`tcpmgm db init` as the table's owner installs the trigger)"
            ),
        }
    }

    /// Resolves when the table changed (or may have), or the polled SQLite file is gone. Never
    /// resolves in manual mode.
    pub async fn changed(&mut self) -> Result<Change, WatchError> {
        match &mut self.how {
            How::Manual => std::future::pending().await,
            How::Notify {
                listener,
                table,
                rows,
            } => {
                let rows = *rows;
                let mut change = None;
                // One reload for a burst of commits: take what arrives in the next 50 ms too.
                loop {
                    let next = if change.is_none() {
                        listener.try_recv().await?
                    } else {
                        match tokio::time::timeout(Duration::from_millis(50), listener.try_recv())
                            .await
                        {
                            Ok(Ok(next)) => next,
                            _ => break,
                        }
                    };
                    let Some(n) = next else {
                        change = Some(Change::Unknown);
                        break;
                    };
                    let Some(this) = notified(n.payload(), table, rows) else {
                        continue;
                    };
                    change = Some(match (change, this) {
                        (None, this) => this,
                        (Some(Change::Rows(mut ids)), Change::Rows(more)) => {
                            ids.extend(more);
                            Change::Rows(ids)
                        }
                        _ => Change::Table,
                    });
                }
                Ok(change.unwrap_or(Change::Unknown))
            }
            How::Poll {
                conn,
                url,
                file,
                dialect,
                table,
                every,
                last,
                ..
            } => loop {
                tokio::time::sleep(*every).await;
                if let Some(file) = file {
                    let now = inode(&file.path).map_err(|source| WatchError::File {
                        path: file.path.clone(),
                        source,
                    })?;
                    if now != file.inode {
                        tracing::info!(
                            "{} was replaced: following the new file",
                            file.path.display()
                        );
                        *conn = AnyConnection::connect(url).await?;
                        file.inode = now;
                        *last = Some(fingerprint(conn, *dialect, table, *every).await?);
                        return Ok(Change::Table);
                    }
                }
                let now = fingerprint(conn, *dialect, table, *every).await?;
                let changed = last.as_ref().is_none_or(|l| l.differs(&now));
                *last = Some(now);
                if changed {
                    return Ok(Change::Table);
                }
            },
        }
    }
}

/// What a notification says of the table `table`, where `rows`: on the row triggers' channel
/// (payload `TABLE IDS`, or `TABLE *`), else on the table trigger's (payload `TABLE`, or TG_OP
/// from triggers installed before tables could be named: any change then counts). None: it is
/// another table's.
fn notified(payload: &str, table: &TableName, rows: bool) -> Option<Change> {
    if !rows {
        let ours = payload.eq_ignore_ascii_case(table.as_str())
            || ["INSERT", "UPDATE", "DELETE", "TRUNCATE"].contains(&payload);
        return ours.then_some(Change::Table);
    }
    let (name, ids) = payload.split_once(' ')?;
    if !name.eq_ignore_ascii_case(table.as_str()) {
        return None;
    }
    if ids.is_empty() {
        return Some(Change::Rows(Vec::new()));
    }
    let ids: Option<Vec<i64>> = ids.split(',').map(|id| id.parse().ok()).collect();
    Some(ids.map_or(Change::Table, Change::Rows))
}

/// Makes sure PostgreSQL's change triggers are on the table: Ok(whether the row triggers are)
/// when it notifies (the triggers installed now if this role may create them), Err(why not)
/// when it will not.
async fn notify_trigger(url: &str, table: &TableName) -> Result<Result<bool, String>, SourceError> {
    let source = Source::open_table(url, false, table).await?;
    let has = source.has_notify_trigger().await?;
    if has && source.has_row_triggers().await? {
        return Ok(Ok(true));
    }
    match source.install_notify_trigger().await {
        Ok(()) => {
            tracing::info!(
                "installed the change triggers tcpmgm_notify and tcpmgm_rows_* on {table}"
            );
            Ok(Ok(true))
        }
        // Notified of the table only, as by an earlier version's `db init`.
        Err(e) if has => {
            tracing::info!(
                "table {table} has no tcpmgm_rows_* triggers, and this role cannot create them ({e}): each reload reads the whole table"
            );
            Ok(Ok(false))
        }
        Err(e) => Ok(Err(format!(
            "table {table} has no tcpmgm_notify trigger, and this role cannot create it ({e})"
        ))),
    }
}

/// A value that changes when the table does. SQLite: the file's data version (bumped by every
/// commit of another connection). MariaDB: the table's update time (whole seconds); a change in
/// the same second as the previous poll's is caught by CHECKSUM TABLE, computed only while the
/// update time is within one poll interval (and 2 s) of now, so an idle table costs one cheap
/// query a poll.
async fn fingerprint(
    conn: &mut AnyConnection,
    dialect: Dialect,
    table: &TableName,
    every: Duration,
) -> Result<Fingerprint, sqlx::Error> {
    match dialect {
        Dialect::Sqlite => {
            let v: i64 = sqlx::query_scalar("PRAGMA data_version")
                .fetch_one(&mut *conn)
                .await?;
            Ok(Fingerprint {
                version: v.to_string(),
                checksum: None,
            })
        }
        Dialect::MySql => {
            let (updated, age): (Option<String>, Option<i64>) = sqlx::query_as(&format!(
                "SELECT CAST(UPDATE_TIME AS CHAR), CAST(TIMESTAMPDIFF(SECOND, UPDATE_TIME, NOW()) AS SIGNED) \
                 FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name = '{table}'",
            ))
            .fetch_one(&mut *conn)
            .await?;
            let recent = age.is_none_or(|a| a <= every.as_secs() as i64 + 2);
            let checksum = if recent {
                let row = sqlx::query(&format!("CHECKSUM TABLE {table}"))
                    .fetch_one(&mut *conn)
                    .await?;
                Some(checksum_text(&row))
            } else {
                None
            };
            Ok(Fingerprint {
                version: updated.unwrap_or_default(),
                checksum,
            })
        }
        Dialect::Postgres => {
            // Without the trigger: the row count and a sum of the rows' hashes change with any
            // insert, update or delete.
            let v: String = sqlx::query_scalar(&format!(
                "SELECT count(*)::text || ':' || coalesce(sum(hashtext(t::text)::bigint), 0)::text \
                 FROM {table} t",
            ))
            .fetch_one(&mut *conn)
            .await?;
            Ok(Fingerprint {
                version: v,
                checksum: None,
            })
        }
    }
}

/// CHECKSUM TABLE's second column, whatever integer type the driver reports it as.
fn checksum_text(row: &sqlx::any::AnyRow) -> String {
    use sqlx::Row;
    row.try_get::<Option<i64>, _>(1)
        .map(|v| v.map(|v| v.to_string()))
        .or_else(|_| row.try_get::<Option<String>, _>(1))
        .ok()
        .flatten()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(change: Option<Change>) -> Option<Option<Vec<i64>>> {
        change.map(|c| match c {
            Change::Rows(ids) => Some(ids),
            _ => None,
        })
    }

    /// A row notification names its table and rows; anything it cannot read exactly is a
    /// change of the whole table, and another table's is none of ours.
    #[test]
    fn notifications_name_the_table_and_its_rows() {
        let t = TableName::new("tcp_mgm").unwrap();
        assert_eq!(
            rows(notified("tcp_mgm 1,22,333", &t, true)),
            Some(Some(vec![1, 22, 333]))
        );
        assert_eq!(rows(notified("tcp_mgm ", &t, true)), Some(Some(vec![])));
        assert_eq!(rows(notified("TCP_MGM 5", &t, true)), Some(Some(vec![5])));
        assert_eq!(rows(notified("tcp_mgm *", &t, true)), Some(None));
        assert_eq!(rows(notified("tcp_mgm 1,x", &t, true)), Some(None));
        assert_eq!(rows(notified("other 1", &t, true)), None);
        assert_eq!(rows(notified("tcp_mgm", &t, true)), None);
        // The table trigger's channel: the name alone, or an operation of the oldest triggers.
        assert_eq!(rows(notified("tcp_mgm", &t, false)), Some(None));
        assert_eq!(rows(notified("UPDATE", &t, false)), Some(None));
        assert_eq!(rows(notified("other", &t, false)), None);
    }
}
