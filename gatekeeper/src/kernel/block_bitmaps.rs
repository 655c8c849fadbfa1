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

/// `cover`: blocks wholly inside a permanent prefix of /24 or shorter.
/// `hint`: blocks overlapping any other trie entry (longer than /24, or expiring).
/// /32 entries live in the exact hash and mark nothing.
pub fn build(entries: &BTreeMap<IpNet, EntryMeta>, now_unix: u64) -> (Vec<u64>, Vec<u64>) {
    let mut cover = vec![0u64; WORDS];
    let mut hint = vec![0u64; WORDS];
    for (net, meta) in entries {
        let IpNet::V4(net) = net else { continue };
        let len = net.prefix_len();
        if len == 32 || meta.expires.is_some_and(|e| e <= now_unix) {
            continue;
        }
        let first = u32::from(net.network()) >> 8;
        let blocks = if len <= 24 { 1u32 << (24 - len) } else { 1 };
        let bitmap = if len <= 24 && meta.expires.is_none() {
            &mut cover
        } else {
            &mut hint
        };
        set_range(bitmap, first, blocks);
    }
    (cover, hint)
}

/// Sets bits `[first, first + count)`; whole words at once where aligned.
fn set_range(bitmap: &mut [u64], first: u32, count: u32) {
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

/// The kernel's two bitmaps and what was last written to them.
pub struct BlockBitmaps {
    cover: Array<MapData, u64>,
    hint: Array<MapData, u64>,
    written_cover: Vec<u64>,
    written_hint: Vec<u64>,
}

impl BlockBitmaps {
    pub fn new(cover: Array<MapData, u64>, hint: Array<MapData, u64>) -> BlockBitmaps {
        BlockBitmaps {
            cover,
            hint,
            written_cover: vec![0; WORDS],
            written_hint: vec![0; WORDS],
        }
    }

    /// Rebuilds both bitmaps from `entries` and writes the words that changed.
    /// Called after the trie and hash updates: a new entry is briefly only
    /// in the trie (as before the change, it passes), a removed one briefly
    /// only in the bitmap (as before the change, it drops).
    pub fn update(&mut self, entries: &BTreeMap<IpNet, EntryMeta>, now_unix: u64) -> Result<()> {
        let (cover, hint) = build(entries, now_unix);
        write_changes(&mut self.cover, &mut self.written_cover, cover)
            .context("denylist cover bitmap")?;
        write_changes(&mut self.hint, &mut self.written_hint, hint)
            .context("denylist trie-hint bitmap")
    }
}

fn write_changes(
    map: &mut Array<MapData, u64>,
    written: &mut [u64],
    wanted: Vec<u64>,
) -> Result<()> {
    for (index, (&new, old)) in wanted.iter().zip(written.iter_mut()).enumerate() {
        if new != *old {
            map.set(index as u32, new, 0)?;
            *old = new;
        }
    }
    Ok(())
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
        let (cover, hint) = build(&list, 100);
        for covered in [[10, 0, 0, 1], [10, 255, 255, 255], [192, 0, 2, 200]] {
            assert!(marked(&cover, covered), "{covered:?}");
        }
        for uncovered in [
            [11, 0, 0, 1],
            [192, 0, 3, 1],
            [198, 51, 100, 1],
            [198, 18, 0, 7],
        ] {
            assert!(!marked(&cover, uncovered), "{uncovered:?}");
        }
        // A /28 and an expiring /24 send their block to the trie; an expired one marks nothing.
        assert!(marked(&hint, [198, 51, 100, 200]) && marked(&hint, [203, 0, 113, 5]));
        assert!(!marked(&hint, [203, 0, 114, 5]) && !marked(&hint, [198, 18, 0, 7]));
        assert!(!marked(&hint, [10, 0, 0, 1]));
        let covered_blocks: u32 = cover.iter().map(|w| w.count_ones()).sum();
        assert_eq!(covered_blocks, (1 << 16) + 1);
    }
}
