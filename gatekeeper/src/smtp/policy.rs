//! The relay decision: is this recipient ours, and if not, may this client relay?
//!
//! Pure and table-tested. A recipient is local only if every test passes;
//! anything else is relay, which only `relay_networks` clients may do. The
//! sender never matters: a forged local sender gains nothing.

use std::net::IpAddr;

use ipnet::IpNet;

use super::parse::{Domain, Path};
use crate::netaddr::canonical;

/// Why a recipient is not local. The names are the stats keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RelayReason {
    ForeignDomain,
    PercentHack,
    BangPath,
    EmbeddedAt,
    SourceRoute,
    AddressLiteral,
    NoDomain,
}

impl RelayReason {
    pub const ALL: [RelayReason; 7] = [
        RelayReason::ForeignDomain,
        RelayReason::PercentHack,
        RelayReason::BangPath,
        RelayReason::EmbeddedAt,
        RelayReason::SourceRoute,
        RelayReason::AddressLiteral,
        RelayReason::NoDomain,
    ];

    pub fn name(self) -> &'static str {
        match self {
            RelayReason::ForeignDomain => "foreign_domain",
            RelayReason::PercentHack => "percent_hack",
            RelayReason::BangPath => "bang_path",
            RelayReason::EmbeddedAt => "embedded_at",
            RelayReason::SourceRoute => "source_route",
            RelayReason::AddressLiteral => "address_literal",
            RelayReason::NoDomain => "no_domain",
        }
    }
}

/// What the operator declared ours.
#[derive(Debug, Clone, Default)]
pub struct RelayPolicy {
    /// Exact domains, lower-case, no trailing dot.
    exact: Vec<String>,
    /// From `.example.org` entries: matches strict subdomains only.
    parents: Vec<String>,
    relay_networks: Vec<IpNet>,
    /// Address literals that name us (only if the operator allowed them).
    own_literals: Vec<IpAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Local,
    /// Not local, but the client is in `relay_networks`.
    Relay,
    Refuse(RelayReason),
}

impl RelayPolicy {
    pub fn new(
        local_domains: &[String],
        relay_networks: Vec<IpNet>,
        own_literals: Vec<IpAddr>,
    ) -> RelayPolicy {
        let mut policy = RelayPolicy {
            relay_networks,
            own_literals,
            ..Default::default()
        };
        for domain in local_domains {
            // U-labels and A-labels alike become A-labels, as recipients do
            // (the config check refused any that cannot).
            let domain = domain.trim();
            let (parent, name) = match domain.strip_prefix('.') {
                Some(rest) => (true, rest),
                None => (false, domain),
            };
            let name =
                super::idn::canonical_domain(name).unwrap_or_else(|_| name.to_ascii_lowercase());
            let name = name.strip_suffix('.').unwrap_or(&name).to_owned();
            if parent {
                policy.parents.push(name);
            } else {
                policy.exact.push(name);
            }
        }
        policy
    }

    pub fn may_relay(&self, client: IpAddr) -> bool {
        let client = canonical(client);
        self.relay_networks.iter().any(|net| net.contains(&client))
    }

    /// Whether `net` holds any relay network (so banning it would ban one).
    pub fn overlaps_relay_networks(&self, net: &IpNet) -> bool {
        self.relay_networks
            .iter()
            .any(|relay| net.contains(relay) || relay.contains(net))
    }

    /// Why `path` is not one of our mailboxes, or `None` when it is.
    pub fn classify(&self, path: &Path) -> Option<RelayReason> {
        if !path.source_route.is_empty() {
            return Some(RelayReason::SourceRoute);
        }
        let local = &path.local_part;
        if local.contains('@') {
            return Some(RelayReason::EmbeddedAt);
        }
        if local.contains('%') {
            return Some(RelayReason::PercentHack);
        }
        if local.contains('!') {
            return Some(RelayReason::BangPath);
        }
        match &path.domain {
            // RFC 5321 §4.5.1: <postmaster> without a domain must be accepted.
            None if local.eq_ignore_ascii_case("postmaster") => None,
            None => Some(RelayReason::NoDomain),
            Some(Domain::Literal(addr)) if self.own_literals.contains(&canonical(*addr)) => None,
            Some(Domain::Literal(_) | Domain::GeneralLiteral(_)) => {
                Some(RelayReason::AddressLiteral)
            }
            Some(Domain::Name(name)) if self.is_local_domain(name) => None,
            Some(Domain::Name(_)) => Some(RelayReason::ForeignDomain),
        }
    }

    pub fn decide(&self, path: &Path, client: IpAddr) -> Decision {
        self.decide_for(path, self.may_relay(client))
    }

    /// As [`Self::decide`], for a client whose right to relay is known
    /// (relay networks, a relay grant, an authenticated session).
    pub fn decide_for(&self, path: &Path, may_relay: bool) -> Decision {
        match self.classify(path) {
            None => Decision::Local,
            Some(_) if may_relay => Decision::Relay,
            Some(reason) => Decision::Refuse(reason),
        }
    }

    fn is_local_domain(&self, name: &str) -> bool {
        self.exact.iter().any(|d| d == name)
            || self.parents.iter().any(|p| {
                name.len() > p.len() + 1
                    && name.ends_with(p.as_str())
                    && name[..name.len() - p.len()].ends_with('.')
            })
    }
}

#[cfg(test)]
mod tests {
    use super::super::parse::{parse_command, Command};
    use super::*;

    fn policy() -> RelayPolicy {
        RelayPolicy::new(
            &[
                "example.org".into(),
                ".sub.example.net".into(),
                "Mixed.Example.".into(),
            ],
            vec!["192.0.2.0/24".parse().unwrap()],
            vec!["198.51.100.25".parse().unwrap()],
        )
    }

    fn path(addr: &str) -> Path {
        match parse_command(format!("RCPT TO:{addr}").as_bytes()) {
            Ok(Command::Rcpt { to, .. }) => to,
            other => panic!("{addr}: {other:?}"),
        }
    }

    #[test]
    fn relay_table() {
        use RelayReason::*;
        let cases: &[(&str, Option<RelayReason>)] = &[
            ("<user@example.org>", None),
            ("<USER@EXAMPLE.ORG.>", None),
            ("<user@mixed.example>", None),
            ("<user@a.sub.example.net>", None),
            ("<user@sub.example.net>", Some(ForeignDomain)),
            ("<user@example.org.victim.test>", Some(ForeignDomain)),
            ("<user@notexample.org>", Some(ForeignDomain)),
            ("<user@victim.test>", Some(ForeignDomain)),
            ("user@victim.test", Some(ForeignDomain)),
            ("<user@192.0.2.1>", Some(ForeignDomain)),
            ("<user%victim.test@example.org>", Some(PercentHack)),
            ("<\"user%victim.test\"@example.org>", Some(PercentHack)),
            ("<\"user\\%victim.test\"@example.org>", Some(PercentHack)),
            ("<victim.test!user@example.org>", Some(BangPath)),
            ("<\"victim.test!user\"@example.org>", Some(BangPath)),
            ("<victim.test!user>", Some(BangPath)),
            ("<\"user@victim.test\"@example.org>", Some(EmbeddedAt)),
            ("<user@victim.test@example.org>", Some(EmbeddedAt)),
            ("<\"user\\@victim.test\"@example.org>", Some(EmbeddedAt)),
            ("<@example.org:user@victim.test>", Some(SourceRoute)),
            (
                "<@example.org,@example.org:user@example.org>",
                Some(SourceRoute),
            ),
            ("<user@[192.0.2.99]>", Some(AddressLiteral)),
            ("<user@[IPv6:2001:db8::25]>", Some(AddressLiteral)),
            ("<user@[198.51.100.25]>", None),
            ("<postmaster>", None),
            ("<PostMaster>", None),
            ("<user>", Some(NoDomain)),
        ];
        let policy = policy();
        for (addr, expected) in cases {
            assert_eq!(policy.classify(&path(addr)), *expected, "{addr}");
        }
    }

    #[test]
    fn relay_networks_may_relay_outsiders_may_not() {
        let policy = policy();
        let foreign = path("<user@victim.test>");
        assert_eq!(
            policy.decide(&foreign, "192.0.2.7".parse().unwrap()),
            Decision::Relay
        );
        assert_eq!(
            policy.decide(&foreign, "::ffff:192.0.2.7".parse().unwrap()),
            Decision::Relay
        );
        assert_eq!(
            policy.decide(&foreign, "203.0.113.5".parse().unwrap()),
            Decision::Refuse(RelayReason::ForeignDomain)
        );
        assert_eq!(
            policy.decide(&path("<user@example.org>"), "203.0.113.5".parse().unwrap()),
            Decision::Local
        );
    }
}
