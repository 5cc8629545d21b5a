//! One configuration for OpenSIPS and tcpmgm (`--opensips-cfg`), a table by another name
//! (`--table`), and the priority levels OpenSIPS orders in no defined way, named by `check` and
//! `match`.
use std::time::{Duration, Instant};

use tcpmgm::policy::source::{TableName, TableVersion};
use tcpmgm_tests::{Backend, Daemon, Sandbox, Scratch, TestDb, control_socket, run_sql, tcpmgm};

/// An opensips.cfg as an operator writes it: global parameters, UDP and TCP sockets, modules
/// with their own db_url, comments that hold what must not be read.
fn opensips_cfg(db_url: &str, table: &str) -> String {
    format!(
        r#"####### Global Parameters #########
log_level=3
udp_workers=4
tcp_keepidle=600

socket=udp:127.0.0.1:5070
socket=tcp:127.0.0.1:5070 tag trunks   # the carriers
/* socket=tcp:127.0.0.9:5070 tag trunks
   modparam("tcp_mgm", "db_table", "not_this_one") */

####### Modules Section ########
mpath="/usr/lib/x86_64-linux-gnu/opensips/modules/"
loadmodule "db_postgres.so"
loadmodule "usrloc.so"
modparam("usrloc", "db_url", "mysql://opensips:other@192.0.2.1/opensips")
loadmodule "tcp_mgm.so"
modparam("tcp_mgm", "db_url", "{db_url}")
modparam("tcp_mgm", "db_table", "{table}")

route {{
    if (is_method("REGISTER")) {{ save("location"); exit; }}
}}
"#
    )
}

/// Only the cfg's `trunks` listener makes rule 1 valid, and gives it its local address.
fn rule_sql(table: &str) -> String {
    format!(
        "INSERT INTO {table} (id, local_addr, local_port, keepidle) VALUES (1, 'trunks', 5070, 41);"
    )
}

/// `tcpmgm run --opensips-cfg FILE` and nothing else about the rules: the table named by the
/// tcp_mgm module's db_url and db_table, the listeners of the socket= lines.
async fn run_from_the_opensips_cfg(backend: Backend, table: &str) {
    let table_name = TableName::new(table).unwrap();
    let db = TestDb::with_table(backend, TableVersion::V1, &table_name, &rule_sql(table)).await;
    let scratch = Scratch::new(&format!("opensips-cfg-{table}"));
    let cfg = scratch.write("opensips.cfg", &opensips_cfg(&db.url, table));
    let sb = Sandbox::new();
    let d = Daemon::start_args(
        &sb,
        control_socket(&sb),
        &["--opensips-cfg", &cfg, "--poll-interval", "1"],
    );
    let mut p = sb.probe();
    // Bound to the listener's address before connecting, as OpenSIPS does: the outbound end
    // is attributed to that listener too.
    let r = p.ask("pair 127.0.0.1:5070 127.0.0.1:5070 127.0.0.1:0");
    assert_eq!(
        (r.keepalive("server").1, r.keepalive("client").1),
        (41, 41),
        "{r:?}; daemon: {}",
        d.startup_log
    );
    // Elsewhere the listener, hence the rule, does not apply.
    let other = p.ask("pair 127.0.0.1:5071 127.0.0.1:5071");
    assert_eq!(other.keepalive("server").1, 7200, "{other:?}");

    // A change to the table by that name is followed (PostgreSQL: the trigger on it).
    db.sql(&format!("UPDATE {table} SET keepidle = 42 WHERE id = 1;"))
        .await;
    let start = Instant::now();
    loop {
        let r = p.ask("pair 127.0.0.1:5070 127.0.0.1:5070");
        if r.keepalive("server").1 == 42 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the change to {table} was not applied within 60 s: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test]
async fn opensips_cfg_with_sqlite() {
    run_from_the_opensips_cfg(Backend::Sqlite, "tcp_mgm").await;
}

#[tokio::test]
async fn opensips_cfg_with_postgres_and_another_table_name() {
    run_from_the_opensips_cfg(Backend::Postgres, "sip_tcp_rules").await;
}

/// check, match and db init take --table; without it the default table is looked for, and its
/// absence is named.
#[tokio::test]
async fn check_match_and_db_init_honour_table() {
    let scratch = Scratch::new("table");
    let db = format!("sqlite://{}", scratch.0.join("rules.db").display());
    let (code, out, err) = tcpmgm(&["db", "init", "--db", &db, "--table", "carrier_rules"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("created table carrier_rules"), "{out}");
    run_sql(
        &db,
        "INSERT INTO carrier_rules (id, remote_addr, keepidle) VALUES (5, '192.0.2.0/24', 30);",
    )
    .await;

    let (code, _, err) = tcpmgm(&["check", "--db", &db, "--table", "carrier_rules"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("1 rules valid, 0 rows bad"), "{err}");
    let (code, out, err) = tcpmgm(&[
        "match",
        "--db",
        &db,
        "--table",
        "carrier_rules",
        "--remote",
        "192.0.2.7:5060",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("rule 5:"), "{out}");
    let (code, _, err) = tcpmgm(&["check", "--db", &db]);
    assert_eq!(
        code, 65,
        "no tcp_mgm table is bad table data (EX_DATAERR): {err}"
    );
    assert!(
        err.contains("table tcp_mgm"),
        "the missing table is not named: {err}"
    );
    let (code, _, err) = tcpmgm(&["check", "--db", &db, "--table", "carrier-rules"]);
    assert_eq!(
        code, 64,
        "a --table clap refuses is a usage error (EX_USAGE)"
    );
    assert!(err.contains("plain SQL name"), "{err}");
}

/// The table OpenSIPS 3.6 was seen to order differently from tcpmgm: rules 11 and 15 are both
/// tcp, and the tls rule at the same priority, "equal" to both in OpenSIPS's comparator, lets
/// qsort put 11 first.
async fn ambiguous_table(db: &str, with_tls: bool) {
    let mut sql = "INSERT INTO tcp_mgm (id, proto, remote_addr, local_port) VALUES (11, 'tcp', '127.0.0.0/9', 5080);
        INSERT INTO tcp_mgm (id, proto, remote_addr) VALUES (15, 'tcp', '127.2.0.0/16');"
        .to_owned();
    if with_tls {
        sql.push_str(
            "INSERT INTO tcp_mgm (id, proto, remote_addr) VALUES (12, 'tls', '192.0.2.0/24');",
        );
    }
    run_sql(db, &sql).await;
}

#[tokio::test]
async fn check_names_the_priority_levels_opensips_orders_in_no_defined_way() {
    for with_tls in [true, false] {
        let scratch = Scratch::new(&format!("ambiguous-{with_tls}"));
        let db = format!("sqlite://{}", scratch.0.join("rules.db").display());
        let (code, ..) = tcpmgm(&["db", "init", "--db", &db]);
        assert_eq!(code, 0);
        ambiguous_table(&db, with_tls).await;
        let (code, out, err) = tcpmgm(&["check", "--db", &db]);
        assert_eq!(code, 0, "a warning changed the exit status: {out}{err}");
        let warnings: Vec<&str> = out.lines().filter(|l| l.starts_with("warning:")).collect();
        if !with_tls {
            assert!(warnings.is_empty(), "tcp rules alone: {out}");
            continue;
        }
        assert_eq!(warnings.len(), 1, "one warning per level: {out}");
        for says in [
            "priority 0",
            "tcp and tls",
            "rules 11, 15",
            "OpenSIPS's order among its rules is not defined",
            "tcpmgm, which applies its documented total order",
        ] {
            assert!(warnings[0].contains(says), "{says:?} in {}", warnings[0]);
        }
        let (code, out, stderr) = tcpmgm(&[
            "match",
            "--db",
            &db,
            "--remote",
            "127.2.3.4:5060",
            "--proto",
            "tcp",
            "--local",
            "127.0.0.1:5080",
        ]);
        assert_eq!(code, 0, "{out}{stderr}");
        assert!(out.contains("rule 15:"), "{out}");
        assert!(
            out.contains("OpenSIPS's order between rules 15 and 11 is not defined"),
            "{out}"
        );
    }
}

/// Explicit options win over the OpenSIPS configuration; what it cannot follow is an error
/// naming the line.
#[test]
fn explicit_options_win_and_what_cannot_be_followed_is_named() {
    let scratch = Scratch::new("opensips-cfg-errors");
    let db = format!("sqlite://{}", scratch.0.join("rules.db").display());
    let (code, ..) = tcpmgm(&["db", "init", "--db", &db, "--table", "from_cli"]);
    assert_eq!(code, 0);
    let cfg = scratch.write(
        "opensips.cfg",
        &opensips_cfg("sqlite:///nonexistent/rules.db", "from_cfg"),
    );
    let (code, _, err) = tcpmgm(&[
        "check",
        "--opensips-cfg",
        &cfg,
        "--db",
        &db,
        "--table",
        "from_cli",
    ]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = tcpmgm(&["check", "--opensips-cfg", &cfg]);
    assert_eq!(
        code, 69,
        "a missing SQLite file is an unavailable database: {err}"
    );
    assert!(
        err.contains("/nonexistent/rules.db"),
        "the cfg's db_url was not used: {err}"
    );

    let included = scratch.write(
        "included.cfg",
        "log_level=3\ninclude_file \"tcp_mgm.cfg\"\n",
    );
    let (code, _, err) = tcpmgm(&["check", "--opensips-cfg", &included]);
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains(&format!("{included}:2: include_file")),
        "the line is not named: {err}"
    );
    let flatstore = scratch.write(
        "flatstore.cfg",
        "modparam(\"tcp_mgm\", \"db_url\", \"flatstore:/var/log/opensips\")\n",
    );
    let (code, _, err) = tcpmgm(&["check", "--opensips-cfg", &flatstore]);
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains(&format!(
            "{flatstore}:1: database URL with scheme \"flatstore\""
        )),
        "{err}"
    );
}

/// The rule of `rule_sql`, in a table whose id and keepidle columns have other names.
const RENAMED_SQL: &str = "ALTER TABLE tcp_mgm RENAME COLUMN keepidle TO ka_idle;
    ALTER TABLE tcp_mgm RENAME COLUMN id TO rule_id;
    INSERT INTO tcp_mgm (rule_id, local_addr, local_port, ka_idle) VALUES (1, 'trunks', 5070, 41);";

/// `opensips_cfg` with the tcp_mgm module told where those columns are.
fn renaming_cfg(db_url: &str) -> String {
    opensips_cfg(db_url, "tcp_mgm").replace(
        "modparam(\"tcp_mgm\", \"db_table\", \"tcp_mgm\")",
        "modparam(\"tcp_mgm\", \"db_table\", \"tcp_mgm\")\n\
         modparam(\"tcp_mgm\", \"keepidle_col\", \"ka_idle\")\n\
         modparam(\"tcp_mgm\", \"id_col\", \"rule_id\")",
    )
}

/// The module's `<column>_col` renames are honoured: `check` and `match` read the renamed
/// columns (and say the missing one without them), on every database.
async fn column_renames_are_read(backend: Backend) {
    let db = TestDb::new(backend, TableVersion::V1, RENAMED_SQL).await;
    let scratch = Scratch::new(&format!("renames-{backend:?}"));
    let cfg = scratch.write("opensips.cfg", &renaming_cfg(&db.url));
    let (code, out, err) = tcpmgm(&["check", "--opensips-cfg", &cfg]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("1 rules valid, 0 rows bad"), "{err}");
    let (code, out, err) = tcpmgm(&[
        "match",
        "--opensips-cfg",
        &cfg,
        "--remote",
        "192.0.2.9:5060",
        "--local",
        "127.0.0.1:5070",
        "--direction",
        "in",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("rule 1:") && out.contains("keepidle=41s"),
        "{out}"
    );
    // The schema defaults it does not enforce are marked.
    assert!(
        out.contains("connect_timeout=100ms*")
            && out.contains("con_lifetime=120s*")
            && out.contains("keepidle=41s ")
            && out.contains("* not enforced: connect_timeout: OpenSIPS's schema default"),
        "{out}"
    );
    // Without them, the table's own id column is missing (the database says so as it sorts).
    let plain = scratch.write("plain.cfg", &opensips_cfg(&db.url, "tcp_mgm"));
    let (code, _, err) = tcpmgm(&["check", "--opensips-cfg", &plain]);
    assert!(
        code == 65 && err.contains("column") && err.contains("id"),
        "{err}"
    );
    // The configuration file's [columns] do the same, and win over the cfg's.
    let config = scratch.write(
        "tcpmgm.toml",
        &format!("opensips_cfg = {plain:?}\n[columns]\nkeepidle = \"ka_idle\"\nid = \"rule_id\"\n"),
    );
    let (code, _, err) = tcpmgm(&["check", "--config", &config]);
    assert!(code == 0 && err.contains("1 rules valid"), "{err}");
}

#[tokio::test]
async fn column_renames_with_sqlite() {
    column_renames_are_read(Backend::Sqlite).await;
}

#[tokio::test]
async fn column_renames_with_postgres() {
    column_renames_are_read(Backend::Postgres).await;
}

#[tokio::test]
async fn column_renames_with_mariadb() {
    column_renames_are_read(Backend::MariaDb).await;
}

/// End to end: `run --opensips-cfg` with a `keepidle_col` rename gives the connections the
/// renamed column's value.
#[tokio::test]
async fn run_honours_a_column_rename() {
    let db = TestDb::new(Backend::Sqlite, TableVersion::V1, RENAMED_SQL).await;
    let scratch = Scratch::new("renames-run");
    let cfg = scratch.write("opensips.cfg", &renaming_cfg(&db.url));
    let sb = Sandbox::new();
    let d = Daemon::start_args(&sb, control_socket(&sb), &["--opensips-cfg", &cfg]);
    let mut p = sb.probe();
    let r = p.ask("pair 127.0.0.1:5070 127.0.0.1:5070 127.0.0.1:0");
    assert_eq!(
        (r.keepalive("server").1, r.keepalive("client").1),
        (41, 41),
        "{r:?}; daemon: {}",
        d.startup_log
    );
}

/// A `_col` parameter tcpmgm cannot follow is an error naming its line.
#[test]
fn column_renames_that_cannot_be_followed_name_the_line() {
    let scratch = Scratch::new("renames-errors");
    for (param, value, says) in [
        ("direction_col", "\"dir\"", "no direction column"),
        ("keepidle_col", "KA_COL", "not a quoted string"),
        ("keepidle_col", "\"ka-idle\"", "plain SQL name"),
        ("flavour_col", "\"f\"", "not a column of the tcp_mgm table"),
    ] {
        let cfg = scratch.write(
            "bad.cfg",
            &format!(
                "db_default_url=\"sqlite:///nonexistent.db\"\n\nmodparam(\"tcp_mgm\", \"{param}\", {value})\n"
            ),
        );
        let (code, _, err) = tcpmgm(&["check", "--opensips-cfg", &cfg]);
        assert!(
            code == 78 && err.contains(&format!("{cfg}:3: ")) && err.contains(says),
            "{param} {value}: {err}"
        );
    }
}
