//! The fleet: verdicts this host takes are published to Redis, and the
//! verdicts other hosts took are applied here as shared list entries.
//!
//! Redis carries two things (see [`config::ClusterConfig`] for the keys): a
//! stream of ordered deltas, and a snapshot of the live shared set written in
//! the same transaction, so a host that (re)connects loads the snapshot and
//! follows the stream from the id it was taken at. The link ([`link`]) owns
//! both connections; the rest of the daemon only sees an [`Outbox`] to publish
//! into and implements [`Fleet`] to receive. With Redis away the host keeps
//! enforcing what its store holds, and the outbox keeps what it took meanwhile.

pub mod config;
mod link;
pub mod stats;
pub mod wire;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use ipnet::IpNet;
use tokio::sync::mpsc;

pub use config::ClusterConfig;
pub use link::run;
pub use stats::ClusterStats;
pub use wire::{Op, Verdict, VerdictKind};

use crate::lists::store::Change;
use crate::lists::ListKind;

/// Verdicts held while Redis is away; beyond it the oldest are not kept
/// (counted as `skipped_total{reason="outbox_full"}`).
pub const OUTBOX_CAPACITY: usize = 100_000;

/// What the link needs from the daemon: to apply verdicts, and to know
/// what local policy never drops.
pub trait Fleet: Send + Sync + 'static {
    fn apply(
        &self,
        list: ListKind,
        change: Change,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>>;
    /// An allowlisted prefix or a relay network: the fleet never drops it here.
    fn exempt(&self, net: &IpNet) -> bool;
}

/// Where the daemon's services publish verdicts. Without `[cluster]` it is
/// disabled and publishing does nothing.
#[derive(Clone, Default)]
pub struct Outbox {
    inner: Option<Arc<OutboxInner>>,
}

struct OutboxInner {
    node: String,
    queue: mpsc::Sender<Verdict>,
    stats: Arc<ClusterStats>,
}

/// The link's end of the outbox.
pub struct OutboxReceiver(mpsc::Receiver<Verdict>);

impl Outbox {
    pub fn new(node: String, stats: Arc<ClusterStats>) -> (Outbox, OutboxReceiver) {
        let (queue, receiver) = mpsc::channel(OUTBOX_CAPACITY);
        let inner = OutboxInner { node, queue, stats };
        (
            Outbox {
                inner: Some(Arc::new(inner)),
            },
            OutboxReceiver(receiver),
        )
    }

    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Verdicts waiting to be published.
    pub fn pending(&self) -> usize {
        self.inner
            .as_ref()
            .map_or(0, |i| OUTBOX_CAPACITY - i.queue.capacity())
    }

    /// This host's node name, when in a fleet.
    pub fn node(&self) -> Option<&str> {
        self.inner.as_ref().map(|i| i.node.as_str())
    }

    /// Queues a verdict for the fleet; never blocks a session.
    pub fn publish(
        &self,
        op: Op,
        kind: VerdictKind,
        net: IpNet,
        expires: Option<u64>,
        reason: Option<String>,
    ) {
        let Some(inner) = &self.inner else { return };
        let verdict = Verdict {
            op,
            kind,
            net,
            expires,
            origin: inner.node.clone(),
            reason: reason.map(|r| clean_reason(&r)),
        };
        if inner.queue.try_send(verdict).is_err() {
            inner.stats.skip("outbox_full");
        }
    }
}

/// A reason as peers will accept it: no control characters, bounded.
fn clean_reason(reason: &str) -> String {
    let mut clean: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if clean.len() > wire::MAX_REASON_BYTES {
        let mut end = wire::MAX_REASON_BYTES;
        while !clean.is_char_boundary(end) {
            end -= 1;
        }
        clean.truncate(end);
    }
    clean
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_reasons_pass_the_peers_checks() {
        let reason = clean_reason(&format!("zone\x1b[2J{}", "é".repeat(200)));
        assert!(reason.len() <= wire::MAX_REASON_BYTES);
        assert!(!reason.chars().any(char::is_control));
    }

    #[test]
    fn a_disabled_outbox_publishes_nothing() {
        let outbox = Outbox::default();
        assert!(!outbox.enabled());
        outbox.publish(
            Op::Add,
            VerdictKind::Deny,
            "192.0.2.0/24".parse().unwrap(),
            None,
            None,
        );
    }

    #[test]
    fn a_full_outbox_counts_what_it_drops() {
        let stats = Arc::new(ClusterStats::default());
        let (outbox, _receiver) = Outbox::new("a".into(), stats.clone());
        let net: IpNet = "192.0.2.1/32".parse().unwrap();
        for _ in 0..OUTBOX_CAPACITY + 3 {
            outbox.publish(Op::Add, VerdictKind::Ban, net, Some(u64::MAX), None);
        }
        assert_eq!(stats.report().skipped.get("outbox_full"), Some(&3));
    }
}
