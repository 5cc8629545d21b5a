//! The OpenSIPS `tcp_mgm` table as OpenSIPS's own scripts create it.

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

/// Columns every version has, besides `id`.
pub const COLUMNS: [&str; 17] = [
    "proto",
    "remote_addr",
    "remote_port",
    "local_addr",
    "local_port",
    "priority",
    "attrs",
    "connect_timeout",
    "con_lifetime",
    "msg_read_timeout",
    "send_threshold",
    "no_new_conn",
    "alias_mode",
    "keepalive",
    "keepcount",
    "keepidle",
    "keepinterval",
];

/// SQLite DDL, as in OpenSIPS's `scripts/sqlite/tcp_mgm-create.sql`.
pub fn sqlite_create(version: TableVersion) -> String {
    let parallel_read = match version {
        TableVersion::V1 => "    parallel_read INTEGER DEFAULT 0 NOT NULL,\n",
        TableVersion::V2 => "",
    };
    format!(
        "CREATE TABLE tcp_mgm (
    id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    proto CHAR(8) DEFAULT 'any' NOT NULL,
    remote_addr CHAR(43) DEFAULT NULL,
    remote_port INTEGER DEFAULT 0 NOT NULL,
    local_addr CHAR(43) DEFAULT NULL,
    local_port INTEGER DEFAULT 0 NOT NULL,
    priority INTEGER DEFAULT 0 NOT NULL,
    attrs CHAR(255) DEFAULT NULL,
    connect_timeout INTEGER DEFAULT 100 NOT NULL,
    con_lifetime INTEGER DEFAULT 120 NOT NULL,
    msg_read_timeout INTEGER DEFAULT 4 NOT NULL,
    send_threshold INTEGER DEFAULT 0 NOT NULL,
    no_new_conn INTEGER DEFAULT 0 NOT NULL,
    alias_mode INTEGER DEFAULT 0 NOT NULL,
{parallel_read}    keepalive INTEGER DEFAULT 1 NOT NULL,
    keepcount INTEGER DEFAULT 9 NOT NULL,
    keepidle INTEGER DEFAULT 7200 NOT NULL,
    keepinterval INTEGER DEFAULT 75 NOT NULL
)"
    )
}

/// OpenSIPS's `version` table (standard-create.sql).
pub const SQLITE_VERSION_TABLE: &str = "CREATE TABLE IF NOT EXISTS version (
    table_name CHAR(32) NOT NULL,
    table_version INTEGER DEFAULT 0 NOT NULL,
    CONSTRAINT version_t_name_idx UNIQUE (table_name)
)";

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
