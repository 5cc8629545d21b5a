//! Test-only fault points in the kernel step, so that the tests can fail a start, an adoption
//! or a reload at each hook and pin and check that nothing was half-applied.
//!
//! `TCPMGM_FAULT=POINT[#N][,POINT[#N]...]` in the daemon's environment makes the Nth time (every
//! time, without `#N`) the code reaches POINT fail with an error naming it. Points are named
//! after the step and, where there is one per hook, the hook: `link-create:tcpmgm_connect4`.
//! Nothing reads the variable when it is unset, which is always outside the tests.
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// The fault points asked for, with how many times each was reached.
struct Faults {
    wanted: Vec<(String, Option<u32>)>,
    reached: Mutex<HashMap<String, u32>>,
}

fn faults() -> &'static Option<Faults> {
    static FAULTS: OnceLock<Option<Faults>> = OnceLock::new();
    FAULTS.get_or_init(|| {
        let spec = std::env::var("TCPMGM_FAULT").ok()?;
        let wanted = spec
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| match s.split_once('#') {
                Some((point, n)) => (point.to_owned(), n.parse().ok()),
                None => (s.to_owned(), None),
            })
            .collect();
        Some(Faults {
            wanted,
            reached: Mutex::default(),
        })
    })
}

/// Fails when the tests asked for a fault at `point` (see the module documentation).
pub fn point(point: &str) -> std::io::Result<()> {
    let Some(f) = faults() else { return Ok(()) };
    let mut reached = f.reached.lock().unwrap_or_else(|e| e.into_inner());
    let n = reached.entry(point.to_owned()).or_default();
    *n += 1;
    let hit = f
        .wanted
        .iter()
        .any(|(p, nth)| p == point && nth.is_none_or(|nth| nth == *n));
    if hit {
        return Err(std::io::Error::other(format!(
            "fault injected at {point} (TCPMGM_FAULT)"
        )));
    }
    Ok(())
}
