//! Request and reply types; one JSON object per line in each direction.

//!
//! Requests are typed down to their addresses, prefixes and TTLs and refuse
//! unknown fields, so a misspelt `ttl` cannot silently make an entry permanent
//! and the daemon never parses a string itself.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::kernel::AttachedMode;
use crate::lists::prefix::Prefix;
use crate::lists::ttl::Ttl;
use crate::lists::ListKind;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireEntry {
    pub prefix: Prefix,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Lifetime in seconds from now; absent: permanent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<Ttl>,
}

/// A list file's entries as one string, `prefix[<TAB>reason]` per line: a
/// million-line import is then one JSON string to read, not a million
/// objects (which the tagged request would first buffer whole). Every
/// prefix passes the same rules as [`Prefix`] on the way in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PackedEntries(pub Vec<(Prefix, Option<String>)>);

impl Serialize for PackedEntries {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use std::fmt::Write;
        let mut text = String::with_capacity(self.0.len() * 20);
        for (prefix, reason) in &self.0 {
            let _ = write!(text, "{prefix}");
            // Line breaks would split the entry; list files cannot hold them anyway.
            if let Some(reason) = reason {
                text.push('\t');
                text.extend(reason.chars().map(|c| if c == '\n' { ' ' } else { c }));
            }
            text.push('\n');
        }
        serializer.serialize_str(&text)
    }
}

impl<'de> Deserialize<'de> for PackedEntries {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = PackedEntries;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("entries as one string, `prefix[\\treason]` per line")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<PackedEntries, E> {
                PackedEntries::parse(text).map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

/// Far above what any list's maps hold; counted before anything is
/// allocated, so a hostile request of tiny lines cannot balloon the daemon.
pub const MAX_PACKED_ENTRIES: usize = 1 << 24;

impl PackedEntries {
    fn parse(text: &str) -> Result<PackedEntries, String> {
        let count = text.lines().count();
        if count > MAX_PACKED_ENTRIES {
            return Err(format!(
                "{count} packed entries: at most {MAX_PACKED_ENTRIES} in one request"
            ));
        }
        let mut entries = Vec::with_capacity(count);
        for (index, line) in text.lines().enumerate() {
            let (prefix, reason) = match line.split_once('\t') {
                Some((prefix, reason)) => (prefix, Some(reason.to_owned())),
                None => (line, None),
            };
            let prefix = prefix
                .parse::<Prefix>()
                .map_err(|e| format!("packed entry {}: {e}", index + 1))?;
            entries.push((prefix, reason));
        }
        Ok(PackedEntries(entries))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Add or update entries; the whole batch or nothing.
    ListAdd {
        list: ListKind,
        entries: Vec<WireEntry>,
        /// Share with the fleet: a shared entry here, published to every host.
        #[serde(default, skip_serializing_if = "is_false")]
        share: bool,
    },
    /// Remove entries; every prefix must be listed. With `share`, withdraw
    /// the fleet's claims instead (here and on every host).
    ListDel {
        list: ListKind,
        prefixes: Vec<Prefix>,
        #[serde(default, skip_serializing_if = "is_false")]
        share: bool,
    },
    /// Make the list exactly `entries`.
    ListReplace {
        list: ListKind,
        entries: Vec<WireEntry>,
    },
    /// A list file, all entries permanent: added, or with `replace` the
    /// list made exactly these.
    ListImport {
        list: ListKind,
        entries: PackedEntries,
        #[serde(default, skip_serializing_if = "is_false")]
        replace: bool,
    },
    ListShow {
        list: ListKind,
    },
    /// Field-less variants are empty structs, not units: serde lets an internally
    /// tagged unit variant ignore unknown fields, so `{"op":"stats","x":1}` would pass.
    Stats {},
    /// Map state and DNSBL verdict for one address.
    Check {
        ip: IpAddr,
        /// Ask the zones even when a cached verdict exists.
        #[serde(default)]
        fresh: bool,
    },
    /// Live kernel DNSBL entries.
    DnsblList {},
    /// Forget DNSBL verdicts (kernel and cache) for one address or all.
    DnsblFlush {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ip: Option<IpAddr>,
    },
    /// Re-read the daemon's config file and apply it live.
    Reload {},
    /// The configured feeds and how their refreshes went.
    FeedsList {},
    /// Refresh one feed (or all) now; the reply waits for the results.
    FeedsRefresh {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// Let `ip` relay for `ttl_secs` (default 30 minutes): POP-before-SMTP.
    RelayGrant {
        ip: IpAddr,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ttl_secs: Option<Ttl>,
    },
    RelayRevoke {
        ip: IpAddr,
    },
    RelayList {},
    BansList {},
    /// The fleet link's state (`cluster status`).
    ClusterStatus {},
    /// End the bans covering `ip`, or every ban when absent.
    BansClear {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ip: Option<IpAddr>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Changed(ChangeSummary),
    Listed { entries: Vec<ListedEntry> },
    Stats(Box<StatsReport>),
    Checked(CheckReport),
    DnsblListed { entries: Vec<DnsblListedEntry> },
    DnsblFlushed(FlushSummary),
    Reloaded(ReloadSummary),
    FeedsListed { feeds: Vec<FeedReport> },
    FeedsRefreshed { results: Vec<FeedRefreshReport> },
    RelayGranted(GrantReport),
    RelayRevoked { ip: IpAddr },
    RelayListed { grants: Vec<GrantReport> },
    BansListed { bans: Vec<BanReport> },
    ClusterStatus(crate::cluster::stats::ClusterReport),
    BansCleared { cleared: usize },
    Error { kind: ErrorKind, message: String },
}

/// A relay grant. Times are unix seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantReport {
    pub ip: IpAddr,
    pub added: u64,
    pub expiry: u64,
}

/// A live auto-ban in `bans list`. Times are unix seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BanReport {
    /// The banned group: the address, or its /64 for IPv6.
    pub client: String,
    pub reason: crate::ledger::bans::AbuseKind,
    /// Events counted in the window that led to the ban.
    pub events: u32,
    pub added: u64,
    pub expiry: u64,
    /// Bans this group has had lately, this one included.
    pub offences: u32,
}

/// The `bans` part of `stats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BansReport {
    pub active: usize,
    /// Bans made since start.
    pub issued: u64,
    /// Abuse events counted since start, by kind.
    pub events: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GreylistReport {
    /// Triplets waiting for their retry.
    pub triplets: usize,
    /// Networks that passed and are spared greylisting.
    pub passed: usize,
}

/// One feed in `feeds list`. Times are unix seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedReport {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    pub list: ListKind,
    pub interval_secs: u64,
    /// Entries the feed lists now.
    pub entries: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_attempt: Option<u64>,
    /// Why the last refresh failed; absent once one succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_refresh: Option<u64>,
    /// Refreshes since start, by result.
    pub updated: u64,
    pub unchanged: u64,
    pub failures: u64,
}

/// The result of one feed's refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefreshResult {
    /// A new copy changed the feed's entries.
    Updated,
    /// Not modified (HTTP 304), or a copy that changed nothing.
    Unchanged,
    /// The fetch, the file or the import failed; the last good copy stays.
    Failed,
}

impl RefreshResult {
    pub fn name(self) -> &'static str {
        match self {
            RefreshResult::Updated => "updated",
            RefreshResult::Unchanged => "unchanged",
            RefreshResult::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedRefreshReport {
    pub name: String,
    pub result: RefreshResult,
    /// Prefixes the feed lists now and did not before (some may have been listed manually).
    pub added: usize,
    /// Prefixes the feed no longer lists (a manual listing of one stays).
    pub removed: usize,
    /// Prefixes the feed listed before and still lists.
    pub unchanged: usize,
    /// Entries the feed lists after the refresh.
    pub entries: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
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
    /// Listed by the operator (as opposed to only by feeds).
    #[serde(default = "yes")]
    pub manual: bool,
    /// Feeds that list it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub feeds: Vec<String>,
    /// An auto-ban (`bans list`, `bans clear`), not the operator's entry.
    #[serde(default, skip_serializing_if = "is_false")]
    pub ban: bool,
    /// The fleet lists it too: the node whose verdict it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_by: Option<String>,
}

fn is_false(value: &bool) -> bool {
    !value
}

fn yes() -> bool {
    true
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
    /// Present when `[bans]` is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bans: Option<BansReport>,
    /// Live relay grants.
    #[serde(default)]
    pub relay_grants: usize,
    /// Present when greylisting is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub greylist: Option<GreylistReport>,
    /// Present when `[cluster]` is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<crate::cluster::stats::ClusterReport>,
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

/// What a reload changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadSummary {
    /// The parts whose settings changed (`smtp`, `dnsbl`, `protected_ports`, `interfaces`).
    pub applied: Vec<String>,
    /// The new file's warnings (as `gatekeeper config check` prints them).
    pub warnings: Vec<String>,
}

/// Why a request line was refused; sent back as an `invalid_input` reply.
#[derive(Debug, thiserror::Error)]
pub enum BadRequest {
    #[error("request is not valid UTF-8 (bad byte at offset {0})")]
    NotUtf8(usize),
    #[error("malformed request: {0}")]
    Malformed(serde_json::Error),
}

/// Decodes one request line (without its newline).
pub fn decode_request(line: &[u8]) -> Result<Request, BadRequest> {
    let text = std::str::from_utf8(line).map_err(|e| BadRequest::NotUtf8(e.valid_up_to()))?;
    serde_json::from_str(text).map_err(BadRequest::Malformed)
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
                prefix: "192.0.2.0/24".parse().unwrap(),
                reason: Some("line\nbreak".into()),
                ttl_secs: None,
            }],
            share: false,
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
    fn packed_entries_round_trip_and_keep_the_prefix_rules() {
        let entries = PackedEntries(vec![
            (
                "192.0.2.0/24".parse().unwrap(),
                Some("SBL1\twith tab".into()),
            ),
            ("2001:db8::1".parse().unwrap(), None),
            ("198.51.100.7".parse().unwrap(), Some("two\nlines".into())),
        ]);
        let request = Request::ListImport {
            list: ListKind::Deny,
            entries,
            replace: true,
        };
        let line = serde_json::to_string(&request).unwrap();
        assert!(!line.contains('\n'));
        let Request::ListImport {
            entries, replace, ..
        } = serde_json::from_str(&line).unwrap()
        else {
            panic!("{line}")
        };
        assert!(replace);
        let shown: Vec<String> = entries
            .0
            .iter()
            .map(|(p, r)| format!("{p} {r:?}"))
            .collect();
        assert_eq!(
            shown,
            [
                r#"192.0.2.0/24 Some("SBL1\twith tab")"#,
                "2001:db8::1/128 None",
                r#"198.51.100.7/32 Some("two lines")"#,
            ]
        );
        for bad in [
            "192.0.2.7/24\n",
            "garbage",
            "192.0.2.0/24\n::ffff:192.0.2.1\n",
        ] {
            let line = serde_json::json!({"op": "list_import", "list": "deny", "entries": bad});
            let err = serde_json::from_value::<Request>(line)
                .unwrap_err()
                .to_string();
            assert!(err.contains("packed entry"), "{bad:?}: {err}");
        }
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
            bans: None,
            relay_grants: 0,
            greylist: None,
            cluster: None,
        };
        let value = serde_json::to_value(Reply::Stats(Box::new(report))).unwrap();
        assert_eq!(value["dropped_deny"], 3);
        assert_eq!(value["reply"], "stats");
    }

    /// One valid line per request variant, in wire form.
    const EVERY_REQUEST: &[&str] = &[
        r#"{"op":"list_add","list":"deny","entries":[{"prefix":"192.0.2.1/32","reason":"r","ttl_secs":60}]}"#,
        r#"{"op":"list_del","list":"allow","prefixes":["2001:db8::/32"]}"#,
        r#"{"op":"list_replace","list":"deny","entries":[]}"#,
        r#"{"op":"list_show","list":"deny"}"#,
        r#"{"op":"stats"}"#,
        r#"{"op":"relay_grant","ip":"192.0.2.1","ttl_secs":1800}"#,
        r#"{"op":"relay_revoke","ip":"2001:db8::1"}"#,
        r#"{"op":"relay_list"}"#,
        r#"{"op":"bans_list"}"#,
        r#"{"op":"bans_clear","ip":"192.0.2.1"}"#,
        r#"{"op":"bans_clear"}"#,
        r#"{"op":"check","ip":"192.0.2.1","fresh":true}"#,
        r#"{"op":"dnsbl_list"}"#,
        r#"{"op":"dnsbl_flush","ip":"2001:db8::1"}"#,
        r#"{"op":"dnsbl_flush"}"#,
        r#"{"op":"feeds_list"}"#,
        r#"{"op":"feeds_refresh","name":"drop"}"#,
        r#"{"op":"feeds_refresh"}"#,
    ];

    fn refusal(line: &str) -> String {
        match decode_request(line.as_bytes()) {
            Err(refusal) => refusal.to_string(),
            other => panic!("{line} was not refused as invalid input: {other:?}"),
        }
    }

    #[test]
    fn unknown_fields_are_refused_in_every_variant() {
        for line in EVERY_REQUEST {
            let request =
                decode_request(line.as_bytes()).unwrap_or_else(|e| panic!("{line}: {e:?}"));
            let expected: serde_json::Value = serde_json::from_str(line).unwrap();
            let encoded = serde_json::to_value(&request).unwrap();
            assert_eq!(encoded, expected, "the wire shape changed");
            let mut value: serde_json::Value = serde_json::from_str(line).unwrap();
            value["bogus"] = 1.into();
            let message = refusal(&value.to_string());
            assert!(message.contains("bogus"), "{value}: {message}");
        }
    }

    #[test]
    fn misspelt_ttl_is_refused_not_permanent() {
        let message = refusal(
            r#"{"op":"list_add","list":"deny","entries":[{"prefix":"192.0.2.1","ttl":60}]}"#,
        );
        assert!(message.contains("unknown field `ttl`"), "{message}");
    }

    #[test]
    fn typed_fields_refuse_bad_values() {
        for (line, named) in [
            (
                r#"{"op":"list_add","list":"deny","entries":[{"prefix":"192.0.2.7/24"}]}"#,
                "192.0.2.0/24",
            ),
            (
                r#"{"op":"list_replace","list":"deny","entries":[{"prefix":"::ffff:192.0.2.1"}]}"#,
                "use 192.0.2.1",
            ),
            (
                r#"{"op":"list_del","list":"deny","prefixes":["192.0.2.1","junk"]}"#,
                "junk",
            ),
            (r#"{"op":"check","ip":"192.0.2.0/24"}"#, "IP address"),
            (r#"{"op":"dnsbl_flush","ip":"nope"}"#, "IP address"),
            (
                r#"{"op":"list_add","list":"deny","entries":[{"prefix":"192.0.2.1","ttl_secs":0}]}"#,
                "at least one second",
            ),
            (
                r#"{"op":"list_add","list":"deny","entries":[{"prefix":"192.0.2.1","ttl_secs":18446744074}]}"#,
                "maximum",
            ),
            (r#"{"op":"list_show","list":"grey"}"#, "grey"),
            (r#"{"op":"shutdown"}"#, "shutdown"),
        ] {
            let message = refusal(line);
            assert!(message.contains(named), "{line}: {message}");
        }
    }

    #[test]
    fn invalid_utf8_is_named() {
        match decode_request(b"{\"op\":\"check\",\"ip\":\"\xff\"}") {
            Err(refusal @ BadRequest::NotUtf8(_)) => {
                let message = refusal.to_string();
                assert!(message.contains("UTF-8"), "{message}")
            }
            other => panic!("accepted: {other:?}"),
        }
    }
}
