//! Connection-time DNSBL screening and the `check`/`dnsbl` control verbs:
//! where the DNSBL engine's verdicts become kernel entries.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use anyhow::Result;
use ipnet::IpNet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tracing::{info, warn};

use crate::clock::unix_now;
use crate::cluster::{Op, Outbox, VerdictKind};
use crate::config::Config;
use crate::control::protocol::{
    CheckReport, DnsblListedEntry, DnsblStats, FlushSummary, MapState, ZoneCheck,
};
use crate::dns::{Fcrdns, ReverseDns};
use crate::dnsbl::{DnsblEngine, Verdict};
use crate::kernel::{DnsblMaps, Kernel, PrefixView};
use crate::netaddr::canonical;
use crate::smtp::{ScreenRefusal, Screening};

const CACHE_FILE: &str = "dnsbl-cache.json";

pub struct ScreenService {
    /// `None` without `[dnsbl]`: `check` still reports the map state. A
    /// reload swaps it; checks in flight finish on the engine they started on.
    engine: RwLock<Option<Arc<DnsblEngine>>>,
    kernel: Mutex<DnsblMaps>,
    allow: PrefixView,
    deny: PrefixView,
    relay_networks: RwLock<Vec<IpNet>>,
    cache_path: PathBuf,
    blocked: Counter,
    /// Forward-confirmed reverse DNS, when the config asks for it.
    fcrdns: RwLock<Option<Arc<FcrdnsCheck>>>,
    /// DNSBL listings go to the fleet too.
    outbox: Outbox,
}

/// How FCrDNS counts: a refusal of its own, and/or weight on the DNSBL score.
struct FcrdnsCheck {
    rdns: ReverseDns,
    require: bool,
    weight: i32,
}

/// The FCrDNS check `config` asks for, with the DNSBL's nameservers and
/// deadline when `[dnsbl]` is there (else the system's and 5 s).
fn fcrdns_check(config: &Config) -> Result<Option<Arc<FcrdnsCheck>>> {
    let require = config
        .smtp
        .as_ref()
        .is_some_and(|s| s.client_require_fcrdns);
    let weight = config.dnsbl.as_ref().map_or(0, |d| d.fcrdns_weight);
    if !require && weight == 0 {
        return Ok(None);
    }
    let (servers, timeout) = match &config.dnsbl {
        Some(d) => (d.nameservers.clone(), d.timeout),
        None => (Vec::new(), std::time::Duration::from_secs(5)),
    };
    Ok(Some(Arc::new(FcrdnsCheck {
        rdns: ReverseDns::new(&servers, timeout)?,
        require,
        weight,
    })))
}

impl ScreenService {
    /// Opens views on the loaded maps, builds the engine and reloads the
    /// verdict cache, putting still-valid listings back into the kernel.
    pub fn new(config: &Config, kernel: &mut Kernel, outbox: Outbox) -> Result<Arc<ScreenService>> {
        let maps = kernel
            .take_dnsbl_maps()
            .ok_or_else(|| anyhow::anyhow!("the kernel DNSBL maps were already taken"))?;
        let service = ScreenService {
            engine: RwLock::new(config.dnsbl.clone().map(DnsblEngine::new).transpose()?),
            kernel: Mutex::new(maps),
            allow: PrefixView::allow(kernel.pin_dir())?,
            deny: PrefixView::deny(kernel.pin_dir())?,
            relay_networks: RwLock::new(relay_networks(config)),
            cache_path: config.state_dir.join(CACHE_FILE),
            blocked: Counter::default(),
            fcrdns: RwLock::new(fcrdns_check(config)?),
            outbox,
        };
        service.reload_cache();
        Ok(Arc::new(service))
    }

    /// The engine serving now (a reload builds its successor from it).
    pub fn engine(&self) -> Option<Arc<DnsblEngine>> {
        self.engine
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Applies a reloaded config: the new engine (built and health-checked by
    /// the caller) and relay networks serve the next screen. Verdicts carry
    /// over unless the zone set or threshold changed; then the cache goes and
    /// so do the kernel entries its verdicts made. Returns whether they went.
    pub fn reconfigure(
        &self,
        engine: Option<Arc<DnsblEngine>>,
        config: &Config,
    ) -> Result<bool, ScreenError> {
        let old = self.engine();
        let same_verdicts = match (&old, &engine) {
            (Some(old), Some(new)) => old.config().fingerprint() == new.config().fingerprint(),
            (None, None) => true,
            _ => false,
        };
        if let (true, Some(old), Some(new)) = (same_verdicts, &old, &engine) {
            new.adopt_cache(old);
        }
        *self.engine.write().unwrap_or_else(PoisonError::into_inner) = engine;
        self.reconfigure_relay_networks(config);
        if same_verdicts || old.is_none() {
            return Ok(false);
        }
        let removed = self
            .kernel()
            .flush()
            .map_err(|e| ScreenError::Kernel(format!("{e:#}")))?;
        info!(
            kernel_entries = removed,
            "DNSBL zones or threshold changed: verdicts dropped"
        );
        Ok(true)
    }

    /// `smtp.client_require_fcrdns` and `dnsbl.fcrdns_weight`, from a reload.
    pub fn reconfigure_fcrdns(&self, config: &Config) -> Result<()> {
        let check = fcrdns_check(config)?;
        *self.fcrdns.write().unwrap_or_else(PoisonError::into_inner) = check;
        Ok(())
    }

    /// Relay networks are never DNSBL-checked: they follow `smtp.relay_networks`.
    pub fn reconfigure_relay_networks(&self, config: &Config) {
        *self
            .relay_networks
            .write()
            .unwrap_or_else(PoisonError::into_inner) = relay_networks(config);
    }

    fn reload_cache(&self) {
        let Some(engine) = self.engine() else { return };
        let now = unix_now();
        let loaded = engine
            .cache()
            .load(&self.cache_path, &engine.config().fingerprint(), now);
        match loaded {
            Ok(0) => {}
            Ok(count) => {
                let listed: Vec<Arc<Verdict>> = engine
                    .cache()
                    .live(now)
                    .into_iter()
                    .filter(|v| v.listed)
                    .collect();
                for verdict in &listed {
                    self.feed_kernel(verdict);
                }
                info!(
                    verdicts = count,
                    listed = listed.len(),
                    "DNSBL verdict cache reloaded"
                );
            }
            // A cache is not precious: start empty rather than refuse to start.
            Err(e) => {
                warn!(error = %e, "DNSBL verdict cache unreadable; starting with an empty cache")
            }
        }
    }

    /// Saves still-valid verdicts for the next start.
    pub fn save_cache(&self) {
        let Some(engine) = self.engine() else { return };
        let fingerprint = engine.config().fingerprint();
        let saved = engine
            .cache()
            .save(&self.cache_path, &fingerprint, unix_now());
        match saved {
            Ok(count) => info!(verdicts = count, "DNSBL verdict cache saved"),
            Err(e) => {
                warn!(error = %e, path = %self.cache_path.display(), "saving the DNSBL verdict cache failed")
            }
        }
    }

    /// Checks zone health once now; returns the engine, whose
    /// `watch_health` then re-checks every `health_interval`.
    pub async fn start_health_checks(&self) -> Option<Arc<DnsblEngine>> {
        let engine = self.engine()?;
        engine.check_health().await;
        for (zone, health) in engine.zone_health() {
            info!(%zone, health = health.name(), "DNSBL zone checked");
        }
        Some(engine)
    }

    /// The connection-time decision for every client the SMTP front end
    /// accepts. XDP should have dropped a listed source already; this is the
    /// second line for whatever reached us anyway (a `listen` port missing
    /// from `protected_ports`, an interface XDP is not attached to, a frame
    /// XDP passed). The order is XDP's: allowlist, denylist, live DNSBL
    /// entries; then, for screened clients, the DNSBL engine, whose listed
    /// verdicts go into the kernel.
    pub async fn screen(&self, client: IpAddr) -> Screening {
        let client = canonical(client);
        if self.allow.matches(client) {
            return Screening::Pass;
        }
        if self.deny.matches(client) {
            info!(%client, "denylisted client reached the SMTP front end; refused");
            return Screening::Refuse(ScreenRefusal::Denylisted(format!(
                "554 5.7.1 Service unavailable; client [{client}] is denylisted"
            )));
        }
        if self.kernel().lookup(client).is_some() {
            self.blocked.inc();
            let zone = self.listing_zone(client);
            info!(%client, %zone, "DNSBL-listed client reached the SMTP front end; refused");
            return Screening::Refuse(ScreenRefusal::Dnsbl(dnsbl_reply(client, &zone)));
        }
        // The allowlist was consulted above; relay networks are never DNSBL-checked.
        if self.in_relay_networks(client) {
            return Screening::Pass;
        }
        let fcrdns = self
            .fcrdns
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let engine = self.engine();
        // Both within their deadlines, side by side: no extra latency.
        let (verdict, reverse) = tokio::join!(
            async {
                match &engine {
                    Some(engine) => Some(engine.check(client, false).await.verdict),
                    None => None,
                }
            },
            async {
                match &fcrdns {
                    Some(check) => Some(check.rdns.check(client).await),
                    None => None,
                }
            }
        );
        let unconfirmed = reverse == Some(Fcrdns::Unconfirmed);
        if let (Some(check), true) = (&fcrdns, unconfirmed) {
            if check.require {
                info!(%client, "client without forward-confirmed reverse DNS refused");
                return Screening::Refuse(ScreenRefusal::Fcrdns(format!(
                    "450 4.7.25 Client host rejected: cannot find your hostname, [{client}]"
                )));
            }
        }
        let Some(verdict) = verdict else {
            return Screening::Pass;
        };
        if let (Some(check), true, false) = (&fcrdns, unconfirmed, verdict.listed) {
            let threshold = engine.as_ref().map_or(i32::MAX, |e| e.config().threshold);
            let score = verdict.score.saturating_add(check.weight);
            if check.weight != 0 && score >= threshold {
                info!(%client, score, "DNSBL score with the FCrDNS weight reaches the threshold; refused");
                return Screening::Refuse(ScreenRefusal::Fcrdns(dnsbl_reply(
                    client,
                    "reverse DNS (no FCrDNS) and DNSBL score",
                )));
            }
        }
        if verdict.listed {
            self.blocked.inc();
            self.feed_kernel(&verdict);
            let zone = verdict.blocked_by.as_deref().unwrap_or("DNSBL");
            self.outbox.publish(
                Op::Add,
                VerdictKind::Dnsbl,
                IpNet::from(client),
                Some(verdict.expires_at),
                Some(format!("DNSBL {zone} (score {})", verdict.score)),
            );
            info!(%client, %zone, score = verdict.score, "DNSBL-listed client refused");
            return Screening::Refuse(ScreenRefusal::Dnsbl(dnsbl_reply(client, zone)));
        }
        if verdict.trusted {
            Screening::Trusted
        } else {
            Screening::Pass
        }
    }

    /// The zone a live kernel DNSBL entry came from, as the cache remembers it.
    fn listing_zone(&self, client: IpAddr) -> String {
        self.engine()
            .and_then(|engine| engine.cache().get(client, unix_now()))
            .and_then(|verdict| verdict.blocked_by.clone())
            .unwrap_or_else(|| "DNSBL".into())
    }

    /// Relay networks and allowlisted prefixes are never DNSBL-checked.
    fn is_screened(&self, client: IpAddr) -> bool {
        !self.in_relay_networks(client) && !self.allow.matches(client)
    }

    /// Whether `net` and a relay network share any address.
    pub fn overlaps_relay_networks(&self, net: &IpNet) -> bool {
        self.relay_networks
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .any(|n| n.contains(net) || net.contains(n))
    }

    fn in_relay_networks(&self, client: IpAddr) -> bool {
        self.relay_networks
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .any(|n| n.contains(&client))
    }

    fn kernel(&self) -> MutexGuard<'_, DnsblMaps> {
        self.kernel.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn feed_kernel(&self, verdict: &Verdict) {
        if let Err(e) = self.kernel().insert(verdict.client, verdict.expires_at) {
            warn!(client = %verdict.client, error = %format!("{e:#}"), "DNSBL verdict not fed into the kernel");
        }
    }

    pub async fn check(&self, client: IpAddr, fresh: bool) -> CheckReport {
        let client = canonical(client);
        let dnsbl_until = self.kernel().lookup(client).map(|e| e.expires);
        let (allowlisted, denylisted) = (self.allow.matches(client), self.deny.matches(client));
        let xdp_verdict = if allowlisted {
            "pass_allow"
        } else if denylisted {
            "drop_deny"
        } else if dnsbl_until.is_some() {
            "drop_dnsbl"
        } else {
            "pass"
        };
        let mut report = CheckReport {
            ip: client.to_string(),
            map_state: MapState {
                allowlisted,
                denylisted,
                dnsbl_until,
                xdp_verdict: xdp_verdict.into(),
            },
            screened: self.engine().is_some() && self.is_screened(client),
            verdict: "not_configured".into(),
            score: None,
            threshold: None,
            blocked_by: None,
            zones: Vec::new(),
            ttl_secs: None,
            cached: false,
        };
        if let Some(engine) = self.engine() {
            let checked = engine.check(client, fresh).await;
            let verdict = &checked.verdict;
            let health: std::collections::HashMap<String, _> =
                engine.zone_health().into_iter().collect();
            report.verdict = verdict.label().into();
            report.score = Some(verdict.score);
            report.threshold = Some(engine.config().threshold);
            report.blocked_by = verdict.blocked_by.clone();
            report.ttl_secs = Some(verdict.remaining_secs(unix_now()));
            report.cached = checked.cached;
            report.zones = verdict
                .zones
                .iter()
                .map(|answer| ZoneCheck {
                    health: health[&answer.zone],
                    answer: answer.clone(),
                })
                .collect();
        }
        report
    }

    pub fn list(&self) -> Vec<DnsblListedEntry> {
        let now = unix_now();
        let live = self.kernel().live();
        let engine = self.engine();
        let entries = live
            .into_iter()
            .map(|entry| {
                let verdict = engine
                    .as_ref()
                    .and_then(|engine| engine.cache().get(entry.client, now));
                let txt = verdict.as_ref().and_then(|v| {
                    v.zones
                        .iter()
                        .find(|z| Some(&z.zone) == v.blocked_by.as_ref())?
                        .txt
                        .clone()
                });
                DnsblListedEntry {
                    ip: entry.client.to_string(),
                    expires: entry.expires,
                    remaining_secs: entry.expires.saturating_sub(now),
                    blocked_by: verdict.and_then(|v| v.blocked_by.clone()),
                    txt,
                }
            })
            .collect();
        entries
    }

    /// Forgets verdicts so the next connection is checked afresh.
    pub fn flush(&self, client: Option<IpAddr>) -> Result<FlushSummary, ScreenError> {
        let mut summary = FlushSummary::default();
        let result = match client.map(canonical) {
            Some(client) => {
                let was_live = self.kernel().lookup(client).is_some();
                self.kernel().remove(client).map(|_| {
                    summary.kernel_entries_removed = usize::from(was_live);
                    if let Some(engine) = self.engine() {
                        summary.cached_verdicts_removed =
                            usize::from(engine.cache().remove(client));
                    }
                })
            }
            None => self.kernel().flush().map(|removed| {
                summary.kernel_entries_removed = removed;
                if let Some(engine) = self.engine() {
                    summary.cached_verdicts_removed = engine.cache().clear();
                }
            }),
        };
        result.map_err(|e| ScreenError::Kernel(format!("{e:#}")))?;
        info!(
            ?client,
            kernel = summary.kernel_entries_removed,
            cached = summary.cached_verdicts_removed,
            "DNSBL verdicts flushed"
        );
        Ok(summary)
    }

    pub fn sweep(&self) {
        match self.kernel().sweep() {
            Ok(0) => {}
            Ok(count) => info!(count, "expired DNSBL entries swept from the kernel"),
            Err(e) => warn!(error = %format!("{e:#}"), "sweeping the kernel DNSBL map failed"),
        }
    }

    /// Registers the engine's families and `blocked` (under `gatekeeper_dnsbl_*`).
    pub fn register(&self, registry: &mut Registry) {
        let Some(engine) = self.engine() else { return };
        engine.register(registry);
        registry.register(
            "blocked",
            "Connections refused because of a DNSBL listing (and fed into the kernel)",
            self.blocked.clone(),
        );
    }

    pub fn report(&self) -> Option<DnsblStats> {
        let engine = self.engine()?;
        Some(DnsblStats {
            engine: engine.report(),
            blocked: self.blocked.get(),
            kernel_entries: self.kernel().live().len(),
        })
    }
}

fn relay_networks(config: &Config) -> Vec<IpNet> {
    config
        .smtp
        .as_ref()
        .map(|s| s.relay_networks.clone())
        .unwrap_or_default()
}

fn dnsbl_reply(client: IpAddr, zone: &str) -> String {
    format!("554 5.7.1 Service unavailable; client [{client}] blocked using {zone}")
}

#[derive(Debug, thiserror::Error)]
pub enum ScreenError {
    #[error("kernel DNSBL map update failed: {0}")]
    Kernel(String),
}
