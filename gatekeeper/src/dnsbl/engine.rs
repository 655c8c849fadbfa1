//! The DNSBL engine: asks every zone in parallel with hickory-resolver,
//! turns the answers into a verdict by the deadline, caches it and makes
//! concurrent checks of one address share a single set of queries.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Result;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::TokioResolver;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{timeout_at, Instant};
use tracing::debug;

use super::answer::{classify, query_name, Classified};
use super::cache::VerdictCache;
use super::config::DnsblConfig;
use super::health::{judge_test_points, ZoneFamilies, ZoneReport, ZoneState};
use super::verdict::{AnswerKind, Scoring, Verdict, ZoneAnswer};
use crate::clock::unix_now;
use crate::metrics::{labelled, Labelled};
use crate::netaddr::canonical;

type Pending = watch::Receiver<Option<Arc<Verdict>>>;

pub struct DnsblEngine {
    config: DnsblConfig,
    resolver: TokioResolver,
    zones: Vec<ZoneState>,
    cache: Mutex<VerdictCache>,
    inflight: Mutex<HashMap<IpAddr, Pending>>,
    slots: Semaphore,
    metrics: EngineMetrics,
}

/// The engine's metric handles; `checks` is split by `cache="hit"|"miss"`.
/// Clones share the series, so a reloaded engine counts on where the old one stopped.
#[derive(Clone)]
struct EngineMetrics {
    checks: Labelled,
    cache_hits: Counter,
    cache_misses: Counter,
    coalesced: Counter,
    overloaded: Counter,
    zones: ZoneFamilies,
}

impl Default for EngineMetrics {
    fn default() -> Self {
        let checks = Labelled::default();
        EngineMetrics {
            cache_hits: labelled(&checks, "cache", "hit"),
            cache_misses: labelled(&checks, "cache", "miss"),
            checks,
            coalesced: Counter::default(),
            overloaded: Counter::default(),
            zones: ZoneFamilies::default(),
        }
    }
}

/// A verdict and whether it came from the cache.
pub struct Checked {
    pub verdict: Arc<Verdict>,
    pub cached: bool,
}

/// The engine's part of `gatekeeper stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DnsblReport {
    pub zones: Vec<ZoneReport>,
    pub checks: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    /// `cache_hits / checks`; 0 before the first check.
    pub cache_hit_ratio: f64,
    pub cache_entries: usize,
    /// Checks that joined an identical check already in flight.
    pub coalesced: u64,
    /// Checks that found every `max_inflight` slot busy until the deadline.
    pub overloaded: u64,
}

/// One A lookup's outcome before a zone's filter is applied.
enum RawAnswer {
    Records { codes: Vec<Ipv4Addr>, ttl: u32 },
    NoRecords { negative_ttl: Option<u32> },
    Timeout,
    Failed(String),
}

impl DnsblEngine {
    pub fn new(config: DnsblConfig) -> Result<Arc<DnsblEngine>> {
        Self::with_metrics(config, EngineMetrics::default())
    }

    /// The engine for a reloaded `[dnsbl]`: new zones, resolver and limits,
    /// the same metric series (already in the registry).
    pub fn successor(&self, config: DnsblConfig) -> Result<Arc<DnsblEngine>> {
        Self::with_metrics(config, self.metrics.clone())
    }

    fn with_metrics(config: DnsblConfig, metrics: EngineMetrics) -> Result<Arc<DnsblEngine>> {
        let resolver = build_resolver(&config)?;
        Ok(Arc::new(DnsblEngine {
            zones: config
                .zones
                .iter()
                .map(|spec| ZoneState::new(spec.clone(), &metrics.zones))
                .collect(),
            cache: Mutex::new(VerdictCache::new(config.cache_size)),
            inflight: Mutex::new(HashMap::new()),
            slots: Semaphore::new(config.max_inflight),
            resolver,
            config,
            metrics,
        }))
    }

    /// Registers every family under `gatekeeper_dnsbl_*`.
    pub fn register(&self, registry: &mut Registry) {
        let m = &self.metrics;
        registry.register(
            "checks",
            "Verdicts asked for, by whether the cache had one",
            m.checks.clone(),
        );
        registry.register(
            "coalesced",
            "Checks that joined an identical check already in flight",
            m.coalesced.clone(),
        );
        registry.register(
            "overloaded",
            "Checks let in unchecked because every max_inflight slot stayed busy",
            m.overloaded.clone(),
        );
        m.zones.register(registry);
    }

    pub fn config(&self) -> &DnsblConfig {
        &self.config
    }

    /// Takes over `old`'s verdicts (a reload that kept the zones and threshold).
    pub fn adopt_cache(&self, old: &DnsblEngine) {
        let mut verdicts = std::mem::replace(&mut *old.cache(), VerdictCache::new(1));
        verdicts.resize(self.config.cache_size);
        *self.cache() = verdicts;
    }

    pub fn cache(&self) -> MutexGuard<'_, VerdictCache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The verdict for `client`: from the cache unless `fresh`, otherwise
    /// from one set of queries shared with any concurrent check of it.
    pub async fn check(self: &Arc<Self>, client: IpAddr, fresh: bool) -> Checked {
        let client = canonical(client);
        if !fresh {
            if let Some(verdict) = self.cache().get(client, unix_now()) {
                self.metrics.cache_hits.inc();
                return Checked {
                    verdict,
                    cached: true,
                };
            }
        }
        self.metrics.cache_misses.inc();
        let mut pending = self.join_or_start(client);
        let verdict = match pending.wait_for(Option::is_some).await {
            Ok(done) => done.clone(),
            Err(_) => None, // the evaluating task died: fail open below
        };
        Checked {
            verdict: verdict.unwrap_or_else(|| Arc::new(self.fail_open(client, "check aborted"))),
            cached: false,
        }
    }

    fn join_or_start(self: &Arc<Self>, client: IpAddr) -> Pending {
        let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pending) = inflight.get(&client) {
            self.metrics.coalesced.inc();
            return pending.clone();
        }
        let (done, pending) = watch::channel(None);
        inflight.insert(client, pending.clone());
        // A task of its own, so a client that hangs up does not cancel the others' verdict.
        let engine = self.clone();
        tokio::spawn(async move {
            let (verdict, checked) = engine.evaluate(client).await;
            let verdict = Arc::new(verdict);
            // An unchecked client is let in once, never remembered as clean:
            // a flood that saturates the engine must not buy its bots a pass.
            if checked {
                engine.cache().insert(verdict.clone());
            }
            engine
                .inflight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&client);
            let _ = done.send(Some(verdict));
        });
        pending
    }

    /// The verdict, and whether the zones were really asked (false when every
    /// `max_inflight` slot stayed busy until the deadline).
    async fn evaluate(self: &Arc<Self>, client: IpAddr) -> (Verdict, bool) {
        let deadline = Instant::now() + self.config.timeout;
        let Ok(Ok(_slot)) = timeout_at(deadline, self.slots.acquire()).await else {
            self.metrics.overloaded.inc();
            return (
                self.fail_open(client, "max_inflight checks already running"),
                false,
            );
        };
        let mut lookups = JoinSet::new();
        for index in 0..self.zones.len() {
            let engine = self.clone();
            lookups.spawn(async move {
                let result = engine.ask_zone(index, client, deadline).await;
                (index, result)
            });
        }
        let mut answers: Vec<Option<(ZoneAnswer, Option<u32>)>> = vec![None; self.zones.len()];
        while let Some(joined) = lookups.join_next().await {
            if let Ok((index, result)) = joined {
                answers[index] = Some(result);
            }
        }
        let mut ttl = self.config.max_ttl.as_secs();
        let zones = answers
            .into_iter()
            .zip(&self.zones)
            .map(|(answer, zone)| {
                let (answer, zone_ttl) = answer.unwrap_or_else(|| {
                    (
                        zone_answer(
                            zone,
                            AnswerKind::Failed,
                            vec![],
                            Some("lookup task failed".into()),
                        ),
                        None,
                    )
                });
                ttl = ttl.min(zone_ttl.map_or(self.config.min_ttl.as_secs(), u64::from));
                answer
            })
            .collect();
        let ttl = ttl.clamp(self.config.min_ttl.as_secs(), self.config.max_ttl.as_secs());
        let now = unix_now();
        (
            Verdict::new(client, zones, self.scoring(), now, now + ttl),
            true,
        )
    }

    /// One zone's answer for `client` and the TTL it may be cached for.
    async fn ask_zone(
        &self,
        index: usize,
        client: IpAddr,
        deadline: Instant,
    ) -> (ZoneAnswer, Option<u32>) {
        let zone = &self.zones[index];
        if !zone.health().scores() {
            let detail = format!("out of scoring: {}", zone.health().name());
            return (
                zone_answer(zone, AnswerKind::Skipped, vec![], Some(detail)),
                None,
            );
        }
        let name = query_name(client, &zone.spec.name);
        let started = Instant::now();
        let raw = self.lookup_a(&name, deadline).await;
        zone.observe_lookup(started.elapsed());
        let (mut answer, ttl) = interpret(zone, raw);
        if answer.answer == AnswerKind::Listed {
            answer.txt = self.lookup_txt(&name, deadline).await;
        }
        zone.record(&answer);
        (answer, ttl)
    }

    async fn lookup_a(&self, name: &str, deadline: Instant) -> RawAnswer {
        match timeout_at(deadline, self.resolver.lookup(name, RecordType::A)).await {
            Err(_) => RawAnswer::Timeout,
            Ok(Ok(lookup)) => {
                let mut ttl = u32::MAX;
                let codes = lookup
                    .answers()
                    .iter()
                    .filter_map(|record| match &record.data {
                        RData::A(a) => {
                            ttl = ttl.min(record.ttl);
                            Some(a.0)
                        }
                        _ => None,
                    })
                    .collect::<Vec<_>>();
                if codes.is_empty() {
                    RawAnswer::NoRecords { negative_ttl: None }
                } else {
                    RawAnswer::Records { codes, ttl }
                }
            }
            Ok(Err(NetError::Dns(DnsError::NoRecordsFound(none))))
                if matches!(
                    none.response_code,
                    ResponseCode::NXDomain | ResponseCode::NoError
                ) =>
            {
                RawAnswer::NoRecords {
                    negative_ttl: none.negative_ttl,
                }
            }
            Ok(Err(NetError::Timeout)) => RawAnswer::Timeout,
            Ok(Err(e)) => {
                debug!(%name, error = %e, "DNSBL query failed");
                RawAnswer::Failed(e.to_string())
            }
        }
    }

    /// The zone's TXT record, usually its reason and a lookup URL; best effort.
    async fn lookup_txt(&self, name: &str, deadline: Instant) -> Option<String> {
        let lookup = timeout_at(deadline, self.resolver.lookup(name, RecordType::TXT))
            .await
            .ok()?
            .ok()?;
        let texts: Vec<String> = lookup
            .answers()
            .iter()
            .filter_map(|record| match &record.data {
                RData::TXT(txt) => Some(
                    txt.txt_data
                        .iter()
                        .map(|part| String::from_utf8_lossy(part).into_owned())
                        .collect::<String>(),
                ),
                _ => None,
            })
            .collect();
        (!texts.is_empty()).then(|| texts.join("; "))
    }

    /// Asks every zone for its RFC 5782 test points and updates its health.
    pub async fn check_health(self: &Arc<Self>) {
        let mut probes = JoinSet::new();
        for index in 0..self.zones.len() {
            let engine = self.clone();
            probes.spawn(async move {
                let zone = &engine.zones[index];
                let deadline = Instant::now() + engine.config.timeout;
                let probe = |last_octet: u8| {
                    let name = query_name(
                        IpAddr::V4(Ipv4Addr::new(127, 0, 0, last_octet)),
                        &zone.spec.name,
                    );
                    let engine = &engine;
                    async move { interpret(zone, engine.lookup_a(&name, deadline).await).0 }
                };
                let (two, one) = tokio::join!(probe(2), probe(1));
                zone.set_health(judge_test_points(&two, &one));
            });
        }
        while probes.join_next().await.is_some() {}
    }

    /// Health checks every `health_interval` until the task is dropped.
    pub async fn watch_health(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.config.health_interval);
        tick.tick().await; // the start-up check already ran
        loop {
            tick.tick().await;
            self.check_health().await;
        }
    }

    pub fn report(&self) -> DnsblReport {
        let m = &self.metrics;
        let (hits, misses) = (m.cache_hits.get(), m.cache_misses.get());
        let checks = hits + misses;
        DnsblReport {
            zones: self.zones.iter().map(ZoneState::report).collect(),
            checks,
            cache_hits: hits,
            cache_misses: misses,
            cache_hit_ratio: if checks == 0 {
                0.0
            } else {
                hits as f64 / checks as f64
            },
            cache_entries: self.cache().len(),
            coalesced: m.coalesced.get(),
            overloaded: m.overloaded.get(),
        }
    }

    pub fn zone_health(&self) -> Vec<(String, super::health::Health)> {
        self.zones
            .iter()
            .map(|z| (z.spec.name.clone(), z.health()))
            .collect()
    }

    fn scoring(&self) -> Scoring {
        Scoring {
            threshold: self.config.threshold,
            allowlist_threshold: self.config.allowlist_threshold,
        }
    }

    /// Not listed, cached only briefly: DNS trouble must not block mail.
    fn fail_open(&self, client: IpAddr, why: &str) -> Verdict {
        let zones = self
            .zones
            .iter()
            .map(|zone| zone_answer(zone, AnswerKind::Timeout, vec![], Some(why.into())))
            .collect();
        let now = unix_now();
        Verdict::new(
            client,
            zones,
            self.scoring(),
            now,
            now + self.config.min_ttl.as_secs(),
        )
    }
}

fn zone_answer(
    zone: &ZoneState,
    answer: AnswerKind,
    codes: Vec<Ipv4Addr>,
    detail: Option<String>,
) -> ZoneAnswer {
    ZoneAnswer {
        zone: zone.spec.name.clone(),
        weight: zone.spec.weight,
        answer,
        codes,
        txt: None,
        detail,
    }
}

/// A zone's answer from one A lookup, and how long it may be cached
/// (`None`: the verdict's minimum; error answers and failures are not trusted longer).
fn interpret(zone: &ZoneState, raw: RawAnswer) -> (ZoneAnswer, Option<u32>) {
    match raw {
        RawAnswer::Records { codes, ttl } => match classify(&zone.spec, &codes) {
            Classified::Listed(_) => (
                zone_answer(zone, AnswerKind::Listed, codes, None),
                Some(ttl),
            ),
            Classified::NotListed => (
                zone_answer(zone, AnswerKind::NotListed, codes, None),
                Some(ttl),
            ),
            Classified::Error { meaning, .. } => (
                zone_answer(zone, AnswerKind::Error, codes, Some(meaning.into())),
                None,
            ),
        },
        RawAnswer::NoRecords { negative_ttl } => (
            zone_answer(zone, AnswerKind::NotListed, vec![], None),
            negative_ttl,
        ),
        RawAnswer::Timeout => (zone_answer(zone, AnswerKind::Timeout, vec![], None), None),
        RawAnswer::Failed(why) => (
            zone_answer(zone, AnswerKind::Failed, vec![], Some(why)),
            None,
        ),
    }
}

/// Our own cache replaces hickory's (so `check --fresh` really asks), and
/// names are absolute, so no search domains or hosts file get involved.
fn build_resolver(config: &DnsblConfig) -> Result<TokioResolver> {
    crate::dns::resolver(&config.nameservers, config.timeout, "dnsbl")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A nameserver that reads queries and never answers, on loopback.
    fn silent_nameserver() -> std::net::UdpSocket {
        std::net::UdpSocket::bind("127.0.0.1:0").unwrap()
    }

    fn engine(nameserver: std::net::SocketAddr, max_inflight: usize) -> Arc<DnsblEngine> {
        let config: DnsblConfig = toml::from_str(&format!(
            "zones = [\"silent.test\"]\nnameservers = [\"{nameserver}\"]\n\
             timeout = \"300ms\"\nmax_inflight = {max_inflight}"
        ))
        .unwrap();
        config.validate().unwrap();
        DnsblEngine::new(config).unwrap()
    }

    /// Paused time: the four checks share one deadline to the nanosecond, so
    /// whichever way its timers fire, the one slot cannot serve them all.
    #[tokio::test(start_paused = true)]
    async fn a_saturated_engine_lets_clients_in_without_caching_them_as_clean() {
        let server = silent_nameserver();
        let engine = engine(server.local_addr().unwrap(), 1);
        let clients: Vec<IpAddr> = (1..=4)
            .map(|i| format!("192.0.2.{i}").parse().unwrap())
            .collect();
        let checks = clients.iter().map(|&client| {
            let engine = engine.clone();
            tokio::spawn(async move { engine.check(client, false).await })
        });
        for check in checks.collect::<Vec<_>>() {
            assert!(!check.await.unwrap().verdict.listed, "fails open");
        }
        let report = engine.report();
        assert!(
            report.overloaded >= 1,
            "one slot for four simultaneous checks of one deadline: {report:?}"
        );
        let now = unix_now();
        let remembered = clients
            .iter()
            .filter(|&&client| engine.cache().get(client, now).is_some())
            .count() as u64;
        assert_eq!(
            remembered + report.overloaded,
            clients.len() as u64,
            "only checked clients are cached"
        );
    }
}
