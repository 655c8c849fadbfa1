//! The durable list store: a snapshot plus an append-only journal per list
//! in `state_dir`, with group commit.
//!
//! A change is planned and applied in memory and appended to the journal
//! (no fsync) under a short lock; a committer thread then fsyncs once for
//! every record written so far and wakes all their waiters. A change is
//! all-or-nothing: one record, checksummed, so replay sees it whole or not
//! at all. When the journals outgrow `compact_bytes` (and the snapshot), the
//! committer rotates to a new journal generation and a compaction thread
//! folds the closed ones into a new snapshot, from disk, without the lock.
//!
//! Files: `<list>.snapshot` (see [`super::snapshot`]) and
//! `<list>.journal.<generation>` (see [`super::journal`]); a format-1
//! `<list>.json` is migrated once on first start.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, RwLock};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::journal::{self, Format};
use super::{snapshot, ListKind};
use crate::clock::unix_now;
use crate::persist::sync_dir;

const LEGACY_FORMAT_VERSION: u32 = 1;

/// What is known about a listed prefix besides the prefix itself.
///
/// A prefix has owners: the operator (`manual`), any number of feeds and
/// the fleet (`shared`). It stays listed, in the store and the kernel, while
/// any owner lists it; each owner adds and removes only its own claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryMeta {
    pub reason: Option<String>,
    /// Unix seconds when the entry was first listed.
    pub added: u64,
    /// Unix seconds after which the manual listing ends; none = permanent.
    /// Feed listings never expire: they last until the feed drops the prefix.
    pub expires: Option<u64>,
    /// Listed by the operator (`add`, `import`, pre-greet bans).
    pub manual: bool,
    /// Names of the feeds that list it.
    pub feeds: BTreeSet<String>,
    /// A verdict another host of the fleet shared (see `cluster`).
    /// Boxed: few entries have one, and every entry pays for the field.
    pub shared: Option<Box<SharedClaim>>,
}

/// The fleet's listing of a prefix: it lasts until `expires` (none =
/// permanent) or until the fleet withdraws it, whatever the operator does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedClaim {
    pub expires: Option<u64>,
    /// The node that took the verdict.
    pub origin: String,
}

/// An entry as format 2 wrote it: no fleet claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryMetaV2 {
    pub reason: Option<String>,
    pub added: u64,
    pub expires: Option<u64>,
    pub manual: bool,
    pub feeds: BTreeSet<String>,
}

impl From<EntryMetaV2> for EntryMeta {
    fn from(old: EntryMetaV2) -> EntryMeta {
        EntryMeta {
            reason: old.reason,
            added: old.added,
            expires: old.expires,
            manual: old.manual,
            feeds: old.feeds,
            shared: None,
        }
    }
}

impl EntryMeta {
    /// A listing by the operator only.
    pub fn manual(reason: Option<String>, added: u64, expires: Option<u64>) -> EntryMeta {
        EntryMeta {
            reason,
            added,
            expires,
            manual: true,
            feeds: BTreeSet::new(),
            shared: None,
        }
    }

    /// When the entry as a whole stops matching: never while a feed lists
    /// it, otherwise when the last of the manual and shared listings ends.
    pub fn expiry(&self) -> Option<u64> {
        if !self.feeds.is_empty() {
            return None;
        }
        let manual = self.manual.then_some(self.expires);
        let shared = self.shared.as_ref().map(|claim| claim.expires);
        match (manual, shared) {
            (Some(None), _) | (_, Some(None)) => None,
            (Some(a), Some(b)) => a.max(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => None,
        }
    }

    pub fn live_at(&self, now: u64) -> bool {
        self.expiry().is_none_or(|e| e > now)
    }

    /// The manual or the shared listing has run out (others may remain).
    pub fn expired_at(&self, now: u64) -> bool {
        let ended = |expires: Option<u64>| expires.is_some_and(|e| e <= now);
        self.manual && ended(self.expires)
            || self
                .shared
                .as_ref()
                .is_some_and(|claim| ended(claim.expires))
    }

    /// What is left once the expired listings at `now` go.
    fn without_expired(self, now: u64) -> Option<EntryMeta> {
        let ended = |expires: Option<u64>| expires.is_some_and(|e| e <= now);
        let mut left = Some(self);
        if left.as_ref().is_some_and(|m| m.manual && ended(m.expires)) {
            left = left.and_then(EntryMeta::without_manual);
        }
        if left
            .as_ref()
            .is_some_and(|m| m.shared.as_ref().is_some_and(|c| ended(c.expires)))
        {
            left = left.and_then(EntryMeta::without_shared);
        }
        left
    }

    fn owned(self) -> Option<EntryMeta> {
        (self.manual || !self.feeds.is_empty() || self.shared.is_some()).then_some(self)
    }

    /// What is left once the manual listing goes.
    fn without_manual(mut self) -> Option<EntryMeta> {
        self.manual = false;
        self.expires = None;
        self.owned()
    }

    /// What is left once `feed` drops it.
    fn without_feed(mut self, feed: &str) -> Option<EntryMeta> {
        self.feeds.remove(feed);
        self.owned()
    }

    /// What is left once the fleet withdraws it.
    fn without_shared(mut self) -> Option<EntryMeta> {
        self.shared = None;
        self.owned()
    }
}

/// An entry as formats 1 wrote it (legacy JSON, snapshot and journal
/// format 1): every entry was the operator's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryMetaV1 {
    #[serde(default)]
    pub reason: Option<String>,
    pub added: u64,
    #[serde(default)]
    pub expires: Option<u64>,
}

impl From<EntryMetaV1> for EntryMeta {
    fn from(old: EntryMetaV1) -> EntryMeta {
        EntryMeta::manual(old.reason, old.added, old.expires)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read list file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("list file {path} is corrupt (refusing to start with a partial list): {problem}")]
    Corrupt { path: PathBuf, problem: String },
    #[error(
        "list file {path} has format version {found}, this gatekeeper reads {LEGACY_FORMAT_VERSION}"
    )]
    Version { path: PathBuf, found: u32 },
    #[error("cannot write list file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the {list}list journal could not be made durable ({reason}); list changes are refused until gatekeeper is restarted")]
    Failed { list: ListKind, reason: Arc<str> },
}

/// An entry to add: permanent when `expires` (unix seconds) is `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEntry {
    pub net: IpNet,
    pub reason: Option<String>,
    pub expires: Option<u64>,
}

/// A change to apply as one unit.
#[derive(Debug, Clone)]
pub enum Change {
    /// Add or update entries (an existing prefix keeps its `added` time;
    /// a permanent entry never becomes temporary, a temporary one only lives longer).
    Add(Vec<NewEntry>),
    /// Remove entries; every prefix must be present.
    Remove(Vec<IpNet>),
    /// Make the list exactly these entries.
    Replace(Vec<NewEntry>),
    /// End the manual and shared listings of those of `nets` that expired at `now`.
    Expire { nets: Vec<IpNet>, now: u64 },
    /// The fleet's verdicts, in order; the other owners' listings are untouched.
    Shared(Vec<SharedOp>),
    /// Make the fleet's listings exactly these (a full resynchronisation).
    SharedReplace(Vec<SharedEntry>),
    /// Make `feed`'s own listings exactly `entries` (prefix, reason); the
    /// operator's and other feeds' listings are untouched.
    Feed {
        feed: String,
        entries: Vec<(IpNet, Option<String>)>,
    },
}

impl Change {
    /// The same change with its items in prefix order (stable).
    fn sorted(self) -> Change {
        match self {
            Change::Add(mut items) => {
                items.sort_by_key(|item| item.net);
                Change::Add(items)
            }
            Change::Replace(mut items) => {
                items.sort_by_key(|item| item.net);
                Change::Replace(items)
            }
            other => other,
        }
    }

    /// How many prefixes it names (sizes the plan's tables).
    fn named(&self) -> usize {
        match self {
            Change::Add(items) | Change::Replace(items) => items.len(),
            Change::Remove(nets) | Change::Expire { nets, .. } => nets.len(),
            Change::Shared(ops) => ops.len(),
            Change::SharedReplace(items) => items.len(),
            Change::Feed { entries, .. } => entries.len(),
        }
    }
}

/// A fleet listing to take on: a later expiry wins over an earlier one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedEntry {
    pub net: IpNet,
    pub reason: Option<String>,
    pub expires: Option<u64>,
    pub origin: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SharedOp {
    Add(SharedEntry),
    /// Withdraws the fleet's claim only; a prefix it does not hold is no error.
    Remove(IpNet),
}

/// A removal named prefixes the operator has not listed; `Add`, `Remove`
/// and `Replace` act on the manual listings only.
#[derive(Debug, PartialEq, Eq)]
pub struct NotListed {
    pub list: ListKind,
    pub missing: Vec<IpNet>,
    /// Prefixes only feeds list, with those feeds: they go when the feeds drop them.
    pub by_feeds: Vec<(IpNet, Vec<String>)>,
    /// Prefixes only the fleet lists: `del --share` withdraws them.
    pub by_fleet: Vec<IpNet>,
}

impl std::fmt::Display for NotListed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if !self.missing.is_empty() {
            let nets: Vec<String> = self.missing.iter().map(ToString::to_string).collect();
            parts.push(format!("not in the {}list: {}", self.list, nets.join(", ")));
        }
        if !self.by_feeds.is_empty() {
            let nets: Vec<String> = self
                .by_feeds
                .iter()
                .map(|(net, feeds)| format!("{net} (feed {})", feeds.join(", ")))
                .collect();
            parts.push(format!(
                "listed only by feeds, which own them: {} (use `allow add` to let one through)",
                nets.join(", ")
            ));
        }
        if !self.by_fleet.is_empty() {
            let nets: Vec<String> = self.by_fleet.iter().map(ToString::to_string).collect();
            parts.push(format!(
                "listed only by the fleet: {} (withdraw with `del --share`)",
                nets.join(", ")
            ));
        }
        f.write_str(&parts.join("; "))
    }
}

impl std::error::Error for NotListed {}

/// Prefixes per address family a list may hold (the kernel maps' sizes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub v4: usize,
    pub v6: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    NotListed(#[from] NotListed),
    #[error("the {list}list would hold {v4} IPv4 / {v6} IPv6 prefixes, over its capacity of {} / {} (raise [maps] {list}_v4 / {list}_v6 in the config)", capacity.v4, capacity.v6)]
    OverCapacity {
        list: ListKind,
        v4: usize,
        v6: usize,
        capacity: Capacity,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A change applied in memory and written to the journal, durable once
/// [`ListStore::durable`] says so.
#[derive(Debug, Clone)]
pub struct Pending {
    pub seq: u64,
    pub added: Vec<IpNet>,
    pub updated: Vec<IpNet>,
    pub removed: Vec<IpNet>,
    /// Entries in the list right after the change.
    pub total: usize,
    /// The new state of every touched prefix (shared with the journal's
    /// record: a million-entry change is not copied to be remembered).
    ops: Ops,
    /// The state before, to revert (shared with the committer's undo queue).
    undo: Ops,
}

/// Prefix states, as a change writes them or as they were before it.
type Ops = Arc<Vec<(IpNet, Option<EntryMeta>)>>;

impl Pending {
    pub fn touched(&self) -> Vec<IpNet> {
        self.ops.iter().map(|(net, _)| *net).collect()
    }
}

/// Makes a journal durable (fdatasync; tests inject counters and failures).
pub type Fsync = Arc<dyn Fn(&File) -> std::io::Result<()> + Send + Sync>;

/// The previous state of every prefix a record touched, to undo it.
type Undo = Ops;

/// Tuning and test hooks.
#[derive(Clone)]
pub struct StoreOptions {
    /// Journal bytes (and at least the snapshot's size) before compaction.
    pub compact_bytes: u64,
    /// How a journal is made durable; tests inject counters and failures.
    pub fsync: Fsync,
}

impl StoreOptions {
    pub const DEFAULT_COMPACT_BYTES: u64 = 64 << 20;

    pub fn new(compact_bytes: u64) -> StoreOptions {
        StoreOptions {
            compact_bytes,
            fsync: Arc::new(File::sync_data),
        }
    }
}

/// Entries per prefix length, so lookups probe only the lengths in use.
#[derive(Debug, Clone)]
struct Lengths {
    v4: [usize; 33],
    v6: [usize; 129],
}

impl Lengths {
    fn of<'a>(nets: impl Iterator<Item = &'a IpNet>) -> Lengths {
        let mut lengths = Lengths {
            v4: [0; 33],
            v6: [0; 129],
        };
        nets.for_each(|net| *lengths.slot(net) += 1);
        lengths
    }

    fn slot(&mut self, net: &IpNet) -> &mut usize {
        match net {
            IpNet::V4(n) => &mut self.v4[usize::from(n.prefix_len())],
            IpNet::V6(n) => &mut self.v6[usize::from(n.prefix_len())],
        }
    }

    fn totals(&self) -> (usize, usize) {
        (self.v4.iter().sum(), self.v6.iter().sum())
    }
}

#[derive(Debug, Clone)]
struct Synced {
    seq: u64,
    failed: Option<Arc<str>>,
}

struct State {
    entries: BTreeMap<IpNet, EntryMeta>,
    lengths: Lengths,
    journal: Arc<File>,
    generation: u64,
    /// Bytes in all journals not yet folded into the snapshot.
    journal_bytes: u64,
    /// Bytes in the current journal file (where a failed append is cut back to).
    file_bytes: u64,
    snapshot_bytes: u64,
    written: u64,
    /// Undo information of records not yet fsynced, oldest first.
    unsynced: VecDeque<(u64, Undo)>,
    failed: Option<Arc<str>>,
    compacting: bool,
}

struct Shared {
    kind: ListKind,
    layout: Layout,
    options: StoreOptions,
    state: RwLock<State>,
    /// Highest sequence number handed to the committer, and shutdown.
    queue: Mutex<(u64, bool)>,
    wake: Condvar,
    synced: watch::Sender<Synced>,
}

/// One list's durable store, shared by all its users.
#[derive(Clone)]
pub struct ListStore {
    shared: Arc<Shared>,
    committer: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl ListStore {
    /// Loads the snapshot and replays the journals (migrating a format-1
    /// JSON file first); a torn journal tail is cut off with a warning,
    /// anything else amiss refuses to start.
    pub fn open(
        dir: &Path,
        kind: ListKind,
        options: StoreOptions,
    ) -> Result<ListStore, StoreError> {
        let layout = Layout {
            dir: dir.to_owned(),
            kind,
        };
        layout.migrate_legacy()?;
        let mut loaded = layout.load(None, true)?;
        if loaded.format != Format::V3 {
            layout.migrate(&mut loaded)?;
        }
        let (generation, file_bytes) = match loaded.journals.last() {
            Some(&last) => last,
            None => (loaded.snapshot_generation, 0),
        };
        let path = layout.journal(generation);
        let journal = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|source| StoreError::Write {
                path: path.clone(),
                source,
            })?;
        sync_dir(dir).map_err(|source| StoreError::Write { path, source })?;
        let state = State {
            lengths: Lengths::of(loaded.entries.keys()),
            entries: loaded.entries,
            journal: Arc::new(journal),
            generation,
            journal_bytes: loaded.journals.iter().map(|(_, bytes)| bytes).sum(),
            file_bytes,
            snapshot_bytes: loaded.snapshot_bytes,
            written: 0,
            unsynced: VecDeque::new(),
            failed: None,
            compacting: false,
        };
        let shared = Arc::new(Shared {
            kind,
            layout,
            options,
            state: RwLock::new(state),
            queue: Mutex::new((0, false)),
            wake: Condvar::new(),
            synced: watch::Sender::new(Synced {
                seq: 0,
                failed: None,
            }),
        });
        let committer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("{kind}-commit"))
                .spawn(move || commit_loop(&shared))
                .map_err(|source| StoreError::Write {
                    path: dir.to_owned(),
                    source,
                })?
        };
        Ok(ListStore {
            shared,
            committer: Arc::new(Mutex::new(Some(committer))),
        })
    }

    pub fn kind(&self) -> ListKind {
        self.shared.kind
    }

    /// Runs `f` on the entries under the read lock (keep it short).
    pub fn read<R>(&self, f: impl FnOnce(&BTreeMap<IpNet, EntryMeta>) -> R) -> R {
        f(&self.state().entries)
    }

    pub fn len(&self) -> usize {
        self.state().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a live entry covers `ip`: one lookup per prefix length in use.
    pub fn covers(&self, ip: IpAddr, now: u64) -> bool {
        let state = self.state();
        let live = |net: IpNet| state.entries.get(&net).is_some_and(|m| m.live_at(now));
        match ip {
            IpAddr::V4(addr) => (0..=32u8)
                .filter(|&len| state.lengths.v4[usize::from(len)] > 0)
                .any(|len| live(IpNet::V4(ipnet::Ipv4Net::new(addr, len).unwrap().trunc()))),
            IpAddr::V6(addr) => (0..=128u8)
                .filter(|&len| state.lengths.v6[usize::from(len)] > 0)
                .any(|len| live(IpNet::V6(ipnet::Ipv6Net::new(addr, len).unwrap().trunc()))),
        }
    }

    /// Entries whose manual or shared listing has expired at unix time `now`.
    pub fn expired(&self, now: u64) -> Vec<IpNet> {
        self.state()
            .entries
            .iter()
            .filter(|(_, meta)| meta.expired_at(now))
            .map(|(net, _)| *net)
            .collect()
    }

    /// Every feed name that owns at least one entry.
    pub fn feeds(&self) -> BTreeSet<String> {
        let state = self.state();
        state
            .entries
            .values()
            .flat_map(|meta| meta.feeds.iter().cloned())
            .collect()
    }

    /// The prefixes `feed` lists.
    pub fn feed_nets(&self, feed: &str) -> HashSet<IpNet> {
        let state = self.state();
        state
            .entries
            .iter()
            .filter(|(_, meta)| meta.feeds.contains(feed))
            .map(|(net, _)| *net)
            .collect()
    }

    /// Entries `feed` lists.
    pub fn feed_len(&self, feed: &str) -> usize {
        let state = self.state();
        state
            .entries
            .values()
            .filter(|meta| meta.feeds.contains(feed))
            .count()
    }

    /// Plans `change`, checks capacity, applies it in memory and appends it
    /// to the journal, or does none of that. Durable after [`Self::durable`].
    pub fn apply(&self, change: Change, capacity: Capacity) -> Result<Pending, ApplyError> {
        // A million items sort before the lock, not while readers wait.
        let change = change.sorted();
        let mut state = self.state_mut();
        if let Some(reason) = &state.failed {
            return Err(self.failed(reason.clone()).into());
        }
        let plan = plan(&state.entries, self.shared.kind, change, unix_now())?;
        let mut lengths = state.lengths.clone();
        for ((net, new), (_, old)) in plan.ops.iter().zip(&plan.undo) {
            match (old.is_some(), new.is_some()) {
                (false, true) => *lengths.slot(net) += 1,
                (true, false) => *lengths.slot(net) -= 1,
                _ => {}
            }
        }
        let (v4, v6) = lengths.totals();
        let (old4, old6) = state.lengths.totals();
        // Shrinking is always allowed, even over a since-lowered capacity.
        if (v4 > capacity.v4 && v4 > old4) || (v6 > capacity.v6 && v6 > old6) {
            return Err(ApplyError::OverCapacity {
                list: self.shared.kind,
                v4,
                v6,
                capacity,
            });
        }
        let (ops, undo) = (Arc::new(plan.ops), Arc::new(plan.undo));
        let seq = self.append(&mut state, ops.clone(), undo.clone())?;
        state.lengths = lengths;
        Ok(Pending {
            seq,
            added: plan.added,
            updated: plan.updated,
            removed: plan.removed,
            total: state.entries.len(),
            ops,
            undo,
        })
    }

    /// Undoes `pending` for the prefixes no later change has touched since
    /// (after a later step, such as the kernel update, failed). Returns the
    /// reverting change, to be awaited and synced like any other.
    pub fn revert(&self, pending: &Pending) -> Result<Pending, StoreError> {
        let mut state = self.state_mut();
        if let Some(reason) = &state.failed {
            return Err(self.failed(reason.clone()));
        }
        let (mut ops, mut undo) = (Vec::new(), Vec::new());
        for ((net, ours), (_, before)) in pending.ops.iter().zip(pending.undo.iter()) {
            let current = state.entries.get(net).cloned();
            if current == *ours {
                ops.push((*net, before.clone()));
                undo.push((*net, current));
            }
        }
        let mut lengths = state.lengths.clone();
        for ((net, new), (_, old)) in ops.iter().zip(&undo) {
            match (old.is_some(), new.is_some()) {
                (false, true) => *lengths.slot(net) += 1,
                (true, false) => *lengths.slot(net) -= 1,
                _ => {}
            }
        }
        let (ops, undo) = (Arc::new(ops), Arc::new(undo));
        let seq = self.append(&mut state, ops.clone(), undo.clone())?;
        state.lengths = lengths;
        Ok(Pending {
            seq,
            added: Vec::new(),
            updated: Vec::new(),
            removed: Vec::new(),
            total: state.entries.len(),
            ops,
            undo,
        })
    }

    /// Waits until the journal holds `pending` durably.
    pub async fn durable(&self, pending: &Pending) -> Result<(), StoreError> {
        let mut synced = self.shared.synced.subscribe();
        let reached = synced
            .wait_for(|s| s.seq >= pending.seq || s.failed.is_some())
            .await
            .map(|s| s.clone());
        match reached {
            Ok(s) if s.seq >= pending.seq => Ok(()),
            Ok(Synced {
                failed: Some(reason),
                ..
            }) => Err(self.failed(reason)),
            _ => Err(self.failed("the committer stopped".into())),
        }
    }

    /// Lets the committer sync what is written, then stops it.
    pub fn close(&self) {
        {
            let mut queue = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            queue.1 = true;
        }
        self.shared.wake.notify_all();
        let handle = self
            .committer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }

    fn failed(&self, reason: Arc<str>) -> StoreError {
        StoreError::Failed {
            list: self.shared.kind,
            reason,
        }
    }

    /// Writes one record, then applies it in memory; an empty change writes nothing.
    fn append(&self, state: &mut State, ops: Ops, undo: Undo) -> Result<u64, StoreError> {
        if ops.is_empty() {
            return Ok(state.written);
        }
        let bytes = journal::encode(&journal::RecordRef { ops: &ops });
        if let Err(source) = (&*state.journal).write_all(&bytes) {
            // Cut a partial record off, or later records would follow garbage.
            if let Err(e) = state.journal.set_len(state.file_bytes) {
                state.failed = Some(format!("{source}; truncating after it: {e}").into());
            }
            return Err(StoreError::Write {
                path: self.shared.layout.journal(state.generation),
                source,
            });
        }
        state.file_bytes += bytes.len() as u64;
        state.journal_bytes += bytes.len() as u64;
        apply_ops(&mut state.entries, ops.iter().cloned());
        state.written += 1;
        let seq = state.written;
        state.unsynced.push_back((seq, undo));
        self.shared
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0 = seq;
        self.shared.wake.notify_one();
        Ok(seq)
    }

    fn state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.shared.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn state_mut(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.shared.state.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// `ops` are in prefix order (see [`plan`]); a change as big as a good part
/// of the list is merged in one pass instead of inserted entry by entry.
fn apply_ops(
    entries: &mut BTreeMap<IpNet, EntryMeta>,
    ops: impl ExactSizeIterator<Item = (IpNet, Option<EntryMeta>)>,
) {
    if ops.len() >= BULK_MERGE_FROM && ops.len() >= entries.len() / 4 {
        let ops: Vec<_> = ops.collect();
        if ops.windows(2).all(|pair| pair[0].0 < pair[1].0) {
            // Collecting sorted pairs builds the tree bottom-up, without searches.
            let old = std::mem::take(entries);
            *entries = merge_ordered(old, ops).collect();
            return;
        }
        // Journals of earlier versions hold records in any order.
        let mut removals = Vec::new();
        let mut upserts: BTreeMap<IpNet, EntryMeta> = ops
            .into_iter()
            .filter_map(|(net, meta)| {
                if meta.is_none() {
                    removals.push(net);
                }
                meta.map(|meta| (net, meta))
            })
            .collect();
        for net in removals {
            entries.remove(&net);
        }
        entries.append(&mut upserts);
        return;
    }
    for (net, meta) in ops {
        match meta {
            Some(meta) => entries.insert(net, meta),
            None => entries.remove(&net),
        };
    }
}

/// The list after `ops` (strictly ascending), in order: one walk of both.
fn merge_ordered(
    old: BTreeMap<IpNet, EntryMeta>,
    ops: Vec<(IpNet, Option<EntryMeta>)>,
) -> impl Iterator<Item = (IpNet, EntryMeta)> {
    let mut old = old.into_iter().peekable();
    let mut ops = ops.into_iter().peekable();
    std::iter::from_fn(move || loop {
        let order = match (old.peek(), ops.peek()) {
            (None, None) => return None,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some((listed, _)), Some((changed, _))) => listed.cmp(changed),
        };
        match order {
            std::cmp::Ordering::Less => return old.next(),
            std::cmp::Ordering::Equal => {
                old.next();
            }
            std::cmp::Ordering::Greater => {}
        }
        if let Some((net, Some(meta))) = ops.next() {
            return Some((net, meta));
        }
    })
}

/// Below this many operations a change is applied entry by entry.
const BULK_MERGE_FROM: usize = 4096;

/// The committer: one fsync per round covers every record written before
/// it; rotates the journal when compaction is due.
fn commit_loop(shared: &Arc<Shared>) {
    let mut synced = 0u64;
    loop {
        {
            let mut queue = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            while queue.0 <= synced && !queue.1 {
                queue = shared.wake.wait(queue).unwrap_or_else(|e| e.into_inner());
            }
            if queue.0 <= synced {
                return; // shut down with nothing left to sync
            }
        }
        let (target, file, rotated) = {
            let mut state = shared.state.write().unwrap_or_else(|e| e.into_inner());
            let file = state.journal.clone();
            let rotated = compaction_due(shared, &state)
                .then(|| rotate(shared, &mut state))
                .flatten();
            (state.written, file, rotated)
        };
        // Records after `target` went to the new file, whose name the
        // directory fsync makes durable before any of them is acknowledged.
        let result = (shared.options.fsync)(&file).and_then(|()| match rotated {
            Some(_) => sync_dir(&shared.layout.dir),
            None => Ok(()),
        });
        match result {
            Ok(()) => {
                synced = target;
                let mut state = shared.state.write().unwrap_or_else(|e| e.into_inner());
                while state
                    .unsynced
                    .front()
                    .is_some_and(|(seq, _)| *seq <= target)
                {
                    state.unsynced.pop_front();
                }
                drop(state);
                shared.synced.send_modify(|s| s.seq = target);
            }
            Err(e) => {
                fail(shared, &e);
                return;
            }
        }
        if let Some(upto) = rotated {
            let compactor = shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("{}-compact", shared.kind))
                .spawn(move || compact(&compactor, upto));
            if let Err(e) = spawned {
                warn!(list = %shared.kind, error = %e, "cannot start compaction");
            }
        }
    }
}

fn compaction_due(shared: &Shared, state: &State) -> bool {
    !state.compacting
        && state.journal_bytes >= shared.options.compact_bytes.max(state.snapshot_bytes)
}

/// Switches appends to the next journal generation; returns that generation.
fn rotate(shared: &Shared, state: &mut State) -> Option<u64> {
    let next = state.generation + 1;
    let path = shared.layout.journal(next);
    match OpenOptions::new().create_new(true).append(true).open(&path) {
        Ok(file) => {
            state.journal = Arc::new(file);
            state.generation = next;
            state.file_bytes = 0;
            state.compacting = true;
            Some(next)
        }
        Err(e) => {
            warn!(list = %shared.kind, path = %path.display(), error = %e, "cannot start a new journal; compaction postponed");
            None
        }
    }
}

/// An fsync failed: what it covered may or may not be on disk, so undo
/// every unsynced change in memory and refuse all further changes.
fn fail(shared: &Shared, error: &std::io::Error) {
    let reason: Arc<str> = error.to_string().into();
    error!(list = %shared.kind, error = %reason, "journal fsync failed; unacknowledged changes undone, list changes refused until restart");
    let mut state = shared.state.write().unwrap_or_else(|e| e.into_inner());
    while let Some((_, undo)) = state.unsynced.pop_back() {
        for (net, old) in undo.iter().rev().cloned() {
            match old {
                Some(meta) => state.entries.insert(net, meta),
                None => state.entries.remove(&net),
            };
        }
    }
    state.lengths = Lengths::of(state.entries.keys());
    state.failed = Some(reason.clone());
    drop(state);
    shared.synced.send_modify(|s| s.failed = Some(reason));
}

/// Folds the snapshot and the journals before `upto` into a new snapshot.
fn compact(shared: &Shared, upto: u64) {
    let layout = &shared.layout;
    let result = layout.load(Some(upto), false).and_then(|loaded| {
        let path = layout.snapshot();
        let bytes = snapshot::write(&path, upto, &loaded.entries)
            .map_err(|source| StoreError::Write { path, source })?;
        let folded: u64 = loaded.journals.iter().map(|(_, bytes)| bytes).sum();
        for (generation, _) in &loaded.journals {
            let _ = std::fs::remove_file(layout.journal(*generation));
        }
        let _ = sync_dir(&layout.dir);
        Ok((bytes, folded, loaded.entries.len()))
    });
    let mut state = shared.state.write().unwrap_or_else(|e| e.into_inner());
    state.compacting = false;
    match result {
        Ok((bytes, folded, entries)) => {
            state.snapshot_bytes = bytes;
            state.journal_bytes = state.journal_bytes.saturating_sub(folded);
            info!(list = %shared.kind, entries, snapshot_bytes = bytes, "journal compacted into the snapshot");
        }
        Err(e) => {
            warn!(list = %shared.kind, error = %e, "journal compaction failed; the journals stay and are retried")
        }
    }
}

/// The old and new state of each prefix a change touches, in order of
/// first touch (one lookup in the list per prefix, however often touched).
struct Overlay {
    states: Vec<(IpNet, Option<EntryMeta>, Option<EntryMeta>)>,
    /// Where each prefix's state is; `None` when the change comes in prefix
    /// order, so a repeat can only be the latest state.
    index: Option<std::collections::HashMap<IpNet, usize>>,
}

impl Overlay {
    fn for_change(change: &Change) -> Overlay {
        let count = change.named();
        let in_order = matches!(change, Change::Add(_) | Change::Replace(_));
        Overlay {
            states: Vec::with_capacity(count),
            index: (!in_order).then(|| std::collections::HashMap::with_capacity(count)),
        }
    }

    /// Where `net`'s state is, or `None` after recording that it goes next.
    fn find(&mut self, net: IpNet) -> Option<usize> {
        let next = self.states.len();
        match self.index.as_mut() {
            Some(index) => match index.entry(net) {
                std::collections::hash_map::Entry::Occupied(slot) => Some(*slot.get()),
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(next);
                    None
                }
            },
            None => self
                .states
                .last()
                .filter(|state| state.0 == net)
                .map(|_| next - 1),
        }
    }

    /// Sets the prefix's new state from its state so far in this change.
    fn update(
        &mut self,
        entries: &BTreeMap<IpNet, EntryMeta>,
        net: IpNet,
        next: impl FnOnce(Option<EntryMeta>) -> Option<EntryMeta>,
    ) {
        self.update_from(net, entries.get(&net), next);
    }

    /// As [`Self::update`] when the caller already holds the prefix's
    /// entry in the list (`None`: not listed).
    fn update_from(
        &mut self,
        net: IpNet,
        listed: Option<&EntryMeta>,
        next: impl FnOnce(Option<EntryMeta>) -> Option<EntryMeta>,
    ) {
        match self.find(net) {
            Some(at) => {
                let state = &mut self.states[at];
                state.2 = next(state.2.take());
            }
            None => {
                let old = listed.cloned();
                let new = next(old.clone());
                self.states.push((net, old, new));
            }
        }
    }

    fn update_listed(
        &mut self,
        net: IpNet,
        listed: &EntryMeta,
        next: impl FnOnce(EntryMeta) -> Option<EntryMeta>,
    ) {
        self.update_from(net, Some(listed), |meta| meta.and_then(next));
    }
}

struct Plan {
    ops: Vec<(IpNet, Option<EntryMeta>)>,
    undo: Vec<(IpNet, Option<EntryMeta>)>,
    added: Vec<IpNet>,
    updated: Vec<IpNet>,
    removed: Vec<IpNet>,
}

/// The effect of `change` on `entries`, computed without touching them.
fn plan(
    entries: &BTreeMap<IpNet, EntryMeta>,
    kind: ListKind,
    change: Change,
    now: u64,
) -> Result<Plan, NotListed> {
    // In prefix order the list's lookups below, and later the inserts and the
    // kernel's, walk neighbouring nodes instead of missing the cache each time;
    // the sort is stable, so repeats of a prefix still apply in the order given
    // (and cheap when `apply` sorted already).
    let change = change.sorted();
    let mut overlay = Overlay::for_change(&change);
    match change {
        Change::Add(items) => {
            for item in items {
                overlay.update(entries, item.net, |current| {
                    Some(upsert(current, item, now))
                });
            }
        }
        Change::Remove(nets) => {
            let mut missing = Vec::new();
            let mut by_feeds = Vec::new();
            let mut by_fleet = Vec::new();
            for net in &nets {
                match entries.get(net) {
                    None => missing.push(*net),
                    Some(meta) if !meta.manual && !meta.feeds.is_empty() => {
                        by_feeds.push((*net, meta.feeds.iter().cloned().collect()))
                    }
                    Some(meta) if !meta.manual => by_fleet.push(*net),
                    Some(_) => {}
                }
            }
            if !missing.is_empty() || !by_feeds.is_empty() || !by_fleet.is_empty() {
                return Err(NotListed {
                    list: kind,
                    missing,
                    by_feeds,
                    by_fleet,
                });
            }
            for net in nets {
                overlay.update_listed(net, &entries[&net], EntryMeta::without_manual);
            }
        }
        Change::Expire { nets, now } => {
            for net in nets {
                if let Some(meta) = entries.get(&net).filter(|m| m.expired_at(now)) {
                    overlay.update_listed(net, meta, |m| m.without_expired(now));
                }
            }
        }
        Change::Shared(ops) => {
            for op in ops {
                let net = match &op {
                    SharedOp::Add(entry) => entry.net,
                    SharedOp::Remove(net) => *net,
                };
                overlay.update(entries, net, |current| match op {
                    SharedOp::Add(entry) => Some(claim(current, entry, now)),
                    SharedOp::Remove(_) => current.and_then(EntryMeta::without_shared),
                });
            }
        }
        Change::SharedReplace(items) => {
            let keep: HashSet<IpNet> = items.iter().map(|e| e.net).collect();
            for (net, meta) in entries {
                if meta.shared.is_some() && !keep.contains(net) {
                    overlay.update_listed(*net, meta, EntryMeta::without_shared);
                }
            }
            for item in items {
                overlay.update(entries, item.net, |current| {
                    // The snapshot is the truth: its expiry replaces ours.
                    let current = current.and_then(EntryMeta::without_shared);
                    Some(claim(current, item, now))
                });
            }
        }
        Change::Feed {
            feed,
            entries: items,
        } => {
            let keep: HashSet<IpNet> = items.iter().map(|(net, _)| *net).collect();
            for (net, meta) in entries {
                if meta.feeds.contains(&feed) && !keep.contains(net) {
                    overlay.update_listed(*net, meta, |m| m.without_feed(&feed));
                }
            }
            for (net, reason) in items {
                overlay.update(entries, net, |current| {
                    Some(match current {
                        Some(mut meta) => {
                            // The operator's reason wins over the feed's.
                            if !meta.manual {
                                meta.reason = reason.or(meta.reason);
                            }
                            meta.feeds.insert(feed.clone());
                            meta
                        }
                        None => EntryMeta {
                            reason,
                            added: now,
                            expires: None,
                            manual: false,
                            feeds: BTreeSet::from([feed.clone()]),
                            shared: None,
                        },
                    })
                });
            }
        }
        Change::Replace(items) => {
            // Both in prefix order: one merged walk pairs each item with its
            // listed entry and finds the manual entries the new list drops,
            // with the states coming out in order.
            let mut listed = entries.iter().peekable();
            let drop_unkept = |overlay: &mut Overlay, net: &IpNet, meta: &EntryMeta| {
                if meta.manual {
                    overlay.update_listed(*net, meta, EntryMeta::without_manual);
                }
            };
            for item in items {
                while let Some((net, meta)) = listed.next_if(|(net, _)| **net < item.net) {
                    drop_unkept(&mut overlay, net, meta);
                }
                // A repeated item finds its state in the overlay instead.
                let current = listed
                    .next_if(|(net, _)| **net == item.net)
                    .map(|(_, meta)| meta);
                overlay.update_from(item.net, current, |current| {
                    Some(upsert(current, item, now))
                });
            }
            for (net, meta) in listed {
                drop_unkept(&mut overlay, net, meta);
            }
        }
    }
    // Most changes come out in order already (then this is one pass); for
    // the rest the stable sort merges the ordered runs they are made of.
    overlay.states.sort_by_key(|state| state.0);
    let mut plan = Plan {
        ops: Vec::with_capacity(overlay.states.len()),
        undo: Vec::with_capacity(overlay.states.len()),
        added: Vec::new(),
        updated: Vec::new(),
        removed: Vec::new(),
    };
    for (net, old, new) in overlay.states {
        if old == new {
            continue;
        }
        match (&old, &new) {
            (None, Some(_)) => plan.added.push(net),
            (Some(_), Some(_)) => plan.updated.push(net),
            (Some(_), None) => plan.removed.push(net),
            (None, None) => unreachable!("equal states were skipped"),
        }
        plan.ops.push((net, new));
        plan.undo.push((net, old));
    }
    Ok(plan)
}

/// A manual listing: an existing prefix keeps its `added` time and reason
/// unless a new one is given; a permanent manual listing never becomes
/// temporary, a temporary one only lives longer. Feed listings stay.
fn upsert(current: Option<EntryMeta>, item: NewEntry, now: u64) -> EntryMeta {
    match current {
        Some(meta) => EntryMeta {
            reason: item.reason.or(meta.reason),
            added: meta.added,
            expires: match (meta.manual, meta.expires, item.expires) {
                (true, Some(old), Some(new)) => Some(old.max(new)),
                (true, None, _) => None,
                (_, _, new) => new,
            },
            manual: true,
            feeds: meta.feeds,
            shared: meta.shared,
        },
        None => EntryMeta::manual(item.reason, now, item.expires),
    }
}

/// The fleet's listing: a claim already held only lives longer (or becomes
/// permanent); the operator's and the feeds' reasons win over the fleet's.
fn claim(current: Option<EntryMeta>, item: SharedEntry, now: u64) -> EntryMeta {
    let mut meta = current.unwrap_or(EntryMeta {
        reason: None,
        added: now,
        expires: None,
        manual: false,
        feeds: BTreeSet::new(),
        shared: None,
    });
    if !meta.manual && meta.feeds.is_empty() {
        meta.reason = item.reason.or(meta.reason);
    }
    let expires = match &meta.shared {
        Some(old) => match (old.expires, item.expires) {
            (Some(a), Some(b)) => Some(a.max(b)),
            _ => None,
        },
        None => item.expires,
    };
    meta.shared = Some(Box::new(SharedClaim {
        expires,
        origin: item.origin,
    }));
    meta
}

/// Where a list's files live, and reading them back.
struct Layout {
    dir: PathBuf,
    kind: ListKind,
}

struct Loaded {
    /// Format 1 until a format-2 snapshot exists (a store without one is format 1 or new).
    format: Format,
    entries: BTreeMap<IpNet, EntryMeta>,
    snapshot_generation: u64,
    snapshot_bytes: u64,
    /// Generation and size of each journal replayed, in order.
    journals: Vec<(u64, u64)>,
}

impl Layout {
    fn snapshot(&self) -> PathBuf {
        self.dir.join(format!("{}.snapshot", self.kind))
    }

    fn journal(&self, generation: u64) -> PathBuf {
        self.dir.join(format!("{}.journal.{generation}", self.kind))
    }

    fn legacy(&self) -> PathBuf {
        self.dir.join(format!("{}.json", self.kind))
    }

    fn read_error(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
        move |source| StoreError::Read {
            path: path.to_owned(),
            source,
        }
    }

    fn corrupt(path: &Path, problem: impl ToString) -> StoreError {
        StoreError::Corrupt {
            path: path.to_owned(),
            problem: problem.to_string(),
        }
    }

    /// Journal generations present, ascending.
    fn journals(&self) -> Result<Vec<u64>, StoreError> {
        let prefix = format!("{}.journal.", self.kind);
        let mut generations = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(Self::read_error(&self.dir))? {
            let name = entry.map_err(Self::read_error(&self.dir))?.file_name();
            let name = name.to_string_lossy();
            if let Some(generation) = name.strip_prefix(&prefix) {
                let generation = generation.parse().map_err(|_| {
                    Self::corrupt(&self.dir.join(&*name), "unexpected journal name")
                })?;
                generations.push(generation);
            }
        }
        generations.sort_unstable();
        Ok(generations)
    }

    /// Converts a format-1 `<list>.json` into a snapshot, once.
    fn migrate_legacy(&self) -> Result<(), StoreError> {
        let legacy = self.legacy();
        let file = match File::open(&legacy) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(StoreError::Read {
                    path: legacy,
                    source,
                })
            }
        };
        let snapshot = self.snapshot();
        if snapshot.exists() {
            // A migration that stopped after the snapshot was written.
            std::fs::remove_file(&legacy).map_err(|source| StoreError::Write {
                path: legacy.clone(),
                source,
            })?;
            return Ok(());
        }
        if !self.journals()?.is_empty() {
            return Err(Self::corrupt(
                &legacy,
                "a format-1 list file beside journals and no snapshot; move one of them away",
            ));
        }
        let entries = read_legacy(&legacy, file)?;
        snapshot::write(&snapshot, 0, &entries).map_err(|source| StoreError::Write {
            path: snapshot.clone(),
            source,
        })?;
        std::fs::remove_file(&legacy)
            .and_then(|()| sync_dir(&self.dir))
            .map_err(|source| StoreError::Write {
                path: legacy.clone(),
                source,
            })?;
        info!(list = %self.kind, entries = entries.len(), "migrated {} (format 1) to {} and a journal", legacy.display(), snapshot.display());
        Ok(())
    }

    /// Folds an older-format (or new) store into a format-3 snapshot whose
    /// generation follows every old journal, so those count as folded (a
    /// crash before they are deleted leaves them to the next start's
    /// repair) and format-3 journals start after them.
    fn migrate(&self, loaded: &mut Loaded) -> Result<(), StoreError> {
        let generation = match loaded.journals.last() {
            Some(&(last, _)) => last + 1,
            None => loaded.snapshot_generation,
        };
        let path = self.snapshot();
        let bytes = snapshot::write(&path, generation, &loaded.entries)
            .map_err(|source| StoreError::Write { path, source })?;
        for (old, _) in loaded.journals.drain(..) {
            let _ = std::fs::remove_file(self.journal(old));
        }
        if generation > 0 || !loaded.entries.is_empty() {
            info!(list = %self.kind, entries = loaded.entries.len(), from = ?loaded.format, "migrated the list store to format 3 (fleet claims)");
        }
        loaded.format = Format::V3;
        loaded.snapshot_generation = generation;
        loaded.snapshot_bytes = bytes;
        Ok(())
    }

    /// The snapshot plus the journals after it (before `below`, if given).
    /// With `repair`, a torn tail is cut off and journals already in the
    /// snapshot are deleted (start-up); without, both are errors.
    fn load(&self, below: Option<u64>, repair: bool) -> Result<Loaded, StoreError> {
        let path = self.snapshot();
        let (snapshot_generation, snapshot_bytes, mut entries, format) = match std::fs::read(&path)
        {
            Ok(bytes) => {
                let snap = snapshot::decode(&bytes).map_err(|p| Self::corrupt(&path, p))?;
                (
                    snap.generation,
                    bytes.len() as u64,
                    snap.entries,
                    snap.format,
                )
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                (0, 0, BTreeMap::new(), Format::V1)
            }
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        let mut generations = Vec::new();
        for generation in self.journals()? {
            if generation < snapshot_generation {
                // Folded into the snapshot by a compaction that stopped before deleting it.
                if repair {
                    let _ = std::fs::remove_file(self.journal(generation));
                }
            } else if below.is_none_or(|b| generation < b) {
                generations.push(generation);
            }
        }
        let mut journals = Vec::new();
        for (i, &generation) in generations.iter().enumerate() {
            let path = self.journal(generation);
            let expected = snapshot_generation + i as u64;
            if generation != expected {
                return Err(Self::corrupt(
                    &self.journal(expected),
                    "journal missing (later generations exist)",
                ));
            }
            let bytes = std::fs::read(&path).map_err(Self::read_error(&path))?;
            let decoded = journal::decode(&bytes, format).map_err(|e| Self::corrupt(&path, e))?;
            let mut size = bytes.len() as u64;
            if decoded.torn {
                let later_data = generations[i + 1..]
                    .iter()
                    .any(|&g| std::fs::metadata(self.journal(g)).is_ok_and(|m| m.len() > 0));
                if later_data || !repair {
                    return Err(Self::corrupt(
                        &path,
                        format!(
                            "incomplete record at byte {} before the end of the journals",
                            decoded.valid_len
                        ),
                    ));
                }
                warn!(
                    path = %path.display(),
                    kept_bytes = decoded.valid_len,
                    dropped_bytes = size - decoded.valid_len,
                    "journal ends in an incomplete record (a crash mid-append, never acknowledged); truncating it"
                );
                let file = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(Self::read_error(&path))?;
                file.set_len(decoded.valid_len)
                    .and_then(|()| file.sync_all())
                    .map_err(|source| StoreError::Write {
                        path: path.clone(),
                        source,
                    })?;
                size = decoded.valid_len;
            }
            for record in decoded.records {
                apply_ops(&mut entries, record.ops.into_iter());
            }
            journals.push((generation, size));
        }
        Ok(Loaded {
            format,
            entries,
            snapshot_generation,
            snapshot_bytes,
            journals,
        })
    }
}

#[derive(Deserialize)]
struct LegacyEntry {
    prefix: IpNet,
    #[serde(flatten)]
    meta: EntryMetaV1,
}

#[derive(Deserialize)]
struct LegacyList {
    version: u32,
    entries: Vec<LegacyEntry>,
}

fn read_legacy(path: &Path, file: File) -> Result<BTreeMap<IpNet, EntryMeta>, StoreError> {
    let list: LegacyList = serde_json::from_reader(BufReader::with_capacity(1 << 20, file))
        .map_err(|e| Layout::corrupt(path, e))?;
    if list.version != LEGACY_FORMAT_VERSION {
        return Err(StoreError::Version {
            path: path.to_owned(),
            found: list.version,
        });
    }
    Ok(list
        .entries
        .into_iter()
        .map(|e| (e.prefix, e.meta.into()))
        .collect())
}

#[cfg(test)]
mod tests;
