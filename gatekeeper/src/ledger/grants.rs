//! Relay grants (POP-before-SMTP): an address that just logged in to the
//! IMAP/POP server may relay for a while. Exact addresses only: a grant for
//! a whole /64 would let the neighbours of a roaming user relay too.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::netaddr::canonical;

/// The default lifetime of `relay grant` without `--ttl`.
pub const DEFAULT_GRANT_SECS: u64 = 30 * 60;
/// Grants held at once; a login hook gone wild gets an error, not an unbounded table.
pub const MAX_GRANTS: usize = 100_000;

/// One grant, unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub added: u64,
    pub expires: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    #[error("{0} holds no relay grant")]
    NotGranted(IpAddr),
    #[error("{MAX_GRANTS} relay grants are held already; revoke some or wait for them to expire")]
    Full,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grants {
    grants: BTreeMap<IpAddr, Grant>,
}

impl Grants {
    /// Grants (or renews: the later expiry wins, so a fresh login never
    /// shortens a grant) relay to `ip` until `expires`.
    pub fn grant(&mut self, ip: IpAddr, now: u64, expires: u64) -> Result<Grant, GrantError> {
        let ip = canonical(ip);
        self.sweep(now);
        if !self.grants.contains_key(&ip) && self.grants.len() >= MAX_GRANTS {
            return Err(GrantError::Full);
        }
        let grant = self.grants.entry(ip).or_insert(Grant {
            added: now,
            expires,
        });
        grant.expires = grant.expires.max(expires);
        Ok(*grant)
    }

    pub fn revoke(&mut self, ip: IpAddr, now: u64) -> Result<(), GrantError> {
        let ip = canonical(ip);
        match self.grants.remove(&ip) {
            Some(g) if g.expires > now => Ok(()),
            _ => Err(GrantError::NotGranted(ip)),
        }
    }

    pub fn is_granted(&self, ip: IpAddr, now: u64) -> bool {
        self.grants
            .get(&canonical(ip))
            .is_some_and(|g| g.expires > now)
    }

    pub fn live(&self, now: u64) -> Vec<(IpAddr, Grant)> {
        self.grants
            .iter()
            .filter(|(_, g)| g.expires > now)
            .map(|(ip, g)| (*ip, *g))
            .collect()
    }

    /// Drops expired grants; returns whether any went.
    pub fn sweep(&mut self, now: u64) -> bool {
        let before = self.grants.len();
        self.grants.retain(|_, g| g.expires > now);
        self.grants.len() != before
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_grant_lasts_until_it_expires() {
        let mut g = Grants::default();
        g.grant(ip("192.0.2.5"), 100, 200).unwrap();
        assert!(g.is_granted(ip("192.0.2.5"), 199));
        assert!(g.is_granted(ip("::ffff:192.0.2.5"), 199));
        assert!(!g.is_granted(ip("192.0.2.6"), 150));
        assert!(!g.is_granted(ip("192.0.2.5"), 200));
        assert!(g.live(200).is_empty());
        assert!(g.sweep(200));
    }

    #[test]
    fn renewal_never_shortens_and_revoke_needs_a_grant() {
        let mut g = Grants::default();
        g.grant(ip("2001:db8::5"), 0, 1000).unwrap();
        let renewed = g.grant(ip("2001:db8::5"), 10, 500).unwrap();
        assert_eq!(renewed.expires, 1000);
        assert_eq!(renewed.added, 0);
        g.revoke(ip("2001:db8::5"), 20).unwrap();
        assert_eq!(
            g.revoke(ip("2001:db8::5"), 20),
            Err(GrantError::NotGranted(ip("2001:db8::5")))
        );
    }

    #[test]
    fn survives_a_json_round_trip() {
        let mut g = Grants::default();
        g.grant(ip("192.0.2.5"), 1, 2000).unwrap();
        let text = serde_json::to_string(&g).unwrap();
        assert_eq!(serde_json::from_str::<Grants>(&text).unwrap(), g);
    }
}
