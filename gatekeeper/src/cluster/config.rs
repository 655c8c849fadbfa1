//! `[cluster]`: where the fleet's Redis is and how this host is named there.

use serde::Deserialize;

use super::wire::valid_node_name;
use crate::findings::Findings;

#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// `redis://[:password@]host:port/db` or `rediss://…` (TLS).
    pub redis: String,
    /// Every key this fleet uses starts with it, so fleets can share a Redis.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// This host's name in the fleet (verdicts carry it; its own echoes are ignored).
    #[serde(default = "default_node_name")]
    pub node_name: String,
}

/// The URL's password never reaches a log or `config check` output.
impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("redis", &self.redacted_url())
            .field("key_prefix", &self.key_prefix)
            .field("node_name", &self.node_name)
            .finish()
    }
}

fn default_key_prefix() -> String {
    "gatekeeper".into()
}

fn default_node_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .map(|h| h.split('.').next().unwrap_or_default().to_owned())
        .filter(|h| valid_node_name(h))
        .unwrap_or_else(|| "gatekeeper".into())
}

impl ClusterConfig {
    /// The URL with any password replaced, for logs and status.
    pub fn redacted_url(&self) -> String {
        match url::Url::parse(&self.redis) {
            Ok(mut url) if url.password().is_some() => {
                let _ = url.set_password(Some("REDACTED"));
                url.to_string()
            }
            Ok(url) => url.to_string(),
            Err(_) => "(invalid URL)".into(),
        }
    }

    pub fn check(&self, findings: &mut Findings) {
        match url::Url::parse(&self.redis) {
            Ok(url) if matches!(url.scheme(), "redis" | "rediss") => {
                if let Err(e) = redis::Client::open(self.redis.as_str()) {
                    findings.error(format!("cluster.redis: {}: {e}", self.redacted_url()));
                }
            }
            Ok(url) => findings.error(format!(
                "cluster.redis: scheme '{}' is not redis:// or rediss://",
                url.scheme()
            )),
            Err(e) => findings.error(format!("cluster.redis: not a URL: {e}")),
        }
        let prefix_ok = !self.key_prefix.is_empty()
            && self.key_prefix.len() <= 64
            && self
                .key_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'.' | b'_' | b'-'));
        if !prefix_ok {
            findings.error(format!(
                "cluster.key_prefix: '{}' must be 1-64 of A-Z a-z 0-9 : . _ -",
                self.key_prefix
            ));
        }
        if !valid_node_name(&self.node_name) {
            findings.error(format!(
                "cluster.node_name: '{}' must be 1-64 of A-Z a-z 0-9 . _ -",
                self.node_name
            ));
        }
    }

    /// The stream of ordered deltas.
    pub fn stream_key(&self) -> String {
        format!("{}:verdicts", self.key_prefix)
    }

    /// The live shared set: field `kind|prefix` → the verdict's JSON.
    pub fn live_key(&self) -> String {
        format!("{}:live", self.key_prefix)
    }

    /// The same fields scored by expiry, so a sweep finds the dead ones.
    pub fn expiry_key(&self) -> String {
        format!("{}:expiry", self.key_prefix)
    }

    /// Node name → unix seconds of its last heartbeat.
    pub fn nodes_key(&self) -> String {
        format!("{}:nodes", self.key_prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(redis: &str) -> ClusterConfig {
        ClusterConfig {
            redis: redis.into(),
            key_prefix: "gatekeeper".into(),
            node_name: "edge-a".into(),
        }
    }

    #[test]
    fn the_password_is_redacted() {
        let c = config("redis://:hunter2@192.0.2.1:6379/0");
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(c.redacted_url().contains("REDACTED"));
    }

    #[test]
    fn bad_urls_and_names_are_errors() {
        for (c, key) in [
            (config("http://192.0.2.1"), "cluster.redis"),
            (config("not a url"), "cluster.redis"),
            (
                ClusterConfig {
                    node_name: "edge a".into(),
                    ..config("redis://192.0.2.1")
                },
                "cluster.node_name",
            ),
            (
                ClusterConfig {
                    key_prefix: String::new(),
                    ..config("rediss://192.0.2.1")
                },
                "cluster.key_prefix",
            ),
        ] {
            let mut findings = Findings::default();
            c.check(&mut findings);
            let errors = findings.into_result().unwrap_err();
            assert!(errors.contains(key), "{errors}");
        }
        let mut findings = Findings::default();
        config("rediss://:pw@192.0.2.1:6380/2").check(&mut findings);
        assert!(findings.into_result().is_ok());
    }
}
