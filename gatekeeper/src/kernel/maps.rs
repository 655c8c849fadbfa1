//! Typed handles on the XDP program's maps.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use aya::maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray};
use gatekeeper_common::{Counter, PrefixValue};
use ipnet::IpNet;

use super::block_bitmaps::BlockBitmaps;
use crate::clock::unix_now;
use crate::lists::store::{Capacity, EntryMeta};

/// The IPv4 and IPv6 maps of one list (deny or allow): LPM tries, and for
/// the denylist exact-address hashes that take its /32 and /128 entries.
pub struct PrefixMaps {
    v4: LpmTrie<MapData, [u8; 4], PrefixValue>,
    v6: LpmTrie<MapData, [u8; 16], PrefixValue>,
    exact: Option<ExactMaps>,
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

impl PrefixMaps {
    pub fn new(
        v4: LpmTrie<MapData, [u8; 4], PrefixValue>,
        v6: LpmTrie<MapData, [u8; 16], PrefixValue>,
        exact: Option<ExactMaps>,
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

    /// Makes the syscalls of a [`Self::plan`]: prefixes first, then bitmaps and flags.
    pub fn apply(&mut self, plan: SyncPlan) -> Result<()> {
        for (net, value) in &plan.states {
            match value {
                Some(value) => self.insert(net, *value),
                None => self.remove(net),
            }
            .with_context(|| format!("kernel map update for {net}"))?;
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

    fn insert(&mut self, net: &IpNet, value: PrefixValue) -> Result<(), MapError> {
        match (net, self.exact.as_mut()) {
            (IpNet::V4(n), Some(exact)) if n.prefix_len() == 32 => {
                exact.v4.insert(n.addr().octets(), value, 0)
            }
            (IpNet::V6(n), Some(exact)) if n.prefix_len() == 128 => {
                exact.v6.insert(n.addr().octets(), value, 0)
            }
            (IpNet::V4(n), _) => {
                let key = Key::new(u32::from(n.prefix_len()), n.network().octets());
                self.v4.insert(&key, value, 0)
            }
            (IpNet::V6(n), _) => {
                let key = Key::new(u32::from(n.prefix_len()), n.network().octets());
                self.v6.insert(&key, value, 0)
            }
        }
    }

    /// Removing an absent key is not an error: the goal state is reached.
    fn remove(&mut self, net: &IpNet) -> Result<(), MapError> {
        let result = match (net, self.exact.as_mut()) {
            (IpNet::V4(n), Some(exact)) if n.prefix_len() == 32 => {
                exact.v4.remove(&n.addr().octets())
            }
            (IpNet::V6(n), Some(exact)) if n.prefix_len() == 128 => {
                exact.v6.remove(&n.addr().octets())
            }
            (IpNet::V4(n), _) => self
                .v4
                .remove(&Key::new(u32::from(n.prefix_len()), n.network().octets())),
            (IpNet::V6(n), _) => self
                .v6
                .remove(&Key::new(u32::from(n.prefix_len()), n.network().octets())),
        };
        match result {
            Err(e) if is_absent(&e) => Ok(()),
            other => other,
        }
    }
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
