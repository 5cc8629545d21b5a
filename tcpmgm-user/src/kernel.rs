//! Where the compiled policy is written to the kernel: the eBPF object is loaded with every map
//! sized to its contents, the maps are filled, and only then are the programs loaded and attached
//! to the cgroup, so a cgroup never runs half a policy. The maps are pinned for bpftool.
use std::fs::File;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapError};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, ProgramError, SockOps};
use aya::{Ebpf, EbpfLoader};
use ipnet::IpNet;
use tcpmgm_common::names;

use crate::compile::Policy;

/// The eBPF object, built by tcpmgm-user's build script.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcpmgm"));

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("loading the eBPF object: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("map {map}: {what}: {source}")]
    Map {
        map: &'static str,
        what: String,
        source: MapError,
    },
    #[error(
        "program {program}: the verifier refused it ({io_error}); last lines of its log:\n{tail}"
    )]
    Verifier {
        program: &'static str,
        io_error: std::io::Error,
        tail: String,
    },
    #[error("program {program} ({kind}, needs Linux {min_kernel}): {what}: {source}")]
    Program {
        program: &'static str,
        kind: &'static str,
        min_kernel: &'static str,
        what: &'static str,
        source: Box<ProgramError>,
    },
    #[error("opening cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pinning in {path}: {reason}")]
    Pin { path: PathBuf, reason: String },
}

/// The programs and what each needs from the kernel.
struct Hook {
    name: &'static str,
    kind: &'static str,
    min_kernel: &'static str,
}

const HOOKS: [Hook; 3] = [
    Hook {
        name: names::SOCK_OPS,
        kind: "BPF_PROG_TYPE_SOCK_OPS",
        min_kernel: "4.13",
    },
    Hook {
        name: names::CONNECT4,
        kind: "BPF_PROG_TYPE_CGROUP_SOCK_ADDR connect4",
        min_kernel: "4.17",
    },
    Hook {
        name: names::CONNECT6,
        kind: "BPF_PROG_TYPE_CGROUP_SOCK_ADDR connect6",
        min_kernel: "4.17",
    },
];

/// A policy enforced on a cgroup. Dropping it detaches the programs and removes the pins.
pub struct Enforcer {
    _ebpf: Ebpf,
    pin_dir: PathBuf,
    cgroup: PathBuf,
}

impl Enforcer {
    /// Loads `policy` and attaches it to `cgroup`, pinning the maps in `pin_dir`.
    pub fn attach(policy: &Policy, cgroup: &Path, pin_dir: &Path) -> Result<Enforcer, KernelError> {
        let sizes = [
            (names::PROFILES, policy.profiles.len()),
            (names::CANDIDATES, policy.candidates.len()),
            (names::LISTENERS, policy.listeners.len()),
            (names::REMOTE_V4, policy.remote_v4.len()),
            (names::REMOTE_V6, policy.remote_v6.len()),
        ];
        let mut loader = EbpfLoader::new();
        for (name, len) in sizes {
            loader.map_max_entries(name, len.max(1) as u32);
        }
        let mut ebpf = loader
            .load(OBJECT)
            .map_err(|e| KernelError::Load(Box::new(e)))?;
        write_maps(&mut ebpf, policy)?;

        let cgroup_file = File::open(cgroup).map_err(|source| KernelError::Cgroup {
            path: cgroup.to_path_buf(),
            source,
        })?;
        for hook in &HOOKS {
            attach_hook(&mut ebpf, hook, &cgroup_file)?;
        }
        pin_maps(&ebpf, pin_dir)?;
        tracing::info!(
            cgroup = %cgroup.display(),
            pins = %pin_dir.display(),
            rules = policy.rules.len(),
            "policy attached"
        );
        Ok(Enforcer {
            _ebpf: ebpf,
            pin_dir: pin_dir.to_path_buf(),
            cgroup: cgroup.to_path_buf(),
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }
}

impl Drop for Enforcer {
    fn drop(&mut self) {
        remove_pins(&self.pin_dir);
    }
}

fn remove_pins(dir: &Path) {
    for name in names::MAPS {
        let _ = std::fs::remove_file(dir.join(name));
    }
    let _ = std::fs::remove_dir(dir);
}

fn attach_hook(ebpf: &mut Ebpf, hook: &Hook, cgroup: &File) -> Result<(), KernelError> {
    let program = ebpf
        .program_mut(hook.name)
        .expect("the object defines every hook");
    let fail = |what: &'static str| {
        move |source: ProgramError| match source {
            ProgramError::LoadError {
                io_error,
                verifier_log,
            } => {
                let log = format!("{verifier_log:?}");
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(20)..].join("\n");
                KernelError::Verifier {
                    program: hook.name,
                    io_error,
                    tail,
                }
            }
            source => KernelError::Program {
                program: hook.name,
                kind: hook.kind,
                min_kernel: hook.min_kernel,
                what,
                source: Box::new(source),
            },
        }
    };
    // Attached as a bpf_link: the kernel refuses link flags (EINVAL for AllowMultiple), and a
    // link always runs beside the cgroup's other programs whatever the mode.
    let mode = CgroupAttachMode::Single;
    if hook.name == names::SOCK_OPS {
        let p: &mut SockOps = program.try_into().map_err(fail("type"))?;
        p.load().map_err(fail("load"))?;
        p.attach(cgroup, mode).map_err(fail("attach"))?;
    } else {
        let p: &mut CgroupSockAddr = program.try_into().map_err(fail("type"))?;
        p.load().map_err(fail("load"))?;
        p.attach(cgroup, mode).map_err(fail("attach"))?;
    }
    Ok(())
}

fn map_err(map: &'static str, what: impl Into<String>) -> impl FnOnce(MapError) -> KernelError {
    let what = what.into();
    move |source| KernelError::Map { map, what, source }
}

fn write_maps(ebpf: &mut Ebpf, policy: &Policy) -> Result<(), KernelError> {
    use tcpmgm_common::{Candidate, ListenerInfo, ListenerKey, Profile};
    fn map<'a>(ebpf: &'a mut Ebpf, name: &str) -> &'a mut aya::maps::Map {
        ebpf.map_mut(name).expect("the object defines every map")
    }
    let mut profiles: Array<_, Profile> =
        Array::try_from(map(ebpf, names::PROFILES)).map_err(map_err(names::PROFILES, "open"))?;
    for (i, p) in policy.profiles.iter().enumerate() {
        profiles
            .set(i as u32, p, 0)
            .map_err(map_err(names::PROFILES, format!("rule {}", p.rule_id)))?;
    }
    let mut candidates: Array<_, Candidate> = Array::try_from(map(ebpf, names::CANDIDATES))
        .map_err(map_err(names::CANDIDATES, "open"))?;
    for (i, c) in policy.candidates.iter().enumerate() {
        candidates
            .set(i as u32, c, 0)
            .map_err(map_err(names::CANDIDATES, format!("entry {i}")))?;
    }
    let mut listeners: HashMap<_, ListenerKey, ListenerInfo> =
        HashMap::try_from(map(ebpf, names::LISTENERS))
            .map_err(map_err(names::LISTENERS, "open"))?;
    for (k, v) in &policy.listeners {
        listeners
            .insert(k, v, 0)
            .map_err(map_err(names::LISTENERS, format!("{k:?}")))?;
    }
    fill_trie::<4>(
        map(ebpf, names::REMOTE_V4),
        names::REMOTE_V4,
        &policy.remote_v4,
    )?;
    fill_trie::<16>(
        map(ebpf, names::REMOTE_V6),
        names::REMOTE_V6,
        &policy.remote_v6,
    )?;
    Ok(())
}

/// Fills a remote-prefix trie whose key data is the `N`-byte address.
fn fill_trie<const N: usize>(
    map: &mut aya::maps::Map,
    name: &'static str,
    entries: &[(IpNet, tcpmgm_common::CandidateRange)],
) -> Result<(), KernelError> {
    let mut trie: LpmTrie<_, [u8; N], tcpmgm_common::CandidateRange> =
        LpmTrie::try_from(map).map_err(map_err(name, "open"))?;
    for (net, range) in entries {
        let octets = match net.network() {
            std::net::IpAddr::V4(a) => a.octets().to_vec(),
            std::net::IpAddr::V6(a) => a.octets().to_vec(),
        };
        let data: [u8; N] = octets
            .try_into()
            .expect("the compiler keeps each family in its trie");
        trie.insert(&Key::new(u32::from(net.prefix_len()), data), range, 0)
            .map_err(map_err(name, net.to_string()))?;
    }
    Ok(())
}

/// Pins every map under `dir`, replacing pins a previous run left behind.
fn pin_maps(ebpf: &Ebpf, dir: &Path) -> Result<(), KernelError> {
    let fail = |reason: String| KernelError::Pin {
        path: dir.to_path_buf(),
        reason,
    };
    std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
    for name in names::MAPS {
        let path = dir.join(name);
        if path.exists() {
            tracing::warn!("replacing stale pin {}", path.display());
            std::fs::remove_file(&path).map_err(|e| fail(format!("{name}: {e}")))?;
        }
        let map = ebpf.map(name).expect("the object defines every map");
        map.pin(&path).map_err(|e| fail(format!("{name}: {e}")))?;
    }
    Ok(())
}
