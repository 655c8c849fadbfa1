use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;
use crate::lists::journal::Record;

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

const ROOMY: Capacity = Capacity {
    v4: 1 << 20,
    v6: 1 << 20,
};

fn open(dir: &Path, kind: ListKind) -> ListStore {
    ListStore::open(
        dir,
        kind,
        StoreOptions::new(StoreOptions::DEFAULT_COMPACT_BYTES),
    )
    .unwrap()
}

async fn change(store: &ListStore, change: Change) -> Result<Pending, ApplyError> {
    let pending = store.apply(change, ROOMY)?;
    store.durable(&pending).await?;
    Ok(pending)
}

fn entries(store: &ListStore) -> BTreeMap<IpNet, EntryMeta> {
    store.read(Clone::clone)
}

fn journal_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".journal."))
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn temporary_entries_never_shorten_or_downgrade() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), ListKind::Deny);
    let e = |expires| Change::Add(vec![entry("192.0.2.1/32", None, expires)]);
    change(&store, e(Some(100))).await.unwrap();
    change(&store, e(Some(50))).await.unwrap();
    assert_eq!(entries(&store)[&net("192.0.2.1/32")].expires, Some(100));
    assert_eq!(store.expired(99), Vec::<IpNet>::new());
    assert_eq!(store.expired(100), [net("192.0.2.1/32")]);
    change(&store, e(None)).await.unwrap();
    change(&store, e(Some(500))).await.unwrap();
    assert_eq!(entries(&store)[&net("192.0.2.1/32")].expires, None);
}

#[tokio::test]
async fn journal_replays_on_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), ListKind::Deny);
    let pending = change(
        &store,
        Change::Add(vec![
            entry("192.0.2.0/24", Some("SBL1"), None),
            entry("2001:db8::/32", None, None),
            entry("198.51.100.7/32", None, Some(u64::MAX)),
        ]),
    )
    .await
    .unwrap();
    assert_eq!(pending.added.len(), 3);
    change(&store, Change::Remove(vec![net("198.51.100.7/32")]))
        .await
        .unwrap();
    let before = entries(&store);
    store.close();
    let reopened = open(dir.path(), ListKind::Deny);
    assert_eq!(entries(&reopened), before);
    assert_eq!(before.len(), 2);
    assert_eq!(before[&net("192.0.2.0/24")].reason.as_deref(), Some("SBL1"));
}

#[tokio::test]
async fn remove_is_all_or_nothing_and_capacity_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), ListKind::Deny);
    change(&store, Change::Add(vec![entry("192.0.2.1/32", None, None)]))
        .await
        .unwrap();
    let err = change(
        &store,
        Change::Remove(vec![net("192.0.2.1/32"), net("192.0.2.2/32")]),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("192.0.2.2/32"), "{err}");
    let tight = Capacity { v4: 2, v6: 0 };
    let three = Change::Add(vec![
        entry("192.0.2.2/32", None, None),
        entry("192.0.2.3/32", None, None),
        entry("192.0.2.2/32", None, None),
    ]);
    // Two new (one duplicated) on top of one: over a capacity of two.
    let err = store.apply(three, tight).unwrap_err();
    assert!(
        matches!(err, ApplyError::OverCapacity { v4: 3, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("deny_v4"), "{err}");
    assert_eq!(store.len(), 1);
    store.close();
    assert_eq!(open(dir.path(), ListKind::Deny).len(), 1);
}

#[tokio::test]
async fn revert_undoes_only_what_no_later_change_touched() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), ListKind::Allow);
    change(
        &store,
        Change::Add(vec![entry("192.0.2.1/32", Some("a"), None)]),
    )
    .await
    .unwrap();
    let before = entries(&store);
    let replaced = change(
        &store,
        Change::Replace(vec![
            entry("192.0.2.1/32", Some("b"), None),
            entry("198.51.100.0/24", None, None),
            entry("203.0.113.0/24", None, None),
        ]),
    )
    .await
    .unwrap();
    assert_eq!(replaced.added.len(), 2);
    assert_eq!(replaced.updated, [net("192.0.2.1/32")]);
    // A later change to one of the prefixes wins over the revert.
    change(&store, Change::Remove(vec![net("203.0.113.0/24")]))
        .await
        .unwrap();
    let revert = store.revert(&replaced).unwrap();
    store.durable(&revert).await.unwrap();
    assert_eq!(entries(&store), before);
    store.close();
    assert_eq!(entries(&open(dir.path(), ListKind::Allow)), before);
}

/// A closed denylist whose journal holds three one-entry records; returns
/// the state dir and the journal's path, for tests that damage it.
async fn three_entries_journaled() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), ListKind::Deny);
    for i in 1..=3 {
        change(
            &store,
            Change::Add(vec![entry(&format!("192.0.2.{i}/32"), None, None)]),
        )
        .await
        .unwrap();
    }
    store.close();
    let path = dir.path().join("deny.journal.0");
    (dir, path)
}

#[tokio::test]
async fn torn_tail_is_cut_off_and_earlier_records_kept() {
    let (dir, path) = three_entries_journaled().await;
    let intact = std::fs::metadata(&path).unwrap().len();
    let record = journal::encode(&Record {
        ops: vec![(net("192.0.2.99/32"), None)],
    });
    let mut file = OpenOptions::new().append(true).open(&path).unwrap();
    file.write_all(&record[..record.len() - 3]).unwrap();
    drop(file);
    let reopened = open(dir.path(), ListKind::Deny);
    assert_eq!(reopened.len(), 3);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), intact);
    // Appends continue after the cut, and replay again.
    change(&reopened, Change::Remove(vec![net("192.0.2.1/32")]))
        .await
        .unwrap();
    reopened.close();
    assert_eq!(open(dir.path(), ListKind::Deny).len(), 2);
}

#[tokio::test]
async fn corruption_before_the_tail_refuses_to_open() {
    let (dir, path) = three_entries_journaled().await;
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[14] ^= 0x01; // inside the first record's payload
    std::fs::write(&path, &bytes).unwrap();
    let err = ListStore::open(dir.path(), ListKind::Deny, StoreOptions::new(1 << 20))
        .err()
        .unwrap();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("deny.journal.0"), "{err}");
    // A damaged snapshot refuses too.
    std::fs::write(
        dir.path().join("deny.snapshot"),
        b"GKSNAP\x00\x01garbage!!!!!!!",
    )
    .unwrap();
    let err = ListStore::open(dir.path(), ListKind::Deny, StoreOptions::new(1 << 20))
        .err()
        .unwrap();
    assert!(err.to_string().contains("deny.snapshot"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_folds_journals_into_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let store = ListStore::open(dir.path(), ListKind::Deny, StoreOptions::new(1)).unwrap();
    let mut expected = BTreeMap::new();
    for i in 0..200u32 {
        let p = format!("10.0.{}.{}/32", i / 256, i % 256);
        let pending = change(&store, Change::Add(vec![entry(&p, Some("x"), None)]))
            .await
            .unwrap();
        expected.insert(net(&p), ());
        if i % 3 == 0 {
            change(&store, Change::Remove(pending.added.clone()))
                .await
                .unwrap();
            expected.remove(&net(&p));
        }
    }
    // Let the last compaction finish.
    for _ in 0..500 {
        if !store.state().compacting {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let live = entries(&store);
    store.close();
    assert!(dir.path().join("deny.snapshot").exists());
    let journals = journal_files(dir.path());
    assert!(journals.len() <= 2, "old journals kept: {journals:?}");
    let reopened = open(dir.path(), ListKind::Deny);
    assert_eq!(entries(&reopened), live);
    assert_eq!(
        live.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn format_1_json_is_migrated_once() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("deny.json"),
        r#"{"version":1,"entries":[{"prefix":"192.0.2.0/24","reason":"SBL1","added":5},{"prefix":"2001:db8::1/128","added":6,"expires":99}]}"#,
    )
    .unwrap();
    let store = open(dir.path(), ListKind::Deny);
    let got = entries(&store);
    assert_eq!(got.len(), 2);
    assert_eq!(got[&net("192.0.2.0/24")].reason.as_deref(), Some("SBL1"));
    assert_eq!(got[&net("2001:db8::1/128")].expires, Some(99));
    assert!(!dir.path().join("deny.json").exists());
    assert!(dir.path().join("deny.snapshot").exists());
    change(&store, Change::Remove(vec![net("192.0.2.0/24")]))
        .await
        .unwrap();
    store.close();
    assert_eq!(open(dir.path(), ListKind::Deny).len(), 1);

    let other = tempfile::tempdir().unwrap();
    std::fs::write(
        other.path().join("allow.json"),
        "{\"version\":1,\"entries\":[{\"pre",
    )
    .unwrap();
    let err = ListStore::open(other.path(), ListKind::Allow, StoreOptions::new(1 << 20))
        .err()
        .unwrap();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    std::fs::write(
        other.path().join("allow.json"),
        r#"{"version":9,"entries":[]}"#,
    )
    .unwrap();
    let err = ListStore::open(other.path(), ListKind::Allow, StoreOptions::new(1 << 20))
        .err()
        .unwrap();
    assert!(matches!(err, StoreError::Version { found: 9, .. }), "{err}");
}

/// An fsync hook that counts calls and holds the first until released.
struct GatedFsync {
    calls: AtomicUsize,
    open: (Mutex<bool>, Condvar),
}

impl GatedFsync {
    fn options(self: &Arc<Self>) -> StoreOptions {
        let hook = self.clone();
        StoreOptions {
            compact_bytes: 1 << 30,
            fsync: Arc::new(move |file: &File| {
                if hook.calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    let (lock, cvar) = &hook.open;
                    let mut open = lock.lock().unwrap();
                    while !*open {
                        open = cvar.wait(open).unwrap();
                    }
                }
                file.sync_data()
            }),
        }
    }

    fn release(&self) {
        *self.open.0.lock().unwrap() = true;
        self.open.1.notify_all();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_fsync_acknowledges_many_concurrent_changes() {
    let dir = tempfile::tempdir().unwrap();
    let gate = Arc::new(GatedFsync {
        calls: AtomicUsize::new(0),
        open: (Mutex::new(false), Condvar::new()),
    });
    let store = ListStore::open(dir.path(), ListKind::Deny, gate.options()).unwrap();
    // The first change puts the committer inside its first fsync...
    let first = store
        .apply(Change::Add(vec![entry("192.0.2.1/32", None, None)]), ROOMY)
        .unwrap();
    while gate.calls.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    // ...while 100 clients change the list concurrently and wait.
    let applied = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..100u32)
        .map(|i| {
            let (store, applied) = (store.clone(), applied.clone());
            tokio::spawn(async move {
                let p = entry(&format!("10.1.{}.{}/32", i / 256, i % 256), None, None);
                let pending = store.apply(Change::Add(vec![p]), ROOMY).unwrap();
                applied.fetch_add(1, Ordering::SeqCst);
                store.durable(&pending).await
            })
        })
        .collect();
    while applied.load(Ordering::SeqCst) < 100 {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    gate.release();
    store.durable(&first).await.unwrap();
    for client in clients {
        client.await.unwrap().unwrap();
    }
    assert_eq!(
        gate.calls.load(Ordering::SeqCst),
        2,
        "one fsync for the first change, one for the hundred after it"
    );
    store.close();
    assert_eq!(open(dir.path(), ListKind::Deny).len(), 101);
}

#[tokio::test]
async fn failed_fsync_undoes_and_refuses_further_changes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), ListKind::Deny);
    change(&store, Change::Add(vec![entry("192.0.2.1/32", None, None)]))
        .await
        .unwrap();
    store.close();
    let options = StoreOptions {
        compact_bytes: 1 << 30,
        fsync: Arc::new(|_: &File| Err(std::io::Error::other("disk on fire"))),
    };
    let store = ListStore::open(dir.path(), ListKind::Deny, options).unwrap();
    let err = change(&store, Change::Add(vec![entry("192.0.2.2/32", None, None)]))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("disk on fire"), "{err}");
    assert_eq!(
        entries(&store).keys().collect::<Vec<_>>(),
        [&net("192.0.2.1/32")],
        "the unacknowledged change is undone in memory"
    );
    assert!(!store.covers("192.0.2.2".parse().unwrap(), 0));
    let err = store
        .apply(Change::Remove(vec![net("192.0.2.1/32")]), ROOMY)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("refused until gatekeeper is restarted"),
        "{err}"
    );
    assert_eq!(store.len(), 1);
}

#[tokio::test]
async fn covers_probes_live_entries_of_every_length_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), ListKind::Deny);
    change(
        &store,
        Change::Add(vec![
            entry("10.0.0.0/8", None, None),
            entry("192.0.2.7/32", None, None),
            entry("198.51.100.0/24", None, Some(1000)),
            entry("2001:db8::/32", None, None),
        ]),
    )
    .await
    .unwrap();
    let covers = |ip: &str, now| store.covers(ip.parse().unwrap(), now);
    assert!(covers("10.200.3.4", 0));
    assert!(covers("192.0.2.7", 0));
    assert!(!covers("192.0.2.8", 0));
    assert!(covers("198.51.100.9", 999));
    assert!(
        !covers("198.51.100.9", 1000),
        "expired entries cover nothing"
    );
    assert!(covers("2001:db8:1::5", 0));
    assert!(!covers("2001:db9::5", 0));
    assert!(!covers("11.0.0.1", 0));
}

fn feed(name: &str, nets: &[(&str, Option<&str>)]) -> Change {
    Change::Feed {
        feed: name.into(),
        entries: nets
            .iter()
            .map(|(n, reason)| (net(n), reason.map(str::to_owned)))
            .collect(),
    }
}

fn owners(store: &ListStore, s: &str) -> Option<(bool, Vec<String>)> {
    entries(store)
        .get(&net(s))
        .map(|m| (m.manual, m.feeds.iter().cloned().collect()))
}

#[tokio::test]
async fn a_feed_refresh_replaces_only_its_own_entries() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), ListKind::Deny);
    change(
        &store,
        Change::Add(vec![
            entry("192.0.2.1/32", Some("manual"), None),
            entry("192.0.2.0/24", Some("mine"), None),
        ]),
    )
    .await
    .unwrap();
    change(&store, feed("b", &[("203.0.113.0/24", None)]))
        .await
        .unwrap();
    let first = change(
        &store,
        feed(
            "a",
            &[
                ("198.51.100.0/24", Some("SBL1")),
                ("192.0.2.0/24", Some("SBL2")),
                ("203.0.113.0/24", None),
            ],
        ),
    )
    .await
    .unwrap();
    assert_eq!(first.added, [net("198.51.100.0/24")]);
    // The operator's reason wins over the feed's.
    assert_eq!(
        entries(&store)[&net("192.0.2.0/24")].reason.as_deref(),
        Some("mine")
    );
    // The next copy of feed a drops everything but one new prefix.
    let second = change(&store, feed("a", &[("198.51.100.128/25", None)]))
        .await
        .unwrap();
    assert_eq!(second.added, [net("198.51.100.128/25")]);
    assert_eq!(second.removed, [net("198.51.100.0/24")]);
    assert_eq!(owners(&store, "192.0.2.0/24"), Some((true, vec![])));
    assert_eq!(owners(&store, "192.0.2.1/32"), Some((true, vec![])));
    assert_eq!(
        owners(&store, "203.0.113.0/24"),
        Some((false, vec!["b".into()]))
    );
    assert_eq!(store.feed_len("a"), 1);
    assert_eq!(store.feeds(), ["a".to_string(), "b".into()].into());
    // One journal record per refresh: a crash leaves the old or the new copy.
    store.close();
    let reopened = open(dir.path(), ListKind::Deny);
    assert_eq!(reopened.len(), 4);
    assert_eq!(
        owners(&reopened, "198.51.100.128/25"),
        Some((false, vec!["a".into()]))
    );
}

#[tokio::test]
async fn manual_and_feed_listings_of_one_prefix_are_independent() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), ListKind::Deny);
    change(&store, feed("drop", &[("192.0.2.0/24", Some("SBL1"))]))
        .await
        .unwrap();
    // `deny del` of a prefix only a feed lists is refused, naming the feed.
    let err = change(&store, Change::Remove(vec![net("192.0.2.0/24")]))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("feed drop"), "{err}");
    // A temporary manual listing on top: the entry stays live while the feed lists it.
    change(
        &store,
        Change::Add(vec![entry("192.0.2.0/24", None, Some(50))]),
    )
    .await
    .unwrap();
    assert_eq!(
        owners(&store, "192.0.2.0/24"),
        Some((true, vec!["drop".into()]))
    );
    assert!(entries(&store)[&net("192.0.2.0/24")].live_at(100));
    assert_eq!(store.expired(100), [net("192.0.2.0/24")]);
    change(
        &store,
        Change::Expire {
            nets: vec![net("192.0.2.0/24")],
            now: 100,
        },
    )
    .await
    .unwrap();
    assert_eq!(
        owners(&store, "192.0.2.0/24"),
        Some((false, vec!["drop".into()]))
    );
    // Manual and feed: `del` removes the manual listing, the feed's stays...
    change(&store, Change::Add(vec![entry("192.0.2.0/24", None, None)]))
        .await
        .unwrap();
    let removed = change(&store, Change::Remove(vec![net("192.0.2.0/24")]))
        .await
        .unwrap();
    assert!(removed.removed.is_empty());
    assert_eq!(
        owners(&store, "192.0.2.0/24"),
        Some((false, vec!["drop".into()]))
    );
    // ...and the feed dropping it leaves a manual listing in place.
    change(&store, Change::Add(vec![entry("192.0.2.0/24", None, None)]))
        .await
        .unwrap();
    change(&store, feed("drop", &[])).await.unwrap();
    assert_eq!(owners(&store, "192.0.2.0/24"), Some((true, vec![])));
    // `import --replace` replaces manual listings only.
    change(&store, feed("drop", &[("198.51.100.0/24", None)]))
        .await
        .unwrap();
    change(
        &store,
        Change::Replace(vec![entry("203.0.113.0/24", None, None)]),
    )
    .await
    .unwrap();
    assert_eq!(owners(&store, "192.0.2.0/24"), None);
    assert_eq!(
        owners(&store, "198.51.100.0/24"),
        Some((false, vec!["drop".into()]))
    );
    assert_eq!(owners(&store, "203.0.113.0/24"), Some((true, vec![])));
}

/// A state dir as the previous gatekeeper (format 1) left it: a snapshot
/// and a journal after it, or journals alone.
#[tokio::test]
async fn format_1_state_dirs_load_and_migrate_once() {
    use super::super::journal::RecordV1;
    let v1 = |reason: &str| EntryMetaV1 {
        reason: Some(reason.into()),
        added: 5,
        expires: None,
    };
    for with_snapshot in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let first_journal = if with_snapshot {
            let old: BTreeMap<IpNet, EntryMetaV1> = [(net("192.0.2.0/24"), v1("snap"))].into();
            std::fs::write(
                dir.path().join("deny.snapshot"),
                snapshot::v1_bytes(2, &old),
            )
            .unwrap();
            2
        } else {
            0
        };
        let record = RecordV1 {
            ops: vec![(net("198.51.100.0/24"), Some(v1("journal")))],
        };
        std::fs::write(
            dir.path().join(format!("deny.journal.{first_journal}")),
            journal::encode(&record),
        )
        .unwrap();
        let store = open(dir.path(), ListKind::Deny);
        let loaded = entries(&store);
        assert_eq!(
            loaded[&net("198.51.100.0/24")],
            EntryMeta::manual(Some("journal".into()), 5, None)
        );
        assert_eq!(loaded.len(), if with_snapshot { 2 } else { 1 });
        // The format-1 journal is folded; the next change goes to a format-2 one.
        assert_eq!(
            journal_files(dir.path()),
            [format!("deny.journal.{}", first_journal + 1)]
        );
        change(&store, feed("drop", &[("203.0.113.0/24", None)]))
            .await
            .unwrap();
        store.close();
        let reopened = open(dir.path(), ListKind::Deny);
        let mut expected = loaded.clone();
        expected.insert(
            net("203.0.113.0/24"),
            entries(&reopened)[&net("203.0.113.0/24")].clone(),
        );
        assert_eq!(entries(&reopened), expected);
        assert_eq!(
            owners(&reopened, "203.0.113.0/24"),
            Some((false, vec!["drop".into()]))
        );
    }
}

/// A state dir as the round-2 gatekeeper (format 2) left it: its entries,
/// feed claims included, survive, and the next change is format 3.
#[tokio::test]
async fn format_2_state_dirs_migrate_to_fleet_claims() {
    use super::super::journal::RecordOf;
    let v2 = |reason: &str, feeds: &[&str]| EntryMetaV2 {
        reason: Some(reason.into()),
        added: 5,
        expires: Some(u64::MAX),
        manual: feeds.is_empty(),
        feeds: feeds.iter().map(|f| f.to_string()).collect(),
    };
    let dir = tempfile::tempdir().unwrap();
    let old: BTreeMap<IpNet, EntryMetaV2> = [(net("192.0.2.0/24"), v2("snap", &["drop"]))].into();
    std::fs::write(
        dir.path().join("deny.snapshot"),
        snapshot::v2_bytes(3, &old),
    )
    .unwrap();
    let record = RecordOf {
        ops: vec![(net("198.51.100.0/24"), Some(v2("journal", &[])))],
    };
    std::fs::write(dir.path().join("deny.journal.3"), journal::encode(&record)).unwrap();
    let store = open(dir.path(), ListKind::Deny);
    let loaded = entries(&store);
    assert_eq!(loaded[&net("192.0.2.0/24")], v2("snap", &["drop"]).into());
    assert_eq!(loaded[&net("198.51.100.0/24")], v2("journal", &[]).into());
    assert_eq!(journal_files(dir.path()), ["deny.journal.4"]);
    change(
        &store,
        Change::Shared(vec![shared_add("203.0.113.9/32", Some(u64::MAX))]),
    )
    .await
    .unwrap();
    store.close();
    let reopened = open(dir.path(), ListKind::Deny);
    assert_eq!(entries(&reopened).len(), 3);
    assert!(entries(&reopened)[&net("203.0.113.9/32")].shared.is_some());
}

fn shared_add(s: &str, expires: Option<u64>) -> SharedOp {
    SharedOp::Add(SharedEntry {
        net: net(s),
        reason: Some("dnsbl bl.test".into()),
        expires,
        origin: "mx-a".into(),
    })
}

/// The fleet is one more owner: its claim and the operator's come and go
/// independently, a plain `del` never withdraws the fleet's, and each
/// expires on its own clock.
#[tokio::test]
async fn shared_and_manual_listings_of_one_prefix_are_independent() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), ListKind::Deny);
    let host = "192.0.2.7/32";
    change(&store, Change::Shared(vec![shared_add(host, Some(200))]))
        .await
        .unwrap();
    // Not the operator's to delete.
    let refused = change(&store, Change::Remove(vec![net(host)])).await;
    let Err(ApplyError::NotListed(not_listed)) = refused else {
        panic!("{refused:?}")
    };
    assert_eq!(not_listed.by_fleet, [net(host)]);
    assert!(not_listed.to_string().contains("del --share"));
    // A shorter expiry never shortens the claim; the operator adds his own.
    change(&store, Change::Shared(vec![shared_add(host, Some(150))]))
        .await
        .unwrap();
    change(
        &store,
        Change::Add(vec![entry(host, Some("mine"), Some(100))]),
    )
    .await
    .unwrap();
    let meta = &entries(&store)[&net(host)];
    assert_eq!(meta.shared.as_ref().unwrap().expires, Some(200));
    assert_eq!(
        (meta.expiry(), meta.reason.as_deref()),
        (Some(200), Some("mine"))
    );
    // The manual listing expires first; the fleet's claim keeps it listed.
    let now = 120;
    change(
        &store,
        Change::Expire {
            nets: store.expired(now),
            now,
        },
    )
    .await
    .unwrap();
    let meta = entries(&store)[&net(host)].clone();
    assert!(!meta.manual && meta.shared.is_some());
    // Withdrawn by the fleet: gone. A withdrawal of what it never held is no error.
    change(
        &store,
        Change::Shared(vec![
            SharedOp::Remove(net(host)),
            SharedOp::Remove(net("198.51.100.1/32")),
        ]),
    )
    .await
    .unwrap();
    assert!(entries(&store).is_empty());
    // A fleet withdrawal leaves the operator's own listing alone.
    change(&store, Change::Add(vec![entry(host, None, None)]))
        .await
        .unwrap();
    change(&store, Change::Shared(vec![shared_add(host, Some(200))]))
        .await
        .unwrap();
    change(&store, Change::Shared(vec![SharedOp::Remove(net(host))]))
        .await
        .unwrap();
    let meta = &entries(&store)[&net(host)];
    assert!(meta.manual && meta.shared.is_none() && meta.expiry().is_none());
}

/// A full resynchronisation makes the fleet's claims exactly the snapshot's,
/// with the snapshot's expiries, and touches no other owner's listing.
#[tokio::test]
async fn shared_replace_sets_exactly_the_fleet_claims() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), ListKind::Deny);
    change(&store, Change::Add(vec![entry("192.0.2.1/32", None, None)]))
        .await
        .unwrap();
    change(
        &store,
        Change::Shared(vec![
            shared_add("192.0.2.1/32", Some(900)),
            shared_add("192.0.2.2/32", Some(900)),
        ]),
    )
    .await
    .unwrap();
    let replace = |s: &str, expires| SharedEntry {
        net: net(s),
        reason: None,
        expires,
        origin: "mx-b".into(),
    };
    change(
        &store,
        Change::SharedReplace(vec![replace("192.0.2.3/32", Some(500))]),
    )
    .await
    .unwrap();
    let now = entries(&store);
    assert_eq!(now.len(), 2, "{now:?}");
    assert!(now[&net("192.0.2.1/32")].manual && now[&net("192.0.2.1/32")].shared.is_none());
    let claim = now[&net("192.0.2.3/32")].shared.clone().unwrap();
    assert_eq!((claim.expires, claim.origin.as_str()), (Some(500), "mx-b"));
}

/// The plain meaning of `Add` and `Replace`, item by item in the order
/// given, without the sorted merge walks and bulk paths `plan` uses.
fn model(
    entries: &BTreeMap<IpNet, EntryMeta>,
    change: &Change,
    now: u64,
) -> BTreeMap<IpNet, EntryMeta> {
    let mut out = entries.clone();
    let items = match change {
        Change::Add(items) => items,
        Change::Replace(items) => {
            let keep: HashSet<IpNet> = items.iter().map(|i| i.net).collect();
            for (net, meta) in entries {
                if meta.manual && !keep.contains(net) {
                    match meta.clone().without_manual() {
                        Some(left) => out.insert(*net, left),
                        None => out.remove(net),
                    };
                }
            }
            items
        }
        _ => unreachable!("the model covers Add and Replace"),
    };
    for item in items {
        let merged = upsert(out.get(&item.net).cloned(), item.clone(), now);
        out.insert(item.net, merged);
    }
    out
}

fn listed_state() -> impl proptest::strategy::Strategy<Value = BTreeMap<IpNet, EntryMeta>> {
    use proptest::prelude::*;
    proptest::collection::btree_map(small_net(), (any::<bool>(), any::<bool>(), 0u64..3), 0..40)
        .prop_map(|raw| {
            raw.into_iter()
                .map(|(net, (manual, fed, expiry))| {
                    let meta = EntryMeta {
                        reason: None,
                        added: 1,
                        expires: (expiry > 0).then_some(1000 * expiry),
                        manual: manual || !fed,
                        feeds: if fed {
                            BTreeSet::from(["f".to_owned()])
                        } else {
                            BTreeSet::new()
                        },
                        shared: None,
                    };
                    (net, meta)
                })
                .collect()
        })
}

/// Few enough distinct prefixes that items repeat and overlap the list.
fn small_net() -> impl proptest::strategy::Strategy<Value = IpNet> {
    use proptest::prelude::*;
    (0u8..24, prop_oneof![Just(24u8), Just(32u8)]).prop_map(|(host, len)| {
        IpNet::V4(ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(192, 0, 2, host * 8), len).unwrap())
    })
}

proptest::proptest! {
    #[test]
    fn planned_changes_equal_item_by_item_application(
        listed in listed_state(),
        items in proptest::collection::vec(
            (small_net(), proptest::option::of("[a-c]"), proptest::option::of(1u64..3000)),
            0..60,
        ),
        replace: bool,
    ) {
        let items: Vec<NewEntry> = items
            .into_iter()
            .map(|(net, reason, expires)| NewEntry { net, reason, expires })
            .collect();
        let change = if replace { Change::Replace(items) } else { Change::Add(items) };
        let expected = model(&listed, &change, 500);
        let planned = plan(&listed, ListKind::Deny, change, 500).unwrap();
        // Each touched prefix once, in prefix order, undo matching the old state.
        let nets: Vec<IpNet> = planned.ops.iter().map(|(n, _)| *n).collect();
        proptest::prop_assert!(nets.windows(2).all(|w| w[0] < w[1]), "{nets:?}");
        for (net, old) in &planned.undo {
            proptest::prop_assert_eq!(old.as_ref(), listed.get(net));
        }
        let mut applied = listed.clone();
        apply_ops(&mut applied, planned.ops.into_iter());
        proptest::prop_assert_eq!(applied, expected);
    }
}

#[test]
fn a_bulk_merge_equals_entry_by_entry_application() {
    let meta = |reason: &str| EntryMeta::manual(Some(reason.to_owned()), 1, None);
    let v4 = |i: u32| IpNet::V4(ipnet::Ipv4Net::new(std::net::Ipv4Addr::from(i << 8), 24).unwrap());
    let listed: BTreeMap<IpNet, EntryMeta> = (0..8000).map(|i| (v4(i * 2), meta("old"))).collect();
    // Removes every fourth listed prefix (i % 8 == 0), updates the other listed ones, adds the odd ones.
    let ops: Vec<(IpNet, Option<EntryMeta>)> = (0..16000)
        .map(|i| match (i % 2, i % 8) {
            (0, 0) => (v4(i), None),
            (0, _) => (v4(i), Some(meta("updated"))),
            _ => (v4(i), Some(meta("new"))),
        })
        .collect();
    assert!(ops.len() >= BULK_MERGE_FROM);
    let mut bulk = listed.clone();
    apply_ops(&mut bulk, ops.clone().into_iter());
    let mut single = listed;
    for (net, meta) in ops {
        match meta {
            Some(meta) => single.insert(net, meta),
            None => single.remove(&net),
        };
    }
    assert_eq!(bulk, single);
    assert_eq!(bulk.len(), 16000 - 2000);
}

#[test]
fn an_unordered_bulk_change_from_an_old_journal_applies_like_an_ordered_one() {
    let meta = |reason: &str| EntryMeta::manual(Some(reason.to_owned()), 1, None);
    let v4 = |i: u32| IpNet::V4(ipnet::Ipv4Net::new(std::net::Ipv4Addr::from(i << 8), 24).unwrap());
    let listed: BTreeMap<IpNet, EntryMeta> = (0..6000).map(|i| (v4(i), meta("old"))).collect();
    let ops: Vec<(IpNet, Option<EntryMeta>)> = (0..6000)
        .rev()
        .map(|i| (v4(i * 2), (i % 3 != 0).then(|| meta("new"))))
        .collect();
    let mut unordered = listed.clone();
    apply_ops(&mut unordered, ops.clone().into_iter());
    let mut sorted_ops = ops;
    sorted_ops.sort_by_key(|op| op.0);
    let mut ordered = listed;
    apply_ops(&mut ordered, sorted_ops.into_iter());
    assert_eq!(unordered, ordered);
    assert!(!ordered.contains_key(&v4(0)) && ordered[&v4(2)].reason.as_deref() == Some("new"));
}
