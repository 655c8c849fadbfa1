//! RFC 5782 query names and the meaning of a zone's A records. Pure.

use std::fmt::Write;
use std::net::{IpAddr, Ipv4Addr};

use super::zone::ZoneSpec;
use crate::netaddr::canonical;

/// `d.c.b.a.zone.` for IPv4, 32 reversed nibbles for IPv6; IPv4-mapped IPv6 is asked as IPv4.
/// The trailing dot keeps resolver search domains out of it.
pub fn query_name(client: IpAddr, zone: &str) -> String {
    let mut name = String::with_capacity(72 + zone.len());
    match canonical(client) {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            let _ = write!(name, "{d}.{c}.{b}.{a}.");
        }
        IpAddr::V6(v6) => {
            for byte in v6.octets().iter().rev() {
                let _ = write!(name, "{:x}.{:x}.", byte & 0x0f, byte >> 4);
            }
        }
    }
    name.push_str(zone);
    name.push('.');
    name
}

/// What a zone's A records say about a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Classified {
    /// Reply codes that match the zone's filter (never empty).
    Listed(Vec<Ipv4Addr>),
    /// Records exist but none counts as a listing.
    NotListed,
    /// The zone answered with an error code instead of a verdict.
    Error {
        code: Ipv4Addr,
        meaning: &'static str,
    },
}

/// An error code anywhere in the answer makes the whole answer untrustworthy.
pub fn classify(zone: &ZoneSpec, codes: &[Ipv4Addr]) -> Classified {
    if let Some((code, meaning)) = codes
        .iter()
        .find_map(|&code| error_meaning(code).map(|m| (code, m)))
    {
        return Classified::Error { code, meaning };
    }
    let listed: Vec<Ipv4Addr> = codes
        .iter()
        .copied()
        .filter(|&code| match &zone.filter {
            Some(filter) => filter.matches(code),
            None => is_plain_listing(code),
        })
        .collect();
    if listed.is_empty() {
        Classified::NotListed
    } else {
        Classified::Listed(listed)
    }
}

/// Without a filter only 127.0.0.2–127.0.0.254 count, so a refusing zone cannot list the world.
fn is_plain_listing(code: Ipv4Addr) -> bool {
    let [a, b, c, d] = code.octets();
    (a, b, c) == (127, 0, 0) && (2..=254).contains(&d)
}

/// Reply codes that are not verdicts, with what they mean.
pub fn error_meaning(code: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, d] = code.octets();
    if a != 127 {
        return Some(
            "answer outside 127.0.0.0/8: not a DNSBL reply (wildcarded or hijacked zone?)",
        );
    }
    match (b, c, d) {
        (255, 255, 252) => Some("typo in the DNSBL zone name"),
        (255, 255, 254) => Some("queried through a public or open resolver"),
        (255, 255, 255) => Some("excessive number of queries (over quota)"),
        (255, 255, _) => Some("error code from the DNSBL"),
        (0, 0, 255) => Some("service refused (e.g. DNSWL over quota)"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone(text: &str) -> ZoneSpec {
        ZoneSpec::parse(text).unwrap()
    }
    fn codes(list: &[&str]) -> Vec<Ipv4Addr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn query_names_follow_rfc_5782() {
        let v4: IpAddr = "192.0.2.99".parse().unwrap();
        assert_eq!(
            query_name(v4, "bl.example.org"),
            "99.2.0.192.bl.example.org."
        );
        let v6: IpAddr = "2001:db8:1:2:3:4:567:89ab".parse().unwrap();
        assert_eq!(
            query_name(v6, "bl.example.org"),
            "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.bl.example.org."
        );
        let mapped: IpAddr = "::ffff:192.0.2.99".parse().unwrap();
        assert_eq!(
            query_name(mapped, "bl.example.org"),
            "99.2.0.192.bl.example.org."
        );
    }

    #[test]
    fn unfiltered_zone_counts_only_127_0_0_2_to_254() {
        let bl = zone("bl.example.org");
        assert_eq!(
            classify(&bl, &codes(&["127.0.0.2", "127.0.0.4"])),
            Classified::Listed(codes(&["127.0.0.2", "127.0.0.4"]))
        );
        for not_listed in ["127.0.0.1", "127.0.1.2", "127.0.10.0"] {
            assert_eq!(
                classify(&bl, &codes(&[not_listed])),
                Classified::NotListed,
                "{not_listed}"
            );
        }
    }

    #[test]
    fn error_codes_never_list() {
        let bl = zone("bl.example.org");
        let allow = zone("list.dnswl.org=127.0.[0..255].[0..255]*-2");
        for code in [
            "127.255.255.252",
            "127.255.255.254",
            "127.255.255.255",
            "127.0.0.255",
            "10.0.0.1",
        ] {
            for z in [&bl, &allow] {
                assert!(
                    matches!(classify(z, &codes(&[code])), Classified::Error { .. }),
                    "{code} for {}",
                    z.name
                );
            }
            // An error beside a listing still spoils the whole answer.
            assert!(matches!(
                classify(&bl, &codes(&["127.0.0.2", code])),
                Classified::Error { .. }
            ));
        }
    }

    #[test]
    fn filters_select_the_counted_codes() {
        let zen = zone("zen.spamhaus.org=127.0.0.[2..11]*3");
        assert_eq!(
            classify(&zen, &codes(&["127.0.0.10", "127.0.0.20"])),
            Classified::Listed(codes(&["127.0.0.10"]))
        );
        assert_eq!(
            classify(&zen, &codes(&["127.0.0.20"])),
            Classified::NotListed
        );
    }
}
