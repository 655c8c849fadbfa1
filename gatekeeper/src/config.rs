//! The TOML configuration contract.
//!
//! Key names here are relied on by operators and tests: add keys, never rename.
//! Unknown keys are errors so a typo cannot silently fall back to a default.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::findings::{duplicates, Findings};

pub mod check;

pub const DEFAULT_PATH: &str = "/etc/gatekeeper/gatekeeper.toml";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub interfaces: Vec<String>,
    #[serde(default)]
    pub xdp_mode: XdpModeSetting,
    #[serde(default = "default_protected_ports")]
    pub protected_ports: Vec<u16>,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    /// Members of this group (primary or supplementary) may use the control
    /// socket too, which is then group-owned 0660; absent: root only (0600).
    #[serde(default)]
    pub control_group: Option<String>,
    #[serde(default = "default_bpffs_dir")]
    pub bpffs_dir: PathBuf,
    #[serde(default)]
    pub maps: MapCapacities,
    /// Journal bytes after which the lists are compacted into their
    /// snapshots (at least the snapshot's own size is always allowed).
    #[serde(default = "default_journal_compact_bytes")]
    pub journal_compact_bytes: u64,
    /// The SMTP relay checker; absent: no SMTP front end.
    pub smtp: Option<crate::smtp::SmtpConfig>,
    /// DNSBL checks at connection time; absent: none.
    pub dnsbl: Option<crate::dnsbl::DnsblConfig>,
    /// Lists fetched and refreshed on an interval (`[[feeds]]`).
    #[serde(default)]
    pub feeds: Vec<crate::feeds::FeedConfig>,
    /// The Prometheus endpoint; absent: none.
    pub metrics: Option<crate::metrics::MetricsConfig>,
    /// Auto-bans of abusive SMTP clients into the kernel denylist; absent: none.
    pub bans: Option<crate::ledger::bans::BansConfig>,
    /// Greylisting of first delivery attempts (`enabled = true` to turn on).
    pub greylist: Option<crate::ledger::greylist::GreylistConfig>,
    /// The fleet's shared verdicts through Redis; absent: this host alone.
    pub cluster: Option<crate::cluster::ClusterConfig>,
    #[serde(default)]
    pub log_format: LogFormat,
    /// `RUST_LOG`, when set, overrides it.
    #[serde(default)]
    pub log_level: LogLevel,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One line per event, `key=value` fields.
    #[default]
    Text,
    /// One JSON object per event (tracing-subscriber's json format).
    Json,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    /// The `EnvFilter` directive.
    pub fn directive(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeSetting {
    /// Native (driver) mode where the driver supports it, generic otherwise.
    #[default]
    Auto,
    Native,
    Skb,
}

/// Kernel map capacities, fixed at load time. LPM tries are created with
/// `BPF_F_NO_PREALLOC`, so a large capacity costs nothing until used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MapCapacities {
    pub deny_v4: u32,
    pub deny_v6: u32,
    pub allow_v4: u32,
    pub allow_v6: u32,
    pub dnsbl_v4: u32,
    pub dnsbl_v6: u32,
}

impl Default for MapCapacities {
    fn default() -> Self {
        use gatekeeper_common::capacity;
        MapCapacities {
            deny_v4: capacity::DENY_V4,
            deny_v6: capacity::DENY_V6,
            allow_v4: capacity::ALLOW_V4,
            allow_v6: capacity::ALLOW_V6,
            dnsbl_v4: capacity::DNSBL_V4,
            dnsbl_v6: capacity::DNSBL_V6,
        }
    }
}

fn default_journal_compact_bytes() -> u64 {
    crate::lists::store::StoreOptions::DEFAULT_COMPACT_BYTES
}

fn default_protected_ports() -> Vec<u16> {
    vec![25]
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/gatekeeper")
}
fn default_control_socket() -> PathBuf {
    PathBuf::from("/run/gatekeeper/control.sock")
}
fn default_bpffs_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/gatekeeper")
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Ok(Config::load_with_warnings(path)?.0)
    }

    /// The config and the warnings `gatekeeper config check` would print.
    pub fn load_with_warnings(path: &Path) -> Result<(Config, Vec<String>), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let invalid = |message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        let (config, findings) = check::check_text(&text);
        let warnings = findings.warnings.clone();
        findings.into_result().map_err(invalid)?;
        let config = config.ok_or_else(|| invalid("unreadable config".into()))?;
        Ok((config, warnings))
    }

    /// Parses and validates; the error is one line naming every offending key.
    pub fn parse(text: &str) -> Result<Config, String> {
        let (config, findings) = check::check_text(text);
        findings.into_result()?;
        config.ok_or_else(|| "unreadable config".to_owned())
    }

    /// The checks that need the whole config; `check_text` runs them.
    fn check(&self, findings: &mut Findings) {
        if self.protected_ports.is_empty() {
            findings.error("protected_ports: must list at least one port");
        }
        if self.protected_ports.contains(&0) {
            findings.error("protected_ports: port 0 is not a valid TCP port");
        }
        for message in duplicates("protected_ports", &self.protected_ports) {
            findings.warn(message);
        }
        for (i, name) in self.interfaces.iter().enumerate() {
            if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
                findings.error(format!(
                    "interfaces[{i}]: '{name}' is not a valid interface name"
                ));
            }
        }
        for message in duplicates("interfaces", &self.interfaces) {
            findings.error(message);
        }
        for (key, value) in [
            ("maps.deny_v4", self.maps.deny_v4),
            ("maps.deny_v6", self.maps.deny_v6),
            ("maps.allow_v4", self.maps.allow_v4),
            ("maps.allow_v6", self.maps.allow_v6),
            ("maps.dnsbl_v4", self.maps.dnsbl_v4),
            ("maps.dnsbl_v6", self.maps.dnsbl_v6),
        ] {
            if value == 0 {
                findings.error(format!("{key}: capacity must be at least 1"));
            }
        }
        if let Some(group) = &self.control_group {
            if group.is_empty()
                || group.contains(|c: char| c.is_whitespace() || c == ':' || c == '/')
            {
                findings.error(format!("control_group: '{group}' is not a group name"));
            }
        }
        if self.journal_compact_bytes == 0 {
            findings.error("journal_compact_bytes: must be at least 1");
        }
        if let Some(smtp) = &self.smtp {
            smtp.check(findings);
            // XDP judges SYNs to protected_ports only; the screen still
            // refuses listed clients on other ports, after the handshake.
            for (i, addr) in smtp.listen.iter().enumerate() {
                if !self.protected_ports.contains(&addr.port()) {
                    findings.warn(format!(
                        "smtp.listen[{i}]: port {} is not in protected_ports: XDP will not drop listed sources' SYNs to it (the SMTP front end still refuses them)",
                        addr.port()
                    ));
                }
            }
        }
        if let Some(dnsbl) = &self.dnsbl {
            dnsbl.check(findings);
            if self.smtp.is_none() {
                findings
                    .error("dnsbl: DNSBL checks run at SMTP connection time; configure [smtp] too");
            }
        }
        if let Some(bans) = &self.bans {
            bans.check(findings);
        }
        if let Some(greylist) = &self.greylist {
            greylist.check(findings);
        }
        if let Some(cluster) = &self.cluster {
            cluster.check(findings);
        }
        if self.smtp.is_none()
            && (self.bans.is_some() || self.greylist.as_ref().is_some_and(|g| g.enabled))
        {
            findings.error("bans/greylist: they judge SMTP clients; configure [smtp] too");
        }
        if let Err(message) = crate::feeds::config::validate(&self.feeds) {
            findings.error(message);
        }
        for (key, path) in [
            ("state_dir", &self.state_dir),
            ("control_socket", &self.control_socket),
            ("bpffs_dir", &self.bpffs_dir),
        ] {
            if !path.is_absolute() {
                findings.error(format!(
                    "{key}: '{}' must be an absolute path",
                    path.display()
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTRACT: &str = r#"
interfaces = ["eth0"]
xdp_mode = "auto"
protected_ports = [25]
state_dir = "/var/lib/gatekeeper"
control_socket = "/run/gatekeeper/control.sock"
control_group = "gatekeeper"
bpffs_dir = "/sys/fs/bpf/gatekeeper"

[smtp]
listen = ["0.0.0.0:25", "[::]:25"]
hostname = "mx.example.org"
local_domains = ["example.org"]
relay_networks = ["127.0.0.0/8", "::1/128"]
upstream = "127.0.0.1:10025"

[dnsbl]
nameservers = []
zones = ["zen.spamhaus.org=127.0.0.[2..11]*3", "list.dnswl.org=127.0.[0..255].[1..3]*-2"]
threshold = 3
"#;

    #[test]
    fn accepts_the_documented_contract() {
        let config = Config::parse(CONTRACT).unwrap();
        assert_eq!(config.interfaces, ["eth0"]);
        assert_eq!(config.xdp_mode, XdpModeSetting::Auto);
        assert_eq!(config.protected_ports, [25]);
        assert_eq!(config.bpffs_dir, Path::new("/sys/fs/bpf/gatekeeper"));
        assert_eq!(config.control_group.as_deref(), Some("gatekeeper"));
        assert_eq!(config.maps, MapCapacities::default());
        assert!(config.maps.deny_v4 >= 1_000_000 && config.maps.deny_v6 >= 100_000);
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let config = Config::parse("interfaces = []").unwrap();
        assert_eq!(config.protected_ports, [25]);
        assert_eq!(config.state_dir, Path::new("/var/lib/gatekeeper"));
        assert_eq!(config.control_group, None);
        assert_eq!(config.metrics, None);
        assert_eq!(config.log_format, LogFormat::Text);
        assert_eq!(config.log_level, LogLevel::Info);
    }

    #[test]
    fn metrics_and_log_keys() {
        let config = Config::parse(
            "interfaces = []\nlog_format = \"json\"\nlog_level = \"debug\"\n[metrics]\nlisten = \"[::1]:9100\"",
        )
        .unwrap();
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(config.log_level, LogLevel::Debug);
        assert_eq!(
            config.metrics.unwrap().listen,
            "[::1]:9100".parse().unwrap()
        );
        let config = Config::parse("interfaces = []\n[metrics]").unwrap();
        assert_eq!(
            config.metrics.unwrap().listen,
            "127.0.0.1:9425".parse().unwrap()
        );
    }

    #[test]
    fn errors_name_the_offending_key() {
        let cases = [
            ("interfaces = [\"eth0\"]\nxdp_mode = \"turbo\"", "xdp_mode"),
            ("interfaces = [\"eth0\"]\nintrefaces = 1", "intrefaces"),
            (
                "interfaces = [\"eth0\"]\nprotected_ports = [70000]",
                "protected_ports[0]",
            ),
            (
                "interfaces = [\"eth0\"]\nprotected_ports = []",
                "protected_ports",
            ),
            (
                "interfaces = [\"eth0\"]\nstate_dir = \"rel/dir\"",
                "state_dir",
            ),
            (
                "interfaces = [\"eth0\"]\n[maps]\ndeny_v4 = 0",
                "maps.deny_v4",
            ),
            ("xdp_mode = \"auto\"", "interfaces"),
            ("interfaces = []\ncontrol_group = \"\"", "control_group"),
            ("interfaces = []\ncontrol_group = \"a b\"", "control_group"),
            (
                "interfaces = []\n[smtp]\nupstream = \"127.0.0.1:10025\"\npregreet_deny_ttl = \"11y\"",
                "smtp.pregreet_deny_ttl",
            ),
            ("interfaces = []\nlog_format = \"xml\"", "log_format"),
            ("interfaces = []\nlog_level = \"loud\"", "log_level"),
            ("interfaces = []\n[metrics]\nlisten = \"localhost\"", "listen"),
            ("interfaces = []\n[metrics]\nport = 9425", "port"),
            (
                "interfaces = []\n[[feeds]]\nname = \"drop\"\nurl = \"file:///x\"\nlist = \"deny\"",
                "feeds[0].url",
            ),
        ];
        for (text, expected) in cases {
            let err = Config::parse(text).unwrap_err();
            assert!(err.contains(expected), "{text:?} gave {err:?}");
            assert!(!err.contains('\n'), "multi-line error {err:?}");
        }
    }
}
