//! Bounded, verifier-friendly header walking.
//!
//! Every read goes through [`Frame::bytes`], which checks the access against
//! `data_end` so the verifier can prove it safe; loops have constant bounds.

use aya_ebpf::programs::XdpContext;

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;

const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
const MAX_VLAN_TAGS: usize = 2;
const IPV6_HLEN: usize = 40;
/// Extension headers walked before giving up; real traffic rarely has more than two.
const MAX_IPV6_EXT_HEADERS: usize = 6;

const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

/// Source address of a frame worth judging.
pub enum Source {
    V4([u8; 4]),
    V6([u8; 16]),
}

/// What the parser learned about a frame.
pub enum Parsed {
    /// A TCP SYN without ACK; the caller decides whether the port is protected.
    Syn { source: Source, dest_port: u16 },
    /// Well-formed but nothing to judge: not TCP, not a SYN, a later fragment...
    Ignore,
    /// Truncated or malformed: passed, but counted.
    Unparsable,
}

struct Frame<'a> {
    ctx: &'a XdpContext,
}

impl Frame<'_> {
    /// A bounds-checked view of `N` bytes at `offset`, or `None` past the end.
    #[inline(always)]
    fn bytes<const N: usize>(&self, offset: usize) -> Option<&[u8; N]> {
        let start = self.ctx.data();
        let end = self.ctx.data_end();
        if start + offset + N > end {
            return None;
        }
        // SAFETY: the range [start+offset, start+offset+N) lies inside the packet (checked above).
        Some(unsafe { &*((start + offset) as *const [u8; N]) })
    }
}

#[inline(always)]
fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Parsed {
    let frame = Frame { ctx };
    let Some(eth) = frame.bytes::<ETH_HLEN>(0) else {
        return Parsed::Unparsable;
    };
    let mut ethertype = be16(eth, 12);
    let mut offset = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        let Some(tag) = frame.bytes::<VLAN_HLEN>(offset) else {
            return Parsed::Unparsable;
        };
        ethertype = be16(tag, 2);
        offset += VLAN_HLEN;
    }
    match ethertype {
        ETH_P_IPV4 => parse_ipv4(&frame, offset),
        ETH_P_IPV6 => parse_ipv6(&frame, offset),
        // A third VLAN tag or a non-IP protocol: nothing we judge.
        ETH_P_8021Q | ETH_P_8021AD => Parsed::Unparsable,
        _ => Parsed::Ignore,
    }
}

#[inline(always)]
fn parse_ipv4(frame: &Frame, offset: usize) -> Parsed {
    let Some(ip) = frame.bytes::<20>(offset) else {
        return Parsed::Unparsable;
    };
    if ip[0] >> 4 != 4 {
        return Parsed::Unparsable;
    }
    let header_len = ((ip[0] & 0x0f) as usize) * 4;
    if header_len < 20 {
        return Parsed::Unparsable;
    }
    // Non-first fragments carry no TCP header; the first fragment does.
    if be16(ip, 6) & 0x1fff != 0 || ip[9] != IPPROTO_TCP {
        return Parsed::Ignore;
    }
    let source = Source::V4([ip[12], ip[13], ip[14], ip[15]]);
    parse_tcp(frame, offset + header_len, source)
}

#[inline(always)]
fn parse_ipv6(frame: &Frame, offset: usize) -> Parsed {
    let Some(ip) = frame.bytes::<IPV6_HLEN>(offset) else {
        return Parsed::Unparsable;
    };
    if ip[0] >> 4 != 6 {
        return Parsed::Unparsable;
    }
    let mut source = [0u8; 16];
    source.copy_from_slice(&ip[8..24]);
    let mut next_header = ip[6];
    let mut offset = offset + IPV6_HLEN;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next_header {
            IPPROTO_TCP => return parse_tcp(frame, offset, Source::V6(source)),
            // Hop-by-hop, routing, destination options: length in 8-octet units, not counting the first.
            0 | 43 | 60 => {
                let Some(ext) = frame.bytes::<2>(offset) else {
                    return Parsed::Unparsable;
                };
                next_header = ext[0];
                offset += (ext[1] as usize + 1) * 8;
            }
            // Fragment header: fixed 8 octets; only the first fragment has the TCP header.
            44 => {
                let Some(ext) = frame.bytes::<8>(offset) else {
                    return Parsed::Unparsable;
                };
                if be16(ext, 2) & 0xfff8 != 0 {
                    return Parsed::Ignore;
                }
                next_header = ext[0];
                offset += 8;
            }
            // Authentication header: length in 4-octet units, minus 2.
            51 => {
                let Some(ext) = frame.bytes::<2>(offset) else {
                    return Parsed::Unparsable;
                };
                next_header = ext[0];
                offset += (ext[1] as usize + 2) * 4;
            }
            _ => return Parsed::Ignore,
        }
    }
    if next_header == IPPROTO_TCP {
        return parse_tcp(frame, offset, Source::V6(source));
    }
    Parsed::Unparsable
}

#[inline(always)]
fn parse_tcp(frame: &Frame, offset: usize, source: Source) -> Parsed {
    let Some(tcp) = frame.bytes::<20>(offset) else {
        return Parsed::Unparsable;
    };
    if tcp[12] >> 4 < 5 {
        return Parsed::Unparsable;
    }
    let flags = tcp[13];
    if flags & TCP_FLAG_SYN == 0 || flags & TCP_FLAG_ACK != 0 {
        return Parsed::Ignore;
    }
    Parsed::Syn {
        source,
        dest_port: be16(tcp, 2),
    }
}
