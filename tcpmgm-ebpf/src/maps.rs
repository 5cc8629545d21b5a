//! The policy maps. Sizes here are placeholders: the loader sets each map's max_entries to the
//! size of what it compiled before loading.
use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie},
    macros::btf_map,
};
use tcpmgm_common::{Addr4, Addr6, Candidate, CandidateRange, ListenerInfo, ListenerKey, Profile};

#[btf_map]
pub static TCPMGM_REMOTE_V4: LpmTrie<Addr4, CandidateRange, 1> = LpmTrie::new();

#[btf_map]
pub static TCPMGM_REMOTE_V6: LpmTrie<Addr6, CandidateRange, 1> = LpmTrie::new();

#[btf_map]
pub static TCPMGM_CANDIDATES: Array<Candidate, 1> = Array::new();

#[btf_map]
pub static TCPMGM_PROFILES: Array<Profile, 1> = Array::new();

#[btf_map]
pub static TCPMGM_LISTENERS: HashMap<ListenerKey, ListenerInfo, 1> = HashMap::new();
