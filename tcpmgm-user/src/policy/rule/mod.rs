//! Rules: a row of the OpenSIPS `tcp_mgm` table, validated into typed match keys and a profile.
mod attrs;
mod row;
mod validate;

use std::fmt;

use ipnet::IpNet;

pub use crate::policy::values::{Proto, fold_v4_mapped, fold_v4_mapped_net, quote};
pub use attrs::parse_attrs;
pub use row::{COLUMNS, Cell, ROW_COLUMNS, Row};
pub use validate::{RowError, RowId, validate_row, validate_rows};

/// The profile a rule carries, in the table's units, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Profile {
    pub connect_timeout_ms: u32,
    pub con_lifetime_s: u32,
    pub msg_read_timeout_s: u32,
    pub send_threshold_us: u32,
    pub no_new_conn: bool,
    pub alias_mode: u8,
    /// Absent in table version 2.
    pub parallel_read: Option<u8>,
    pub keepalive: bool,
    pub keepcount: u32,
    pub keepidle: u32,
    pub keepinterval: u32,
    pub attrs: Vec<(String, i64)>,
}

impl Default for Profile {
    /// The table's column defaults.
    fn default() -> Self {
        use crate::policy::column::*;
        // Each default is in its column's range, and the ranges fit these types.
        let int = |c: Column| c.default_int() as u32;
        Profile {
            connect_timeout_ms: int(CONNECT_TIMEOUT),
            con_lifetime_s: int(CON_LIFETIME),
            msg_read_timeout_s: int(MSG_READ_TIMEOUT),
            send_threshold_us: int(SEND_THRESHOLD),
            no_new_conn: int(NO_NEW_CONN) == 1,
            alias_mode: int(ALIAS_MODE) as u8,
            parallel_read: Some(int(PARALLEL_READ) as u8),
            keepalive: int(KEEPALIVE) == 1,
            keepcount: int(KEEPCOUNT),
            keepidle: int(KEEPIDLE),
            keepinterval: int(KEEPINTERVAL),
            attrs: Vec::new(),
        }
    }
}

/// The local side a rule asks for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LocalMatch {
    pub net: IpNet,
    /// The listener tag the table named, when local_addr was a tag.
    pub tag: Option<String>,
}

impl fmt::Display for LocalMatch {
    /// In the table's words: the prefix, or the tag with the prefix it stands for.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.tag {
            Some(tag) => write!(f, "{tag} ({})", self.net),
            None => write!(f, "{}", self.net),
        }
    }
}

/// A validated rule. `None` in a match key means any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub id: u32,
    pub priority: i32,
    pub proto: Option<Proto>,
    /// IPv4-mapped IPv6 prefixes are stored as their IPv4 prefix.
    pub remote: Option<IpNet>,
    pub remote_port: u16,
    pub local: Option<LocalMatch>,
    pub local_port: u16,
    pub profile: Profile,
}

impl Rule {
    pub fn local_net(&self) -> Option<IpNet> {
        self.local.as_ref().map(|l| l.net)
    }

    /// A hash of the rule's id and match keys (everything but its profile): two rules with
    /// the same hash take the same place in the match order and match the same connections.
    pub fn match_hash(&self) -> u64 {
        use std::hash::BuildHasher as _;
        foldhash::fast::FixedState::with_seed(0x7463_706d_676d).hash_one((
            self.id,
            self.priority,
            self.proto,
            self.remote,
            self.remote_port,
            &self.local,
            self.local_port,
        ))
    }

    /// The match keys, in the table's words, for explanations.
    pub fn describe(&self) -> String {
        let any = |s: Option<String>| s.unwrap_or_else(|| "any".into());
        let port = |p: u16| if p == 0 { "any".into() } else { p.to_string() };
        let local = self.local.as_ref().map(LocalMatch::to_string);
        format!(
            "priority {}, proto {}, remote {} port {}, local {} port {}",
            self.priority,
            any(self.proto.map(|p| p.to_string())),
            any(self.remote.map(|n| n.to_string())),
            port(self.remote_port),
            any(local),
            port(self.local_port),
        )
    }
}
