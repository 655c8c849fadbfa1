//! A client's verdict: each zone's answer and the score they add up to. Pure.

use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnswerKind {
    Listed,
    /// NXDOMAIN, no A records, or records that do not count (filter, 127.0.0.1).
    NotListed,
    /// The zone answered with an error code (127.255.255.x, outside 127/8...).
    Error,
    /// No answer before the deadline: fail open.
    Timeout,
    /// SERVFAIL, REFUSED or a transport error: fail open.
    Failed,
    /// Not asked: the zone is out of scoring (unhealthy).
    Skipped,
}

/// One zone's part of a verdict, as `check` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZoneAnswer {
    pub zone: String,
    pub weight: i32,
    pub answer: AnswerKind,
    /// The A records received, listing or not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub codes: Vec<Ipv4Addr>,
    /// The zone's TXT record for a listed client: usually the reason and a lookup URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub txt: Option<String>,
    /// What an error code means, why a query failed or a zone was skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub client: IpAddr,
    pub score: i32,
    /// Score reached the threshold: refuse and drop in the kernel.
    pub listed: bool,
    /// Score at or below the allowlist threshold.
    pub trusted: bool,
    /// The listing zone with the highest weight, named in the 554 reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked_by: Option<String>,
    pub zones: Vec<ZoneAnswer>,
    /// Unix seconds.
    pub checked_at: u64,
    /// Unix seconds; the cache and the kernel entry both end here.
    pub expires_at: u64,
}

/// Thresholds that turn answers into a verdict.
#[derive(Debug, Clone, Copy)]
pub struct Scoring {
    pub threshold: i32,
    pub allowlist_threshold: Option<i32>,
}

impl Verdict {
    pub fn new(
        client: IpAddr,
        zones: Vec<ZoneAnswer>,
        scoring: Scoring,
        checked_at: u64,
        expires_at: u64,
    ) -> Verdict {
        let listed_zones = || zones.iter().filter(|z| z.answer == AnswerKind::Listed);
        let score = listed_zones().map(|z| z.weight).sum::<i32>();
        let listed = score >= scoring.threshold;
        let blocked_by = listed
            .then(|| {
                listed_zones()
                    .filter(|z| z.weight > 0)
                    // max_by_key keeps the last of equals; reversing keeps the first configured.
                    .rev()
                    .max_by_key(|z| z.weight)
                    .map(|z| z.zone.clone())
            })
            .flatten();
        let trusted = scoring.allowlist_threshold.is_some_and(|t| score <= t);
        Verdict {
            client,
            score,
            listed,
            trusted,
            blocked_by,
            zones,
            checked_at,
            expires_at,
        }
    }

    pub fn remaining_secs(&self, now: u64) -> u64 {
        self.expires_at.saturating_sub(now)
    }

    /// How `check` names the outcome.
    pub fn label(&self) -> &'static str {
        if self.listed {
            "listed"
        } else if self.trusted {
            "trusted"
        } else {
            "clean"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(zone: &str, weight: i32, answer: AnswerKind) -> ZoneAnswer {
        ZoneAnswer {
            zone: zone.into(),
            weight,
            answer,
            codes: vec![],
            txt: None,
            detail: None,
        }
    }

    fn verdict(zones: Vec<ZoneAnswer>, threshold: i32, allow: Option<i32>) -> Verdict {
        let scoring = Scoring {
            threshold,
            allowlist_threshold: allow,
        };
        Verdict::new("192.0.2.1".parse().unwrap(), zones, scoring, 0, 60)
    }

    #[test]
    fn weights_add_up_to_the_threshold() {
        use AnswerKind::*;
        let one = verdict(
            vec![answer("a.test", 1, Listed), answer("b.test", 1, NotListed)],
            2,
            None,
        );
        assert!(!one.listed && one.score == 1 && one.blocked_by.is_none());
        let both = verdict(
            vec![answer("a.test", 1, Listed), answer("b.test", 1, Listed)],
            2,
            None,
        );
        assert!(both.listed);
        assert_eq!(both.blocked_by.as_deref(), Some("a.test"));
    }

    #[test]
    fn the_heaviest_listing_zone_is_named() {
        use AnswerKind::*;
        let v = verdict(
            vec![answer("a.test", 1, Listed), answer("b.test", 3, Listed)],
            1,
            None,
        );
        assert_eq!(v.blocked_by.as_deref(), Some("b.test"));
    }

    #[test]
    fn allowlists_cancel_and_trust() {
        use AnswerKind::*;
        let cancelled = verdict(
            vec![answer("bl.test", 2, Listed), answer("wl.test", -2, Listed)],
            2,
            Some(-1),
        );
        assert!(!cancelled.listed && !cancelled.trusted && cancelled.score == 0);
        let trusted = verdict(
            vec![
                answer("bl.test", 2, NotListed),
                answer("wl.test", -2, Listed),
            ],
            2,
            Some(-1),
        );
        assert!(trusted.trusted && trusted.label() == "trusted");
    }

    #[test]
    fn errors_timeouts_and_skips_never_count() {
        use AnswerKind::*;
        let v = verdict(
            vec![
                answer("a.test", 5, Error),
                answer("b.test", 5, Timeout),
                answer("c.test", 5, Skipped),
                answer("d.test", 5, Failed),
            ],
            1,
            None,
        );
        assert!(!v.listed && v.score == 0);
    }
}
