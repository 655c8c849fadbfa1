//! The daemon's Prometheus registry: the SMTP and DNSBL families the services
//! own, plus what is read at scrape time (XDP per-CPU counters, list sizes,
//! kernel DNSBL entries, uptime).

use std::fmt;
use std::sync::Arc;

use gatekeeper_common::Counter as Xdp;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tracing::debug;

use super::router::Router;
use crate::lists::ListKind;

/// Every metric of the running daemon, registered once at start-up.
pub fn registry(router: Arc<Router>) -> Registry {
    let mut registry = crate::metrics::new_registry();
    registry.register(
        "build",
        "The running build",
        Info::new([("version", env!("CARGO_PKG_VERSION"))]),
    );
    if let Some(smtp) = &router.smtp_stats {
        smtp.register(&mut registry);
    }
    router
        .screen
        .register(registry.sub_registry_with_prefix("dnsbl"));
    router.ledgers.register(&mut registry);
    if let Some((_, stats)) = &router.cluster {
        stats.register(&mut registry);
    }
    registry.register_collector(Box::new(ScrapeTime(router)));
    registry
}

/// Values that live in the kernel or the stores, read on each scrape.
struct ScrapeTime(Arc<Router>);

impl fmt::Debug for ScrapeTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ScrapeTime")
    }
}

/// `(verdict label, counter)` for protected SYNs; the labels are `check`'s `xdp_verdict` names.
const SYN_VERDICTS: [(&str, Xdp); 4] = [
    ("pass", Xdp::Passed),
    ("pass_allow", Xdp::PassedAllow),
    ("drop_deny", Xdp::DroppedDeny),
    ("drop_dnsbl", Xdp::DroppedDnsbl),
];

impl Collector for ScrapeTime {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let router = &self.0;
        match router.kernel.counters() {
            Ok(xdp) => {
                counter(
                    &mut encoder,
                    "xdp_packets",
                    "Packets XDP looked at",
                    xdp.get(Xdp::Packets),
                )?;
                labelled_counters(
                    &mut encoder,
                    "xdp_syn_verdicts",
                    "TCP SYNs to protected ports by XDP verdict",
                    SYN_VERDICTS.map(|(verdict, c)| ([("verdict", verdict)], xdp.get(c))),
                )?;
                counter(
                    &mut encoder,
                    "xdp_unparsable",
                    "Frames XDP could not parse (dropped by the kernel too)",
                    xdp.get(Xdp::Unparsable),
                )?;
                let unwalkable = xdp.get(Xdp::Unwalkable);
                let dropped = xdp.get(Xdp::DroppedUnwalkable);
                labelled_counters(
                    &mut encoder,
                    "xdp_unwalkable",
                    "Packets whose TCP header XDP cannot reach, judged on their source alone",
                    [
                        ([("verdict", "drop")], dropped),
                        ([("verdict", "pass")], unwalkable.saturating_sub(dropped)),
                    ],
                )?;
            }
            Err(e) => debug!(error = %format!("{e:#}"), "XDP counters unreadable at scrape"),
        }
        let mut entries = Vec::with_capacity(4);
        for (kind, list) in [(ListKind::Deny, "deny"), (ListKind::Allow, "allow")] {
            let (v4, v6) = router.lists.family_counts(kind);
            entries.push(([("list", list), ("family", "ipv4")], v4 as i64));
            entries.push(([("list", list), ("family", "ipv6")], v6 as i64));
        }
        let mut family = encoder.encode_descriptor(
            "list_entries",
            "Entries in the deny and allow lists",
            None,
            MetricType::Gauge,
        )?;
        for (labels, value) in &entries {
            ConstGauge::new(*value).encode(family.encode_family(labels)?)?;
        }
        if let Some(dnsbl) = router.screen.report() {
            gauge(
                &mut encoder,
                "dnsbl_kernel_entries",
                "Live DNSBL entries in the kernel maps (dropped by XDP)",
                dnsbl.kernel_entries as i64,
            )?;
            gauge(
                &mut encoder,
                "dnsbl_cache_entries",
                "Verdicts in the DNSBL cache",
                dnsbl.engine.cache_entries as i64,
            )?;
        }
        let (bans, grants, greylist) = router.ledgers.report();
        gauge(
            &mut encoder,
            "bans_active",
            "Live auto-bans in the kernel denylist",
            bans.active as i64,
        )?;
        gauge(
            &mut encoder,
            "relay_grants",
            "Live relay grants (POP-before-SMTP)",
            grants as i64,
        )?;
        if let Some(greylist) = greylist {
            let mut family = encoder.encode_descriptor(
                "greylist_entries",
                "Greylist entries: triplets waiting for a retry, networks passed",
                None,
                MetricType::Gauge,
            )?;
            for (table, value) in [("triplets", greylist.triplets), ("passed", greylist.passed)] {
                ConstGauge::new(value as i64).encode(family.encode_family(&[("table", table)])?)?;
            }
        }
        gauge(
            &mut encoder,
            "uptime_seconds",
            "Seconds since the daemon started",
            router.started.elapsed().as_secs() as i64,
        )
    }
}

fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> fmt::Result {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn labelled_counters<const N: usize>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: [([(&'static str, &'static str); 1], u64); N],
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in &values {
        ConstCounter::new(*value).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}
