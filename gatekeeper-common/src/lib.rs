//! Types shared by the XDP program and userspace.
//!
//! Every map layout the two sides agree on lives here and nowhere else, so a
//! change to a key or value cannot drift between kernel and daemon.
#![no_std]

/// Map names as declared in the eBPF object; userspace looks maps up by them.
pub mod map_names {
    pub const DENY_V4: &str = "DENY_V4";
    pub const DENY_V6: &str = "DENY_V6";
    /// Full-length denylist entries (/32, /128) by exact address: one hash
    /// lookup instead of a trie walk for the most common entry.
    pub const DENY_V4_EXACT: &str = "DENY_V4_EXACT";
    pub const DENY_V6_EXACT: &str = "DENY_V6_EXACT";
    /// Permanent IPv4 /32 denylist entries in a bucketed open-addressing
    /// table ([`super::ExactBucket`]): one inlined array read instead of a
    /// hash lookup. What does not fit, and what expires, stays in
    /// `DENY_V4_EXACT`, and the bucket's `spilled` word sends XDP there.
    pub const DENY_V4_SLOTS: &str = "DENY_V4_SLOTS";
    pub const ALLOW_V4: &str = "ALLOW_V4";
    pub const ALLOW_V6: &str = "ALLOW_V6";
    pub const PROTECTED_PORTS: &str = "PROTECTED_PORTS";
    pub const COUNTERS: &str = "COUNTERS";
    /// One bit per IPv4 /24 block: set where a permanent denylist prefix of
    /// /24 or shorter covers the whole block, so XDP drops without a trie walk.
    pub const DENY_V4_COVER: &str = "DENY_V4_COVER";
    /// One bit per IPv4 /24 block: set where the denylist trie holds some
    /// other entry (longer than /24, or expiring) overlapping the block; a
    /// source in a block with neither bit set skips the trie altogether.
    pub const DENY_V4_TRIE_HINT: &str = "DENY_V4_TRIE_HINT";
    /// One bit per IPv4 /24 block holding a /32 denylist entry: elsewhere
    /// the exact hash is not even asked.
    pub const DENY_V4_EXACT_HINT: &str = "DENY_V4_EXACT_HINT";
    /// One bit per IPv4 /24 block where a DNSBL verdict was inserted. A stale
    /// bit (an evicted or expired entry) only costs a hash lookup, never a drop.
    pub const DNSBL_V4_HINT: &str = "DNSBL_V4_HINT";
    /// `[v4, v6]`: non-zero while the allowlist holds entries of that family,
    /// so a drop verdict can skip an empty allowlist trie.
    pub const ALLOW_PRESENT: &str = "ALLOW_PRESENT";
    /// Exact-address hashes of clients a DNSBL listed (keyed by the address bytes).
    pub const DNSBL_V4: &str = "DNSBL_V4";
    pub const DNSBL_V6: &str = "DNSBL_V6";
    /// All maps, in the order they are pinned and reported.
    pub const ALL: [&str; 16] = [
        DENY_V4,
        DENY_V6,
        DENY_V4_EXACT,
        DENY_V4_SLOTS,
        DENY_V6_EXACT,
        ALLOW_V4,
        ALLOW_V6,
        PROTECTED_PORTS,
        COUNTERS,
        DNSBL_V4,
        DNSBL_V6,
        ALLOW_PRESENT,
        DENY_V4_COVER,
        DENY_V4_TRIE_HINT,
        DENY_V4_EXACT_HINT,
        DNSBL_V4_HINT,
    ];
}

/// Compile-time defaults for map capacities; the daemon overrides them from config.
pub mod capacity {
    pub const DENY_V4: u32 = 1 << 20;
    pub const DENY_V6: u32 = 1 << 17;
    pub const ALLOW_V4: u32 = 1 << 16;
    pub const ALLOW_V6: u32 = 1 << 16;
    /// DNSBL maps are LRU hashes: when full, the least recently matched
    /// verdict is evicted (that client is simply checked again).
    pub const DNSBL_V4: u32 = 1 << 17;
    pub const DNSBL_V6: u32 = 1 << 16;
}

/// u64 words in a per-/24 IPv4 bitmap (2^24 blocks).
pub const BLOCK_WORDS_V4: u32 = 1 << 18;

/// The word and bit of `addr`'s /24 block in a per-/24 bitmap.
#[inline(always)]
pub fn block_position(addr: [u8; 4]) -> (u32, u64) {
    let block = u32::from_be_bytes(addr) >> 8;
    (block >> 6, 1u64 << (block & 63))
}

/// Addresses per [`ExactBucket`]: with the spill word the bucket is 32
/// bytes, half a cache line, and at the table's sizing (four buckets' worth
/// of capacity per bucket, see the daemon) a bucket rarely overflows.
pub const EXACT_SLOTS: usize = 7;

/// The global (in the eBPF object's read-only data) holding the IPv4 slot
/// table's shift: 32 minus log2 of its bucket count, set at load.
pub const EXACT_V4_SHIFT: &str = "EXACT_V4_SHIFT";

/// One bucket of `DENY_V4_SLOTS`. A slot holds an address as
/// [`exact_key`] gives it, 0 when empty (so 0.0.0.0 itself is never
/// slotted). `spilled` is non-zero while some address of this bucket lives
/// in the exact hash instead (the bucket was full, or the entry expires).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExactBucket {
    pub keys: [u32; EXACT_SLOTS],
    pub spilled: u32,
}

/// The empty slot.
pub const EXACT_EMPTY: u32 = 0;

#[inline(always)]
pub fn exact_key(addr: [u8; 4]) -> u32 {
    u32::from_be_bytes(addr)
}

/// The bucket of `key` in a table of 2^(32 - shift) buckets: a
/// multiply-xorshift-multiply mix, so neighbouring addresses (one /24's
/// hosts) scatter over the table; the top bits pick the bucket.
#[inline(always)]
pub fn exact_bucket(key: u32, shift: u32) -> u32 {
    let mixed = key.wrapping_mul(0x9E37_79B1);
    let mixed = (mixed ^ (mixed >> 16)).wrapping_mul(0x85EB_CA6B);
    mixed >> (shift & 31)
}

/// `BPF_F_NO_PREALLOC`: LPM tries require it, and it keeps memory proportional to use.
pub const BPF_F_NO_PREALLOC: u32 = 1;
/// `BPF_F_MMAPABLE`: the daemon writes the per-/24 bitmaps through a shared
/// mapping; a big change rewrites most of their 2^18 words, far too many
/// for one syscall (even batched) each.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Number of entries in the protected-ports array: one per TCP port.
pub const PORT_SLOTS: u32 = 1 << 16;

/// Value stored with every deny/allow prefix.
///
/// `expires_ns` is an absolute `CLOCK_MONOTONIC` (bpf_ktime_get_ns) instant;
/// 0 means the entry never expires. XDP ignores an entry whose instant has
/// passed, so expiry takes effect without waiting for a sweeper.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixValue {
    pub expires_ns: u64,
}

impl PrefixValue {
    pub const PERMANENT: PrefixValue = PrefixValue { expires_ns: 0 };

    /// Whether the entry still applies at monotonic time `now_ns`.
    #[inline(always)]
    pub fn is_live(&self, now_ns: u64) -> bool {
        self.expires_ns == 0 || now_ns < self.expires_ns
    }
}

/// Indices into the per-CPU `COUNTERS` array.
///
/// Every packet the program sees bumps `Packets`; every protected SYN
/// (TCP SYN without ACK to a protected port) bumps exactly one of the
/// verdict counters below. `ProtectedSyns` is their sum, computed in
/// userspace so the fast path saves an increment. Packets judged on the
/// source alone (`Unwalkable`) are not known to be protected SYNs and are
/// kept out of that sum: they count in `Unwalkable` and, when dropped, in
/// `DroppedUnwalkable` too.
///
/// The allowlist is consulted only for a source a drop entry matches, so
/// `PassedAllow` counts SYNs the allowlist saved from a drop.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    Packets = 0,
    ProtectedSyns = 1,
    DroppedDeny = 2,
    /// Protected SYN that a deny or DNSBL entry matched, passed because the allowlist covers it.
    PassedAllow = 3,
    /// Protected SYN from a source no drop entry matches.
    Passed = 4,
    /// Frame the parser gave up on and the kernel discards too (truncated, bad IHL, bad version).
    Unparsable = 5,
    /// Protected SYN from a client with a live DNSBL verdict in the kernel.
    DroppedDnsbl = 6,
    /// Packet that could be or complete into a TCP SYN but whose TCP header
    /// the parser cannot reach (a fragment, an IPv6 chain too long or of a
    /// kind not walked): judged on its source alone.
    Unwalkable = 7,
    /// `Unwalkable` packet dropped because its source is listed (deny or DNSBL, not allowlisted).
    DroppedUnwalkable = 8,
}

impl Counter {
    pub const COUNT: u32 = 9;
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::Packets,
        Counter::ProtectedSyns,
        Counter::DroppedDeny,
        Counter::PassedAllow,
        Counter::Passed,
        Counter::Unparsable,
        Counter::DroppedDnsbl,
        Counter::Unwalkable,
        Counter::DroppedUnwalkable,
    ];

    /// Stable name used in `gatekeeper stats --json`.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Packets => "packets",
            Counter::ProtectedSyns => "protected_syns",
            Counter::DroppedDeny => "dropped_deny",
            Counter::PassedAllow => "passed_allow",
            Counter::Passed => "passed",
            Counter::Unparsable => "unparsable",
            Counter::DroppedDnsbl => "dropped_dnsbl",
            Counter::Unwalkable => "unwalkable",
            Counter::DroppedUnwalkable => "dropped_unwalkable",
        }
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: PrefixValue is repr(C), has no padding and every bit pattern is valid.
    unsafe impl aya::Pod for super::PrefixValue {}
    // SAFETY: ExactBucket is repr(C) of eight u32s: no padding, every bit pattern valid.
    unsafe impl aya::Pod for super::ExactBucket {}
}
