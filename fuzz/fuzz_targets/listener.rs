//! OpenSIPS `socket=` values, one a line, as `--listener` and `--sockets-from` take them. A
//! listener that parses prints as a spec that parses back to the same listener (the form
//! `tcpmgm` shows and local_addr names).
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use tcpmgm::policy::listener::{Listener, Listeners};

fuzz_target!(|text: &str| {
    let mut all = Listeners::default();
    for line in text.lines() {
        let _ = all.add_socket(line);
        if let Ok(l) = Listener::parse(line) {
            let shown = l.to_string();
            let again = Listener::parse(&shown);
            assert_eq!(
                again.as_ref().ok(),
                Some(&l),
                "{line:?} shown as {shown:?}: {again:?}"
            );
        }
    }
    // Every listener is found by its proto:addr:port name, as a rule's local_addr names it.
    for l in all.iter() {
        let name = format!("{}:{}", l.proto, SocketAddr::new(l.addr, l.port));
        assert!(all.by_name(&name).is_some(), "{name}");
    }
    let _ = all.names();
});
