//! SMTP front-end counters, shared by all sessions and read by `gatekeeper stats`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::{Deserialize, Serialize};

use super::policy::RelayReason;

#[derive(Default)]
pub struct SmtpStats {
    pub connections: AtomicU64,
    pub refused_connection_limit: AtomicU64,
    pub refused_dnsbl: AtomicU64,
    pub refused_denylisted: AtomicU64,
    pub pregreet: AtomicU64,
    pub recipients_accepted: AtomicU64,
    pub messages_delivered: AtomicU64,
    pub upstream_failures: AtomicU64,
    pub smuggling_refused: AtomicU64,
    pub oversize_refused: AtomicU64,
    pub timeouts: AtomicU64,
    pub error_limit_disconnects: AtomicU64,
    pub refused_connection_rate: AtomicU64,
    pub command_limit_disconnects: AtomicU64,
    pub session_time_disconnects: AtomicU64,
    pub write_timeouts: AtomicU64,
    pub upstream_busy: AtomicU64,
    pub transactions_replayed: AtomicU64,
    pub transactions_lost: AtomicU64,
    pub shutdown_disconnects: AtomicU64,
    pub proxy_header_invalid: AtomicU64,
    pub proxy_header_untrusted: AtomicU64,
    pub proxy_local_closed: AtomicU64,
    relay_denied: [AtomicU64; RelayReason::ALL.len()],
}

/// What `stats --json` shows under `smtp`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SmtpStatsReport {
    pub connections: u64,
    pub refused_connection_limit: u64,
    /// Connections refused with 554 because of a DNSBL verdict.
    pub refused_dnsbl: u64,
    /// Denylisted clients that got past XDP and were refused with 554 by the front end.
    pub refused_denylisted: u64,
    pub pregreet: u64,
    pub recipients_accepted: u64,
    pub messages_delivered: u64,
    pub upstream_failures: u64,
    pub smuggling_refused: u64,
    pub oversize_refused: u64,
    pub timeouts: u64,
    pub error_limit_disconnects: u64,
    /// Connections refused by `max_connection_rate`.
    pub refused_connection_rate: u64,
    /// Sessions ended with 421 at `max_commands`.
    pub command_limit_disconnects: u64,
    /// Sessions ended with 421 at `max_session_time`.
    pub session_time_disconnects: u64,
    /// Sessions dropped because the client stopped taking replies (`write_timeout`).
    pub write_timeouts: u64,
    /// Recipients answered 451 4.3.2 because `max_upstream_sessions` stayed full for `upstream_wait`.
    pub upstream_busy: u64,
    /// Transactions replayed whole on a fresh upstream session after the MTA failed mid-transaction.
    pub transactions_replayed: u64,
    /// Transactions refused at DATA (451) because acknowledged recipients could not be replayed.
    pub transactions_lost: u64,
    /// Sessions told 421 4.3.2 at shutdown.
    pub shutdown_disconnects: u64,
    /// Connections from `proxy_protocol_from` closed for a missing, malformed,
    /// unsupported or late PROXY header.
    #[serde(default)]
    pub proxy_header_invalid: u64,
    /// Clients outside `proxy_protocol_from` refused for sending a PROXY header.
    #[serde(default)]
    pub proxy_header_untrusted: u64,
    /// Balancer connections speaking for themselves (v2 LOCAL, v1 UNKNOWN:
    /// health checks), closed without a banner.
    #[serde(default)]
    pub proxy_local_closed: u64,
    /// Refused recipients by reason (`foreign_domain`, `percent_hack`, ...).
    pub relay_denied: BTreeMap<String, u64>,
}

impl SmtpStats {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    pub fn relay_denied(&self, reason: RelayReason) {
        let index = RelayReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        self.relay_denied[index].fetch_add(1, Relaxed);
    }

    pub fn report(&self) -> SmtpStatsReport {
        SmtpStatsReport {
            connections: self.connections.load(Relaxed),
            refused_connection_limit: self.refused_connection_limit.load(Relaxed),
            refused_dnsbl: self.refused_dnsbl.load(Relaxed),
            refused_denylisted: self.refused_denylisted.load(Relaxed),
            pregreet: self.pregreet.load(Relaxed),
            recipients_accepted: self.recipients_accepted.load(Relaxed),
            messages_delivered: self.messages_delivered.load(Relaxed),
            upstream_failures: self.upstream_failures.load(Relaxed),
            smuggling_refused: self.smuggling_refused.load(Relaxed),
            oversize_refused: self.oversize_refused.load(Relaxed),
            timeouts: self.timeouts.load(Relaxed),
            error_limit_disconnects: self.error_limit_disconnects.load(Relaxed),
            refused_connection_rate: self.refused_connection_rate.load(Relaxed),
            command_limit_disconnects: self.command_limit_disconnects.load(Relaxed),
            session_time_disconnects: self.session_time_disconnects.load(Relaxed),
            write_timeouts: self.write_timeouts.load(Relaxed),
            upstream_busy: self.upstream_busy.load(Relaxed),
            transactions_replayed: self.transactions_replayed.load(Relaxed),
            transactions_lost: self.transactions_lost.load(Relaxed),
            shutdown_disconnects: self.shutdown_disconnects.load(Relaxed),
            proxy_header_invalid: self.proxy_header_invalid.load(Relaxed),
            proxy_header_untrusted: self.proxy_header_untrusted.load(Relaxed),
            proxy_local_closed: self.proxy_local_closed.load(Relaxed),
            relay_denied: RelayReason::ALL
                .iter()
                .zip(&self.relay_denied)
                .map(|(reason, count)| (reason.name().to_owned(), count.load(Relaxed)))
                .collect(),
        }
    }
}
