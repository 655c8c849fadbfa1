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
    /// Map state and DNSBL verdict for one address.
    Check {
        ip: String,
        /// Ask the zones even when a cached verdict exists.
        #[serde(default)]
        fresh: bool,
    },
    /// Live kernel DNSBL entries.
    DnsblList,
    /// Forget DNSBL verdicts (kernel and cache) for one address or all.
    DnsblFlush {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ip: Option<String>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Changed(ChangeSummary),
    Listed { entries: Vec<ListedEntry> },
    Stats(StatsReport),
    Checked(CheckReport),
    DnsblListed { entries: Vec<DnsblListedEntry> },
    DnsblFlushed(FlushSummary),
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// Present when DNSBL checks are configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dnsbl: Option<DnsblStats>,
}

/// The DNSBL part of `stats`: the engine's counters plus the kernel's view.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DnsblStats {
    #[serde(flatten)]
    pub engine: crate::dnsbl::DnsblReport,
    /// Connections refused with 554 and fed into the kernel.
    pub blocked: u64,
    /// Live entries in the kernel DNSBL maps.
    pub kernel_entries: usize,
}

/// `gatekeeper check IP`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReport {
    pub ip: String,
    /// What XDP would do with a SYN from it right now.
    pub map_state: MapState,
    /// Whether the SMTP front end would DNSBL-check it (not allowlisted, not a relay network).
    pub screened: bool,
    /// `listed`, `clean`, `trusted`, or `not_configured` without `[dnsbl]`.
    pub verdict: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked_by: Option<String>,
    #[serde(default)]
    pub zones: Vec<ZoneCheck>,
    /// Seconds the verdict stays cached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
    pub cached: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapState {
    pub allowlisted: bool,
    pub denylisted: bool,
    /// Unix seconds at which the live kernel DNSBL entry ends; absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dnsbl_until: Option<u64>,
    /// `pass_allow`, `drop_deny`, `drop_dnsbl` or `pass`.
    pub xdp_verdict: String,
}

/// One zone's answer in `check`, with the zone's health.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZoneCheck {
    #[serde(flatten)]
    pub answer: crate::dnsbl::verdict::ZoneAnswer,
    pub health: crate::dnsbl::health::Health,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsblListedEntry {
    pub ip: String,
    /// Unix seconds.
    pub expires: u64,
    pub remaining_secs: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub txt: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlushSummary {
    pub kernel_entries_removed: usize,
    pub cached_verdicts_removed: usize,
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
            dnsbl: None,
        };
        let value = serde_json::to_value(Reply::Stats(report)).unwrap();
        assert_eq!(value["dropped_deny"], 3);
        assert_eq!(value["reply"], "stats");
    }
}
