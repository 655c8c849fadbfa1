//! The connection gate: the first thing every accepted connection meets.
//!
//! Today it enforces connection limits; it is also where a DNSBL verdict
//! will be consulted before the banner is sent.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use super::policy::canonical;

pub struct ConnectionGate {
    max_total: usize,
    max_per_ip: usize,
    open: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    TooManyConnections,
    TooManyFromClient,
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
        }
    }
}

/// Held for the life of a connection; releases its slot when dropped.
pub struct Admission {
    gate: Arc<ConnectionGate>,
    client: IpAddr,
}

impl ConnectionGate {
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<ConnectionGate> {
        Arc::new(ConnectionGate {
            max_total,
            max_per_ip,
            open: Mutex::new(Counts::default()),
        })
    }

    pub fn admit(self: &Arc<Self>, client: IpAddr) -> Result<Admission, Refusal> {
        let client = canonical(client);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.total >= self.max_total {
            return Err(Refusal::TooManyConnections);
        }
        let from_client = open.per_ip.entry(client).or_insert(0);
        if *from_client >= self.max_per_ip {
            return Err(Refusal::TooManyFromClient);
        }
        *from_client += 1;
        open.total += 1;
        Ok(Admission {
            gate: self.clone(),
            client,
        })
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut open = self.gate.open.lock().unwrap_or_else(|p| p.into_inner());
        open.total -= 1;
        if let Some(count) = open.per_ip.get_mut(&self.client) {
            *count -= 1;
            if *count == 0 {
                open.per_ip.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_total_and_per_client() {
        let gate = ConnectionGate::new(3, 2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let first = gate.admit(a).unwrap();
        let _second = gate.admit(a).unwrap();
        assert_eq!(gate.admit(a).err(), Some(Refusal::TooManyFromClient));
        let _third = gate.admit(b).unwrap();
        assert_eq!(gate.admit(b).err(), Some(Refusal::TooManyConnections));
        drop(first);
        assert!(gate.admit(b).is_ok());
    }
}
