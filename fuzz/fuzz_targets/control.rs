//! The control socket's request parser, on whatever a client may send: it must not panic, and
//! what it quotes back must stay short.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tcpmgm::daemon::control::{ProtocolError, parse_request};

fuzz_target!(|line: &[u8]| {
    match parse_request(line) {
        Ok(_) => {}
        Err(e @ ProtocolError::Unknown(_)) => {
            // The reason quotes at most 100 characters, each escaped to at most 10 (\u{10ffff}).
            let reason = e.to_string();
            assert!(reason.len() < 1100, "{} bytes", reason.len());
            assert!(!reason.contains('\n'), "{reason:?}");
        }
        Err(_) => {}
    }
});
