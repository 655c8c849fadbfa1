//! The daemon's side of [`ClientMemory`]: relay grants, auto-bans and the
//! greylist, saved in `state_dir`, and bans put into the kernel denylist.
//!
//! Grants and bans are saved on every change (they are few and must not be
//! lost); the greylist, which changes with every new triplet, is saved every
//! [`GREYLIST_SAVE_INTERVAL`] and at shutdown: a crash forgets at most that
//! much, and a forgotten triplet only means one more deferral.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ipnet::IpNet;
use prometheus_client::metrics::counter::Counter;
use tracing::{info, warn};

use super::lists::{ListError, ListService};
use crate::clock::unix_now;
use crate::control::protocol::{BanReport, BansReport, GrantReport, GreylistReport};
use crate::ledger::bans::{AbuseKind, BanTable, BansConfig, Ledger, Recorded};
use crate::ledger::grants::{Grant, GrantError, Grants};
use crate::ledger::greylist::{Checked, GreyVerdict, Greylist, GreylistConfig, GreylistState};
use crate::ledger::load_table;
use crate::lists::store::{Change, NewEntry};
use crate::lists::ttl::Ttl;
use crate::lists::ListKind;
use crate::persist::write_json_atomically;
use crate::smtp::ClientMemory;

pub const GREYLIST_SAVE_INTERVAL: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error(transparent)]
    Grant(#[from] GrantError),
    #[error("saving {path}: {source}")]
    Save {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Lists(#[from] ListError),
    #[error("the system clock is out of range: cannot compute an expiry")]
    Clock,
}

pub struct Ledgers {
    lists: Arc<ListService>,
    grants: Mutex<Grants>,
    grants_path: PathBuf,
    bans: Mutex<Ledger>,
    bans_path: PathBuf,
    bans_saving: Mutex<()>,
    /// `None`: greylisting off.
    greylist: Mutex<Option<Greylist>>,
    greylist_path: PathBuf,
    pub bans_issued: Counter,
    ban_events: Vec<Counter>,
    ban_events_family: crate::metrics::Labelled,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Ledgers {
    /// Loads the saved tables; a damaged one stops the start with its name.
    pub fn open(
        state_dir: &Path,
        bans: Option<&BansConfig>,
        greylist: Option<&GreylistConfig>,
        lists: Arc<ListService>,
    ) -> anyhow::Result<Ledgers> {
        let now = unix_now();
        let grants_path = state_dir.join("relay-grants.json");
        let bans_path = state_dir.join("bans.json");
        let greylist_path = state_dir.join("greylist.json");
        let mut grants: Grants = load_table(&grants_path)?;
        grants.sweep(now);
        let table: BanTable = load_table(&bans_path)?;
        let bans_config = bans.cloned().unwrap_or(BansConfig {
            enabled: false,
            ..BansConfig::default()
        });
        let greylist = match greylist.filter(|g| g.enabled) {
            Some(config) => {
                let state: GreylistState = load_table(&greylist_path)?;
                Some(Greylist::new(config.clone(), state, now))
            }
            None => None,
        };
        let family = crate::metrics::Labelled::default();
        let ban_events = AbuseKind::ALL
            .iter()
            .map(|k| crate::metrics::labelled(&family, "kind", k.name()))
            .collect();
        Ok(Ledgers {
            lists,
            grants: Mutex::new(grants),
            grants_path,
            bans: Mutex::new(Ledger::new(bans_config, table)),
            bans_path,
            bans_saving: Mutex::new(()),
            greylist: Mutex::new(greylist),
            greylist_path,
            bans_issued: Counter::default(),
            ban_events,
            ban_events_family: family,
        })
    }

    /// New `[bans]` and `[greylist]` settings from a reload. Counts, bans
    /// and greylist state carry over; turning greylisting on starts empty.
    pub fn reconfigure(&self, bans: Option<&BansConfig>, greylist: Option<&GreylistConfig>) {
        lock(&self.bans).set_config(bans.cloned().unwrap_or(BansConfig {
            enabled: false,
            ..BansConfig::default()
        }));
        let mut current = lock(&self.greylist);
        match (greylist.filter(|g| g.enabled), current.take()) {
            (Some(config), Some(old)) if old.config() == config => *current = Some(old),
            (Some(config), old) => {
                let state = match old {
                    Some(g) => g.state(),
                    // Turned on by reload: start from what was saved, as a restart would.
                    None => load_table(&self.greylist_path).unwrap_or_default(),
                };
                *current = Some(Greylist::new(config.clone(), state, unix_now()));
            }
            // Turned off: its state stays on disk for when it comes back.
            (None, Some(old)) => {
                if let Err(e) = save(&self.greylist_path, &old.state()) {
                    warn!(error = %e, "saving the greylist failed");
                }
            }
            (None, None) => {}
        }
    }

    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "bans_issued",
            "Client groups banned into the kernel denylist for abuse",
            self.bans_issued.clone(),
        );
        registry.register(
            "ban_events",
            "Abuse events counted towards bans, by kind",
            self.ban_events_family.clone(),
        );
    }

    // Relay grants.

    pub fn grant(&self, ip: IpAddr, ttl: Ttl) -> Result<Grant, LedgerError> {
        let now = unix_now();
        let expires = ttl.expires_at(now).map_err(|_| LedgerError::Clock)?;
        let mut grants = lock(&self.grants);
        let before = grants.clone();
        let grant = grants.grant(ip, now, expires)?;
        if let Err(e) = save(&self.grants_path, &*grants) {
            *grants = before;
            return Err(e);
        }
        info!(client = %ip, expires, "relay granted");
        Ok(grant)
    }

    pub fn revoke(&self, ip: IpAddr) -> Result<(), LedgerError> {
        let mut grants = lock(&self.grants);
        let before = grants.clone();
        grants.revoke(ip, unix_now())?;
        if let Err(e) = save(&self.grants_path, &*grants) {
            *grants = before;
            return Err(e);
        }
        info!(client = %ip, "relay grant revoked");
        Ok(())
    }

    pub fn grants(&self) -> Vec<GrantReport> {
        lock(&self.grants)
            .live(unix_now())
            .into_iter()
            .map(|(ip, g)| GrantReport {
                ip,
                added: g.added,
                expiry: g.expires,
            })
            .collect()
    }

    // Bans.

    pub fn bans(&self) -> Vec<BanReport> {
        lock(&self.bans)
            .live(unix_now())
            .into_iter()
            .map(|(net, b)| BanReport {
                client: net.to_string(),
                reason: b.reason,
                events: b.events,
                added: b.added,
                expiry: b.expires,
                offences: b.offences,
            })
            .collect()
    }

    /// Whether the deny entry of `net` expiring at `expires` is a ban's:
    /// an operator who re-adds the prefix (permanent, or longer) owns it.
    pub fn is_ban(&self, net: &IpNet, expires: Option<u64>) -> bool {
        lock(&self.bans)
            .live_ban(net, unix_now())
            .is_some_and(|b| Some(b.expires) == expires)
    }

    /// Ends the live bans covering `ip` (or all): their deny entries first
    /// (only those still the ban's own), then the records.
    pub async fn clear_bans(&self, ip: Option<IpAddr>) -> Result<usize, LedgerError> {
        let now = unix_now();
        let bans = lock(&self.bans).covering(ip, now);
        let entries: std::collections::HashMap<IpNet, Option<u64>> = self
            .lists
            .show(ListKind::Deny)
            .into_iter()
            .map(|(net, meta)| (net, meta.expiry()))
            .collect();
        for (net, record) in &bans {
            if entries.get(net) == Some(&Some(record.expires)) {
                match self
                    .lists
                    .change(ListKind::Deny, Change::Remove(vec![*net]))
                    .await
                {
                    // Deleted by hand (`deny del`) meanwhile: nothing left to lift.
                    Ok(_) | Err(ListError::NotListed(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            info!(ban = %net, "ban cleared");
        }
        let mut ledger = lock(&self.bans);
        let before = ledger.table().clone();
        ledger.clear(ip, now);
        if let Err(e) = save(&self.bans_path, ledger.table()) {
            let config = ledger.config().clone();
            *ledger = Ledger::new(config, before);
            return Err(e);
        }
        Ok(bans.len())
    }

    /// Saves the ban table off the async workers; the table is read under
    /// the save lock, so the newest state is always the one written last.
    fn save_bans(self: &Arc<Self>) {
        let ledgers = self.clone();
        tokio::task::spawn_blocking(move || {
            let _one_writer = lock(&ledgers.bans_saving);
            let table = lock(&ledgers.bans).table().clone();
            if let Err(e) = save(&ledgers.bans_path, &table) {
                warn!(error = %e, "saving bans failed");
            }
        });
    }

    pub fn report(&self) -> (BansReport, usize, Option<GreylistReport>) {
        let bans = BansReport {
            active: lock(&self.bans).live(unix_now()).len(),
            issued: self.bans_issued.get(),
            events: AbuseKind::ALL
                .iter()
                .zip(&self.ban_events)
                .map(|(k, c)| (k.name().to_owned(), c.get()))
                .collect(),
        };
        let grants = lock(&self.grants).live(unix_now()).len();
        let greylist = lock(&self.greylist).as_ref().map(|g| {
            let (triplets, passed) = g.sizes();
            GreylistReport { triplets, passed }
        });
        (bans, grants, greylist)
    }

    /// Expired grants, stale ban history and greylist entries go.
    pub fn sweep(&self) {
        let now = unix_now();
        {
            let mut grants = lock(&self.grants);
            if grants.sweep(now) {
                if let Err(e) = save(&self.grants_path, &*grants) {
                    warn!(error = %e, "saving relay grants failed");
                }
            }
        }
        {
            let mut bans = lock(&self.bans);
            if bans.prune(now) {
                if let Err(e) = save(&self.bans_path, bans.table()) {
                    warn!(error = %e, "saving bans failed");
                }
            }
        }
        if let Some(greylist) = lock(&self.greylist).as_mut() {
            greylist.sweep(now);
        }
    }

    pub fn save_greylist(&self) {
        let state = match lock(&self.greylist).as_ref() {
            Some(greylist) => greylist.state(),
            None => return,
        };
        if let Err(e) = save(&self.greylist_path, &state) {
            warn!(error = %e, "saving the greylist failed");
        }
    }

    fn put_ban_in_kernel(
        self: &Arc<Self>,
        client: IpAddr,
        net: IpNet,
        reason: AbuseKind,
        events: u32,
        expires: u64,
    ) {
        let ledgers = self.clone();
        tokio::spawn(async move {
            let why = format!("ban: {} ({events} events)", reason.name());
            let entry = NewEntry {
                net,
                reason: Some(why.clone()),
                expires: Some(expires),
            };
            match ledgers
                .lists
                .change(ListKind::Deny, Change::Add(vec![entry]))
                .await
            {
                Ok(_) => {
                    info!(%client, ban = %net, reason = %reason.name(), events, expires, "client banned");
                    let kind = crate::cluster::VerdictKind::Ban;
                    ledgers.lists.outbox.publish(
                        crate::cluster::Op::Add,
                        kind,
                        net,
                        Some(expires),
                        Some(why),
                    );
                }
                Err(e) => {
                    // No ban in place: the group is counted afresh, not taken as banned.
                    warn!(%client, ban = %net, error = %e, "banning a client failed");
                    lock(&ledgers.bans).forget(&net);
                }
            }
            ledgers.save_bans();
        });
    }
}

/// The session-facing view; an `Arc` so a ban can finish in its own task.
pub struct Memory(pub Arc<Ledgers>);

impl ClientMemory for Memory {
    fn relay_granted(&self, client: IpAddr) -> bool {
        lock(&self.0.grants).is_granted(client, unix_now())
    }

    fn abuse(&self, client: IpAddr, group: IpNet, kind: AbuseKind) {
        let ledgers = &self.0;
        // Never ban what the allowlist names, nor a client already denylisted
        // (its entry, maybe the operator's, must not become a ban to clear).
        if ledgers.lists.covering(ListKind::Allow, client)
            || ledgers.lists.covering(ListKind::Deny, client)
        {
            return;
        }
        let recorded = lock(&ledgers.bans).record(group, kind, unix_now());
        match recorded {
            Recorded::Counted { weight: 0 } => {}
            Recorded::Counted { .. } => count(ledgers, kind),
            Recorded::Ban(net, record) => {
                count(ledgers, kind);
                ledgers.bans_issued.inc();
                ledgers.put_ban_in_kernel(
                    client,
                    net,
                    record.reason,
                    record.events,
                    record.expires,
                );
            }
            Recorded::TableFull(net) => {
                count(ledgers, kind);
                warn!(%client, ban = %net, "not banned: bans.max_tracked bans are held already");
            }
        }
    }

    fn greylist(
        &self,
        client: IpAddr,
        sender: &str,
        recipient: &str,
    ) -> Option<(GreyVerdict, Checked)> {
        let ledgers = &self.0;
        let mut greylist = lock(&ledgers.greylist);
        let greylist = greylist.as_mut()?;
        if ledgers.lists.covering(ListKind::Allow, client) {
            return None;
        }
        Some(greylist.check(client, sender, recipient, unix_now()))
    }
}

fn count(ledgers: &Ledgers, kind: AbuseKind) {
    if let Some(i) = AbuseKind::ALL.iter().position(|&k| k == kind) {
        ledgers.ban_events[i].inc();
    }
}

fn save(path: &Path, value: &impl serde::Serialize) -> Result<(), LedgerError> {
    write_json_atomically(path, value).map_err(|source| LedgerError::Save {
        path: path.display().to_string(),
        source,
    })
}
