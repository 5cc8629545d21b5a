//! Reloads that read only the changed rows (the SQLite change log `tcpmgm db init` installs,
//! PostgreSQL's notifications of the rows a commit changed) against full reloads of the same
//! table: after every reload of a seeded random sequence of
//! changes, the policy maps the kernel holds (read with bpftool, each rank resolved to its rule
//! id and profile) must be what `tcpmgm reload --full` then makes of the table, and a new
//! connection must carry the loopback rule's profile as the table has it.
//!
//! `TCPMGM_SEED=<n>` replays one run.
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use ipnet::{Ipv4Net, Ipv6Net};

use tcpmgm::policy::source::TableVersion;
use tcpmgm_tests::{Backend, Daemon, Rng, Sandbox, TestDb, bpftool_batch, control_socket, run_sql};

const RULES: usize = 200;
const STEPS: usize = 30;

/// The policy maps in force, as bpftool shows them from the pins: each map's entries (raw key
/// and value bytes) sorted; the ranks with their profiles' bytes in place of their indexes (a
/// full reload numbers the shared profiles anew); the header's flags and generation.
#[derive(Debug, PartialEq, Eq)]
struct Maps {
    generation: u64,
    flags: u64,
    entries: BTreeMap<String, Vec<String>>,
}

/// Every policy map's entries, by name, from one `bpftool batch` run.
fn dump(sb: &Sandbox) -> BTreeMap<String, Vec<serde_json::Value>> {
    let commands: Vec<String> = MAPS
        .iter()
        .map(|name| format!("map dump pinned {}", sb.pin_dir.join(name).display()))
        .collect();
    MAPS.iter()
        .zip(bpftool_batch(&commands))
        .map(|(name, entries)| {
            let entries = entries.as_array().cloned().expect("each map's entries");
            (name.to_string(), entries)
        })
        .collect()
}

/// The generation in force, from the header map alone.
fn generation(sb: &Sandbox) -> u64 {
    let header = bpftool_batch(&[format!(
        "map dump pinned {}",
        sb.pin_dir.join("TCPMGM_HEADER").display()
    )]);
    header[0][0]["formatted"]["value"]["generation"]
        .as_u64()
        .expect("generation")
}

const MAPS: [&str; 12] = [
    "TCPMGM_HEADER",
    "TCPMGM_PROFILES",
    "TCPMGM_RANKS",
    "TCPMGM_LISTS",
    "TCPMGM_BUCKETS",
    "TCPMGM_LISTENERS",
    "TCPMGM_HOST_V4",
    "TCPMGM_HOST_V6",
    "TCPMGM_REMOTE_V4",
    "TCPMGM_REMOTE_V6",
    "TCPMGM_LOCAL_V4",
    "TCPMGM_LOCAL_V6",
];

fn bytes(v: &serde_json::Value) -> String {
    v.as_array()
        .expect("bytes")
        .iter()
        .map(|b| b.as_str().expect("0x..").trim_start_matches("0x"))
        .collect()
}

fn maps(sb: &Sandbox) -> Maps {
    let all = dump(sb);
    let mut entries = BTreeMap::new();
    for (name, list) in &all {
        if ["TCPMGM_HEADER", "TCPMGM_PROFILES", "TCPMGM_RANKS"].contains(&name.as_str()) {
            continue;
        }
        let mut list: Vec<String> = list
            .iter()
            .map(|e| format!("{} {}", bytes(&e["key"]), bytes(&e["value"])))
            .collect();
        list.sort();
        entries.insert(name.clone(), list);
    }
    let profiles = &all["TCPMGM_PROFILES"];
    let ranks = all["TCPMGM_RANKS"]
        .iter()
        .map(|e| {
            let v = &e["formatted"]["value"];
            let profile = v["profile"].as_u64().expect("profile") as usize;
            format!(
                "rank {} rule {} profile {}",
                e["formatted"]["key"],
                v["rule_id"],
                bytes(&profiles[profile]["value"])
            )
        })
        .collect();
    entries.insert("ranks".to_owned(), ranks);
    let header = &all["TCPMGM_HEADER"][0]["formatted"]["value"];
    Maps {
        generation: header["generation"].as_u64().expect("generation"),
        flags: header["flags"].as_u64().expect("flags"),
        entries,
    }
}

/// One random rule of the table, as an INSERT's columns and values. None of them matches
/// loopback, which rule 1 governs alone.
fn random_rule(rng: &mut Rng, id: usize) -> String {
    let v4 = Ipv4Addr::new(
        10,
        rng.below(4) as u8,
        rng.below(8) as u8,
        rng.below(256) as u8,
    );
    let v6 = Ipv6Addr::new(
        0x2001,
        0xdb8,
        rng.below(16) as u16,
        0,
        0,
        0,
        0,
        rng.below(4000) as u16,
    );
    let remote = match rng.below(4) {
        0 => v4.to_string(),
        1 => Ipv4Net::new(v4, 8 + rng.below(24) as u8)
            .unwrap()
            .trunc()
            .to_string(),
        2 => Ipv6Net::new(v6, 36 + rng.below(92) as u8)
            .unwrap()
            .trunc()
            .to_string(),
        _ => v6.to_string(),
    };
    let remote = format!("'{remote}'");
    format!(
        "INSERT INTO tcp_mgm (id, proto, remote_addr, remote_port, priority, {}) VALUES ({id}, '{}', {remote}, {}, {}, {});",
        PROFILE_COLUMNS.join(", "),
        rng.pick(&["any", "tcp", "tls", "ws", "wss"]),
        rng.pick(&[0, 5060, 5061]),
        rng.below(4),
        random_profile(rng).join(", ")
    )
}

const PROFILE_COLUMNS: [&str; 9] = [
    "keepidle",
    "keepinterval",
    "keepcount",
    "keepalive",
    "connect_timeout",
    "no_new_conn",
    "con_lifetime",
    "msg_read_timeout",
    "send_threshold",
];

fn random_profile(rng: &mut Rng) -> Vec<String> {
    [
        1 + rng.below(7200),
        1 + rng.below(75),
        1 + rng.below(9),
        rng.below(2),
        rng.pick(&[0, 100, 500, 2000]),
        rng.below(2),
        rng.pick(&[0, 30, 120]),
        rng.pick(&[0, 4]),
        rng.pick(&[0, 1000]),
    ]
    .iter()
    .map(usize::to_string)
    .collect()
}

fn set_profile(rng: &mut Rng, id: usize) -> String {
    let set: Vec<String> = PROFILE_COLUMNS
        .iter()
        .zip(random_profile(rng))
        .map(|(c, v)| format!("{c} = {v}"))
        .collect();
    format!("UPDATE tcp_mgm SET {} WHERE id = {id};", set.join(", "))
}

/// A reload as the backend's daemon makes it: `tcpmgm reload` for SQLite (whose change log
/// says which rows changed); for PostgreSQL, the one its notification of the commit starts (its
/// log line, the `before`th of them being the last before the commit). The reload's report.
fn reload(daemon: &Daemon, backend: Backend, before: usize) -> String {
    if backend == Backend::Sqlite {
        let (code, report) = daemon.reload();
        assert_eq!(code, 0, "{report}");
        return report;
    }
    let start = Instant::now();
    while daemon.logged("reload: ") == before {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no reload within 30 s of the commit: {:?}",
            daemon.log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = daemon.log.lock().unwrap();
    log.iter()
        .rev()
        .find(|l| l.contains("reload: "))
        .cloned()
        .unwrap()
}

#[tokio::test]
async fn every_incremental_reload_gives_the_maps_of_a_full_reload() {
    incremental(Backend::Sqlite, STEPS).await;
}

#[tokio::test]
async fn every_incremental_reload_from_postgres_notifications_gives_the_maps_of_a_full_reload() {
    incremental(Backend::Postgres, STEPS / 2).await;
}

async fn incremental(backend: Backend, steps: usize) {
    let (seed, mut rng) = Rng::seeded();
    let sb = Sandbox::new();
    let mut table = String::from(
        "INSERT INTO tcp_mgm (id, remote_addr, priority, keepidle, keepinterval, keepcount) \
         VALUES (1, '127.0.0.0/8', 9, 100, 10, 3);",
    );
    for id in 2..=RULES {
        table.push_str(&random_rule(&mut rng, id));
    }
    let db = TestDb::new(backend, TableVersion::V1, &table).await;
    let url = db.url.clone();
    let daemon = Daemon::start(&sb, &url, control_socket(&sb));
    assert!(
        !daemon
            .startup_log
            .contains("each reload reads the whole table"),
        "{}",
        daemon.startup_log
    );
    let mut probe = sb.probe();
    let mut port = 7100;
    let mut ids = RULES;
    let (mut patched, mut whole) = (0, 0);
    for step in 0..steps {
        // Mostly profile changes, as operators make them; now and then one that moves a rule
        // in the match order, adds or removes one, which only a full read can take in.
        let kind = rng.below(10);
        let mut change = String::new();
        let in_place = kind < 7;
        match kind {
            0..7 => {
                // Rule 1 always, for the connection below; a few others.
                let idle = 200 + step;
                change.push_str(&format!(
                    "UPDATE tcp_mgm SET keepidle = {idle} WHERE id = 1;"
                ));
                for _ in 0..rng.below(4) {
                    let id = 2 + rng.below(ids - 1);
                    change.push_str(&set_profile(&mut rng, id));
                }
            }
            7 => {
                let id = 2 + rng.below(ids - 1);
                change = format!(
                    "UPDATE tcp_mgm SET {} WHERE id = {id};",
                    rng.pick(&["remote_port = remote_port + 1", "priority = priority + 1"])
                );
            }
            8 => {
                ids += 1;
                change = random_rule(&mut rng, ids);
            }
            _ => {
                let id = 2 + rng.below(ids - 1);
                change = format!("DELETE FROM tcp_mgm WHERE id = {id};");
            }
        }
        let logged = daemon.logged("reload: ");
        run_sql(&url, &change).await;
        let before = generation(&sb);
        let report = reload(&daemon, backend, logged);
        let after = maps(&sb);
        // A change to a removed row is a change to nothing: no rule changed, no switch.
        let nothing = report.contains("no rule in force changed");
        if in_place {
            assert!(
                report.contains("changed in place"),
                "seed {seed}, step {step}: {change}: {report}"
            );
            patched += 1;
        } else if !nothing {
            assert!(
                !report.contains("in place"),
                "seed {seed}, step {step}: {change}: {report}"
            );
            whole += 1;
        }
        assert_eq!(
            after.generation,
            before + u64::from(!nothing),
            "seed {seed}, step {step}: {report}"
        );
        if in_place {
            port += 1;
            let r = probe.ask(&format!("pair 127.0.0.1:{port} 127.0.0.1:{port}"));
            let want = 200 + step as i64;
            assert_eq!(
                (r.get("client_idle"), r.get("server_idle")),
                (want, want),
                "seed {seed}, step {step}: a new connection after {report}"
            );
        }
        let (code, full) = daemon.reload_with(&["--full"]);
        assert_eq!(code, 0, "seed {seed}, step {step}: {full}");
        assert!(!full.contains("in place"), "{full}");
        let reference = maps(&sb);
        assert_eq!(reference.generation, after.generation + 1, "{full}");
        assert_eq!(
            Maps {
                generation: 0,
                ..after
            },
            Maps {
                generation: 0,
                ..reference
            },
            "seed {seed}, step {step}: after {change} the incremental reload ({report}) and the full one ({full}) differ"
        );
    }
    eprintln!("seed {seed}: {patched} reloads in place, {whole} whole, each equal to a full one");
    assert!(
        patched > 0 && whole > 0,
        "seed {seed}: {patched} in place, {whole} whole"
    );
}
