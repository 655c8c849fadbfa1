//! Client address handling shared by the fast path, the DNSBL engine and the
//! SMTP front end: one canonical form, and the unit a per-client limit counts.

use std::net::IpAddr;

use ipnet::IpNet;

/// IPv4-mapped IPv6 clients (dual-stack sockets) are judged as IPv4.
pub fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(addr),
        v4 => v4,
    }
}

/// The network one client is taken to control: its /32 for IPv4, its
/// `/ipv6_prefix` for IPv6 (a single host is routinely given a whole /64, so
/// counting /128s would let it take every slot).
pub fn client_group(addr: IpAddr, ipv6_prefix: u8) -> IpNet {
    let addr = canonical(addr);
    let len = match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => ipv6_prefix.min(128),
    };
    IpNet::new(addr, len)
        .expect("prefix length within the family's range")
        .trunc()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_ipv6_by_prefix_and_ipv4_by_address() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        assert_eq!(client_group(ip("192.0.2.7"), 64), net("192.0.2.7/32"));
        assert_eq!(
            client_group(ip("::ffff:192.0.2.7"), 64),
            net("192.0.2.7/32")
        );
        assert_eq!(
            client_group(ip("2001:db8:1:2:3:4:5:6"), 64),
            net("2001:db8:1:2::/64")
        );
        assert_eq!(
            client_group(ip("2001:db8:1:2:3:4:5:6"), 48),
            net("2001:db8:1::/48")
        );
        assert_eq!(client_group(ip("2001:db8::1"), 128), net("2001:db8::1/128"));
    }
}
