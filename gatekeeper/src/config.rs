//! The TOML configuration contract.
//!
//! Key names here are relied on by operators and tests: add keys, never rename.
//! Unknown keys are errors so a typo cannot silently fall back to a default.

use std::path::{Path, PathBuf};

use serde::Deserialize;

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
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text).map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses and validates; the error is one line naming the offending key.
    pub fn parse(text: &str) -> Result<Config, String> {
        let config: Config = toml::from_str(text).map_err(|e| describe_toml_error(text, &e))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        if self.protected_ports.is_empty() {
            return Err("protected_ports: must list at least one port".into());
        }
        if self.protected_ports.contains(&0) {
            return Err("protected_ports: port 0 is not a valid TCP port".into());
        }
        for (i, name) in self.interfaces.iter().enumerate() {
            if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
                return Err(format!(
                    "interfaces[{i}]: '{name}' is not a valid interface name"
                ));
            }
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
                return Err(format!("{key}: capacity must be at least 1"));
            }
        }
        if let Some(group) = &self.control_group {
            if group.is_empty()
                || group.contains(|c: char| c.is_whitespace() || c == ':' || c == '/')
            {
                return Err(format!("control_group: '{group}' is not a group name"));
            }
        }
        if self.journal_compact_bytes == 0 {
            return Err("journal_compact_bytes: must be at least 1".into());
        }
        if let Some(smtp) = &self.smtp {
            smtp.validate()?;
            let ttl = smtp.pregreet_deny_ttl;
            if !ttl.is_zero() && ttl.as_secs() > crate::lists::ttl::MAX_TTL_SECS {
                return Err(format!(
                    "smtp.pregreet_deny_ttl: over the maximum TTL of {} s (10y)",
                    crate::lists::ttl::MAX_TTL_SECS
                ));
            }
        }
        if let Some(dnsbl) = &self.dnsbl {
            dnsbl.validate()?;
            if self.smtp.is_none() {
                return Err(
                    "dnsbl: DNSBL checks run at SMTP connection time; configure [smtp] too".into(),
                );
            }
        }
        crate::feeds::config::validate(&self.feeds)?;
        for (key, path) in [
            ("state_dir", &self.state_dir),
            ("control_socket", &self.control_socket),
            ("bpffs_dir", &self.bpffs_dir),
        ] {
            if !path.is_absolute() {
                return Err(format!(
                    "{key}: '{}' must be an absolute path",
                    path.display()
                ));
            }
        }
        Ok(())
    }
}

/// Flattens toml's multi-line diagnostic into "line N: message".
fn describe_toml_error(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim().replace('\n', " ");
    match error.span() {
        Some(span) => {
            let start = span.start.min(text.len());
            let line_no = text[..start].matches('\n').count() + 1;
            let line = text.lines().nth(line_no - 1).unwrap_or("").trim();
            format!("line {line_no} `{line}`: {message}")
        }
        None => message,
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
    }

    #[test]
    fn errors_name_the_offending_key() {
        let cases = [
            ("interfaces = [\"eth0\"]\nxdp_mode = \"turbo\"", "xdp_mode"),
            ("interfaces = [\"eth0\"]\nintrefaces = 1", "intrefaces"),
            (
                "interfaces = [\"eth0\"]\nprotected_ports = [70000]",
                "line 2",
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
