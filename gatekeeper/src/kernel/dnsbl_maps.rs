//! The kernel's DNSBL verdicts (exact-address LRU hashes) and read-only views
//! of the allow/deny tries, for the connection-time screen.

use std::net::IpAddr;
use std::path::Path;

use anyhow::{Context, Result};
use aya::maps::{lpm_trie::Key, Array, HashMap, LpmTrie, Map, MapData, MapError};
use gatekeeper_common::{map_names, ExactBucket, PrefixValue};

use super::block_bitmaps::{set_range, KernelBitmap};
use super::exact_slots::{read_pinned, Lookup};
use super::maps::{is_absent, Clock, ExactMaps};
use crate::netaddr::canonical;

/// Listed clients by address; XDP drops their SYNs while the entry is live.
pub struct DnsblMaps {
    v4: HashMap<MapData, [u8; 4], PrefixValue>,
    v6: HashMap<MapData, [u8; 16], PrefixValue>,
    /// Per-/24 blocks holding IPv4 entries; XDP asks the hash only there.
    hint_v4: KernelBitmap,
}

/// A live kernel DNSBL entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsblEntry {
    pub client: IpAddr,
    /// Unix seconds.
    pub expires: u64,
}

impl DnsblMaps {
    pub fn new(
        v4: HashMap<MapData, [u8; 4], PrefixValue>,
        v6: HashMap<MapData, [u8; 16], PrefixValue>,
        hint_v4: KernelBitmap,
    ) -> DnsblMaps {
        DnsblMaps { v4, v6, hint_v4 }
    }

    /// Inserts or refreshes `client` until unix time `expires`; an already
    /// expired verdict is not inserted.
    pub fn insert(&mut self, client: IpAddr, expires: u64) -> Result<bool> {
        let Some(value) = Clock::now().kernel_value(Some(expires)) else {
            return Ok(false);
        };
        match canonical(client) {
            IpAddr::V4(a) => self.v4.insert(a.octets(), value, 0),
            IpAddr::V6(a) => self.v6.insert(a.octets(), value, 0),
        }
        .with_context(|| format!("inserting {client} into the kernel DNSBL map"))?;
        // After the entry: until the bit is set, XDP does not look (as before the verdict).
        if let IpAddr::V4(a) = canonical(client) {
            self.hint_v4.mark(a.octets()).context("DNSBL hint bitmap")?;
        }
        Ok(true)
    }

    /// Whether an entry (live or not) was there.
    pub fn remove(&mut self, client: IpAddr) -> Result<bool> {
        let result = match canonical(client) {
            IpAddr::V4(a) => self.v4.remove(&a.octets()),
            IpAddr::V6(a) => self.v6.remove(&a.octets()),
        };
        match result {
            Ok(()) => Ok(true),
            Err(e) if is_absent(&e) => Ok(false),
            Err(e) => {
                Err(e).with_context(|| format!("removing {client} from the kernel DNSBL map"))
            }
        }
    }

    /// The live entry for `client`, if any.
    pub fn lookup(&self, client: IpAddr) -> Option<DnsblEntry> {
        let value = match canonical(client) {
            IpAddr::V4(a) => self.v4.get(&a.octets(), 0).ok(),
            IpAddr::V6(a) => self.v6.get(&a.octets(), 0).ok(),
        }?;
        let expires = Clock::now().unix_expiry(value)?;
        Some(DnsblEntry { client, expires })
    }

    /// Every entry with its expiry; `None` for expired ones still in the map.
    fn all(&self) -> Vec<(IpAddr, Option<u64>)> {
        let clock = Clock::now();
        let v4 = self
            .v4
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (IpAddr::from(k), clock.unix_expiry(v)));
        let v6 = self
            .v6
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (IpAddr::from(k), clock.unix_expiry(v)));
        v4.chain(v6).collect()
    }

    pub fn live(&self) -> Vec<DnsblEntry> {
        let mut entries: Vec<DnsblEntry> = self
            .all()
            .into_iter()
            .filter_map(|(client, expires)| {
                Some(DnsblEntry {
                    client,
                    expires: expires?,
                })
            })
            .collect();
        entries.sort_by_key(|e| e.client);
        entries
    }

    /// Removes expired entries; XDP already ignores them, this frees the slots.
    pub fn sweep(&mut self) -> Result<usize> {
        let expired: Vec<IpAddr> = self
            .all()
            .into_iter()
            .filter(|(_, expires)| expires.is_none())
            .map(|(client, _)| client)
            .collect();
        for client in &expired {
            self.remove(*client)?;
        }
        // Also clears bits left by entries the kernel evicted (LRU).
        self.rebuild_hint()?;
        Ok(expired.len())
    }

    /// The hint bitmap from the IPv4 entries still in the map.
    fn rebuild_hint(&mut self) -> Result<()> {
        let mut bitmap = vec![0u64; gatekeeper_common::BLOCK_WORDS_V4 as usize];
        for key in self.v4.keys().filter_map(Result::ok) {
            set_range(&mut bitmap, u32::from_be_bytes(key) >> 8, 1);
        }
        self.hint_v4
            .write(&bitmap, 0..bitmap.len())
            .context("DNSBL hint bitmap")
    }

    /// Removes every entry; returns how many were live.
    pub fn flush(&mut self) -> Result<usize> {
        let all = self.all();
        for (client, _) in &all {
            self.remove(*client)?;
        }
        self.rebuild_hint()?;
        Ok(all.iter().filter(|(_, e)| e.is_some()).count())
    }
}

/// Read-only handles on the pinned allow or deny maps.
pub struct PrefixView {
    v4: LpmTrie<MapData, [u8; 4], PrefixValue>,
    v6: LpmTrie<MapData, [u8; 16], PrefixValue>,
    exact: Option<ExactMaps>,
    slots_v4: Option<Array<MapData, ExactBucket>>,
}

fn open_pin(pin_dir: &Path, name: &str) -> Result<Map> {
    let path = pin_dir.join(name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening pinned map {}", path.display()))?;
    Map::from_map_data(data).with_context(|| format!("pinned map {name}"))
}

impl PrefixView {
    pub fn allow(pin_dir: &Path) -> Result<PrefixView> {
        Ok(PrefixView {
            v4: LpmTrie::try_from(open_pin(pin_dir, map_names::ALLOW_V4)?)?,
            v6: LpmTrie::try_from(open_pin(pin_dir, map_names::ALLOW_V6)?)?,
            exact: None,
            slots_v4: None,
        })
    }

    pub fn deny(pin_dir: &Path) -> Result<PrefixView> {
        Ok(PrefixView {
            v4: LpmTrie::try_from(open_pin(pin_dir, map_names::DENY_V4)?)?,
            v6: LpmTrie::try_from(open_pin(pin_dir, map_names::DENY_V6)?)?,
            exact: Some(ExactMaps {
                v4: HashMap::try_from(open_pin(pin_dir, map_names::DENY_V4_EXACT)?)?,
                v6: HashMap::try_from(open_pin(pin_dir, map_names::DENY_V6_EXACT)?)?,
            }),
            slots_v4: Some(Array::try_from(open_pin(
                pin_dir,
                map_names::DENY_V4_SLOTS,
            )?)?),
        })
    }

    /// Whether a live entry covers `client`, as XDP would judge it.
    pub fn matches(&self, client: IpAddr) -> bool {
        let clock = Clock::now();
        let live = |found: Result<PrefixValue, MapError>| {
            found.is_ok_and(|value| clock.unix_expiry(value).is_some())
        };
        match (canonical(client), &self.exact) {
            (IpAddr::V4(a), exact) => {
                let hashed = || {
                    exact
                        .as_ref()
                        .is_some_and(|e| live(e.v4.get(&a.octets(), 0)))
                };
                // As XDP asks: the slot, and the hash only where the bucket spilled
                // (or where the table cannot be read).
                let exact_match = match self.slots_v4.as_ref().map(|s| read_pinned(s, a.octets())) {
                    Some(Ok(Lookup::Slotted)) => true,
                    Some(Ok(Lookup::Absent)) => false,
                    Some(Ok(Lookup::AskHash) | Err(_)) | None => hashed(),
                };
                exact_match || live(self.v4.get(&Key::new(32, a.octets()), 0))
            }
            (IpAddr::V6(a), exact) => {
                exact
                    .as_ref()
                    .is_some_and(|e| live(e.v6.get(&a.octets(), 0)))
                    || live(self.v6.get(&Key::new(128, a.octets()), 0))
            }
        }
    }
}
