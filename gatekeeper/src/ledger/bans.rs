//! Auto-bans: abuse events weighed per client group over a sliding window.
//! A group whose weight reaches the threshold is banned for `ttl`; each
//! further offence doubles that, up to `ttl_max`.
//!
//! [`Ledger`] holds the counts (in memory: a restart forgives half-done
//! counting) and the ban records (saved: a restart keeps bans and the
//! offence history that makes a repeat offender's ban grow).

use std::collections::{BTreeMap, VecDeque};
use std::num::NonZeroUsize;
use std::time::Duration;

use ipnet::IpNet;
use lru::LruCache;
use serde::{Deserialize, Serialize};

use crate::findings::Findings;

/// What a client did wrong, as counted and as shown in `bans list`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AbuseKind {
    /// A recipient refused as third-party relay.
    RelayAttempt,
    /// AUTH answered with a failure by the MTA.
    AuthFailure,
    /// A command refused as bad syntax or out of sequence.
    ProtocolError,
    /// Bare CR/LF in message data (SMTP smuggling).
    Smuggling,
    /// Talked before the greeting.
    Pregreet,
    /// A recipient the MTA behind refused (unknown user: harvesting).
    RcptRefused,
}

impl AbuseKind {
    pub const ALL: [AbuseKind; 6] = [
        AbuseKind::RelayAttempt,
        AbuseKind::AuthFailure,
        AbuseKind::ProtocolError,
        AbuseKind::Smuggling,
        AbuseKind::Pregreet,
        AbuseKind::RcptRefused,
    ];

    pub fn name(self) -> &'static str {
        match self {
            AbuseKind::RelayAttempt => "relay_attempt",
            AbuseKind::AuthFailure => "auth_failure",
            AbuseKind::ProtocolError => "protocol_error",
            AbuseKind::Smuggling => "smuggling",
            AbuseKind::Pregreet => "pregreet",
            AbuseKind::RcptRefused => "rcpt_refused",
        }
    }
}

/// The `[bans]` table; present means on.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BansConfig {
    /// Off without removing the table (bans already made still run out).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Weight of events within `window` that bans.
    #[serde(default = "default_threshold")]
    pub threshold: u32,
    #[serde(default = "ten_minutes", with = "humantime_serde")]
    pub window: Duration,
    /// A first ban's length.
    #[serde(default = "one_hour", with = "humantime_serde")]
    pub ttl: Duration,
    /// The longest a repeat offender's ban grows to.
    #[serde(default = "one_week", with = "humantime_serde")]
    pub ttl_max: Duration,
    /// Client groups counted at once; the least recently seen is forgotten first.
    #[serde(default = "default_max_tracked")]
    pub max_tracked: usize,
    #[serde(default)]
    pub weights: Weights,
}

/// How much each kind of event counts towards the threshold; 0 = not counted.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Weights {
    pub relay_attempt: u32,
    pub auth_failure: u32,
    pub protocol_error: u32,
    pub smuggling: u32,
    pub pregreet: u32,
    pub rcpt_refused: u32,
}

impl Default for Weights {
    /// Smuggling and pre-greet talk are never accidents: half a ban each.
    fn default() -> Weights {
        Weights {
            relay_attempt: 1,
            auth_failure: 1,
            protocol_error: 1,
            smuggling: 5,
            pregreet: 5,
            rcpt_refused: 1,
        }
    }
}

impl Weights {
    pub fn of(&self, kind: AbuseKind) -> u32 {
        match kind {
            AbuseKind::RelayAttempt => self.relay_attempt,
            AbuseKind::AuthFailure => self.auth_failure,
            AbuseKind::ProtocolError => self.protocol_error,
            AbuseKind::Smuggling => self.smuggling,
            AbuseKind::Pregreet => self.pregreet,
            AbuseKind::RcptRefused => self.rcpt_refused,
        }
    }
}

impl Default for BansConfig {
    fn default() -> BansConfig {
        BansConfig {
            enabled: true,
            threshold: default_threshold(),
            window: ten_minutes(),
            ttl: one_hour(),
            ttl_max: one_week(),
            max_tracked: default_max_tracked(),
            weights: Weights::default(),
        }
    }
}

impl BansConfig {
    pub fn check(&self, findings: &mut Findings) {
        if self.threshold == 0 {
            findings.error("bans.threshold: must be at least 1");
        }
        if self.max_tracked == 0 {
            findings.error("bans.max_tracked: must be at least 1");
        }
        for (key, value) in [
            ("bans.window", self.window),
            ("bans.ttl", self.ttl),
            ("bans.ttl_max", self.ttl_max),
        ] {
            if value.as_secs() == 0 {
                findings.error(format!("{key}: must be at least 1s"));
            }
            if value.as_secs() > crate::lists::ttl::MAX_TTL_SECS {
                findings.error(format!("{key}: over the maximum of 10y"));
            }
        }
        if self.ttl_max < self.ttl {
            findings.error("bans.ttl_max: must be at least bans.ttl");
        }
        if AbuseKind::ALL.iter().all(|&k| self.weights.of(k) == 0) {
            findings.warn("bans.weights: every weight is 0, nothing will ever be banned");
        }
    }

    /// The ban for a group's `offence`-th offence (1 = first).
    pub fn ban_secs(&self, offence: u32) -> u64 {
        let doublings = offence.saturating_sub(1).min(40);
        self.ttl
            .as_secs()
            .saturating_mul(1u64 << doublings)
            .min(self.ttl_max.as_secs())
            .max(1)
    }
}

/// One ban, as saved and as `bans list` shows it. Times are unix seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BanRecord {
    /// The kind that weighed most in the window that led to the ban.
    pub reason: AbuseKind,
    /// Events counted in that window.
    pub events: u32,
    pub added: u64,
    pub expires: u64,
    /// Bans this group has had, this one included (grows the next ban).
    pub offences: u32,
}

impl BanRecord {
    pub fn live_at(&self, now: u64) -> bool {
        self.expires > now
    }
}

/// What [`Ledger::record`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    Counted {
        weight: u32,
    },
    /// The group is over the threshold: put this ban in place.
    Ban(IpNet, BanRecord),
    /// Over the threshold, but `max_tracked` bans are held already: an
    /// attacker with a million /64s must not fill the kernel denylist.
    TableFull(IpNet),
}

/// Saved ban records, newest state of each group.
pub type BanTable = BTreeMap<IpNet, BanRecord>;

pub struct Ledger {
    config: BansConfig,
    windows: LruCache<IpNet, VecDeque<(u64, u32, AbuseKind)>>,
    bans: BanTable,
}

impl Ledger {
    pub fn new(config: BansConfig, bans: BanTable) -> Ledger {
        let cap = NonZeroUsize::new(config.max_tracked).unwrap_or(NonZeroUsize::MIN);
        Ledger {
            config,
            windows: LruCache::new(cap),
            bans,
        }
    }

    pub fn config(&self) -> &BansConfig {
        &self.config
    }

    /// New limits apply to events from now on; counts and bans stay.
    pub fn set_config(&mut self, config: BansConfig) {
        let cap = NonZeroUsize::new(config.max_tracked).unwrap_or(NonZeroUsize::MIN);
        self.windows.resize(cap);
        self.config = config;
    }

    /// Counts one event of `group` at `now`. A group already banned is not
    /// counted again (its SYNs die in XDP; stray events are late arrivals).
    pub fn record(&mut self, group: IpNet, kind: AbuseKind, now: u64) -> Recorded {
        let weight = self.config.weights.of(kind);
        if weight == 0 || !self.config.enabled {
            return Recorded::Counted { weight: 0 };
        }
        if self.bans.get(&group).is_some_and(|b| b.live_at(now)) {
            return Recorded::Counted { weight: 0 };
        }
        let window = self.config.window.as_secs();
        let events = self.windows.get_or_insert_mut(group, VecDeque::new);
        while events.front().is_some_and(|&(t, _, _)| t + window <= now) {
            events.pop_front();
        }
        events.push_back((now, weight, kind));
        let total: u64 = events.iter().map(|&(_, w, _)| u64::from(w)).sum();
        if total < u64::from(self.config.threshold) {
            // Bounded: below the threshold there are fewer events than it.
            return Recorded::Counted { weight };
        }
        let reason = heaviest(events);
        let count = events.len() as u32;
        self.windows.pop(&group);
        if !self.bans.contains_key(&group) && self.bans.len() >= self.config.max_tracked {
            self.prune(now);
            if self.bans.len() >= self.config.max_tracked {
                return Recorded::TableFull(group);
            }
        }
        let offences = self.previous_offences(group, now) + 1;
        let record = BanRecord {
            reason,
            events: count,
            added: now,
            expires: now.saturating_add(self.config.ban_secs(offences)),
            offences,
        };
        self.bans.insert(group, record.clone());
        Recorded::Ban(group, record)
    }

    /// Offences count only while the last ban is within `ttl_max` of now.
    fn previous_offences(&self, group: IpNet, now: u64) -> u32 {
        match self.bans.get(&group) {
            Some(b) if b.expires.saturating_add(self.config.ttl_max.as_secs()) > now => b.offences,
            _ => 0,
        }
    }

    /// Live bans, in prefix order.
    pub fn live(&self, now: u64) -> Vec<(IpNet, BanRecord)> {
        self.bans
            .iter()
            .filter(|(_, b)| b.live_at(now))
            .map(|(net, b)| (*net, b.clone()))
            .collect()
    }

    pub fn is_live_ban(&self, net: &IpNet, now: u64) -> bool {
        self.bans.get(net).is_some_and(|b| b.live_at(now))
    }

    /// The live ban of exactly `net`.
    pub fn live_ban(&self, net: &IpNet, now: u64) -> Option<&BanRecord> {
        self.bans.get(net).filter(|b| b.live_at(now))
    }

    /// Live bans of groups holding `ip` (all when `None`), without ending them.
    pub fn covering(&self, ip: Option<std::net::IpAddr>, now: u64) -> Vec<(IpNet, BanRecord)> {
        let ip = ip.map(crate::netaddr::canonical);
        self.live(now)
            .into_iter()
            .filter(|(net, _)| ip.is_none_or(|ip| net.contains(&ip)))
            .collect()
    }

    /// Drops a ban that could not be put in place, so the group is counted again.
    pub fn forget(&mut self, net: &IpNet) {
        self.bans.remove(net);
    }

    /// Forgets the bans (and their history and counts) of groups that hold
    /// `ip`, or of all groups: `bans clear` is a pardon. Returns the live
    /// bans it ended.
    pub fn clear(&mut self, ip: Option<std::net::IpAddr>, now: u64) -> Vec<IpNet> {
        let ip = ip.map(crate::netaddr::canonical);
        let nets: Vec<IpNet> = self
            .bans
            .keys()
            .filter(|net| ip.is_none_or(|ip| net.contains(&ip)))
            .copied()
            .collect();
        let mut ended = Vec::new();
        for net in nets {
            if self.bans.remove(&net).is_some_and(|b| b.live_at(now)) {
                ended.push(net);
            }
        }
        match ip {
            Some(ip) => {
                let counted: Vec<IpNet> = self
                    .windows
                    .iter()
                    .map(|(net, _)| *net)
                    .filter(|net| net.contains(&ip))
                    .collect();
                for net in counted {
                    self.windows.pop(&net);
                }
            }
            None => self.windows.clear(),
        }
        ended
    }

    /// Drops records whose history no longer counts; returns whether any went.
    pub fn prune(&mut self, now: u64) -> bool {
        let keep = self.config.ttl_max.as_secs();
        let before = self.bans.len();
        self.bans
            .retain(|_, b| b.expires.saturating_add(keep) > now);
        self.bans.len() != before
    }

    pub fn table(&self) -> &BanTable {
        &self.bans
    }
}

fn heaviest(events: &VecDeque<(u64, u32, AbuseKind)>) -> AbuseKind {
    AbuseKind::ALL
        .into_iter()
        .max_by_key(|&kind| {
            events
                .iter()
                .filter(|&&(_, _, k)| k == kind)
                .map(|&(_, w, _)| u64::from(w))
                .sum::<u64>()
        })
        .unwrap_or(AbuseKind::RelayAttempt)
}

fn yes() -> bool {
    true
}
fn default_threshold() -> u32 {
    10
}
fn default_max_tracked() -> usize {
    100_000
}
fn ten_minutes() -> Duration {
    Duration::from_secs(600)
}
fn one_hour() -> Duration {
    Duration::from_secs(3600)
}
fn one_week() -> Duration {
    Duration::from_secs(7 * 86400)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ledger(threshold: u32) -> Ledger {
        Ledger::new(
            BansConfig {
                threshold,
                ..BansConfig::default()
            },
            BanTable::new(),
        )
    }

    #[test]
    fn the_threshold_within_the_window_bans() {
        let mut l = ledger(3);
        let g = net("192.0.2.9/32");
        assert_eq!(
            l.record(g, AbuseKind::RelayAttempt, 100),
            Recorded::Counted { weight: 1 }
        );
        l.record(g, AbuseKind::RelayAttempt, 101);
        let Recorded::Ban(banned, record) = l.record(g, AbuseKind::ProtocolError, 102) else {
            panic!("third event must ban");
        };
        assert_eq!(banned, g);
        assert_eq!(record.reason, AbuseKind::RelayAttempt);
        assert_eq!(record.events, 3);
        assert_eq!(record.expires, 102 + 3600);
        assert!(l.is_live_ban(&g, 103));
        // Banned: further events are not counted.
        assert_eq!(
            l.record(g, AbuseKind::RelayAttempt, 104),
            Recorded::Counted { weight: 0 }
        );
    }

    #[test]
    fn events_older_than_the_window_do_not_count() {
        let mut l = ledger(3);
        let g = net("192.0.2.9/32");
        l.record(g, AbuseKind::RelayAttempt, 0);
        l.record(g, AbuseKind::RelayAttempt, 1);
        // 600 s window: the first two are gone at 601.
        assert_eq!(
            l.record(g, AbuseKind::RelayAttempt, 601),
            Recorded::Counted { weight: 1 }
        );
        assert!(matches!(
            l.record(g, AbuseKind::RelayAttempt, 602),
            Recorded::Counted { .. }
        ));
        assert!(matches!(
            l.record(g, AbuseKind::RelayAttempt, 603),
            Recorded::Ban(..)
        ));
    }

    #[test]
    fn weights_and_groups_are_separate() {
        let mut l = ledger(10);
        let a = net("192.0.2.9/32");
        let b = net("192.0.2.10/32");
        l.record(a, AbuseKind::Smuggling, 0);
        l.record(b, AbuseKind::RelayAttempt, 0);
        assert!(matches!(
            l.record(a, AbuseKind::Pregreet, 1),
            Recorded::Ban(_, BanRecord { events: 2, .. })
        ));
        assert!(!l.is_live_ban(&b, 2));
    }

    #[test]
    fn repeat_offenders_are_banned_longer_up_to_the_cap() {
        let mut l = ledger(1);
        let g = net("2001:db8:1:2::/64");
        let mut now = 0;
        let mut lengths = Vec::new();
        for _ in 0..10 {
            let Recorded::Ban(_, r) = l.record(g, AbuseKind::AuthFailure, now) else {
                panic!("threshold 1 bans at once");
            };
            lengths.push(r.expires - now);
            now = r.expires + 1;
        }
        assert_eq!(&lengths[..4], &[3600, 7200, 14400, 28800]);
        assert_eq!(*lengths.last().unwrap(), 7 * 86400);
        // A week after the last ban ran out, the history is forgotten.
        now += 7 * 86400 + 1;
        assert!(l.prune(now));
        let Recorded::Ban(_, r) = l.record(g, AbuseKind::AuthFailure, now) else {
            panic!()
        };
        assert_eq!(r.offences, 1);
    }

    #[test]
    fn clear_pardons_one_client_or_all() {
        let mut l = ledger(1);
        let a = net("192.0.2.9/32");
        let v6 = net("2001:db8::/64");
        l.record(a, AbuseKind::RelayAttempt, 0);
        l.record(v6, AbuseKind::RelayAttempt, 0);
        assert_eq!(l.clear(Some("2001:db8::77".parse().unwrap()), 1), vec![v6]);
        assert_eq!(l.live(1).len(), 1);
        assert_eq!(l.clear(None, 1), vec![a]);
        assert!(l.live(1).is_empty());
        // Pardoned: the next offence is a first one again.
        let Recorded::Ban(_, r) = l.record(a, AbuseKind::RelayAttempt, 2) else {
            panic!()
        };
        assert_eq!(r.offences, 1);
    }

    #[test]
    fn the_tracked_set_is_bounded() {
        let mut l = Ledger::new(
            BansConfig {
                threshold: 2,
                max_tracked: 2,
                ..BansConfig::default()
            },
            BanTable::new(),
        );
        let (a, b, c) = (
            net("192.0.2.1/32"),
            net("192.0.2.2/32"),
            net("192.0.2.3/32"),
        );
        l.record(a, AbuseKind::RelayAttempt, 0);
        l.record(b, AbuseKind::RelayAttempt, 0);
        l.record(c, AbuseKind::RelayAttempt, 0);
        // `a` was forgotten, so its second event is a first one.
        assert!(matches!(
            l.record(a, AbuseKind::RelayAttempt, 1),
            Recorded::Counted { .. }
        ));
        assert!(matches!(
            l.record(c, AbuseKind::RelayAttempt, 1),
            Recorded::Ban(..)
        ));
    }

    #[test]
    fn the_ban_table_is_bounded_and_forget_counts_afresh() {
        let mut l = Ledger::new(
            BansConfig {
                threshold: 1,
                max_tracked: 2,
                ..BansConfig::default()
            },
            BanTable::new(),
        );
        let (a, b, c) = (
            net("192.0.2.1/32"),
            net("192.0.2.2/32"),
            net("192.0.2.3/32"),
        );
        assert!(matches!(
            l.record(a, AbuseKind::RelayAttempt, 0),
            Recorded::Ban(..)
        ));
        assert!(matches!(
            l.record(b, AbuseKind::RelayAttempt, 0),
            Recorded::Ban(..)
        ));
        assert_eq!(
            l.record(c, AbuseKind::RelayAttempt, 0),
            Recorded::TableFull(c)
        );
        l.forget(&a);
        assert!(matches!(
            l.record(c, AbuseKind::RelayAttempt, 1),
            Recorded::Ban(..)
        ));
        assert!(matches!(
            l.record(a, AbuseKind::RelayAttempt, 1),
            Recorded::TableFull(_)
        ));
    }

    #[test]
    fn covering_and_clear_take_mapped_addresses_as_ipv4() {
        let mut l = ledger(1);
        let g = net("192.0.2.9/32");
        l.record(g, AbuseKind::RelayAttempt, 0);
        let mapped: std::net::IpAddr = "::ffff:192.0.2.9".parse().unwrap();
        assert_eq!(l.covering(Some(mapped), 1).len(), 1);
        assert_eq!(l.clear(Some(mapped), 1), vec![g]);
    }

    #[test]
    fn config_errors_are_named() {
        let mut findings = Findings::default();
        BansConfig {
            threshold: 0,
            ttl: Duration::from_secs(7200),
            ttl_max: Duration::from_secs(3600),
            ..BansConfig::default()
        }
        .check(&mut findings);
        let text = findings.errors.join("\n");
        assert!(text.contains("bans.threshold"), "{text}");
        assert!(text.contains("bans.ttl_max"), "{text}");
    }
}
