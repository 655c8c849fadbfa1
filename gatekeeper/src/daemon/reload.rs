//! Reloading the config live (SIGHUP, `gatekeeper reload`): what may change
//! without a restart, and applying it without dropping a session.
//!
//! Everything that can fail without side effects (reading and checking the
//! file, loading TLS keys, building the DNSBL resolver and judging the zones)
//! happens before anything is applied, so a bad file or key leaves the
//! running config untouched. Open SMTP sessions keep the settings they
//! started with; the XDP program stays attached (same program id).

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::lists::ListService;
use super::screen::ScreenService;
use super::{notify, pregreet_hook, until_cancelled};
use crate::config::check::check_text;
use crate::config::Config;
use crate::control::protocol::{ReloadSummary, Reply};
use crate::dnsbl::DnsblEngine;
use crate::kernel::Kernel;
use crate::smtp::SmtpContext;

/// Keys whose change needs a restart: they size or place what only a
/// start creates (maps, pins, files, sockets).
pub fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut keys = Vec::new();
    let mut differs = |key, changed: bool| {
        if changed {
            keys.push(key);
        }
    };
    differs("maps", old.maps != new.maps);
    differs("bpffs_dir", old.bpffs_dir != new.bpffs_dir);
    differs("state_dir", old.state_dir != new.state_dir);
    differs("control_socket", old.control_socket != new.control_socket);
    differs("control_group", old.control_group != new.control_group);
    differs("xdp_mode", old.xdp_mode != new.xdp_mode);
    differs(
        "journal_compact_bytes",
        old.journal_compact_bytes != new.journal_compact_bytes,
    );
    differs("metrics", old.metrics != new.metrics);
    differs("log_format", old.log_format != new.log_format);
    differs("log_level", old.log_level != new.log_level);
    differs("feeds", old.feeds != new.feeds);
    differs("cluster", old.cluster != new.cluster);
    differs("smtp", old.smtp.is_some() != new.smtp.is_some());
    if let (Some(old), Some(new)) = (&old.smtp, &new.smtp) {
        differs("smtp.listen", old.listen != new.listen);
    }
    keys
}

/// The parts a reload changes, as the summary names them.
pub fn applied_changes(old: &Config, new: &Config) -> Vec<String> {
    [
        ("interfaces", old.interfaces != new.interfaces),
        (
            "protected_ports",
            old.protected_ports != new.protected_ports,
        ),
        ("smtp", old.smtp != new.smtp),
        ("dnsbl", old.dnsbl != new.dnsbl),
        ("bans", old.bans != new.bans),
        ("greylist", old.greylist != new.greylist),
    ]
    .into_iter()
    .filter(|(_, changed)| *changed)
    .map(|(part, _)| part.to_owned())
    .collect()
}

/// What a reload touches, owned by the daemon's main loop.
pub struct Live {
    pub path: PathBuf,
    pub config: Config,
    pub kernel: Kernel,
    pub screen: Arc<ScreenService>,
    pub lists: Arc<ListService>,
    pub ledgers: Arc<super::ledgers::Ledgers>,
    /// Publishes the context new SMTP connections get.
    pub smtp: Option<watch::Sender<Arc<SmtpContext>>>,
    /// Stops the current DNSBL engine's health checks when it is replaced.
    pub health_watch: Option<CancellationToken>,
    pub tasks: TaskTracker,
    pub shutdown: CancellationToken,
}

impl Live {
    /// Re-reads the file and applies it; the reply says what changed or,
    /// as `invalid_input`, every reason nothing did.
    pub async fn reload(&mut self) -> Reply {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) => return Reply::invalid(format!("cannot read {}: {e}", self.path.display())),
        };
        let (config, findings) = check_text(&text);
        let config = match config {
            Some(config) if findings.is_ok() => config,
            _ => return Reply::invalid(findings.errors.join("\n")),
        };
        let restart = restart_only_changes(&self.config, &config);
        if !restart.is_empty() {
            return Reply::invalid(format!(
                "changed keys that need a restart: {} (restore them to reload the rest, or restart)",
                restart.join(", ")
            ));
        }
        notify::reloading().await;
        let result = self.apply(config).await;
        notify::ready().await;
        match result {
            Ok(applied) => {
                info!(applied = ?applied, warnings = findings.warnings.len(), "config reloaded");
                for warning in &findings.warnings {
                    warn!("config: {warning}");
                }
                Reply::Reloaded(ReloadSummary {
                    applied,
                    warnings: findings.warnings,
                })
            }
            Err(e) => {
                warn!(error = %format!("{e:#}"), "reload failed; the running config is unchanged");
                Reply::failed(format!("{e:#}; the running config is unchanged"))
            }
        }
    }

    async fn apply(&mut self, config: Config) -> anyhow::Result<Vec<String>> {
        let applied = applied_changes(&self.config, &config);
        // Fallible preparation first: nothing is applied if any of it fails.
        let smtp = match (&self.smtp, &config.smtp) {
            // The denied-senders file is re-read on every reload.
            (Some(publish), Some(smtp))
                if self.config.smtp.as_ref() != Some(smtp)
                    || smtp.denied_sender_domains_file.is_some() =>
            {
                let hook = pregreet_hook(smtp, self.lists.clone());
                Some(publish.borrow().successor(smtp.clone(), hook)?)
            }
            _ => None,
        };
        let engine = if self.config.dnsbl != config.dnsbl {
            match config.dnsbl.clone() {
                Some(dnsbl) => {
                    // A successor keeps the registered metric series; an
                    // engine new since start is served, its metrics after a restart.
                    let engine = match self.screen.engine() {
                        Some(old) => old.successor(dnsbl)?,
                        None => DnsblEngine::new(dnsbl)?,
                    };
                    engine.check_health().await;
                    Some(Some(engine))
                }
                None => Some(None),
            }
        } else {
            None
        };

        if self.config.interfaces != config.interfaces {
            self.kernel
                .set_interfaces(&config.interfaces, config.xdp_mode)?;
        }
        if self.config.protected_ports != config.protected_ports {
            self.kernel.set_protected_ports(&config.protected_ports)?;
        }
        if let Some(engine) = engine {
            if let Some(watch) = self.health_watch.take() {
                watch.cancel();
            }
            if let Some(engine) = &engine {
                let watch = self.shutdown.child_token();
                self.tasks.spawn(until_cancelled(
                    watch.clone(),
                    engine.clone().watch_health(),
                ));
                self.health_watch = Some(watch);
            }
            self.screen.reconfigure(engine, &config)?;
        } else if self.config.smtp.as_ref().map(|s| &s.relay_networks)
            != config.smtp.as_ref().map(|s| &s.relay_networks)
        {
            self.screen.reconfigure_relay_networks(&config);
        }
        if let (Some(publish), Some(next)) = (&self.smtp, smtp) {
            publish.send_replace(Arc::new(next));
        }
        if let Err(e) = self.screen.reconfigure_fcrdns(&config) {
            warn!(error = %format!("{e:#}"), "FCrDNS resolver not rebuilt; the previous one serves");
        }
        if self.config.bans != config.bans || self.config.greylist != config.greylist {
            self.ledgers
                .reconfigure(config.bans.as_ref(), config.greylist.as_ref());
        }
        self.config = config;
        Ok(applied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(text).unwrap()
    }

    const BASE: &str = "interfaces = [\"eth0\"]\n[smtp]\nupstream = \"127.0.0.1:10025\"\n";

    #[test]
    fn live_settings_need_no_restart() {
        let old = config(BASE);
        let new = config(&format!(
            "{}local_domains = [\"example.org\"]\nmax_errors = 3\n[dnsbl]\nzones = [\"bl.example.org\"]\n",
            BASE.replace("[\"eth0\"]", "[\"eth0\", \"eth1\"]\nprotected_ports = [25, 587]")
        ));
        assert!(restart_only_changes(&old, &new).is_empty());
        assert_eq!(
            applied_changes(&old, &new),
            ["interfaces", "protected_ports", "smtp", "dnsbl"]
        );
    }

    #[test]
    fn restart_keys_are_named() {
        let old = config(BASE);
        let new = config(&format!(
            "state_dir = \"/srv/gk\"\ncontrol_socket = \"/run/gk.sock\"\n{}listen = [\"127.0.0.1:2525\"]\n[maps]\ndeny_v4 = 5\n",
            BASE
        ));
        assert_eq!(
            restart_only_changes(&old, &new),
            ["maps", "state_dir", "control_socket", "smtp.listen"]
        );
        let without_smtp = config("interfaces = [\"eth0\"]");
        assert_eq!(restart_only_changes(&old, &without_smtp), ["smtp"]);
    }
}
