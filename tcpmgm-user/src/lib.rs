//! tcpmgm: the OpenSIPS `tcp_mgm` table, enforced in the kernel for every process of a cgroup.
//!
//! The data path, one module a step:
//! `source` (rows from the database) -> `rule` (validated rules) -> `matcher` (the reference
//! order) -> `compile` (map contents) -> `kernel` (maps, programs, cgroup attachment).
//! `listener` resolves a connection's protocol and local side for both `matcher` and `compile`.
pub mod compile;
pub mod config;
pub mod daemon;
pub mod diag;
pub mod evaluate;
pub mod features;
pub mod kernel;
pub mod lifetime;
pub mod listener;
pub mod matcher;
pub mod opensips_cfg;
pub mod opensips_order;
pub mod pipeline;
pub mod reapply;
pub mod rule;
pub mod socket;
pub mod source;
pub mod status;
pub mod system;
pub mod watch;
