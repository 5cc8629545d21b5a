//! Listeners, declared with OpenSIPS's own `socket=` syntax, and how a connection is attributed
//! to one. The attribution gives a connection its protocol and the local port that rules'
//! local_port is compared with; the kernel programs apply exactly the same steps (see
//! `tcpmgm-ebpf/src/decide.rs`), from the `LISTENERS` map that `compile` builds from this.
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::policy::values::{Proto, fold_v4_mapped};

/// A declared listener, e.g. `tls:10.0.0.1:5061 tag trunks`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    pub proto: Proto,
    /// Unspecified (`0.0.0.0` or `::`) for a wildcard listener.
    pub addr: IpAddr,
    pub port: u16,
    pub tag: Option<String>,
}

impl fmt::Display for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}",
            self.proto,
            SocketAddr::new(self.addr, self.port)
        )?;
        if let Some(tag) = &self.tag {
            write!(f, " tag {tag}")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("listener '{spec}': {reason}")]
pub struct ListenerError {
    pub spec: String,
    pub reason: String,
}

impl Listener {
    /// Parses `proto:addr[:port] [tag NAME] [other OpenSIPS socket options]`. The address is an
    /// IPv4 address, `[IPv6]`, or `*` for every address. Options tcpmgm has no use for (`as`,
    /// `use_workers`, `anycast`, `reuse_port`, `frag`) are accepted and ignored.
    pub fn parse(spec: &str) -> Result<Listener, ListenerError> {
        let fail = |reason: String| ListenerError {
            spec: spec.trim().to_owned(),
            reason,
        };
        let mut words = spec.split_whitespace();
        let socket = words.next().ok_or_else(|| fail("empty".into()))?;
        let (proto, rest) = socket
            .split_once(':')
            .ok_or_else(|| fail("expected proto:address[:port]".into()))?;
        let proto = Proto::parse(proto)
            .map_err(fail)?
            .ok_or_else(|| fail("a listener needs a protocol, not 'any'".into()))?;
        let (host, port) = split_host_port(rest).map_err(fail)?;
        let addr = match host {
            "*" => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            h => h
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .map(fold_v4_mapped)
                .map_err(|_| {
                    fail(format!(
                        "'{h}' is not an IP address (host names are not resolved)"
                    ))
                })?,
        };
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| fail(format!("'{p}' is not a port")))?,
            None => default_port(proto)
                .ok_or_else(|| fail(format!("{proto} has no default port: give one")))?,
        };
        let mut tag = None;
        while let Some(word) = words.next() {
            match word {
                "tag" => {
                    tag = Some(
                        words
                            .next()
                            .ok_or_else(|| fail("'tag' needs a name".into()))?
                            .to_owned(),
                    )
                }
                "as" | "use_workers" => {
                    words.next();
                }
                "anycast" | "reuse_port" | "frag" => {}
                other => return Err(fail(format!("unknown socket option '{other}'"))),
            }
        }
        Ok(Listener {
            proto,
            addr,
            port,
            tag,
        })
    }
}

/// OpenSIPS's default ports where it has one.
fn default_port(proto: Proto) -> Option<u16> {
    match proto.name() {
        "tcp" => Some(5060),
        "tls" => Some(5061),
        "ws" => Some(80),
        "wss" => Some(443),
        _ => None,
    }
}

fn split_host_port(s: &str) -> Result<(&str, Option<&str>), String> {
    if let Some(v6) = s.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or("unclosed '['")?;
        return match after.strip_prefix(':') {
            Some(port) => Ok((host, Some(port))),
            None if after.is_empty() => Ok((host, None)),
            None => Err(format!("unexpected '{after}' after the address")),
        };
    }
    Ok(match s.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (s, None),
    })
}

/// The declared listeners, in declaration order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listeners {
    list: Vec<Listener>,
}

/// Which way a connection was opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Accepted by a listening socket of the cgroup.
    Inbound,
    /// Opened by connect() from the cgroup.
    Outbound,
}

/// What the rules are matched against: OpenSIPS's lookup key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lookup {
    /// None: no listener, so only `any` rules can match.
    pub proto: Option<Proto>,
    pub remote: IpAddr,
    pub remote_port: u16,
    /// None: the socket had no local address yet (connect() of an unbound socket).
    pub local: Option<IpAddr>,
    pub local_port: u16,
    /// How proto and local_port were found, in words.
    pub why: String,
}

impl Listeners {
    pub fn parse_all<'a>(
        specs: impl IntoIterator<Item = &'a str>,
    ) -> Result<Listeners, ListenerError> {
        let mut out = Listeners::default();
        for spec in specs {
            out.push(Listener::parse(spec)?)?;
        }
        Ok(out)
    }

    pub fn push(&mut self, l: Listener) -> Result<(), ListenerError> {
        let clash = self
            .list
            .iter()
            .find(|o| o.addr == l.addr && o.port == l.port);
        if let Some(o) = clash {
            return Err(ListenerError {
                spec: l.to_string(),
                reason: format!("same address and port as '{o}'"),
            });
        }
        if let Some(tag) = &l.tag
            && self.by_name(tag).is_some()
        {
            return Err(ListenerError {
                spec: l.to_string(),
                reason: format!("tag '{tag}' is declared twice"),
            });
        }
        self.list.push(l);
        Ok(())
    }

    /// Adds the listener of an OpenSIPS `socket=` value, unless it is UDP or SCTP.
    pub fn add_socket(&mut self, value: &str) -> Result<(), ListenerError> {
        let value = value.trim();
        let proto = value.split(':').next().unwrap_or_default();
        if matches!(Proto::parse(proto), Err(ref e) if e.contains("not a TCP-based")) {
            return Ok(());
        }
        self.push(Listener::parse(value)?)
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Listener> {
        self.list.iter()
    }

    /// A listener by its tag, or by its `proto:addr:port` name.
    pub fn by_name(&self, name: &str) -> Option<&Listener> {
        self.list.iter().find(|l| {
            l.tag.as_deref() == Some(name)
                || format!("{}:{}", l.proto, SocketAddr::new(l.addr, l.port)) == name
        })
    }

    pub fn names(&self) -> String {
        let names: Vec<String> = self
            .list
            .iter()
            .map(|l| l.tag.clone().unwrap_or_else(|| l.to_string()))
            .collect();
        names.join(", ")
    }

    /// The listener that takes connections on `addr:port`: one bound there, else the first
    /// declared wildcard one on that port (see `wildcard_accepting`).
    pub fn accepting(&self, addr: IpAddr, port: u16) -> Option<&Listener> {
        let addr = fold_v4_mapped(addr);
        self.list
            .iter()
            .find(|l| l.port == port && l.addr == addr)
            .or_else(|| self.wildcard_accepting(addr.is_ipv4(), port))
    }

    /// The first declared wildcard listener on `port` that takes this family: `0.0.0.0` takes
    /// IPv4, `[::]` takes both (dual stack, IPv4 arriving as v4-mapped).
    pub fn wildcard_accepting(&self, v4: bool, port: u16) -> Option<&Listener> {
        self.list
            .iter()
            .find(|l| l.port == port && wildcard_of(l, v4))
    }

    /// The listener outbound connections from `addr` are attributed to: the first declared on
    /// that address, else `outbound_wildcard`.
    pub fn outbound_from(&self, addr: IpAddr) -> Option<&Listener> {
        let addr = fold_v4_mapped(addr);
        self.list
            .iter()
            .find(|l| l.addr == addr)
            .or_else(|| self.outbound_wildcard(addr.is_ipv4()))
    }

    /// The listener for outbound connections from an address no listener is declared on, or from
    /// an unbound socket: the first declared wildcard listener of that family.
    pub fn outbound_wildcard(&self, v4: bool) -> Option<&Listener> {
        self.list.iter().find(|l| wildcard_of(l, v4))
    }

    /// Turns a connection into the key the rules are matched against. `local` for an outbound
    /// connection is the socket's own address and port (port 0 when the kernel has not picked
    /// one yet); None when the socket is not bound yet.
    pub fn lookup(
        &self,
        direction: Direction,
        remote: SocketAddr,
        local: Option<SocketAddr>,
    ) -> Lookup {
        let remote_ip = fold_v4_mapped(remote.ip());
        let local_ip = local
            .map(|l| fold_v4_mapped(l.ip()))
            .filter(|ip| !ip.is_unspecified());
        let local_port = local.map_or(0, |l| l.port());
        let base = |proto: Option<Proto>, port: u16, why: String| Lookup {
            proto,
            remote: remote_ip,
            remote_port: remote.port(),
            local: local_ip,
            local_port: port,
            why,
        };
        match direction {
            Direction::Inbound => match local_ip.and_then(|ip| self.accepting(ip, local_port)) {
                Some(l) => base(Some(l.proto), l.port, format!("accepted on listener {l}")),
                None => base(
                    None,
                    local_port,
                    format!(
                        "accepted on port {local_port}, which no declared listener takes: protocol unknown, only proto 'any' rules apply"
                    ),
                ),
            },
            Direction::Outbound => {
                let bound = local_ip.filter(|_| local_port != 0).and_then(|ip| {
                    self.list
                        .iter()
                        .find(|l| l.addr == ip && l.port == local_port)
                });
                if let Some(l) = bound {
                    return base(
                        Some(l.proto),
                        l.port,
                        format!("outbound from the address and port of listener {l}"),
                    );
                }
                let family_v4 = local_ip.map_or(remote_ip.is_ipv4(), |ip| ip.is_ipv4());
                let attributed = match local_ip {
                    Some(ip) => self.outbound_from(ip),
                    None => self.outbound_wildcard(family_v4),
                };
                match attributed {
                    Some(l) => {
                        let from = local_ip.map_or("an unbound socket".to_owned(), |ip| ip.to_string());
                        base(
                            Some(l.proto),
                            l.port,
                            format!("outbound from {from}: attributed to {l} (the first listener declared on the local address, else the first wildcard one)"),
                        )
                    }
                    None => base(
                        None,
                        0,
                        "outbound, and no listener is declared on its local address: protocol unknown, local port any; only proto 'any' rules with local_port 0 apply".into(),
                    ),
                }
            }
        }
    }
}

/// Is `l` a wildcard listener that takes connections of this family?
fn wildcard_of(l: &Listener, v4: bool) -> bool {
    match l.addr {
        IpAddr::V4(a) => a.is_unspecified() && v4,
        IpAddr::V6(a) => a.is_unspecified(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_opensips_socket_syntax() {
        let l = Listener::parse("TLS:10.0.0.1:5061 tag trunks use_workers 4").unwrap();
        assert_eq!(
            (l.proto.name(), l.port, l.tag.as_deref()),
            ("tls", 5061, Some("trunks"))
        );
        let l = Listener::parse("wss:[2001:db8::5]").unwrap();
        assert_eq!((l.addr, l.port), ("2001:db8::5".parse().unwrap(), 443));
        assert!(Listener::parse("tcp:*:5060").unwrap().addr.is_unspecified());
        assert!(
            Listener::parse("udp:10.0.0.1:5060")
                .unwrap_err()
                .to_string()
                .contains("not a TCP-based")
        );
        assert!(
            Listener::parse("bin:10.0.0.1")
                .unwrap_err()
                .to_string()
                .contains("default port")
        );
        assert!(
            Listener::parse("tcp:sip.example.com:5060")
                .unwrap_err()
                .to_string()
                .contains("host names")
        );
        assert!(
            Listener::parse("tcp:10.0.0.1:5060 bogus")
                .unwrap_err()
                .to_string()
                .contains("unknown socket option")
        );
    }

    #[test]
    fn attribution_of_connections() {
        let ls =
            Listeners::parse_all(["tcp:10.0.0.1:5060", "tls:10.0.0.1:5061 tag t", "ws:*:8080"])
                .unwrap();
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        let inbound = ls.lookup(
            Direction::Inbound,
            sa("192.0.2.9:40000"),
            Some(sa("10.0.0.1:5061")),
        );
        assert_eq!(
            (inbound.proto.map(Proto::name), inbound.local_port),
            (Some("tls"), 5061)
        );
        let wild = ls.lookup(
            Direction::Inbound,
            sa("192.0.2.9:40000"),
            Some(sa("10.0.0.7:8080")),
        );
        assert_eq!(wild.proto.map(Proto::name), Some("ws"));
        let out = ls.lookup(
            Direction::Outbound,
            sa("192.0.2.9:5061"),
            Some(sa("10.0.0.1:41000")),
        );
        assert_eq!(
            (out.proto.map(Proto::name), out.local_port),
            (Some("tcp"), 5060)
        );
        let reused = ls.lookup(
            Direction::Outbound,
            sa("192.0.2.9:5061"),
            Some(sa("10.0.0.1:5061")),
        );
        assert_eq!(reused.proto.map(Proto::name), Some("tls"));
        let elsewhere = ls.lookup(
            Direction::Outbound,
            sa("192.0.2.9:5061"),
            Some(sa("10.9.9.9:41000")),
        );
        assert_eq!(
            (elsewhere.proto.map(Proto::name), elsewhere.local_port),
            (Some("ws"), 8080)
        );
        let none = Listeners::default().lookup(Direction::Outbound, sa("192.0.2.9:5061"), None);
        assert_eq!((none.proto, none.local_port, none.local), (None, 0, None));
    }
}
