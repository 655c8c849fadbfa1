//! SMTP front-end metrics, shared by all sessions: registered in the daemon's
//! Prometheus registry and read back by `gatekeeper stats`.

use std::collections::BTreeMap;
use tokio::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use serde::{Deserialize, Serialize};

use super::policy::RelayReason;
use crate::metrics::{labelled, Labelled};

/// Handles into the metric families, one per label value, so a session only
/// touches an atomic. Field names are the `stats --json` names.
pub struct SmtpStats {
    pub connections: Counter,
    /// Client connections open right now.
    pub sessions: Gauge,
    /// Accept to first banner line: what the screen costs a client.
    pub banner_seconds: Histogram,
    refused: Labelled,
    pub refused_connection_limit: Counter,
    pub refused_connection_rate: Counter,
    pub refused_dnsbl: Counter,
    pub refused_denylisted: Counter,
    pub refused_fcrdns: Counter,
    pub pregreet: Counter,
    pub recipients_accepted: Counter,
    deliveries: Labelled,
    pub messages_delivered: Counter,
    /// The MTA refused the message (after DATA or at its end).
    pub messages_rejected: Counter,
    /// The MTA failed while taking the message.
    pub messages_failed: Counter,
    pub oversize_refused: Counter,
    pub long_line_refused: Counter,
    pub smuggling_refused: Counter,
    pub transactions_lost: Counter,
    disconnects: Labelled,
    pub timeouts: Counter,
    pub error_limit_disconnects: Counter,
    pub command_limit_disconnects: Counter,
    pub session_time_disconnects: Counter,
    pub write_timeouts: Counter,
    pub shutdown_disconnects: Counter,
    /// A TLS handshake or binary data as the first bytes.
    pub not_smtp_disconnects: Counter,
    upstream_errors: Labelled,
    pub upstream_failures: Counter,
    pub upstream_busy: Counter,
    pub transactions_replayed: Counter,
    pub upstream_reused: Counter,
    relay_denied_family: Labelled,
    relay_denied: Vec<Counter>,
    proxy_refused: Labelled,
    pub proxy_header_invalid: Counter,
    pub proxy_header_untrusted: Counter,
    pub proxy_local_closed: Counter,
    auth: Labelled,
    pub auth_successes: Counter,
    pub auth_failures: Counter,
    /// AUTH refused before the MTA heard of it (no TLS, not offered, out of sequence).
    pub auth_refused: Counter,
    helo_refused: Labelled,
    pub helo_refused_claims_us: Counter,
    pub helo_refused_not_fqdn: Counter,
    pub sender_denied: Counter,
    greylist: Labelled,
    pub greylist_deferred: Counter,
    pub greylist_passed: Counter,
    pub greylist_known: Counter,
    relay_authorized: Labelled,
    pub relay_by_auth: Counter,
    pub relay_by_grant: Counter,
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
    /// Transactions carried by a pooled upstream session re-targeted at their client.
    pub upstream_reused: u64,
    /// Transactions refused at DATA (451) because acknowledged recipients could not be replayed.
    pub transactions_lost: u64,
    /// Sessions told 421 4.3.2 at shutdown.
    pub shutdown_disconnects: u64,
    /// Sessions closed because their first bytes were a TLS handshake or binary.
    #[serde(default)]
    pub not_smtp_disconnects: u64,
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
    /// Connections refused for want of forward-confirmed reverse DNS.
    #[serde(default)]
    pub refused_fcrdns: u64,
    /// AUTH exchanges the MTA behind answered 235.
    #[serde(default)]
    pub auth_successes: u64,
    /// AUTH exchanges the MTA behind failed (535 and other refusals, aborts).
    #[serde(default)]
    pub auth_failures: u64,
    /// AUTH refused by the front end: before STARTTLS (538), not offered, out of sequence.
    #[serde(default)]
    pub auth_refused: u64,
    /// EHLO/HELO from outside naming us (550 5.7.1).
    #[serde(default)]
    pub helo_refused_claims_us: u64,
    /// EHLO/HELO without a dotted name under `helo_require_fqdn` (504).
    #[serde(default)]
    pub helo_refused_not_fqdn: u64,
    /// MAIL FROM a `denied_sender_domains` domain (554 5.7.1).
    #[serde(default)]
    pub sender_denied: u64,
    /// Recipients deferred with 451 4.7.1 by greylisting.
    #[serde(default)]
    pub greylist_deferred: u64,
    /// Retries that passed greylisting (their network is trusted from then on).
    #[serde(default)]
    pub greylist_passed: u64,
    /// Recipients from networks that passed greylisting before.
    #[serde(default)]
    pub greylist_known: u64,
    /// Foreign recipients relayed for an authenticated session.
    #[serde(default)]
    pub relay_by_auth: u64,
    /// Foreign recipients relayed for a relay-granted address.
    #[serde(default)]
    pub relay_by_grant: u64,
}

/// Holds a `sessions` slot; the gauge goes down when the connection ends, however it ends.
pub struct OpenSession<'a> {
    sessions: &'a Gauge,
    pub accepted: Instant,
}

impl Drop for OpenSession<'_> {
    fn drop(&mut self) {
        self.sessions.dec();
    }
}

impl Default for SmtpStats {
    fn default() -> Self {
        let (refused, deliveries, disconnects, upstream_errors, relay_denied_family) = (
            Labelled::default(),
            Labelled::default(),
            Labelled::default(),
            Labelled::default(),
            Labelled::default(),
        );
        let proxy_refused = Labelled::default();
        let (auth, helo_refused, greylist, relay_authorized) = (
            Labelled::default(),
            Labelled::default(),
            Labelled::default(),
            Labelled::default(),
        );
        SmtpStats {
            auth_successes: labelled(&auth, "result", "success"),
            auth_failures: labelled(&auth, "result", "failure"),
            auth_refused: labelled(&auth, "result", "refused"),
            helo_refused_claims_us: labelled(&helo_refused, "reason", "claims_us"),
            helo_refused_not_fqdn: labelled(&helo_refused, "reason", "not_fqdn"),
            sender_denied: Counter::default(),
            greylist_deferred: labelled(&greylist, "result", "deferred"),
            greylist_passed: labelled(&greylist, "result", "passed"),
            greylist_known: labelled(&greylist, "result", "known"),
            relay_by_auth: labelled(&relay_authorized, "by", "auth"),
            relay_by_grant: labelled(&relay_authorized, "by", "grant"),
            auth,
            helo_refused,
            greylist,
            relay_authorized,
            connections: Counter::default(),
            sessions: Gauge::default(),
            banner_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            refused_connection_limit: labelled(&refused, "reason", "connection_limit"),
            refused_connection_rate: labelled(&refused, "reason", "connection_rate"),
            refused_dnsbl: labelled(&refused, "reason", "dnsbl"),
            refused_denylisted: labelled(&refused, "reason", "denylisted"),
            refused_fcrdns: labelled(&refused, "reason", "fcrdns"),
            pregreet: labelled(&refused, "reason", "pregreet"),
            recipients_accepted: Counter::default(),
            messages_delivered: labelled(&deliveries, "result", "delivered"),
            messages_rejected: labelled(&deliveries, "result", "rejected"),
            messages_failed: labelled(&deliveries, "result", "failed"),
            oversize_refused: labelled(&deliveries, "result", "oversize"),
            long_line_refused: labelled(&deliveries, "result", "line_too_long"),
            smuggling_refused: labelled(&deliveries, "result", "smuggling"),
            transactions_lost: labelled(&deliveries, "result", "lost"),
            timeouts: labelled(&disconnects, "reason", "timeout"),
            error_limit_disconnects: labelled(&disconnects, "reason", "error_limit"),
            command_limit_disconnects: labelled(&disconnects, "reason", "command_limit"),
            session_time_disconnects: labelled(&disconnects, "reason", "session_time"),
            write_timeouts: labelled(&disconnects, "reason", "write_timeout"),
            shutdown_disconnects: labelled(&disconnects, "reason", "shutdown"),
            not_smtp_disconnects: labelled(&disconnects, "reason", "not_smtp"),
            upstream_failures: labelled(&upstream_errors, "error", "failed"),
            upstream_busy: labelled(&upstream_errors, "error", "busy"),
            transactions_replayed: Counter::default(),
            upstream_reused: Counter::default(),
            relay_denied: RelayReason::ALL
                .iter()
                .map(|r| labelled(&relay_denied_family, "reason", r.name()))
                .collect(),
            proxy_header_invalid: labelled(&proxy_refused, "reason", "invalid"),
            proxy_header_untrusted: labelled(&proxy_refused, "reason", "untrusted"),
            proxy_local_closed: labelled(&proxy_refused, "reason", "local"),
            proxy_refused,
            refused,
            deliveries,
            disconnects,
            upstream_errors,
            relay_denied_family,
        }
    }
}

impl SmtpStats {
    pub fn bump(counter: &Counter) {
        counter.inc();
    }

    pub fn relay_denied(&self, reason: RelayReason) {
        let index = RelayReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        self.relay_denied[index].inc();
    }

    /// Counts a new client connection and holds it in `sessions` until dropped.
    pub fn open_session(&self) -> OpenSession<'_> {
        self.connections.inc();
        self.sessions.inc();
        OpenSession {
            sessions: &self.sessions,
            accepted: Instant::now(),
        }
    }

    /// Registers every family under `gatekeeper_smtp_*`.
    pub fn register(&self, registry: &mut Registry) {
        let registry = registry.sub_registry_with_prefix("smtp");
        registry.register(
            "connections",
            "Client connections accepted by the SMTP front end",
            self.connections.clone(),
        );
        registry.register(
            "sessions",
            "Client connections open now",
            self.sessions.clone(),
        );
        registry.register_with_unit(
            "banner",
            "Time from accepting a connection to its first banner line (limits and DNSBL screen)",
            Unit::Seconds,
            self.banner_seconds.clone(),
        );
        registry.register(
            "refused",
            "Connections refused instead of (or at) the banner, by reason",
            self.refused.clone(),
        );
        registry.register(
            "recipients_accepted",
            "Recipients the MTA accepted",
            self.recipients_accepted.clone(),
        );
        registry.register(
            "relay_denied",
            "Recipients refused as third-party relay, by reason",
            self.relay_denied_family.clone(),
        );
        registry.register(
            "deliveries",
            "Messages by outcome at the end of DATA",
            self.deliveries.clone(),
        );
        registry.register(
            "disconnects",
            "Sessions ended by the front end, by reason",
            self.disconnects.clone(),
        );
        registry.register(
            "upstream_errors",
            "Failures talking to the MTA behind, by kind",
            self.upstream_errors.clone(),
        );
        registry.register(
            "proxy_refused",
            "Connections closed over their PROXY header (invalid or late from a balancer, sent by an untrusted client, or a balancer health check)",
            self.proxy_refused.clone(),
        );
        registry.register(
            "auth",
            "AUTH exchanges by result (success and failure as the MTA behind answered; refused by the front end)",
            self.auth.clone(),
        );
        registry.register(
            "helo_refused",
            "EHLO/HELO greetings refused, by reason",
            self.helo_refused.clone(),
        );
        registry.register(
            "sender_denied",
            "MAIL FROM addresses refused by denied_sender_domains",
            self.sender_denied.clone(),
        );
        registry.register(
            "greylist",
            "Greylisting decisions on recipients, by result",
            self.greylist.clone(),
        );
        registry.register(
            "relay_authorized",
            "Foreign recipients relayed for clients outside relay_networks, by what allowed it",
            self.relay_authorized.clone(),
        );
        registry.register(
            "transactions_replayed",
            "Transactions replayed on a fresh upstream session after the MTA failed",
            self.transactions_replayed.clone(),
        );
        registry.register(
            "upstream_sessions_reused",
            "Transactions carried by a pooled upstream session re-targeted at their client (upstream_pool)",
            self.upstream_reused.clone(),
        );
    }

    pub fn report(&self) -> SmtpStatsReport {
        SmtpStatsReport {
            connections: self.connections.get(),
            refused_connection_limit: self.refused_connection_limit.get(),
            refused_dnsbl: self.refused_dnsbl.get(),
            refused_denylisted: self.refused_denylisted.get(),
            pregreet: self.pregreet.get(),
            recipients_accepted: self.recipients_accepted.get(),
            messages_delivered: self.messages_delivered.get(),
            upstream_failures: self.upstream_failures.get(),
            smuggling_refused: self.smuggling_refused.get(),
            oversize_refused: self.oversize_refused.get(),
            timeouts: self.timeouts.get(),
            error_limit_disconnects: self.error_limit_disconnects.get(),
            refused_connection_rate: self.refused_connection_rate.get(),
            command_limit_disconnects: self.command_limit_disconnects.get(),
            session_time_disconnects: self.session_time_disconnects.get(),
            write_timeouts: self.write_timeouts.get(),
            upstream_busy: self.upstream_busy.get(),
            transactions_replayed: self.transactions_replayed.get(),
            upstream_reused: self.upstream_reused.get(),
            transactions_lost: self.transactions_lost.get(),
            shutdown_disconnects: self.shutdown_disconnects.get(),
            not_smtp_disconnects: self.not_smtp_disconnects.get(),
            proxy_header_invalid: self.proxy_header_invalid.get(),
            proxy_header_untrusted: self.proxy_header_untrusted.get(),
            proxy_local_closed: self.proxy_local_closed.get(),
            relay_denied: RelayReason::ALL
                .iter()
                .zip(&self.relay_denied)
                .map(|(reason, count)| (reason.name().to_owned(), count.get()))
                .collect(),
            refused_fcrdns: self.refused_fcrdns.get(),
            auth_successes: self.auth_successes.get(),
            auth_failures: self.auth_failures.get(),
            auth_refused: self.auth_refused.get(),
            helo_refused_claims_us: self.helo_refused_claims_us.get(),
            helo_refused_not_fqdn: self.helo_refused_not_fqdn.get(),
            sender_denied: self.sender_denied.get(),
            greylist_deferred: self.greylist_deferred.get(),
            greylist_passed: self.greylist_passed.get(),
            greylist_known: self.greylist_known.get(),
            relay_by_auth: self.relay_by_auth.get(),
            relay_by_grant: self.relay_by_grant.get(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON report and the exposition read the same handles.
    #[test]
    fn report_and_exposition_agree() {
        let stats = SmtpStats::default();
        let mut registry = crate::metrics::new_registry();
        stats.register(&mut registry);
        {
            let _open = stats.open_session();
            SmtpStats::bump(&stats.messages_delivered);
            stats.relay_denied(RelayReason::PercentHack);
            stats.relay_denied(RelayReason::PercentHack);
            SmtpStats::bump(&stats.error_limit_disconnects);
        }
        let report = stats.report();
        assert_eq!(report.connections, 1);
        assert_eq!(report.relay_denied["percent_hack"], 2);
        let (_, body) = crate::metrics::encode(&registry, None);
        for line in [
            "gatekeeper_smtp_connections_total 1\n",
            "gatekeeper_smtp_sessions 0\n",
            "gatekeeper_smtp_relay_denied_total{reason=\"percent_hack\"} 2\n",
            "gatekeeper_smtp_relay_denied_total{reason=\"foreign_domain\"} 0\n",
            "gatekeeper_smtp_deliveries_total{result=\"delivered\"} 1\n",
            "gatekeeper_smtp_disconnects_total{reason=\"error_limit\"} 1\n",
            "# TYPE gatekeeper_smtp_banner_seconds histogram\n",
        ] {
            assert!(body.contains(line), "{line:?} missing from\n{body}");
        }
    }
}
