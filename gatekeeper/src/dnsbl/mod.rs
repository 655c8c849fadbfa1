//! DNSBL verdicts: which clients the configured DNS blocklists (and
//! allowlists) list, with what weight, for how long.
//!
//! `zone`, `answer`, `verdict` and `health::judge_test_points` are pure;
//! `engine` does the DNS; `cache` keeps verdicts across checks and restarts.

pub mod answer;
pub mod cache;
pub mod config;
pub mod engine;
pub mod health;
pub mod verdict;
pub mod zone;

pub use config::DnsblConfig;
pub use engine::{Checked, DnsblEngine, DnsblReport};
pub use verdict::Verdict;
