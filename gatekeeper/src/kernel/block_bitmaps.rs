//! Per-/24 IPv4 bitmaps derived from the denylist, so XDP can decide most
//! sources with two inlined array reads instead of a trie walk.
//!
//! The tries stay the source of truth: the bitmaps are rebuilt from the
//! store after every change, and only the words that changed are written.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use aya::maps::{Array, MapData};
use gatekeeper_common::BLOCK_WORDS_V4;
use ipnet::IpNet;

use crate::lists::store::EntryMeta;

const WORDS: usize = BLOCK_WORDS_V4 as usize;

/// The three per-/24 bitmaps of the IPv4 denylist.
pub struct Bitmaps {
    /// Blocks wholly inside a permanent prefix of /24 or shorter.
    pub cover: Vec<u64>,
    /// Blocks overlapping any other trie entry (longer than /24, or expiring).
    pub trie_hint: Vec<u64>,
    /// Blocks holding a /32 entry (those live in the exact hash).
    pub exact_hint: Vec<u64>,
}

pub fn build(entries: &BTreeMap<IpNet, EntryMeta>, now_unix: u64) -> Bitmaps {
    let mut cover = vec![0u64; WORDS];
    let mut hint = vec![0u64; WORDS];
    let mut exact_hint = vec![0u64; WORDS];
    for (net, meta) in entries {
        let IpNet::V4(net) = net else { continue };
        let len = net.prefix_len();
        if meta.expires.is_some_and(|e| e <= now_unix) {
            continue;
        }
        let first = u32::from(net.network()) >> 8;
        if len == 32 {
            set_range(&mut exact_hint, first, 1);
            continue;
        }
        let blocks = if len <= 24 { 1u32 << (24 - len) } else { 1 };
        let bitmap = if len <= 24 && meta.expires.is_none() {
            &mut cover
        } else {
            &mut hint
        };
        set_range(bitmap, first, blocks);
    }
    Bitmaps {
        cover,
        trie_hint: hint,
        exact_hint,
    }
}

/// Sets bits `[first, first + count)`; whole words at once where aligned.
pub fn set_range(bitmap: &mut [u64], first: u32, count: u32) {
    let (mut bit, end) = (first as usize, first as usize + count as usize);
    while bit < end {
        if bit % 64 == 0 && end - bit >= 64 {
            bitmap[bit / 64] = u64::MAX;
            bit += 64;
        } else {
            bitmap[bit / 64] |= 1 << (bit % 64);
            bit += 1;
        }
    }
}

/// One kernel bitmap and a copy of what was last written to it.
pub struct KernelBitmap {
    map: Array<MapData, u64>,
    written: Vec<u64>,
}

impl KernelBitmap {
    pub fn new(map: Array<MapData, u64>) -> KernelBitmap {
        KernelBitmap {
            map,
            written: vec![0; WORDS],
        }
    }

    /// Writes the words of `wanted` that differ from what the kernel has.
    pub fn write(&mut self, wanted: &[u64]) -> Result<()> {
        for (index, (&new, old)) in wanted.iter().zip(self.written.iter_mut()).enumerate() {
            if new != *old {
                self.map.set(index as u32, new, 0)?;
                *old = new;
            }
        }
        Ok(())
    }

    /// Sets one block's bit (a single word write when it was clear).
    pub fn mark(&mut self, addr: [u8; 4]) -> Result<()> {
        let (word, bit) = gatekeeper_common::block_position(addr);
        let current = self.written[word as usize];
        if current & bit == 0 {
            self.map.set(word, current | bit, 0)?;
            self.written[word as usize] = current | bit;
        }
        Ok(())
    }
}

/// The denylist's kernel bitmaps.
pub struct BlockBitmaps {
    cover: KernelBitmap,
    trie_hint: KernelBitmap,
    exact_hint: KernelBitmap,
}

impl BlockBitmaps {
    pub fn new(
        cover: Array<MapData, u64>,
        trie_hint: Array<MapData, u64>,
        exact_hint: Array<MapData, u64>,
    ) -> BlockBitmaps {
        BlockBitmaps {
            cover: KernelBitmap::new(cover),
            trie_hint: KernelBitmap::new(trie_hint),
            exact_hint: KernelBitmap::new(exact_hint),
        }
    }

    /// Rebuilds the bitmaps from `entries` and writes the words that changed.
    /// Called after the trie and hash updates: a new entry is briefly only
    /// in the trie or hash (as before the change, it passes), a removed one
    /// briefly only in a bitmap (as before the change, it drops).
    pub fn update(&mut self, entries: &BTreeMap<IpNet, EntryMeta>, now_unix: u64) -> Result<()> {
        let built = build(entries, now_unix);
        self.cover
            .write(&built.cover)
            .context("denylist cover bitmap")?;
        self.trie_hint
            .write(&built.trie_hint)
            .context("denylist trie-hint bitmap")?;
        self.exact_hint
            .write(&built.exact_hint)
            .context("denylist exact-hint bitmap")
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
                let meta = EntryMeta {
                    reason: None,
                    added: 0,
                    expires: *expires,
                };
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
}
