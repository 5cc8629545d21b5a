//! One generation: the policy maps of one rule set, each sized to its contents and filled,
//! ready to be installed into the programs' arrays of maps (see `programs`).
//!
//! The maps are made from the object's own declarations and BTF (see `programs::Templates`), so
//! they carry the field names bpftool prints. A map whose contents the previous generation
//! already holds is not made again: the new generation shares it (a change to one rule's
//! keepalive rebuilds the profiles and the ranks, nothing else). A generation never writes to a map once
//! it is built, so sharing cannot change a rule set in force.
use std::collections::HashMap;
use std::hash::Hasher as _;
use std::os::fd::AsFd as _;
use std::path::Path;
use std::sync::Arc;

use aya::Pod;
use aya::maps::{Map, MapData};
use ipnet::IpNet;
use tcpmgm_common::{Header, LocalKey4, LocalKey6, Profile, RankEntry, names};

use super::templates::Templates;
use super::undo::Undo;
use super::{KernelError, sys};
use crate::policy::compile::Policy;

pub struct Generation {
    pub(super) number: u32,
    maps: HashMap<&'static str, Arc<Map>>,
    /// A fingerprint of each map's contents, to tell whether the next generation can share it
    /// (none for a map a patch wrote to).
    fingerprints: HashMap<&'static str, u64>,
    /// The header's `settings` bits.
    settings: u32,
    /// The `RANKS` map's contents, which a patch copies with its changes.
    ranks: Vec<RankEntry>,
    /// The entries of the `PROFILES` map in use, and its size: a patch writes new profiles
    /// after the ones in use, where no rank of a generation in force points.
    profiles: (u32, u32),
}

/// The room a generation's `PROFILES` map keeps for the profiles of later patches: a reload
/// that needs more reads the table whole, which makes the map anew.
pub const PROFILE_ROOM: u32 = 256;

/// One map's contents as the kernel stores them: `len` keys and values of fixed sizes, end to
/// end.
struct Contents {
    len: usize,
    keys: Vec<u8>,
    values: Vec<u8>,
}

fn bytes<T: Pod>(v: &T) -> &[u8] {
    // SAFETY: Pod types are plain data without padding the kernel would not expect.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }
}

impl Contents {
    fn of<K: Pod, V: Pod>(entries: impl IntoIterator<Item = (K, V)>) -> Contents {
        let mut c = Contents {
            len: 0,
            keys: Vec::new(),
            values: Vec::new(),
        };
        for (k, v) in entries {
            c.keys.extend_from_slice(bytes(&k));
            c.values.extend_from_slice(bytes(&v));
            c.len += 1;
        }
        c
    }

    /// Array contents: values at indexes 0, 1, ...
    fn array<V: Pod>(values: &[V]) -> Contents {
        Contents::of((0..values.len() as u32).zip(values.iter().copied()))
    }

    /// LPM trie contents: each key is its prefix length then its data.
    fn trie<K: Pod, V: Pod>(entries: impl IntoIterator<Item = (u32, K, V)>) -> Contents {
        let mut c = Contents {
            len: 0,
            keys: Vec::new(),
            values: Vec::new(),
        };
        for (prefix_len, k, v) in entries {
            c.keys.extend_from_slice(&prefix_len.to_ne_bytes());
            c.keys.extend_from_slice(bytes(&k));
            c.values.extend_from_slice(bytes(&v));
            c.len += 1;
        }
        c
    }

    fn fingerprint(&self) -> u64 {
        let mut h = std::hash::DefaultHasher::new();
        h.write_usize(self.len);
        h.write(&self.keys);
        h.write(&self.values);
        h.finish()
    }
}

/// This tcpmgm's version as the header keeps it (cut to fit, which a version never needs).
fn loader() -> [u8; tcpmgm_common::LOADER_LEN] {
    let mut out = [0; tcpmgm_common::LOADER_LEN];
    let text = crate::VERSION.as_bytes();
    let len = text.len().min(out.len());
    out[..len].copy_from_slice(&text[..len]);
    out
}

fn octets<const N: usize>(net: IpNet) -> [u8; N] {
    let v = match net.network() {
        std::net::IpAddr::V4(a) => a.octets().to_vec(),
        std::net::IpAddr::V6(a) => a.octets().to_vec(),
    };
    v.try_into().expect("the family's length")
}

/// A profile as rules share it: without its rule's id and rank.
fn shared(p: &Profile) -> Profile {
    Profile {
        rule_id: 0,
        rank: 0,
        ..*p
    }
}

/// A profile of the table, hashed and compared as rules share it (see `shared`), by reference:
/// no profile is copied to tell which are the same.
struct SharedKey<'a>(&'a Profile);

impl PartialEq for SharedKey<'_> {
    fn eq(&self, other: &Self) -> bool {
        shared(self.0) == shared(other.0)
    }
}

impl Eq for SharedKey<'_> {}

impl std::hash::Hash for SharedKey<'_> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        shared(self.0).hash(state);
    }
}

/// Which profiles rules share, from `per_rank` (the profiles in match order): the rank where
/// each distinct profile is first used, in that order (its index in `PROFILES`); and each rank's
/// entry, its rule's id and its profile's index.
fn shared_profiles(per_rank: &[Profile]) -> (Vec<u32>, Vec<RankEntry>) {
    // Profiles are 176 bytes: foldhash hashes a million of them several times faster than the
    // standard library's SipHash, and no key here comes from outside the table's owner.
    let mut index: HashMap<SharedKey<'_>, u32, foldhash::fast::RandomState> = HashMap::default();
    let mut firsts = Vec::new();
    let ranks = per_rank
        .iter()
        .zip(0u32..)
        .map(|(p, rank)| {
            let profile = *index.entry(SharedKey(p)).or_insert_with(|| {
                firsts.push(rank);
                (firsts.len() - 1) as u32
            });
            RankEntry {
                rule_id: p.rule_id,
                profile,
            }
        })
        .collect();
    (firsts, ranks)
}

/// The header of generation `number`.
fn header(number: u32, settings: u32) -> Contents {
    Contents::array(&[Header {
        generation: number,
        flags: settings,
        loader: loader(),
    }])
}

/// Every map's contents for `policy` as generation `number`, in `names::POLICY_MAPS` order,
/// with the ranks' entries.
fn contents(
    p: &Policy,
    number: u32,
    settings: u32,
) -> (Vec<(&'static str, Contents)>, Vec<RankEntry>) {
    let (firsts, ranks) = shared_profiles(&p.profiles);
    let profiles = firsts
        .iter()
        .map(|&rank| shared(&p.profiles[rank as usize]));
    let local4 = p.local_v4.iter().map(|&(local, net, rank)| {
        let addr = octets::<4>(net);
        (
            32 + u32::from(net.prefix_len()),
            LocalKey4 { local, addr },
            rank,
        )
    });
    let local6 = p.local_v6.iter().map(|&(local, net, rank)| {
        let addr = octets::<16>(net);
        (
            32 + u32::from(net.prefix_len()),
            LocalKey6 { local, addr },
            rank,
        )
    });
    // Full-length prefixes (/32, /128) go into the exact-address hash maps, the others into
    // the tries.
    fn hosts(prefixes: &[(IpNet, u32)], full: u8) -> impl Iterator<Item = (IpNet, u32)> + '_ {
        prefixes
            .iter()
            .filter(move |(n, _)| n.prefix_len() == full)
            .copied()
    }
    fn tries(prefixes: &[(IpNet, u32)], full: u8) -> impl Iterator<Item = (IpNet, u32)> + '_ {
        prefixes
            .iter()
            .filter(move |(n, _)| n.prefix_len() < full)
            .copied()
    }
    let maps = vec![
        (names::HEADER, header(number, settings)),
        (names::LISTS, Contents::array(&p.lists)),
        (names::PROFILES, Contents::of((0u32..).zip(profiles))),
        (names::RANKS, Contents::array(&ranks)),
        (names::LOCAL_V4, Contents::trie(local4)),
        (names::LOCAL_V6, Contents::trie(local6)),
        (names::BUCKETS, Contents::of(p.buckets.iter().copied())),
        (names::LISTENERS, Contents::of(p.listeners.iter().copied())),
        (
            names::REMOTE_V4,
            Contents::trie(
                tries(&p.remote_v4, 32)
                    .map(|(n, l)| (u32::from(n.prefix_len()), octets::<4>(n), l)),
            ),
        ),
        (
            names::REMOTE_V6,
            Contents::trie(
                tries(&p.remote_v6, 128)
                    .map(|(n, l)| (u32::from(n.prefix_len()), octets::<16>(n), l)),
            ),
        ),
        (
            names::HOST_V4,
            Contents::of(hosts(&p.remote_v4, 32).map(|(n, l)| (octets::<4>(n), l))),
        ),
        (
            names::HOST_V6,
            Contents::of(hosts(&p.remote_v6, 128).map(|(n, l)| (octets::<16>(n), l))),
        ),
    ];
    (maps, ranks)
}

impl Generation {
    /// Makes and fills the maps of `policy` as generation `number`, sharing with `previous` the
    /// maps whose contents it already holds.
    pub(super) fn build(
        policy: &Policy,
        templates: &Templates,
        number: u32,
        previous: Option<&Generation>,
    ) -> Result<Generation, KernelError> {
        let started = std::time::Instant::now();
        let mut maps = HashMap::new();
        let mut fingerprints = HashMap::new();
        let mut made = Vec::new();
        let (all, ranks) = contents(policy, number, policy.settings | templates.settings());
        let mut profiles = (0, 0);
        for (name, contents) in all {
            let fingerprint = contents.fingerprint();
            let shared = previous.filter(|p| p.fingerprints.get(name) == Some(&fingerprint));
            let room = if name == names::PROFILES {
                PROFILE_ROOM
            } else {
                0
            };
            let map = match shared {
                Some(p) => {
                    if name == names::PROFILES {
                        profiles = p.profiles;
                    }
                    p.maps[name].clone()
                }
                None => {
                    made.push(name);
                    let len = contents.len as u32;
                    if name == names::PROFILES {
                        profiles = (len, len + room);
                    }
                    Arc::new(fill(templates.create(name, len + room)?, name, &contents)?)
                }
            };
            maps.insert(name, map);
            fingerprints.insert(name, fingerprint);
        }
        tracing::debug!(
            generation = number,
            ms = started.elapsed().as_millis(),
            made = ?made,
            "generation built"
        );
        Ok(Generation {
            number,
            maps,
            fingerprints,
            settings: policy.settings | templates.settings(),
            ranks,
            profiles,
        })
    }

    /// Generation `number`: this one with the rules at the ranks of `changes` given their
    /// new profiles, and nothing else changed. The new profiles are written to this
    /// generation's `PROFILES` map after the ones in use, where no rank of this generation
    /// points, so that what this generation enforces does not change; the new generation shares
    /// every map but the header and the ranks with this one. None when the profiles map has no
    /// room left for them (`PROFILE_ROOM`).
    pub(super) fn patch(
        &self,
        templates: &Templates,
        number: u32,
        changes: &[(u32, Profile)],
    ) -> Result<Option<Generation>, KernelError> {
        let (used, size) = self.profiles;
        if changes.len() > (size - used) as usize {
            return Ok(None);
        }
        let profiles = self.maps[names::PROFILES].clone();
        let fd = data(&profiles).fd().as_fd();
        let mut ranks = self.ranks.clone();
        let mut next = used;
        for (rank, profile) in changes {
            let Some(entry) = ranks.get_mut(*rank as usize) else {
                return Err(KernelError::Map {
                    map: names::RANKS,
                    what: format!("patching rank {rank}"),
                    source: format!("the generation has {} ranks", self.ranks.len()).into(),
                });
            };
            sys::map_update(fd, &next.to_ne_bytes(), bytes(&shared(profile))).map_err(|e| {
                KernelError::Map {
                    map: names::PROFILES,
                    what: format!("writing profile {next}"),
                    source: e.into(),
                }
            })?;
            entry.profile = next;
            next += 1;
        }
        let mut maps = self.maps.clone();
        let mut fingerprints = self.fingerprints.clone();
        // The profiles were written to: no later generation may take them for what they held.
        // The ranks, a table's length of them, are not hashed: a later full build makes its own.
        fingerprints.remove(names::PROFILES);
        fingerprints.remove(names::RANKS);
        let head = header(number, self.settings);
        fingerprints.insert(names::HEADER, head.fingerprint());
        for (name, contents) in [
            (names::HEADER, head),
            (names::RANKS, Contents::array(&ranks)),
        ] {
            let map = fill(
                templates.create(name, contents.len as u32)?,
                name,
                &contents,
            )?;
            maps.insert(name, Arc::new(map));
        }
        Ok(Some(Generation {
            number,
            maps,
            fingerprints,
            settings: self.settings,
            ranks,
            profiles: (next, size),
        }))
    }

    /// The map of one kind (a name of `names::POLICY_MAPS`).
    pub(super) fn map(&self, name: &str) -> &MapData {
        data(&self.maps[name])
    }

    /// The map of one kind, as generations share it.
    pub(super) fn shared(&self, name: &str) -> &Arc<Map> {
        &self.maps[name]
    }

    /// The `memlock` the kernel reports for each policy map (its memory use on Linux 6.4+).
    pub(super) fn map_memory(&self) -> u64 {
        use std::os::fd::AsRawFd;
        self.maps
            .values()
            .map(|m| data(m))
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

    /// Pins the maps under `dir` for bpftool and `status`, replacing the previous generation's
    /// (put back on undo).
    pub(super) fn pin(&self, dir: &Path, undo: &mut Undo) -> Result<(), KernelError> {
        for (name, _) in names::POLICY_MAPS {
            undo.pin(self.map(name).fd().as_fd(), &dir.join(name))?;
        }
        Ok(())
    }
}

/// Writes `contents` into a new map: through a mapping of the map where it is an array the
/// object declares BPF_F_MMAPABLE (`TCPMGM_RANKS`), else in batches when the kernel has them
/// for the map type, else one entry at a time (LPM tries on Linux 5.10).
fn fill(map: Map, name: &'static str, contents: &Contents) -> Result<Map, KernelError> {
    if contents.len == 0 {
        return Ok(map);
    }
    let fd = data(&map).fd().as_fd();
    let (key_size, value_size) = (
        contents.keys.len() / contents.len,
        contents.values.len() / contents.len,
    );
    let fail = |what: String| {
        move |e: sys::SyscallError| KernelError::Map {
            map: name,
            what,
            source: e.into(),
        }
    };
    let mapped = matches!(&map, Map::Array(_))
        && value_size.is_multiple_of(8)
        && sys::write_mapped(fd, &contents.values)
            .map_err(fail(format!("writing {} entries mapped", contents.len)))?;
    if mapped {
        return Ok(map);
    }
    let batched = sys::update_batch(
        fd,
        &contents.keys,
        &contents.values,
        contents.len,
        key_size,
        value_size,
    )
    .map_err(fail(format!("batch update of {} entries", contents.len)))?;
    if !batched {
        tracing::debug!(
            "{name}: the kernel has no batch update for this map type; writing one by one"
        );
        for i in 0..contents.len {
            sys::map_update(
                fd,
                &contents.keys[i * key_size..(i + 1) * key_size],
                &contents.values[i * value_size..(i + 1) * value_size],
            )
            .map_err(fail(format!("entry {i} of {}", contents.len)))?;
        }
    }
    Ok(map)
}

/// The map behind one of the kinds a generation holds.
fn data(map: &Map) -> &MapData {
    match map {
        Map::Array(m) | Map::HashMap(m) | Map::LpmTrie(m) => m,
        other => unreachable!("a policy map of another type: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_with_the_same_profile_share_it_and_keep_their_ids() {
        let rule = |rule_id, rank, keepidle| Profile {
            rule_id,
            rank,
            keepidle,
            ..Profile::default()
        };
        let per_rank = [rule(11, 0, 30), rule(12, 1, 60), rule(13, 2, 30)];
        let (firsts, ranks) = shared_profiles(&per_rank);
        assert_eq!(firsts, [0, 1]);
        assert_eq!(shared(&per_rank[1]), rule(0, 0, 60));
        let entry = |rule_id, profile| RankEntry { rule_id, profile };
        assert_eq!(ranks, [entry(11, 0), entry(12, 1), entry(13, 0)]);
    }
}
