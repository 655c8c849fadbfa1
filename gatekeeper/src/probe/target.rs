//! The probe's inputs, checked before anything is sent: every string here
//! ends up inside an SMTP command, so none may carry spaces or line breaks.

use std::net::IpAddr;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TargetError(pub String);

pub const DEFAULT_PORT: u16 = 25;

/// `HOST[:PORT]`: a name, an IPv4 address, `[IPv6]:PORT`, or a bare IPv6 address.
pub fn parse_host_port(text: &str) -> Result<(String, u16), TargetError> {
    let bad = |why: &str| TargetError(format!("target {text:?}: {why}"));
    if text.is_empty() {
        return Err(bad("empty"));
    }
    if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(|| bad("unclosed ["))?;
        host.parse::<std::net::Ipv6Addr>()
            .map_err(|_| bad("not an IPv6 address inside [ ]"))?;
        let port = match after {
            "" => DEFAULT_PORT,
            _ => parse_port(after.strip_prefix(':').ok_or_else(|| bad("junk after ]"))?)
                .ok_or_else(|| bad("bad port"))?,
        };
        return Ok((host.to_owned(), port));
    }
    if text.parse::<std::net::Ipv6Addr>().is_ok() {
        return Ok((text.to_owned(), DEFAULT_PORT));
    }
    let (host, port) = match text.rsplit_once(':') {
        Some((host, port)) => (host, parse_port(port).ok_or_else(|| bad("bad port"))?),
        None => (text, DEFAULT_PORT),
    };
    if host.parse::<IpAddr>().is_err() && !is_domain(host) {
        return Err(bad("not a host name or address"));
    }
    Ok((host.to_owned(), port))
}

fn parse_port(text: &str) -> Option<u16> {
    text.parse().ok().filter(|&p| p != 0)
}

/// LDH labels of 1..=63 octets, 253 in all; a trailing dot is allowed.
pub fn is_domain(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Lower case, one trailing dot dropped: the form names are compared in.
pub fn normal_domain(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// A local part or address we put between angle brackets: printable ASCII,
/// no space, no brackets.
pub fn check_path_text(what: &str, text: &str) -> Result<(), TargetError> {
    if text.len() > 254
        || text
            .bytes()
            .any(|b| !b.is_ascii_graphic() || b == b'<' || b == b'>')
    {
        return Err(TargetError(format!(
            "{what} {text:?}: printable ASCII without spaces or angle brackets, at most 254 octets"
        )));
    }
    Ok(())
}

pub fn check_domain(what: &str, text: &str) -> Result<(), TargetError> {
    if !is_domain(text) {
        return Err(TargetError(format!("{what} {text:?} is not a domain name")));
    }
    Ok(())
}

/// The default local domain: the banner's host name without its first label
/// (`220 mx.example.org ESMTP` → `example.org`), or the name itself when it
/// has only two labels. `None` when the banner names no host.
pub fn domain_from_banner(first_line: &str) -> Option<String> {
    let host = first_line.split_whitespace().next()?;
    let host = host.strip_suffix('.').unwrap_or(host);
    if !is_domain(host) || host.parse::<IpAddr>().is_ok() || !host.contains('.') {
        return None;
    }
    let labels: Vec<&str> = host.split('.').collect();
    let domain = if labels.len() > 2 {
        labels[1..].join(".")
    } else {
        host.to_owned()
    };
    Some(domain.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port() {
        let ok = |t: &str| parse_host_port(t).unwrap();
        assert_eq!(ok("mx.example.org"), ("mx.example.org".into(), 25));
        assert_eq!(ok("mx.example.org:2525"), ("mx.example.org".into(), 2525));
        assert_eq!(ok("192.0.2.1:587"), ("192.0.2.1".into(), 587));
        assert_eq!(ok("[2001:db8::1]:26"), ("2001:db8::1".into(), 26));
        assert_eq!(ok("[2001:db8::1]"), ("2001:db8::1".into(), 25));
        assert_eq!(ok("2001:db8::1"), ("2001:db8::1".into(), 25));
        for bad in [
            "",
            "mx:0",
            "mx:99999",
            "mx:x",
            "[2001:db8::1",
            "[x]:25",
            "a b",
            "mx\r\n:25",
            "[::1]x",
        ] {
            assert!(parse_host_port(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn inputs_cannot_inject_commands() {
        assert!(check_path_text("user", "postmaster").is_ok());
        assert!(check_path_text("sender", "a@b.test").is_ok());
        for bad in ["a b", "a\r\nRCPT TO:<x@y>", "a>", "<a"] {
            assert!(check_path_text("user", bad).is_err(), "{bad:?}");
        }
        assert!(check_domain("victim", "relay-test.invalid").is_ok());
        assert!(check_domain("victim", "relay test.invalid").is_err());
        assert!(check_domain("victim", "x\r\n").is_err());
        assert!(check_domain("victim", "-a.test").is_err());
    }

    #[test]
    fn local_domain_from_the_banner() {
        assert_eq!(
            domain_from_banner("mx.example.org ESMTP Postfix").as_deref(),
            Some("example.org")
        );
        assert_eq!(
            domain_from_banner("Example.ORG ESMTP").as_deref(),
            Some("example.org")
        );
        assert_eq!(domain_from_banner("ESMTP ready"), None);
        assert_eq!(domain_from_banner("192.0.2.1 ESMTP"), None);
        assert_eq!(domain_from_banner(""), None);
    }
}
