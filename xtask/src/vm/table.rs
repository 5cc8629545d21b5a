//! The README's kernel table, checked against what `tcpmgm features` printed in each guest: a
//! row per feature, a column per Debian kernel, `yes` or `no` in each cell.
use std::collections::HashMap;

/// Where the table starts in the README.
pub const MARK: &str = "<!-- kernel table: checked by cargo xtask vm test -->";

/// The (feature, yes/no) lines of a `tcpmgm features` report.
pub fn from_report(lines: &[String]) -> Vec<(String, bool)> {
    lines
        .iter()
        .filter_map(|line| {
            let line = line.trim();
            let (supported, rest) = if let Some(rest) = line.strip_prefix("yes ") {
                (true, rest)
            } else {
                (false, line.strip_prefix("no ")?)
            };
            let rest = rest.trim_start();
            let end = [": needed by ", ": optional: "]
                .iter()
                .filter_map(|sep| rest.find(sep))
                .min()?;
            Some((rest[..end].to_owned(), supported))
        })
        .collect()
}

/// The README table's cells by feature, for the column whose header names `series` (e.g.
/// "Debian 11 (5.10)" for "5.10").
pub fn from_readme(readme: &str, series: &str) -> Result<HashMap<String, bool>, String> {
    let start = readme
        .find(MARK)
        .ok_or_else(|| format!("the README has no `{MARK}` line"))?;
    let mut rows = readme[start + MARK.len()..]
        .lines()
        .skip_while(|l| l.trim().is_empty())
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            l.trim()
                .trim_matches('|')
                .split('|')
                .map(|c| c.trim().trim_matches('`').to_owned())
                .collect::<Vec<_>>()
        });
    let header = rows.next().ok_or("the kernel table is empty")?;
    let column = header
        .iter()
        .position(|h| h.contains(&format!("({series})")))
        .ok_or_else(|| format!("the kernel table has no column for {series}: {header:?}"))?;
    let mut cells = HashMap::new();
    for row in rows.skip(1) {
        let value = match row.get(column).map(String::as_str) {
            Some("yes") => true,
            Some("no") => false,
            other => return Err(format!("row {:?}: cell {other:?} is not yes or no", row[0])),
        };
        cells.insert(row[0].clone(), value);
    }
    Ok(cells)
}

/// Every difference between the guest's report and the README's column for `series`.
pub fn differences(readme: &str, series: &str, report: &[String]) -> Vec<String> {
    let table = match from_readme(readme, series) {
        Ok(t) => t,
        Err(e) => return vec![e],
    };
    let seen = from_report(report);
    if seen.is_empty() {
        return vec!["the guest printed no tcpmgm features report".into()];
    }
    let mut out = Vec::new();
    for (feature, supported) in &seen {
        match table.get(feature) {
            None => out.push(format!("\"{feature}\" is not in the README's table")),
            Some(cell) if cell != supported => out.push(format!(
                "\"{feature}\": the README says {}, the kernel says {}",
                yes(*cell),
                yes(*supported)
            )),
            Some(_) => {}
        }
    }
    for feature in table.keys() {
        if !seen.iter().any(|(f, _)| f == feature) {
            out.push(format!(
                "the README lists \"{feature}\", which tcpmgm features did not"
            ));
        }
    }
    out
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

#[cfg(test)]
mod tests {
    use super::*;

    const README: &str = "intro\n\n<!-- kernel table: checked by cargo xtask vm test -->\n\n\
| feature | for | Debian 11 (5.10) | Debian 12 (6.1) |\n|---|---|---|---|\n\
| `A [Linux 4.13]` | tcpmgm | yes | yes |\n| B | speed | no | yes |\n\nafter\n";

    fn report(a: &str, b: &str) -> Vec<String> {
        vec![
            "tcpmgm features of Linux 5.10".into(),
            format!("  {a}  A [Linux 4.13]: needed by tcpmgm"),
            format!("  {b}   B: optional: without it slower (detail: x)"),
        ]
    }

    #[test]
    fn a_matching_report_has_no_differences() {
        assert!(differences(README, "5.10", &report("yes", "no")).is_empty());
        assert!(differences(README, "6.1", &report("yes", "yes")).is_empty());
    }

    #[test]
    fn each_kind_of_difference_is_named() {
        let d = differences(README, "5.10", &report("yes", "yes"));
        assert_eq!(d, ["\"B\": the README says no, the kernel says yes"]);
        let d = differences(README, "5.10", &report("yes", "no")[..2]);
        assert_eq!(d, ["the README lists \"B\", which tcpmgm features did not"]);
        assert!(!differences(README, "6.12", &report("yes", "no")).is_empty());
    }
}
