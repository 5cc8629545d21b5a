//! `tcpmgm events`: the daemon's event stream (see `daemon::events`), filtered and printed.
use std::net::IpAddr;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use ipnet::IpNet;
use tokio::io::{AsyncBufReadExt as _, BufReader};

use crate::daemon::events::Line;

/// The kinds of event `--kind` selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    Decided,
    Refused,
    WouldRefuse,
    Ended,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Decided => "decided",
            Kind::Refused => "refused",
            Kind::WouldRefuse => "would_refuse",
            Kind::Ended => "ended",
        }
    }
}

/// Which events to show; an empty list lets every value through. Notices (`dropped`,
/// `lagged`) always pass: they say what the stream is missing.
#[derive(Debug, Default)]
pub struct Filter {
    pub rules: Vec<u32>,
    pub addrs: Vec<IpNet>,
    pub kinds: Vec<Kind>,
}

impl Filter {
    fn passes(&self, l: &Line) -> bool {
        if is_notice(l) {
            return true;
        }
        let rule = self.rules.is_empty() || l.rule.is_some_and(|r| self.rules.contains(&r));
        let kind = self.kinds.is_empty() || self.kinds.iter().any(|k| k.name() == l.kind);
        let addr = self.addrs.is_empty()
            || [l.remote, l.local]
                .into_iter()
                .flatten()
                .any(|a| self.addrs.iter().any(|net| net.contains(&a.ip())));
        rule && kind && addr
    }
}

fn is_notice(l: &Line) -> bool {
    l.kind == "dropped" || l.kind == "lagged"
}

/// An address or a prefix, for `--addr`.
pub fn parse_addr(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| {
            format!("'{s}' is neither an address nor a prefix (192.0.2.0/24, 2001:db8::1)")
        })
}

/// One event as a line of text.
fn text(l: &Line) -> String {
    let time = l.time.get(11..23).unwrap_or(&l.time);
    match l.kind.as_str() {
        "dropped" => format!(
            "{time} dropped {} events: more than {} a CPU a second, or the daemon read too slowly",
            l.count.unwrap_or(0),
            tcpmgm_common::EVENTS_PER_SECOND
        ),
        "lagged" => format!(
            "{time} lagged  this client missed {} events: it read too slowly",
            l.count.unwrap_or(0)
        ),
        kind => {
            let show = |a: Option<std::net::SocketAddr>| a.map_or("?".into(), |a| a.to_string());
            let (local, remote) = (show(l.local), show(l.remote));
            let conn = if l.direction.as_deref() == Some("in") {
                format!("in  {local} <- {remote}")
            } else {
                format!("out {local} -> {remote}")
            };
            let mut out = format!(
                "{time} {kind:<12} rule {:<8} {conn}",
                l.rule.map_or("?".into(), |r| r.to_string())
            );
            if let Some(o) = &l.outcome {
                out.push_str(&format!("  {o}"));
                if let Some(ms) = l.lived_ms {
                    out.push_str(&format!(" after {:.1} s", ms as f64 / 1000.0));
                }
            }
            out
        }
    }
}

/// Follows the daemon's events at `path` until it stops, or `count` events were shown.
pub async fn follow(
    path: &Path,
    filter: &Filter,
    json: bool,
    count: Option<u64>,
) -> anyhow::Result<ExitCode> {
    use std::io::Write as _;
    let stream = tokio::net::UnixStream::connect(path)
        .await
        .with_context(|| {
            format!(
                "no daemon serves events at {} (is `tcpmgm run` running for this cgroup?)",
                path.display()
            )
        })?;
    let mut lines = BufReader::new(stream).lines();
    let mut shown = 0;
    let mut out = std::io::stdout().lock();
    while let Some(raw) = lines.next_line().await? {
        if let Some(reason) = raw.strip_prefix("error ") {
            anyhow::bail!("the daemon refused the stream: {reason}");
        }
        let Ok(l) = serde_json::from_str::<Line>(&raw) else {
            continue;
        };
        if l.kind == "subscribed" {
            // Events from now on reach this client (scripts may wait for this line).
            eprintln!("tcpmgm: following the events at {}", path.display());
            continue;
        }
        if !filter.passes(&l) {
            continue;
        }
        if json {
            writeln!(out, "{raw}")?;
        } else {
            writeln!(out, "{}", text(&l))?;
        }
        out.flush()?;
        if !is_notice(&l) {
            shown += 1;
            if count.is_some_and(|c| shown >= c) {
                return Ok(ExitCode::SUCCESS);
            }
        }
    }
    super::logging::error("the daemon stopped: the event stream ended");
    Ok(ExitCode::from(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(json: &str) -> Line {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn filters_select_by_rule_kind_and_address_and_let_notices_through() {
        let ended = line(
            r#"{"time":"2026-12-01T14:10:02.123Z","kind":"ended","rule":57,"direction":"out","remote":"192.0.2.2:7157","local":"192.0.2.1:40000","outcome":"keepalive","lived_ms":3012}"#,
        );
        let dropped = line(r#"{"time":"2026-12-01T14:10:03.000Z","kind":"dropped","count":4}"#);
        let f = |rules: Vec<u32>, addrs: &[&str], kinds: Vec<Kind>| Filter {
            rules,
            addrs: addrs.iter().map(|a| parse_addr(a).unwrap()).collect(),
            kinds,
        };
        assert!(Filter::default().passes(&ended));
        assert!(f(vec![57], &[], vec![]).passes(&ended));
        assert!(!f(vec![56], &[], vec![]).passes(&ended));
        assert!(f(vec![], &["192.0.2.0/24"], vec![Kind::Ended]).passes(&ended));
        assert!(f(vec![], &["192.0.2.1"], vec![]).passes(&ended));
        assert!(!f(vec![], &["2001:db8::/32"], vec![]).passes(&ended));
        assert!(!f(vec![], &[], vec![Kind::Refused]).passes(&ended));
        assert!(f(vec![56], &["10.0.0.0/8"], vec![Kind::Refused]).passes(&dropped));
        assert_eq!(
            text(&ended),
            "14:10:02.123 ended        rule 57       out 192.0.2.1:40000 -> 192.0.2.2:7157  keepalive after 3.0 s"
        );
        assert!(text(&dropped).contains("dropped 4 events"));
        assert!(parse_addr("not an address").is_err());
    }
}
