//! Rules: a row of the OpenSIPS `tcp_mgm` table, validated into typed match keys and a profile.
mod attrs;
mod row;
mod validate;

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

pub use attrs::parse_attrs;
pub use row::{COLUMNS, Cell, ROW_COLUMNS, Row, quote};
pub use validate::{RowError, RowId, validate_row, validate_rows};

/// A TCP-based OpenSIPS protocol, by its id in `tcpmgm_common::PROTOCOLS` (index + 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Proto(u8);

impl Proto {
    pub fn id(self) -> u8 {
        self.0
    }

    pub fn name(self) -> &'static str {
        tcpmgm_common::PROTOCOLS[usize::from(self.0) - 1]
    }

    /// Parses a protocol name, case-insensitively. `Ok(None)` is `any`.
    pub fn parse(s: &str) -> Result<Option<Proto>, String> {
        let lower = s.trim().to_ascii_lowercase();
        if lower == "any" {
            return Ok(None);
        }
        if let Some(i) = tcpmgm_common::PROTOCOLS.iter().position(|p| *p == lower) {
            return Ok(Some(Proto(i as u8 + 1)));
        }
        match lower.as_str() {
            "udp" | "sctp" | "hep_udp" => Err(format!("{} is not a TCP-based protocol", quote(s))),
            _ => Err(format!(
                "unknown protocol {} (expected any or one of {})",
                quote(s),
                tcpmgm_common::PROTOCOLS.join(", ")
            )),
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

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
        Profile {
            connect_timeout_ms: 100,
            con_lifetime_s: 120,
            msg_read_timeout_s: 4,
            send_threshold_us: 0,
            no_new_conn: false,
            alias_mode: 0,
            parallel_read: Some(0),
            keepalive: true,
            keepcount: 9,
            keepidle: 7200,
            keepinterval: 75,
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

/// Folds `::ffff:a.b.c.d` to `a.b.c.d`; every other address is returned as is.
pub fn fold_v4_mapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Folds an IPv4-mapped IPv6 prefix of at least /96 onto IPv4.
pub fn fold_v4_mapped_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96)
                .expect("a /96+ v6 prefix fits IPv4"),
            None => net,
        },
        _ => net,
    }
}
