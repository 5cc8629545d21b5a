//! OpenSIPS's `tcp_mgm` table, one entry a column: its name, SQL type, default, the values
//! tcpmgm accepts and what tcpmgm does with it. `db init` creates the table from it, validation
//! takes each column's default and range from it, the compiler and the sweeper ask it whether a
//! value is enforced, and `match` says from it which columns are only recorded.

/// A column's SQL type, as OpenSIPS's creation scripts give it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sql {
    /// The auto-numbered primary key.
    Id,
    /// Characters, at most this many.
    Text(u16),
    /// A signed integer.
    Int,
    /// An unsigned integer (signed where the dialect has no unsigned type).
    Uint,
}

/// A column's default: what a row that does not set it holds, and what tcpmgm reads when the
/// table lacks the column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// The database numbers the rows; a row without one is a fault.
    Numbered,
    Null,
    Int(i64),
    Text(&'static str),
}

/// What tcpmgm does with a column's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Use {
    /// Part of the match: which connections the rule governs, or which rule wins.
    Match,
    /// Set or enforced by the kernel programs.
    Kernel,
    /// Enforced, but where a row keeps OpenSIPS's schema default only when the daemon is asked
    /// to (`Enforcement`): every OpenSIPS row carries the default unless set.
    UnlessDefault,
    /// Counted per rule (slow sends), not enforced.
    Counted,
    /// SIP-level: recorded per socket for the application, not enforced.
    Recorded,
}

/// Which versions of the table have a column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Versions {
    All,
    /// Version 1 only (OpenSIPS 3.3 to 3.6); master dropped it.
    First,
}

/// One column of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Column {
    pub name: &'static str,
    pub sql: Sql,
    pub default: Fallback,
    /// The values accepted, for an integer column.
    pub range: (i64, i64),
    pub used: Use,
    pub versions: Versions,
}

/// Signed 32-bit: the largest value OpenSIPS itself stores in its profile's fields.
const U31: i64 = 0x7fff_ffff;

const fn int(name: &'static str, sql: Sql, default: i64, range: (i64, i64), used: Use) -> Column {
    Column {
        name,
        sql,
        default: Fallback::Int(default),
        range,
        used,
        versions: Versions::All,
    }
}

const fn text(name: &'static str, length: u16, default: Fallback, used: Use) -> Column {
    Column {
        name,
        sql: Sql::Text(length),
        default,
        range: (0, 0),
        used,
        versions: Versions::All,
    }
}

pub const ID: Column = Column {
    name: "id",
    sql: Sql::Id,
    default: Fallback::Numbered,
    range: (1, u32::MAX as i64),
    used: Use::Match,
    versions: Versions::All,
};
pub const PROTO: Column = text("proto", 8, Fallback::Text("any"), Use::Match);
pub const REMOTE_ADDR: Column = text("remote_addr", 43, Fallback::Null, Use::Match);
pub const REMOTE_PORT: Column = int("remote_port", Sql::Uint, 0, (0, 65535), Use::Match);
pub const LOCAL_ADDR: Column = text("local_addr", 43, Fallback::Null, Use::Match);
pub const LOCAL_PORT: Column = int("local_port", Sql::Uint, 0, (0, 65535), Use::Match);
pub const PRIORITY: Column = int(
    "priority",
    Sql::Int,
    0,
    (i32::MIN as i64, i32::MAX as i64),
    Use::Match,
);
pub const ATTRS: Column = text("attrs", 255, Fallback::Null, Use::Recorded);
/// In milliseconds.
pub const CONNECT_TIMEOUT: Column = int(
    "connect_timeout",
    Sql::Uint,
    100,
    (0, U31),
    Use::UnlessDefault,
);
/// In seconds.
pub const CON_LIFETIME: Column = int("con_lifetime", Sql::Uint, 120, (0, U31), Use::UnlessDefault);
pub const MSG_READ_TIMEOUT: Column = int("msg_read_timeout", Sql::Uint, 4, (0, U31), Use::Recorded);
/// In microseconds.
pub const SEND_THRESHOLD: Column = int("send_threshold", Sql::Uint, 0, (0, U31), Use::Counted);
pub const NO_NEW_CONN: Column = int("no_new_conn", Sql::Uint, 0, (0, 1), Use::Kernel);
pub const ALIAS_MODE: Column = int("alias_mode", Sql::Uint, 0, (0, 2), Use::Recorded);
pub const PARALLEL_READ: Column = Column {
    versions: Versions::First,
    ..int("parallel_read", Sql::Uint, 0, (0, 2), Use::Recorded)
};
pub const KEEPALIVE: Column = int("keepalive", Sql::Uint, 1, (0, 1), Use::Kernel);
// Linux's own limits for TCP_KEEPCNT, TCP_KEEPIDLE and TCP_KEEPINTVL; 0 keeps the system's
// value.
pub const KEEPCOUNT: Column = int("keepcount", Sql::Uint, 9, (0, 127), Use::Kernel);
pub const KEEPIDLE: Column = int("keepidle", Sql::Uint, 7200, (0, 32767), Use::Kernel);
pub const KEEPINTERVAL: Column = int("keepinterval", Sql::Uint, 75, (0, 32767), Use::Kernel);

/// Every column, in the order OpenSIPS's scripts create them.
pub const TABLE: [Column; 19] = [
    ID,
    PROTO,
    REMOTE_ADDR,
    REMOTE_PORT,
    LOCAL_ADDR,
    LOCAL_PORT,
    PRIORITY,
    ATTRS,
    CONNECT_TIMEOUT,
    CON_LIFETIME,
    MSG_READ_TIMEOUT,
    SEND_THRESHOLD,
    NO_NEW_CONN,
    ALIAS_MODE,
    PARALLEL_READ,
    KEEPALIVE,
    KEEPCOUNT,
    KEEPIDLE,
    KEEPINTERVAL,
];

/// The names of the columns every version of the table has, besides `id`.
pub const EVERY_VERSION: [&str; 17] = {
    let mut names = [""; 17];
    let (mut i, mut n) = (0, 0);
    while i < TABLE.len() {
        let c = TABLE[i];
        if !matches!(c.sql, Sql::Id) && matches!(c.versions, Versions::All) {
            names[n] = c.name;
            n += 1;
        }
        i += 1;
    }
    assert!(n == names.len(), "EVERY_VERSION's length is the table's");
    names
};

impl Column {
    /// The integer default; 0 for a column without one.
    pub const fn default_int(&self) -> i64 {
        match self.default {
            Fallback::Int(v) => v,
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_integer_default_is_in_its_range() {
        for c in TABLE {
            if let Fallback::Int(v) = c.default {
                assert!(
                    (c.range.0..=c.range.1).contains(&v),
                    "{}: {v} outside {:?}",
                    c.name,
                    c.range
                );
            }
        }
        assert_eq!(EVERY_VERSION.len() + 2, TABLE.len());
    }
}
