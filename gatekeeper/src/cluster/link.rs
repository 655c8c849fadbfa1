//! The link to the fleet's Redis. One session: publish what waits in the
//! outbox, load the snapshot with the stream id it was taken at, then follow
//! the stream while publishing as verdicts come. Any error ends the session;
//! the supervisor backs off (100 ms doubling to 30 s) and starts a new one,
//! which resynchronises in full. Publishing first means a verdict this host
//! took while Redis was away is in the snapshot it then loads.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use redis::aio::MultiplexedConnection;
use redis::streams::{StreamRangeReply, StreamReadOptions, StreamReadReply};
use redis::{AsyncCommands, AsyncConnectionConfig, RedisError};
use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, info, warn};

use super::config::ClusterConfig;
use super::stats::ClusterStats;
use super::wire::{snapshot_field, Op, Refused, Verdict, VerdictKind};
use super::{Fleet, OutboxReceiver};
use crate::clock::unix_now;
use crate::lists::store::{Change, SharedEntry, SharedOp};
use crate::lists::ListKind;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// The stream keeps about this many deltas; a host away for longer than
/// they cover still catches up, from the snapshot.
const STREAM_MAXLEN: usize = 100_000;
/// Verdicts read, and applied as one store change, at a time.
const READ_BATCH: usize = 1_000;
/// How long one XREAD waits for news; well inside the response timeout.
const READ_BLOCK_MS: usize = 1_000;
const PUBLISH_BATCH: usize = 512;
/// Heartbeat, peer list and snapshot sweep.
const HEARTBEAT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the link until the outbox's senders are gone (daemon shutdown) or
/// the task is cancelled.
pub async fn run(
    config: ClusterConfig,
    fleet: Arc<dyn Fleet>,
    outbox: OutboxReceiver,
    stats: Arc<ClusterStats>,
) {
    // Config validation opened it once already; this cannot fail in practice.
    let client = match redis::Client::open(config.redis.as_str()) {
        Ok(client) => client,
        Err(e) => return warn!(error = %e, "cluster.redis: cannot use the URL; fleet link off"),
    };
    if config.redis.starts_with("rediss:") {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    let mut link = Link {
        client,
        config,
        fleet,
        stats,
        outbox: outbox.0,
        unsent: Vec::new(),
        ever_connected: false,
        followed_to: None,
    };
    let mut backoff = BACKOFF_MIN;
    let mut down_logged = false;
    loop {
        let mut came_up = false;
        let result = link.session(&mut came_up).await;
        if came_up {
            backoff = BACKOFF_MIN;
        }
        match result {
            Ok(()) => return, // shutting down
            Err(e) => {
                link.stats.set_connected(false, Some(e.to_string()));
                if came_up || !down_logged {
                    warn!(redis = %link.config.redacted_url(), error = %e,
                        "fleet link down; enforcing local state and retrying");
                    down_logged = true;
                } else {
                    debug!(error = %e, "fleet link still down");
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

struct Link {
    client: redis::Client,
    config: ClusterConfig,
    fleet: Arc<dyn Fleet>,
    stats: Arc<ClusterStats>,
    outbox: mpsc::Receiver<Verdict>,
    /// Taken from the outbox, not yet acknowledged by Redis.
    unsent: Vec<Verdict>,
    ever_connected: bool,
    /// The newest stream id this process has applied, across sessions.
    followed_to: Option<String>,
}

type Entries = Vec<(String, Vec<u8>)>;

impl Link {
    async fn connect(&self) -> Result<MultiplexedConnection, RedisError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        self.client
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }

    /// Ok: the outbox closed (shutdown). `came_up`: the session got as far
    /// as following the stream.
    async fn session(&mut self, came_up: &mut bool) -> Result<(), RedisError> {
        let mut conn = self.connect().await?;
        // XREAD BLOCK would hold up publishing on a shared connection.
        let reader_conn = self.connect().await?;
        if !self.flush(&mut conn, true).await? {
            return Ok(());
        }
        let from = self.resync(&mut conn).await?;
        *came_up = true;
        self.stats.set_connected(true, None);
        if self.ever_connected {
            self.stats.reconnects.inc();
        }
        self.ever_connected = true;
        info!(redis = %self.config.redacted_url(), node = %self.config.node_name, from = %from,
            "fleet link up; resynchronised");
        self.heartbeat(&mut conn).await?;
        let (batches_tx, mut batches) = mpsc::channel(4);
        let _reader = AbortOnDropHandle::new(tokio::spawn(read_stream(
            reader_conn,
            self.config.stream_key(),
            from,
            batches_tx,
        )));
        let mut tick = tokio::time::interval(HEARTBEAT);
        tick.tick().await;
        let mut taken = Vec::with_capacity(PUBLISH_BATCH);
        loop {
            tokio::select! {
                batch = batches.recv() => match batch {
                    Some(Ok(entries)) => self.apply_stream(entries).await,
                    Some(Err(e)) => return Err(e),
                    None => return Err(closed("the stream reader stopped")),
                },
                n = self.outbox.recv_many(&mut taken, PUBLISH_BATCH) => {
                    if n == 0 {
                        return Ok(());
                    }
                    self.unsent.append(&mut taken);
                    self.flush(&mut conn, false).await?;
                }
                _ = tick.tick() => self.heartbeat(&mut conn).await?,
            }
        }
    }

    /// Publishes what is unsent and, with `drain`, everything the outbox
    /// holds. False: the outbox is closed (shutdown).
    async fn flush(
        &mut self,
        conn: &mut MultiplexedConnection,
        drain: bool,
    ) -> Result<bool, RedisError> {
        loop {
            if drain && self.unsent.len() < PUBLISH_BATCH {
                let room = PUBLISH_BATCH - self.unsent.len();
                let mut more = Vec::with_capacity(room);
                match self.outbox.try_recv() {
                    Ok(first) => {
                        more.push(first);
                        while more.len() < room {
                            match self.outbox.try_recv() {
                                Ok(v) => more.push(v),
                                Err(_) => break,
                            }
                        }
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) if self.unsent.is_empty() => {
                        return Ok(false)
                    }
                    Err(_) => {}
                }
                self.unsent.append(&mut more);
            }
            if self.unsent.is_empty() {
                return Ok(true);
            }
            let now = unix_now();
            // A verdict that ran out while Redis was away is not news.
            self.unsent
                .retain(|v| v.op == Op::Del || v.expires.is_none_or(|at| at > now));
            let count = self.unsent.len();
            if count > 0 {
                self.publish_pipeline(count).query_async::<()>(conn).await?;
                self.stats.published.inc_by(count as u64);
            }
            self.unsent.clear();
            if !drain {
                return Ok(true);
            }
        }
    }

    /// One transaction: each delta onto the stream and into the snapshot.
    fn publish_pipeline(&self, count: usize) -> redis::Pipeline {
        let (stream, live, expiry) = (
            self.config.stream_key(),
            self.config.live_key(),
            self.config.expiry_key(),
        );
        let mut pipe = redis::pipe();
        pipe.atomic();
        for verdict in &self.unsent[..count] {
            let json = verdict.encode();
            pipe.cmd("XADD")
                .arg(&stream)
                .arg("MAXLEN")
                .arg("~")
                .arg(STREAM_MAXLEN)
                .arg("*")
                .arg("v")
                .arg(&json)
                .ignore();
            match verdict.op {
                Op::Add => {
                    let field = snapshot_field(verdict.kind, &verdict.net);
                    let score = verdict
                        .expires
                        .map_or_else(|| "+inf".to_owned(), |at| at.to_string());
                    pipe.hset(&live, &field, &json).ignore();
                    pipe.cmd("ZADD")
                        .arg(&expiry)
                        .arg(score)
                        .arg(&field)
                        .ignore();
                }
                Op::Del => {
                    let fields: Vec<String> = withdrawn_kinds(verdict.kind)
                        .iter()
                        .map(|&kind| snapshot_field(kind, &verdict.net))
                        .collect();
                    pipe.hdel(&live, &fields).ignore();
                    pipe.zrem(&expiry, &fields).ignore();
                }
            }
        }
        pipe
    }

    /// Loads the live set and makes this host's shared claims exactly it;
    /// returns the stream id the snapshot was taken at.
    async fn resync(&mut self, conn: &mut MultiplexedConnection) -> Result<String, RedisError> {
        let (last, live): (StreamRangeReply, HashMap<String, Vec<u8>>) = redis::pipe()
            .atomic()
            .cmd("XREVRANGE")
            .arg(self.config.stream_key())
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .hgetall(self.config.live_key())
            .query_async(conn)
            .await?;
        let from = last
            .ids
            .first()
            .map_or_else(|| "0-0".to_owned(), |id| id.id.clone());
        // A stream older than what we already followed: Redis came back
        // without its data. Its live set is then incomplete, so it may add
        // to our shared entries but not replace them; they run out on their own.
        let lost_data = self
            .followed_to
            .as_deref()
            .is_some_and(|seen| stream_id_key(&from) < stream_id_key(seen));
        if lost_data {
            warn!(from = %from, "the fleet's Redis lost data; keeping the shared entries held here");
        }
        let now = unix_now();
        let mut claims: BTreeMap<(ListKind, IpNet), SharedEntry> = BTreeMap::new();
        for json in live.values() {
            let verdict = match Verdict::decode(json, now) {
                Ok(v) if v.op == Op::Add => v,
                Ok(_) | Err(Refused::Expired) => continue,
                Err(refused) => {
                    self.stats.skip(refused.label());
                    continue;
                }
            };
            // This host holds its own DNSBL listings and bans already.
            let own = verdict.origin == self.config.node_name;
            if own && matches!(verdict.kind, VerdictKind::Dnsbl | VerdictKind::Ban) {
                continue;
            }
            if self.locally_exempt(&verdict) {
                continue;
            }
            let entry = shared_entry(&verdict);
            claims
                .entry((verdict.kind.list(), verdict.net))
                .and_modify(|held| merge(held, &entry))
                .or_insert(entry);
        }
        for list in [ListKind::Deny, ListKind::Allow] {
            let entries: Vec<SharedEntry> = claims
                .iter()
                .filter(|((l, _), _)| *l == list)
                .map(|(_, e)| e.clone())
                .collect();
            let count = entries.len() as u64;
            let change = if lost_data {
                Change::Shared(entries.into_iter().map(SharedOp::Add).collect())
            } else {
                Change::SharedReplace(entries)
            };
            match self.fleet.apply(list, change).await {
                Ok(()) => {
                    self.stats.applied.inc_by(count);
                }
                Err(e) => {
                    warn!(list = %list, error = %e, "applying the fleet's snapshot failed");
                    return Err(closed("the snapshot could not be applied"));
                }
            }
        }
        self.stats.set_stream_id(&from);
        self.stats.set_lag(0.0);
        self.followed_to = Some(from.clone());
        Ok(from)
    }

    /// The local view wins: what the allowlist or relay networks cover is
    /// never dropped here because the fleet says so.
    fn locally_exempt(&self, verdict: &Verdict) -> bool {
        let exempt = verdict.kind.list() == ListKind::Deny && self.fleet.exempt(&verdict.net);
        if exempt {
            self.stats.skip("local_precedence");
        }
        exempt
    }

    /// Applies one batch read from the stream (empty: caught up).
    async fn apply_stream(&mut self, entries: Entries) {
        let Some((last_id, _)) = entries.last() else {
            return self.stats.set_lag(0.0);
        };
        let last_id = last_id.clone();
        let now = unix_now();
        let mut ops: BTreeMap<ListKind, Vec<SharedOp>> = BTreeMap::new();
        for (_, json) in &entries {
            let verdict = match Verdict::decode(json, now) {
                Ok(v) => v,
                Err(refused) => {
                    debug!(%refused, "fleet verdict skipped");
                    self.stats.skip(refused.label());
                    continue;
                }
            };
            if verdict.origin == self.config.node_name {
                continue; // our own echo: applied when we took it
            }
            let op = match verdict.op {
                Op::Del => SharedOp::Remove(verdict.net),
                Op::Add if self.locally_exempt(&verdict) => continue,
                Op::Add => SharedOp::Add(shared_entry(&verdict)),
            };
            ops.entry(verdict.kind.list()).or_default().push(op);
        }
        for (list, ops) in ops {
            let count = ops.len() as u64;
            match self.fleet.apply(list, Change::Shared(ops)).await {
                Ok(()) => {
                    self.stats.applied.inc_by(count);
                }
                Err(e) => {
                    warn!(list = %list, error = %e, count, "applying fleet verdicts failed");
                    for _ in 0..count {
                        self.stats.skip("apply_failed");
                    }
                }
            }
        }
        self.stats.set_stream_id(&last_id);
        self.followed_to = Some(last_id.clone());
        if let Some(published_ms) = stream_id_millis(&last_id) {
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            self.stats
                .set_lag(now_ms.saturating_sub(published_ms) as f64 / 1000.0);
        }
    }

    /// This host's heartbeat, the peers' list, and the snapshot's sweep.
    async fn heartbeat(&mut self, conn: &mut MultiplexedConnection) -> Result<(), RedisError> {
        let now = unix_now();
        let nodes = self.config.nodes_key();
        let (peers, dead): (HashMap<String, u64>, Vec<String>) = redis::pipe()
            .hset(&nodes, &self.config.node_name, now)
            .ignore()
            .hgetall(&nodes)
            .cmd("ZRANGEBYSCORE")
            .arg(self.config.expiry_key())
            .arg("-inf")
            .arg(now)
            .query_async(conn)
            .await?;
        if !dead.is_empty() {
            redis::pipe()
                .atomic()
                .hdel(self.config.live_key(), &dead)
                .ignore()
                .zrem(self.config.expiry_key(), &dead)
                .ignore()
                .query_async::<()>(conn)
                .await?;
        }
        self.stats.set_peers(peers.into_iter().collect(), now);
        Ok(())
    }
}

/// A withdrawal of a deny-side verdict ends every deny-side claim on the
/// prefix: "the fleet stops dropping it", whoever listed it first.
fn withdrawn_kinds(kind: VerdictKind) -> &'static [VerdictKind] {
    match kind {
        VerdictKind::Allow => &[VerdictKind::Allow],
        _ => &[VerdictKind::Dnsbl, VerdictKind::Ban, VerdictKind::Deny],
    }
}

fn shared_entry(verdict: &Verdict) -> SharedEntry {
    SharedEntry {
        net: verdict.net,
        reason: Some(match &verdict.reason {
            Some(reason) => format!(
                "fleet {} from {}: {reason}",
                verdict.kind.name(),
                verdict.origin
            ),
            None => format!("fleet {} from {}", verdict.kind.name(), verdict.origin),
        }),
        expires: verdict.expires,
        origin: verdict.origin.clone(),
    }
}

/// Two claims on one prefix: the longer one stands (permanent is longest).
fn merge(held: &mut SharedEntry, other: &SharedEntry) {
    let later = match (held.expires, other.expires) {
        (None, _) => false,
        (_, None) => true,
        (Some(a), Some(b)) => b > a,
    };
    if later {
        *held = other.clone();
    }
}

/// A stream id (`ms-seq`) in stream order; garbage sorts first.
fn stream_id_key(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

/// The milliseconds part of a stream id (`1700000000000-0`).
fn stream_id_millis(id: &str) -> Option<u64> {
    id.split_once('-')?.0.parse().ok()
}

fn closed(what: &'static str) -> RedisError {
    RedisError::from((redis::ErrorKind::Io, what))
}

/// Follows the stream from `from`, sending each batch (empty: caught up).
async fn read_stream(
    mut conn: MultiplexedConnection,
    key: String,
    mut from: String,
    out: mpsc::Sender<Result<Entries, RedisError>>,
) {
    let options = StreamReadOptions::default()
        .count(READ_BATCH)
        .block(READ_BLOCK_MS);
    loop {
        let reply: Result<Option<StreamReadReply>, RedisError> =
            conn.xread_options(&[&key], &[&from], &options).await;
        let batch = match reply {
            Ok(reply) => {
                let entries: Entries = reply
                    .into_iter()
                    .flat_map(|r| r.keys)
                    .flat_map(|k| k.ids)
                    .map(|id| {
                        let value = id.get::<Vec<u8>>("v").unwrap_or_default();
                        (id.id, value)
                    })
                    .collect();
                if let Some((last, _)) = entries.last() {
                    from = last.clone();
                }
                Ok(entries)
            }
            Err(e) => Err(e),
        };
        let failed = batch.is_err();
        if out.send(batch).await.is_err() || failed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(expires: Option<u64>, origin: &str) -> SharedEntry {
        SharedEntry {
            net: "192.0.2.1/32".parse().unwrap(),
            reason: None,
            expires,
            origin: origin.into(),
        }
    }

    #[test]
    fn the_longer_claim_stands() {
        let mut held = entry(Some(100), "a");
        merge(&mut held, &entry(Some(50), "b"));
        assert_eq!(held.origin, "a");
        merge(&mut held, &entry(None, "c"));
        assert_eq!(held.origin, "c");
        merge(&mut held, &entry(Some(u64::MAX), "d"));
        assert_eq!(held.origin, "c");
    }

    #[test]
    fn stream_ids_compare_in_stream_order() {
        assert!(stream_id_key("0-0") < stream_id_key("1700000000000-0"));
        assert!(stream_id_key("1700000000000-2") < stream_id_key("1700000000000-10"));
        assert!(stream_id_key("999-0") < stream_id_key("1000-0"));
    }

    #[test]
    fn stream_ids_give_their_time() {
        assert_eq!(stream_id_millis("1700000000123-4"), Some(1_700_000_000_123));
        assert_eq!(stream_id_millis("garbage"), None);
    }
}
