//! Journal record framing: pure functions over bytes, no I/O.
//!
//! A record is `len (u32 LE) | crc32(len) | crc32(payload) | payload`.
//! The header checksum tells a torn tail (a crash mid-append leaves a
//! prefix of the last record) from corruption (a damaged length would
//! otherwise look like a short tail and silently drop what follows).

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::store::{EntryMeta, EntryMetaV1, EntryMetaV2};

const HEADER: usize = 12;
/// Far above any real record (a million-entry replace is ~40 MB).
const MAX_RECORD: u32 = 1 << 30;

/// One change as written: the final state of every prefix it touched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub ops: Vec<(IpNet, Option<EntryMeta>)>,
}

/// A [`Record`] to write, borrowed: serialises to the same bytes.
#[derive(Serialize)]
pub struct RecordRef<'a> {
    pub ops: &'a [(IpNet, Option<EntryMeta>)],
}

/// A record as an older format wrote it (journals after a snapshot of
/// that format, or, for format 1, without a snapshot).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordOf<M> {
    pub ops: Vec<(IpNet, Option<M>)>,
}

pub type RecordV1 = RecordOf<EntryMetaV1>;

impl<M: Into<EntryMeta>> From<RecordOf<M>> for Record {
    fn from(old: RecordOf<M>) -> Record {
        Record {
            ops: old
                .ops
                .into_iter()
                .map(|(net, meta)| (net, meta.map(Into::into)))
                .collect(),
        }
    }
}

/// Which record format a journal holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    V1,
    V2,
    /// Entries carry the fleet's claim.
    V3,
}

pub fn encode<R: Serialize>(record: &R) -> Vec<u8> {
    let payload = postcard::to_allocvec(record).expect("records always serialise");
    let len = (payload.len() as u32).to_le_bytes();
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&len);
    out.extend_from_slice(&crc32fast::hash(&len).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// The records of one journal file.
#[derive(Debug, PartialEq, Eq)]
pub struct Decoded {
    pub records: Vec<Record>,
    /// Bytes of whole, valid records; a torn tail starts here.
    pub valid_len: u64,
    /// Whether bytes follow `valid_len` (an interrupted append).
    pub torn: bool,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("at byte {offset}: {problem}")]
pub struct Corrupt {
    pub offset: u64,
    pub problem: &'static str,
}

pub fn decode(bytes: &[u8], format: Format) -> Result<Decoded, Corrupt> {
    let mut records = Vec::new();
    let mut offset = 0usize;
    let torn = |records, offset: usize| {
        Ok(Decoded {
            records,
            valid_len: offset as u64,
            torn: true,
        })
    };
    while offset < bytes.len() {
        let rest = &bytes[offset..];
        let corrupt = |problem| Corrupt {
            offset: offset as u64,
            problem,
        };
        if rest.len() < HEADER {
            return torn(records, offset);
        }
        let word = |i: usize| u32::from_le_bytes(rest[i..i + 4].try_into().unwrap());
        if crc32fast::hash(&rest[..4]) != word(4) {
            return Err(corrupt("record header checksum mismatch"));
        }
        let len = word(0);
        if len > MAX_RECORD {
            return Err(corrupt("record length out of range"));
        }
        let end = HEADER + len as usize;
        if rest.len() < end {
            return torn(records, offset);
        }
        let payload = &rest[HEADER..end];
        if crc32fast::hash(payload) != word(8) {
            if rest.len() == end {
                // The last record, whole in length but not in content.
                return torn(records, offset);
            }
            return Err(corrupt("record checksum mismatch"));
        }
        let record: Record = match format {
            Format::V1 => postcard::from_bytes::<RecordV1>(payload).map(Record::from),
            Format::V2 => postcard::from_bytes::<RecordOf<EntryMetaV2>>(payload).map(Record::from),
            Format::V3 => postcard::from_bytes(payload),
        }
        .map_err(|_| corrupt("record does not decode"))?;
        if record.ops.iter().any(|(net, _)| net.trunc() != *net) {
            return Err(corrupt("record holds a non-canonical prefix"));
        }
        records.push(record);
        offset += end;
    }
    Ok(Decoded {
        records,
        valid_len: offset as u64,
        torn: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: u8) -> Record {
        let net: IpNet = format!("192.0.2.{i}/32").parse().unwrap();
        let mut meta = EntryMeta::manual(
            Some(format!("r{i}")),
            1000 + u64::from(i),
            i.is_multiple_of(2).then_some(5000),
        );
        meta.feeds.insert(format!("feed{i}"));
        Record {
            ops: vec![(net, Some(meta)), ("2001:db8::/32".parse().unwrap(), None)],
        }
    }

    fn journal(n: u8) -> Vec<u8> {
        (0..n).flat_map(|i| encode(&record(i))).collect()
    }

    #[test]
    fn round_trips() {
        let decoded = decode(&journal(3), Format::V3).unwrap();
        assert_eq!(decoded.records, [record(0), record(1), record(2)]);
        assert!(!decoded.torn);
        assert_eq!(decoded.valid_len, journal(3).len() as u64);
    }

    #[test]
    fn every_cut_of_the_last_record_is_a_torn_tail() {
        let two = journal(2).len();
        let three = journal(3);
        for cut in two + 1..three.len() {
            let decoded = decode(&three[..cut], Format::V3).unwrap();
            assert_eq!(decoded.records.len(), 2, "cut at {cut}");
            assert!(decoded.torn);
            assert_eq!(decoded.valid_len, two as u64);
        }
    }

    #[test]
    fn damage_before_the_tail_is_corruption() {
        let one = journal(1).len();
        let mut bytes = journal(3);
        // A flipped payload byte in the second record.
        bytes[one + HEADER + 2] ^= 0x40;
        let err = decode(&bytes, Format::V3).unwrap_err();
        assert_eq!(err.offset, one as u64);
        // A damaged length in the second record must not pass for a short tail.
        let mut bytes = journal(3);
        bytes[one + 1] ^= 0x7f;
        assert_eq!(
            decode(&bytes, Format::V3).unwrap_err().problem,
            "record header checksum mismatch"
        );
    }

    #[test]
    fn format_1_records_decode_as_manual() {
        let old = RecordV1 {
            ops: vec![(
                "192.0.2.0/24".parse().unwrap(),
                Some(EntryMetaV1 {
                    reason: None,
                    added: 3,
                    expires: None,
                }),
            )],
        };
        let decoded = decode(&encode(&old), Format::V1).unwrap();
        assert_eq!(decoded.records, [Record::from(old.clone())]);
        assert_eq!(
            decoded.records[0].ops[0].1,
            Some(EntryMeta::manual(None, 3, None))
        );
    }

    #[test]
    fn damage_in_the_last_record_is_a_torn_tail() {
        let two = journal(2).len();
        let mut bytes = journal(3);
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let decoded = decode(&bytes, Format::V3).unwrap();
        assert!(decoded.torn);
        assert_eq!(decoded.valid_len, two as u64);
    }
}
