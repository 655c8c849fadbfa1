//! Per-/24 IPv4 bitmaps derived from the denylist, so XDP can decide most
//! sources with two inlined array reads instead of a trie walk.
//!
//! The tries stay the source of truth. After a change only the blocks under
//! the touched prefixes are recomputed (from the entries around them: the
//! prefixes containing the block and those inside it), and only the words
//! that differ from what the kernel has are written.

use std::collections::BTreeMap;
use std::ops::Range;

use anyhow::{Context, Result};
use aya::maps::{Array, IterableMap, MapData};
use gatekeeper_common::BLOCK_WORDS_V4;
use ipnet::{IpNet, Ipv4Net};

use super::mapped::MappedArray;
use crate::lists::store::EntryMeta;

const WORDS: usize = BLOCK_WORDS_V4 as usize;

/// The three per-/24 bitmaps of the IPv4 denylist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmaps {
    /// Blocks wholly inside a permanent prefix of /24 or shorter.
    pub cover: Vec<u64>,
    /// Blocks overlapping any other trie entry (longer than /24, or expiring).
    pub trie_hint: Vec<u64>,
    /// Blocks holding a /32 entry (those live in the exact hash).
    pub exact_hint: Vec<u64>,
}

pub fn build(entries: &BTreeMap<IpNet, EntryMeta>, now_unix: u64) -> Bitmaps {
    let mut bitmaps = Bitmaps {
        cover: vec![0u64; WORDS],
        trie_hint: vec![0u64; WORDS],
        exact_hint: vec![0u64; WORDS],
    };
    for (net, meta) in entries {
        if let IpNet::V4(net) = net {
            bitmaps.mark(net, meta, now_unix);
        }
    }
    bitmaps
}

impl Bitmaps {
    /// Sets the bits one live entry contributes.
    fn mark(&mut self, net: &Ipv4Net, meta: &EntryMeta, now_unix: u64) {
        if !meta.live_at(now_unix) {
            return;
        }
        let len = net.prefix_len();
        let first = u32::from(net.network()) >> 8;
        if len == 32 {
            set_range(&mut self.exact_hint, first, 1);
            return;
        }
        let blocks = if len <= 24 { 1u32 << (24 - len) } else { 1 };
        let bitmap = if len <= 24 && meta.expiry().is_none() {
            &mut self.cover
        } else {
            &mut self.trie_hint
        };
        set_range(bitmap, first, blocks);
    }

    /// Recomputes the blocks under each touched prefix from `entries` (the
    /// state after the change); returns the word ranges that may have changed.
    pub fn refresh<'a>(
        &mut self,
        entries: &BTreeMap<IpNet, EntryMeta>,
        touched: impl IntoIterator<Item = &'a IpNet>,
        now_unix: u64,
    ) -> Vec<Range<usize>> {
        let mut dirty = Vec::new();
        for net in touched {
            let IpNet::V4(net) = net else { continue };
            // The prefix's blocks: itself if /24 or shorter, else its /24.
            let region = if net.prefix_len() <= 24 {
                *net
            } else {
                Ipv4Net::new(net.network(), 24).unwrap().trunc()
            };
            dirty.push(self.recompute(entries, region, now_unix));
        }
        dirty
    }

    fn recompute(
        &mut self,
        entries: &BTreeMap<IpNet, EntryMeta>,
        region: Ipv4Net,
        now_unix: u64,
    ) -> Range<usize> {
        let first = u32::from(region.network()) >> 8;
        let count = 1u32 << (24 - region.prefix_len());
        for bitmap in [&mut self.cover, &mut self.trie_hint, &mut self.exact_hint] {
            clear_range(bitmap, first, count);
        }
        // Prefixes containing the region (itself included) cover all of it.
        for len in 0..=region.prefix_len() {
            let outer = Ipv4Net::new(region.network(), len).unwrap().trunc();
            if let Some(meta) = entries.get(&IpNet::V4(outer)) {
                let clipped = if len < region.prefix_len() {
                    region
                } else {
                    outer
                };
                self.mark(&clipped, meta, now_unix);
            }
        }
        // Prefixes inside it mark their own blocks.
        let low =
            IpNet::V4(Ipv4Net::new(region.network(), region.prefix_len() + 1).unwrap_or(region));
        let high = IpNet::V4(Ipv4Net::new(region.broadcast(), 32).unwrap());
        for (net, meta) in entries.range(low..=high) {
            if let IpNet::V4(inner) = net {
                if inner.prefix_len() > region.prefix_len() {
                    self.mark(inner, meta, now_unix);
                }
            }
        }
        let first = first as usize;
        first / 64..(first + count as usize).div_ceil(64)
    }
}

/// Sets bits `[first, first + count)`; whole words at once where aligned.
pub fn set_range(bitmap: &mut [u64], first: u32, count: u32) {
    fill_range(bitmap, first, count, true);
}

fn clear_range(bitmap: &mut [u64], first: u32, count: u32) {
    fill_range(bitmap, first, count, false);
}

fn fill_range(bitmap: &mut [u64], first: u32, count: u32, on: bool) {
    let (mut bit, end) = (first as usize, first as usize + count as usize);
    while bit < end {
        if bit % 64 == 0 && end - bit >= 64 {
            bitmap[bit / 64] = if on { u64::MAX } else { 0 };
            bit += 64;
        } else {
            if on {
                bitmap[bit / 64] |= 1 << (bit % 64);
            } else {
                bitmap[bit / 64] &= !(1 << (bit % 64));
            }
            bit += 1;
        }
    }
}

/// One kernel bitmap and a copy of what was last written to it.
pub struct KernelBitmap {
    map: Array<MapData, u64>,
    written: Vec<u64>,
    /// The array's words, shared with the kernel (when the map allows it).
    words: Option<MappedArray>,
}

impl KernelBitmap {
    pub fn new(map: Array<MapData, u64>) -> KernelBitmap {
        let words = MappedArray::map(map.map(), WORDS * 8)
            .inspect_err(
                |error| tracing::debug!(%error, "bitmap not mmapable; writing it with syscalls"),
            )
            .ok();
        KernelBitmap {
            map,
            written: vec![0; WORDS],
            words,
        }
    }

    /// Writes the words of `wanted` in `words` that differ from what the
    /// kernel has: through the shared mapping, else in one batch call.
    pub fn write(&mut self, wanted: &[u64], words: Range<usize>) -> Result<()> {
        self.write_with(words, |index, _| wanted[index])
    }

    /// Sets the bits `wanted` adds and clears none, so entries on their way
    /// out stay marked until they are out.
    pub fn add(&mut self, wanted: &[u64], words: Range<usize>) -> Result<()> {
        self.write_with(words, |index, written| written | wanted[index])
    }

    /// Sets one block's bit (a single word write when it was clear).
    pub fn mark(&mut self, addr: [u8; 4]) -> Result<()> {
        let (word, bit) = gatekeeper_common::block_position(addr);
        let word = word as usize;
        self.write_with(word..word + 1, |_, written| written | bit)
    }

    /// The one place that chooses between the shared mapping and a batch call.
    fn write_with(
        &mut self,
        words: Range<usize>,
        target: impl Fn(usize, u64) -> u64,
    ) -> Result<()> {
        let (mut indices, mut values) = (Vec::new(), Vec::new());
        for index in words {
            let word = target(index, self.written[index]);
            if word != self.written[index] {
                indices.push(index as u32);
                values.push(word);
            }
        }
        match &self.words {
            Some(shared) => {
                for (&index, &value) in indices.iter().zip(&values) {
                    shared.store_u64(index as usize, value);
                }
            }
            None => super::batch::update(self.map.map(), &indices, &values)?,
        }
        for (&index, &value) in indices.iter().zip(&values) {
            self.written[index as usize] = value;
        }
        Ok(())
    }
}

/// The denylist's kernel bitmaps and the state they should have.
pub struct BlockBitmaps {
    wanted: Bitmaps,
    /// Word ranges recomputed but not yet written.
    dirty: Vec<Range<usize>>,
    cover: KernelBitmap,
    trie_hint: KernelBitmap,
    exact_hint: KernelBitmap,
}

/// Above this many touched prefixes a full rebuild is cheaper than
/// recomputing their neighbourhoods one by one.
const REBUILD_ABOVE: usize = 4096;

impl BlockBitmaps {
    pub fn new(
        cover: Array<MapData, u64>,
        trie_hint: Array<MapData, u64>,
        exact_hint: Array<MapData, u64>,
    ) -> BlockBitmaps {
        BlockBitmaps {
            wanted: build(&BTreeMap::new(), 0),
            dirty: Vec::new(),
            cover: KernelBitmap::new(cover),
            trie_hint: KernelBitmap::new(trie_hint),
            exact_hint: KernelBitmap::new(exact_hint),
        }
    }

    /// Recomputes the wanted bitmaps for `touched` (pure: no syscalls, so
    /// it can run under the store's read lock); [`Self::flush`] writes them.
    pub fn plan(&mut self, entries: &BTreeMap<IpNet, EntryMeta>, touched: &[IpNet], now_unix: u64) {
        if touched.len() > REBUILD_ABOVE {
            self.wanted = build(entries, now_unix);
            self.dirty = std::iter::once(0..WORDS).collect();
        } else {
            let ranges = self.wanted.refresh(entries, touched, now_unix);
            self.dirty.extend(ranges);
        }
    }

    /// Sets the bits of the planned state without clearing any: called after
    /// the inserts and before the removals, so XDP asks the hashes and tries
    /// for every new entry while the old ones are still there to be found.
    pub fn flush_additions(&mut self) -> Result<()> {
        let dirty = std::mem::take(&mut self.dirty);
        let written = self.write_ranges(&dirty, KernelBitmap::add);
        self.dirty = dirty;
        written
    }

    /// Writes the planned words that changed. Called after the removals: a
    /// removed entry's bits outlive it briefly (its block asks a map that
    /// no longer has it, and passes, as after the change).
    pub fn flush(&mut self) -> Result<()> {
        let dirty = std::mem::take(&mut self.dirty);
        self.write_ranges(&dirty, KernelBitmap::write)
    }

    fn write_ranges(
        &mut self,
        ranges: &[Range<usize>],
        write: fn(&mut KernelBitmap, &[u64], Range<usize>) -> Result<()>,
    ) -> Result<()> {
        for words in ranges {
            for (bitmap, wanted, name) in [
                (&mut self.cover, &self.wanted.cover, "denylist cover bitmap"),
                (
                    &mut self.trie_hint,
                    &self.wanted.trie_hint,
                    "denylist trie-hint bitmap",
                ),
                (
                    &mut self.exact_hint,
                    &self.wanted.exact_hint,
                    "denylist exact-hint bitmap",
                ),
            ] {
                write(bitmap, wanted, words.clone()).context(name)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gatekeeper_common::block_position;

    fn marked(bitmap: &[u64], addr: [u8; 4]) -> bool {
        let (word, bit) = block_position(addr);
        bitmap[word as usize] & bit != 0
    }

    fn entries(list: &[(&str, Option<u64>)]) -> BTreeMap<IpNet, EntryMeta> {
        list.iter()
            .map(|(net, expires)| {
                let meta = EntryMeta::manual(None, 0, *expires);
                (net.parse().unwrap(), meta)
            })
            .collect()
    }

    #[test]
    fn permanent_short_prefixes_cover_and_the_rest_hint() {
        let list = entries(&[
            ("10.0.0.0/8", None),
            ("192.0.2.0/24", None),
            ("198.51.100.16/28", None),
            ("203.0.113.0/24", Some(1_000)),
            ("203.0.114.0/24", Some(10)),
            ("198.18.0.7/32", None),
            ("2001:db8::/32", None),
        ]);
        let built = build(&list, 100);
        let (cover, hint) = (&built.cover, &built.trie_hint);
        for covered in [[10, 0, 0, 1], [10, 255, 255, 255], [192, 0, 2, 200]] {
            assert!(marked(cover, covered), "{covered:?}");
        }
        for uncovered in [
            [11, 0, 0, 1],
            [192, 0, 3, 1],
            [198, 51, 100, 1],
            [198, 18, 0, 7],
        ] {
            assert!(!marked(cover, uncovered), "{uncovered:?}");
        }
        // A /28 and an expiring /24 send their block to the trie; an expired one marks nothing.
        assert!(marked(hint, [198, 51, 100, 200]) && marked(hint, [203, 0, 113, 5]));
        assert!(!marked(hint, [203, 0, 114, 5]) && !marked(hint, [198, 18, 0, 7]));
        assert!(
            marked(&built.exact_hint, [198, 18, 0, 200])
                && !marked(&built.exact_hint, [198, 18, 1, 7])
        );
        assert!(!marked(hint, [10, 0, 0, 1]));
        let covered_blocks: u32 = cover.iter().map(|w| w.count_ones()).sum();
        assert_eq!(covered_blocks, (1 << 16) + 1);
    }

    fn arbitrary_change() -> impl proptest::strategy::Strategy<Value = (IpNet, Option<EntryMeta>)> {
        use proptest::prelude::*;
        // A small universe, so changes nest, overlap and undo each other.
        let lens = prop::sample::select(vec![0u8, 8, 14, 16, 20, 22, 23, 24, 25, 28, 31, 32]);
        let expiry = prop::sample::select(vec![None, Some(50u64), Some(200)]);
        (0u32..1 << 12, lens, expiry, any::<bool>()).prop_map(|(bits, len, expires, present)| {
            let addr = std::net::Ipv4Addr::from(0x0a00_0000 | (bits << 12) | (bits & 0x1ff));
            let net = IpNet::V4(Ipv4Net::new(addr, len).unwrap().trunc());
            let meta = present.then_some(EntryMeta::manual(None, 0, expires));
            (net, meta)
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        #[test]
        fn incremental_refresh_equals_a_full_rebuild(
            changes in proptest::collection::vec(proptest::collection::vec(arbitrary_change(), 1..4), 1..24)
        ) {
            let now = 100;
            let mut entries = BTreeMap::new();
            let mut incremental = build(&entries, now);
            for batch in changes {
                let touched: Vec<IpNet> = batch.iter().map(|(net, _)| *net).collect();
                for (net, meta) in batch {
                    match meta {
                        Some(meta) => entries.insert(net, meta),
                        None => entries.remove(&net),
                    };
                }
                let before = incremental.clone();
                let dirty = incremental.refresh(&entries, &touched, now);
                let full = build(&entries, now);
                proptest::prop_assert!(incremental == full, "after touching {:?}", touched);
                // Only words in the reported ranges get written: every change must lie there.
                for (old, new) in [
                    (&before.cover, &incremental.cover),
                    (&before.trie_hint, &incremental.trie_hint),
                    (&before.exact_hint, &incremental.exact_hint),
                ] {
                    for (word, (a, b)) in old.iter().zip(new).enumerate() {
                        proptest::prop_assert!(a == b || dirty.iter().any(|r| r.contains(&word)));
                    }
                }
            }
        }
    }
}
