//! Values the table and OpenSIPS's own configuration share: the TCP-based protocols, addresses
//! (IPv4-mapped ones folded onto IPv4), and how a value is quoted in an error.
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

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

/// How many characters of a value an error quotes.
pub(crate) const QUOTED_CHARS: usize = 100;

/// A value as every error about a row quotes it: in single quotes, control characters escaped,
/// and past `QUOTED_CHARS` characters cut, with an ellipsis and the value's length, so a
/// megabyte in a cell does not become a megabyte in the reply, the log and the state file.
pub fn quote(value: &str) -> String {
    let mut out = String::from("'");
    for c in value.chars().take(QUOTED_CHARS) {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    let length = value.chars().count();
    if length > QUOTED_CHARS {
        out.insert(out.len() - 1, '…');
        out.push_str(&format!(" ({length} characters)"));
    }
    out
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
