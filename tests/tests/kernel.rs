//! The programs in the kernel, checked the way a user would: real connections in a cgroup and
//! network namespace of the test's own, then getsockopt, errno and elapsed time.
use tcpmgm::policy::listener::Listeners;
use tcpmgm_tests::{Sandbox, row, rules};

const EPERM: i64 = 1;
const ETIMEDOUT: i64 = 110;

/// The kernel's own defaults in a fresh network namespace.
const DEFAULTS: (i64, i64, i64, i64) = (0, 7200, 75, 9);

#[test]
fn keepalive_on_both_ends_for_ipv4_ipv6_and_v4_mapped() {
    let sb = Sandbox::new();
    sb.netns.add_local(&["2001:db8::1"]);
    let none = Listeners::default();
    let table = [
        row(
            1,
            &[
                ("remote_addr", "127.0.0.0/8"),
                ("keepidle", "31"),
                ("keepinterval", "11"),
                ("keepcount", "4"),
            ],
        ),
        row(
            2,
            &[
                ("remote_addr", "2001:db8::/64"),
                ("keepidle", "32"),
                ("keepinterval", "12"),
                ("keepcount", "5"),
            ],
        ),
    ];
    let _e = sb.enforce(rules(&table, &none), &none);
    let mut p = sb.probe();

    let v4 = p.ask("pair 127.0.0.1:7001 127.0.0.1:7001");
    assert_eq!(v4.keepalive("client"), (1, 31, 11, 4), "{v4:?}");
    assert_eq!(v4.keepalive("server"), (1, 31, 11, 4), "{v4:?}");

    let v6 = p.ask("pair [2001:db8::1]:7002 [2001:db8::1]:7002");
    assert_eq!(v6.keepalive("client"), (1, 32, 12, 5), "{v6:?}");
    assert_eq!(v6.keepalive("server"), (1, 32, 12, 5), "{v6:?}");

    // An AF_INET6 client and a dual-stack listener: both sockets see ::ffff:127.0.0.1.
    let mapped = p.ask("pair [::]:7003 [::ffff:127.0.0.1]:7003");
    assert_eq!(mapped.keepalive("client"), (1, 31, 11, 4), "{mapped:?}");
    assert_eq!(mapped.keepalive("server"), (1, 31, 11, 4), "{mapped:?}");
}

#[test]
fn unmatched_connections_keep_the_system_defaults() {
    let sb = Sandbox::new();
    sb.netns.add_local(&["2001:db8::1"]);
    let none = Listeners::default();
    let table = [
        row(1, &[("remote_addr", "198.51.100.0/24"), ("keepidle", "31")]),
        row(
            2,
            &[
                ("remote_addr", "2001:db8:ffff::/48"),
                ("keepidle", "32"),
                ("no_new_conn", "1"),
            ],
        ),
        row(3, &[("remote_port", "9999"), ("keepidle", "33")]),
    ];
    let _e = sb.enforce(rules(&table, &none), &none);
    let mut p = sb.probe();
    for (listen, connect) in [
        ("127.0.0.1:7001", "127.0.0.1:7001"),
        ("[2001:db8::1]:7002", "[2001:db8::1]:7002"),
        ("[::]:7003", "[::ffff:127.0.0.1]:7003"),
    ] {
        let r = p.ask(&format!("pair {listen} {connect}"));
        assert_eq!(r.keepalive("client"), DEFAULTS, "{connect}: {r:?}");
        assert_eq!(r.keepalive("server"), DEFAULTS, "{connect}: {r:?}");
        assert_eq!(r.get("client_user_timeout"), 0, "{r:?}");
    }
}

#[test]
fn keepalive_zero_turns_keepalive_off() {
    let sb = Sandbox::new();
    let none = Listeners::default();
    let table = [row(1, &[("remote_addr", "127.0.0.2"), ("keepalive", "0")])];
    let _e = sb.enforce(rules(&table, &none), &none);
    let mut p = sb.probe();
    // The application turns SO_KEEPALIVE on itself (client before connect, and the listener).
    let off = p.ask("pair 127.0.0.2:7001 127.0.0.2:7001 127.0.0.2:0 ka");
    assert_eq!(off.get("client_keepalive"), 0, "{off:?}");
    assert_eq!(off.get("server_keepalive"), 0, "{off:?}");
    // The same application towards an address without a rule keeps its keepalive.
    let on = p.ask("pair 127.0.0.3:7001 127.0.0.3:7001 127.0.0.3:0 ka");
    assert_eq!(on.get("client_keepalive"), 1, "{on:?}");
    assert_eq!(on.get("server_keepalive"), 1, "{on:?}");
}

#[test]
fn no_new_conn_refuses_connect_but_not_accepted_connections() {
    let sb = Sandbox::new();
    sb.netns.add_local(&["2001:db8::1", "2001:db8::2"]);
    let none = Listeners::default();
    let table = [
        row(
            1,
            &[
                ("remote_addr", "127.0.0.2"),
                ("no_new_conn", "1"),
                ("keepidle", "41"),
            ],
        ),
        row(
            2,
            &[
                ("remote_addr", "2001:db8::2"),
                ("no_new_conn", "1"),
                ("keepidle", "42"),
            ],
        ),
    ];
    let _e = sb.enforce(rules(&table, &none), &none);
    let mut p = sb.probe();

    assert_eq!(
        p.ask("pair 127.0.0.2:7001 127.0.0.2:7001").get("errno"),
        EPERM
    );
    assert_eq!(
        p.ask("pair [2001:db8::2]:7002 [2001:db8::2]:7002")
            .get("errno"),
        EPERM
    );
    assert_eq!(
        p.ask("pair [::]:7003 [::ffff:127.0.0.2]:7003").get("errno"),
        EPERM
    );

    // The refused peer connecting in: accepted, with its rule's keepalive on the server side.
    let inbound = p.ask("pair 127.0.0.1:7004 127.0.0.1:7004 127.0.0.2:0");
    assert!(!inbound.has("errno"), "{inbound:?}");
    assert_eq!(inbound.get("server_idle"), 41, "{inbound:?}");
    assert_eq!(inbound.keepalive("client"), DEFAULTS, "{inbound:?}");
    let inbound6 = p.ask("pair [2001:db8::1]:7005 [2001:db8::1]:7005 [2001:db8::2]:0");
    assert_eq!(inbound6.get("server_idle"), 42, "{inbound6:?}");
}

#[test]
fn bpftool_dump_shows_field_names() {
    let sb = Sandbox::new();
    let none = Listeners::default();
    let table = [row(
        7,
        &[("remote_addr", "192.0.2.0/24"), ("keepidle", "1234")],
    )];
    let _e = sb.enforce(rules(&table, &none), &none);
    let dump = |map: &str| {
        tcpmgm_tests::sh(
            std::process::Command::new("bpftool")
                .args(["map", "dump", "pinned"])
                .arg(sb.pin_dir.join(map)),
        )
    };
    let ranks = dump("TCPMGM_RANKS");
    for field in ["\"rule_id\": 7", "\"profile\": 0"] {
        assert!(ranks.contains(field), "{field} not in:\n{ranks}");
    }
    let profiles = dump("TCPMGM_PROFILES");
    for field in [
        "\"keepidle\": 1234",
        "\"connect_timeout_ms\": 100",
        "\"flags\"",
    ] {
        assert!(profiles.contains(field), "{field} not in:\n{profiles}");
    }
    let trie = dump("TCPMGM_REMOTE_V4");
    assert!(trie.contains("\"prefix_len\": 24"), "{trie}");
    let lists = dump("TCPMGM_LISTS");
    for field in ["\"shapes\"", "\"parent\"", "\"floor\""] {
        assert!(lists.contains(field), "{field} not in:\n{lists}");
    }
    let buckets = dump("TCPMGM_BUCKETS");
    assert!(
        buckets.contains("\"remote_port\"") && buckets.contains("\"best\""),
        "{buckets}"
    );
}

mod timeout {
    use super::*;
    use tcpmgm_tests::{Probe, two_hosts};

    #[test]
    fn connect_timeout_bounds_a_silent_handshake() {
        silent_handshake("192.0.2.3", "192.0.2.3");
    }

    #[test]
    fn connect_timeout_bounds_a_silent_ipv6_handshake() {
        silent_handshake("2001:db8:2::3", "[2001:db8:2::3]");
    }

    /// A rule with connect_timeout 150 ms for the silent peer `peer` (`host` as a socket
    /// address writes it), port 5060.
    fn silent_handshake(peer: &str, host: &str) {
        let sb = Sandbox::new();
        let _b = two_hosts(&sb);
        let none = Listeners::default();
        let table = [row(
            1,
            &[
                ("remote_addr", peer),
                ("remote_port", "5060"),
                ("connect_timeout", "150"),
            ],
        )];
        let _e = sb.enforce(rules(&table, &none), &none);
        let mut p = sb.probe();

        let r = p.ask(&format!("connect {host}:5060 - 3000"));
        assert_eq!(r.get("errno"), ETIMEDOUT, "{r:?}");
        let ms = r.get("ms");
        assert!(
            (140..400).contains(&ms),
            "failed after {ms} ms, expected about 150: {r:?}"
        );

        // The same silent peer on another port has no rule: still trying after 1.5 s.
        let control = p.ask(&format!("connect {host}:5070 - 1500"));
        assert_eq!(control.get("pending"), 1, "{control:?}");
    }

    #[test]
    fn an_established_connection_is_not_cut_by_the_connect_timeout() {
        let sb = Sandbox::new();
        let (b, dev) = two_hosts(&sb);
        let none = Listeners::default();
        let table = [row(
            1,
            &[("remote_addr", "192.0.2.2"), ("connect_timeout", "150")],
        )];
        let _e = sb.enforce(rules(&table, &none), &none);
        let mut server = Probe::spawn(None, &b.path());
        assert!(
            server
                .ask("serve 192.0.2.2:5060")
                .0
                .contains_key("listening")
        );
        let cut = || {
            sb.netns.ip(&format!(
                "neigh replace 192.0.2.2 lladdr 02:00:00:00:00:99 dev {dev} nud permanent"
            ))
        };
        let heal = || sb.netns.ip(&format!("neigh del 192.0.2.2 dev {dev}"));

        // Established, then the peer goes silent while data is outstanding: the connection
        // must outlive the 150 ms connect timeout.
        let mut p = sb.probe();
        let r = p.ask("hold 192.0.2.2:5060");
        assert_eq!(
            r.get("client_user_timeout"),
            0,
            "TCP_USER_TIMEOUT left set after the handshake: {r:?}"
        );
        cut();
        let after = p.ask("go");
        assert_eq!(
            (after.0["alive"].as_str(), after.get("so_error")),
            ("true", 0),
            "{after:?}"
        );
        heal();

        // An application's own TCP_USER_TIMEOUT is left alone, and this same check catches it
        // cutting the connection.
        let mut q = sb.probe();
        let r = q.ask("hold 192.0.2.2:5060 200");
        assert_eq!(r.get("client_user_timeout"), 200, "{r:?}");
        cut();
        let after = q.ask("go");
        assert_eq!(
            (after.0["alive"].as_str(), after.get("so_error")),
            ("false", ETIMEDOUT),
            "{after:?}"
        );
    }
}

/// The application that owns a socket reads its rule and whole profile, attrs included; a socket
/// without a rule has none.
#[test]
fn the_owner_of_a_socket_reads_its_profile() {
    let sb = Sandbox::new();
    let none = Listeners::default();
    let table = [
        row(
            12,
            &[
                ("remote_addr", "127.0.0.2"),
                ("keepidle", "44"),
                ("msg_read_timeout", "9"),
                ("send_threshold", "250000"),
                ("alias_mode", "2"),
                ("attrs", "max_msg_chunks=8;tenant=3"),
            ],
        ),
        row(
            13,
            &[
                ("remote_addr", "127.0.0.1"),
                ("remote_port", "0"),
                ("keepidle", "45"),
            ],
        ),
    ];
    let _e = sb.enforce(rules(&table, &none), &none);
    let mut p = sb.probe();
    // From 127.0.0.1 to 127.0.0.2: the client meets rule 12, the accepted socket rule 13.
    let r = p.ask("profiles 127.0.0.2:7001 127.0.0.2:7001 127.0.0.1:0");
    assert_eq!(r.get("client_rule"), 12, "{r:?}");
    assert_eq!(
        (r.get("client_read_timeout"), r.get("client_send_threshold")),
        (9, 250000),
        "{r:?}"
    );
    assert_eq!(
        (r.get("client_alias_mode"), r.get("client_idle")),
        (2, 44),
        "{r:?}"
    );
    assert_eq!(r.0["client_attrs"], "max_msg_chunks:8,tenant:3", "{r:?}");
    assert_eq!(
        (r.get("server_rule"), r.get("server_idle")),
        (13, 45),
        "{r:?}"
    );
    assert_eq!(r.0["server_attrs"], "-");
    // Between addresses without rules: nothing recorded.
    let r = p.ask("profiles 127.0.0.3:7002 127.0.0.3:7002 127.0.0.3:0");
    assert_eq!(
        (r.get("client_rule"), r.get("server_rule")),
        (0, 0),
        "{r:?}"
    );
}

/// `tcpmgm conns` lists the cgroup's connections with the rule and profile the API reads.
#[test]
fn conns_lists_each_connection_with_its_rule() {
    let sb = Sandbox::new();
    let none = Listeners::default();
    let table = [row(
        21,
        &[
            ("remote_addr", "127.0.0.2"),
            ("keepidle", "46"),
            ("attrs", "tenant=7"),
        ],
    )];
    let _e = sb.enforce(rules(&table, &none), &none);
    let mut p = sb.probe();
    let held = p
        .ask("hold-pair 127.0.0.2:7021 127.0.0.2:7021 127.0.0.1:0")
        .get("id");
    p.ask("hold-pair 127.0.0.3:7022 127.0.0.3:7022 127.0.0.1:0");
    let list = sb.conns();
    let find = |remote: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|c| c["remote"] == remote)
            .unwrap_or_else(|| panic!("{remote} in {list:#}"))
            .clone()
    };
    let ruled = find("127.0.0.2:7021");
    assert_eq!(ruled["profile"]["rule_id"], 21, "{ruled:#}");
    assert_eq!(ruled["profile"]["keepidle"], 46);
    assert_eq!(
        ruled["profile"]["attrs"],
        serde_json::json!([["tenant", 7]])
    );
    assert_eq!(ruled["established"], true);
    // The application, asking about the same socket, reads the same profile.
    let api = p.ask(&format!("profile {held}"));
    let api: serde_json::Value = serde_json::from_str(&api.0["client_profile"]).unwrap();
    assert_eq!(api, ruled["profile"], "the API and conns disagree");
    assert!(find("127.0.0.3:7022")["profile"].is_null(), "{list:#}");
    // Listening sockets and the accepted ends are listed too; nothing outside the cgroup is.
    assert!(list.as_array().unwrap().len() >= 4, "{list:#}");
}

/// sock_diag as tcpmgm parses it, on this kernel's own messages: each socket with its addresses,
/// state, inode, cgroup and tcpmgm record, for an IPv4 dump and an IPv6 one (which holds the
/// AF_INET6 sockets, v4-mapped ones included). With TCPMGM_WRITE_TESTDATA=1 the dumps are also
/// written to `tcpmgm-user/testdata/sock_diag_v4.bin` and `sock_diag_v6.bin`, which the
/// parser's unit tests read.
#[test]
fn sock_diag_answers_parse_into_sockets_with_their_records() {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    use tcpmgm::kernel::diag::{Socket, dump, parse_dump};
    let sb = Sandbox::new();
    let none = Listeners::default();
    // IPv6 has one loopback address, so the IPv6 rule tells its two connections apart by port.
    let table = [
        row(21, &[("remote_addr", "127.0.0.2"), ("keepidle", "46")]),
        row(
            31,
            &[
                ("remote_addr", "::1"),
                ("remote_port", "7031"),
                ("keepidle", "47"),
            ],
        ),
    ];
    let _e = sb.enforce(rules(&table, &none), &none);
    let mut p = sb.probe();
    p.ask("hold-pair 127.0.0.2:7021 127.0.0.2:7021 127.0.0.1:0");
    p.ask("hold-pair 127.0.0.3:7022 127.0.0.3:7022 127.0.0.1:0");
    p.ask("hold-pair [::1]:7031 [::1]:7031 [::1]:0");
    p.ask("hold-pair [::1]:7032 [::1]:7032 [::1]:0");
    // An AF_INET6 client to a dual-stack listener over IPv4: both ends are AF_INET6 sockets with
    // v4-mapped addresses, so they are in the IPv6 dump, and the IPv4 rule is theirs.
    p.ask("hold-pair [::]:7023 [::ffff:127.0.0.2]:7023 [::ffff:127.0.0.1]:0");
    let map = aya::maps::MapData::from_pin(sb.pin_dir.join(tcpmgm::kernel::SOCKETS_PIN)).unwrap();
    let netns = sb.netns.path();
    let (af_inet, af_inet6) = (libc::AF_INET as u8, libc::AF_INET6 as u8);
    let (raw4, raw6) = std::thread::scope(|s| {
        s.spawn(|| {
            tcpmgm::netns::enter(std::path::Path::new(&netns)).unwrap();
            let fd = map.fd().as_fd();
            (
                dump(Some(fd), af_inet).unwrap(),
                dump(Some(fd), af_inet6).unwrap(),
            )
        })
        .join()
        .unwrap()
    });
    let cgroup = std::fs::metadata(&sb.cgroup).unwrap().ino();
    /// The socket from `local` to `remote` in a dump.
    fn between<'a>(sockets: &'a [Socket], local: &str, remote: &str) -> &'a Socket {
        sockets
            .iter()
            .find(|s| s.local.to_string() == local && s.remote.to_string() == remote)
            .unwrap_or_else(|| panic!("{local} -> {remote} in {sockets:#?}"))
    }

    /// A connection of `hold-pair LISTEN REMOTE` in a dump, checked: its listener listens, and the
    /// client and accepted ends are established in the cgroup `cgroup`. Returns (client, accepted).
    fn held<'a>(
        sockets: &'a [Socket],
        cgroup: u64,
        listen: &str,
        remote: &str,
    ) -> (&'a Socket, &'a Socket) {
        let wildcard = if listen.starts_with('[') {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        };
        assert!(between(sockets, listen, wildcard).listening());
        let client = sockets
            .iter()
            .find(|s| s.remote.to_string() == remote)
            .unwrap_or_else(|| panic!("the client to {remote} in {sockets:#?}"));
        let server = between(sockets, remote, &client.local.to_string());
        for end in [client, server] {
            assert!(end.established(), "{end:?}");
            assert_eq!(end.cgroup_id, Some(cgroup), "{end:?}");
            assert_ne!(end.inode, 0, "{end:?}");
        }
        (client, server)
    }

    let v4 = parse_dump(&raw4, af_inet).unwrap();
    let (client, server) = held(&v4, cgroup, "127.0.0.2:7021", "127.0.0.2:7021");
    // The client's peer is the rule's; the accepted end's peer, 127.0.0.1, is no rule's (and
    // accepted sockets are recorded only when a rule matched).
    assert_eq!(
        client.record.map(|r| r.profile.rule_id),
        Some(21),
        "{client:?}"
    );
    assert_eq!(server.record.map(|r| r.state), None, "{server:?}");
    // An outbound socket no rule matched costs no storage either.
    let (unruled, _) = held(&v4, cgroup, "127.0.0.3:7022", "127.0.0.3:7022");
    assert_eq!(unruled.record.map(|r| r.state), None, "{unruled:?}");

    let v6 = parse_dump(&raw6, af_inet6).unwrap();
    let (client, server) = held(&v6, cgroup, "[::1]:7031", "[::1]:7031");
    assert_eq!(
        client
            .record
            .map(|r| (r.state, r.profile.rule_id, r.profile.keepidle)),
        Some((tcpmgm_common::SOCK_RULE, 31, 47)),
        "{client:?}"
    );
    // The accepted end's peer is ::1 too, but from an ephemeral port, not the rule's.
    assert_eq!(server.record.map(|r| r.state), None, "{server:?}");
    let (unruled, _) = held(&v6, cgroup, "[::1]:7032", "[::1]:7032");
    assert_eq!(unruled.record.map(|r| r.state), None, "{unruled:?}");
    let (mapped, accepted) = held(&v6, cgroup, "[::]:7023", "[::ffff:127.0.0.2]:7023");
    assert_eq!(
        mapped.record.map(|r| r.profile.rule_id),
        Some(21),
        "{mapped:?}"
    );
    assert_eq!(accepted.record.map(|r| r.state), None, "{accepted:?}");
    // Neither end of the v4-mapped connection is in the IPv4 dump: a dump is by socket family.
    assert!(
        !v4.iter()
            .any(|s| s.local.port() == 7023 || s.remote.port() == 7023),
        "{v4:#?}"
    );

    if std::env::var_os("TCPMGM_WRITE_TESTDATA").is_some() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tcpmgm-user/testdata");
        std::fs::create_dir_all(&dir).unwrap();
        for (name, raw) in [("sock_diag_v4.bin", &raw4), ("sock_diag_v6.bin", &raw6)] {
            let path = dir.join(name);
            std::fs::write(&path, raw).unwrap();
            eprintln!("wrote {} ({} bytes)", path.display(), raw.len());
        }
    }
}
