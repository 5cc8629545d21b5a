//! Where rows come from: the OpenSIPS `tcp_mgm` table, through sqlx. SQLite is built in; the
//! layer speaks to sqlx's `Any` driver so other databases plug in by URL.
mod columns;
mod schema;

use std::fmt;

use futures_util::TryStreamExt as _;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Column, Row as _};

pub use crate::policy::rule::COLUMNS;
pub use columns::ColumnMap;
pub use schema::{
    CHANGE_LOG, CHANGE_LOG_KEEP, Dialect, EXAMPLES, NOTIFIED_IDS, NOTIFY_CHANNEL, ROWS_CHANNEL,
    TableVersion,
};

use crate::policy::rule::{Cell, Row};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("database {url}: {source}")]
    Connect { url: Redacted, source: sqlx::Error },
    #[error("database {url}: {what} {table}: {source}")]
    Query {
        url: Redacted,
        what: &'static str,
        /// The rule table, which every query concerns.
        table: TableName,
        source: sqlx::Error,
    },
    #[error(
        "database {url}: table {table} has no column {column}: is it OpenSIPS's tcp_mgm table?"
    )]
    MissingColumn {
        url: Redacted,
        table: TableName,
        /// Quoted, with its canonical name when it was renamed.
        column: String,
    },
    #[error("database {url}: there is no table {table} (create it with `tcpmgm db init`)")]
    NoTable { url: Redacted, table: TableName },
    #[error("database {url}: {reason}")]
    Unsupported { url: Redacted, reason: String },
}

/// A database URL with any password hidden, for logs and errors.
#[derive(Clone, Debug)]
pub struct Redacted(String);

impl Redacted {
    pub fn new(url: &str) -> Self {
        Redacted(match (url.find("://"), url.rfind('@')) {
            (Some(s), Some(at)) if at > s => {
                let creds = &url[s + 3..at];
                match creds.split_once(':') {
                    Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                    None => url.to_owned(),
                }
            }
            _ => url.to_owned(),
        })
    }
}

impl fmt::Display for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The name of the rule table: `tcp_mgm` unless the tcp_mgm module's `db_table` says otherwise.
/// Only plain SQL identifiers are accepted, so the name goes into queries as it is.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct TableName(String);

impl TableName {
    /// OpenSIPS's default.
    pub const DEFAULT: &'static str = "tcp_mgm";

    /// A table name: a letter or `_`, then letters, digits or `_`; at most 63 characters (the
    /// shortest limit of the three databases, PostgreSQL's).
    pub fn new(name: &str) -> Result<TableName, String> {
        let mut chars = name.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!(
                "table name {name:?}: expected a plain SQL name (a letter or _, then letters, \
                 digits or _)"
            ));
        }
        if name.len() > 63 {
            return Err(format!("table name {name:?}: longer than 63 characters"));
        }
        Ok(TableName(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for TableName {
    fn default() -> Self {
        TableName(Self::DEFAULT.to_owned())
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for TableName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        TableName::new(&s)
    }
}

impl std::str::FromStr for TableName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TableName::new(s)
    }
}

/// A position in a table's change log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark {
    /// The log's own random number.
    pub origin: i64,
    /// The database file's identity (device and inode).
    pub file: u64,
    /// The last change's sequence number.
    pub seq: i64,
}

/// What the change log says changed since a position in it.
#[derive(Debug, PartialEq, Eq)]
pub enum Changes {
    /// The rows with these ids (each once) changed, were added or removed; `mark` is the
    /// position the log is now at.
    Rows { mark: Mark, ids: Vec<i64> },
    /// The log cannot say: the table is to be read whole, for this reason.
    Unknown(String),
}

/// What a read says of the table besides its rows.
#[derive(Clone, Copy, Debug)]
pub struct TableInfo {
    /// From OpenSIPS's `version` table, when it has a row for the table.
    pub version: Option<i64>,
    pub has_parallel_read: bool,
}

/// What was read from the table.
#[derive(Debug)]
pub struct Table {
    pub rows: Vec<Row>,
    /// From OpenSIPS's `version` table, when it has a row for the table.
    pub version: Option<i64>,
    pub has_parallel_read: bool,
}

/// An open rule database.
pub struct Source {
    pool: AnyPool,
    /// The same database through its own driver, for reading the rows: sqlx's Any rows cost a
    /// third of a PostgreSQL read in conversions (BENCHMARKS.md, "Table read").
    typed: Typed,
    url: Redacted,
    dialect: Dialect,
    table: TableName,
    columns: ColumnMap,
}

/// A pool of the database's own driver, for reading the table.
enum Typed {
    /// SQLite is read as JSON or through Any (its values' storage classes are what Any keeps).
    None,
    Postgres(sqlx::PgPool),
    MySql(sqlx::MySqlPool),
}

/// Accepts a plain file path for SQLite, as well as a URL.
pub fn normalize_url(url: &str) -> String {
    if url.contains("://") || url.starts_with("sqlite:") {
        url.to_owned()
    } else {
        format!("sqlite://{url}")
    }
}

impl Source {
    /// Opens the database, for the table `tcp_mgm`. `create` makes a missing SQLite file;
    /// otherwise a missing file is an error (so a typo does not silently give an empty rule
    /// set).
    pub async fn open(url: &str, create: bool) -> Result<Source, SourceError> {
        Self::open_table(url, create, &TableName::default()).await
    }

    /// Opens the database, for the rule table `table`.
    pub async fn open_table(
        url: &str,
        create: bool,
        table: &TableName,
    ) -> Result<Source, SourceError> {
        sqlx::any::install_default_drivers();
        let mut url = normalize_url(url);
        let redacted = Redacted::new(&url);
        let dialect = Dialect::of(&url).ok_or_else(|| SourceError::Unsupported {
            url: redacted.clone(),
            reason: "expected sqlite://PATH, postgres://... or mysql://... (MariaDB)".into(),
        })?;
        if let Some(rest) = url.strip_prefix("mariadb:") {
            url = format!("mysql:{rest}");
        }
        if dialect == Dialect::Sqlite && !url.contains("mode=") {
            url.push_str(if url.contains('?') { "&" } else { "?" });
            url.push_str(if create { "mode=rwc" } else { "mode=rw" });
        }
        let connect_err = |source| SourceError::Connect {
            url: redacted.clone(),
            source,
        };
        // PostgreSQL's and MariaDB's rows and version are read on their own driver's one
        // connection, made here so that an unreachable database is said at once; the Any pool
        // (table creation, scripts, an empty table's columns) connects only when used. A read
        // thus takes one connection of the database's.
        let any = AnyPoolOptions::new().max_connections(2);
        let (pool, typed) = match dialect {
            Dialect::Sqlite => (any.connect(&url).await.map_err(connect_err)?, Typed::None),
            Dialect::Postgres => (
                any.connect_lazy(&url).map_err(connect_err)?,
                Typed::Postgres(
                    sqlx::postgres::PgPoolOptions::new()
                        .max_connections(1)
                        .connect(&url)
                        .await
                        .map_err(connect_err)?,
                ),
            ),
            Dialect::MySql => (
                any.connect_lazy(&url).map_err(connect_err)?,
                Typed::MySql(
                    sqlx::mysql::MySqlPoolOptions::new()
                        .max_connections(1)
                        .connect(&url)
                        .await
                        .map_err(connect_err)?,
                ),
            ),
        };
        Ok(Source {
            pool,
            typed,
            url: redacted,
            dialect,
            table: table.clone(),
            columns: ColumnMap::default(),
        })
    }

    /// Reads the columns that `columns` renames from their names in the table.
    pub fn with_columns(mut self, columns: &ColumnMap) -> Source {
        self.columns = columns.clone();
        self
    }

    fn query_err(&self, what: &'static str) -> impl FnOnce(sqlx::Error) -> SourceError + '_ {
        move |source| SourceError::Query {
            url: self.url.clone(),
            what,
            table: self.table.clone(),
            source,
        }
    }

    /// Reads every row of the table, in id order, as raw cells.
    pub async fn read(&self) -> Result<Table, SourceError> {
        let mut rows = Vec::new();
        let info = self
            .read_each(|row| {
                rows.push(row);
                Ok::<_, SourceError>(())
            })
            .await?;
        Ok(Table {
            rows,
            version: info.version,
            has_parallel_read: info.has_parallel_read,
        })
    }

    /// Hands every row of the table to `each`, in id order, as raw cells, as the database sends
    /// them: only what `each` keeps of a row stays in memory. An error of `each` ends the read.
    pub async fn read_each<E: From<SourceError>>(
        &self,
        each: impl FnMut(Row) -> Result<(), E>,
    ) -> Result<TableInfo, E> {
        let select = self.select(None).await?;
        self.read_selected(&select, each).await
    }

    /// Hands the rows `select` gives to `each` (see `read_each`).
    async fn read_selected<E: From<SourceError>>(
        &self,
        select: &str,
        mut each: impl FnMut(Row) -> Result<(), E>,
    ) -> Result<TableInfo, E> {
        let positions = self.fetch(select, &mut each).await?;
        let positions = match positions {
            Some(positions) => positions,
            None => self.has_every_column(self.column_names().await?)?,
        };
        Ok(self.info(&positions).await)
    }

    /// Runs `select` on the database's own driver (or the Any pool) and hands its rows to
    /// `each`; the positions of the columns read, None when no row came back.
    async fn fetch<E: From<SourceError>>(
        &self,
        select: &str,
        each: &mut impl FnMut(Row) -> Result<(), E>,
    ) -> Result<Option<Vec<Option<usize>>>, E> {
        match &self.typed {
            Typed::Postgres(pool) => {
                self.hand_rows(sqlx::query(select).fetch(pool), pg_cell, each)
                    .await
            }
            Typed::MySql(pool) => {
                self.hand_rows(sqlx::query(select).fetch(pool), mysql_cell, each)
                    .await
            }
            Typed::None => {
                let cell = |row: &AnyRow, i| read_cell(row, i, self.dialect);
                self.hand_rows(sqlx::query(select).fetch(&self.pool), cell, each)
                    .await
            }
        }
    }

    /// Hands each row of `rows` to `each`, its cells read by `cell`: where each column went
    /// (None when there was no row).
    async fn hand_rows<R: sqlx::Row, E: From<SourceError>>(
        &self,
        mut rows: impl futures_util::Stream<Item = Result<R, sqlx::Error>> + Unpin,
        cell: impl Fn(&R, usize) -> Cell,
        each: &mut impl FnMut(Row) -> Result<(), E>,
    ) -> Result<Option<Vec<Option<usize>>>, E> {
        let mut positions: Option<Vec<Option<usize>>> = None;
        while let Some(row) = rows
            .try_next()
            .await
            .map_err(self.query_err("reading table"))?
        {
            let positions = match &positions {
                Some(positions) => positions,
                None => {
                    let found = row
                        .columns()
                        .iter()
                        .map(|c| c.name().to_ascii_lowercase())
                        .collect();
                    positions.insert(self.has_every_column(found)?)
                }
            };
            let mut out = Row::default();
            for (i, position) in positions.iter().enumerate() {
                if let Some(position) = position {
                    out.set(*position, cell(&row, i));
                }
            }
            each(out)?;
        }
        Ok(positions)
    }

    /// The fast read, where the database has one (`Dialect::json_chunk`): the table in chunks
    /// of `JSON_CHUNK` rows as JSON, parsed straight into rows, all in one transaction, so one
    /// snapshot as the row by row read's one statement. Rows are handed to `each` in id order.
    /// Ok(None) when it cannot give exactly what `read_each` would (a REAL value or one past 64
    /// bits, a BLOB, an id that is not an integer or not unique, a row count that differs, or any
    /// error of its queries): the caller then starts again with `read_each`, which reads every
    /// value as it is and reports every error; rows already handed to `each` are then to be
    /// forgotten. An error of `each` ends the read.
    pub async fn read_fast<E: From<SourceError>>(
        &self,
        mut each: impl FnMut(Row) -> Result<(), E>,
    ) -> Result<Option<TableInfo>, E> {
        // Before any query: on PostgreSQL and MariaDB a query here would open a second
        // connection for nothing.
        if !self.dialect.has_fast_read() {
            return Ok(None);
        }
        let names = match self.column_names().await {
            Ok(names) => names,
            Err(e) => return Ok(declined(&e)),
        };
        let positions = match self.has_every_column(names.clone()) {
            Ok(positions) => positions,
            Err(e) => return Ok(declined(&e)),
        };
        // The columns read, and where each goes in a row.
        let read: Vec<(&str, usize)> = names
            .iter()
            .zip(&positions)
            .filter_map(|(name, position)| Some((name.as_str(), (*position)?)))
            .collect();
        let Some(id_at) = read
            .iter()
            .position(|(_, p)| Some(*p) == Row::position("id"))
        else {
            return Ok(declined(&"no id column"));
        };
        let list: Vec<&str> = read.iter().map(|(name, _)| *name).collect();
        let Some(sql) =
            self.dialect
                .json_chunk(&self.table, self.columns.actual("id"), &list, JSON_CHUNK)
        else {
            return Ok(None);
        };
        let mut tx = match self.pool.begin().await {
            Ok(tx) => tx,
            Err(e) => return Ok(declined(&e)),
        };
        let total =
            match sqlx::query_scalar::<_, i64>(&format!("SELECT count(*) FROM {}", self.table))
                .fetch_one(&mut *tx)
                .await
            {
                Ok(total) => total,
                Err(e) => return Ok(declined(&e)),
            };
        let mut previous: Option<i64> = None;
        let mut handed = 0i64;
        let mut chunk = match sqlx::query(&sql).bind(i64::MIN).fetch_one(&mut *tx).await {
            Ok(chunk) => chunk,
            Err(e) => return Ok(declined(&e)),
        };
        loop {
            let (count, last, json) = match (
                chunk.try_get::<i64, _>(0),
                read_cell(&chunk, 1, self.dialect),
                read_cell(&chunk, 2, self.dialect),
            ) {
                (Ok(0), ..) => break,
                (Ok(count), Cell::Int(last), Cell::Text(json)) => (count, last, json),
                (Err(e), ..) => return Ok(declined(&e)),
                (_, last, json) => {
                    return Ok(declined(&format_args!(
                        "a chunk's last id is {last}, its rows {json}"
                    )));
                }
            };
            // The database makes the next chunk while this one is parsed (biased: the query
            // is sent first).
            let (next, handed_all) = tokio::join!(
                biased;
                async {
                    match last.checked_add(1) {
                        Some(from) => Some(sqlx::query(&sql).bind(from).fetch_one(&mut *tx).await),
                        None => None,
                    }
                },
                async { hand_chunk(&json, count, &read, id_at, &mut previous, &mut each) },
            );
            if !handed_all? {
                return Ok(None);
            }
            handed += count;
            chunk = match next {
                Some(Ok(chunk)) => chunk,
                Some(Err(e)) => return Ok(declined(&e)),
                None => break,
            };
        }
        if handed != total {
            return Ok(declined(&format_args!(
                "{handed} rows read of {total} (a NULL id, say)"
            )));
        }
        Ok(Some(self.info(&positions).await))
    }

    /// The table's version row and whether it has a parallel_read column.
    async fn info(&self, positions: &[Option<usize>]) -> TableInfo {
        TableInfo {
            version: self.table_version().await,
            has_parallel_read: positions.contains(&Row::position("parallel_read")),
        }
    }

    /// The table's version row, read on the connection the rows were read on.
    async fn table_version(&self) -> Option<i64> {
        let sql = format!(
            "SELECT table_version FROM version WHERE table_name = '{}'",
            self.table
        );
        let cell = match &self.typed {
            Typed::Postgres(pool) => {
                pg_cell(&sqlx::query(&sql).fetch_optional(pool).await.ok()??, 0)
            }
            Typed::MySql(pool) => {
                mysql_cell(&sqlx::query(&sql).fetch_optional(pool).await.ok()??, 0)
            }
            Typed::None => {
                let row = sqlx::query(&sql).fetch_optional(&self.pool).await.ok()??;
                read_cell(&row, 0, self.dialect)
            }
        };
        match cell {
            Cell::Int(version) => Some(version),
            _ => None,
        }
    }

    /// Where each of the table's columns goes in a `Row` (None: not read, or a column a row
    /// does not keep), when the table has every column of OpenSIPS's table.
    fn has_every_column(&self, names: Vec<String>) -> Result<Vec<Option<usize>>, SourceError> {
        let positions: Vec<Option<usize>> = names
            .iter()
            .map(|n| self.columns.read_as(n).and_then(|c| Row::position(&c)))
            .collect();
        for column in COLUMNS.iter().chain(&["id"]) {
            let position = Row::position(column);
            if !positions.contains(&position) {
                return Err(SourceError::MissingColumn {
                    url: self.url.clone(),
                    table: self.table.clone(),
                    column: self.columns.describe(column),
                });
            }
        }
        Ok(positions)
    }

    /// The query for the rows. SQLite's columns are selected as expressions (`+name`): sqlx's
    /// Any driver refuses a whole result for a column declared with a type it does not map
    /// (BOOLEAN, DATE, DATETIME...), and an expression has no declared type, so each value comes
    /// back as what it is, and a value of the wrong kind is a fault of its row.
    /// `only`: a condition on the rows, else every row.
    async fn select(&self, only: Option<&str>) -> Result<String, SourceError> {
        let t = &self.table;
        let id = self.columns.actual("id");
        let only = only.map_or_else(String::new, |c| format!(" WHERE {c}"));
        if self.dialect != Dialect::Sqlite {
            return Ok(format!("SELECT * FROM {t}{only} ORDER BY {id}"));
        }
        let columns: Vec<String> = self
            .column_names()
            .await?
            .iter()
            .map(|name| {
                let name = name.replace('"', "\"\"");
                format!("+\"{name}\" AS \"{name}\"")
            })
            .collect();
        Ok(format!(
            "SELECT {} FROM {t}{only} ORDER BY {id}",
            columns.join(", ")
        ))
    }

    /// Column names of an empty table.
    async fn column_names(&self) -> Result<Vec<String>, SourceError> {
        let rows: Vec<AnyRow> = sqlx::query(&self.dialect.columns_query(&self.table))
            .fetch_all(&self.pool)
            .await
            .map_err(self.query_err("reading the columns of table"))?;
        let names: Vec<String> = rows
            .iter()
            .filter_map(|r| r.try_get::<String, _>(0).ok())
            .collect();
        if names.is_empty() {
            return Err(SourceError::NoTable {
                url: self.url.clone(),
                table: self.table.clone(),
            });
        }
        Ok(names.into_iter().map(|n| n.to_ascii_lowercase()).collect())
    }

    /// Creates the table and OpenSIPS's `version` row for it, unless the table exists.
    /// Returns false when it already existed.
    /// With PostgreSQL, also installs the trigger that notifies `tcpmgm run` of committed changes;
    /// with SQLite, the change log that lets a reload read only the rows that changed (on an
    /// existing table too, such as one made by OpenSIPS's own scripts).
    pub async fn init(&self, version: TableVersion) -> Result<bool, SourceError> {
        let created = self.create_tables(version).await?;
        match self.dialect {
            Dialect::Postgres => self.install_notify_trigger().await?,
            Dialect::Sqlite => self.install_change_log().await?,
            Dialect::MySql => {}
        }
        Ok(created)
    }

    /// Installs SQLite's change log of the table (`schema::sqlite_change_log`), in one
    /// transaction; what is there already stays.
    pub async fn install_change_log(&self) -> Result<(), SourceError> {
        let what = "installing the change log of table";
        let mut tx = self.pool.begin().await.map_err(self.query_err(what))?;
        for sql in schema::sqlite_change_log(&self.table, self.columns.actual("id")) {
            sqlx::query(&sql)
                .execute(&mut *tx)
                .await
                .map_err(self.query_err(what))?;
        }
        tx.commit().await.map_err(self.query_err(what))
    }

    /// Where the table's change log is: its last sequence number (0 when empty), or None when
    /// the database keeps no whole change log of the table (its log tables and its three
    /// triggers; SQLite only). Read before the table, a position says that every change after
    /// it is in the log from it on, which is what `changes_since` needs.
    pub async fn change_mark(&self) -> Result<Option<Mark>, SourceError> {
        if self.dialect != Dialect::Sqlite {
            return Ok(None);
        }
        let what = "looking for the change log of table";
        let names: Vec<String> = schema::change_log_triggers(&self.table)
            .iter()
            .map(|n| format!("'{n}'"))
            .collect();
        let found: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM sqlite_master WHERE (type = 'trigger' AND name IN ({})) \
             OR (type = 'table' AND name IN ('{CHANGE_LOG}', '{CHANGE_LOG}_origin'))",
            names.join(", ")
        ))
        .fetch_one(&self.pool)
        .await
        .map_err(self.query_err(what))?;
        if found != 5 {
            return Ok(None);
        }
        let (origin, last): (Option<i64>, Option<i64>) = sqlx::query_as(&format!(
            "SELECT (SELECT min(origin) FROM {CHANGE_LOG}_origin), max(seq) FROM {CHANGE_LOG}"
        ))
        .fetch_one(&self.pool)
        .await
        .map_err(self.query_err(what))?;
        let Some(origin) = origin else {
            return Ok(None);
        };
        Ok(Some(Mark {
            origin,
            file: self.file_id(),
            seq: last.unwrap_or(0),
        }))
    }

    /// The SQLite file's device and inode, folded: a file moved or restored in its place is
    /// another one.
    fn file_id(&self) -> u64 {
        use std::os::unix::fs::MetadataExt as _;
        let url = self.url.0.as_str();
        let path = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .unwrap_or(url);
        let path = path.split('?').next().unwrap_or(path);
        std::fs::metadata(path).map_or(0, |m| m.dev().rotate_left(32) ^ m.ino())
    }

    /// The rows of the table that changed after position `mark` of its change log (see
    /// `change_mark`), by id, at most `limit` of them: what a reload needs to read.
    pub async fn changes_since(&self, mark: Mark, limit: usize) -> Result<Changes, SourceError> {
        let Some(now) = self.change_mark().await? else {
            return Ok(Changes::Unknown("the table has no change log".into()));
        };
        if (now.origin, now.file) != (mark.origin, mark.file) {
            return Ok(Changes::Unknown(
                "the database is another one than at the last read".into(),
            ));
        }
        let (mark, last) = (mark.seq, now.seq);
        let what = "reading the change log of table";
        let (first, _): (Option<i64>, Option<i64>) =
            sqlx::query_as(&format!("SELECT min(seq), max(seq) FROM {CHANGE_LOG}"))
                .fetch_one(&self.pool)
                .await
                .map_err(self.query_err(what))?;
        if last < mark {
            return Ok(Changes::Unknown(format!(
                "the change log went back from {mark} to {last}"
            )));
        }
        if last > mark && first.is_none_or(|first| first > mark + 1) {
            return Ok(Changes::Unknown(format!(
                "the change log no longer holds the changes after {mark}"
            )));
        }
        let ids: Vec<Option<i64>> = sqlx::query_scalar(&format!(
            "SELECT DISTINCT row_id FROM {CHANGE_LOG} \
             WHERE table_name = '{}' AND seq > {mark} AND seq <= {last} LIMIT {}",
            self.table,
            limit + 1
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(self.query_err(what))?;
        if ids.len() > limit {
            return Ok(Changes::Unknown(format!("more than {limit} rows changed")));
        }
        match ids.into_iter().collect::<Option<Vec<i64>>>() {
            Some(ids) => Ok(Changes::Rows { mark: now, ids }),
            None => Ok(Changes::Unknown("a change without a row id".into())),
        }
    }

    /// Hands the rows whose ids are `ids` to `each` (see `read_each`).
    pub async fn read_ids<E: From<SourceError>>(
        &self,
        ids: &[i64],
        each: impl FnMut(Row) -> Result<(), E>,
    ) -> Result<(), E> {
        if ids.is_empty() {
            return Ok(());
        }
        let list: Vec<String> = ids.iter().map(i64::to_string).collect();
        let only = format!("{} IN ({})", self.columns.actual("id"), list.join(", "));
        let select = self.select(Some(&only)).await?;
        // On the rows' own connection only: no column listing when no row came back (the rows
        // were removed), no version row.
        let mut each = each;
        self.fetch(&select, &mut each).await?;
        Ok(())
    }

    /// How many rows the table has, asked on the connection the rows are read on (PostgreSQL's
    /// and MariaDB's own driver): a reload takes one connection of the database's, not two (50
    /// daemons reading at once took twice the server's connections, and waited 30 s for one).
    pub async fn row_count(&self) -> Result<i64, SourceError> {
        let sql = format!("SELECT count(*) FROM {}", self.table);
        let what = self.query_err("counting the rows of table");
        match &self.typed {
            Typed::Postgres(pool) => sqlx::query_scalar(&sql).fetch_one(pool).await,
            Typed::MySql(pool) => sqlx::query_scalar(&sql).fetch_one(pool).await,
            Typed::None => sqlx::query_scalar(&sql).fetch_one(&self.pool).await,
        }
        .map_err(what)
    }

    /// Installs PostgreSQL's change triggers on the table, in one transaction (the table's
    /// owner, or a role with the TRIGGER privilege on it, may): the one that names the table
    /// (`schema::postgres_notify`) and those that name the rows (`schema::postgres_rows`).
    pub async fn install_notify_trigger(&self) -> Result<(), SourceError> {
        let what = "installing the change trigger on table";
        let mut tx = self.pool.begin().await.map_err(self.query_err(what))?;
        let id = self.columns.actual("id");
        for sql in schema::postgres_notify(&self.table)
            .into_iter()
            .chain(schema::postgres_rows(&self.table, id))
        {
            sqlx::query(&sql)
                .execute(&mut *tx)
                .await
                .map_err(self.query_err(what))?;
        }
        tx.commit().await.map_err(self.query_err(what))
    }

    /// Whether PostgreSQL's row triggers (`schema::postgres_rows`) are all on the table.
    pub async fn has_row_triggers(&self) -> Result<bool, SourceError> {
        let names: Vec<String> = schema::row_triggers()
            .iter()
            .map(|n| format!("'{n}'"))
            .collect();
        let found: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM pg_trigger WHERE tgname IN ({}) AND tgrelid = '{}'::regclass",
            names.join(", "),
            self.table
        ))
        .fetch_one(&self.pool)
        .await
        .map_err(self.query_err("looking for the row triggers on table"))?;
        Ok(found == 4)
    }

    /// Whether PostgreSQL's change trigger is on the table.
    pub async fn has_notify_trigger(&self) -> Result<bool, SourceError> {
        let found: Option<i32> = sqlx::query_scalar(&format!(
            "SELECT 1 FROM pg_trigger WHERE tgname = 'tcpmgm_notify' \
             AND tgrelid = '{}'::regclass",
            self.table
        ))
        .fetch_optional(&self.pool)
        .await
        .map_err(self.query_err("looking for the change trigger on table"))?;
        Ok(found.is_some())
    }

    async fn create_tables(&self, version: TableVersion) -> Result<bool, SourceError> {
        let columns: Vec<AnyRow> = sqlx::query(&self.dialect.columns_query(&self.table))
            .fetch_all(&self.pool)
            .await
            .map_err(self.query_err("looking for table"))?;
        if !columns.is_empty() {
            return Ok(false);
        }
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(self.query_err("starting a transaction for table"))?;
        // MySQL commits DDL implicitly; the transaction still keeps the version row with it.
        for sql in [
            self.dialect.create_version_table().to_owned(),
            self.dialect.create_table(version, &self.table),
            self.dialect.record_version(version, &self.table),
        ] {
            sqlx::query(&sql)
                .execute(&mut *tx)
                .await
                .map_err(self.query_err("creating table"))?;
        }
        tx.commit()
            .await
            .map_err(self.query_err("committing the changes to table"))?;
        Ok(true)
    }

    /// Runs SQL statements (separated by `;`) in one transaction.
    pub async fn execute_script(&self, sql: &str) -> Result<(), SourceError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(self.query_err("starting a transaction for table"))?;
        for stmt in sql.split(';').map(strip_comments).filter(|s| !s.is_empty()) {
            sqlx::query(&stmt)
                .execute(&mut *tx)
                .await
                .map_err(self.query_err("running SQL on table"))?;
        }
        tx.commit()
            .await
            .map_err(self.query_err("committing the changes to table"))
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    pub fn url(&self) -> &Redacted {
        &self.url
    }
}

fn strip_comments(stmt: &str) -> String {
    let lines: Vec<&str> = stmt
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect();
    lines.join("\n").trim().to_owned()
}

/// Hands the `count` rows of one chunk of the fast read (`json`) to `each`, checking that ids
/// rise (`previous` is the last one handed); Ok(false) when the fast read must give way.
fn hand_chunk<E>(
    json: &str,
    count: i64,
    read: &[(&str, usize)],
    id_at: usize,
    previous: &mut Option<i64>,
    each: &mut impl FnMut(Row) -> Result<(), E>,
) -> Result<bool, E> {
    let rows = match serde_json::from_str::<Vec<Vec<JsonCell>>>(json) {
        Ok(rows) => rows,
        Err(e) => return Ok(gave_way(&e)),
    };
    if i64::try_from(rows.len()) != Ok(count) {
        let why = format!("a chunk of {count} rows has {} in its JSON", rows.len());
        return Ok(gave_way(&why));
    }
    for cells in rows {
        let id = match cells.get(id_at) {
            Some(JsonCell::Exact(Cell::Int(id)))
                if cells.len() == read.len() && previous.is_none_or(|p| p < *id) =>
            {
                *id
            }
            _ => {
                let why = format!("the row after id {previous:?}");
                return Ok(gave_way(&why));
            }
        };
        *previous = Some(id);
        let mut row = Row::default();
        for (cell, (_, position)) in cells.into_iter().zip(read) {
            match cell {
                JsonCell::Exact(cell) => row.set(*position, cell),
                JsonCell::Inexact => {
                    let why = format!("id {id} has a value JSON does not carry exactly");
                    return Ok(gave_way(&why));
                }
            }
        }
        each(row)?;
    }
    Ok(true)
}

/// `declined` for a step that answers whether the read goes on: false.
fn gave_way(why: &dyn fmt::Display) -> bool {
    let _: Option<()> = declined(why);
    false
}

/// Says at debug level why the fast read gave way to the row by row read; None, for it to return.
fn declined<T>(why: &dyn fmt::Display) -> Option<T> {
    tracing::debug!("the fast read declined ({why}); reading row by row");
    None
}

/// Table rows per query of the fast read: a few hundred kilobytes of JSON, so that the read's
/// memory does not grow with the table (the rules do, within the memory budget).
const JSON_CHUNK: usize = 4096;

/// A JSON value of the fast read: a cell exactly as `read_cell` would give it, or one it
/// would give otherwise (a number with a fraction or beyond 64 bits: SQLite's JSON rounds
/// REAL values to 15 digits, where the row by row read keeps all of them).
enum JsonCell {
    Exact(Cell),
    Inexact,
}

impl<'de> serde::Deserialize<'de> for JsonCell {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Scalar;
        impl serde::de::Visitor<'_> for Scalar {
            type Value = JsonCell;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON scalar")
            }
            fn visit_unit<E>(self) -> Result<JsonCell, E> {
                Ok(JsonCell::Exact(Cell::Null))
            }
            fn visit_bool<E>(self, b: bool) -> Result<JsonCell, E> {
                Ok(JsonCell::Exact(Cell::Int(b.into())))
            }
            fn visit_i64<E>(self, i: i64) -> Result<JsonCell, E> {
                Ok(JsonCell::Exact(Cell::Int(i)))
            }
            fn visit_u64<E>(self, u: u64) -> Result<JsonCell, E> {
                Ok(i64::try_from(u).map_or(JsonCell::Inexact, |i| JsonCell::Exact(Cell::Int(i))))
            }
            fn visit_f64<E>(self, _: f64) -> Result<JsonCell, E> {
                Ok(JsonCell::Inexact)
            }
            fn visit_str<E>(self, s: &str) -> Result<JsonCell, E> {
                Ok(JsonCell::Exact(Cell::Text(s.to_owned())))
            }
            fn visit_string<E>(self, s: String) -> Result<JsonCell, E> {
                Ok(JsonCell::Exact(Cell::Text(s)))
            }
        }
        d.deserialize_any(Scalar)
    }
}

/// The cell's value whatever its storage type: databases do not always hold what the schema says.
/// The value's own kind picks the decoding, so a cell is decoded once. MySQL's protocol sends
/// TEXT columns (and long results such as the fast read's JSON) as BLOBs with a character set,
/// which sqlx's Any driver does not keep: there, bytes that are UTF-8 are text, as the mysql
/// client shows them.
fn read_cell(row: &AnyRow, i: usize, dialect: Dialect) -> Cell {
    use sqlx::ValueRef as _;
    use sqlx::any::AnyTypeInfoKind as Kind;
    let kind = match row.try_get_raw(i) {
        Ok(value) if value.is_null() => return Cell::Null,
        Ok(value) => value.type_info().kind(),
        Err(e) => return Cell::Unreadable(e.to_string()),
    };
    let cell = match kind {
        Kind::Null => Ok(Cell::Null),
        Kind::Bool => row.try_get::<bool, _>(i).map(|b| Cell::Int(b.into())),
        Kind::SmallInt | Kind::Integer | Kind::BigInt => row.try_get::<i64, _>(i).map(Cell::Int),
        Kind::Real => row.try_get::<f32, _>(i).map(|r| Cell::Real(r.into())),
        Kind::Double => row.try_get::<f64, _>(i).map(Cell::Real),
        Kind::Text => row.try_get::<String, _>(i).map(Cell::Text),
        Kind::Blob => row.try_get::<Vec<u8>, _>(i).map(|b| match dialect {
            Dialect::MySql => {
                String::from_utf8(b).map_or_else(|e| Cell::Blob(e.into_bytes()), Cell::Text)
            }
            Dialect::Sqlite | Dialect::Postgres => Cell::Blob(b),
        }),
    };
    cell.unwrap_or_else(|e| Cell::Unreadable(e.to_string()))
}

/// A cell of a row of a database's own driver: NULL, or what `by_type` reads for the value's
/// type name; a type it has no reading for (None) makes the cell unreadable, the type named.
fn typed_cell<R: sqlx::Row>(
    row: &R,
    i: usize,
    by_type: impl FnOnce(&str) -> Option<Result<Cell, sqlx::Error>>,
) -> Cell
where
    usize: sqlx::ColumnIndex<R>,
{
    use sqlx::{TypeInfo as _, ValueRef as _};
    let value = match row.try_get_raw(i) {
        Ok(value) if value.is_null() => return Cell::Null,
        Ok(value) => value,
        Err(e) => return Cell::Unreadable(e.to_string()),
    };
    let type_info = value.type_info();
    match by_type(type_info.name()) {
        Some(Ok(cell)) => cell,
        Some(Err(e)) => Cell::Unreadable(e.to_string()),
        None => Cell::Unreadable(format!("a value of type {}", type_info.name())),
    }
}

/// A PostgreSQL cell by its type: integers, booleans (0 and 1), floats, text and bytes.
fn pg_cell(row: &sqlx::postgres::PgRow, i: usize) -> Cell {
    typed_cell(row, i, |name| {
        Some(match name {
            "INT2" => row.try_get::<i16, _>(i).map(|v| Cell::Int(v.into())),
            "INT4" => row.try_get::<i32, _>(i).map(|v| Cell::Int(v.into())),
            "INT8" => row.try_get::<i64, _>(i).map(Cell::Int),
            "BOOL" => row.try_get::<bool, _>(i).map(|v| Cell::Int(v.into())),
            "FLOAT4" => row.try_get::<f32, _>(i).map(|v| Cell::Real(v.into())),
            "FLOAT8" => row.try_get::<f64, _>(i).map(Cell::Real),
            "TEXT" | "VARCHAR" | "BPCHAR" | "NAME" | "CHAR" => {
                row.try_get::<String, _>(i).map(Cell::Text)
            }
            "BYTEA" => row.try_get::<Vec<u8>, _>(i).map(Cell::Blob),
            _ => return None,
        })
    })
}

/// A MariaDB or MySQL cell by its type: integers (unsigned ones past 63 bits as their digits),
/// floats, text (TEXT columns included) and bytes (UTF-8 ones as text, as the mysql client
/// shows them).
fn mysql_cell(row: &sqlx::mysql::MySqlRow, i: usize) -> Cell {
    typed_cell(row, i, |name| {
        Some(match name {
            "BOOLEAN" | "TINYINT" | "SMALLINT" | "MEDIUMINT" | "INT" | "BIGINT" | "YEAR" => {
                row.try_get::<i64, _>(i).map(Cell::Int)
            }
            "TINYINT UNSIGNED" | "SMALLINT UNSIGNED" | "MEDIUMINT UNSIGNED" | "INT UNSIGNED"
            | "BIGINT UNSIGNED" => row
                .try_get::<u64, _>(i)
                .map(|v| i64::try_from(v).map_or_else(|_| Cell::Text(v.to_string()), Cell::Int)),
            "FLOAT" => row.try_get::<f32, _>(i).map(|v| Cell::Real(v.into())),
            "DOUBLE" => row.try_get::<f64, _>(i).map(Cell::Real),
            "CHAR" | "VARCHAR" | "TINYTEXT" | "TEXT" | "MEDIUMTEXT" | "LONGTEXT" | "ENUM"
            | "SET" => row.try_get::<String, _>(i).map(Cell::Text),
            "BINARY" | "VARBINARY" | "TINYBLOB" | "BLOB" | "MEDIUMBLOB" | "LONGBLOB" => {
                row.try_get::<Vec<u8>, _>(i).map(|b| {
                    String::from_utf8(b).map_or_else(|e| Cell::Blob(e.into_bytes()), Cell::Text)
                })
            }
            _ => return None,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        assert_eq!(
            Redacted::new("postgres://opensips:s3cret@db:5432/opensips").to_string(),
            "postgres://opensips:***@db:5432/opensips"
        );
        assert_eq!(Redacted::new("sqlite://x.db").to_string(), "sqlite://x.db");
    }

    /// The change log names each changed, added or removed row once, and says when it cannot
    /// tell: more rows than asked, another log, entries pruned, a trigger gone.
    #[tokio::test]
    async fn the_change_log_names_the_changed_rows_and_says_when_it_cannot() {
        let dir = std::env::temp_dir().join(format!("tcpmgm-changelog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("sqlite://{}", dir.join("rules.db").display());
        let source = Source::open(&url, true).await.unwrap();
        source.init(TableVersion::V2).await.unwrap();
        let start = source.change_mark().await.unwrap().expect("a change log");
        source
            .execute_script(
                "INSERT INTO tcp_mgm (id, remote_addr) VALUES (1, '10.0.0.1'), (2, '10.0.0.2');
                 UPDATE tcp_mgm SET keepidle = 5 WHERE id = 2;
                 DELETE FROM tcp_mgm WHERE id = 1",
            )
            .await
            .unwrap();
        let Changes::Rows { mark, mut ids } = source.changes_since(start, 10).await.unwrap() else {
            panic!("the log should say");
        };
        ids.sort_unstable();
        assert_eq!(ids, [1, 2]);
        assert_eq!(mark.seq, start.seq + 5);
        assert_eq!(
            source.changes_since(mark, 10).await.unwrap(),
            Changes::Rows {
                mark,
                ids: Vec::new()
            }
        );
        let unknown = |c: Changes| match c {
            Changes::Unknown(why) => why,
            rows => panic!("{rows:?}"),
        };
        assert_eq!(
            unknown(source.changes_since(start, 1).await.unwrap()),
            "more than 1 rows changed"
        );
        let other = Mark {
            origin: mark.origin ^ 1,
            ..mark
        };
        assert_eq!(
            unknown(source.changes_since(other, 10).await.unwrap()),
            "the database is another one than at the last read"
        );
        source
            .execute_script(&format!(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {}) \
                 INSERT INTO tcp_mgm (remote_addr) SELECT '10.1.0.1' FROM n",
                CHANGE_LOG_KEEP + 1
            ))
            .await
            .unwrap();
        assert_eq!(
            unknown(source.changes_since(mark, 100_000).await.unwrap()),
            format!(
                "the change log no longer holds the changes after {}",
                mark.seq
            )
        );
        source
            .execute_script("DROP TRIGGER tcpmgm_log_tcp_mgm_update")
            .await
            .unwrap();
        assert_eq!(source.change_mark().await.unwrap(), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A table whose columns are declared with types sqlx's Any driver does not map is read by
    /// its values: good rows are rules, a value of the wrong kind is a fault of its row.
    #[tokio::test]
    async fn sqlite_columns_are_read_by_value_whatever_their_declared_type() {
        use crate::policy::listener::Listeners;
        use crate::policy::rule::validate_rows;
        let dir = std::env::temp_dir().join(format!("tcpmgm-decltype-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("sqlite://{}", dir.join("rules.db").display());
        let source = Source::open(&url, true).await.unwrap();
        let mut table =
            schema::Dialect::Sqlite.create_table(TableVersion::V2, &TableName::default());
        for (column, declared) in [
            ("keepalive", "BOOLEAN"),
            ("keepidle", "DATE"),
            ("con_lifetime", "DATETIME"),
            ("remote_port", "TIMESTAMP"),
        ] {
            let at = table.find(&format!("    {column} ")).unwrap() + column.len() + 5;
            let end = at + table[at..].find(" DEFAULT").unwrap();
            table.replace_range(at..end, declared);
        }
        source
            .execute_script(&format!(
                "{table};
                 INSERT INTO tcp_mgm (id, keepalive, keepidle, con_lifetime, remote_port)
                     VALUES (1, 1, 60, 300, 5060);
                 INSERT INTO tcp_mgm (id, keepalive, keepidle, con_lifetime, remote_port)
                     VALUES (2, 'true', '2024-01-01', X'0102', 5060);
                 INSERT INTO tcp_mgm (id, keepidle) VALUES (3, 9223372036854775808);"
            ))
            .await
            .unwrap();
        let read = source.read().await.unwrap();
        let (rules, errors) = validate_rows(&read.rows, &Listeners::default());
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(rules.len(), 1, "{errors:?}");
        assert_eq!(
            (rules[0].id, rules[0].profile.keepidle, rules[0].remote_port),
            (1, 60, 5060)
        );
        let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            errors,
            [
                "id 2: con_lifetime: x'0102' (2 bytes) is not an integer",
                "id 2: keepalive: 'true' is not an integer",
                "id 2: keepidle: '2024-01-01' is not an integer",
                "id 3: keepidle: 9223372036854775808 is out of range (0 to 32767)",
            ]
        );
    }

    #[test]
    fn only_plain_table_names_are_taken() {
        for good in ["tcp_mgm", "TCP_rules2", "_x"] {
            assert_eq!(TableName::new(good).unwrap().as_str(), good);
        }
        for bad in [
            "",
            "2rules",
            "tcp-mgm",
            "x; DROP TABLE version",
            "a.b",
            "\"t\"",
        ] {
            assert!(TableName::new(bad).is_err(), "{bad:?} was taken");
        }
        assert!(TableName::new(&"t".repeat(64)).is_err());
    }
}
