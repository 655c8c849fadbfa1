//! The list service: the durable stores and the kernel maps, kept in step.
//!
//! Order of a change: plan, capacity check, apply in memory and append to
//! the journal (short lock) → wait for the group commit's fsync → update
//! the kernel for the touched prefixes from the current in-memory state
//! (idempotent, so concurrent changes to one prefix converge) → acknowledge.
//! If the kernel step fails, the change is reverted durably.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ipnet::IpNet;
use tracing::{info, warn};

use crate::clock::unix_now;
use crate::cluster::Outbox;
use crate::kernel::{ListMaps, PrefixMaps};
use crate::lists::store::{
    ApplyError, Change, EntryMeta, ListStore, NotListed, Pending, StoreError,
};
use crate::lists::ListKind;

/// The effect of an acknowledged change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Changed {
    pub list: ListKind,
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
    /// Entries in the list right after the change.
    pub total: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error(transparent)]
    NotListed(#[from] NotListed),
    #[error("{0}")]
    OverCapacity(ApplyError),
    #[error(transparent)]
    Storage(#[from] StoreError),
    #[error("kernel map update failed (change reverted): {0}")]
    Kernel(String),
}

impl From<ApplyError> for ListError {
    fn from(error: ApplyError) -> ListError {
        match error {
            ApplyError::NotListed(e) => ListError::NotListed(e),
            ApplyError::Store(e) => ListError::Storage(e),
            e @ ApplyError::OverCapacity { .. } => ListError::OverCapacity(e),
        }
    }
}

struct List {
    store: ListStore,
    /// One kernel writer at a time per list, so each write reflects a state
    /// at least as new as the previous one's.
    maps: Arc<Mutex<PrefixMaps>>,
}

pub struct ListService {
    deny: List,
    allow: List,
    /// Where the verdicts worth sharing go (disabled outside a fleet).
    pub outbox: Outbox,
}

impl ListService {
    /// Fills the kernel maps from the stores; called before XDP is attached.
    pub fn new(
        deny: ListStore,
        allow: ListStore,
        maps: ListMaps,
        outbox: Outbox,
    ) -> anyhow::Result<Self> {
        let service = ListService {
            deny: List {
                store: deny,
                maps: Arc::new(Mutex::new(maps.deny)),
            },
            allow: List {
                store: allow,
                maps: Arc::new(Mutex::new(maps.allow)),
            },
            outbox,
        };
        for kind in [ListKind::Deny, ListKind::Allow] {
            let started = Instant::now();
            let list = service.list(kind);
            let all: Vec<IpNet> = list.store.read(|entries| entries.keys().copied().collect());
            sync_kernel(&list.store, &list.maps, &all)?;
            info!(
                list = %kind,
                entries = all.len(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "list loaded into the kernel"
            );
        }
        Ok(service)
    }

    fn list(&self, kind: ListKind) -> &List {
        match kind {
            ListKind::Deny => &self.deny,
            ListKind::Allow => &self.allow,
        }
    }

    /// Applies `change` durably and in the kernel, then says what it did.
    pub async fn change(&self, kind: ListKind, change: Change) -> Result<Changed, ListError> {
        let started = Instant::now();
        let list = self.list(kind);
        let capacity = lock(&list.maps).capacity();
        let store = list.store.clone();
        let pending = blocking(move || store.apply(change, capacity)).await?;
        list.store.durable(&pending).await?;
        let stored_us = started.elapsed().as_micros() as u64;
        if let Err(e) = self.sync(kind, &pending).await {
            warn!(list = %kind, error = %e, "kernel update failed; reverting");
            self.revert(kind, &pending).await;
            return Err(ListError::Kernel(e));
        }
        let changed = Changed {
            list: kind,
            added: pending.added.len(),
            updated: pending.updated.len(),
            removed: pending.removed.len(),
            total: pending.total,
        };
        info!(
            list = %kind,
            added = changed.added,
            updated = changed.updated,
            removed = changed.removed,
            total = changed.total,
            stored_us,
            elapsed_us = started.elapsed().as_micros() as u64,
            "list changed"
        );
        Ok(changed)
    }

    /// Every entry, in prefix order.
    pub fn show(&self, kind: ListKind) -> Vec<(IpNet, EntryMeta)> {
        self.list(kind).store.read(|entries| {
            entries
                .iter()
                .map(|(net, meta)| (*net, meta.clone()))
                .collect()
        })
    }

    /// Feeds owning entries in `kind`.
    pub fn feeds(&self, kind: ListKind) -> std::collections::BTreeSet<String> {
        self.list(kind).store.feeds()
    }

    /// The prefixes `feed` lists in `kind`.
    pub fn feed_nets(&self, kind: ListKind, feed: &str) -> std::collections::HashSet<IpNet> {
        self.list(kind).store.feed_nets(feed)
    }

    /// Entries `feed` lists in `kind`.
    pub fn feed_len(&self, kind: ListKind, feed: &str) -> usize {
        self.list(kind).store.feed_len(feed)
    }

    /// Entries in the deny and allow lists.
    pub fn counts(&self) -> (usize, usize) {
        (self.deny.store.len(), self.allow.store.len())
    }

    /// IPv4 and IPv6 entries in one list, for the metrics.
    pub fn family_counts(&self, kind: ListKind) -> (usize, usize) {
        self.list(kind).store.read(|entries| {
            let v4 = entries.keys().filter(|net| net.addr().is_ipv4()).count();
            (v4, entries.len() - v4)
        })
    }

    /// Whether a live entry of `kind` covers `ip` (memory only, cheap).
    pub fn covering(&self, kind: ListKind, ip: IpAddr) -> bool {
        self.list(kind).store.covers(ip, unix_now())
    }

    /// Whether a live entry of `kind` shares any address with `net`.
    pub fn overlaps(&self, kind: ListKind, net: &IpNet) -> bool {
        let now = unix_now();
        self.list(kind).store.read(|entries| {
            entries.iter().any(|(listed, meta)| {
                (listed.contains(net) || net.contains(listed)) && !meta.expired_at(now)
            })
        })
    }

    /// Removes entries whose time is up from the store and the kernel
    /// (XDP already ignores them; this frees the slots).
    pub async fn sweep_expired(&self) {
        let now = unix_now();
        for kind in [ListKind::Deny, ListKind::Allow] {
            let nets = self.list(kind).store.expired(now);
            if nets.is_empty() {
                continue;
            }
            match self.change(kind, Change::Expire { nets, now }).await {
                Ok(changed) => {
                    info!(list = %kind, count = changed.removed, "expired entries removed")
                }
                Err(e) => warn!(list = %kind, error = %e, "removing expired entries failed"),
            }
        }
    }

    /// Lets the committers sync what is written, then stops them.
    pub async fn close(&self) {
        for list in [&self.deny, &self.allow] {
            let store = list.store.clone();
            let _ = tokio::task::spawn_blocking(move || store.close()).await;
        }
    }

    async fn sync(&self, kind: ListKind, pending: &Pending) -> Result<(), String> {
        let list = self.list(kind);
        let (store, maps, touched) = (list.store.clone(), list.maps.clone(), pending.touched());
        blocking(move || sync_kernel(&store, &maps, &touched).map_err(|e| format!("{e:#}"))).await
    }

    /// Undoes a change whose kernel update failed, durably, and puts the
    /// kernel back in step for its prefixes.
    async fn revert(&self, kind: ListKind, pending: &Pending) {
        let store = &self.list(kind).store;
        let reverted = match store.revert(pending) {
            Ok(reverted) => reverted,
            Err(e) => {
                warn!(list = %kind, error = %e, "reverting the change failed");
                return;
            }
        };
        if let Err(e) = store.durable(&reverted).await {
            warn!(list = %kind, error = %e, "reverting the change failed");
        }
        if let Err(e) = self.sync(kind, pending).await {
            warn!(list = %kind, error = %e, "restoring kernel maps failed");
        }
    }
}

/// Brings the kernel in line with the store for `touched`: planned under
/// the store's read lock, written after it is released.
fn sync_kernel(
    store: &ListStore,
    maps: &Mutex<PrefixMaps>,
    touched: &[IpNet],
) -> anyhow::Result<()> {
    let mut maps = lock(maps);
    let plan = store.read(|entries| maps.plan(entries, touched));
    maps.apply(plan)
}

fn lock(maps: &Mutex<PrefixMaps>) -> std::sync::MutexGuard<'_, PrefixMaps> {
    maps.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` on a blocking thread (journal writes and map syscalls can take
/// a while for big changes); a panic there stays a panic here.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(value) => value,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}
