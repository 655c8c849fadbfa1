//! Per-zone health and counters.
//!
//! A zone that lists the world (127.0.0.1 listed: an expired domain, a
//! resolver rewriting NXDOMAIN) or keeps answering with error codes is taken
//! out of scoring until its RFC 5782 test points look right again.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::verdict::{AnswerKind, ZoneAnswer};
use super::zone::ZoneSpec;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Not checked yet; scored.
    Unchecked,
    Healthy,
    /// 127.0.0.2 is not listed: unusual but not dangerous; scored.
    NoTestPoint,
    /// Test points got no answer; scored (queries fail open anyway).
    Unreachable,
    /// 127.0.0.1 is listed: out of scoring.
    ListsTheWorld,
    /// Error codes instead of verdicts: out of scoring.
    ErrorCodes,
}

impl Health {
    /// The name `stats` and `check` use.
    pub fn name(self) -> &'static str {
        match self {
            Health::Unchecked => "unchecked",
            Health::Healthy => "healthy",
            Health::NoTestPoint => "no_test_point",
            Health::Unreachable => "unreachable",
            Health::ListsTheWorld => "lists_the_world",
            Health::ErrorCodes => "error_codes",
        }
    }

    pub fn scores(self) -> bool {
        !matches!(self, Health::ListsTheWorld | Health::ErrorCodes)
    }
}

/// Error answers in a row from live queries that take a zone out of scoring.
const ERRORS_TO_SUSPEND: u32 = 3;
/// At most one log line per zone per interval for error answers.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// What the RFC 5782 test points say about a zone. Pure.
/// `listed_2` and `listed_1` are the answers for 127.0.0.2 and 127.0.0.1.
pub fn judge_test_points(answer_2: &ZoneAnswer, answer_1: &ZoneAnswer) -> Health {
    let has_records = |a: &ZoneAnswer| !a.codes.is_empty() && a.answer != AnswerKind::Error;
    let unanswered = |a: &ZoneAnswer| matches!(a.answer, AnswerKind::Timeout | AnswerKind::Failed);
    if has_records(answer_1) {
        Health::ListsTheWorld
    } else if answer_1.answer == AnswerKind::Error || answer_2.answer == AnswerKind::Error {
        Health::ErrorCodes
    } else if unanswered(answer_1) || unanswered(answer_2) {
        Health::Unreachable
    } else if !has_records(answer_2) {
        Health::NoTestPoint
    } else {
        Health::Healthy
    }
}

/// Zones come from the config, so labelling by zone keeps cardinality bounded.
type ZoneLabel = [(&'static str, String); 1];
type ZoneResultLabel = [(&'static str, String); 2];
type HistogramFamily = Family<ZoneLabel, Histogram, fn() -> Histogram>;

/// The per-zone metric families; each [`ZoneState`] holds its own handles.
#[derive(Clone)]
pub struct ZoneFamilies {
    queries: Family<ZoneResultLabel, Counter>,
    healthy: Family<ZoneLabel, Gauge>,
    scoring: Family<ZoneLabel, Gauge>,
    lookup_seconds: HistogramFamily,
}

impl Default for ZoneFamilies {
    fn default() -> Self {
        fn lookup_histogram() -> Histogram {
            Histogram::new(exponential_buckets(0.001, 2.0, 14))
        }
        ZoneFamilies {
            queries: Family::default(),
            healthy: Family::default(),
            scoring: Family::default(),
            lookup_seconds: HistogramFamily::new_with_constructor(lookup_histogram),
        }
    }
}

impl ZoneFamilies {
    /// Registers under `gatekeeper_dnsbl_*`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "queries",
            "Live DNSBL queries by zone and answer",
            self.queries.clone(),
        );
        registry.register(
            "zone_healthy",
            "1 when the zone's RFC 5782 test points answer as they should",
            self.healthy.clone(),
        );
        registry.register(
            "zone_scoring",
            "1 while the zone's answers count towards the score",
            self.scoring.clone(),
        );
        registry.register_with_unit(
            "lookup",
            "Duration of one zone's A lookup for a client",
            Unit::Seconds,
            self.lookup_seconds.clone(),
        );
    }
}

/// One zone's handles, one per answer kind.
struct ZoneCounters {
    listed: Counter,
    not_listed: Counter,
    skipped: Counter,
    error_codes: Counter,
    timeouts: Counter,
    failures: Counter,
    healthy: Gauge,
    scoring: Gauge,
    lookup_seconds: Histogram,
}

impl ZoneCounters {
    fn new(zone: &str, families: &ZoneFamilies) -> ZoneCounters {
        let query = |result: &'static str| {
            families
                .queries
                .get_or_create_owned(&[("zone", zone.to_owned()), ("result", result.to_owned())])
        };
        let label = [("zone", zone.to_owned())];
        ZoneCounters {
            listed: query("listed"),
            not_listed: query("not_listed"),
            skipped: query("skipped"),
            error_codes: query("error_code"),
            timeouts: query("timeout"),
            failures: query("failed"),
            healthy: families.healthy.get_or_create_owned(&label),
            scoring: families.scoring.get_or_create_owned(&label),
            lookup_seconds: families.lookup_seconds.get_or_create_owned(&label),
        }
    }

    fn show_health(&self, health: Health) {
        self.healthy.set(i64::from(health == Health::Healthy));
        self.scoring.set(i64::from(health.scores()));
    }
}

pub struct ZoneState {
    pub spec: ZoneSpec,
    health: Mutex<Health>,
    errors_in_a_row: AtomicU32,
    counters: ZoneCounters,
    error_log: Mutex<ErrorLog>,
}

#[derive(Default)]
struct ErrorLog {
    last: Option<Instant>,
    suppressed: u64,
}

/// One zone in `gatekeeper stats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZoneReport {
    pub zone: String,
    pub weight: i32,
    pub health: Health,
    pub queries: u64,
    /// Answers that counted as a listing.
    pub hits: u64,
    /// Everything that was not a verdict: error codes, timeouts and failures.
    pub errors: u64,
    pub error_codes: u64,
    pub timeouts: u64,
    pub failures: u64,
}

impl ZoneState {
    pub fn new(spec: ZoneSpec, families: &ZoneFamilies) -> ZoneState {
        let counters = ZoneCounters::new(&spec.name, families);
        counters.show_health(Health::Unchecked);
        ZoneState {
            spec,
            health: Mutex::new(Health::Unchecked),
            errors_in_a_row: AtomicU32::new(0),
            counters,
            error_log: Mutex::new(ErrorLog::default()),
        }
    }

    /// Times one live lookup of this zone.
    pub fn observe_lookup(&self, took: Duration) {
        self.counters.lookup_seconds.observe(took.as_secs_f64());
    }

    pub fn health(&self) -> Health {
        *self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes are logged: leaving scoring loudly, returning plainly.
    pub fn set_health(&self, new: Health) {
        let old = std::mem::replace(
            &mut *self.health.lock().unwrap_or_else(|p| p.into_inner()),
            new,
        );
        self.counters.show_health(new);
        if old == new {
            return;
        }
        let zone = &self.spec.name;
        match (old.scores(), new.scores()) {
            (true, false) => warn!(%zone, health = new.name(), "DNSBL zone taken OUT of scoring"),
            (false, true) => info!(%zone, health = new.name(), "DNSBL zone back in scoring"),
            _ if new == Health::NoTestPoint => {
                warn!(%zone, "DNSBL zone does not list its 127.0.0.2 test point")
            }
            _ => info!(%zone, from = old.name(), to = new.name(), "DNSBL zone health changed"),
        }
    }

    /// Counts a live query's answer and watches for a zone that keeps erroring.
    pub fn record(&self, answer: &ZoneAnswer) {
        let c = &self.counters;
        match answer.answer {
            AnswerKind::Listed => c.listed.inc(),
            AnswerKind::NotListed => c.not_listed.inc(),
            AnswerKind::Skipped => c.skipped.inc(),
            AnswerKind::Error => c.error_codes.inc(),
            AnswerKind::Timeout => c.timeouts.inc(),
            AnswerKind::Failed => c.failures.inc(),
        };
        if answer.answer == AnswerKind::Error {
            self.log_error_answer(answer);
            if self.errors_in_a_row.fetch_add(1, Relaxed) + 1 >= ERRORS_TO_SUSPEND {
                self.set_health(Health::ErrorCodes);
            }
        } else if matches!(answer.answer, AnswerKind::Listed | AnswerKind::NotListed) {
            self.errors_in_a_row.store(0, Relaxed);
        }
    }

    fn log_error_answer(&self, answer: &ZoneAnswer) {
        let mut log = self.error_log.lock().unwrap_or_else(|p| p.into_inner());
        let due = log.last.is_none_or(|t| t.elapsed() >= ERROR_LOG_INTERVAL);
        if !due {
            log.suppressed += 1;
            return;
        }
        let code = answer
            .codes
            .first()
            .copied()
            .unwrap_or(Ipv4Addr::UNSPECIFIED);
        warn!(
            zone = %self.spec.name,
            %code,
            meaning = answer.detail.as_deref().unwrap_or(""),
            similar_since_last_report = log.suppressed,
            "DNSBL zone answered with an error code; not used to block"
        );
        log.last = Some(Instant::now());
        log.suppressed = 0;
    }

    pub fn report(&self) -> ZoneReport {
        let c = &self.counters;
        let (error_codes, timeouts, failures) =
            (c.error_codes.get(), c.timeouts.get(), c.failures.get());
        let hits = c.listed.get();
        ZoneReport {
            zone: self.spec.name.clone(),
            weight: self.spec.weight,
            health: self.health(),
            queries: hits
                + c.not_listed.get()
                + c.skipped.get()
                + error_codes
                + timeouts
                + failures,
            hits,
            errors: error_codes + timeouts + failures,
            error_codes,
            timeouts,
            failures,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(kind: AnswerKind, codes: &[&str]) -> ZoneAnswer {
        ZoneAnswer {
            zone: "bl.test".into(),
            weight: 1,
            answer: kind,
            codes: codes.iter().map(|c| c.parse().unwrap()).collect(),
            txt: None,
            detail: None,
        }
    }

    #[test]
    fn test_points_decide_health() {
        use AnswerKind::*;
        let listed = answer(Listed, &["127.0.0.2"]);
        let nx = answer(NotListed, &[]);
        let cases = [
            (&listed, &nx, Health::Healthy),
            (
                &listed,
                &answer(Listed, &["127.0.0.2"]),
                Health::ListsTheWorld,
            ),
            // A world-listing zone with a filter that happens not to match is still caught.
            (
                &listed,
                &answer(NotListed, &["127.0.1.2"]),
                Health::ListsTheWorld,
            ),
            (
                &answer(Error, &["127.255.255.254"]),
                &nx,
                Health::ErrorCodes,
            ),
            (
                &answer(Timeout, &[]),
                &answer(Timeout, &[]),
                Health::Unreachable,
            ),
            (&nx, &nx, Health::NoTestPoint),
        ];
        for (two, one, expected) in cases {
            assert_eq!(judge_test_points(two, one), expected, "{two:?} / {one:?}");
        }
        assert!(!Health::ListsTheWorld.scores() && !Health::ErrorCodes.scores());
        assert!(Health::Unreachable.scores() && Health::NoTestPoint.scores());
    }

    #[test]
    fn repeated_error_answers_suspend_a_zone() {
        let zone = ZoneState::new(
            ZoneSpec::parse("bl.test").unwrap(),
            &ZoneFamilies::default(),
        );
        let error = answer(AnswerKind::Error, &["127.255.255.254"]);
        zone.record(&error);
        zone.record(&answer(AnswerKind::NotListed, &[]));
        zone.record(&error);
        zone.record(&error);
        assert!(zone.health().scores());
        zone.record(&error);
        assert_eq!(zone.health(), Health::ErrorCodes);
        let report = zone.report();
        assert_eq!(
            (report.queries, report.error_codes, report.errors),
            (5, 4, 4)
        );
    }
}
