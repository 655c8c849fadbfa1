//! Hand-built Ethernet frames for the parser: well-formed SYNs in unusual
//! wrappings, fragments, and garbage. Checksums are left zero (XDP judges
//! before any checksum is verified) unless a `with_*_checksum` helper fills
//! them in for frames the receiving stack must take as genuine.

use std::net::Ipv6Addr;

fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(128);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// Ethernet header with `tags` VLAN tags: 802.1ad outer, 802.1Q inner, as QinQ switches send them.
fn tagged(dst: [u8; 6], src: [u8; 6], tags: u8, ethertype: u16) -> Vec<u8> {
    if tags == 0 {
        return ethernet(dst, src, ethertype);
    }
    let mut f = ethernet(dst, src, if tags == 1 { 0x8100 } else { 0x88a8 });
    for i in 0..tags {
        let next: u16 = if i + 1 == tags { ethertype } else { 0x8100 };
        f.extend_from_slice(&(100 + u16::from(i)).to_be_bytes());
        f.extend_from_slice(&next.to_be_bytes());
    }
    f
}

fn tcp_header(source_port: u16, dest_port: u16, flags: u8) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&source_port.to_be_bytes());
    t[2..4].copy_from_slice(&dest_port.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    t
}

#[derive(Clone, Copy)]
pub struct Ipv4Syn {
    pub source: [u8; 4],
    pub source_port: u16,
    pub dest_port: u16,
    pub flags: u8,
    /// Extra 32-bit words of IP options (IHL = 5 + this).
    pub options_words: u8,
    /// In 8-octet units; non-zero means a later fragment.
    pub fragment_offset: u16,
    pub vlan_tags: u8,
}

impl Default for Ipv4Syn {
    fn default() -> Self {
        Ipv4Syn {
            source: [192, 0, 2, 2],
            source_port: 40000,
            dest_port: 25,
            flags: 0x02,
            options_words: 0,
            fragment_offset: 0,
            vlan_tags: 0,
        }
    }
}

impl Ipv4Syn {
    pub fn frame(&self, dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
        let mut f = tagged(dst, src, self.vlan_tags, 0x0800);
        let header_len = 20 + 4 * usize::from(self.options_words);
        let mut ip = vec![0u8; header_len];
        ip[0] = 0x40 | (5 + self.options_words);
        ip[2..4].copy_from_slice(&((header_len + 20) as u16).to_be_bytes());
        ip[6..8].copy_from_slice(&self.fragment_offset.to_be_bytes());
        ip[8] = 64;
        ip[9] = 6;
        ip[12..16].copy_from_slice(&self.source);
        ip[16..20].copy_from_slice(&[192, 0, 2, 1]);
        for opt in &mut ip[20..] {
            *opt = 1; // NOP options
        }
        f.extend_from_slice(&ip);
        f.extend_from_slice(&tcp_header(self.source_port, self.dest_port, self.flags));
        f
    }
}

#[derive(Clone)]
pub struct Ipv6Syn {
    pub source: Ipv6Addr,
    /// Next-header codes of 8-octet extension headers before TCP (0, 43, 60),
    /// or of any other header the parser should meet (its 8 octets are zero but the next header).
    pub ext_headers: Vec<u8>,
    /// Append a fragment header for the first fragment (offset 0, more fragments).
    pub first_fragment: bool,
    pub vlan_tags: u8,
}

impl Ipv6Syn {
    pub fn frame(&self, dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
        let mut chain: Vec<u8> = self.ext_headers.clone();
        if self.first_fragment {
            chain.push(44);
        }
        let mut f = tagged(dst, src, self.vlan_tags, 0x86dd);
        let mut ip = vec![0u8; 40];
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&((chain.len() * 8 + 20) as u16).to_be_bytes());
        ip[6] = chain.first().copied().unwrap_or(6);
        ip[7] = 64;
        ip[8..24].copy_from_slice(&self.source.octets());
        ip[24..40].copy_from_slice(&"2001:db8:1::1".parse::<Ipv6Addr>().unwrap().octets());
        f.extend_from_slice(&ip);
        for (i, &kind) in chain.iter().enumerate() {
            let next = chain.get(i + 1).copied().unwrap_or(6);
            let mut ext = vec![0u8; 8];
            ext[0] = next;
            if kind == 44 {
                ext[3] = 1; // offset 0, M flag set
                ext[4..8].copy_from_slice(&0x1234u32.to_be_bytes());
            }
            f.extend_from_slice(&ext);
        }
        f.extend_from_slice(&tcp_header(40000, 25, 0x02));
        f
    }
}

/// A small IPv4 UDP datagram (a DNS-sized packet): never judged.
pub fn ipv4_udp(dst: [u8; 6], src: [u8; 6], source: [u8; 4]) -> Vec<u8> {
    let mut f = ethernet(dst, src, 0x0800);
    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(20u16 + 8 + 32).to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&source);
    ip[16..20].copy_from_slice(&[192, 0, 2, 1]);
    f.extend_from_slice(&ip);
    let mut udp = vec![0u8; 8 + 32];
    udp[0..2].copy_from_slice(&5353u16.to_be_bytes());
    udp[2..4].copy_from_slice(&53u16.to_be_bytes());
    udp[4..6].copy_from_slice(&40u16.to_be_bytes());
    f.extend_from_slice(&udp);
    f
}

/// Frames the parser must give up on: each must count once as unparsable.
pub fn malformed(dst: [u8; 6], src: [u8; 6]) -> Vec<Vec<u8>> {
    let good = Ipv4Syn::default().frame(dst, src);
    let mut frames = Vec::new();
    // Ethernet header only: IPv4 ethertype, no IP header.
    frames.push(ethernet(dst, src, 0x0800));
    // VLAN ethertype with half a tag.
    let mut f = ethernet(dst, src, 0x8100);
    f.extend_from_slice(&[0, 10]);
    frames.push(f);
    // IHL < 5.
    let mut f = good.clone();
    f[14] = 0x44;
    frames.push(f);
    // IHL = 15 (60-byte header) but only 40 bytes follow.
    let mut f = good.clone();
    f[14] = 0x4f;
    frames.push(f);
    // Truncated TCP header: 10 of 20 bytes.
    let mut f = good.clone();
    f.truncate(14 + 20 + 10);
    frames.push(f);
    // IPv6 header cut short.
    let mut f = ethernet(dst, src, 0x86dd);
    f.extend_from_slice(&[0x60; 20]);
    frames.push(f);
    // Three VLAN tags.
    let mut f = ethernet(dst, src, 0x88a8);
    for next in [0x8100u16, 0x8100, 0x0800] {
        f.extend_from_slice(&[0, 10]);
        f.extend_from_slice(&next.to_be_bytes());
    }
    f.extend_from_slice(&good[14..]);
    frames.push(f);
    // IP version 5 in an IPv4 ethertype.
    let mut f = good;
    f[14] = 0x55;
    frames.push(f);
    frames
}

/// Fills in the IPv4 header and TCP checksums of an untagged IPv4 TCP frame,
/// for traffic the receiving stack must take as genuine.
pub fn with_ipv4_tcp_checksums(mut frame: Vec<u8>) -> Vec<u8> {
    let ip = 14;
    let ihl = usize::from(frame[ip] & 0x0f) * 4;
    let tcp = ip + ihl;
    set_ipv4_header_checksum(&mut frame);
    let segment_len = frame.len() - tcp;
    let mut pseudo = sum_words(&frame[ip + 12..ip + 20]);
    pseudo += 6 + segment_len as u32;
    set_tcp_checksum(&mut frame[tcp..], pseudo);
    frame
}

/// Fills in the TCP checksum of an untagged IPv6 frame whose TCP header
/// follows the IPv6 header or a chain of hop-by-hop, routing and destination options headers.
pub fn with_ipv6_tcp_checksum(mut frame: Vec<u8>) -> Vec<u8> {
    let ip = 14;
    let (mut next, mut tcp) = (frame[ip + 6], ip + 40);
    while matches!(next, 0 | 43 | 60) {
        next = frame[tcp];
        tcp += (usize::from(frame[tcp + 1]) + 1) * 8;
    }
    assert_eq!(next, 6, "no TCP header at the end of the chain");
    let segment_len = frame.len() - tcp;
    let mut pseudo = sum_words(&frame[ip + 8..ip + 40]);
    pseudo += sum_words(&(segment_len as u32).to_be_bytes()) + 6;
    set_tcp_checksum(&mut frame[tcp..], pseudo);
    frame
}

/// An untagged, unfragmented IPv4 frame as two fragments: the first carries
/// `first` octets of the IP payload (a multiple of 8), the second the rest.
pub fn ipv4_fragments(frame: &[u8], first: usize, id: u16) -> [Vec<u8>; 2] {
    assert_eq!(first % 8, 0, "fragment boundaries fall on 8 octets");
    let ip = 14;
    let ihl = usize::from(frame[ip] & 0x0f) * 4;
    let (head, payload) = frame.split_at(ip + ihl);
    let (part1, part2) = payload.split_at(first);
    let fragment = |part: &[u8], offset_units: u16, more: bool| {
        let mut f = head.to_vec();
        f[ip + 2..ip + 4].copy_from_slice(&((ihl + part.len()) as u16).to_be_bytes());
        f[ip + 4..ip + 6].copy_from_slice(&id.to_be_bytes());
        let flags_offset = offset_units | if more { 0x2000 } else { 0 };
        f[ip + 6..ip + 8].copy_from_slice(&flags_offset.to_be_bytes());
        f.extend_from_slice(part);
        set_ipv4_header_checksum(&mut f);
        f
    };
    [
        fragment(part1, 0, true),
        fragment(part2, (first / 8) as u16, false),
    ]
}

/// An untagged, unfragmented IPv6 frame as two fragments: everything after
/// the IPv6 header is fragmentable, the first fragment carries `first`
/// octets of it (a multiple of 8), the second the rest.
pub fn ipv6_fragments(frame: &[u8], first: usize, id: u32) -> [Vec<u8>; 2] {
    assert_eq!(first % 8, 0, "fragment boundaries fall on 8 octets");
    let ip = 14;
    let (head, payload) = frame.split_at(ip + 40);
    let (part1, part2) = payload.split_at(first);
    let fragment = |part: &[u8], offset: usize, more: bool| {
        let mut f = head.to_vec();
        f[ip + 4..ip + 6].copy_from_slice(&((8 + part.len()) as u16).to_be_bytes());
        f[ip + 6] = 44;
        let offset_more = (offset as u16) | u16::from(more);
        f.extend_from_slice(&[head[ip + 6], 0]);
        f.extend_from_slice(&offset_more.to_be_bytes());
        f.extend_from_slice(&id.to_be_bytes());
        f.extend_from_slice(part);
        f
    };
    [fragment(part1, 0, true), fragment(part2, first, false)]
}

fn set_ipv4_header_checksum(frame: &mut [u8]) {
    let ip = 14;
    let ihl = usize::from(frame[ip] & 0x0f) * 4;
    frame[ip + 10..ip + 12].copy_from_slice(&[0, 0]);
    let sum = checksum(&frame[ip..ip + ihl], 0);
    frame[ip + 10..ip + 12].copy_from_slice(&sum.to_be_bytes());
}

/// `segment` runs from the TCP header to the end of the frame; `pseudo` is the pseudo-header sum.
fn set_tcp_checksum(segment: &mut [u8], pseudo: u32) {
    segment[16..18].copy_from_slice(&[0, 0]);
    let sum = checksum(segment, pseudo);
    segment[16..18].copy_from_slice(&sum.to_be_bytes());
}

/// The sum of big-endian 16-bit words, not yet folded.
fn sum_words(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum()
}

/// The Internet checksum (RFC 1071) of `bytes`, starting from `sum`.
fn checksum(bytes: &[u8], mut sum: u32) -> u16 {
    for chunk in bytes.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
