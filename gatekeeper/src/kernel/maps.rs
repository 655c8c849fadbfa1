//! Typed handles on the XDP program's maps.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use aya::maps::{
    lpm_trie::Key, Array, HashMap, IterableMap, LpmTrie, MapData, MapError, PerCpuArray,
};
use gatekeeper_common::{Counter, PrefixValue};
use ipnet::IpNet;

use super::batch;
use super::block_bitmaps::BlockBitmaps;
use super::exact_slots::ExactSlots;
use crate::clock::unix_now;
use crate::lists::store::{Capacity, EntryMeta};

/// The IPv4 and IPv6 maps of one list (deny or allow): LPM tries, and for
/// the denylist exact-address hashes that take its /32 and /128 entries.
pub struct PrefixMaps {
    v4: LpmTrie<MapData, [u8; 4], PrefixValue>,
    v6: LpmTrie<MapData, [u8; 16], PrefixValue>,
    exact: Option<ExactEntries>,
    /// The allowlist's `[v4, v6]` non-empty flags, kept current after every change.
    presence: Option<Array<MapData, u8>>,
    /// The denylist's per-/24 bitmaps, recomputed for the touched prefixes.
    blocks: Option<BlockBitmaps>,
    pub capacity_v4: u32,
    pub capacity_v6: u32,
}

/// What one [`PrefixMaps::plan`] decided: each touched prefix's kernel value
/// (`None`: not in the kernel) and the allowlist's presence flags.
pub struct SyncPlan {
    states: Vec<(IpNet, Option<PrefixValue>)>,
    presence: Option<(bool, bool)>,
}

/// Full-length prefixes by address: one hash lookup in XDP instead of a trie walk.
pub struct ExactMaps {
    pub v4: HashMap<MapData, [u8; 4], PrefixValue>,
    pub v6: HashMap<MapData, [u8; 16], PrefixValue>,
}

/// The denylist's full-length entries: permanent IPv4 /32s slotted, the
/// rest in the exact hashes.
pub struct ExactEntries {
    pub hashes: ExactMaps,
    pub slots_v4: ExactSlots,
}

impl PrefixMaps {
    pub fn new(
        v4: LpmTrie<MapData, [u8; 4], PrefixValue>,
        v6: LpmTrie<MapData, [u8; 16], PrefixValue>,
        exact: Option<ExactEntries>,
        presence: Option<Array<MapData, u8>>,
        blocks: Option<BlockBitmaps>,
        capacity_v4: u32,
        capacity_v6: u32,
    ) -> Self {
        PrefixMaps {
            v4,
            v6,
            exact,
            presence,
            blocks,
            capacity_v4,
            capacity_v6,
        }
    }

    /// The prefixes per family the maps were sized for.
    pub fn capacity(&self) -> Capacity {
        Capacity {
            v4: self.capacity_v4 as usize,
            v6: self.capacity_v6 as usize,
        }
    }

    /// Works out what the kernel must hold for each prefix in `touched`
    /// given `entries` (present → inserted/updated, absent or expired →
    /// removed). Pure computation, so callers can run it under the store's
    /// read lock and make the syscalls in [`Self::apply`] after releasing it.
    pub fn plan(&mut self, entries: &BTreeMap<IpNet, EntryMeta>, touched: &[IpNet]) -> SyncPlan {
        let clock = Clock::now();
        let states = touched
            .iter()
            .map(|net| {
                let value = entries
                    .get(net)
                    .and_then(|meta| clock.kernel_value(meta.expiry()));
                (*net, value)
            })
            .collect();
        if let Some(blocks) = self.blocks.as_mut() {
            blocks.plan(entries, touched, clock.unix_secs);
        }
        // IPv4 keys sort before IPv6 ones.
        let presence = self.presence.as_ref().map(|_| {
            (
                entries
                    .keys()
                    .next()
                    .is_some_and(|n| matches!(n, IpNet::V4(_))),
                entries
                    .keys()
                    .next_back()
                    .is_some_and(|n| matches!(n, IpNet::V6(_))),
            )
        });
        SyncPlan { states, presence }
    }

    /// Makes the syscalls of a [`Self::plan`]: prefixes first, then bitmaps
    /// and flags. New entries go in before old ones come out, so a replaced
    /// list stays enforced until its successor is complete; only when the
    /// maps cannot hold both at once do the removals go first.
    pub fn apply(&mut self, plan: SyncPlan) -> Result<()> {
        let writes = Writes::route(&plan.states, self.exact.is_some());
        let context = || format!("kernel map update ({})", writes.summary());
        match self.write(&writes, Phase::Insert) {
            Ok(()) => {
                // The new entries' blocks point XDP at them before anything leaves.
                if let Some(blocks) = self.blocks.as_mut() {
                    blocks.flush_additions()?;
                }
                self.write(&writes, Phase::Remove).with_context(context)?;
            }
            // Both lists do not fit at once: the old entries go first, and
            // until the new ones are in, some of either list pass.
            Err(e) if is_full(&e) => self
                .write(&writes, Phase::Remove)
                .and_then(|()| self.write(&writes, Phase::Insert))
                .with_context(context)?,
            Err(e) => return Err(e).with_context(context),
        }
        if let Some(blocks) = self.blocks.as_mut() {
            blocks.flush()?;
        }
        if let (Some(presence), Some((has_v4, has_v6))) = (self.presence.as_mut(), plan.presence) {
            presence
                .set(0, u8::from(has_v4), 0)
                .context("allowlist presence flag")?;
            presence
                .set(1, u8::from(has_v6), 0)
                .context("allowlist presence flag")?;
        }
        Ok(())
    }

    /// One phase on every map, the IPv4 trie on a thread of its own (it
    /// takes the longest, and the maps are independent in the kernel).
    fn write(&mut self, writes: &Writes, phase: Phase) -> std::io::Result<()> {
        let (trie_v4, trie_v6) = (self.v4.map(), self.v6.map());
        let exact = self.exact.as_mut();
        let rest = move || {
            writes.trie_v6.write(trie_v6, phase)?;
            let Some(exact) = exact else {
                return Ok(());
            };
            let mut hash_v4 = exact.hashes.v4.map();
            let v4 = &writes.exact_v4;
            match phase {
                Phase::Insert => exact.slots_v4.insert(&mut hash_v4, &v4.keys, &v4.values)?,
                Phase::Remove => exact.slots_v4.remove(&mut hash_v4, &v4.removed)?,
            }
            writes.exact_v6.write(exact.hashes.v6.map(), phase)
        };
        // A second thread pays off only when both sides have real work.
        if writes.trie_v4.len(phase) < PARALLEL_FROM || writes.rest_len(phase) < PARALLEL_FROM {
            writes.trie_v4.write(trie_v4, phase)?;
            return rest();
        }
        std::thread::scope(|scope| {
            let spawned = std::thread::Builder::new()
                .name("trie-v4".into())
                .spawn_scoped(scope, || writes.trie_v4.write(trie_v4, phase));
            let Ok(v4) = spawned else {
                writes.trie_v4.write(trie_v4, phase)?;
                return rest();
            };
            let rest = rest();
            let v4 = v4
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            v4.and(rest)
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Insert,
    Remove,
}

/// A plan's writes, sorted by the map that takes them.
#[derive(Default)]
struct Writes {
    trie_v4: MapWrites<Key<[u8; 4]>>,
    trie_v6: MapWrites<Key<[u8; 16]>>,
    exact_v4: MapWrites<[u8; 4]>,
    exact_v6: MapWrites<[u8; 16]>,
}

struct MapWrites<K> {
    keys: Vec<K>,
    values: Vec<PrefixValue>,
    removed: Vec<K>,
}

impl<K> Default for MapWrites<K> {
    fn default() -> Self {
        MapWrites {
            keys: Vec::new(),
            values: Vec::new(),
            removed: Vec::new(),
        }
    }
}

/// Entries per side before a phase's IPv4 trie writes get a thread of their own.
const PARALLEL_FROM: usize = 4096;

impl<K: aya::Pod> MapWrites<K> {
    fn len(&self, phase: Phase) -> usize {
        match phase {
            Phase::Insert => self.keys.len(),
            Phase::Remove => self.removed.len(),
        }
    }

    fn summary(&self) -> String {
        format!(
            "{} in, {} out",
            self.len(Phase::Insert),
            self.len(Phase::Remove)
        )
    }

    fn push(&mut self, key: K, value: Option<PrefixValue>) {
        match value {
            Some(value) => {
                self.keys.push(key);
                self.values.push(value);
            }
            None => self.removed.push(key),
        }
    }

    fn write(&self, map: &MapData, phase: Phase) -> std::io::Result<()> {
        match phase {
            Phase::Insert => batch::update(map, &self.keys, &self.values),
            Phase::Remove => batch::delete(map, &self.removed),
        }
    }
}

impl Writes {
    /// Full-length prefixes go to the exact hashes when the list has them.
    fn route(states: &[(IpNet, Option<PrefixValue>)], exact: bool) -> Writes {
        let mut writes = Writes::default();
        for (net, value) in states {
            match net {
                IpNet::V4(n) if exact && n.prefix_len() == 32 => {
                    writes.exact_v4.push(n.addr().octets(), *value)
                }
                IpNet::V6(n) if exact && n.prefix_len() == 128 => {
                    writes.exact_v6.push(n.addr().octets(), *value)
                }
                IpNet::V4(n) => writes.trie_v4.push(
                    Key::new(u32::from(n.prefix_len()), n.network().octets()),
                    *value,
                ),
                IpNet::V6(n) => writes.trie_v6.push(
                    Key::new(u32::from(n.prefix_len()), n.network().octets()),
                    *value,
                ),
            }
        }
        writes
    }

    /// The phase's entries outside the IPv4 trie.
    fn rest_len(&self, phase: Phase) -> usize {
        self.trie_v6.len(phase) + self.exact_v4.len(phase) + self.exact_v6.len(phase)
    }

    fn summary(&self) -> String {
        format!(
            "IPv4 trie {}, IPv6 trie {}, IPv4 /32s {}, IPv6 hash {}",
            self.trie_v4.summary(),
            self.trie_v6.summary(),
            self.exact_v4.summary(),
            self.exact_v6.summary(),
        )
    }
}

/// The kernel refused an insert because the map is at its `max_entries`.
fn is_full(error: &std::io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC))
}

/// Whether a map error only says the key was not there.
pub(super) fn is_absent(error: &MapError) -> bool {
    match error {
        MapError::KeyNotFound => true,
        MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// Maps wall-clock expiry (what the store keeps) onto CLOCK_MONOTONIC (what XDP reads).
///
/// All arithmetic is checked. An expiry past the range of `u64` nanoseconds
/// (584 years of uptime; TTLs are capped far below) saturates to the latest
/// instant: an entry may outlive its time in XDP until the sweeper removes it,
/// but it never wraps round to expire early or turn permanent.
pub(super) struct Clock {
    unix_secs: u64,
    monotonic_ns: u64,
}

const NS_PER_SEC: u64 = 1_000_000_000;

impl Clock {
    pub(super) fn now() -> Clock {
        let mono = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .ok()
            .and_then(|t| {
                let secs = u64::try_from(t.tv_sec()).ok()?;
                let nanos = u64::try_from(t.tv_nsec()).ok()?;
                secs.checked_mul(NS_PER_SEC)?.checked_add(nanos)
            })
            .unwrap_or(0);
        Clock {
            unix_secs: unix_now(),
            monotonic_ns: mono,
        }
    }

    /// `None` when the entry has already expired and should not be in the kernel.
    pub(super) fn kernel_value(&self, expires: Option<u64>) -> Option<PrefixValue> {
        match expires {
            None => Some(PrefixValue::PERMANENT),
            Some(expires) if expires <= self.unix_secs => None,
            Some(expires) => Some(PrefixValue {
                expires_ns: (expires - self.unix_secs)
                    .checked_mul(NS_PER_SEC)
                    .and_then(|left| left.checked_add(self.monotonic_ns))
                    .unwrap_or(u64::MAX),
            }),
        }
    }

    /// Unix expiry of a kernel value (`u64::MAX` for permanent); `None` once expired.
    pub(super) fn unix_expiry(&self, value: PrefixValue) -> Option<u64> {
        if value.expires_ns == 0 {
            return Some(u64::MAX);
        }
        let left_ns = value
            .expires_ns
            .checked_sub(self.monotonic_ns)
            .filter(|&ns| ns > 0)?;
        Some(self.unix_secs.saturating_add(left_ns.div_ceil(NS_PER_SEC)))
    }
}

#[cfg(test)]
mod clock_tests {
    use super::*;

    #[test]
    fn far_expiries_saturate_instead_of_wrapping() {
        let clock = Clock {
            unix_secs: 1_700_000_000,
            monotonic_ns: 5 * NS_PER_SEC,
        };
        let ttl = 18_446_744_074; // * 1e9 wraps u64 to about 0.3 s
        let value = clock.kernel_value(Some(clock.unix_secs + ttl)).unwrap();
        assert_eq!(value.expires_ns, u64::MAX);
        let hour = clock.kernel_value(Some(clock.unix_secs + 3600)).unwrap();
        assert_eq!(hour.expires_ns, 3605 * NS_PER_SEC);
        assert_eq!(clock.unix_expiry(hour), Some(clock.unix_secs + 3600));
        assert!(clock.kernel_value(Some(clock.unix_secs)).is_none());
        let late = Clock {
            unix_secs: u64::MAX - 1,
            monotonic_ns: 0,
        };
        assert_eq!(
            late.unix_expiry(PrefixValue {
                expires_ns: 10 * NS_PER_SEC
            }),
            Some(u64::MAX)
        );
    }
}

/// Counters summed over CPUs, indexed like [`Counter`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CounterSnapshot(pub [u64; Counter::COUNT as usize]);

impl CounterSnapshot {
    pub fn get(&self, counter: Counter) -> u64 {
        self.0[counter as usize]
    }
}

pub fn read_counters(map: &PerCpuArray<MapData, u64>) -> Result<CounterSnapshot> {
    let mut snapshot = CounterSnapshot::default();
    for counter in Counter::ALL {
        let per_cpu = map
            .get(&(counter as u32), 0)
            .with_context(|| format!("reading counter {}", counter.name()))?;
        snapshot.0[counter as usize] = per_cpu.iter().sum();
    }
    // Unwalkable packets are not known to be protected SYNs: not part of the sum.
    snapshot.0[Counter::ProtectedSyns as usize] = [
        Counter::DroppedDeny,
        Counter::PassedAllow,
        Counter::Passed,
        Counter::DroppedDnsbl,
    ]
    .iter()
    .map(|&c| snapshot.get(c))
    .sum();
    Ok(snapshot)
}
