//! Many map entries per syscall (`BPF_MAP_UPDATE_BATCH`, `BPF_MAP_DELETE_BATCH`).
//!
//! A million-prefix import is a million map writes; one `bpf(2)` call each
//! costs more than the trie insert itself. aya has no batch API, so this
//! module makes the call, and falls back to one call per entry on a kernel
//! or map type without batch support.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

use aya::maps::MapData;
use aya::Pod;

/// Entries per syscall: big enough to amortise the call, small enough that
/// one call never holds the CPU for long (the kernel reschedules inside too).
const CHUNK: usize = 65_536;

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
/// The kernel's internal "operation not supported" (a map type without batch ops).
const ENOTSUPP: i32 = 524;

/// The `batch` member of `union bpf_attr`; the kernel zero-fills the rest.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Inserts or overwrites `keys[i] → values[i]` for every i.
pub fn update<K: Pod, V: Pod>(map: &MapData, keys: &[K], values: &[V]) -> io::Result<()> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    for (keys, values) in keys.chunks(CHUNK).zip(values.chunks(CHUNK)) {
        let mut attr = attr(map, keys);
        attr.values = values.as_ptr() as u64;
        match bpf(BPF_MAP_UPDATE_BATCH, &mut attr) {
            Ok(()) => {}
            Err(e) if unsupported(&e) && never_entered(&attr, keys.len()) => {
                for (key, value) in keys.iter().zip(values) {
                    update_one(map, key, value)?;
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Removes every key; a key that is not there is skipped, not an error.
pub fn delete<K: Pod>(map: &MapData, keys: &[K]) -> io::Result<()> {
    let mut rest = keys;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(CHUNK)];
        let mut attr = attr(map, chunk);
        let result = bpf(BPF_MAP_DELETE_BATCH, &mut attr);
        // `count` says how many keys were processed before a failure.
        let done = (attr.count as usize).min(chunk.len());
        match result {
            Ok(()) => rest = &rest[chunk.len()..],
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                rest = &rest[(done + 1).min(rest.len())..]
            }
            Err(e) if unsupported(&e) && never_entered(&attr, chunk.len()) => {
                for key in chunk {
                    delete_one(map, key)?;
                }
                rest = &rest[chunk.len()..];
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn attr<K>(map: &MapData, keys: &[K]) -> BatchAttr {
    BatchAttr {
        keys: keys.as_ptr() as u64,
        count: keys.len() as u32,
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        ..BatchAttr::default()
    }
}

/// The kernel sets `count` to 0 when it starts a batch and to the entries
/// done when it stops; an unknown command or a map type without batch ops
/// fails before that and leaves our count as it was. Failing on the first
/// entry looks alike and costs only the per-entry retry, which reports it.
fn never_entered(attr: &BatchAttr, asked: usize) -> bool {
    attr.count == 0 || attr.count as usize == asked
}

fn unsupported(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP)
    )
}

/// One `bpf(2)` call with an attr struct laid out as the kernel's union member.
fn bpf<A>(command: libc::c_long, attr: &mut A) -> io::Result<()> {
    // SAFETY: `attr` is a repr(C) bpf_attr member whose pointers cover Pod data the caller keeps alive.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            attr as *mut A,
            std::mem::size_of::<A>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `BPF_MAP_UPDATE_ELEM`, for kernels without the batch command.
fn update_one<K: Pod, V: Pod>(map: &MapData, key: &K, value: &V) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        key: key as *const K as u64,
        value: value as *const V as u64,
        ..ElemAttr::default()
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr)
}

fn delete_one<K: Pod>(map: &MapData, key: &K) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        key: key as *const K as u64,
        ..ElemAttr::default()
    };
    match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;

/// The map-element member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}
