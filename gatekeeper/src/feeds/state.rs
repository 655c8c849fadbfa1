//! The feeds' durable state in `state_dir/feeds.json`: each feed's
//! validators and what they were fetched for, so a restart asks
//! conditionally instead of downloading every list again.
//!
//! The store change of a refresh is made durable first, the validators
//! after: a crash in between costs one unconditional fetch, never a copy
//! the store does not hold.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::warn;

use super::fetch::Validators;
use crate::lists::ListKind;
use crate::persist::write_json_atomically;

const VERSION: u32 = 1;

/// What one feed's last good copy was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeldCopy {
    /// The URL or path and list it came from: validators of another source mean nothing.
    pub source: String,
    pub list: ListKind,
    pub validators: Validators,
    /// Entries it gave the feed; a store that disagrees is refetched.
    pub entries: usize,
    /// Unix seconds of the fetch.
    pub fetched: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    feeds: BTreeMap<String, HeldCopy>,
}

pub struct FeedState {
    path: PathBuf,
    feeds: BTreeMap<String, HeldCopy>,
}

impl FeedState {
    /// Reads the state file; a missing, unreadable or damaged one only
    /// costs unconditional fetches, so it is a warning, not an error.
    pub fn load(state_dir: &Path) -> FeedState {
        let path = state_dir.join("feeds.json");
        let feeds = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<StateFile>(&bytes) {
                Ok(file) if file.version == VERSION => file.feeds,
                Ok(file) => {
                    warn!(path = %path.display(), version = file.version, "feed state of an unknown version ignored; feeds are fetched afresh");
                    BTreeMap::new()
                }
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "feed state unreadable; feeds are fetched afresh");
                    BTreeMap::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "feed state unreadable; feeds are fetched afresh");
                BTreeMap::new()
            }
        };
        FeedState { path, feeds }
    }

    pub fn get(&self, feed: &str) -> Option<&HeldCopy> {
        self.feeds.get(feed)
    }

    /// Records a feed's new copy (or forgets it) and writes the file atomically.
    pub fn set(&mut self, feed: &str, copy: Option<HeldCopy>) -> std::io::Result<()> {
        match copy {
            Some(copy) => self.feeds.insert(feed.to_owned(), copy),
            None => self.feeds.remove(feed),
        };
        self.save()
    }

    /// Forgets feeds no longer configured.
    pub fn retain(&mut self, configured: impl Fn(&str) -> bool) -> std::io::Result<()> {
        let before = self.feeds.len();
        self.feeds.retain(|name, _| configured(name));
        if self.feeds.len() == before {
            return Ok(());
        }
        self.save()
    }

    fn save(&self) -> std::io::Result<()> {
        write_json_atomically(
            &self.path,
            &StateFile {
                version: VERSION,
                feeds: self.feeds.clone(),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_a_reload_and_tolerates_damage() {
        let dir = tempfile::tempdir().unwrap();
        let copy = HeldCopy {
            source: "http://192.0.2.2/drop.txt".into(),
            list: ListKind::Deny,
            validators: Validators {
                etag: Some("\"v1\"".into()),
                last_modified: None,
            },
            entries: 3,
            fetched: 10,
        };
        let mut state = FeedState::load(dir.path());
        assert!(state.get("drop").is_none());
        state.set("drop", Some(copy.clone())).unwrap();
        state.set("other", Some(copy.clone())).unwrap();
        state.retain(|name| name == "drop").unwrap();
        let state = FeedState::load(dir.path());
        assert_eq!(state.get("drop"), Some(&copy));
        assert!(state.get("other").is_none());
        std::fs::write(dir.path().join("feeds.json"), b"{garbage").unwrap();
        assert!(FeedState::load(dir.path()).get("drop").is_none());
    }
}
