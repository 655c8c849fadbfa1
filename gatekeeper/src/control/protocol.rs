//! Request and reply types; one JSON object per line in each direction.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::kernel::AttachedMode;
use crate::lists::ListKind;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireEntry {
    pub prefix: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Lifetime in seconds from now; absent: permanent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Add or update entries; the whole batch or nothing.
    ListAdd {
        list: ListKind,
        entries: Vec<WireEntry>,
    },
    /// Remove entries; every prefix must be listed.
    ListDel {
        list: ListKind,
        prefixes: Vec<String>,
    },
    /// Make the list exactly `entries`.
    ListReplace {
        list: ListKind,
        entries: Vec<WireEntry>,
    },
    ListShow {
        list: ListKind,
    },
    Stats,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Changed(ChangeSummary),
    Listed { entries: Vec<ListedEntry> },
    Stats(StatsReport),
    Error { kind: ErrorKind, message: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request named something invalid; nothing changed.
    InvalidInput,
    /// The daemon could not carry out a valid request; nothing changed.
    Failed,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeSummary {
    pub list: Option<ListKind>,
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
    /// Entries in the list after the change.
    pub total: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListedEntry {
    pub prefix: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Unix seconds.
    pub added: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceReport {
    pub name: String,
    pub mode: AttachedMode,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsReport {
    /// XDP counters summed over CPUs, under their stable names (`packets`, `dropped_deny`...).
    #[serde(flatten)]
    pub counters: BTreeMap<String, u64>,
    pub deny_entries: usize,
    pub allow_entries: usize,
    pub interfaces: Vec<InterfaceReport>,
    pub uptime_secs: u64,
    /// Present when the SMTP front end runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smtp: Option<crate::smtp::stats::SmtpStatsReport>,
}

impl Reply {
    pub fn invalid(message: impl Into<String>) -> Reply {
        Reply::Error {
            kind: ErrorKind::InvalidInput,
            message: message.into(),
        }
    }

    pub fn failed(message: impl Into<String>) -> Reply {
        Reply::Error {
            kind: ErrorKind::Failed,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_single_lines() {
        let request = Request::ListAdd {
            list: ListKind::Deny,
            entries: vec![WireEntry {
                prefix: "192.0.2.0/24".into(),
                reason: Some("line\nbreak".into()),
                ttl_secs: None,
            }],
        };
        let line = serde_json::to_string(&request).unwrap();
        assert!(!line.contains('\n'));
        assert!(line.contains(r#""op":"list_add""#), "{line}");
        let back: Request = serde_json::from_str(&line).unwrap();
        assert!(matches!(
            back,
            Request::ListAdd {
                list: ListKind::Deny,
                ..
            }
        ));
    }

    #[test]
    fn stats_counters_are_top_level_fields() {
        let report = StatsReport {
            counters: [("dropped_deny".to_string(), 3)].into_iter().collect(),
            deny_entries: 1,
            allow_entries: 0,
            interfaces: vec![],
            uptime_secs: 5,
            smtp: None,
        };
        let value = serde_json::to_value(Reply::Stats(report)).unwrap();
        assert_eq!(value["dropped_deny"], 3);
        assert_eq!(value["reply"], "stats");
    }
}
