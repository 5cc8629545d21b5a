//! tcpmgm: the OpenSIPS `tcp_mgm` table, enforced in the kernel for every process of a cgroup.
//!
//! - `policy`: the data path, from the table to the maps' contents
//!   (`source` -> `rule` -> `matcher` -> `compile`).
//! - `kernel`: the programs, their maps, links and pins; what the kernel supports; the
//!   per-socket records and the connections that carry them.
//! - `daemon`: `tcpmgm run` and its tasks (serve, reload, watch, con_lifetime, reapply, status).
//! - `cli`: the `tcpmgm` command line.
//! - `config`: the configuration file, merged with the command line.
//! - `memory`: the memory limit this process runs under, for tables too large for it.
//! - `system`: the host: cgroups, bpffs, privileges, and the default paths.
pub mod cli;
pub mod config;
pub mod daemon;
pub mod kernel;
pub mod memory;
pub mod netns;
pub mod policy;
pub mod system;

/// `tcpmgm --version`: the package version, the commit it was built from (`build.rs`; "unknown"
/// outside git unless TCPMGM_COMMIT names it) and the first 12 hex digits of the embedded eBPF
/// object's SHA-256, which tell two builds of one version apart.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("TCPMGM_COMMIT"),
    ", eBPF ",
    env!("TCPMGM_EBPF_SHA256"),
    ")"
);
