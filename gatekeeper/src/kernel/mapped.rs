//! A `BPF_F_MMAPABLE` array's values mapped into the daemon. XDP sees each
//! store at once; every access is one aligned atomic word, so XDP never
//! reads a torn value.

use std::os::fd::{AsFd, AsRawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use aya::maps::MapData;

pub struct MappedArray {
    base: NonNull<u8>,
    bytes: usize,
}

// SAFETY: the mapping is plain shared memory; every access is an atomic word operation.
unsafe impl Send for MappedArray {}

impl MappedArray {
    /// Maps the first `bytes` of the array's value area; fails when the map
    /// was created without `BPF_F_MMAPABLE` or is smaller.
    pub fn map(map: &MapData, bytes: usize) -> std::io::Result<MappedArray> {
        let fd = map.fd().as_fd().as_raw_fd();
        // SAFETY: a fresh shared mapping of the array's value area; the kernel checks size and flags.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        NonNull::new(addr.cast::<u8>())
            .map(|base| MappedArray { base, bytes })
            .ok_or_else(|| std::io::Error::other("mmap returned a null mapping"))
    }

    pub fn store_u64(&self, index: usize, value: u64) {
        self.u64_at(index).store(value, Ordering::Relaxed);
    }

    pub fn load_u32(&self, index: usize) -> u32 {
        self.u32_at(index).load(Ordering::Relaxed)
    }

    pub fn store_u32(&self, index: usize, value: u32) {
        self.u32_at(index).store(value, Ordering::Relaxed);
    }

    fn u64_at(&self, index: usize) -> &AtomicU64 {
        assert!(
            index < self.bytes / 8,
            "word {index} outside the mapped array"
        );
        // SAFETY: in bounds of a live, page-aligned shared mapping, so 8-byte aligned; atomic because XDP reads concurrently.
        unsafe { AtomicU64::from_ptr(self.base.as_ptr().cast::<u64>().add(index)) }
    }

    fn u32_at(&self, index: usize) -> &AtomicU32 {
        assert!(
            index < self.bytes / 4,
            "word {index} outside the mapped array"
        );
        // SAFETY: as in u64_at, for 4-byte words.
        unsafe { AtomicU32::from_ptr(self.base.as_ptr().cast::<u32>().add(index)) }
    }
}

impl Drop for MappedArray {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `map` created; no reference into it outlives self.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}
