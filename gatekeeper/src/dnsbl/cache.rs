//! Verdicts, positive and negative, in a bounded LRU; saved on clean shutdown
//! and reloaded at start so a restart causes no query storm.

use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::Arc;

use lru::LruCache;
use serde::{Deserialize, Serialize};

use super::verdict::Verdict;
use crate::persist::write_json_atomically;

const FORMAT_VERSION: u32 = 1;

pub struct VerdictCache {
    entries: LruCache<IpAddr, Arc<Verdict>>,
}

#[derive(Serialize, Deserialize)]
struct SavedCache {
    version: u32,
    /// Verdicts are only valid for the zone set and threshold that produced them.
    fingerprint: String,
    verdicts: Vec<Verdict>,
}

#[derive(Debug, thiserror::Error)]
pub enum CacheFileError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a verdict cache: {source}")]
    Corrupt {
        path: String,
        source: serde_json::Error,
    },
}

impl VerdictCache {
    pub fn new(capacity: usize) -> VerdictCache {
        VerdictCache {
            entries: LruCache::new(NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN)),
        }
    }

    /// A live verdict; an expired one is dropped on the way.
    /// Evicts the least recently used verdicts beyond `capacity`.
    pub fn resize(&mut self, capacity: usize) {
        self.entries
            .resize(NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN));
    }

    pub fn get(&mut self, client: IpAddr, now: u64) -> Option<Arc<Verdict>> {
        match self.entries.get(&client) {
            Some(verdict) if verdict.expires_at > now => Some(verdict.clone()),
            Some(_) => {
                self.entries.pop(&client);
                None
            }
            None => None,
        }
    }

    pub fn insert(&mut self, verdict: Arc<Verdict>) {
        self.entries.put(verdict.client, verdict);
    }

    pub fn remove(&mut self, client: IpAddr) -> bool {
        self.entries.pop(&client).is_some()
    }

    pub fn clear(&mut self) -> usize {
        let count = self.entries.len();
        self.entries.clear();
        count
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Live verdicts, least recently used first (so reloading restores the order).
    pub fn live(&self, now: u64) -> Vec<Arc<Verdict>> {
        self.entries
            .iter()
            .rev()
            .filter(|(_, v)| v.expires_at > now)
            .map(|(_, v)| v.clone())
            .collect()
    }

    pub fn save(&self, path: &Path, fingerprint: &str, now: u64) -> std::io::Result<usize> {
        let verdicts: Vec<Verdict> = self.live(now).iter().map(|v| (**v).clone()).collect();
        let count = verdicts.len();
        let saved = SavedCache {
            version: FORMAT_VERSION,
            fingerprint: fingerprint.to_owned(),
            verdicts,
        };
        write_json_atomically(path, &saved)?;
        Ok(count)
    }

    /// Loads still-valid verdicts made under the same `fingerprint`; a missing
    /// file, another version or another zone set gives an empty cache.
    pub fn load(
        &mut self,
        path: &Path,
        fingerprint: &str,
        now: u64,
    ) -> Result<usize, CacheFileError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(source) => {
                return Err(CacheFileError::Read {
                    path: path.display().to_string(),
                    source,
                })
            }
        };
        let saved: SavedCache =
            serde_json::from_str(&text).map_err(|source| CacheFileError::Corrupt {
                path: path.display().to_string(),
                source,
            })?;
        if saved.version != FORMAT_VERSION || saved.fingerprint != fingerprint {
            return Ok(0);
        }
        let mut loaded = 0;
        for verdict in saved.verdicts {
            if verdict.expires_at > now {
                self.insert(Arc::new(verdict));
                loaded += 1;
            }
        }
        Ok(loaded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(client: &str, expires_at: u64) -> Arc<Verdict> {
        Arc::new(Verdict {
            client: client.parse().unwrap(),
            score: 1,
            listed: true,
            trusted: false,
            blocked_by: Some("bl.test".into()),
            zones: vec![],
            checked_at: 0,
            expires_at,
        })
    }

    #[test]
    fn expired_verdicts_are_misses() {
        let mut cache = VerdictCache::new(10);
        cache.insert(verdict("192.0.2.1", 100));
        assert!(cache.get("192.0.2.1".parse().unwrap(), 99).is_some());
        assert!(cache.get("192.0.2.1".parse().unwrap(), 100).is_none());
        assert!(cache.is_empty());
    }

    #[test]
    fn least_recently_used_goes_first() {
        let mut cache = VerdictCache::new(2);
        cache.insert(verdict("192.0.2.1", 100));
        cache.insert(verdict("192.0.2.2", 100));
        cache.get("192.0.2.1".parse().unwrap(), 0);
        cache.insert(verdict("192.0.2.3", 100));
        assert!(cache.get("192.0.2.2".parse().unwrap(), 0).is_none());
        assert!(cache.get("192.0.2.1".parse().unwrap(), 0).is_some());
    }

    #[test]
    fn survives_a_save_and_load_under_the_same_zones_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dnsbl-cache.json");
        let mut cache = VerdictCache::new(10);
        cache.insert(verdict("192.0.2.1", 100));
        cache.insert(verdict("2001:db8::1", 100));
        cache.insert(verdict("192.0.2.9", 10));
        assert_eq!(cache.save(&path, "zones-a", 50).unwrap(), 2);

        let mut reloaded = VerdictCache::new(10);
        assert_eq!(reloaded.load(&path, "zones-a", 60).unwrap(), 2);
        assert!(reloaded.get("2001:db8::1".parse().unwrap(), 60).is_some());
        let mut other_zones = VerdictCache::new(10);
        assert_eq!(other_zones.load(&path, "zones-b", 60).unwrap(), 0);
        assert_eq!(
            VerdictCache::new(10)
                .load(&dir.path().join("absent"), "zones-a", 0)
                .unwrap(),
            0
        );

        std::fs::write(&path, "{not json").unwrap();
        assert!(VerdictCache::new(10).load(&path, "zones-a", 0).is_err());
    }
}
