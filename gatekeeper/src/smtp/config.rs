//! The `[smtp]` table. Key names are a contract: add, never rename.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::findings::{duplicates, Findings};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpConfig {
    #[serde(default = "default_listen")]
    pub listen: Vec<SocketAddr>,
    #[serde(default = "default_hostname")]
    pub hostname: String,
    #[serde(default)]
    pub local_domains: Vec<String>,
    #[serde(default = "default_relay_networks")]
    pub relay_networks: Vec<IpNet>,
    /// The MTA behind us, `host:port`.
    pub upstream: SocketAddr,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Treat `user@[our listen address]` as local (off: literals are relay).
    #[serde(default)]
    pub accept_own_literals: bool,

    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    #[serde(default = "default_max_connections_per_ip")]
    pub max_connections_per_ip: usize,
    /// Waiting for a command once MAIL was given (RFC 5321 §4.5.3.2: 5 minutes).
    #[serde(default = "five_minutes", with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Waiting for a command before MAIL: idle bots get less patience.
    #[serde(default = "one_minute", with = "humantime_serde")]
    pub pre_mail_timeout: Duration,
    /// Waiting for each chunk of message data (RFC 5321: 3 minutes).
    #[serde(default = "three_minutes", with = "humantime_serde")]
    pub data_timeout: Duration,
    /// Waiting for the MTA behind us; its final reply may take long (RFC 5321: 10 minutes).
    #[serde(default = "ten_minutes", with = "humantime_serde")]
    pub upstream_timeout: Duration,
    #[serde(default = "default_max_message_size")]
    pub max_message_size: u64,
    #[serde(default = "default_max_recipients")]
    pub max_recipients: usize,
    /// Client errors before `421` and disconnect.
    #[serde(default = "default_max_errors")]
    pub max_errors: usize,
    /// Pre-greet detection: send a `220-` teaser and wait this long; a client
    /// that talks before the full banner is refused. 0 = off (banner at once).
    #[serde(default, with = "humantime_serde")]
    pub greet_wait: Duration,
    /// Denylist pre-greet talkers in the kernel for this long. 0 = off.
    #[serde(default, with = "humantime_serde")]
    pub pregreet_deny_ttl: Duration,

    /// Hard cap on a session's life, however busy it keeps itself (NOOPs).
    #[serde(default = "ten_minutes", with = "humantime_serde")]
    pub max_session_time: Duration,
    /// Commands per session (message lines are not commands).
    #[serde(default = "default_max_commands")]
    pub max_commands: usize,
    /// A reply the client does not take within this long ends the session;
    /// also the sockets' `TCP_USER_TIMEOUT` (unacknowledged data).
    #[serde(default = "two_minutes", with = "humantime_serde")]
    pub write_timeout: Duration,
    /// IPv6 clients are counted per prefix of this length (IPv4: per address).
    #[serde(default = "default_ipv6_client_prefix")]
    pub ipv6_client_prefix: u8,
    /// New connections per minute per client (burst of as many); 0 = off.
    #[serde(default = "default_max_connection_rate")]
    pub max_connection_rate: u32,
    /// Upstream (MTA) sessions open at once, over all clients.
    #[serde(default = "default_max_upstream_sessions")]
    pub max_upstream_sessions: usize,
    /// Idle upstream sessions kept after a delivered message for the next
    /// client (re-targeted with XCLIENT); 0 = a fresh session per
    /// transaction. Off by default: with it, the MTA's per-session
    /// accounting (Postfix's `disconnect from` counts) spans clients.
    #[serde(default)]
    pub upstream_pool: usize,
    /// How long a pooled upstream session may idle before it is closed
    /// (well below the MTA's own idle timeout; Postfix: 300s).
    #[serde(default = "ten_seconds", with = "humantime_serde")]
    pub upstream_pool_idle: Duration,
    /// How long a recipient waits for a free upstream session before `451 4.3.2`.
    #[serde(default = "thirty_seconds", with = "humantime_serde")]
    pub upstream_wait: Duration,
    /// TCP connect, greeting and EHLO/XCLIENT set-up of an upstream session.
    #[serde(default = "thirty_seconds", with = "humantime_serde")]
    pub upstream_connect_timeout: Duration,
    /// On shutdown, sessions still open after this long are dropped.
    #[serde(default = "thirty_seconds", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Load balancers whose connections must start with a PROXY v1/v2 header
    /// naming the real client, which is then judged instead of the balancer.
    #[serde(default)]
    pub proxy_protocol_from: Vec<IpNet>,
    /// How long a balancer may take to send its PROXY header.
    #[serde(default = "ten_seconds", with = "humantime_serde")]
    pub proxy_protocol_timeout: Duration,

    /// SMTP AUTH: `"off"`, or `"upstream"` (offered as the MTA behind offers
    /// it, and passed through to it; we hold no credentials).
    #[serde(default)]
    pub auth: AuthMode,
    /// AUTH only after STARTTLS (passwords never cross the edge in clear).
    #[serde(default = "yes")]
    pub auth_require_tls: bool,
    /// Outside clients must greet with a dotted name or an address literal.
    #[serde(default)]
    pub helo_require_fqdn: bool,
    /// MAIL FROM these domains is refused (`.example.com`: its subdomains).
    #[serde(default)]
    pub denied_sender_domains: Vec<String>,
    /// More of them, one per line (`#` comments), read at start and reload.
    #[serde(default)]
    pub denied_sender_domains_file: Option<PathBuf>,
    /// Refuse (450 4.7.25) outside clients without forward-confirmed reverse
    /// DNS, at connection time; a lookup that fails or times out lets them in.
    #[serde(default)]
    pub client_require_fcrdns: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    #[default]
    Off,
    Upstream,
}

impl SmtpConfig {
    /// The first error, for callers that need one message.
    pub fn validate(&self) -> Result<(), String> {
        let mut findings = Findings::default();
        self.check(&mut findings);
        findings.into_result()
    }

    /// Every problem at once (`gatekeeper config check`, reload).
    pub fn check(&self, findings: &mut Findings) {
        if self.listen.is_empty() {
            findings.error("smtp.listen: at least one address is required");
        }
        for message in duplicates("smtp.listen", &self.listen) {
            findings.error(message);
        }
        if self.hostname.is_empty() || self.hostname.contains(char::is_whitespace) {
            findings.error(format!(
                "smtp.hostname: '{}' is not a host name",
                self.hostname
            ));
        }
        for (i, domain) in self.local_domains.iter().enumerate() {
            let name = domain.trim_start_matches('.');
            let valid = if name.is_ascii() {
                super::parse::parse_domain(name).is_ok()
            } else {
                super::idn::canonical_domain(name).is_ok()
            };
            if !valid {
                findings.error(format!(
                    "smtp.local_domains[{i}]: '{domain}' is not a domain"
                ));
            }
        }
        let lowercase: Vec<String> = self
            .local_domains
            .iter()
            .map(|d| super::idn::canonical_domain(d).unwrap_or_else(|_| d.to_ascii_lowercase()))
            .collect();
        for message in duplicates("smtp.local_domains", &lowercase) {
            findings.warn(message);
        }
        for (key, nets) in [
            ("smtp.relay_networks", &self.relay_networks),
            ("smtp.proxy_protocol_from", &self.proxy_protocol_from),
        ] {
            for (i, net) in nets.iter().enumerate() {
                if net.trunc() != *net {
                    findings.error(format!(
                        "{key}[{i}]: '{net}' has host bits set; did you mean {}?",
                        net.trunc()
                    ));
                }
            }
        }
        for message in duplicates("smtp.relay_networks", &self.relay_networks) {
            findings.warn(message);
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => findings.error("smtp.tls_key: required with smtp.tls_cert"),
            (None, Some(_)) => findings.error("smtp.tls_cert: required with smtp.tls_key"),
            _ => {}
        }
        for (key, value) in [
            ("smtp.max_connections", self.max_connections),
            ("smtp.max_connections_per_ip", self.max_connections_per_ip),
            ("smtp.max_recipients", self.max_recipients),
            ("smtp.max_errors", self.max_errors),
            ("smtp.max_commands", self.max_commands),
            ("smtp.max_upstream_sessions", self.max_upstream_sessions),
        ] {
            if value == 0 {
                findings.error(format!("{key}: must be at least 1"));
            }
        }
        if !(1..=128).contains(&self.ipv6_client_prefix) {
            findings.error("smtp.ipv6_client_prefix: must be 1 to 128");
        }
        for (key, value) in [
            ("smtp.max_session_time", self.max_session_time),
            ("smtp.write_timeout", self.write_timeout),
            (
                "smtp.upstream_connect_timeout",
                self.upstream_connect_timeout,
            ),
            ("smtp.proxy_protocol_timeout", self.proxy_protocol_timeout),
            ("smtp.upstream_pool_idle", self.upstream_pool_idle),
        ] {
            if value.is_zero() {
                findings.error(format!("{key}: must be more than 0s"));
            }
        }
        if self.max_message_size < 1024 {
            findings.error("smtp.max_message_size: must be at least 1024 octets");
        }
        for (i, domain) in self.denied_sender_domains.iter().enumerate() {
            if let Err(e) = super::senders::DeniedSenders::entry(domain) {
                findings.error(format!("smtp.denied_sender_domains[{i}]: {e}"));
            }
        }
        if let Some(path) = &self.denied_sender_domains_file {
            if let Err(e) = super::senders::DeniedSenders::read_file(path) {
                findings.error(format!("smtp.denied_sender_domains_file: {e}"));
            }
        }
        if self.auth == AuthMode::Upstream && self.auth_require_tls && self.tls_cert.is_none() {
            findings.error(
                "smtp.auth: \"upstream\" with auth_require_tls needs smtp.tls_cert and smtp.tls_key (AUTH is offered only after STARTTLS)",
            );
        }
        let ttl = self.pregreet_deny_ttl;
        if !ttl.is_zero() && ttl.as_secs() > crate::lists::ttl::MAX_TTL_SECS {
            findings.error(format!(
                "smtp.pregreet_deny_ttl: over the maximum TTL of {} s (10y)",
                crate::lists::ttl::MAX_TTL_SECS
            ));
        }
    }
}

fn yes() -> bool {
    true
}
fn default_listen() -> Vec<SocketAddr> {
    vec!["0.0.0.0:25".parse().unwrap(), "[::]:25".parse().unwrap()]
}
fn default_hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}
fn default_relay_networks() -> Vec<IpNet> {
    vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()]
}
fn default_max_connections() -> usize {
    1000
}
fn default_max_connections_per_ip() -> usize {
    20
}
fn one_minute() -> Duration {
    Duration::from_secs(60)
}
fn ten_seconds() -> Duration {
    Duration::from_secs(10)
}
fn thirty_seconds() -> Duration {
    Duration::from_secs(30)
}
fn two_minutes() -> Duration {
    Duration::from_secs(120)
}
fn three_minutes() -> Duration {
    Duration::from_secs(180)
}
fn five_minutes() -> Duration {
    Duration::from_secs(300)
}
fn ten_minutes() -> Duration {
    Duration::from_secs(600)
}
fn default_max_message_size() -> u64 {
    25 << 20
}
fn default_max_recipients() -> usize {
    100
}
fn default_max_errors() -> usize {
    10
}
fn default_max_commands() -> usize {
    1000
}
fn default_ipv6_client_prefix() -> u8 {
    64
}
/// Ten a second sustained, 600 at once: a busy legitimate sender's pool seldom
/// shares one /64 at that pace, while a bot reconnecting at line rate is stopped.
fn default_max_connection_rate() -> u32 {
    600
}
/// Below a stock Postfix's 100 smtpd processes, leaving it room for local submissions.
fn default_max_upstream_sessions() -> usize {
    50
}
