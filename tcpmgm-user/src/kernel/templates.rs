//! What each generation's maps are made from, kept by the loaded programs and lent to each
//! generation they build.
use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};

use aya::maps::{Map, MapData};
use tcpmgm_common::names;

use super::{Cause, KernelError, fail, sys};

/// What each generation's maps are made from: the object's declarations of the policy maps, and
/// the object's BTF, loaded into the kernel once, so that a reload creates its maps (with the
/// field names bpftool prints) and nothing else.
pub(crate) struct Templates {
    btf: Option<OwnedFd>,
    maps: HashMap<&'static str, aya_obj::Map>,
    /// Whether the outcome tracers of these programs are attached: every generation's header
    /// says so (`settings::TRACED`), and the sockets it decides carry it.
    pub(super) traced: bool,
}

impl Templates {
    /// From the object, for programs whose outcome tracers are attached (`traced`) or not.
    pub(super) fn load(traced: bool) -> Result<Templates, KernelError> {
        let fail = |what: &str, source: Cause| KernelError::Map {
            map: "(policy maps)",
            what: what.to_owned(),
            source,
        };
        let mut object = aya_obj::Object::parse(super::OBJECT)
            .map_err(|e| fail("parsing the object", e.into()))?;
        let btf = match aya::features().btf() {
            Some(features) => match object
                .fixup_and_sanitize_btf(features)
                .map_err(|e| fail("preparing the object's BTF", e.into()))?
            {
                Some(btf) => Some(
                    sys::btf_load(&btf.to_bytes())
                        .map_err(|e| fail("loading the object's BTF", e.into()))?,
                ),
                None => None,
            },
            None => None,
        };
        let mut maps = HashMap::new();
        for (name, _) in names::POLICY_MAPS {
            let map = object.maps.remove(name).ok_or_else(|| KernelError::Map {
                map: name,
                what: "finding its declaration".into(),
                source: "the object does not declare it".into(),
            })?;
            maps.insert(name, map);
        }
        Ok(Templates { btf, maps, traced })
    }

    /// A new map of kind `name` (a name of `names::POLICY_MAPS`) for `max_entries` entries.
    pub(super) fn create(&self, name: &'static str, max_entries: u32) -> Result<Map, KernelError> {
        let mut def = self.maps[name].clone();
        def.set_max_entries(max_entries.max(1));
        let data = MapData::create(def, name, self.btf.as_ref().map(|fd| fd.as_fd()))
            .map_err(|e| fail(name, &format!("creating it for {max_entries} entries"))(e))?;
        Map::from_map_data(data).map_err(|e| fail(name, "opening it")(e))
    }

    /// The header's `settings::*` bits these programs add to the policy's own.
    pub(super) fn settings(&self) -> u32 {
        if self.traced {
            tcpmgm_common::settings::TRACED
        } else {
            0
        }
    }
}
