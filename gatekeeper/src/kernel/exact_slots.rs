//! The IPv4 denylist's permanent /32s in `DENY_V4_SLOTS`, a bucketed
//! open-addressing table XDP reads with one inlined array access, instead
//! of a hash lookup (jhash, bucket walk, RCU) for every listed SYN.
//!
//! An address that expires, or whose bucket is full, goes to the exact hash
//! as before, and its bucket's `spilled` word tells XDP to look there. The
//! daemon writes the table through a shared mapping, one aligned word per
//! store, ordered so that XDP never misses an entry that is meant to stay:
//! a spill flag goes up before the hash write, a slot is vacated only after
//! its entry's new home is written, and a flag comes down only after the
//! hash no longer holds any of its bucket's addresses.

use std::collections::{HashMap, HashSet};
use std::io;

use aya::maps::MapData;
use gatekeeper_common::{
    exact_bucket, exact_key, ExactBucket, PrefixValue, EXACT_EMPTY, EXACT_SLOTS,
};

use super::batch;
use super::mapped::MappedArray;

/// u32 words per bucket: the slots, then the spill word.
const WORDS_PER_BUCKET: usize = size_of::<ExactBucket>() / 4;
const SPILL_WORD: usize = EXACT_SLOTS;
/// Bucket counts stay within these powers of two whatever the capacity.
const MIN_BUCKETS: u32 = 1 << 4;
/// 128 MiB of table at most (a denylist capacity of 25 M and more).
const MAX_BUCKETS: u32 = 1 << 22;

/// The bucket count for a denylist of `capacity` IPv4 entries: a bucket
/// per six entries, rounded up to a power of two (so at most six of seven
/// slots used on average even when the whole capacity is /32s; typically
/// three to four), which keeps overflow into the hash rare.
pub fn buckets_for(capacity: u32) -> u32 {
    (capacity / 6)
        .checked_next_power_of_two()
        .unwrap_or(MAX_BUCKETS)
        .clamp(MIN_BUCKETS, MAX_BUCKETS)
}

/// The shift XDP's [`exact_bucket`] needs for a table of `buckets` (a power of two).
pub fn shift_for(buckets: u32) -> u32 {
    32 - buckets.trailing_zeros()
}

/// Where the table's words live: the kernel's mapping, or a vector in tests.
pub trait SlotWords {
    fn load(&self, word: usize) -> u32;
    fn store(&mut self, word: usize, value: u32);
}

impl SlotWords for MappedArray {
    fn load(&self, word: usize) -> u32 {
        self.load_u32(word)
    }
    fn store(&mut self, word: usize, value: u32) {
        self.store_u32(word, value)
    }
}

impl SlotWords for Vec<u32> {
    fn load(&self, word: usize) -> u32 {
        self[word]
    }
    fn store(&mut self, word: usize, value: u32) {
        self[word] = value
    }
}

/// The exact hash the table spills into.
pub trait SpillHash {
    fn update(&mut self, addrs: &[[u8; 4]], values: &[PrefixValue]) -> io::Result<()>;
    /// Absent addresses are skipped, not an error.
    fn delete(&mut self, addrs: &[[u8; 4]]) -> io::Result<()>;
}

impl SpillHash for &MapData {
    fn update(&mut self, addrs: &[[u8; 4]], values: &[PrefixValue]) -> io::Result<()> {
        batch::update(self, addrs, values)
    }
    fn delete(&mut self, addrs: &[[u8; 4]]) -> io::Result<()> {
        batch::delete(self, addrs)
    }
}

pub struct ExactSlots<W = MappedArray> {
    words: W,
    buckets: u32,
    /// Addresses sent to the hash. A write that failed still counts, so
    /// after an error a flag stays up rather than hide an entry.
    hashed: HashSet<u32>,
    /// Per bucket, how many of `hashed` it has; its spill word is set while non-zero.
    spills: HashMap<u32, u32>,
}

/// Where XDP's lookup of an address ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    Slotted,
    /// Not slotted, but its bucket spilled: the hash decides.
    AskHash,
    Absent,
}

impl ExactSlots<MappedArray> {
    /// Maps the kernel's table (sized by [`buckets_for`] at load).
    pub fn map(map: &MapData, buckets: u32) -> io::Result<ExactSlots> {
        let words = MappedArray::map(map, buckets as usize * size_of::<ExactBucket>())?;
        Ok(ExactSlots::new(words, buckets))
    }
}

impl<W: SlotWords> ExactSlots<W> {
    /// `words` must be all zero (a fresh table) and hold `buckets` buckets.
    pub fn new(words: W, buckets: u32) -> Self {
        ExactSlots {
            words,
            buckets,
            hashed: HashSet::new(),
            spills: HashMap::new(),
        }
    }

    /// Writes `addrs[i] → values[i]`: permanent entries into a free slot of
    /// their bucket, the rest into `hash`. An entry changing home is written
    /// in its new one before it leaves the old.
    pub fn insert(
        &mut self,
        hash: &mut impl SpillHash,
        addrs: &[[u8; 4]],
        values: &[PrefixValue],
    ) -> io::Result<()> {
        let (mut to_hash, mut to_hash_values) = (Vec::new(), Vec::new());
        let mut vacate = Vec::new();
        let mut leave_hash = Vec::new();
        for (&addr, &value) in addrs.iter().zip(values) {
            let key = exact_key(addr);
            let bucket = self.bucket(key);
            let slot = self.slot_of(bucket, key);
            if value == PrefixValue::PERMANENT && key != EXACT_EMPTY {
                let placed = slot.or_else(|| {
                    let free = self.find(bucket, EXACT_EMPTY)?;
                    self.words.store(word(bucket, free), key);
                    Some(free)
                });
                if placed.is_some() {
                    if self.hashed.contains(&key) {
                        leave_hash.push(addr);
                    }
                    continue;
                }
            }
            self.spill(key, bucket);
            to_hash.push(addr);
            to_hash_values.push(value);
            if let Some(slot) = slot {
                vacate.push(word(bucket, slot));
            }
        }
        hash.update(&to_hash, &to_hash_values)?;
        for word in vacate {
            self.words.store(word, EXACT_EMPTY);
        }
        self.unhash(hash, leave_hash)
    }

    /// Removes every address, from its slot and from the hash. An address
    /// not slotted is always deleted from the hash, whatever this side
    /// believes, so a lost update can never leave an entry behind.
    pub fn remove(&mut self, hash: &mut impl SpillHash, addrs: &[[u8; 4]]) -> io::Result<()> {
        let mut from_hash = Vec::new();
        for &addr in addrs {
            let key = exact_key(addr);
            let bucket = self.bucket(key);
            let slot = self.slot_of(bucket, key);
            if let Some(slot) = slot {
                self.words.store(word(bucket, slot), EXACT_EMPTY);
            }
            if slot.is_none() || self.hashed.contains(&key) {
                from_hash.push(addr);
            }
        }
        self.unhash(hash, from_hash)
    }

    /// XDP's lookup, read back from the table.
    pub fn lookup(&self, addr: [u8; 4]) -> Lookup {
        let key = exact_key(addr);
        let bucket = self.bucket(key);
        let mut read = ExactBucket::default();
        for (slot, held) in read.keys.iter_mut().enumerate() {
            *held = self.words.load(word(bucket, slot));
        }
        read.spilled = self.words.load(word(bucket, SPILL_WORD));
        Lookup::in_bucket(&read, key)
    }

    fn bucket(&self, key: u32) -> u32 {
        bucket_index(key, self.buckets)
    }

    /// The slot holding `key`; never one for the unspecified address, whose
    /// key spells an empty slot.
    fn slot_of(&self, bucket: u32, key: u32) -> Option<usize> {
        (key != EXACT_EMPTY)
            .then(|| self.find(bucket, key))
            .flatten()
    }

    /// The first slot holding `value` (`EXACT_EMPTY`: a free one).
    fn find(&self, bucket: u32, value: u32) -> Option<usize> {
        (0..EXACT_SLOTS).find(|&slot| self.words.load(word(bucket, slot)) == value)
    }

    /// Raises the bucket's flag (before the hash write) the first time.
    fn spill(&mut self, key: u32, bucket: u32) {
        if !self.hashed.insert(key) {
            return;
        }
        let count = self.spills.entry(bucket).or_insert(0);
        *count += 1;
        if *count == 1 {
            self.words.store(word(bucket, SPILL_WORD), 1);
        }
    }

    /// Deletes from the hash, then lowers the flags nothing spills under any more.
    fn unhash(&mut self, hash: &mut impl SpillHash, addrs: Vec<[u8; 4]>) -> io::Result<()> {
        hash.delete(&addrs)?;
        for addr in addrs {
            let key = exact_key(addr);
            if !self.hashed.remove(&key) {
                continue;
            }
            let bucket = self.bucket(key);
            if let Some(count) = self.spills.get_mut(&bucket) {
                *count -= 1;
                if *count == 0 {
                    self.spills.remove(&bucket);
                    self.words.store(word(bucket, SPILL_WORD), 0);
                }
            }
        }
        Ok(())
    }
}

fn word(bucket: u32, index: usize) -> usize {
    bucket as usize * WORDS_PER_BUCKET + index
}

/// XDP's view of a pinned table, for `check`: whether `addr` is slotted,
/// and whether the hash must be asked.
pub fn read_pinned(
    slots: &aya::maps::Array<MapData, ExactBucket>,
    addr: [u8; 4],
) -> Result<Lookup, aya::maps::MapError> {
    let key = exact_key(addr);
    let bucket = slots.get(&bucket_index(key, slots.len()), 0)?;
    Ok(Lookup::in_bucket(&bucket, key))
}

/// The bucket of `key` in a table of `buckets` (a power of two), as XDP
/// computes it; the mask only restates the bound the shift already gives.
fn bucket_index(key: u32, buckets: u32) -> u32 {
    exact_bucket(key, shift_for(buckets)) & (buckets - 1)
}

impl Lookup {
    /// XDP's decision on one bucket (the unspecified address is never slotted).
    fn in_bucket(bucket: &ExactBucket, key: u32) -> Lookup {
        if key != EXACT_EMPTY && bucket.keys.contains(&key) {
            Lookup::Slotted
        } else if bucket.spilled != 0 {
            Lookup::AskHash
        } else {
            Lookup::Absent
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::Ipv4Addr;

    use super::*;

    /// The hash, with a switch to make its next update fail halfway.
    #[derive(Default)]
    struct FakeHash {
        entries: BTreeMap<[u8; 4], PrefixValue>,
        fail_next_update: bool,
    }

    impl SpillHash for FakeHash {
        fn update(&mut self, addrs: &[[u8; 4]], values: &[PrefixValue]) -> io::Result<()> {
            let fail = std::mem::take(&mut self.fail_next_update);
            let take = if fail { addrs.len() / 2 } else { addrs.len() };
            for (addr, value) in addrs.iter().zip(values).take(take) {
                self.entries.insert(*addr, *value);
            }
            match fail {
                true => Err(io::Error::from_raw_os_error(libc::ENOSPC)),
                false => Ok(()),
            }
        }
        fn delete(&mut self, addrs: &[[u8; 4]]) -> io::Result<()> {
            for addr in addrs {
                self.entries.remove(addr);
            }
            Ok(())
        }
    }

    fn table(buckets: u32) -> ExactSlots<Vec<u32>> {
        ExactSlots::new(vec![0; buckets as usize * WORDS_PER_BUCKET], buckets)
    }

    /// What XDP would decide for `addr`.
    fn xdp_finds(slots: &ExactSlots<Vec<u32>>, hash: &FakeHash, addr: [u8; 4]) -> bool {
        match slots.lookup(addr) {
            Lookup::Slotted => true,
            Lookup::AskHash => hash.entries.contains_key(&addr),
            Lookup::Absent => false,
        }
    }

    /// Addresses of 198.51.100.0/24 and 203.0.113.0/24 sharing one bucket.
    fn colliding(slots: &ExactSlots<Vec<u32>>, count: usize) -> Vec<[u8; 4]> {
        let all = (0..=255u8)
            .flat_map(|host| [[198, 51, 100, host], [203, 0, 113, host]])
            .collect::<Vec<_>>();
        let target = slots.bucket(exact_key(all[0]));
        let found: Vec<_> = all
            .into_iter()
            .filter(|a| slots.bucket(exact_key(*a)) == target)
            .take(count)
            .collect();
        assert_eq!(
            found.len(),
            count,
            "not enough collisions in the test ranges"
        );
        found
    }

    const EXPIRING: PrefixValue = PrefixValue { expires_ns: 5 };

    #[test]
    fn sizing() {
        assert_eq!(buckets_for(1 << 20), 1 << 18);
        assert_eq!(buckets_for(1_100_000), 1 << 18);
        assert_eq!(buckets_for(10), MIN_BUCKETS);
        assert_eq!(buckets_for(u32::MAX), MAX_BUCKETS);
        assert_eq!(shift_for(1 << 18), 14);
        assert_eq!(shift_for(MIN_BUCKETS), 28);
    }

    #[test]
    fn full_buckets_spill_and_every_entry_stays_findable() {
        let (mut slots, mut hash) = (table(MIN_BUCKETS), FakeHash::default());
        let addrs = colliding(&slots, EXACT_SLOTS + 3);
        let values = vec![PrefixValue::PERMANENT; addrs.len()];
        slots.insert(&mut hash, &addrs, &values).unwrap();
        assert_eq!(hash.entries.len(), 3, "only the overflow goes to the hash");
        assert!(addrs.iter().all(|a| xdp_finds(&slots, &hash, *a)));

        // The slotted ones leave; the spilled ones are still found.
        slots.remove(&mut hash, &addrs[..EXACT_SLOTS]).unwrap();
        assert!(addrs[..EXACT_SLOTS]
            .iter()
            .all(|a| !xdp_finds(&slots, &hash, *a)));
        assert!(addrs[EXACT_SLOTS..]
            .iter()
            .all(|a| xdp_finds(&slots, &hash, *a)));

        // The last spilled one out lowers the flag.
        slots.remove(&mut hash, &addrs[EXACT_SLOTS..]).unwrap();
        assert!(hash.entries.is_empty());
        assert_eq!(slots.lookup(addrs[0]), Lookup::Absent);
        assert!(slots.words.iter().all(|&w| w == 0), "table back to empty");
    }

    #[test]
    fn expiring_entries_live_in_the_hash_and_move_both_ways() {
        let (mut slots, mut hash) = (table(64), FakeHash::default());
        let addr = [192, 0, 2, 7];
        slots.insert(&mut hash, &[addr], &[EXPIRING]).unwrap();
        assert_eq!(slots.lookup(addr), Lookup::AskHash);
        assert_eq!(hash.entries.get(&addr), Some(&EXPIRING));

        // Made permanent: slotted, and gone from the hash.
        slots
            .insert(&mut hash, &[addr], &[PrefixValue::PERMANENT])
            .unwrap();
        assert_eq!(slots.lookup(addr), Lookup::Slotted);
        assert!(hash.entries.is_empty());

        // Given a TTL again: in the hash with its expiry, slot vacated.
        slots.insert(&mut hash, &[addr], &[EXPIRING]).unwrap();
        assert_eq!(slots.lookup(addr), Lookup::AskHash);
        assert_eq!(hash.entries.get(&addr), Some(&EXPIRING));
        slots.remove(&mut hash, &[addr]).unwrap();
        assert_eq!(slots.lookup(addr), Lookup::Absent);
        assert!(hash.entries.is_empty());
    }

    #[test]
    fn the_unspecified_address_is_never_slotted() {
        let (mut slots, mut hash) = (table(64), FakeHash::default());
        assert_eq!(slots.lookup([0, 0, 0, 0]), Lookup::Absent);
        slots
            .insert(&mut hash, &[[0, 0, 0, 0]], &[PrefixValue::PERMANENT])
            .unwrap();
        assert_eq!(slots.lookup([0, 0, 0, 0]), Lookup::AskHash);
        assert!(xdp_finds(&slots, &hash, [0, 0, 0, 0]));
        slots.remove(&mut hash, &[[0, 0, 0, 0]]).unwrap();
        assert!(!xdp_finds(&slots, &hash, [0, 0, 0, 0]));
    }

    #[test]
    fn the_unspecified_address_in_a_batch_never_costs_a_neighbour_its_slot() {
        let (mut slots, mut hash) = (table(MIN_BUCKETS), FakeHash::default());
        let zero_bucket = slots.bucket(EXACT_EMPTY);
        let neighbour = (0..=255u8)
            .map(|host| [198, 51, 100, host])
            .find(|a| slots.bucket(exact_key(*a)) == zero_bucket)
            .expect("an address sharing 0.0.0.0's bucket");
        let addrs = [[0, 0, 0, 0], neighbour];
        let values = [PrefixValue::PERMANENT; 2];
        slots.insert(&mut hash, &addrs, &values).unwrap();
        assert_eq!(slots.lookup(neighbour), Lookup::Slotted);
        assert!(addrs.iter().all(|a| xdp_finds(&slots, &hash, *a)));
        slots.remove(&mut hash, &addrs[..1]).unwrap();
        assert_eq!(
            slots.lookup(neighbour),
            Lookup::Slotted,
            "removing 0.0.0.0 left it alone"
        );
    }

    #[test]
    fn a_failed_hash_write_leaves_nothing_hidden_and_nothing_behind() {
        let (mut slots, mut hash) = (table(MIN_BUCKETS), FakeHash::default());
        let addrs = colliding(&slots, EXACT_SLOTS + 4);
        hash.fail_next_update = true;
        let values = vec![PrefixValue::PERMANENT; addrs.len()];
        assert!(slots.insert(&mut hash, &addrs, &values).is_err());
        // Whatever reached the kernel is found.
        assert!(addrs[..EXACT_SLOTS]
            .iter()
            .all(|a| xdp_finds(&slots, &hash, *a)));
        assert!(hash.entries.keys().all(|a| xdp_finds(&slots, &hash, *a)));
        // A retry completes it, and removal clears every trace.
        slots.insert(&mut hash, &addrs, &values).unwrap();
        assert!(addrs.iter().all(|a| xdp_finds(&slots, &hash, *a)));
        slots.remove(&mut hash, &addrs).unwrap();
        assert!(hash.entries.is_empty());
        assert!(slots.words.iter().all(|&w| w == 0));
    }

    #[test]
    fn many_random_changes_match_a_model() {
        // A small table under churn: every live entry found, every removed one not.
        let (mut slots, mut hash) = (table(MIN_BUCKETS), FakeHash::default());
        let mut model = BTreeMap::new();
        let mut state = 0x2545_f491_u32;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state
        };
        for _ in 0..2000 {
            let addr = Ipv4Addr::new(203, 0, 113, (next() % 200) as u8).octets();
            match next() % 3 {
                0 => {
                    slots.remove(&mut hash, &[addr]).unwrap();
                    model.remove(&addr);
                }
                kind => {
                    let value = if kind == 1 {
                        PrefixValue::PERMANENT
                    } else {
                        EXPIRING
                    };
                    slots.insert(&mut hash, &[addr], &[value]).unwrap();
                    model.insert(addr, value);
                }
            }
        }
        for host in 0..=255u8 {
            let addr = [203, 0, 113, host];
            assert_eq!(xdp_finds(&slots, &hash, addr), model.contains_key(&addr));
            if let Some(&value) = model.get(&addr) {
                if value != PrefixValue::PERMANENT {
                    assert_eq!(hash.entries.get(&addr), Some(&value));
                }
            }
        }
        assert_eq!(
            hash.entries.len(),
            model
                .iter()
                .filter(
                    |(a, v)| **v != PrefixValue::PERMANENT || slots.lookup(**a) != Lookup::Slotted
                )
                .count(),
            "the hash holds exactly the spilled and expiring entries"
        );
    }
}
