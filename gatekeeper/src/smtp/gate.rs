//! The connection gate: the first thing every accepted connection meets.
//!
//! It counts open connections (in total and per client group) and new
//! connections per minute per client group, where a group is a /32 for IPv4
//! and a `/ipv6_client_prefix` for IPv6 (see [`crate::netaddr::client_group`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ipnet::IpNet;
use lru::LruCache;

use crate::netaddr::client_group;

/// Rate buckets kept at most: an attacker with many addresses evicts the
/// least recently seen (whose bucket has mostly refilled anyway) instead of
/// growing the table. About 5 MB at the cap.
const RATE_TABLE_ENTRIES: usize = 65_536;

pub struct GateLimits {
    pub max_total: usize,
    pub max_per_client: usize,
    pub ipv6_prefix: u8,
    /// Connections per minute per group; 0 = unlimited.
    pub rate_per_minute: u32,
    /// Never rate limited (the relay networks, as Postfix exempts `mynetworks`).
    pub rate_exempt: Vec<IpNet>,
}

pub struct ConnectionGate {
    state: Mutex<State>,
}

struct State {
    /// In the state so a reload changes them without resetting the counts.
    limits: GateLimits,
    total: usize,
    per_client: HashMap<IpNet, usize>,
    rates: LruCache<IpNet, Bucket>,
}

/// A token bucket: `rate_per_minute` tokens at most, refilled continuously.
struct Bucket {
    tokens: f64,
    updated: Instant,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    TooManyConnections,
    TooManyFromClient,
    RateLimited,
}

impl Refusal {
    pub fn reply(&self, hostname: &str) -> String {
        match self {
            Refusal::TooManyConnections => {
                format!("421 4.7.0 {hostname} Error: too many connections, try again later")
            }
            Refusal::TooManyFromClient => {
                format!("421 4.7.0 {hostname} Error: too many connections from your address")
            }
            Refusal::RateLimited => {
                format!("421 4.7.0 {hostname} Error: too many connections from your address per minute, slow down")
            }
        }
    }
}

/// Held for the life of a connection; releases its slot when dropped.
pub struct Admission {
    gate: Arc<ConnectionGate>,
    group: IpNet,
}

impl ConnectionGate {
    pub fn new(limits: GateLimits) -> Arc<ConnectionGate> {
        Arc::new(ConnectionGate {
            state: Mutex::new(State {
                limits,
                total: 0,
                per_client: HashMap::new(),
                rates: LruCache::new(NonZeroUsize::new(RATE_TABLE_ENTRIES).expect("non-zero")),
            }),
        })
    }

    pub fn admit(self: &Arc<Self>, client: IpAddr) -> Result<Admission, Refusal> {
        self.admit_at(client, Instant::now())
    }

    fn admit_at(self: &Arc<Self>, client: IpAddr, now: Instant) -> Result<Admission, Refusal> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let group = client_group(client, state.limits.ipv6_prefix);
        if !Self::rate_allows(&mut state, group, client, now) {
            return Err(Refusal::RateLimited);
        }
        if state.total >= state.limits.max_total {
            return Err(Refusal::TooManyConnections);
        }
        let max_per_client = state.limits.max_per_client;
        let from_client = state.per_client.entry(group).or_insert(0);
        if *from_client >= max_per_client {
            return Err(Refusal::TooManyFromClient);
        }
        *from_client += 1;
        state.total += 1;
        Ok(Admission {
            gate: self.clone(),
            group,
        })
    }

    /// Every attempt costs a token, whether or not it is admitted later (like anvil).
    fn rate_allows(state: &mut State, group: IpNet, client: IpAddr, now: Instant) -> bool {
        let rate = state.limits.rate_per_minute;
        let client = crate::netaddr::canonical(client);
        if rate == 0 || state.limits.rate_exempt.iter().any(|n| n.contains(&client)) {
            return true;
        }
        let capacity = f64::from(rate);
        let bucket = state.rates.get_or_insert_mut(group, || Bucket {
            tokens: capacity,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(bucket.updated);
        bucket.tokens = (bucket.tokens + elapsed.as_secs_f64() * capacity / 60.0).min(capacity);
        bucket.updated = now;
        if bucket.tokens < 1.0 {
            return false;
        }
        bucket.tokens -= 1.0;
        true
    }

    /// New limits for new connections; open ones keep their slots (and the
    /// client group they were counted under) until they close.
    pub fn set_limits(&self, limits: GateLimits) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).limits = limits;
    }

    #[cfg(test)]
    pub fn open(&self) -> usize {
        self.state.lock().unwrap().total
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut state = self.gate.state.lock().unwrap_or_else(|p| p.into_inner());
        state.total -= 1;
        if let Some(count) = state.per_client.get_mut(&self.group) {
            *count -= 1;
            if *count == 0 {
                state.per_client.remove(&self.group);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits(max_total: usize, max_per_client: usize, rate: u32) -> GateLimits {
        GateLimits {
            max_total,
            max_per_client,
            ipv6_prefix: 64,
            rate_per_minute: rate,
            rate_exempt: vec!["198.51.100.0/24".parse().unwrap()],
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn limits_total_and_per_client() {
        let gate = ConnectionGate::new(limits(3, 2, 0));
        let a = ip("192.0.2.1");
        let b = ip("192.0.2.2");
        let first = gate.admit(a).unwrap();
        let _second = gate.admit(a).unwrap();
        assert_eq!(gate.admit(a).err(), Some(Refusal::TooManyFromClient));
        let _third = gate.admit(b).unwrap();
        assert_eq!(gate.admit(b).err(), Some(Refusal::TooManyConnections));
        drop(first);
        assert!(gate.admit(b).is_ok());
    }

    #[test]
    fn one_ipv6_slash64_is_one_client() {
        let gate = ConnectionGate::new(limits(100, 2, 0));
        let _a = gate.admit(ip("2001:db8:1:1::1")).unwrap();
        let b = gate.admit(ip("2001:db8:1:1:ffff::2")).unwrap();
        assert_eq!(
            gate.admit(ip("2001:db8:1:1::3")).err(),
            Some(Refusal::TooManyFromClient)
        );
        // The neighbouring /64 is another client.
        let _c = gate.admit(ip("2001:db8:1:2::1")).unwrap();
        drop(b);
        assert!(gate.admit(ip("2001:db8:1:1::3")).is_ok());
        // IPv4 stays per address, mapped or not.
        let _d = gate.admit(ip("192.0.2.1")).unwrap();
        let _e = gate.admit(ip("::ffff:192.0.2.1")).unwrap();
        assert_eq!(
            gate.admit(ip("192.0.2.1")).err(),
            Some(Refusal::TooManyFromClient)
        );
        assert!(gate.admit(ip("192.0.2.2")).is_ok());
    }

    #[test]
    fn connection_rate_per_group_refills_over_time() {
        let gate = ConnectionGate::new(limits(1000, 1000, 60));
        let start = Instant::now();
        let mut held = Vec::new();
        for i in 0..60 {
            let client = ip(&format!("2001:db8:5:5::{:x}", i + 1));
            held.push(gate.admit_at(client, start).unwrap());
        }
        // The 61st in the same minute, from anywhere in the /64, is refused...
        assert_eq!(
            gate.admit_at(ip("2001:db8:5:5::ffff"), start).err(),
            Some(Refusal::RateLimited)
        );
        // ...closing connections gives no credit: rate is not concurrency.
        held.clear();
        assert_eq!(
            gate.admit_at(ip("2001:db8:5:5::1"), start).err(),
            Some(Refusal::RateLimited)
        );
        // Another /64 and another IPv4 address have their own budget.
        assert!(gate.admit_at(ip("2001:db8:5:6::1"), start).is_ok());
        assert!(gate.admit_at(ip("192.0.2.9"), start).is_ok());
        // One token per second comes back (60 per minute).
        let later = start + Duration::from_millis(1500);
        assert!(gate.admit_at(ip("2001:db8:5:5::1"), later).is_ok());
        assert_eq!(
            gate.admit_at(ip("2001:db8:5:5::1"), later).err(),
            Some(Refusal::RateLimited)
        );
        // Relay networks are never rate limited.
        for _ in 0..200 {
            assert!(gate.admit_at(ip("198.51.100.7"), start).is_ok());
        }
    }

    #[test]
    fn rate_table_is_bounded() {
        let gate = ConnectionGate::new(limits(usize::MAX, usize::MAX, 1));
        let now = Instant::now();
        for i in 0..(RATE_TABLE_ENTRIES as u32 + 1000) {
            let addr = IpAddr::V4(std::net::Ipv4Addr::from(0xC000_0000u32 + i));
            let _ = gate.admit_at(addr, now);
        }
        assert_eq!(gate.state.lock().unwrap().rates.len(), RATE_TABLE_ENTRIES);
    }
}
