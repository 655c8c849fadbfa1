//! HELO/EHLO checks for outside clients (Lotus `SMTPMTA_HELO_DOMAIN_VERIFY`):
//! a name that claims to be us is a forgery, and with `helo_require_fqdn`
//! a bare host name is refused. The name already passed the syntax check.

use std::net::IpAddr;

use crate::netaddr::canonical;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeloProblem {
    /// Our host name, one of our domains, or a literal of our own address.
    ClaimsUs,
    NotFqdn,
}

impl HeloProblem {
    pub fn name(self) -> &'static str {
        match self {
            HeloProblem::ClaimsUs => "claims_us",
            HeloProblem::NotFqdn => "not_fqdn",
        }
    }
}

/// What a greeting must not claim: lower-case names without trailing dot.
#[derive(Debug, Clone, Default)]
pub struct OurNames {
    pub names: Vec<String>,
    pub addresses: Vec<IpAddr>,
}

impl OurNames {
    pub fn new(hostname: &str, local_domains: &[String], addresses: Vec<IpAddr>) -> OurNames {
        let normal = |s: &str| {
            let s = s.trim().to_ascii_lowercase();
            s.strip_suffix('.').unwrap_or(&s).to_owned()
        };
        let mut names = vec![normal(hostname)];
        // `.example.org` entries name subdomains, not a domain of ours.
        names.extend(
            local_domains
                .iter()
                .filter(|d| !d.starts_with('.'))
                .map(|d| normal(d)),
        );
        OurNames {
            names,
            addresses: addresses.into_iter().map(canonical).collect(),
        }
    }

    /// Judges `helo` (as [`super::parse::parse_helo_name`] returned it)
    /// from a client that is not ours; `local` is the address it connected to.
    pub fn judge(
        &self,
        helo: &str,
        local: Option<IpAddr>,
        require_fqdn: bool,
    ) -> Option<HeloProblem> {
        if let Some(inner) = helo.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            let inner = inner.strip_prefix("IPv6:").unwrap_or(inner);
            let claims = inner.parse::<IpAddr>().is_ok_and(|ip| {
                let ip = canonical(ip);
                self.addresses.contains(&ip) || local.map(canonical) == Some(ip)
            });
            return claims.then_some(HeloProblem::ClaimsUs);
        }
        let name = helo.to_ascii_lowercase();
        let name = name.strip_suffix('.').unwrap_or(&name);
        if self.names.iter().any(|n| n == name) {
            return Some(HeloProblem::ClaimsUs);
        }
        let fqdn = name.contains('.')
            && name
                .rsplit('.')
                .next()
                .is_some_and(|tld| tld.bytes().any(|b| b.is_ascii_alphabetic()));
        (require_fqdn && !fqdn).then_some(HeloProblem::NotFqdn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours() -> OurNames {
        OurNames::new(
            "MX.example.org",
            &["example.org".into(), ".sub.example.net".into()],
            vec!["192.0.2.1".parse().unwrap(), "2001:db8::1".parse().unwrap()],
        )
    }

    #[test]
    fn names_and_literals_of_ours_are_forgeries() {
        let ours = ours();
        let local = Some("198.51.100.25".parse().unwrap());
        for helo in [
            "mx.example.org",
            "MX.EXAMPLE.ORG.",
            "example.org",
            "[192.0.2.1]",
            "[IPv6:2001:db8::1]",
            "[198.51.100.25]",
        ] {
            assert_eq!(
                ours.judge(helo, local, false),
                Some(HeloProblem::ClaimsUs),
                "{helo}"
            );
        }
        for helo in [
            "client.test",
            "sub.example.net",
            "a.sub.example.net",
            "mx.example.org.victim.test",
            "[192.0.2.99]",
            "[IPv6:2001:db8::99]",
        ] {
            assert_eq!(ours.judge(helo, local, false), None, "{helo}");
        }
    }

    #[test]
    fn fqdn_is_required_only_when_asked() {
        let ours = ours();
        assert_eq!(ours.judge("desktop-4f2k", None, false), None);
        assert_eq!(
            ours.judge("desktop-4f2k", None, true),
            Some(HeloProblem::NotFqdn)
        );
        assert_eq!(
            ours.judge("host.192", None, true),
            Some(HeloProblem::NotFqdn)
        );
        assert_eq!(ours.judge("host.client.test", None, true), None);
        assert_eq!(ours.judge("[192.0.2.99]", None, true), None);
    }
}
