//! The `[dnsbl]` table. Key names are a contract: add, never rename.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::zone::ZoneSpec;
use crate::findings::{duplicates, Findings};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsblConfig {
    /// `zone[=filter][*weight]`, as in Postfix's `postscreen_dnsbl_sites`.
    pub zones: Vec<ZoneSpec>,
    /// A client whose summed weights reach this is refused and dropped in the kernel.
    #[serde(default = "default_threshold")]
    pub threshold: i32,
    /// A score at or below this (negative) value marks the client trusted; absent: off.
    pub allowlist_threshold: Option<i32>,
    #[serde(default = "one_minute", with = "humantime_serde")]
    pub min_ttl: Duration,
    #[serde(default = "one_hour", with = "humantime_serde")]
    pub max_ttl: Duration,
    /// A verdict is ready when every zone answered or at this deadline, never later.
    #[serde(default = "two_seconds", with = "humantime_serde")]
    pub timeout: Duration,
    /// Uncached checks running at once; more wait for a slot within the same deadline.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: usize,
    /// Verdicts kept (positive and negative), least recently used evicted first.
    #[serde(default = "default_cache_size")]
    pub cache_size: usize,
    /// `ip` or `ip:port` (`[v6]:port`); empty: the system resolver (/etc/resolv.conf).
    #[serde(default, deserialize_with = "nameservers")]
    pub nameservers: Vec<SocketAddr>,
    /// How often each zone's RFC 5782 test points are checked.
    #[serde(default = "five_minutes", with = "humantime_serde")]
    pub health_interval: Duration,
    /// Added to the score of a client without forward-confirmed reverse DNS
    /// (0: not looked up for scoring). Such a refusal is not fed into the
    /// kernel: a missing PTR is a weak sign, not a listing.
    #[serde(default)]
    pub fcrdns_weight: i32,
}

impl DnsblConfig {
    /// The first error, for callers that need one message.
    pub fn validate(&self) -> Result<(), String> {
        let mut findings = Findings::default();
        self.check(&mut findings);
        findings.into_result()
    }

    /// Every problem at once (`gatekeeper config check`, reload).
    pub fn check(&self, findings: &mut Findings) {
        if self.zones.is_empty() {
            findings.error("dnsbl.zones: list at least one zone");
        }
        for (i, zone) in self.zones.iter().enumerate() {
            if self.zones[..i].iter().any(|z| z.name == zone.name) {
                findings.error(format!(
                    "dnsbl.zones[{i}]: zone {} is listed twice",
                    zone.name
                ));
            }
        }
        if self.threshold < 1 {
            findings.error("dnsbl.threshold: must be at least 1");
        } else if !self.zones.is_empty() {
            // Every zone listing the client at once is the highest score there is.
            let reachable: i64 = self
                .zones
                .iter()
                .map(|z| i64::from(z.weight.max(0)))
                .sum::<i64>()
                + i64::from(self.fcrdns_weight.max(0));
            if reachable < i64::from(self.threshold) {
                findings.error(format!(
                    "dnsbl.threshold: {} cannot be reached: all zones listing a client together (with fcrdns_weight) score {reachable}",
                    self.threshold
                ));
            }
        }
        if let Some(t) = self.allowlist_threshold {
            if t >= 0 {
                findings.error("dnsbl.allowlist_threshold: must be negative (e.g. -1); a clean client scores 0");
            }
        }
        if self.min_ttl < Duration::from_secs(1) {
            findings.error("dnsbl.min_ttl: must be at least 1s");
        }
        if self.max_ttl < self.min_ttl {
            findings.error("dnsbl.max_ttl: must not be below dnsbl.min_ttl");
        }
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(30) {
            findings.error("dnsbl.timeout: must be between 1ms and 30s");
        }
        if self.max_inflight == 0 {
            findings.error("dnsbl.max_inflight: must be at least 1");
        }
        if self.cache_size == 0 {
            findings.error("dnsbl.cache_size: must be at least 1");
        }
        if self.health_interval < Duration::from_secs(1) {
            findings.error("dnsbl.health_interval: must be at least 1s");
        }
        for message in duplicates("dnsbl.nameservers", &self.nameservers) {
            findings.warn(message);
        }
    }

    /// Identifies the zone set; cached verdicts from a different set are discarded.
    pub fn fingerprint(&self) -> String {
        let zones: Vec<String> = self.zones.iter().map(ZoneSpec::to_string).collect();
        format!("{} threshold={}", zones.join(" "), self.threshold)
    }
}

impl<'de> Deserialize<'de> for ZoneSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        ZoneSpec::parse(&text)
            .map_err(|e| serde::de::Error::custom(format!("dnsbl.zones entry `{text}`: {e}")))
    }
}

fn nameservers<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<SocketAddr>, D::Error> {
    Vec::<String>::deserialize(deserializer)?
        .iter()
        .map(|text| {
            parse_nameserver(text).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "dnsbl.nameservers entry `{text}`: expected an IP address with an optional port, e.g. 127.0.0.1:53 or [::1]:53"
                ))
            })
        })
        .collect()
}

fn parse_nameserver(text: &str) -> Option<SocketAddr> {
    text.parse::<SocketAddr>().ok().or_else(|| {
        text.parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, 53))
    })
}

fn default_threshold() -> i32 {
    1
}
fn default_max_inflight() -> usize {
    512
}
fn default_cache_size() -> usize {
    100_000
}
fn one_minute() -> Duration {
    Duration::from_secs(60)
}
fn one_hour() -> Duration {
    Duration::from_secs(3600)
}
fn two_seconds() -> Duration {
    Duration::from_secs(2)
}
fn five_minutes() -> Duration {
    Duration::from_secs(300)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<DnsblConfig, String> {
        let config: DnsblConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        config.validate()?;
        Ok(config)
    }

    #[test]
    fn defaults_follow_the_contract() {
        let config = parse(r#"zones = ["bl.example.org"]"#).unwrap();
        assert_eq!(config.threshold, 1);
        assert_eq!(config.min_ttl, Duration::from_secs(60));
        assert_eq!(config.max_ttl, Duration::from_secs(3600));
        assert_eq!(config.timeout, Duration::from_secs(2));
        assert!(config.nameservers.is_empty());
    }

    #[test]
    fn nameservers_take_an_optional_port() {
        let config = parse(
            r#"zones = ["bl.example.org"]
nameservers = ["127.0.0.1:5353", "::1", "[::1]:5300"]"#,
        )
        .unwrap();
        let expected: Vec<SocketAddr> = ["127.0.0.1:5353", "[::1]:53", "[::1]:5300"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(config.nameservers, expected);
    }

    #[test]
    fn errors_name_the_entry() {
        let cases = [
            (
                r#"zones = ["zen.spamhaus.org=127.0.0.[2..11"]"#,
                "zen.spamhaus.org=127.0.0.[2..11",
            ),
            (
                r#"zones = ["bl.example.org"]
nameservers = ["dns.example.org"]"#,
                "dns.example.org",
            ),
            (r#"zones = []"#, "dnsbl.zones"),
            (r#"zones = ["bl.example.org", "BL.example.org"]"#, "twice"),
            (
                r#"zones = ["bl.example.org"]
threshold = 0"#,
                "dnsbl.threshold",
            ),
            (
                r#"zones = ["bl.example.org"]
allowlist_threshold = 0"#,
                "dnsbl.allowlist_threshold",
            ),
            (
                r#"zones = ["bl.example.org"]
min_ttl = "2h""#,
                "dnsbl.max_ttl",
            ),
        ];
        for (text, expected) in cases {
            let err = parse(text).unwrap_err();
            assert!(err.contains(expected), "{text:?} gave {err:?}");
        }
    }
}
