//! Gatekeeper: an SMTP edge gatekeeper. The binary (`main.rs`) is the daemon
//! and the CLI; the library exposes the same modules so the pure parsers
//! can be fuzzed from `gatekeeper/fuzz`.

pub mod assets;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod commands;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dns;
pub mod dnsbl;
pub mod feeds;
pub mod findings;
pub mod kernel;
pub mod ledger;
pub mod lists;
pub mod metrics;
pub mod netaddr;
#[cfg(test)]
mod packaging;
pub mod persist;
pub mod probe;
pub mod smtp;
