//! Greylisting, as OpenBSD spamd and postgrey do it: the first delivery
//! attempt of a (client network, sender, recipient) triplet is deferred;
//! a retry after `delay` and within `retry_window` passes, and the network
//! is then trusted for `pass_ttl` from that retry.
//!
//! Networks, not addresses: a sender's pool retries from a neighbour.

use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::time::Duration;

use ipnet::IpNet;
use lru::LruCache;
use serde::{Deserialize, Serialize};

use crate::findings::Findings;
use crate::netaddr::canonical;

/// The `[greylist]` table.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GreylistConfig {
    #[serde(default)]
    pub enabled: bool,
    /// A retry sooner than this is deferred again.
    #[serde(default = "five_minutes", with = "humantime_serde")]
    pub delay: Duration,
    /// A retry later than this (after the first attempt) starts over.
    #[serde(default = "four_hours", with = "humantime_serde")]
    pub retry_window: Duration,
    /// How long a network that retried properly is spared greylisting.
    #[serde(default = "thirty_six_days", with = "humantime_serde")]
    pub pass_ttl: Duration,
    /// Triplets remembered (and, separately, networks passed); the least
    /// recently seen is forgotten first, so a flood of new triplets costs
    /// memory up to this and no more.
    #[serde(default = "default_max_entries")]
    pub max_entries: usize,
    #[serde(default = "default_ipv4_prefix")]
    pub ipv4_prefix: u8,
    #[serde(default = "default_ipv6_prefix")]
    pub ipv6_prefix: u8,
}

impl Default for GreylistConfig {
    fn default() -> GreylistConfig {
        GreylistConfig {
            enabled: false,
            delay: five_minutes(),
            retry_window: four_hours(),
            pass_ttl: thirty_six_days(),
            max_entries: default_max_entries(),
            ipv4_prefix: default_ipv4_prefix(),
            ipv6_prefix: default_ipv6_prefix(),
        }
    }
}

impl GreylistConfig {
    pub fn check(&self, findings: &mut Findings) {
        if self.max_entries == 0 {
            findings.error("greylist.max_entries: must be at least 1");
        }
        if !(1..=32).contains(&self.ipv4_prefix) {
            findings.error("greylist.ipv4_prefix: must be 1 to 32");
        }
        if !(1..=128).contains(&self.ipv6_prefix) {
            findings.error("greylist.ipv6_prefix: must be 1 to 128");
        }
        if self.retry_window <= self.delay {
            findings.error("greylist.retry_window: must be longer than greylist.delay");
        }
        if self.pass_ttl.is_zero() {
            findings.error("greylist.pass_ttl: must be more than 0s");
        }
    }

    /// The network a client is greylisted as.
    pub fn network(&self, client: IpAddr) -> IpNet {
        let client = canonical(client);
        let len = match client {
            IpAddr::V4(_) => self.ipv4_prefix.min(32),
            IpAddr::V6(_) => self.ipv6_prefix.min(128),
        };
        IpNet::new(client, len)
            .expect("prefix length within the family's range")
            .trunc()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
struct Triplet {
    net: IpNet,
    sender: String,
    recipient: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GreyVerdict {
    /// Known network, or a proper retry.
    Pass,
    /// Deferred; a retry from `retry_after` seconds on will pass.
    Defer { retry_after: u64 },
}

/// What is saved: unix seconds.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct GreylistState {
    triplets: Vec<(Triplet, u64)>,
    passed: Vec<(IpNet, u64)>,
}

pub struct Greylist {
    config: GreylistConfig,
    /// First attempt of each triplet not yet passed.
    triplets: LruCache<Triplet, u64>,
    /// Networks that retried properly, with the end of their pass.
    passed: LruCache<IpNet, u64>,
}

/// What the counters count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    /// A network already trusted.
    Known,
    /// A retry that passed now.
    Retried,
    /// A first attempt (or one after the retry window), deferred.
    New,
    /// A retry that came too early, deferred again.
    Early,
}

impl Greylist {
    pub fn new(config: GreylistConfig, state: GreylistState, now: u64) -> Greylist {
        let cap = NonZeroUsize::new(config.max_entries).unwrap_or(NonZeroUsize::MIN);
        let mut list = Greylist {
            config,
            triplets: LruCache::new(cap),
            passed: LruCache::new(cap),
        };
        for (triplet, first) in state.triplets {
            list.triplets.put(triplet, first);
        }
        for (net, until) in state.passed {
            list.passed.put(net, until);
        }
        list.sweep(now);
        list
    }

    pub fn config(&self) -> &GreylistConfig {
        &self.config
    }

    /// Judges one delivery attempt. Addresses are compared case-insensitively.
    pub fn check(
        &mut self,
        client: IpAddr,
        sender: &str,
        recipient: &str,
        now: u64,
    ) -> (GreyVerdict, Checked) {
        let net = self.config.network(client);
        let pass_until = now.saturating_add(self.config.pass_ttl.as_secs());
        // Not renewed by later attempts: a pass lasts `pass_ttl` from the
        // retry that earned it, so one retried junk triplet cannot keep a
        // network exempt forever.
        if self.passed.get(&net).is_some_and(|&until| until > now) {
            return (GreyVerdict::Pass, Checked::Known);
        }
        let triplet = Triplet {
            net,
            sender: sender.to_ascii_lowercase(),
            recipient: recipient.to_ascii_lowercase(),
        };
        let delay = self.config.delay.as_secs();
        let window = self.config.retry_window.as_secs();
        match self.triplets.get(&triplet).copied() {
            Some(first)
                if now >= first.saturating_add(delay) && now <= first.saturating_add(window) =>
            {
                self.triplets.pop(&triplet);
                self.passed.put(net, pass_until);
                (GreyVerdict::Pass, Checked::Retried)
            }
            Some(first) if now < first.saturating_add(delay) => (
                GreyVerdict::Defer {
                    retry_after: first + delay - now,
                },
                Checked::Early,
            ),
            _ => {
                self.triplets.put(triplet, now);
                (GreyVerdict::Defer { retry_after: delay }, Checked::New)
            }
        }
    }

    /// Forgets triplets past their retry window and passes that ran out;
    /// returns how many went.
    pub fn sweep(&mut self, now: u64) -> usize {
        let window = self.config.retry_window.as_secs();
        let stale: Vec<Triplet> = self
            .triplets
            .iter()
            .filter(|(_, &first)| first.saturating_add(window) < now)
            .map(|(t, _)| t.clone())
            .collect();
        let expired: Vec<IpNet> = self
            .passed
            .iter()
            .filter(|(_, &until)| until <= now)
            .map(|(net, _)| *net)
            .collect();
        for t in &stale {
            self.triplets.pop(t);
        }
        for net in &expired {
            self.passed.pop(net);
        }
        stale.len() + expired.len()
    }

    /// (triplets waiting, networks passed)
    pub fn sizes(&self) -> (usize, usize) {
        (self.triplets.len(), self.passed.len())
    }

    /// Oldest first, so loading it back keeps the recency order.
    pub fn state(&self) -> GreylistState {
        GreylistState {
            triplets: self
                .triplets
                .iter()
                .rev()
                .map(|(t, &first)| (t.clone(), first))
                .collect(),
            passed: self
                .passed
                .iter()
                .rev()
                .map(|(net, &until)| (*net, until))
                .collect(),
        }
    }
}

fn five_minutes() -> Duration {
    Duration::from_secs(300)
}
fn four_hours() -> Duration {
    Duration::from_secs(4 * 3600)
}
fn thirty_six_days() -> Duration {
    Duration::from_secs(36 * 86400)
}
fn default_max_entries() -> usize {
    100_000
}
fn default_ipv4_prefix() -> u8 {
    24
}
fn default_ipv6_prefix() -> u8 {
    64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn list() -> Greylist {
        Greylist::new(GreylistConfig::default(), GreylistState::default(), 0)
    }

    #[test]
    fn first_attempt_waits_a_proper_retry_passes_and_trusts_the_network() {
        let mut g = list();
        let client = ip("192.0.2.10");
        assert_eq!(
            g.check(client, "a@sender.test", "u@example.org", 1000),
            (GreyVerdict::Defer { retry_after: 300 }, Checked::New)
        );
        assert_eq!(
            g.check(client, "a@sender.test", "u@example.org", 1100),
            (GreyVerdict::Defer { retry_after: 200 }, Checked::Early)
        );
        // A neighbour in the same /24 retries for the pool, case differing.
        assert_eq!(
            g.check(ip("192.0.2.77"), "A@Sender.Test", "u@example.org", 1300),
            (GreyVerdict::Pass, Checked::Retried)
        );
        // The network is trusted now, for any triplet.
        assert_eq!(
            g.check(ip("192.0.2.1"), "b@other.test", "v@example.org", 1301),
            (GreyVerdict::Pass, Checked::Known)
        );
        // Another network is not.
        assert!(matches!(
            g.check(ip("198.51.100.1"), "a@sender.test", "u@example.org", 1302),
            (GreyVerdict::Defer { .. }, Checked::New)
        ));
    }

    #[test]
    fn a_retry_after_the_window_starts_over_and_passes_expire() {
        let mut g = list();
        let client = ip("2001:db8:1:2::5");
        g.check(client, "", "u@example.org", 0);
        assert_eq!(
            g.check(client, "", "u@example.org", 4 * 3600 + 1),
            (GreyVerdict::Defer { retry_after: 300 }, Checked::New)
        );
        let start = 4 * 3600 + 1;
        // Same /64, other host.
        assert_eq!(
            g.check(ip("2001:db8:1:2::9"), "", "u@example.org", start + 300)
                .1,
            Checked::Retried
        );
        let end = start + 300 + 36 * 86400;
        assert_eq!(
            g.check(client, "x@y.test", "u@example.org", end).1,
            Checked::New
        );
    }

    #[test]
    fn state_round_trips_and_sweep_forgets_the_stale() {
        let mut g = list();
        g.check(ip("192.0.2.10"), "a@s.test", "u@example.org", 0);
        g.check(ip("198.51.100.1"), "a@s.test", "u@example.org", 0);
        g.check(ip("198.51.100.1"), "a@s.test", "u@example.org", 400);
        let text = serde_json::to_string(&g.state()).unwrap();
        let state: GreylistState = serde_json::from_str(&text).unwrap();
        let mut again = Greylist::new(GreylistConfig::default(), state, 401);
        assert_eq!(again.sizes(), (1, 1));
        assert_eq!(
            again
                .check(ip("192.0.2.10"), "a@s.test", "u@example.org", 402)
                .1,
            Checked::Retried
        );
        assert_eq!(again.sweep(36 * 86400 + 403), 2);
        assert_eq!(again.sizes(), (0, 0));
    }

    #[test]
    fn the_table_is_bounded() {
        let mut g = Greylist::new(
            GreylistConfig {
                max_entries: 3,
                ..GreylistConfig::default()
            },
            GreylistState::default(),
            0,
        );
        for i in 0..100 {
            g.check(ip("192.0.2.1"), &format!("s{i}@x.test"), "u@example.org", 0);
        }
        assert_eq!(g.sizes(), (3, 0));
    }
}
