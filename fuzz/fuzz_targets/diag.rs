//! The sock_diag dump parser, on whatever bytes a netlink answer may hold (the first byte
//! picks the address family).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tcpmgm::kernel::diag::parse_dump;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, dump)) = data.split_first() else {
        return;
    };
    let family = if pick & 1 == 0 {
        libc::AF_INET
    } else {
        libc::AF_INET6
    } as u8;
    if let Ok(sockets) = parse_dump(dump, family) {
        for s in sockets {
            let _ = (s.established(), s.listening(), s.idle_ms());
            assert_eq!(s.local.is_ipv4(), family == libc::AF_INET as u8);
        }
    }
});
