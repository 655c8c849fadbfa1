//! Bounded, verifier-friendly header walking.
//!
//! Every read goes through [`Frame::bytes`], which checks the access against
//! `data_end` so the verifier can prove it safe; loops have constant bounds.
//!
//! A packet that could be, or complete into, a TCP SYN but whose TCP header
//! the walk cannot reach (fragments, long or unknown IPv6 chains) comes back
//! as [`Parsed::Unwalkable`], to be judged on its source alone: Linux would
//! reassemble or deliver it, so passing it unjudged would let a listed source in.

use aya_ebpf::programs::XdpContext;

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;

const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
const MAX_VLAN_TAGS: usize = 2;
const IPV6_HLEN: usize = 40;
/// Extension headers walked before judging on the source alone; real traffic rarely has more than two.
const MAX_IPV6_EXT_HEADERS: usize = 6;
/// IPv4 flags and fragment offset: more-fragments flag and offset.
const IPV4_MF_AND_OFFSET: u16 = 0x3fff;
const IPV4_OFFSET: u16 = 0x1fff;
/// IPv6 fragment header: offset (in 8-octet units, shifted by 3) and more-fragments flag.
const IPV6_OFFSET: u16 = 0xfff8;
const IPV6_MF: u16 = 0x0001;
const TCP_HLEN: usize = 20;

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
    /// Could be or complete into a TCP SYN, but flags and ports are out of
    /// reach (a fragment, an IPv6 chain past the bound or of a kind not
    /// walked): judged on the source alone.
    Unwalkable(Source),
    /// Well-formed but nothing to judge: not TCP, not a SYN...
    Ignore,
    /// Truncated or malformed, so the kernel discards it too: passed, but counted.
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
    let source = Source::V4([ip[12], ip[13], ip[14], ip[15]]);
    if ip[9] != IPPROTO_TCP {
        return beyond_walk(ip[9], source);
    }
    let fragment = be16(ip, 6);
    if fragment & IPV4_MF_AND_OFFSET == 0 {
        return parse_tcp(frame, offset + header_len, source, None);
    }
    // Later fragments carry no ports. Linux discards overlapping fragments,
    // so a first fragment holding the whole TCP header decides flags and ports.
    if fragment & IPV4_OFFSET != 0 {
        return Parsed::Unwalkable(source);
    }
    let packet_end = offset + be16(ip, 2) as usize;
    parse_tcp(frame, offset + header_len, source, Some(packet_end))
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
    let packet_end = offset + IPV6_HLEN + be16(ip, 4) as usize;
    let mut next_header = ip[6];
    let mut offset = offset + IPV6_HLEN;
    // Set inside a first fragment: the rest of the chain may follow in a
    // later fragment, so running out of bytes no longer means "discarded".
    let mut fragment_end = None;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next_header {
            IPPROTO_TCP => return parse_tcp(frame, offset, Source::V6(source), fragment_end),
            // Hop-by-hop, routing, destination options: length in 8-octet units, not counting the first.
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let Some(ext) = ext_header::<2>(frame, offset, fragment_end) else {
                    return short(fragment_end, source);
                };
                next_header = ext[0];
                offset += (ext[1] as usize + 1) * 8;
            }
            // Fragment header: fixed 8 octets; only the first fragment has the TCP header.
            IPPROTO_FRAGMENT => {
                let Some(ext) = ext_header::<8>(frame, offset, fragment_end) else {
                    return short(fragment_end, source);
                };
                let fragment = be16(ext, 2);
                if fragment & IPV6_OFFSET != 0 {
                    return beyond_walk(ext[0], Source::V6(source));
                }
                if fragment & IPV6_MF != 0 {
                    fragment_end = Some(packet_end);
                }
                next_header = ext[0];
                offset += 8;
            }
            // Authentication header: length in 4-octet units, minus 2.
            IPPROTO_AH => {
                let Some(ext) = ext_header::<2>(frame, offset, fragment_end) else {
                    return short(fragment_end, source);
                };
                next_header = ext[0];
                offset += (ext[1] as usize + 2) * 4;
            }
            other => return beyond_walk(other, Source::V6(source)),
        }
    }
    if next_header == IPPROTO_TCP {
        return parse_tcp(frame, offset, Source::V6(source), fragment_end);
    }
    beyond_walk(next_header, Source::V6(source))
}

/// An extension header's first `N` bytes, which inside a first fragment must
/// also lie within the IP packet: bytes past it are padding the kernel trims.
#[inline(always)]
fn ext_header<'a, const N: usize>(
    frame: &'a Frame,
    offset: usize,
    fragment_end: Option<usize>,
) -> Option<&'a [u8; N]> {
    match fragment_end {
        Some(end) if offset + N > end => None,
        _ => frame.bytes::<N>(offset),
    }
}

/// A chain that ends early: discarded by the kernel, unless a later fragment completes it.
#[inline(always)]
fn short(fragment_end: Option<usize>, source: [u8; 16]) -> Parsed {
    match fragment_end {
        Some(_) => Parsed::Unwalkable(Source::V6(source)),
        None => Parsed::Unparsable,
    }
}

/// Where the walk stops before a TCP header: `protocol` (an IPv4 protocol or
/// IPv6 next header) decides whether a TCP SYN could still be behind it.
#[inline(always)]
fn beyond_walk(protocol: u8, source: Source) -> Parsed {
    if may_lead_to_tcp(protocol) {
        Parsed::Unwalkable(source)
    } else {
        Parsed::Ignore
    }
}

/// Protocols after which a TCP header can still follow, directly or once the
/// kernel reassembles, decrypts or decapsulates. Terminal protocols (UDP,
/// ICMP, ICMPv6, no-next-header 59, SCTP, ...) are not in the list; neither
/// are tunnels over UDP, whose payload the stack hands to a socket or device.
#[inline(always)]
fn may_lead_to_tcp(protocol: u8) -> bool {
    matches!(
        protocol,
        IPPROTO_TCP
            // IPv6 extension headers the walker follows (hop-by-hop, routing, fragment, AH, destination options).
            | IPPROTO_HOPOPTS
            | IPPROTO_ROUTING
            | IPPROTO_FRAGMENT
            | IPPROTO_AH
            | IPPROTO_DSTOPTS
            // IP in IP, IPv6 in IP, GRE, ESP, IP-within-IP, EtherIP, ENCAP, IPComp, L2TPv3, MPLS in IP.
            | 4 | 41 | 47 | 50 | 94 | 97 | 98 | 108 | 115 | 137
            // Mobility, HIP, Shim6: extension headers the walker does not follow.
            | 135 | 139 | 140
            // Ethernet (SRv6), AGGFRAG, NSH, unassigned, experimental (253, 254), reserved.
            | 143..=255
    )
}

/// `fragment_end`: the end of a first fragment, which must hold the whole
/// TCP header; otherwise flags and ports arrive later and only the source can be judged.
#[inline(always)]
fn parse_tcp(frame: &Frame, offset: usize, source: Source, fragment_end: Option<usize>) -> Parsed {
    let Some(tcp) = (match fragment_end {
        Some(end) if offset + TCP_HLEN > end => return Parsed::Unwalkable(source),
        _ => frame.bytes::<TCP_HLEN>(offset),
    }) else {
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
