//! DNS shared by the DNSBL engine and the reverse-DNS check: one way to
//! build a resolver (our own caching, absolute names, two tries within the
//! deadline), and forward-confirmed reverse DNS (FCrDNS).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result};
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::{Resolver, TokioResolver};
use tokio::task::JoinSet;
use tokio::time::{timeout_at, Instant};

use crate::netaddr::canonical;

/// PTR names followed at most: a client publishing hundreds must not make
/// us ask hundreds of questions (Postfix stops at a handful too).
const MAX_PTR_NAMES: usize = 5;

/// A resolver asking `nameservers` (none: the system's), without caching,
/// hosts file or search domains, each query tried twice within `timeout`.
pub fn resolver(
    nameservers: &[SocketAddr],
    timeout: Duration,
    what: &str,
) -> Result<TokioResolver> {
    let provider = TokioRuntimeProvider::default();
    let mut builder = if nameservers.is_empty() {
        Resolver::builder(provider)
            .with_context(|| format!("{what}: reading the system resolver configuration"))?
    } else {
        let servers = nameservers
            .iter()
            .map(|addr| {
                let mut server = NameServerConfig::udp_and_tcp(addr.ip());
                for connection in &mut server.connections {
                    connection.port = addr.port();
                }
                server
            })
            .collect();
        Resolver::builder_with_config(ResolverConfig::from_name_servers(servers), provider)
    };
    let options = builder.options_mut();
    options.cache_size = 0;
    options.use_hosts_file = ResolveHosts::Never;
    options.ndots = 0;
    options.attempts = 2;
    options.timeout = (timeout / 2).max(Duration::from_millis(1));
    builder
        .build()
        .with_context(|| format!("{what}: building the resolver"))
}

/// What forward-confirmed reverse DNS says of a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fcrdns {
    /// A PTR name whose A/AAAA records include the client.
    Confirmed(String),
    /// No PTR, or no PTR name resolves back to the client.
    Unconfirmed,
    /// The answers did not come in time, or a server failed: fail open.
    Unknown,
}

/// The pure part: does any of `forward` (the addresses each PTR name
/// resolved to) hold `client`?
pub fn confirm(client: IpAddr, forward: &[(String, Vec<IpAddr>)]) -> Option<String> {
    let client = canonical(client);
    forward
        .iter()
        .find(|(_, addrs)| addrs.iter().any(|a| canonical(*a) == client))
        .map(|(name, _)| name.clone())
}

pub struct ReverseDns {
    resolver: TokioResolver,
    timeout: Duration,
}

impl ReverseDns {
    pub fn new(nameservers: &[SocketAddr], timeout: Duration) -> Result<ReverseDns> {
        Ok(ReverseDns {
            resolver: resolver(nameservers, timeout, "fcrdns")?,
            timeout,
        })
    }

    /// PTR, then the forward lookups of its names in parallel, all within
    /// one deadline.
    pub async fn check(&self, client: IpAddr) -> Fcrdns {
        let client = canonical(client);
        let deadline = Instant::now() + self.timeout;
        let names = match timeout_at(deadline, self.resolver.reverse_lookup(client)).await {
            Err(_) => return Fcrdns::Unknown,
            Ok(Err(e)) if no_records(&e) => return Fcrdns::Unconfirmed,
            Ok(Err(_)) => return Fcrdns::Unknown,
            Ok(Ok(lookup)) => lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::PTR(name) => Some(name.0.to_ascii()),
                    _ => None,
                })
                .take(MAX_PTR_NAMES)
                .collect::<Vec<_>>(),
        };
        if names.is_empty() {
            return Fcrdns::Unconfirmed;
        }
        let family = match client {
            IpAddr::V4(_) => RecordType::A,
            IpAddr::V6(_) => RecordType::AAAA,
        };
        let mut lookups = JoinSet::new();
        for name in names {
            let resolver = self.resolver.clone();
            lookups.spawn(async move {
                let answer = timeout_at(deadline, resolver.lookup(name.as_str(), family)).await;
                (name, answer)
            });
        }
        let mut forward = Vec::new();
        let mut unknown = false;
        while let Some(joined) = lookups.join_next().await {
            let Ok((name, answer)) = joined else {
                unknown = true;
                continue;
            };
            match answer {
                Ok(Ok(lookup)) => {
                    let addrs = lookup
                        .answers()
                        .iter()
                        .filter_map(|r| match &r.data {
                            RData::A(a) => Some(IpAddr::V4(a.0)),
                            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                            _ => None,
                        })
                        .collect();
                    forward.push((name.trim_end_matches('.').to_owned(), addrs));
                }
                Ok(Err(e)) if no_records(&e) => {}
                _ => unknown = true,
            }
        }
        match confirm(client, &forward) {
            Some(name) => Fcrdns::Confirmed(name),
            None if unknown => Fcrdns::Unknown,
            None => Fcrdns::Unconfirmed,
        }
    }
}

fn no_records(error: &NetError) -> bool {
    matches!(error, NetError::Dns(DnsError::NoRecordsFound(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_name_resolving_back_to_the_client_confirms_it() {
        let forward = vec![
            ("liar.test".to_owned(), vec![ip("198.51.100.9")]),
            (
                "mail.test".to_owned(),
                vec![ip("192.0.2.8"), ip("192.0.2.2")],
            ),
        ];
        assert_eq!(confirm(ip("192.0.2.2"), &forward), Some("mail.test".into()));
        assert_eq!(
            confirm(ip("::ffff:192.0.2.2"), &forward),
            Some("mail.test".into())
        );
        assert_eq!(confirm(ip("192.0.2.3"), &forward), None);
        assert_eq!(confirm(ip("192.0.2.3"), &[]), None);
    }

    #[tokio::test]
    async fn a_silent_nameserver_is_unknown_by_the_deadline() {
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let rdns =
            ReverseDns::new(&[silent.local_addr().unwrap()], Duration::from_millis(300)).unwrap();
        assert_eq!(rdns.check(ip("192.0.2.2")).await, Fcrdns::Unknown);
    }
}
