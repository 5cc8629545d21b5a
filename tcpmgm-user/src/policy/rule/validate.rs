//! Where a row becomes a rule: every column is checked, and every fault is reported with the
//! row's id, the column and the reason, so an operator can fix the whole table in one pass.
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

use super::{Cell, LocalMatch, Profile, Proto, Row, Rule, fold_v4_mapped_net, parse_attrs, quote};
use crate::policy::column::{self, Column, Fallback};
use crate::policy::listener::Listeners;

/// One fault in one row.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct RowError {
    pub id: RowId,
    pub column: &'static str,
    pub reason: String,
}

/// The row a fault is in: its id, or the id's value as the table holds it when that is no
/// integer.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RowId {
    Int(i64),
    Value(String),
}

impl fmt::Display for RowId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RowId::Int(i) => write!(f, "{i}"),
            RowId::Value(v) => f.write_str(v),
        }
    }
}

impl fmt::Display for RowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "id {}: {}: {}", self.id, self.column, self.reason)
    }
}

/// Validates every row. Returns the good rules and one error per fault (a row may have several).
pub fn validate_rows(rows: &[Row], listeners: &Listeners) -> (Vec<Rule>, Vec<RowError>) {
    let mut rules = Vec::with_capacity(rows.len());
    let mut errors = Vec::new();
    for row in rows {
        match validate_row(row, listeners) {
            Ok(rule) => rules.push(rule),
            Err(mut e) => errors.append(&mut e),
        }
    }
    (rules, errors)
}

/// Collects the faults of one row while its columns are read.
struct Checker<'a> {
    row: &'a Row,
    id: RowId,
    errors: Vec<RowError>,
}

/// What an integer column's cell holds.
enum Integer {
    Fits(i64),
    /// An integer beyond 64 bits (as text, or as the float SQLite keeps it as); true: negative.
    TooLarge(bool),
    Not,
}

fn integer(cell: &Cell) -> Integer {
    const TWO_63: f64 = 9_223_372_036_854_775_808.0;
    match cell {
        Cell::Int(i) => Integer::Fits(*i),
        Cell::Real(r) if r.fract() == 0.0 && (-TWO_63..TWO_63).contains(r) => {
            Integer::Fits(*r as i64)
        }
        Cell::Real(r) if r.fract() == 0.0 => Integer::TooLarge(*r < 0.0),
        Cell::Text(s) => match s.trim().parse::<i64>() {
            Ok(i) => Integer::Fits(i),
            Err(e) => match e.kind() {
                std::num::IntErrorKind::PosOverflow => Integer::TooLarge(false),
                std::num::IntErrorKind::NegOverflow => Integer::TooLarge(true),
                _ => Integer::Not,
            },
        },
        _ => Integer::Not,
    }
}

impl Checker<'_> {
    fn fail(&mut self, column: &'static str, reason: String) {
        self.errors.push(RowError {
            id: self.id.clone(),
            column,
            reason,
        });
    }

    /// An integer column within `min..=max`; a missing column takes `default`.
    /// An integer column, in its range; a column the table lacks takes its default.
    fn int(&mut self, of: &Column) -> Option<i64> {
        let (column, (min, max)) = (of.name, of.range);
        let cell = match self.row.get(column) {
            // A column the table lacks takes OpenSIPS's default; one without a default (id)
            // is a fault.
            None if of.default != Fallback::Numbered => return Some(of.default_int()),
            None => {
                self.fail(column, "is missing".into());
                return None;
            }
            Some(Cell::Null) => {
                self.fail(column, "must not be NULL".into());
                return None;
            }
            Some(cell) => cell,
        };
        let negative = match integer(cell) {
            Integer::Fits(value) if (min..=max).contains(&value) => return Some(value),
            Integer::Fits(value) => value < 0,
            Integer::TooLarge(negative) => negative,
            Integer::Not => {
                self.fail(column, format!("{cell} is not an integer"));
                return None;
            }
        };
        let what = match (min, max) {
            (0, 65535) => "is not a port (0 to 65535, 0 = any)".to_owned(),
            (0, i64::MAX) | (0, 0x7fff_ffff) if negative => "must not be negative".to_owned(),
            _ => format!("is out of range ({min} to {max})"),
        };
        self.fail(column, format!("{cell} {what}"));
        None
    }

    /// A text column that may be NULL.
    fn text(&mut self, column: &'static str) -> Option<Option<String>> {
        match self.row.get(column) {
            None | Some(Cell::Null) => Some(None),
            Some(Cell::Text(s)) => Some(Some(s.clone())),
            Some(other) => {
                self.fail(column, format!("{other} is not text"));
                None
            }
        }
    }
}

pub fn validate_row(row: &Row, listeners: &Listeners) -> Result<Rule, Vec<RowError>> {
    let cell = row.get("id").unwrap_or(&Cell::Null);
    let mut c = Checker {
        row,
        id: match integer(cell) {
            Integer::Fits(i) => RowId::Int(i),
            _ => RowId::Value(cell.to_string()),
        },
        errors: Vec::new(),
    };
    let id = c.int(&column::ID);

    let proto = match c.text("proto") {
        Some(None) if row.get("proto").is_some() => {
            c.fail("proto", "must not be NULL".into());
            None
        }
        Some(p) => match Proto::parse(p.as_deref().unwrap_or("any")) {
            Ok(p) => Some(p),
            Err(reason) => {
                c.fail("proto", reason);
                None
            }
        },
        None => None,
    };
    let remote = c
        .text("remote_addr")
        .and_then(|v| match parse_net(v.as_deref()) {
            Ok(net) => Some(net),
            Err(reason) => {
                c.fail("remote_addr", reason);
                None
            }
        });
    let local = c
        .text("local_addr")
        .and_then(|v| match parse_local(v.as_deref(), listeners) {
            Ok(local) => Some(local),
            Err(reason) => {
                c.fail("local_addr", reason);
                None
            }
        });
    if let (Some(Some(r)), Some(Some(l))) = (&remote, &local)
        && r.addr().is_ipv4() != l.net.addr().is_ipv4()
    {
        let fam = |n: &IpNet| if n.addr().is_ipv4() { "IPv4" } else { "IPv6" };
        c.fail(
            "local_addr",
            format!(
                "{} local {} cannot meet {} remote {r}",
                fam(&l.net),
                l.net,
                fam(r)
            ),
        );
    }

    let remote_port = c.int(&column::REMOTE_PORT);
    let local_port = c.int(&column::LOCAL_PORT);
    let priority = c.int(&column::PRIORITY);
    let connect_timeout = c.int(&column::CONNECT_TIMEOUT);
    let con_lifetime = c.int(&column::CON_LIFETIME);
    let msg_read_timeout = c.int(&column::MSG_READ_TIMEOUT);
    let send_threshold = c.int(&column::SEND_THRESHOLD);
    let no_new_conn = c.int(&column::NO_NEW_CONN);
    let alias_mode = c.int(&column::ALIAS_MODE);
    let parallel_read = match row.get(column::PARALLEL_READ.name) {
        None => Some(None),
        Some(_) => c.int(&column::PARALLEL_READ).map(Some),
    };
    let keepalive = c.int(&column::KEEPALIVE);
    let keepcount = c.int(&column::KEEPCOUNT);
    let keepidle = c.int(&column::KEEPIDLE);
    let keepinterval = c.int(&column::KEEPINTERVAL);
    let attrs = c
        .text("attrs")
        .and_then(|a| match parse_attrs(a.as_deref().unwrap_or("")) {
            Ok(a) => Some(a),
            Err(reason) => {
                c.fail("attrs", reason);
                None
            }
        });

    if !c.errors.is_empty() {
        return Err(c.errors);
    }
    let (Some(id), Some(proto), Some(remote), Some(local)) = (id, proto, remote, local) else {
        unreachable!("a column that failed recorded an error");
    };
    let n = |v: Option<i64>| v.expect("checked above");
    Ok(Rule {
        id: id as u32,
        priority: n(priority) as i32,
        proto,
        remote,
        remote_port: n(remote_port) as u16,
        local,
        local_port: n(local_port) as u16,
        profile: Profile {
            connect_timeout_ms: n(connect_timeout) as u32,
            con_lifetime_s: n(con_lifetime) as u32,
            msg_read_timeout_s: n(msg_read_timeout) as u32,
            send_threshold_us: n(send_threshold) as u32,
            no_new_conn: n(no_new_conn) == 1,
            alias_mode: n(alias_mode) as u8,
            parallel_read: parallel_read.expect("checked above").map(|p| p as u8),
            keepalive: n(keepalive) == 1,
            keepcount: n(keepcount) as u32,
            keepidle: n(keepidle) as u32,
            keepinterval: n(keepinterval) as u32,
            attrs: attrs.expect("checked above"),
        },
    })
}

/// `NULL`, `any`, or `ip[/len]` (IPv6 optionally in brackets). Host bits are masked off with a
/// warning, as OpenSIPS does.
pub fn parse_net(value: Option<&str>) -> Result<Option<IpNet>, String> {
    let Some(raw) = value.map(str::trim) else {
        return Ok(None);
    };
    if raw.is_empty() || raw.eq_ignore_ascii_case("any") {
        return Ok(None);
    }
    let (addr, len) = match raw.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (raw, None),
    };
    let addr = addr
        .strip_prefix('[')
        .and_then(|a| a.strip_suffix(']'))
        .unwrap_or(addr);
    let ip = IpAddr::from_str(addr)
        .map_err(|_| format!("{} is not an IP address or CIDR", quote(raw)))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        Some(l) => l
            .parse::<u8>()
            .map_err(|_| format!("{}: prefix length {} is not a number", quote(raw), quote(l)))?,
    };
    let net = IpNet::new(ip, len)
        .map_err(|_| format!("{}: prefix length /{len} is longer than /{max}", quote(raw)))?;
    let masked = net.trunc();
    if masked != net {
        tracing::warn!("{raw}: host bits set, using {masked}");
    }
    Ok(Some(fold_v4_mapped_net(masked)))
}

/// local_addr: an address or prefix as for remote_addr, or the tag (or `proto:addr:port` name)
/// of a declared listener, which stands for that listener's address.
fn parse_local(value: Option<&str>, listeners: &Listeners) -> Result<Option<LocalMatch>, String> {
    match parse_net(value) {
        Ok(net) => Ok(net.map(|net| LocalMatch { net, tag: None })),
        Err(not_an_ip) => {
            let name = value.unwrap_or_default().trim();
            let looks_like_ip = name.contains('/') || name.parse::<IpAddr>().is_ok();
            if looks_like_ip {
                return Err(not_an_ip);
            }
            let listener = listeners.by_name(name).ok_or_else(|| {
                if listeners.is_empty() {
                    format!(
                        "unknown listener tag {} (no listeners are declared)",
                        quote(name)
                    )
                } else {
                    format!(
                        "unknown listener tag {} (declared: {})",
                        quote(name),
                        listeners.names()
                    )
                }
            })?;
            if listener.addr.is_unspecified() {
                return Err(format!(
                    "listener {} listens on a wildcard address, which names no local address",
                    quote(name)
                ));
            }
            Ok(Some(LocalMatch {
                net: IpNet::from(listener.addr),
                tag: Some(name.to_owned()),
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64) -> Row {
        Row::default().with("id", Cell::Int(id))
    }

    fn errors(row: Row, listeners: &Listeners) -> Vec<String> {
        let (_, errs) = validate_rows(&[row], listeners);
        errs.iter().map(ToString::to_string).collect()
    }

    /// Found by the `row` fuzz target (the empty input): a row without an id became rule 0.
    #[test]
    fn a_row_without_an_id_is_a_fault() {
        let (rules, errs) = validate_rows(&[Row::default()], &Listeners::default());
        assert!(rules.is_empty(), "{rules:?}");
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].to_string().contains("id: is missing"),
            "{}",
            errs[0]
        );
    }

    #[test]
    fn defaults_make_an_any_rule() {
        let (rules, errs) = validate_rows(&[row(1)], &Listeners::default());
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(rules[0].proto, None);
        assert_eq!(rules[0].remote, None);
        assert_eq!(
            rules[0].profile,
            Profile {
                parallel_read: None,
                ..Profile::default()
            }
        );
    }

    #[test]
    fn each_bad_column_is_named() {
        let l = Listeners::parse_all(["tls:10.0.0.1:5061 tag trunks"]).unwrap();
        let cases: &[(&str, Cell, &str)] = &[
            (
                "remote_addr",
                Cell::Text("10.0.0.300/24".into()),
                "id 1: remote_addr: '10.0.0.300/24' is not an IP",
            ),
            (
                "remote_addr",
                Cell::Text("10.0.0.0/33".into()),
                "id 1: remote_addr: '10.0.0.0/33': prefix length /33 is longer than /32",
            ),
            (
                "remote_port",
                Cell::Int(70000),
                "id 1: remote_port: 70000 is not a port",
            ),
            (
                "connect_timeout",
                Cell::Int(-5),
                "id 1: connect_timeout: -5 must not be negative",
            ),
            (
                "proto",
                Cell::Text("udp".into()),
                "id 1: proto: 'udp' is not a TCP-based protocol",
            ),
            (
                "proto",
                Cell::Text("quic".into()),
                "id 1: proto: unknown protocol 'quic'",
            ),
            (
                "keepalive",
                Cell::Int(2),
                "id 1: keepalive: 2 is out of range (0 to 1)",
            ),
            (
                "local_addr",
                Cell::Text("nosuch".into()),
                "id 1: local_addr: unknown listener tag 'nosuch' (declared: trunks",
            ),
            (
                "attrs",
                Cell::Text("max_msg_chunks".into()),
                "id 1: attrs: 'max_msg_chunks' is not key=integer",
            ),
            (
                "keepidle",
                Cell::Text("soon".into()),
                "id 1: keepidle: 'soon' is not an integer",
            ),
            ("proto", Cell::Null, "id 1: proto: must not be NULL"),
        ];
        for (column, cell, want) in cases {
            let got = errors(row(1).with(column, cell.clone()), &l);
            assert!(
                got.len() == 1 && got[0].starts_with(want),
                "{column}={cell}: {got:?}"
            );
        }
    }

    #[test]
    fn values_beyond_64_bits_are_out_of_range_and_named_in_full() {
        let cases: &[(&str, Cell, &str)] = &[
            (
                "keepidle",
                Cell::Real(2f64.powi(63)),
                "id 1: keepidle: 9223372036854775808 is out of range (0 to 32767)",
            ),
            (
                "remote_port",
                Cell::Text("9223372036854775808".into()),
                "id 1: remote_port: '9223372036854775808' is not a port (0 to 65535, 0 = any)",
            ),
            (
                "con_lifetime",
                Cell::Text("-99999999999999999999".into()),
                "id 1: con_lifetime: '-99999999999999999999' must not be negative",
            ),
            (
                "keepcount",
                Cell::Real(1.5),
                "id 1: keepcount: 1.5 is not an integer",
            ),
        ];
        for (column, cell, want) in cases {
            assert_eq!(
                errors(row(1).with(column, cell.clone()), &Listeners::default()),
                [*want]
            );
        }
        // A whole number kept as a float is that number.
        let (rules, errs) = validate_rows(
            &[row(1).with("keepidle", Cell::Real(60.0))],
            &Listeners::default(),
        );
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(rules[0].profile.keepidle, 60);
    }

    #[test]
    fn a_bad_id_names_the_row_by_its_value() {
        let none = Listeners::default();
        for (id, want) in [
            (
                Cell::Int(0),
                "id 0: id: 0 is out of range (1 to 4294967295)",
            ),
            (
                Cell::Int(1 << 32),
                "id 4294967296: id: 4294967296 is out of range (1 to 4294967295)",
            ),
            (
                Cell::Text("9223372036854775808".into()),
                "id '9223372036854775808': id: '9223372036854775808' is out of range (1 to 4294967295)",
            ),
            (
                Cell::Text("x7".into()),
                "id 'x7': id: 'x7' is not an integer",
            ),
        ] {
            let bad = Row::default()
                .with("id", id)
                .with("remote_port", Cell::Int(70000));
            let got = errors(bad, &none);
            assert_eq!(got[0], want);
            assert!(
                got[1].starts_with(&want[..want.find(": id:").unwrap()]),
                "the row's other faults name it the same way: {got:?}"
            );
        }
    }

    #[test]
    fn a_huge_value_is_quoted_short_everywhere() {
        let huge = "9".repeat(1 << 20);
        let l = Listeners::parse_all(["tls:10.0.0.1:5061 tag trunks"]).unwrap();
        for column in ["remote_addr", "local_addr", "proto", "attrs", "keepidle"] {
            let got = errors(row(1).with(column, Cell::Text(huge.clone())), &l);
            assert_eq!(got.len(), 1, "{column}: {got:?}");
            assert!(
                got[0].len() < 400 && got[0].contains("…' (1048576 characters)"),
                "{column}: {}",
                &got[0][..got[0].len().min(400)]
            );
        }
    }

    #[test]
    fn family_mismatch_and_tags() {
        let l =
            Listeners::parse_all(["tls:10.0.0.1:5061 tag trunks", "tcp:*:5060 tag all"]).unwrap();
        let bad = row(4)
            .with("remote_addr", Cell::Text("192.0.2.0/24".into()))
            .with("local_addr", Cell::Text("[2001:db8::1]".into()));
        assert!(
            errors(bad, &l)[0].starts_with(
                "id 4: local_addr: IPv6 local 2001:db8::1/128 cannot meet IPv4 remote"
            )
        );
        let wild = row(5).with("local_addr", Cell::Text("all".into()));
        assert!(errors(wild, &l)[0].contains("wildcard"));
        let (rules, _) = validate_rows(
            &[row(6).with("local_addr", Cell::Text("trunks".into()))],
            &l,
        );
        assert_eq!(rules[0].local_net(), Some("10.0.0.1/32".parse().unwrap()));
    }

    #[test]
    fn several_faults_in_one_row_are_all_reported() {
        let bad = row(9)
            .with("remote_port", Cell::Int(-1))
            .with("alias_mode", Cell::Int(3));
        assert_eq!(errors(bad, &Listeners::default()).len(), 2);
    }

    #[test]
    fn nets_are_masked_and_v4_mapped_folded() {
        assert_eq!(
            parse_net(Some("10.1.2.3/8")).unwrap(),
            Some("10.0.0.0/8".parse().unwrap())
        );
        assert_eq!(
            parse_net(Some("[2001:db8::1]")).unwrap(),
            Some("2001:db8::1/128".parse().unwrap())
        );
        assert_eq!(
            parse_net(Some("::ffff:192.0.2.0/120")).unwrap(),
            Some("192.0.2.0/24".parse().unwrap())
        );
        assert_eq!(parse_net(Some("ANY")).unwrap(), None);
        assert_eq!(parse_net(None).unwrap(), None);
    }
}
