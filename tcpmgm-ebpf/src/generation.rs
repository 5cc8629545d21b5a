//! The rule set in force: `TCPMGM_CURRENT` names a generation, whose maps sit at slot
//! `generation % 2` of each array of maps. A program run reads the number once and uses that
//! generation's maps only, so every decision is made by one rule set. The loader frees a
//! generation only well after it stopped being current; should a run still meet a slot already
//! given to another generation (its header says so), it decides nothing and the socket is left
//! for a later hook.
use tcpmgm_common::{Header, Profile};

use crate::maps::{
    BucketMap, Host4Map, Host6Map, ListMap, ListenerMap, Local4Map, Local6Map, Remote4Map,
    Remote6Map, TCPMGM_CURRENT, TCPMGM_GEN_BUCKETS, TCPMGM_GEN_HEADER, TCPMGM_GEN_HOST_V4,
    TCPMGM_GEN_HOST_V6, TCPMGM_GEN_LISTENERS, TCPMGM_GEN_LISTS, TCPMGM_GEN_LOCAL_V4,
    TCPMGM_GEN_LOCAL_V6, TCPMGM_GEN_PROFILES, TCPMGM_GEN_RANKS, TCPMGM_GEN_REMOTE_V4,
    TCPMGM_GEN_REMOTE_V6,
};

#[derive(Clone, Copy)]
pub struct Gen {
    pub number: u32,
    slot: u32,
}

impl Gen {
    /// The generation in force, or None before the first one is installed.
    #[inline(always)]
    pub fn current() -> Option<Gen> {
        let number = *TCPMGM_CURRENT.get(0)?;
        let g = Gen {
            number,
            slot: number & 1,
        };
        (number != 0 && g.header()?.generation == number).then_some(g)
    }

    /// The generation at `slot`, taken as it is: for code handed a slot by a caller that checked
    /// the generation (see `current`).
    #[inline(always)]
    pub fn at_slot(slot: u32) -> Gen {
        Gen { number: slot, slot }
    }

    #[inline(always)]
    pub fn header(self) -> Option<&'static Header> {
        TCPMGM_GEN_HEADER.get(self.slot)?.get(0)
    }

    /// The rule at `rank`: its id and its profile (shared with other rules, so its own
    /// `rule_id` and `rank` are not the rule's).
    #[inline(always)]
    pub fn rule(self, rank: u32) -> Option<(u32, &'static Profile)> {
        let entry = TCPMGM_GEN_RANKS.get(self.slot)?.get(rank)?;
        let profile = TCPMGM_GEN_PROFILES.get(self.slot)?.get(entry.profile)?;
        Some((entry.rule_id, profile))
    }

    #[inline(always)]
    pub fn lists(self) -> Option<&'static ListMap> {
        TCPMGM_GEN_LISTS.get(self.slot)
    }

    #[inline(always)]
    pub fn buckets(self) -> Option<&'static BucketMap> {
        TCPMGM_GEN_BUCKETS.get(self.slot)
    }

    #[inline(always)]
    pub fn listeners(self) -> Option<&'static ListenerMap> {
        TCPMGM_GEN_LISTENERS.get(self.slot)
    }

    #[inline(always)]
    pub fn host_v4(self) -> Option<&'static Host4Map> {
        TCPMGM_GEN_HOST_V4.get(self.slot)
    }

    #[inline(always)]
    pub fn host_v6(self) -> Option<&'static Host6Map> {
        TCPMGM_GEN_HOST_V6.get(self.slot)
    }

    #[inline(always)]
    pub fn remote_v4(self) -> Option<&'static Remote4Map> {
        TCPMGM_GEN_REMOTE_V4.get(self.slot)
    }

    #[inline(always)]
    pub fn remote_v6(self) -> Option<&'static Remote6Map> {
        TCPMGM_GEN_REMOTE_V6.get(self.slot)
    }

    #[inline(always)]
    pub fn local_v4(self) -> Option<&'static Local4Map> {
        TCPMGM_GEN_LOCAL_V4.get(self.slot)
    }

    #[inline(always)]
    pub fn local_v6(self) -> Option<&'static Local6Map> {
        TCPMGM_GEN_LOCAL_V6.get(self.slot)
    }
}
