//! The policy data path, from the table to the maps' contents: `source` (rows from the database)
//! -> `rule` (validated rules) -> `matcher` (the match order, the specification) -> `compile`
//! (map contents). `listener` resolves a connection's protocol and local side for `matcher` and
//! `compile`; `evaluate` (for the tests) runs the kernel's decision on compiled contents; `pipeline` ties the
//! steps together for a command; `opensips_cfg` and `opensips_order` read OpenSIPS's own
//! configuration and say where its order is not defined.
pub mod column;
pub mod compile;
#[cfg(test)]
mod evaluate;
pub mod listener;
pub mod matcher;
pub mod opensips_cfg;
pub mod opensips_order;
pub mod patch;
pub mod pipeline;
pub mod rule;
pub mod source;
pub mod values;
