//! The con_lifetime sweeper's statistics per rule (idle connections closed, and in audit mode
//! those it would have closed), pinned beside the policy so that `status` reads them from the
//! kernel whichever process swept.
use std::path::Path;

use aya::maps::{HashMap, MapData, MapError};
use tcpmgm_common::{SWEEP_STATS_PIN, SweepStats};

/// How many rule ids the sweeper's statistics hold at first; they double when full (the
/// kernel sizes a hash map's buckets by its maximum, so a map sized for every possible rule
/// would cost 64 MiB whatever the table).
const SWEEP_STATS_FIRST: u32 = 1024;

/// The sweeper's statistics, pinned at `SWEEP_STATS_PIN` in `pin_dir`; made when missing and
/// `or_create`.
pub fn open(
    pin_dir: &Path,
    or_create: bool,
) -> Result<HashMap<MapData, u32, SweepStats>, MapError> {
    let pin = pin_dir.join(SWEEP_STATS_PIN);
    match MapData::from_pin(&pin) {
        Ok(m) => HashMap::try_from(aya::maps::Map::HashMap(m)),
        Err(e) if !or_create => Err(e),
        Err(_) => create(&pin, SWEEP_STATS_FIRST),
    }
}

fn create(pin: &Path, entries: u32) -> Result<HashMap<MapData, u32, SweepStats>, MapError> {
    const BPF_F_NO_PREALLOC: u32 = 1;
    let m = HashMap::<MapData, u32, SweepStats>::create(entries, BPF_F_NO_PREALLOC)?;
    // Only this daemon writes the map: replacing the pin is all it takes to grow it.
    let _ = std::fs::remove_file(pin);
    aya::maps::IterableMap::map(&m)
        .pin(pin)
        .map_err(|e| MapError::PinError {
            name: Some(SWEEP_STATS_PIN.into()),
            error: e,
        })?;
    Ok(m)
}

/// Adds to rule `rule`'s sweep counts, doubling the map (pinned in its place) when it is full.
pub fn count(
    pin_dir: &Path,
    stats: &mut HashMap<MapData, u32, SweepStats>,
    rule: u32,
    bump: fn(&mut SweepStats),
) -> Result<(), MapError> {
    let mut now = stats.get(&rule, 0).unwrap_or_default();
    bump(&mut now);
    match stats.insert(rule, now, 0) {
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::E2BIG) => {
            let size = aya::maps::IterableMap::map(stats)
                .info()?
                .max_entries()
                .saturating_mul(2);
            let mut bigger = create(&pin_dir.join(SWEEP_STATS_PIN), size)?;
            for entry in stats.iter() {
                let (id, counts) = entry?;
                bigger.insert(id, counts, 0)?;
            }
            bigger.insert(rule, now, 0)?;
            *stats = bigger;
            Ok(())
        }
        other => other,
    }
}
