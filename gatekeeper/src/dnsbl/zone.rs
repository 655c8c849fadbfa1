//! `zones` entries in Postfix postscreen syntax: `zone[=filter][*weight]`.
//!
//! Pure parsing, so every spelling can be table-tested.

use std::fmt;
use std::net::Ipv4Addr;

/// One configured DNSBL/DNSWL zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneSpec {
    /// Lower-case zone name without a trailing dot.
    pub name: String,
    /// Which reply addresses count as a listing; `None`: 127.0.0.2–127.0.0.254.
    pub filter: Option<ReplyFilter>,
    /// Added to the client's score when listed; negative for allowlists.
    pub weight: i32,
}

/// A reply address pattern, one set of allowed values per octet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyFilter {
    octets: [OctetSet; 4],
}

/// Inclusive ranges; a plain number is a one-value range.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct OctetSet(Vec<(u8, u8)>);

impl ReplyFilter {
    pub fn matches(&self, reply: Ipv4Addr) -> bool {
        self.octets
            .iter()
            .zip(reply.octets())
            .all(|(set, octet)| set.0.iter().any(|&(lo, hi)| lo <= octet && octet <= hi))
    }
}

impl ZoneSpec {
    /// Parses one `zones` entry; the error says what is wrong, the caller names the entry.
    pub fn parse(text: &str) -> Result<ZoneSpec, String> {
        let text = text.trim();
        let (rest, weight) = match text.rsplit_once('*') {
            Some((rest, weight)) => {
                let weight = weight
                    .parse::<i32>()
                    .map_err(|_| format!("weight `{weight}` is not an integer"))?;
                if weight == 0 {
                    return Err("weight 0 makes the zone meaningless".into());
                }
                (rest, weight)
            }
            None => (text, 1),
        };
        let (name, filter) = match rest.split_once('=') {
            Some((name, filter)) => (name, Some(parse_filter(filter)?)),
            None => (rest, None),
        };
        let name = parse_zone_name(name)?;
        Ok(ZoneSpec {
            name,
            filter,
            weight,
        })
    }
}

fn parse_zone_name(name: &str) -> Result<String, String> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    if name.is_empty() {
        return Err("zone name is empty".into());
    }
    // A query name adds at most 64 octets (32 nibbles and their dots) to the zone.
    if name.len() > 253 - 64 {
        return Err(format!("zone name `{name}` is too long"));
    }
    for label in name.split('.') {
        let valid_chars = label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if label.is_empty() || label.len() > 63 || !valid_chars {
            return Err(format!("zone name `{name}` is not a valid DNS name"));
        }
    }
    if !name.contains('.') {
        return Err(format!("zone name `{name}` needs at least two labels"));
    }
    Ok(name)
}

fn parse_filter(filter: &str) -> Result<ReplyFilter, String> {
    let parts = split_octets(filter);
    if parts.len() != 4 {
        return Err(format!(
            "filter `{filter}` must have four octets, e.g. 127.0.0.[2..11]"
        ));
    }
    let mut octets: [OctetSet; 4] = Default::default();
    for (slot, part) in octets.iter_mut().zip(&parts) {
        *slot = parse_octet(part).map_err(|e| format!("filter `{filter}`: {e}"))?;
    }
    Ok(ReplyFilter { octets })
}

/// Splits at dots outside `[...]`, where `..` marks a range.
fn split_octets(filter: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in filter.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            '.' if depth == 0 => {
                parts.push(&filter[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&filter[start..]);
    parts
}

fn parse_octet(part: &str) -> Result<OctetSet, String> {
    let number = |s: &str| {
        s.trim()
            .parse::<u8>()
            .map_err(|_| format!("`{s}` is not a number from 0 to 255"))
    };
    let Some(inner) = part.strip_prefix('[') else {
        let value = number(part)?;
        return Ok(OctetSet(vec![(value, value)]));
    };
    let inner = inner
        .strip_suffix(']')
        .ok_or_else(|| format!("`{part}` lacks its closing ]"))?;
    let mut ranges = Vec::new();
    for item in inner.split(';') {
        let range = match item.split_once("..") {
            Some((lo, hi)) => {
                let (lo, hi) = (number(lo)?, number(hi)?);
                if lo > hi {
                    return Err(format!("range `{item}` runs backwards"));
                }
                (lo, hi)
            }
            None => {
                let value = number(item)?;
                (value, value)
            }
        };
        ranges.push(range);
    }
    Ok(OctetSet(ranges))
}

impl fmt::Display for ZoneSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        if let Some(filter) = &self.filter {
            write!(f, "={filter}")?;
        }
        if self.weight != 1 {
            write!(f, "*{}", self.weight)?;
        }
        Ok(())
    }
}

impl fmt::Display for ReplyFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, set) in self.octets.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            match set.0.as_slice() {
                [(lo, hi)] if lo == hi => write!(f, "{lo}")?,
                ranges => {
                    let items: Vec<String> = ranges
                        .iter()
                        .map(|(lo, hi)| {
                            if lo == hi {
                                lo.to_string()
                            } else {
                                format!("{lo}..{hi}")
                            }
                        })
                        .collect();
                    write!(f, "[{}]", items.join(";"))?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_postscreen_spellings() {
        let zen = ZoneSpec::parse("zen.spamhaus.org=127.0.0.[2..11]*3").unwrap();
        assert_eq!(zen.name, "zen.spamhaus.org");
        assert_eq!(zen.weight, 3);
        let filter = zen.filter.as_ref().unwrap();
        assert!(filter.matches(ip("127.0.0.2")) && filter.matches(ip("127.0.0.11")));
        assert!(!filter.matches(ip("127.0.0.1")) && !filter.matches(ip("127.0.0.12")));

        let dnswl = ZoneSpec::parse("list.dnswl.org=127.0.[0..255].[1..3]*-2").unwrap();
        assert_eq!(dnswl.weight, -2);
        let filter = dnswl.filter.as_ref().unwrap();
        assert!(filter.matches(ip("127.0.15.3")));
        assert!(!filter.matches(ip("127.0.15.0")) && !filter.matches(ip("127.0.0.255")));

        let lists = ZoneSpec::parse("b.example.net=127.0.0.[2;4;6..7]").unwrap();
        let filter = lists.filter.as_ref().unwrap();
        for (reply, expected) in [
            ("127.0.0.2", true),
            ("127.0.0.3", false),
            ("127.0.0.7", true),
        ] {
            assert_eq!(filter.matches(ip(reply)), expected, "{reply}");
        }

        let plain = ZoneSpec::parse("Bl.Example.NET.").unwrap();
        assert_eq!(
            (plain.name.as_str(), plain.weight, plain.filter),
            ("bl.example.net", 1, None)
        );
    }

    #[test]
    fn displays_back_to_its_spelling() {
        for text in [
            "zen.spamhaus.org=127.0.0.[2..11]*3",
            "list.dnswl.org=127.0.[0..255].[1..3]*-2",
            "b.example.net=127.0.0.[2;4]",
            "bl.example.net",
        ] {
            assert_eq!(ZoneSpec::parse(text).unwrap().to_string(), text);
        }
    }

    #[test]
    fn refuses_bad_entries() {
        for text in [
            "",
            "zen",
            "zen.spamhaus.org*x",
            "zen.spamhaus.org*0",
            "zen.spamhaus.org=127.0.0",
            "zen.spamhaus.org=127.0.0.[2..11",
            "zen.spamhaus.org=127.0.0.[11..2]",
            "zen.spamhaus.org=127.0.0.256",
            "bad zone.example.org",
            "a..b.org",
        ] {
            assert!(ZoneSpec::parse(text).is_err(), "{text:?} accepted");
        }
    }
}
