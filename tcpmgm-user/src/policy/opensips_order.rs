//! Where OpenSIPS's own order of a table is not defined, so that an operator moving a table from
//! OpenSIPS knows where the two may choose differently.
//!
//! OpenSIPS sorts the table with qsort and a comparator (`tcp_path_comparator` in
//! `modules/tcp_mgm/tcp_db.c`) that calls two rules of two different specific protocols equal.
//! That comparator is not transitive: with a `tls` rule "equal" to two `tcp` rules at the same
//! priority, qsort may put the two `tcp` rules in either order, depending on the C library and
//! the row order. So a priority level whose rules name two or more different specific protocols
//! has no defined order in OpenSIPS; tcpmgm applies its documented total order
//! (`matcher::match_order`). Only rules that can meet a common connection can be chosen
//! differently, so those are the ones named.
use std::collections::BTreeMap;

use ipnet::IpNet;

use crate::policy::rule::{Proto, Rule};

/// Above this many rules in one ambiguous level, the rules are not compared pairwise (the
/// level is still reported, with its size).
pub const PAIRWISE_LIMIT: usize = 4096;

/// A priority level whose order OpenSIPS leaves undefined.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AmbiguousLevel {
    pub priority: i32,
    /// The specific protocols its rules name, sorted.
    pub protocols: Vec<Proto>,
    /// Ids of its rules that can meet a common connection with another of its rules, sorted;
    /// every rule of the level when it has more than `PAIRWISE_LIMIT`.
    pub rules: Vec<u32>,
    /// The level's rule count.
    pub size: usize,
}

impl AmbiguousLevel {
    /// The warning `tcpmgm check` prints.
    pub fn warning(&self) -> String {
        let protocols: Vec<String> = self.protocols.iter().map(|p| p.to_string()).collect();
        let rules: Vec<String> = self.rules.iter().map(|id| id.to_string()).collect();
        let which = if self.size > PAIRWISE_LIMIT {
            format!("its {} rules (too many to compare pairwise)", self.size)
        } else {
            format!(
                "rules {}, which can match the same connection,",
                rules.join(", ")
            )
        };
        format!(
            "priority {}: rules for {} share this priority, so OpenSIPS's order among its rules \
             is not defined (OpenSIPS's comparator calls rules of two different protocols equal; \
             qsort's result then depends on the C library and the row order): OpenSIPS may try \
             {which} in another order than tcpmgm, which applies its documented total order",
            self.priority,
            protocols.join(" and ")
        )
    }
}

/// The levels of `rules` whose order OpenSIPS leaves undefined and where that can matter.
pub fn ambiguous_levels(rules: &[Rule]) -> Vec<AmbiguousLevel> {
    let mut levels: BTreeMap<i32, Vec<&Rule>> = BTreeMap::new();
    for r in rules {
        levels.entry(r.priority).or_default().push(r);
    }
    let mut out = Vec::new();
    for (priority, level) in levels {
        let mut protocols: Vec<Proto> = level.iter().filter_map(|r| r.proto).collect();
        protocols.sort();
        protocols.dedup();
        if protocols.len() < 2 {
            continue;
        }
        let mut named: Vec<u32> = if level.len() > PAIRWISE_LIMIT {
            level.iter().map(|r| r.id).collect()
        } else {
            let mut named = Vec::new();
            for (i, a) in level.iter().enumerate() {
                if level
                    .iter()
                    .enumerate()
                    .any(|(j, b)| i != j && can_meet(a, b))
                {
                    named.push(a.id);
                }
            }
            named
        };
        if named.is_empty() {
            continue;
        }
        named.sort_unstable();
        out.push(AmbiguousLevel {
            priority,
            protocols,
            rules: named,
            size: level.len(),
        });
    }
    out
}

/// Whether some connection matches both rules.
pub fn can_meet(a: &Rule, b: &Rule) -> bool {
    let proto = a.proto.is_none() || b.proto.is_none() || a.proto == b.proto;
    let port = |x: u16, y: u16| x == 0 || y == 0 || x == y;
    proto
        && nets_meet(a.remote, b.remote)
        && port(a.remote_port, b.remote_port)
        && nets_meet(a.local_net(), b.local_net())
        && port(a.local_port, b.local_port)
}

/// Two prefixes (None: any) hold a common address when one contains the other.
fn nets_meet(a: Option<IpNet>, b: Option<IpNet>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.contains(&b.network()) || b.contains(&a.network()),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::rule::{Cell, Row, validate_rows};

    fn rules(rows: &[(u32, &[(&str, &str)])]) -> Vec<Rule> {
        let rows: Vec<Row> = rows
            .iter()
            .map(|(id, cells)| {
                cells.iter().fold(
                    Row::default().with("id", Cell::Int(i64::from(*id))),
                    |row, (column, value)| {
                        let cell = value
                            .parse()
                            .map_or_else(|_| Cell::Text((*value).into()), Cell::Int);
                        row.with(column, cell)
                    },
                )
            })
            .collect();
        let (rules, errors) = validate_rows(&rows, &Default::default());
        assert!(errors.is_empty(), "{errors:?}");
        rules
    }

    /// The table OpenSIPS 3.6 was seen to order differently from tcpmgm.
    fn issue_table(with_tls: bool) -> Vec<Rule> {
        let mut rows: Vec<(u32, &[(&str, &str)])> = vec![
            (
                11,
                &[
                    ("proto", "tcp"),
                    ("remote_addr", "127.0.0.0/9"),
                    ("local_port", "5080"),
                ],
            ),
            (15, &[("proto", "tcp"), ("remote_addr", "127.2.0.0/16")]),
            (
                20,
                &[
                    ("proto", "tcp"),
                    ("remote_addr", "10.0.0.0/8"),
                    ("priority", "1"),
                ],
            ),
        ];
        if with_tls {
            rows.push((12, &[("proto", "tls"), ("remote_addr", "192.0.2.0/24")]));
        }
        rules(&rows)
    }

    #[test]
    fn a_level_mixing_protocols_names_its_overlapping_rules() {
        let levels = ambiguous_levels(&issue_table(true));
        assert_eq!(levels.len(), 1, "{levels:?}");
        let level = &levels[0];
        assert_eq!(level.priority, 0);
        assert_eq!(
            level.protocols,
            [
                Proto::parse("tcp").unwrap().unwrap(),
                Proto::parse("tls").unwrap().unwrap()
            ]
        );
        // The tls rule meets neither tcp rule; 11 and 15 meet at 127.2.x.x.
        assert_eq!(level.rules, [11, 15]);
        let w = level.warning();
        for says in [
            "priority 0",
            "tcp and tls",
            "rules 11, 15",
            "not defined",
            "documented total order",
        ] {
            assert!(w.contains(says), "{says}: {w}");
        }
    }

    #[test]
    fn one_protocol_a_level_is_not_ambiguous() {
        assert!(ambiguous_levels(&issue_table(false)).is_empty());
        // Two protocols at a level whose rules never meet: nothing can differ.
        let apart = rules(&[
            (1, &[("proto", "tcp"), ("remote_addr", "10.0.0.0/8")]),
            (2, &[("proto", "tls"), ("remote_addr", "10.0.0.0/8")]),
        ]);
        assert!(ambiguous_levels(&apart).is_empty());
    }

    #[test]
    fn rules_meet_on_every_key_or_not_at_all() {
        let r = rules(&[
            (1, &[("remote_addr", "10.0.0.0/8"), ("remote_port", "5060")]),
            (2, &[("proto", "tcp"), ("remote_addr", "10.1.0.0/16")]),
            (
                3,
                &[("remote_addr", "10.1.0.0/16"), ("remote_port", "5061")],
            ),
            (4, &[("remote_addr", "::/0")]),
            (5, &[("local_addr", "192.0.2.1"), ("local_port", "5060")]),
        ]);
        assert!(can_meet(&r[0], &r[1]));
        assert!(!can_meet(&r[0], &r[2]), "ports 5060 and 5061");
        assert!(!can_meet(&r[1], &r[3]), "IPv4 and IPv6");
        assert!(can_meet(&r[0], &r[4]));
        assert!(can_meet(&r[3], &r[4]));
    }
}
