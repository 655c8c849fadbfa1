//! The snapshot file: a whole list in one checksummed postcard blob,
//! replaced atomically (temp file, fsync, rename, directory fsync).
//!
//! Layout: `GKSNAP\0` + format byte | payload length (u64 LE) |
//! crc32(payload) (u32 LE) | payload. Format 2 records each entry's owners
//! (manual, feeds); format 3 adds the fleet's claim. Formats 1 (all manual)
//! and 2 are read and converted.

use std::collections::BTreeMap;
use std::path::Path;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::journal::Format;
use super::store::{EntryMeta, EntryMetaV1, EntryMetaV2};
use crate::persist::write_atomically;

const MAGIC: &[u8; 8] = b"GKSNAP\x00\x03";
const MAGIC_V2: &[u8; 8] = b"GKSNAP\x00\x02";
const MAGIC_V1: &[u8; 8] = b"GKSNAP\x00\x01";
const HEADER: usize = 8 + 8 + 4;

/// `generation`: the first journal generation NOT folded into the snapshot.
#[derive(Serialize)]
struct SnapshotRef<'a> {
    generation: u64,
    entries: &'a BTreeMap<IpNet, EntryMeta>,
}

#[derive(Deserialize)]
pub struct Snapshot {
    pub generation: u64,
    pub entries: BTreeMap<IpNet, EntryMeta>,
    /// The format it was written in: the journals after it are in it too.
    #[serde(skip, default = "current")]
    pub format: Format,
}

fn current() -> Format {
    Format::V3
}

/// A snapshot of an older format, whose entries convert to today's.
#[derive(Deserialize)]
struct SnapshotOf<M> {
    generation: u64,
    entries: BTreeMap<IpNet, M>,
}

impl<M: Into<EntryMeta>> SnapshotOf<M> {
    fn convert(self, format: Format) -> Snapshot {
        Snapshot {
            generation: self.generation,
            entries: self
                .entries
                .into_iter()
                .map(|(net, meta)| (net, meta.into()))
                .collect(),
            format,
        }
    }
}

/// Writes the snapshot atomically; returns its size in bytes.
pub fn write(
    path: &Path,
    generation: u64,
    entries: &BTreeMap<IpNet, EntryMeta>,
) -> std::io::Result<u64> {
    let payload = postcard::to_allocvec(&SnapshotRef {
        generation,
        entries,
    })
    .map_err(std::io::Error::other)?;
    write_atomically(path, |out| {
        out.write_all(MAGIC)?;
        out.write_all(&(payload.len() as u64).to_le_bytes())?;
        out.write_all(&crc32fast::hash(&payload).to_le_bytes())?;
        out.write_all(&payload)
    })?;
    Ok((HEADER + payload.len()) as u64)
}

/// Parses a snapshot file's bytes; every defect is an error, never a partial list.
pub fn decode(bytes: &[u8]) -> Result<Snapshot, &'static str> {
    if bytes.len() < HEADER || bytes[..6] != MAGIC[..6] {
        return Err("not a gatekeeper snapshot");
    }
    let format = match &bytes[..8] {
        magic if magic == MAGIC => Format::V3,
        magic if magic == MAGIC_V2 => Format::V2,
        magic if magic == MAGIC_V1 => Format::V1,
        _ => return Err("snapshot format version not supported by this gatekeeper"),
    };
    let len = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
    let crc = u32::from_le_bytes(bytes[16..20].try_into().unwrap());
    let payload = &bytes[HEADER..];
    if payload.len() as u64 != len {
        return Err("snapshot length mismatch (truncated or trailing bytes)");
    }
    if crc32fast::hash(payload) != crc {
        return Err("snapshot checksum mismatch");
    }
    let snapshot =
        match format {
            Format::V1 => postcard::from_bytes::<SnapshotOf<EntryMetaV1>>(payload)
                .map(|old| old.convert(format)),
            Format::V2 => postcard::from_bytes::<SnapshotOf<EntryMetaV2>>(payload)
                .map(|old| old.convert(format)),
            Format::V3 => postcard::from_bytes(payload),
        }
        .map_err(|_| "snapshot does not decode")?;
    if snapshot.entries.keys().any(|net| net.trunc() != *net) {
        return Err("snapshot holds a non-canonical prefix");
    }
    Ok(snapshot)
}

/// A format-1 snapshot, as an older gatekeeper wrote it (migration tests).
#[cfg(test)]
pub(crate) fn v1_bytes(generation: u64, entries: &BTreeMap<IpNet, EntryMetaV1>) -> Vec<u8> {
    old_bytes(MAGIC_V1, generation, entries)
}

/// A format-2 snapshot (no fleet claims), for migration tests.
#[cfg(test)]
pub(crate) fn v2_bytes(generation: u64, entries: &BTreeMap<IpNet, EntryMetaV2>) -> Vec<u8> {
    old_bytes(MAGIC_V2, generation, entries)
}

#[cfg(test)]
fn old_bytes<M: Serialize>(
    magic: &[u8; 8],
    generation: u64,
    entries: &BTreeMap<IpNet, M>,
) -> Vec<u8> {
    #[derive(Serialize)]
    struct Old<'a, M> {
        generation: u64,
        entries: &'a BTreeMap<IpNet, M>,
    }
    let payload = postcard::to_allocvec(&Old {
        generation,
        entries,
    })
    .unwrap();
    let mut out = magic.to_vec();
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_any_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("deny.snapshot");
        let entries: BTreeMap<IpNet, EntryMeta> = [
            ("192.0.2.0/24", Some("SBL1"), None),
            ("2001:db8::1/128", None, Some(99)),
        ]
        .into_iter()
        .map(|(net, reason, expires)| {
            let mut meta = EntryMeta::manual(reason.map(str::to_owned), 7, expires);
            meta.feeds.insert("drop".into());
            (net.parse().unwrap(), meta)
        })
        .collect();
        let size = write(&path, 3, &entries).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, size);
        let read = decode(&bytes).unwrap();
        assert_eq!((read.generation, &read.entries), (3, &entries));
        for i in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[i] ^= 0x10;
            assert!(decode(&damaged).is_err(), "flip at byte {i} accepted");
        }
        assert!(decode(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn reads_format_1_as_manual_entries() {
        let old: BTreeMap<IpNet, EntryMetaV1> = [(
            "192.0.2.0/24".parse().unwrap(),
            EntryMetaV1 {
                reason: Some("SBL1".into()),
                added: 7,
                expires: Some(99),
            },
        )]
        .into();
        let bytes = v1_bytes(4, &old);
        let read = decode(&bytes).unwrap();
        assert_eq!(read.format, Format::V1);
        assert_eq!(read.generation, 4);
        let meta = &read.entries[&"192.0.2.0/24".parse().unwrap()];
        assert_eq!(*meta, EntryMeta::manual(Some("SBL1".into()), 7, Some(99)));
    }
}
