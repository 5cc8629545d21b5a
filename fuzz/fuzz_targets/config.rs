//! The configuration file (TOML), overlaid with arbitrary command-line flags and turned into
//! what `tcpmgm run` takes from it: none of it may panic.
#![no_main]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use tcpmgm::config::{
    AppOptions, Config, DB_TIMEOUT, LogFormat, MetricsRules, POLL_INTERVAL, RunFlags,
};

/// `RunFlags`, as a command line may give them.
#[derive(Arbitrary, Debug)]
struct Flags {
    cgroup: Option<String>,
    bools: [Option<bool>; 7],
    pin_dir: Option<String>,
    control: Option<String>,
    /// As typed on the command line, through its parser.
    poll_interval: Option<String>,
    netns: Option<String>,
    db_timeout: Option<String>,
    app_options_allow: Option<bool>,
    metrics: Option<SocketAddr>,
    /// nonzero, all, none.
    metrics_rules: Option<u8>,
    api_group: Option<String>,
    log_json: Option<bool>,
}

// The file's text up to the first NUL (so that a plain config file is a seed), the flags from
// what follows.
fuzz_target!(|data: &[u8]| {
    let (text, rest) = match data.iter().position(|&b| b == 0) {
        Some(nul) => (&data[..nul], &data[nul + 1..]),
        None => (data, &[][..]),
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let Ok(f) = Flags::arbitrary_take_rest(Unstructured::new(rest)) else {
        return;
    };
    let Ok(config) = Config::parse(Path::new("tcpmgm.toml"), text) else {
        return;
    };
    let [
        skip_invalid,
        create_cgroup,
        detach_on_exit,
        enforce_default_lifetime,
        reapply_existing,
        audit,
        enforce_default_connect_timeout,
    ] = f.bools;
    let given = RunFlags {
        cgroup: f.cgroup.map(PathBuf::from),
        skip_invalid,
        pin_dir: f.pin_dir.map(PathBuf::from),
        create_cgroup,
        control: f.control.map(PathBuf::from),
        detach_on_exit,
        poll_interval: f.poll_interval.and_then(|t| POLL_INTERVAL.parse(&t).ok()),
        netns: f.netns.map(PathBuf::from),
        enforce_default_lifetime,
        reapply_existing,
        db_timeout: f.db_timeout.and_then(|t| DB_TIMEOUT.parse(&t).ok()),
        audit,
        app_options: f.app_options_allow.map(|allow| {
            if allow {
                AppOptions::Allow
            } else {
                AppOptions::Enforce
            }
        }),
        enforce_default_connect_timeout,
        metrics: f.metrics,
        metrics_rules: f.metrics_rules.map(|r| match r % 3 {
            0 => MetricsRules::Nonzero,
            1 => MetricsRules::All,
            _ => MetricsRules::None,
        }),
        api_group: f.api_group,
        log_format: f.log_json.map(|json| {
            if json {
                LogFormat::Json
            } else {
                LogFormat::Text
            }
        }),
    };
    for config in [config.clone(), config.overlay(&given)] {
        let _ = config.enforcement();
    }
});
