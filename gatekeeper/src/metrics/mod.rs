//! The Prometheus endpoint: `[metrics]` config, label helpers shared by the
//! modules that own metric families, and the `/metrics` HTTP server.
//!
//! One [`Registry`] holds every metric; the SMTP front end, the DNSBL engine
//! and the daemon register their own families in it, and `stats --json`
//! reads the same handles, so the two views cannot disagree.

mod http;

use std::net::SocketAddr;

use prometheus_client::encoding::{prometheus_text, text};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::Deserialize;

pub use http::{bind, serve};

/// The OpenMetrics text format, served when the scraper asks for it.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `[metrics]`: present means serve `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the HTTP endpoint; loopback by default, as exporters are.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9425))
}

/// One fixed label: labels are static names, so cardinality stays bounded.
pub type Label = [(&'static str, &'static str); 1];

/// A counter family keyed by one static label.
pub type Labelled = Family<Label, Counter>;

/// The handle of `family{key="value"}`, created now so it is exported as 0
/// before the first event and the hot path never takes the family lock.
pub fn labelled(family: &Labelled, key: &'static str, value: &'static str) -> Counter {
    family.get_or_create_owned(&[(key, value)])
}

/// The registry every part of the daemon registers in.
pub fn new_registry() -> Registry {
    Registry::with_prefix("gatekeeper")
}

/// The exposition in the format the `Accept` header prefers: OpenMetrics if
/// it names it (Prometheus does), else the classic text format 0.0.4.
pub fn encode(registry: &Registry, accept: Option<&str>) -> (&'static str, String) {
    let mut body = String::new();
    let openmetrics = accept.is_some_and(|a| a.contains("application/openmetrics-text"));
    // Writing into a String only fails if a collector fails, and ours do not.
    let (content_type, result) = if openmetrics {
        (OPENMETRICS_CONTENT_TYPE, text::encode(&mut body, registry))
    } else {
        (
            prometheus_text::CONTENT_TYPE,
            prometheus_text::encode(&mut body, registry),
        )
    };
    if let Err(e) = result {
        tracing::warn!(error = %e, "encoding the metrics failed");
    }
    (content_type, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labelled_counters_are_exported_before_their_first_event() {
        let mut registry = new_registry();
        let family = Labelled::default();
        registry.register("things", "Things by kind", family.clone());
        let a = labelled(&family, "kind", "a");
        let _b = labelled(&family, "kind", "b");
        a.inc();
        let (content_type, body) = encode(&registry, None);
        assert_eq!(content_type, prometheus_text::CONTENT_TYPE);
        assert!(
            body.contains("gatekeeper_things_total{kind=\"a\"} 1\n"),
            "{body}"
        );
        assert!(
            body.contains("gatekeeper_things_total{kind=\"b\"} 0\n"),
            "{body}"
        );
        let (content_type, body) = encode(
            &registry,
            Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5"),
        );
        assert_eq!(content_type, OPENMETRICS_CONTENT_TYPE);
        assert!(body.ends_with("# EOF\n"), "{body}");
    }

    #[test]
    fn config_defaults_to_loopback_and_refuses_unknown_keys() {
        let config: MetricsConfig = toml::from_str("").unwrap();
        assert_eq!(config.listen, "127.0.0.1:9425".parse().unwrap());
        assert!(toml::from_str::<MetricsConfig>("listen = \"nonsense\"").is_err());
        assert!(toml::from_str::<MetricsConfig>("port = 1").is_err());
    }
}
