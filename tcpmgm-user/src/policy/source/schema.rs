//! The OpenSIPS `tcp_mgm` table as OpenSIPS's own scripts create it.
use super::TableName;
use crate::policy::column::{self, Fallback, Sql, Versions};

/// Table versions as listed in OpenSIPS's `version` table: 1 (3.3 to 3.6) has `parallel_read`,
/// 2 (master) dropped it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TableVersion {
    #[value(name = "1")]
    V1,
    #[value(name = "2")]
    V2,
}

impl TableVersion {
    pub fn number(self) -> i64 {
        match self {
            TableVersion::V1 => 1,
            TableVersion::V2 => 2,
        }
    }
}

/// The SQL dialect of a rule database.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
    MySql,
}

impl Dialect {
    /// From a (normalised) database URL.
    pub fn of(url: &str) -> Option<Dialect> {
        let scheme = url.split(':').next()?;
        match scheme {
            "sqlite" => Some(Dialect::Sqlite),
            "postgres" | "postgresql" => Some(Dialect::Postgres),
            "mysql" | "mariadb" => Some(Dialect::MySql),
            _ => None,
        }
    }

    /// The table as OpenSIPS's `scripts/<dialect>/tcp_mgm-create.sql` creates it.
    pub fn create_table(self, version: TableVersion, table: &TableName) -> String {
        let (id, text, int, uint, tail) = match self {
            Dialect::Sqlite => (
                "INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL",
                "CHAR",
                "INTEGER",
                "INTEGER",
                "",
            ),
            Dialect::Postgres => (
                "SERIAL PRIMARY KEY NOT NULL",
                "VARCHAR",
                "INTEGER",
                "INTEGER",
                "",
            ),
            Dialect::MySql => (
                "INT(10) UNSIGNED AUTO_INCREMENT PRIMARY KEY NOT NULL",
                "CHAR",
                "INT",
                "INT UNSIGNED",
                " ENGINE=InnoDB",
            ),
        };
        let columns: Vec<String> = column::TABLE
            .iter()
            .filter(|c| c.versions == Versions::All || version == TableVersion::V1)
            .map(|c| {
                let sql = match c.sql {
                    Sql::Id => return format!("    {} {id}", c.name),
                    Sql::Text(length) => format!("{text}({length})"),
                    Sql::Int => int.to_owned(),
                    Sql::Uint => uint.to_owned(),
                };
                let default = match c.default {
                    Fallback::Null => "NULL".to_owned(),
                    Fallback::Int(v) => format!("{v} NOT NULL"),
                    Fallback::Text(t) => format!("'{t}' NOT NULL"),
                    Fallback::Numbered => unreachable!("only the id is numbered"),
                };
                format!("    {} {sql} DEFAULT {default}", c.name)
            })
            .collect();
        format!("CREATE TABLE {table} (\n{}\n){tail}", columns.join(",\n"))
    }

    /// OpenSIPS's `version` table (standard-create.sql).
    pub fn create_version_table(self) -> &'static str {
        match self {
            Dialect::Sqlite => {
                "CREATE TABLE IF NOT EXISTS version (
    table_name CHAR(32) NOT NULL,
    table_version INTEGER DEFAULT 0 NOT NULL,
    CONSTRAINT version_t_name_idx UNIQUE (table_name)
)"
            }
            Dialect::Postgres => {
                "CREATE TABLE IF NOT EXISTS version (
    table_name VARCHAR(32) NOT NULL,
    table_version INTEGER DEFAULT 0 NOT NULL,
    CONSTRAINT version_t_name_idx UNIQUE (table_name)
)"
            }
            Dialect::MySql => {
                "CREATE TABLE IF NOT EXISTS version (
    table_name CHAR(32) NOT NULL,
    table_version INT UNSIGNED DEFAULT 0 NOT NULL,
    CONSTRAINT t_name_idx UNIQUE (table_name)
) ENGINE=InnoDB"
            }
        }
    }

    /// Lists the columns of the table (one text column), whether or not it has rows.
    pub fn columns_query(self, table: &TableName) -> String {
        match self {
            Dialect::Sqlite => format!("SELECT name FROM pragma_table_info('{table}')"),
            // Unquoted names are folded to lower case by PostgreSQL.
            Dialect::Postgres => format!(
                "SELECT CAST(column_name AS TEXT) FROM information_schema.columns \
                 WHERE table_schema = current_schema() AND table_name = lower('{table}')"
            ),
            Dialect::MySql => format!(
                "SELECT CAST(column_name AS CHAR) FROM information_schema.columns \
                 WHERE table_schema = DATABASE() AND table_name = '{table}'"
            ),
        }
    }

    /// Whether the database has a fast read (`json_chunk`): SQLite only, see there.
    pub fn has_fast_read(self) -> bool {
        self == Dialect::Sqlite
    }

    /// The fast read's query, where the database has one that beats reading rows: up to
    /// `chunk` rows of the table from id `?` on, in id order, as (their count, their greatest
    /// id, a JSON array of `[column...]` arrays). SQLite only: it builds the JSON in a fraction
    /// of the time the rows take through the driver (BENCHMARKS.md, "Table read"), where
    /// PostgreSQL and MariaDB build it more slowly than they send the rows. `columns` are the
    /// table's own names; `id` is the id column's.
    pub fn json_chunk(
        self,
        table: &TableName,
        id: &str,
        columns: &[&str],
        chunk: usize,
    ) -> Option<String> {
        let list: Vec<String> = columns.iter().map(|c| format!("\"{c}\"")).collect();
        let list = list.join(", ");
        self.has_fast_read().then(|| {
            format!(
                "SELECT count(*), max(\"{id}\"), json_group_array(json_array({list})) \
                 FROM (SELECT {list} FROM {table} WHERE \"{id}\" >= ? ORDER BY \"{id}\" LIMIT {chunk})"
            )
        })
    }

    /// Records the table version, replacing an earlier record.
    /// (OpenSIPS checks the version under the table's own name.)
    pub fn record_version(self, version: TableVersion, table: &TableName) -> String {
        let v = version.number();
        match self {
            Dialect::Sqlite => format!(
                "INSERT OR REPLACE INTO version (table_name, table_version) VALUES ('{table}', {v})"
            ),
            Dialect::Postgres => format!(
                "INSERT INTO version (table_name, table_version) VALUES ('{table}', {v}) \
                 ON CONFLICT (table_name) DO UPDATE SET table_version = {v}"
            ),
            Dialect::MySql => {
                format!("REPLACE INTO version (table_name, table_version) VALUES ('{table}', {v})")
            }
        }
    }
}

/// The channel `tcpmgm run` listens on with PostgreSQL.
pub const NOTIFY_CHANNEL: &str = "tcpmgm_rules";

/// A statement trigger that notifies `NOTIFY_CHANNEL` of every committed change to the table
/// (PostgreSQL delivers notifications at commit), with the table's name as the payload, so that
/// daemons following other tables of the database let it pass.
pub fn postgres_notify(table: &TableName) -> [String; 3] {
    [
        "CREATE OR REPLACE FUNCTION tcpmgm_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tcpmgm_rules', TG_TABLE_NAME);
    RETURN NULL;
END $$"
            .to_owned(),
        format!("DROP TRIGGER IF EXISTS tcpmgm_notify ON {table}"),
        format!(
            "CREATE TRIGGER tcpmgm_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {table} \
             FOR EACH STATEMENT EXECUTE FUNCTION tcpmgm_notify()"
        ),
    ]
}

/// The change log's table: which rows of which rule table changed, in commit order.
pub const CHANGE_LOG: &str = "tcpmgm_changes";

/// How many entries the change log keeps: a daemon that fell further behind (or a change of
/// more rows) reads the whole table.
pub const CHANGE_LOG_KEEP: i64 = 10_000;

/// The names of the change log's triggers on `table` (insert, update, delete).
pub fn change_log_triggers(table: &TableName) -> [String; 3] {
    ["insert", "update", "delete"].map(|event| format!("tcpmgm_log_{table}_{event}"))
}

/// SQLite's change log of `table`, whose id column is `id`: a table of (sequence, table, row
/// id) that triggers on the rule table fill, with a random number of its own (its origin), so that a reload reads only the rows that changed
/// since the last (see `Source::changes_since`). SQLite commits one writer at a time, so the
/// log's sequence is the order of the commits and a position in it says what was read. The log
/// keeps its last `CHANGE_LOG_KEEP` entries. Each statement is whole (the triggers' bodies hold
/// `;`): run them one by one.
pub fn sqlite_change_log(table: &TableName, id: &str) -> Vec<String> {
    let id = id.replace('"', "\"\"");
    let [insert, update, delete] = change_log_triggers(table);
    let log = |rows: &str| {
        format!("BEGIN INSERT INTO {CHANGE_LOG} (table_name, row_id) VALUES {rows}; END")
    };
    vec![
        format!(
            "CREATE TABLE IF NOT EXISTS {CHANGE_LOG} (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    table_name TEXT NOT NULL,
    row_id INTEGER
)"
        ),
        format!(
            "CREATE TRIGGER IF NOT EXISTS {CHANGE_LOG}_keep AFTER INSERT ON {CHANGE_LOG} \
             BEGIN DELETE FROM {CHANGE_LOG} WHERE seq <= NEW.seq - {CHANGE_LOG_KEEP}; END"
        ),
        // Which log this is: a database put in the place of another has a log of its own,
        // whose positions say nothing of the other's.
        format!("CREATE TABLE IF NOT EXISTS {CHANGE_LOG}_origin (origin INTEGER NOT NULL)"),
        format!(
            "INSERT INTO {CHANGE_LOG}_origin (origin) SELECT abs(random()) \
             WHERE NOT EXISTS (SELECT 1 FROM {CHANGE_LOG}_origin)"
        ),
        format!(
            "CREATE TRIGGER IF NOT EXISTS {insert} AFTER INSERT ON {table} {}",
            log(&format!("('{table}', NEW.\"{id}\")"))
        ),
        format!(
            "CREATE TRIGGER IF NOT EXISTS {update} AFTER UPDATE ON {table} {}",
            log(&format!(
                "('{table}', OLD.\"{id}\"), ('{table}', NEW.\"{id}\")"
            ))
        ),
        format!(
            "CREATE TRIGGER IF NOT EXISTS {delete} AFTER DELETE ON {table} {}",
            log(&format!("('{table}', OLD.\"{id}\")"))
        ),
    ]
}

/// The channel of the row triggers (`postgres_rows`): a payload is the table's name, a space,
/// then the ids of the rows a statement changed, added or removed (comma-separated), or `*`
/// when the statement touched more than `NOTIFIED_IDS` rows or emptied the table.
pub const ROWS_CHANNEL: &str = "tcpmgm_rows";

/// The most ids a notification names (a payload must stay under 8,000 bytes).
pub const NOTIFIED_IDS: usize = 500;

/// The names of PostgreSQL's row triggers on `table` (insert, update, delete, truncate).
pub fn row_triggers() -> [&'static str; 4] {
    [
        "tcpmgm_rows_insert",
        "tcpmgm_rows_update",
        "tcpmgm_rows_delete",
        "tcpmgm_rows_truncate",
    ]
}

/// Statement triggers that notify `ROWS_CHANNEL` of the rows each committed statement changed
/// on `table` (whose id column is `id`), from the statement's transition tables (PostgreSQL
/// 10), so that a daemon reads those rows only. They never fail a statement: where the ids
/// cannot be read (the id column renamed since), the notification says `*`. They sit beside
/// `postgres_notify`'s trigger, which daemons of earlier versions listen to.
pub fn postgres_rows(table: &TableName, id: &str) -> Vec<String> {
    let id = id.replace('"', "\"\"");
    let function = format!("tcpmgm_rows_{table}");
    let ids = |from: &str| {
        format!(
            "ARRAY(SELECT DISTINCT \"{id}\"::bigint FROM {from} LIMIT {})",
            NOTIFIED_IDS + 1
        )
    };
    let mut sql = vec![format!(
        "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    ids bigint[];
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        PERFORM pg_notify('{ROWS_CHANNEL}', TG_TABLE_NAME || ' *');
        RETURN NULL;
    END IF;
    BEGIN
        IF TG_OP = 'INSERT' THEN
            ids := {};
        ELSIF TG_OP = 'DELETE' THEN
            ids := {};
        ELSE
            ids := {};
        END IF;
    EXCEPTION WHEN OTHERS THEN
        -- The id column renamed, say: never fail the statement; notify '*' instead.
        ids := NULL;
    END;
    IF ids IS NULL OR cardinality(ids) > {NOTIFIED_IDS} OR array_position(ids, NULL) IS NOT NULL THEN
        PERFORM pg_notify('{ROWS_CHANNEL}', TG_TABLE_NAME || ' *');
    ELSE
        PERFORM pg_notify('{ROWS_CHANNEL}', TG_TABLE_NAME || ' ' || array_to_string(ids, ','));
    END IF;
    RETURN NULL;
END $$",
        ids("tcpmgm_new"),
        ids("tcpmgm_old"),
        ids("(SELECT * FROM tcpmgm_old UNION ALL SELECT * FROM tcpmgm_new) AS changed"),
    )];
    let [insert, update, delete, truncate] = row_triggers();
    for (name, event, referencing) in [
        (insert, "INSERT", "REFERENCING NEW TABLE AS tcpmgm_new "),
        (
            update,
            "UPDATE",
            "REFERENCING OLD TABLE AS tcpmgm_old NEW TABLE AS tcpmgm_new ",
        ),
        (delete, "DELETE", "REFERENCING OLD TABLE AS tcpmgm_old "),
        (truncate, "TRUNCATE", ""),
    ] {
        sql.push(format!("DROP TRIGGER IF EXISTS {name} ON {table}"));
        sql.push(format!(
            "CREATE TRIGGER {name} AFTER {event} ON {table} {referencing}\
             FOR EACH STATEMENT EXECUTE FUNCTION {function}()"
        ));
    }
    sql
}

/// Example rules for `tcpmgm db init --examples`, from OpenSIPS use cases. Columns not named
/// keep the table defaults.
pub const EXAMPLES: &str = "
-- A SIP trunk provider over TLS: its far end is slow to answer, so allow 2 s to connect.
INSERT INTO tcp_mgm (proto, remote_addr, remote_port, connect_timeout, keepidle, keepinterval, keepcount, priority)
    VALUES ('tls', '203.0.113.0/24', 5061, 2000, 60, 10, 6, 10);
-- NAT'ed subscribers: never dial out to them (they must register and reuse their connection),
-- and keep their NAT bindings warm with short keepalives.
INSERT INTO tcp_mgm (proto, remote_addr, no_new_conn, keepidle, keepinterval, keepcount, priority)
    VALUES ('any', '100.64.0.0/10', 1, 20, 5, 3, 20);
-- A replication peer (clusterer, proto bin): notice a dead peer within seconds.
INSERT INTO tcp_mgm (proto, remote_addr, remote_port, connect_timeout, keepidle, keepinterval, keepcount, priority)
    VALUES ('any', '192.0.2.10', 5566, 300, 5, 2, 3, 0);
-- Loopback, to see the policy act on a test machine: short keepalives, shown by `ss -tnoe`.
INSERT INTO tcp_mgm (remote_addr, keepidle, keepinterval, keepcount, priority)
    VALUES ('127.0.0.0/8', 30, 10, 4, 100);
";
