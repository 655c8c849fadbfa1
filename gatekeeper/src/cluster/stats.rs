//! The link's counters and state: one set of handles read by
//! `cluster status`, `stats` and `/metrics`, so the views cannot disagree.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

use super::wire::Refused;
use crate::metrics::{labelled, Labelled};

/// Reasons a verdict was not applied or not kept, beyond the wire's own.
pub const LOCAL_SKIP_REASONS: [&str; 3] = ["local_precedence", "outbox_full", "apply_failed"];

/// A peer is "seen recently" if its last heartbeat is at most this old.
pub const PEER_FRESH_SECS: u64 = 60;

#[derive(Default)]
pub struct ClusterStats {
    pub connected: Gauge,
    pub published: Counter,
    pub applied: Counter,
    pub reconnects: Counter,
    pub peers_gauge: Gauge,
    lag: Gauge<f64, AtomicU64>,
    skipped: Labelled,
    state: Mutex<LinkState>,
}

#[derive(Default)]
struct LinkState {
    last_stream_id: Option<String>,
    /// Peers' last heartbeats (unix seconds), as last read.
    peers: BTreeMap<String, u64>,
    last_error: Option<String>,
}

/// `cluster status --json` and the `cluster` part of `stats --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterReport {
    pub node: String,
    pub redis: String,
    pub connected: bool,
    pub last_stream_id: Option<String>,
    /// Seconds between the newest applied verdict's publication and its
    /// application; 0 when caught up.
    pub lag_seconds: f64,
    pub applied: u64,
    pub published: u64,
    pub skipped: BTreeMap<String, u64>,
    pub reconnects: u64,
    /// Verdicts waiting to be published.
    pub pending: usize,
    pub peers: Vec<PeerReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerReport {
    pub node: String,
    /// Unix seconds of its last heartbeat.
    pub last_seen: u64,
}

impl ClusterStats {
    pub fn register(&self, registry: &mut Registry) {
        let cluster = registry.sub_registry_with_prefix("cluster");
        cluster.register(
            "connected",
            "Whether the link to the fleet's Redis is up",
            self.connected.clone(),
        );
        cluster.register(
            "published",
            "Verdicts this host published to the fleet",
            self.published.clone(),
        );
        cluster.register(
            "applied",
            "Verdicts of other hosts applied here",
            self.applied.clone(),
        );
        cluster.register(
            "skipped",
            "Received verdicts not applied (bad data, local precedence) and verdicts not kept",
            self.skipped.clone(),
        );
        cluster.register(
            "reconnects",
            "Connections to Redis re-established after a loss",
            self.reconnects.clone(),
        );
        cluster.register(
            "lag_seconds",
            "Age of the newest applied verdict when it was applied",
            self.lag.clone(),
        );
        cluster.register(
            "peers",
            "Fleet hosts with a heartbeat in the last minute, this one included",
            self.peers_gauge.clone(),
        );
        for reason in Refused::LABELS.iter().chain(LOCAL_SKIP_REASONS.iter()) {
            labelled(&self.skipped, "reason", reason);
        }
    }

    pub fn skip(&self, reason: &'static str) {
        labelled(&self.skipped, "reason", reason).inc();
    }

    pub fn set_lag(&self, seconds: f64) {
        self.lag.set(seconds.max(0.0));
    }

    pub fn set_connected(&self, up: bool, error: Option<String>) {
        self.connected.set(i64::from(up));
        let mut state = self.lock();
        if error.is_some() || up {
            state.last_error = error;
        }
    }

    pub fn set_stream_id(&self, id: &str) {
        self.lock().last_stream_id = Some(id.to_owned());
    }

    pub fn set_peers(&self, peers: BTreeMap<String, u64>, now: u64) {
        let fresh = peers
            .values()
            .filter(|&&seen| now.saturating_sub(seen) <= PEER_FRESH_SECS)
            .count();
        self.peers_gauge.set(fresh as i64);
        self.lock().peers = peers;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn report(&self) -> ClusterReport {
        let now = crate::clock::unix_now();
        let state = self.lock();
        let skipped = Refused::LABELS
            .iter()
            .chain(LOCAL_SKIP_REASONS.iter())
            .map(|reason| {
                let count = labelled(&self.skipped, "reason", reason).get();
                (reason.to_string(), count)
            })
            .collect();
        ClusterReport {
            node: String::new(),
            redis: String::new(),
            connected: self.connected.get() == 1,
            last_stream_id: state.last_stream_id.clone(),
            lag_seconds: self.lag.get(),
            applied: self.applied.get(),
            published: self.published.get(),
            skipped,
            reconnects: self.reconnects.get(),
            pending: 0,
            peers: state
                .peers
                .iter()
                .filter(|(_, &seen)| now.saturating_sub(seen) <= PEER_FRESH_SECS)
                .map(|(node, &last_seen)| PeerReport {
                    node: node.clone(),
                    last_seen,
                })
                .collect(),
            last_error: state.last_error.clone(),
        }
    }
}
