//! What each guest must run: every test of every binary, less the filters given and the tests
//! named in [`HOST_ONLY`]. The host lists the tests of its own copy of each binary before a
//! guest boots, so a guest's run is checked against a number, not only for failures: a binary
//! that ran fewer tests than planned, or none, fails the run.

use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, bail};

/// The tests that run on the host only, by test binary: they need a PostgreSQL or MariaDB
/// server, which the guest does not have, and exercise the databases rather than the kernel.
/// A name here that no binary has fails the run, so the list cannot go stale unnoticed.
pub const HOST_ONLY: &[(&str, &[&str])] = &[
    (
        "cli",
        &[
            "a_column_of_another_type_is_named_in_its_rows::mariadb",
            "a_column_of_another_type_is_named_in_its_rows::postgres",
            "both_table_versions_are_read::mariadb",
            "both_table_versions_are_read::postgres",
            "check_names_every_bad_row::mariadb",
            "check_names_every_bad_row::postgres",
            "db_init_makes_a_named_table_with_the_example_rules::mariadb",
            "db_init_makes_a_named_table_with_the_example_rules::postgres",
            "run_enforces_skips_bad_rows_keeps_the_policy_on_sigterm_and_detach_removes_it::mariadb",
            "run_enforces_skips_bad_rows_keeps_the_policy_on_sigterm_and_detach_removes_it::postgres",
            "the_fast_read_gives_what_the_row_by_row_read_gives::mariadb",
            "the_fast_read_gives_what_the_row_by_row_read_gives::postgres",
        ],
    ),
    (
        "incremental",
        &["every_incremental_reload_from_postgres_notifications_gives_the_maps_of_a_full_reload"],
    ),
    (
        "opensips",
        &[
            "column_renames_with_mariadb",
            "column_renames_with_postgres",
            "opensips_cfg_with_postgres_and_another_table_name",
        ],
    ),
    (
        "push",
        &[
            "a_lost_postgres_connection_is_retried_while_the_policy_stays",
            "a_postgres_commit_reaches_every_daemon_following_the_table",
            "a_postgres_table_without_the_trigger_gets_it_when_the_role_may",
            "a_postgres_table_without_the_trigger_is_polled_when_the_role_cannot_add_it",
            "mariadb_changes_are_polled",
            "status_says_when_postgres_cannot_be_reached",
        ],
    ),
    (
        "serve",
        &[
            "a_reload_held_by_a_postgres_lock_leaves_status_and_logs_answering_and_requests_fold_into_one_more",
            "sigterm_is_answered_while_a_reload_waits_on_a_postgres_lock",
        ],
    ),
];

/// One test binary's part of a guest's run.
#[derive(Clone, Debug, PartialEq)]
pub struct Planned {
    /// The test target's name (`faults` for tests/tests/faults.rs).
    pub name: String,
    /// The harness arguments that leave out its host-only tests.
    pub skips: Vec<String>,
    /// The tests the guest must run: those the filters select, less the host-only ones.
    pub run: u64,
    /// The tests the filters given leave out.
    pub by_filters: u64,
    /// The host-only tests among those the filters select.
    pub host_only: u64,
}

/// The plan for `tests` (target name, executable) under the harness arguments `args`. With
/// `every_binary` (no `--test` given), a binary of the host-only list that was not built is a
/// stale name too.
pub fn plan(
    tests: &[(String, std::path::PathBuf)],
    args: &[String],
    every_binary: bool,
) -> anyhow::Result<Vec<Planned>> {
    if every_binary
        && let Some((stale, _)) = HOST_ONLY
            .iter()
            .find(|(binary, _)| !tests.iter().any(|(name, _)| name == binary))
    {
        bail!(
            "xtask's host-only list names the test binary {stale}, which the workspace does not have"
        );
    }
    let mut plans = Vec::new();
    for (name, exe) in tests {
        let host_only: &[&str] = HOST_ONLY
            .iter()
            .find(|(binary, _)| binary == name)
            .map_or(&[], |(_, tests)| tests);
        let all = list(exe, &[])?;
        if let Some(stale) = host_only.iter().find(|t| !all.iter().any(|a| a == *t)) {
            bail!("xtask's host-only list names {name}'s test {stale}, which {name} does not have");
        }
        let selected = list(exe, args)?;
        let skips: Vec<String> = host_only
            .iter()
            .flat_map(|t| ["--skip".to_owned(), (*t).to_owned()])
            .collect();
        let mut with_skips = args.to_vec();
        with_skips.extend(skips.iter().cloned());
        let kept = list(exe, &with_skips)?;
        // A skip is a substring match: it must leave out exactly the host-only tests.
        let expected: Vec<&String> = selected
            .iter()
            .filter(|t| !host_only.contains(&t.as_str()))
            .collect();
        if kept.iter().collect::<Vec<_>>() != expected {
            bail!(
                "{name}: skipping its host-only tests would leave {} tests, not the {} planned",
                kept.len(),
                expected.len()
            );
        }
        plans.push(Planned {
            name: name.clone(),
            skips,
            run: kept.len() as u64,
            by_filters: (all.len() - selected.len()) as u64,
            host_only: (selected.len() - kept.len()) as u64,
        });
    }
    Ok(plans)
}

/// The tests `exe`'s harness selects with `args`, as `--list --format terse` names them.
fn list(exe: &Path, args: &[String]) -> anyhow::Result<Vec<String>> {
    let out = Command::new(exe)
        .args(["--list", "--format", "terse"])
        .args(args)
        .output()
        .with_context(|| format!("{} --list", exe.display()))?;
    if !out.status.success() {
        bail!(
            "{} --list failed: {}",
            exe.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(parse_list(&String::from_utf8_lossy(&out.stdout)))
}

/// The test names in a terse listing ("name: test" lines; benchmarks are not run).
fn parse_list(listing: &str) -> Vec<String> {
    listing
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::parse_list;

    #[test]
    fn a_terse_listing_gives_the_test_names() {
        let listing = "db_init::postgres: test\nruns: test\nspeed: benchmark\n";
        assert_eq!(parse_list(listing), ["db_init::postgres", "runs"]);
        assert!(parse_list("").is_empty());
    }
}
