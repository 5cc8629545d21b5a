//! One generation: the policy maps of one rule set, each sized to its contents and filled,
//! ready to be installed into the programs' arrays of maps (see `programs`).
//!
//! The maps are made from the object's own declarations and BTF (see `programs::Templates`), so
//! they carry the field names bpftool prints.
use std::collections::HashMap as Maps;
use std::os::fd::AsFd as _;
use std::path::Path;

use aya::Pod;
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, IterableMap, Map, MapData};
use ipnet::IpNet;
use tcpmgm_common::{Header, LocalKey4, LocalKey6, names};

use super::programs::Templates;
use super::{KernelError, sys};
use crate::compile::Policy;

pub struct Generation {
    pub(super) number: u32,
    maps: Maps<&'static str, Map>,
}

fn map_err(map: &'static str, what: impl Into<String>) -> impl FnOnce(String) -> KernelError {
    let what = what.into();
    move |reason| KernelError::Map { map, what, reason }
}

impl Generation {
    /// Makes and fills the maps of `policy` as generation `number`.
    pub(super) fn build(
        policy: &Policy,
        templates: &Templates,
        number: u32,
    ) -> Result<Generation, KernelError> {
        let started = std::time::Instant::now();
        let count = |prefixes: &[(IpNet, u32)], full: u8| {
            let hosts = prefixes
                .iter()
                .filter(|(n, _)| n.prefix_len() == full)
                .count();
            (hosts, prefixes.len() - hosts)
        };
        let (host4, trie4) = count(&policy.remote_v4, 32);
        let (host6, trie6) = count(&policy.remote_v6, 128);
        let sizes = [
            (names::HEADER, 1),
            (names::LISTS, policy.lists.len()),
            (names::PROFILES, policy.profiles.len()),
            (names::COUNTERS, policy.profiles.len()),
            (names::LOCAL_V4, policy.local_v4.len()),
            (names::LOCAL_V6, policy.local_v6.len()),
            (names::BUCKETS, policy.buckets.len()),
            (names::LISTENERS, policy.listeners.len()),
            (names::REMOTE_V4, trie4),
            (names::REMOTE_V6, trie6),
            (names::HOST_V4, host4),
            (names::HOST_V6, host6),
        ];
        let mut maps = Maps::new();
        for (name, len) in sizes {
            maps.insert(name, templates.create(name, len as u32)?);
        }
        let made = started.elapsed();
        let mut generation = Generation { number, maps };
        generation.fill(policy)?;
        tracing::debug!(
            generation = number,
            make_ms = made.as_millis(),
            fill_ms = (started.elapsed() - made).as_millis(),
            "generation built"
        );
        Ok(generation)
    }

    /// The map of one kind (a name of `names::POLICY_MAPS`).
    pub(super) fn map(&self, name: &str) -> &MapData {
        data(&self.maps[name])
    }

    fn map_mut(&mut self, name: &'static str) -> &mut Map {
        self.maps.get_mut(name).expect("every policy map is made")
    }

    /// The `memlock` the kernel reports for each policy map (its memory use on Linux 6.4+).
    pub(super) fn map_memory(&self) -> u64 {
        use std::os::fd::AsRawFd;
        self.maps
            .values()
            .map(data)
            .filter_map(|map| {
                let fdinfo = std::fs::read_to_string(format!(
                    "/proc/self/fdinfo/{}",
                    map.fd().as_fd().as_raw_fd()
                ))
                .ok()?;
                fdinfo
                    .lines()
                    .find_map(|l| l.strip_prefix("memlock:")?.trim().parse::<u64>().ok())
            })
            .sum()
    }

    /// Pins the maps under `dir` for bpftool and `status`, replacing the previous generation's.
    pub(super) fn pin(&self, dir: &Path) -> Result<(), KernelError> {
        let fail = |reason: String| KernelError::Pin {
            path: dir.to_path_buf(),
            reason,
        };
        for (name, _) in names::POLICY_MAPS {
            let path = dir.join(name);
            if path.exists() {
                std::fs::remove_file(&path).map_err(|e| fail(format!("{name}: {e}")))?;
            }
            self.map(name)
                .pin(&path)
                .map_err(|e| fail(format!("{name}: {e}")))?;
        }
        Ok(())
    }

    fn fill(&mut self, p: &Policy) -> Result<(), KernelError> {
        let ranks: Vec<u32> = (0..p.profiles.len() as u32).collect();
        self.fill_array(names::PROFILES, &ranks, &p.profiles)?;
        let header = Header {
            generation: self.number,
            _pad: 0,
        };
        self.fill_array(names::HEADER, &[0], &[header])?;
        let ids: Vec<u32> = (0..p.lists.len() as u32).collect();
        self.fill_array(names::LISTS, &ids, &p.lists)?;
        let (keys, values): (Vec<_>, Vec<_>) = p.buckets.iter().copied().unzip();
        self.fill_hash(names::BUCKETS, &keys, &values)?;
        let (keys, values): (Vec<_>, Vec<_>) = p.listeners.iter().copied().unzip();
        self.fill_hash(names::LISTENERS, &keys, &values)?;
        let local4 = p.local_v4.iter().map(|&(local, net, rank)| {
            let addr: [u8; 4] = octets(net).try_into().expect("v4");
            (
                Key::new(32 + u32::from(net.prefix_len()), LocalKey4 { local, addr }),
                rank,
            )
        });
        self.fill_trie(names::LOCAL_V4, local4.collect())?;
        let local6 = p.local_v6.iter().map(|&(local, net, rank)| {
            let addr: [u8; 16] = octets(net).try_into().expect("v6");
            (
                Key::new(32 + u32::from(net.prefix_len()), LocalKey6 { local, addr }),
                rank,
            )
        });
        self.fill_trie(names::LOCAL_V6, local6.collect())?;
        self.fill_remote::<4>(names::HOST_V4, names::REMOTE_V4, &p.remote_v4)?;
        self.fill_remote::<16>(names::HOST_V6, names::REMOTE_V6, &p.remote_v6)
    }

    /// One family's remote prefixes: full-length ones (/32, /128) into the exact-address hash
    /// map `hosts`, the others into the trie `trie`.
    fn fill_remote<const N: usize>(
        &mut self,
        hosts: &'static str,
        trie: &'static str,
        prefixes: &[(IpNet, u32)],
    ) -> Result<(), KernelError> {
        let full = (N * 8) as u8;
        let addr = |net: IpNet| -> [u8; N] { octets(net).try_into().expect("the family's length") };
        let (exact, shorter): (Vec<_>, Vec<_>) =
            prefixes.iter().partition(|(n, _)| n.prefix_len() == full);
        let (keys, values): (Vec<[u8; N]>, Vec<u32>) =
            exact.iter().map(|&&(net, list)| (addr(net), list)).unzip();
        self.fill_hash(hosts, &keys, &values)?;
        let entries = shorter
            .iter()
            .map(|&&(net, list)| (Key::new(u32::from(net.prefix_len()), addr(net)), list));
        self.fill_trie(trie, entries.collect())
    }

    fn fill_array<V: Pod>(
        &mut self,
        name: &'static str,
        keys: &[u32],
        values: &[V],
    ) -> Result<(), KernelError> {
        let mut array: Array<&mut MapData, V> = Array::try_from(self.map_mut(name))
            .map_err(|e| map_err(name, "open")(e.to_string()))?;
        if batch(array.map(), name, keys, values)? {
            return Ok(());
        }
        for (k, v) in keys.iter().zip(values) {
            array
                .set(*k, v, 0)
                .map_err(|e| map_err(name, format!("index {k}"))(e.to_string()))?;
        }
        Ok(())
    }

    fn fill_hash<K: Pod + std::fmt::Debug, V: Pod>(
        &mut self,
        name: &'static str,
        keys: &[K],
        values: &[V],
    ) -> Result<(), KernelError> {
        let mut hash: HashMap<&mut MapData, K, V> = HashMap::try_from(self.map_mut(name))
            .map_err(|e| map_err(name, "open")(e.to_string()))?;
        if batch(hash.map(), name, keys, values)? {
            return Ok(());
        }
        for (k, v) in keys.iter().zip(values) {
            hash.insert(k, v, 0)
                .map_err(|e| map_err(name, format!("{k:?}"))(e.to_string()))?;
        }
        Ok(())
    }

    fn fill_trie<K: Pod, V: Pod>(
        &mut self,
        name: &'static str,
        entries: Vec<(Key<K>, V)>,
    ) -> Result<(), KernelError> {
        let mut trie: LpmTrie<&mut MapData, K, V> = LpmTrie::try_from(self.map_mut(name))
            .map_err(|e| map_err(name, "open")(e.to_string()))?;
        let (keys, values): (Vec<Key<K>>, Vec<V>) = entries.into_iter().unzip();
        if batch(trie.map(), name, &keys, &values)? {
            return Ok(());
        }
        for (k, v) in keys.iter().zip(&values) {
            trie.insert(k, v, 0)
                .map_err(|e| map_err(name, format!("prefix /{}", k.prefix_len()))(e.to_string()))?;
        }
        Ok(())
    }
}

/// Batch-writes when the map type allows it; false when the caller must write one by one.
fn batch<K, V>(
    map: &MapData,
    name: &'static str,
    keys: &[K],
    values: &[V],
) -> Result<bool, KernelError> {
    if keys.is_empty() {
        return Ok(true);
    }
    let done = sys::update_batch(map.fd().as_fd(), keys, values).map_err(|e| {
        map_err(name, format!("batch update of {} entries", keys.len()))(e.to_string())
    })?;
    if !done {
        tracing::debug!(
            "{name}: the kernel has no batch update for this map type; writing one by one"
        );
    }
    Ok(done)
}

/// The map behind one of the kinds a generation holds.
fn data(map: &Map) -> &MapData {
    match map {
        Map::Array(m) | Map::PerCpuHashMap(m) | Map::HashMap(m) | Map::LpmTrie(m) => m,
        other => unreachable!("a policy map of another type: {other:?}"),
    }
}

fn octets(net: IpNet) -> Vec<u8> {
    match net.network() {
        std::net::IpAddr::V4(a) => a.octets().to_vec(),
        std::net::IpAddr::V6(a) => a.octets().to_vec(),
    }
}
