//! The durable list store: one JSON file per list in `state_dir`.
//!
//! Every change is written with temp file + fsync + rename + directory fsync
//! before it is acknowledged, so a crash at any instant leaves either the old
//! or the new file, never a torn one. Changes are all-or-nothing: a batch
//! either applies entirely or leaves memory and disk as they were.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::ListKind;
use crate::persist::write_json_atomically;

const FORMAT_VERSION: u32 = 1;

/// What is known about a listed prefix besides the prefix itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryMeta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Unix seconds when the entry was first listed.
    pub added: u64,
    /// Unix seconds after which the entry no longer applies; none = permanent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<u64>,
}

#[derive(Deserialize)]
struct StoredEntry {
    prefix: IpNet,
    #[serde(flatten)]
    meta: EntryMeta,
}

#[derive(Deserialize)]
struct StoredList {
    version: u32,
    entries: Vec<StoredEntry>,
}

/// The on-disk shape of [`StoredList`], serialised straight from the map
/// (no copy of a million entries just to write them).
#[derive(Serialize)]
struct StoredListRef<'a> {
    version: u32,
    #[serde(serialize_with = "serialize_entries")]
    entries: &'a BTreeMap<IpNet, EntryMeta>,
}

#[derive(Serialize)]
struct StoredEntryRef<'a> {
    prefix: &'a IpNet,
    #[serde(flatten)]
    meta: &'a EntryMeta,
}

fn serialize_entries<S: serde::Serializer>(
    entries: &&BTreeMap<IpNet, EntryMeta>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(
        entries
            .iter()
            .map(|(prefix, meta)| StoredEntryRef { prefix, meta }),
    )
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read list file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("list file {path} is corrupt (refusing to start with a partial list): {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("list file {path} has format version {found}, this gatekeeper reads {FORMAT_VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("cannot write list file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
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
}

/// The effect of a change, as reported to the operator and applied to the kernel.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    pub added: Vec<IpNet>,
    pub updated: Vec<IpNet>,
    pub removed: Vec<IpNet>,
    /// Previous state of every touched prefix, to undo the change.
    undo: Vec<(IpNet, Option<EntryMeta>)>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("not in the {list}list: {}", missing.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "))]
pub struct NotListed {
    pub list: ListKind,
    pub missing: Vec<IpNet>,
}

pub struct ListStore {
    kind: ListKind,
    path: PathBuf,
    entries: BTreeMap<IpNet, EntryMeta>,
}

impl ListStore {
    /// Opens `dir/<kind>.json`; a missing file is an empty list, a corrupt one an error.
    pub fn open(dir: &Path, kind: ListKind) -> Result<ListStore, StoreError> {
        let path = dir.join(format!("{}.json", kind.name()));
        let entries = match File::open(&path) {
            Ok(file) => read_entries(&path, file)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        Ok(ListStore {
            kind,
            path,
            entries,
        })
    }

    pub fn kind(&self) -> ListKind {
        self.kind
    }

    pub fn entries(&self) -> &BTreeMap<IpNet, EntryMeta> {
        &self.entries
    }

    /// Counts entries per address family after `change` would apply, for capacity checks.
    pub fn family_counts_after(&self, change: &Change) -> (usize, usize) {
        let count = |nets: &mut dyn Iterator<Item = &IpNet>| {
            nets.fold((0, 0), |(v4, v6), net| match net {
                IpNet::V4(_) => (v4 + 1, v6),
                IpNet::V6(_) => (v4, v6 + 1),
            })
        };
        let (mut v4, mut v6) = count(&mut self.entries.keys());
        match change {
            Change::Add(items) => {
                let mut seen = std::collections::HashSet::new();
                let fresh = items
                    .iter()
                    .map(|e| &e.net)
                    .filter(|net| !self.entries.contains_key(net) && seen.insert(**net));
                let (a4, a6) = count(&mut fresh.into_iter());
                v4 += a4;
                v6 += a6;
            }
            Change::Remove(_) => {}
            Change::Replace(items) => {
                let unique: std::collections::BTreeSet<&IpNet> =
                    items.iter().map(|e| &e.net).collect();
                (v4, v6) = count(&mut unique.into_iter());
            }
        }
        (v4, v6)
    }

    /// Applies `change` in memory and on disk, or neither.
    pub fn apply(&mut self, change: Change) -> Result<Applied, ApplyError> {
        let applied = self.apply_in_memory(change)?;
        if let Err(e) = self.save() {
            self.undo_in_memory(&applied);
            return Err(e.into());
        }
        Ok(applied)
    }

    /// Reverts an applied change (after a later step, such as the kernel update, failed).
    pub fn revert(&mut self, applied: &Applied) -> Result<(), StoreError> {
        self.undo_in_memory(applied);
        self.save()
    }

    fn apply_in_memory(&mut self, change: Change) -> Result<Applied, NotListed> {
        let now = unix_now();
        let mut applied = Applied::default();
        match change {
            Change::Add(items) => {
                for item in items {
                    self.upsert(item, now, &mut applied);
                }
            }
            Change::Remove(nets) => {
                let missing: Vec<IpNet> = nets
                    .iter()
                    .filter(|net| !self.entries.contains_key(net))
                    .copied()
                    .collect();
                if !missing.is_empty() {
                    return Err(NotListed {
                        list: self.kind,
                        missing,
                    });
                }
                for net in nets {
                    if let Some(old) = self.entries.remove(&net) {
                        applied.removed.push(net);
                        applied.undo.push((net, Some(old)));
                    }
                }
            }
            Change::Replace(items) => {
                let keep: std::collections::HashSet<IpNet> = items.iter().map(|e| e.net).collect();
                let gone: Vec<IpNet> = self
                    .entries
                    .keys()
                    .filter(|net| !keep.contains(net))
                    .copied()
                    .collect();
                for net in gone {
                    let old = self.entries.remove(&net);
                    applied.removed.push(net);
                    applied.undo.push((net, old));
                }
                for item in items {
                    self.upsert(item, now, &mut applied);
                }
            }
        }
        Ok(applied)
    }

    fn upsert(&mut self, item: NewEntry, now: u64, applied: &mut Applied) {
        let NewEntry {
            net,
            reason,
            expires,
        } = item;
        match self.entries.get_mut(&net) {
            Some(meta) => {
                let new_reason = reason.or_else(|| meta.reason.clone());
                let new_expires = match (meta.expires, expires) {
                    (Some(old), Some(new)) => Some(old.max(new)),
                    _ => None,
                };
                if meta.reason != new_reason || meta.expires != new_expires {
                    applied.undo.push((net, Some(meta.clone())));
                    meta.reason = new_reason;
                    meta.expires = new_expires;
                    applied.updated.push(net);
                }
            }
            None => {
                self.entries.insert(
                    net,
                    EntryMeta {
                        reason,
                        added: now,
                        expires,
                    },
                );
                applied.undo.push((net, None));
                applied.added.push(net);
            }
        }
    }

    /// Entries whose expiry has passed at unix time `now`.
    pub fn expired(&self, now: u64) -> Vec<IpNet> {
        self.entries
            .iter()
            .filter(|(_, meta)| meta.expires.is_some_and(|e| e <= now))
            .map(|(net, _)| *net)
            .collect()
    }

    fn undo_in_memory(&mut self, applied: &Applied) {
        // Reverse order, so a prefix touched twice ends at its oldest state.
        for (net, old) in applied.undo.iter().rev() {
            match old {
                Some(meta) => {
                    self.entries.insert(*net, meta.clone());
                }
                None => {
                    self.entries.remove(net);
                }
            }
        }
    }

    /// Writes the whole list atomically (see [`write_json_atomically`]).
    fn save(&self) -> Result<(), StoreError> {
        let list = StoredListRef {
            version: FORMAT_VERSION,
            entries: &self.entries,
        };
        write_json_atomically(&self.path, &list).map_err(|source| StoreError::Write {
            path: self.path.clone(),
            source,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    NotListed(#[from] NotListed),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn read_entries(path: &Path, file: File) -> Result<BTreeMap<IpNet, EntryMeta>, StoreError> {
    let list: StoredList = serde_json::from_reader(BufReader::with_capacity(1 << 20, file))
        .map_err(|source| StoreError::Corrupt {
            path: path.to_owned(),
            source,
        })?;
    if list.version != FORMAT_VERSION {
        return Err(StoreError::Version {
            path: path.to_owned(),
            found: list.version,
        });
    }
    Ok(list
        .entries
        .into_iter()
        .map(|e| (e.prefix, e.meta))
        .collect())
}

/// Removes temp files left by a crash mid-write; the real file is intact by construction.
pub fn remove_stale_temp_files(dir: &Path) -> std::io::Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.ends_with(".tmp") && name.contains(".json.") {
            std::fs::remove_file(dir.join(&*name))?;
            removed += 1;
        }
    }
    Ok(removed)
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn entry(s: &str, reason: Option<&str>, expires: Option<u64>) -> NewEntry {
        NewEntry {
            net: net(s),
            reason: reason.map(str::to_owned),
            expires,
        }
    }

    #[test]
    fn temporary_entries_never_shorten_or_downgrade() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = ListStore::open(dir.path(), ListKind::Deny).unwrap();
        store
            .apply(Change::Add(vec![entry("192.0.2.1/32", None, Some(100))]))
            .unwrap();
        store
            .apply(Change::Add(vec![entry("192.0.2.1/32", None, Some(50))]))
            .unwrap();
        assert_eq!(store.entries()[&net("192.0.2.1/32")].expires, Some(100));
        assert_eq!(store.expired(99), Vec::<IpNet>::new());
        assert_eq!(store.expired(100), [net("192.0.2.1/32")]);
        store
            .apply(Change::Add(vec![entry("192.0.2.1/32", None, None)]))
            .unwrap();
        store
            .apply(Change::Add(vec![entry("192.0.2.1/32", None, Some(500))]))
            .unwrap();
        assert_eq!(store.entries()[&net("192.0.2.1/32")].expires, None);
    }

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = ListStore::open(dir.path(), ListKind::Deny).unwrap();
        let applied = store
            .apply(Change::Add(vec![
                entry("192.0.2.0/24", Some("SBL1"), None),
                entry("2001:db8::/32", None, None),
            ]))
            .unwrap();
        assert_eq!(applied.added.len(), 2);
        let reopened = ListStore::open(dir.path(), ListKind::Deny).unwrap();
        assert_eq!(reopened.entries(), store.entries());
        assert_eq!(
            reopened.entries()[&net("192.0.2.0/24")].reason.as_deref(),
            Some("SBL1")
        );
    }

    #[test]
    fn remove_is_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = ListStore::open(dir.path(), ListKind::Deny).unwrap();
        store
            .apply(Change::Add(vec![entry("192.0.2.1/32", None, None)]))
            .unwrap();
        let err = store
            .apply(Change::Remove(vec![
                net("192.0.2.1/32"),
                net("192.0.2.2/32"),
            ]))
            .unwrap_err();
        assert!(err.to_string().contains("192.0.2.2/32"), "{err}");
        assert_eq!(store.entries().len(), 1);
        let reopened = ListStore::open(dir.path(), ListKind::Deny).unwrap();
        assert_eq!(reopened.entries().len(), 1);
    }

    #[test]
    fn revert_restores_previous_state() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = ListStore::open(dir.path(), ListKind::Allow).unwrap();
        store
            .apply(Change::Add(vec![entry("192.0.2.1/32", Some("a"), None)]))
            .unwrap();
        let before = store.entries().clone();
        let applied = store
            .apply(Change::Replace(vec![
                entry("192.0.2.1/32", Some("b"), None),
                entry("198.51.100.0/24", None, None),
            ]))
            .unwrap();
        assert_eq!(applied.added, [net("198.51.100.0/24")]);
        assert_eq!(applied.updated, [net("192.0.2.1/32")]);
        store.revert(&applied).unwrap();
        assert_eq!(store.entries(), &before);
        assert_eq!(
            ListStore::open(dir.path(), ListKind::Allow)
                .unwrap()
                .entries(),
            &before
        );
    }

    #[test]
    fn duplicate_adds_count_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = ListStore::open(dir.path(), ListKind::Deny).unwrap();
        let change = Change::Add(vec![
            entry("192.0.2.1/32", None, None),
            entry("192.0.2.1/32", None, None),
        ]);
        assert_eq!(store.family_counts_after(&change), (1, 0));
    }

    #[test]
    fn corrupt_file_is_an_error_not_an_empty_list() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("deny.json"),
            "{\"version\":1,\"entries\":[{\"pre",
        )
        .unwrap();
        let err = ListStore::open(dir.path(), ListKind::Deny).err().unwrap();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn stale_temp_files_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(".deny.json.abc123.tmp"), "partial").unwrap();
        std::fs::write(dir.path().join("deny.json"), "{}").unwrap();
        assert_eq!(remove_stale_temp_files(dir.path()).unwrap(), 1);
        assert!(dir.path().join("deny.json").exists());
    }
}
