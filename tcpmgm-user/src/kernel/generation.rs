//! One generation: the eBPF object loaded for one policy, its maps filled, its programs loaded
//! but not attached.
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, IterableMap, MapData};
use aya::programs::{CgroupSockAddr, SockOps};
use aya::{Ebpf, EbpfLoader, Pod};
use ipnet::IpNet;
use tcpmgm_common::{ListRef, LocalKey4, LocalKey6, names};

use super::{HOOKS, KernelError, program_error, sys};
use crate::compile::Policy;

/// The eBPF object, built by tcpmgm-user's build script.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcpmgm"));

pub struct Generation {
    ebpf: Ebpf,
}

fn map_err(map: &'static str, what: impl Into<String>) -> impl FnOnce(String) -> KernelError {
    let what = what.into();
    move |reason| KernelError::Map { map, what, reason }
}

impl Generation {
    /// Loads the object for `policy`, sharing the socket map and the log ring buffer pinned in
    /// `pin_dir` with every other generation.
    pub fn load(policy: &Policy, pin_dir: &Path) -> Result<Generation, KernelError> {
        let sizes = [
            (names::PROFILES, policy.profiles.len()),
            (names::COUNTERS, policy.profiles.len()),
            (names::LOCAL_V4, policy.local_v4.len()),
            (names::LOCAL_V6, policy.local_v6.len()),
            (names::BUCKETS, policy.buckets.len()),
            (names::LISTENERS, policy.listeners.len()),
            (
                names::REMOTE_V4,
                policy
                    .remote_v4
                    .iter()
                    .filter(|(n, _)| n.prefix_len() < 32)
                    .count(),
            ),
            (
                names::REMOTE_V6,
                policy
                    .remote_v6
                    .iter()
                    .filter(|(n, _)| n.prefix_len() < 128)
                    .count(),
            ),
            (
                names::HOST_V4,
                policy
                    .remote_v4
                    .iter()
                    .filter(|(n, _)| n.prefix_len() == 32)
                    .count(),
            ),
            (
                names::HOST_V6,
                policy
                    .remote_v6
                    .iter()
                    .filter(|(n, _)| n.prefix_len() == 128)
                    .count(),
            ),
        ];
        let mut loader = EbpfLoader::new();
        for (name, len) in sizes {
            loader.map_max_entries(name, len.max(1) as u32);
        }
        let sockets_pin = pin_dir.join(super::SOCKETS_PIN);
        let logs_pin = pin_dir.join(tcpmgm_common::LOGS_PIN);
        loader.map_pin_path(names::SOCKETS, &sockets_pin);
        loader.map_pin_path("AYA_LOGS", &logs_pin);
        let slow_pin = pin_dir.join(tcpmgm_common::SLOW_PIN);
        loader.map_pin_path(names::SLOW, &slow_pin);
        let started = std::time::Instant::now();
        let ebpf = loader
            .load(OBJECT)
            .map_err(|e| KernelError::Load(Box::new(e)))?;
        let mut generation = Generation { ebpf };
        let loaded = started.elapsed();
        generation.fill(policy)?;
        let filled = started.elapsed();
        for hook in &HOOKS {
            let program = generation
                .ebpf
                .program_mut(hook.name)
                .expect("the object defines every hook");
            let fail = program_error(hook, "load");
            let t = std::time::Instant::now();
            if hook.name == names::SOCK_OPS {
                let p: &mut SockOps = program.try_into().map_err(&fail)?;
                p.load().map_err(&fail)?;
            } else {
                let p: &mut CgroupSockAddr = program.try_into().map_err(&fail)?;
                p.load().map_err(&fail)?;
            }
            tracing::debug!(
                program = hook.name,
                ms = t.elapsed().as_millis(),
                "verified"
            );
        }
        tracing::debug!(
            object_ms = loaded.as_millis(),
            maps_ms = (filled - loaded).as_millis(),
            programs_ms = (started.elapsed() - filled).as_millis(),
            "generation loaded"
        );
        Ok(generation)
    }

    pub(super) fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    pub(super) fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    /// The `memlock` the kernel reports for each policy map (its memory use on Linux 6.4+).
    pub(super) fn map_memory(&self) -> u64 {
        use std::os::fd::AsRawFd;
        names::POLICY_MAPS
            .iter()
            .filter_map(|name| {
                let map: &MapData = match self.ebpf.map(name)? {
                    aya::maps::Map::Array(m)
                    | aya::maps::Map::PerCpuArray(m)
                    | aya::maps::Map::HashMap(m)
                    | aya::maps::Map::LpmTrie(m) => m,
                    _ => return None,
                };
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

    pub(super) fn program_fd(&self, name: &str) -> BorrowedFd<'_> {
        self.ebpf
            .program(name)
            .expect("the object defines every hook")
            .fd()
            .expect("loaded")
            .as_fd()
    }

    /// Pins the policy maps under `dir` (for bpftool), replacing the previous generation's pins.
    pub(super) fn pin_maps(&self, dir: &Path) -> Result<(), KernelError> {
        let fail = |reason: String| KernelError::Pin {
            path: dir.to_path_buf(),
            reason,
        };
        for name in names::POLICY_MAPS {
            let path = dir.join(name);
            if path.exists() {
                std::fs::remove_file(&path).map_err(|e| fail(format!("{name}: {e}")))?;
            }
            let map = self.ebpf.map(name).expect("the object defines every map");
            map.pin(&path).map_err(|e| fail(format!("{name}: {e}")))?;
        }
        Ok(())
    }

    fn fill(&mut self, p: &Policy) -> Result<(), KernelError> {
        let ranks: Vec<u32> = (0..p.profiles.len() as u32).collect();
        self.fill_array(names::PROFILES, &ranks, &p.profiles)?;
        self.fill_array(names::ROOTS, &[0, 1], &p.roots)?;
        self.fill_array(names::SETTINGS, &[0], &[p.settings])?;
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
        prefixes: &[(IpNet, ListRef)],
    ) -> Result<(), KernelError> {
        let full = (N * 8) as u8;
        let addr = |net: IpNet| -> [u8; N] { octets(net).try_into().expect("the family's length") };
        let (exact, shorter): (Vec<_>, Vec<_>) =
            prefixes.iter().partition(|(n, _)| n.prefix_len() == full);
        let (keys, values): (Vec<[u8; N]>, Vec<ListRef>) =
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
        let map = self
            .ebpf
            .map_mut(name)
            .expect("the object defines every map");
        let mut array: Array<&mut MapData, V> =
            Array::try_from(map).map_err(|e| map_err(name, "open")(e.to_string()))?;
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
        let map = self
            .ebpf
            .map_mut(name)
            .expect("the object defines every map");
        let mut hash: HashMap<&mut MapData, K, V> =
            HashMap::try_from(map).map_err(|e| map_err(name, "open")(e.to_string()))?;
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
        let map = self
            .ebpf
            .map_mut(name)
            .expect("the object defines every map");
        let mut trie: LpmTrie<&mut MapData, K, V> =
            LpmTrie::try_from(map).map_err(|e| map_err(name, "open")(e.to_string()))?;
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

fn octets(net: IpNet) -> Vec<u8> {
    match net.network() {
        std::net::IpAddr::V4(a) => a.octets().to_vec(),
        std::net::IpAddr::V6(a) => a.octets().to_vec(),
    }
}
