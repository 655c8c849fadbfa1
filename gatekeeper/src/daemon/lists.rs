//! The list service: the durable stores and the kernel maps, kept in step.
//!
//! Order of a change: validate → capacity check → store on disk (fsync) →
//! kernel maps → acknowledge. If the kernel step fails, the store is
//! reverted, so disk, memory and kernel never disagree after a reply.

use std::time::Instant;

use ipnet::IpNet;
use tracing::{info, warn};

use crate::control::protocol::{ChangeSummary, ListedEntry, Reply, WireEntry};
use crate::kernel::Kernel;
use crate::lists::prefix::Prefix;
use crate::lists::store::{unix_now, ApplyError, Change, ListStore, NewEntry};
use crate::lists::ttl::TtlError;
use crate::lists::ListKind;

pub struct ListService {
    deny: ListStore,
    allow: ListStore,
    pub kernel: Kernel,
}

impl ListService {
    /// Fills the kernel maps from the stores; called before XDP is attached.
    pub fn new(deny: ListStore, allow: ListStore, mut kernel: Kernel) -> anyhow::Result<Self> {
        for store in [&deny, &allow] {
            let started = Instant::now();
            kernel
                .list_maps(store.kind())
                .sync(store.entries(), store.entries().keys())?;
            info!(
                list = %store.kind(),
                entries = store.entries().len(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "list loaded into the kernel"
            );
        }
        Ok(ListService {
            deny,
            allow,
            kernel,
        })
    }

    pub fn store(&self, kind: ListKind) -> &ListStore {
        match kind {
            ListKind::Deny => &self.deny,
            ListKind::Allow => &self.allow,
        }
    }

    fn store_mut(&mut self, kind: ListKind) -> &mut ListStore {
        match kind {
            ListKind::Deny => &mut self.deny,
            ListKind::Allow => &mut self.allow,
        }
    }

    pub fn add(&mut self, kind: ListKind, entries: Vec<WireEntry>, replace: bool) -> Reply {
        let items = match parse_entries(entries) {
            Ok(items) => items,
            Err(e) => return Reply::failed(e.to_string()), // only a clock out of range
        };
        let change = if replace {
            Change::Replace(items)
        } else {
            Change::Add(items)
        };
        self.change(kind, change)
    }

    pub fn remove(&mut self, kind: ListKind, prefixes: Vec<Prefix>) -> Reply {
        let nets = prefixes.into_iter().map(Prefix::net).collect();
        self.change(kind, Change::Remove(nets))
    }

    /// Removes entries whose time is up from the store and the kernel
    /// (XDP already ignores them; this frees the slots).
    pub fn sweep_expired(&mut self) {
        let now = unix_now();
        for kind in [ListKind::Deny, ListKind::Allow] {
            let expired = self.store(kind).expired(now);
            if expired.is_empty() {
                continue;
            }
            let count = expired.len();
            if let Reply::Error { message, .. } = self.change(kind, Change::Remove(expired)) {
                warn!(list = %kind, %message, "removing expired entries failed");
            } else {
                info!(list = %kind, count, "expired entries removed");
            }
        }
    }

    pub fn show(&self, kind: ListKind) -> Reply {
        let entries = self
            .store(kind)
            .entries()
            .iter()
            .map(|(net, meta)| ListedEntry {
                prefix: net.to_string(),
                reason: meta.reason.clone(),
                added: meta.added,
                expires: meta.expires,
            })
            .collect();
        Reply::Listed { entries }
    }

    fn change(&mut self, kind: ListKind, change: Change) -> Reply {
        let started = Instant::now();
        let (v4, v6) = self.store(kind).family_counts_after(&change);
        let maps = self.kernel.list_maps(kind);
        let (cap4, cap6) = (maps.capacity_v4 as usize, maps.capacity_v6 as usize);
        if v4 > cap4 || v6 > cap6 {
            return Reply::failed(format!(
                "the {kind}list would hold {v4} IPv4 / {v6} IPv6 prefixes, over its capacity of {cap4} / {cap6} (raise [maps] {kind}_v4 / {kind}_v6 in the config)"
            ));
        }
        let applied = match self.store_mut(kind).apply(change) {
            Ok(applied) => applied,
            Err(ApplyError::NotListed(e)) => return Reply::invalid(e.to_string()),
            Err(e @ ApplyError::Store(_)) => return Reply::failed(e.to_string()),
        };
        let stored_ms = started.elapsed().as_millis() as u64;
        let touched: Vec<IpNet> = applied
            .added
            .iter()
            .chain(&applied.updated)
            .chain(&applied.removed)
            .copied()
            .collect();
        let store = match kind {
            ListKind::Deny => &mut self.deny,
            ListKind::Allow => &mut self.allow,
        };
        if let Err(e) = self.kernel.list_maps(kind).sync(store.entries(), &touched) {
            warn!(error = %format!("{e:#}"), "kernel update failed; reverting");
            let reverted = store.revert(&applied);
            let resynced = self.kernel.list_maps(kind).sync(store.entries(), &touched);
            if let Err(r) = reverted {
                warn!(error = %r, "reverting the list file failed");
            }
            if let Err(r) = resynced {
                warn!(error = %format!("{r:#}"), "restoring kernel maps failed");
            }
            return Reply::failed(format!("kernel map update failed: {e:#}"));
        }
        let summary = ChangeSummary {
            list: Some(kind),
            added: applied.added.len(),
            updated: applied.updated.len(),
            removed: applied.removed.len(),
            total: store.entries().len(),
        };
        info!(
            list = %kind,
            added = summary.added,
            updated = summary.updated,
            removed = summary.removed,
            total = summary.total,
            stored_ms,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "list changed"
        );
        Reply::Changed(summary)
    }
}

fn parse_entries(entries: Vec<WireEntry>) -> Result<Vec<NewEntry>, TtlError> {
    let now = unix_now();
    entries
        .into_iter()
        .map(|e| {
            Ok(NewEntry {
                net: e.prefix.net(),
                reason: e.reason,
                expires: e.ttl_secs.map(|ttl| ttl.expires_at(now)).transpose()?,
            })
        })
        .collect()
}
