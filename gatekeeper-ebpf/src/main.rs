//! The XDP entry point: parse → verdict → count.
//!
//! Only TCP SYNs (without ACK) to a protected port are judged. A source is
//! dropped when a denylist entry (exact hash first, then the trie of shorter
//! prefixes) or a DNSBL verdict matches it, unless the allowlist covers it;
//! the allowlist is only consulted once a drop entry matched, so a clean
//! SYN costs no allowlist lookup. A packet that could be or complete into
//! such a SYN but cannot be walked to its TCP header (a fragment, an IPv6
//! chain too long or of a kind not walked) gets the same verdict on its
//! source alone. Everything else, including frames that cannot be parsed,
//! passes untouched.
#![no_std]
#![no_main]

mod headers;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_ktime_get_ns,
    macros::{map, xdp},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    programs::XdpContext,
    Global,
};
use aya_log_ebpf::debug;
use gatekeeper_common::{
    block_position, capacity, exact_bucket, exact_key, Counter, ExactBucket, PrefixValue,
    BLOCK_WORDS_V4, BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, EXACT_EMPTY, PORT_SLOTS,
};
use headers::{Parsed, Source};

// Capacities here are placeholders: the daemon sets the real ones from config at load time.
#[map]
static DENY_V4: LpmTrie<[u8; 4], PrefixValue> = LpmTrie::with_max_entries(capacity::DENY_V4, 0);
#[map]
static DENY_V6: LpmTrie<[u8; 16], PrefixValue> = LpmTrie::with_max_entries(capacity::DENY_V6, 0);
#[map]
static DENY_V4_EXACT: HashMap<[u8; 4], PrefixValue> =
    HashMap::with_max_entries(capacity::DENY_V4, BPF_F_NO_PREALLOC);
/// Permanent /32s, bucketed (see gatekeeper-common); the rest are in DENY_V4_EXACT.
#[map]
static DENY_V4_SLOTS: Array<ExactBucket> =
    Array::with_max_entries(1 << (32 - DEFAULT_EXACT_V4_SHIFT), BPF_F_MMAPABLE);
const DEFAULT_EXACT_V4_SHIFT: u32 = 14;
/// Set by the daemon at load to match the DENY_V4_SLOTS size it chose.
#[unsafe(no_mangle)]
static EXACT_V4_SHIFT: Global<u32> = Global::new(DEFAULT_EXACT_V4_SHIFT);
#[map]
static DENY_V6_EXACT: HashMap<[u8; 16], PrefixValue> =
    HashMap::with_max_entries(capacity::DENY_V6, BPF_F_NO_PREALLOC);
#[map]
static ALLOW_V4: LpmTrie<[u8; 4], PrefixValue> = LpmTrie::with_max_entries(capacity::ALLOW_V4, 0);
#[map]
static ALLOW_V6: LpmTrie<[u8; 16], PrefixValue> = LpmTrie::with_max_entries(capacity::ALLOW_V6, 0);
/// Clients a DNSBL listed, by exact address; the daemon inserts them with the verdict's expiry.
#[map]
static DNSBL_V4: LruHashMap<[u8; 4], PrefixValue> =
    LruHashMap::with_max_entries(capacity::DNSBL_V4, 0);
#[map]
static DNSBL_V6: LruHashMap<[u8; 16], PrefixValue> =
    LruHashMap::with_max_entries(capacity::DNSBL_V6, 0);
/// Per-/24 bitmaps the daemon derives from the denylist (see gatekeeper-common).
#[map]
static DENY_V4_COVER: Array<u64> = Array::with_max_entries(BLOCK_WORDS_V4, BPF_F_MMAPABLE);
#[map]
static DENY_V4_TRIE_HINT: Array<u64> = Array::with_max_entries(BLOCK_WORDS_V4, BPF_F_MMAPABLE);
#[map]
static DENY_V4_EXACT_HINT: Array<u64> = Array::with_max_entries(BLOCK_WORDS_V4, BPF_F_MMAPABLE);
#[map]
static DNSBL_V4_HINT: Array<u64> = Array::with_max_entries(BLOCK_WORDS_V4, 0);
/// `[v4, v6]`: set by the daemon while the allowlist has entries of that family.
#[map]
static ALLOW_PRESENT: Array<u8> = Array::with_max_entries(2, 0);
/// Indexed by destination port; non-zero means protected.
#[map]
static PROTECTED_PORTS: Array<u8> = Array::with_max_entries(PORT_SLOTS, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

#[xdp]
pub fn gatekeeper(ctx: XdpContext) -> u32 {
    count(Counter::Packets);
    // One judge() call site, so its lookups stay inlined in the fast path.
    let (source, unwalkable) = match headers::parse(&ctx) {
        Parsed::Syn { source, dest_port } if is_protected(dest_port) => (source, false),
        Parsed::Unwalkable(source) => (source, true),
        Parsed::Syn { .. } | Parsed::Ignore => return xdp_action::XDP_PASS,
        Parsed::Unparsable => {
            count(Counter::Unparsable);
            // Off unless the daemon raised AYA_LOG_LEVEL at load (debug logging).
            debug!(
                &ctx,
                "unparsable frame of {} bytes",
                ctx.data_end() - ctx.data()
            );
            return xdp_action::XDP_PASS;
        }
    };
    let (action, counter) = judge(&source);
    if !unwalkable {
        count(counter);
    } else {
        // Not known to be a protected SYN, so kept out of the verdict counters.
        count(Counter::Unwalkable);
        if action == xdp_action::XDP_DROP {
            count(Counter::DroppedUnwalkable);
        }
    }
    action
}

/// Whether `addr`'s /24 block is marked in a per-/24 bitmap: an inlined array read.
#[inline(always)]
fn block_marked(bitmap: &Array<u64>, addr: &[u8; 4]) -> bool {
    let (word, bit) = block_position(*addr);
    matches!(bitmap.get(word), Some(&bits) if bits & bit != 0)
}

/// An inlined array read instead of a trie lookup when the allowlist is empty.
#[inline(always)]
fn allow_present(family: u32) -> bool {
    matches!(ALLOW_PRESENT.get(family), Some(&flag) if flag != 0)
}

#[inline(always)]
fn is_protected(port: u16) -> bool {
    matches!(PROTECTED_PORTS.get(port as u32), Some(&flag) if flag != 0)
}

/// Drop entries first (deny, then DNSBL); the allowlist overrides a match.
/// An expired entry is as good as absent.
#[inline(always)]
fn judge(source: &Source) -> (u32, Counter) {
    match source {
        Source::V4(addr) => {
            let key = Key::new(32, *addr);
            verdict(
                #[inline(always)]
                || {
                    block_marked(&DENY_V4_EXACT_HINT, addr) && exact_v4(addr)
                        || block_marked(&DENY_V4_COVER, addr)
                        || block_marked(&DENY_V4_TRIE_HINT, addr) && live(DENY_V4.get(&key))
                },
                || block_marked(&DNSBL_V4_HINT, addr) && live_ptr(DNSBL_V4.get_ptr(addr)),
                || allow_present(0) && live(ALLOW_V4.get(&key)),
            )
        }
        Source::V6(addr) => {
            let key = Key::new(128, *addr);
            verdict(
                || live_ptr(DENY_V6_EXACT.get_ptr(addr)) || live(DENY_V6.get(&key)),
                || live_ptr(DNSBL_V6.get_ptr(addr)),
                || allow_present(1) && live(ALLOW_V6.get(&key)),
            )
        }
    }
}

/// A /32 entry: its bucket's seven slots compared in straight-line code,
/// and the hash only asked when the bucket spilled into it.
#[inline(always)]
fn exact_v4(addr: &[u8; 4]) -> bool {
    let key = exact_key(*addr);
    let Some(bucket) = DENY_V4_SLOTS.get(exact_bucket(key, EXACT_V4_SHIFT.load())) else {
        return false;
    };
    let [a, b, c, d, e, f, g] = bucket.keys;
    if key != EXACT_EMPTY
        && (a == key || b == key || c == key || d == key || e == key || f == key || g == key)
    {
        return true;
    }
    bucket.spilled != 0 && live_ptr(DENY_V4_EXACT.get_ptr(addr))
}

/// Later lookups run only when the earlier ones did not decide.
#[inline(always)]
fn verdict(
    denied: impl FnOnce() -> bool,
    dnsbl_listed: impl FnOnce() -> bool,
    allowed: impl FnOnce() -> bool,
) -> (u32, Counter) {
    let drop_counter = if denied() {
        Counter::DroppedDeny
    } else if dnsbl_listed() {
        Counter::DroppedDnsbl
    } else {
        return (xdp_action::XDP_PASS, Counter::Passed);
    };
    if allowed() {
        (xdp_action::XDP_PASS, Counter::PassedAllow)
    } else {
        (xdp_action::XDP_DROP, drop_counter)
    }
}

/// The clock is read only for an entry that can expire: permanent entries
/// and misses (the common cases) cost no helper call.
#[inline(always)]
fn live(entry: Option<&PrefixValue>) -> bool {
    match entry {
        Some(value) if value.expires_ns == 0 => true,
        // SAFETY: bpf_ktime_get_ns has no preconditions.
        Some(value) => value.is_live(unsafe { bpf_ktime_get_ns() }),
        None => false,
    }
}

#[inline(always)]
fn live_ptr(entry: Option<*const PrefixValue>) -> bool {
    // SAFETY: the pointer comes from a successful map lookup and the value is plain data;
    // a concurrent update from userspace at worst yields the old or new expiry.
    live(entry.map(|ptr| unsafe { &*ptr }))
}

#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, so no other CPU writes it concurrently; pointer comes from the map.
        unsafe { *slot += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
