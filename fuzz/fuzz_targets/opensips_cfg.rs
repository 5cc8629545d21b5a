//! `--opensips-cfg`: an OpenSIPS configuration file, read as tcpmgm reads it (its settings,
//! then its `socket=` lines as listeners).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tcpmgm::policy::listener::Listeners;
use tcpmgm::policy::opensips_cfg::OpenSipsCfg;

fuzz_target!(|text: &str| {
    let Ok(cfg) = OpenSipsCfg::parse(Path::new("opensips.cfg"), text) else {
        return;
    };
    let _ = cfg.db();
    let _ = cfg.table();
    let mut listeners = Listeners::default();
    for socket in &cfg.sockets {
        assert!(socket.line >= 1 && socket.line <= text.split('\n').count());
        let _ = listeners.add_socket(&socket.value);
    }
});
