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
    check_listable(net, text)
}

/// The rules beyond syntax: no IPv4-mapped prefixes, no host bits. `given`
/// is what the operator wrote, quoted back in the error.
fn check_listable(net: IpNet, given: &str) -> Result<IpNet, PrefixError> {
    if let IpNet::V6(v6) = net {
        if let Some(v4) = v6.addr().to_ipv4_mapped() {
            if v6.prefix_len() >= 96 {
                let suggestion = match v6.prefix_len() {
                    128 => v4.to_string(),
                    len => format!("{v4}/{}", len - 96),
                };
                return Err(PrefixError::Ipv4Mapped {
                    given: given.to_owned(),
                    suggestion,
                });
            }
        }
    }
    if net.trunc() != net {
        return Err(PrefixError::NonCanonical {
            given: given.to_owned(),
            canonical: net.trunc(),
        });
    }
    Ok(net)
}

/// A prefix that passed [`parse_prefix`]'s rules: what the control protocol
/// carries, so the daemon never sees an unchecked one. A string on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix(IpNet);

impl Prefix {
    pub fn net(self) -> IpNet {
        self.0
    }
}

impl TryFrom<IpNet> for Prefix {
    type Error = PrefixError;

    fn try_from(net: IpNet) -> Result<Prefix, PrefixError> {
        check_listable(net, &net.to_string()).map(Prefix)
    }
}

/// One host; an IPv4-mapped address becomes the IPv4 address it stands for.
impl From<IpAddr> for Prefix {
    fn from(addr: IpAddr) -> Prefix {
        Prefix(IpNet::from(addr.to_canonical()))
    }
}

impl std::str::FromStr for Prefix {
    type Err = PrefixError;

    fn from_str(text: &str) -> Result<Prefix, PrefixError> {
        parse_prefix(text).map(Prefix)
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl serde::Serialize for Prefix {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Prefix {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Prefix, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Prefix;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an IP address or canonical CIDR as a string")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Prefix, E> {
                text.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Visitor)
    }
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

    #[test]
    fn typed_prefix_applies_the_same_rules_on_every_path() {
        let wire = |text: &str| serde_json::from_value::<Prefix>(serde_json::json!(text));
        assert_eq!(wire("192.0.2.7").unwrap().to_string(), "192.0.2.7/32");
        for bad in ["192.0.2.7/24", "::ffff:192.0.2.1", "garbage", " 192.0.2.1"] {
            let err = wire(bad).unwrap_err().to_string();
            assert!(err.contains(bad.trim()), "{bad:?}: {err}");
        }
        assert!(serde_json::from_value::<Prefix>(serde_json::json!(7)).is_err());
        let net: IpNet = "192.0.2.7/24".parse().unwrap();
        assert!(matches!(
            Prefix::try_from(net),
            Err(PrefixError::NonCanonical { .. })
        ));
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(Prefix::from(mapped).to_string(), "192.0.2.1/32");
        let json = serde_json::to_string(&"2001:db8::/32".parse::<Prefix>().unwrap()).unwrap();
        assert_eq!(json, r#""2001:db8::/32""#);
    }
}
