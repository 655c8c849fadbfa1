//! Strict parsing of the prefixes operators type or import.

use std::net::IpAddr;

use ipnet::IpNet;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    #[error("invalid prefix '{0}': expected an IPv4/IPv6 address or CIDR such as 192.0.2.0/24")]
    Syntax(String),
    #[error("non-canonical CIDR '{given}': host bits are set; did you mean {canonical}?")]
    NonCanonical { given: String, canonical: IpNet },
    #[error("IPv4-mapped address '{given}' never appears on the wire; use {suggestion}")]
    Ipv4Mapped { given: String, suggestion: String },
}

/// Parses `192.0.2.7`, `192.0.2.0/24`, `2001:db8::/32`...
///
/// A bare address is a full-length prefix. CIDRs with host bits set are
/// refused rather than truncated: `192.0.2.7/24` is more often a typo for
/// `/32` than a request to list 256 addresses.
pub fn parse_prefix(text: &str) -> Result<IpNet, PrefixError> {
    let net = if text.contains('/') {
        text.parse::<IpNet>()
            .map_err(|_| PrefixError::Syntax(text.to_owned()))?
    } else {
        let addr = text
            .parse::<IpAddr>()
            .map_err(|_| PrefixError::Syntax(text.to_owned()))?;
        IpNet::from(addr)
    };
    if let IpNet::V6(v6) = net {
        if let Some(v4) = v6.addr().to_ipv4_mapped() {
            if v6.prefix_len() >= 96 {
                let suggestion = match v6.prefix_len() {
                    128 => v4.to_string(),
                    len => format!("{v4}/{}", len - 96),
                };
                return Err(PrefixError::Ipv4Mapped {
                    given: text.to_owned(),
                    suggestion,
                });
            }
        }
    }
    if net.trunc() != net {
        return Err(PrefixError::NonCanonical {
            given: text.to_owned(),
            canonical: net.trunc(),
        });
    }
    Ok(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_addresses_and_canonical_cidrs() {
        for (text, expected) in [
            ("192.0.2.7", "192.0.2.7/32"),
            ("192.0.2.0/24", "192.0.2.0/24"),
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("2001:db8::1", "2001:db8::1/128"),
            ("2001:db8:1::/64", "2001:db8:1::/64"),
            ("2001:DB8::/32", "2001:db8::/32"),
        ] {
            assert_eq!(parse_prefix(text).unwrap().to_string(), expected, "{text}");
        }
    }

    #[test]
    fn refuses_non_canonical_with_suggestion() {
        let err = parse_prefix("192.0.2.7/24").unwrap_err();
        assert!(
            err.to_string().contains("did you mean 192.0.2.0/24"),
            "{err}"
        );
        let err = parse_prefix("2001:db8::1/64").unwrap_err();
        assert!(err.to_string().contains("2001:db8::/64"), "{err}");
    }

    #[test]
    fn refuses_garbage() {
        for text in [
            "",
            "foo",
            "192.0.2",
            "192.0.2.0/33",
            "192.0.2.0/",
            "/24",
            "2001:db8::/129",
            " 192.0.2.1",
            "192.0.2.1 ",
            "192.0.2.256",
            "192.0.2.0/24/8",
            "1.2.3.4/-1",
        ] {
            assert!(
                matches!(parse_prefix(text), Err(PrefixError::Syntax(_))),
                "{text:?} accepted"
            );
        }
    }

    #[test]
    fn refuses_ipv4_mapped() {
        let err = parse_prefix("::ffff:192.0.2.1").unwrap_err();
        assert!(err.to_string().contains("use 192.0.2.1"), "{err}");
        let err = parse_prefix("::ffff:192.0.2.0/120").unwrap_err();
        assert!(err.to_string().contains("use 192.0.2.0/24"), "{err}");
    }
}
