//! Deny and allow lists: prefix syntax, importable files, the durable store.

pub mod journal;
pub mod listfile;
pub mod prefix;
pub mod snapshot;
pub mod store;
pub mod ttl;

use serde::{Deserialize, Serialize};

/// Which list a command or entry refers to.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum ListKind {
    Deny,
    Allow,
}

impl ListKind {
    pub fn name(self) -> &'static str {
        match self {
            ListKind::Deny => "deny",
            ListKind::Allow => "allow",
        }
    }
}

impl std::fmt::Display for ListKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
