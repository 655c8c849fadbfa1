//! The one place where control requests meet the daemon's services, and
//! their domain results and errors become control replies.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use gatekeeper_common::Counter;

use super::feeds::FeedService;
use super::ledgers::{LedgerError, Ledgers};
use super::lists::{Changed, ListError, ListService};
use super::screen::{ScreenError, ScreenService};
use crate::clock::unix_now;
use crate::cluster::stats::ClusterReport;
use crate::cluster::{wire, ClusterConfig, ClusterStats, Op, VerdictKind};
use crate::control::protocol::{
    ChangeSummary, GrantReport, InterfaceReport, ListedEntry, Reply, Request, StatsReport,
    WireEntry,
};
use crate::control::server::Handler;
use crate::kernel::KernelStatus;
use crate::ledger::grants::{GrantError, DEFAULT_GRANT_SECS};
use crate::lists::prefix::Prefix;
use crate::lists::store::{Change, NewEntry, SharedEntry, SharedOp};
use crate::lists::ttl::Ttl;
use crate::lists::ttl::TtlError;
use crate::lists::ListKind;
use crate::smtp::stats::SmtpStats;

pub struct Router {
    pub lists: Arc<ListService>,
    pub screen: Arc<ScreenService>,
    pub kernel: KernelStatus,
    pub started: Instant,
    pub smtp_stats: Option<Arc<SmtpStats>>,
    /// To the main loop, which owns what a reload changes.
    pub reloads: mpsc::Sender<oneshot::Sender<Reply>>,
    pub feeds: Arc<FeedService>,
    pub ledgers: Arc<Ledgers>,
    /// Whether `[bans]` is configured (stats show the bans part only then).
    pub bans_configured: bool,
    /// `[cluster]` and the link's state, when in a fleet.
    pub cluster: Option<(ClusterConfig, Arc<ClusterStats>)>,
}

impl Router {
    pub fn handler(self: &Arc<Self>) -> Handler {
        let router = self.clone();
        Arc::new(move |request| {
            let router = router.clone();
            Box::pin(async move { router.route(request).await })
        })
    }

    async fn route(&self, request: Request) -> Reply {
        match request {
            Request::Check { ip, fresh } => Reply::Checked(self.screen.check(ip, fresh).await),
            Request::DnsblList {} => Reply::DnsblListed {
                entries: self.screen.list(),
            },
            Request::DnsblFlush { ip } => match self.screen.flush(ip) {
                Ok(summary) => Reply::DnsblFlushed(summary),
                Err(e @ ScreenError::Kernel(_)) => Reply::failed(e.to_string()),
            },
            Request::Stats {} => self.stats().await,
            Request::Reload {} => self.reload().await,
            Request::FeedsList {} => Reply::FeedsListed {
                feeds: self.feeds.list(),
            },
            Request::FeedsRefresh { name } => match self.feeds.refresh(name.as_deref()).await {
                Ok(results) => Reply::FeedsRefreshed { results },
                Err(e) => Reply::invalid(e.to_string()),
            },
            Request::ListAdd {
                list,
                entries,
                share: false,
            } => match new_entries(entries) {
                Ok(items) => changed(self.lists.change(list, Change::Add(items)).await),
                Err(e) => Reply::invalid(e.to_string()),
            },
            Request::ListAdd {
                list,
                entries,
                share: true,
            } => self.share_add(list, entries).await,
            Request::ListReplace { list, entries } => match new_entries(entries) {
                Ok(items) => changed(self.lists.change(list, Change::Replace(items)).await),
                Err(e) => Reply::invalid(e.to_string()),
            },
            Request::ListImport {
                list,
                entries,
                replace,
            } => {
                let items = entries
                    .0
                    .into_iter()
                    .map(|(prefix, reason)| NewEntry {
                        net: prefix.net(),
                        reason,
                        expires: None,
                    })
                    .collect();
                let change = if replace {
                    Change::Replace(items)
                } else {
                    Change::Add(items)
                };
                changed(self.lists.change(list, change).await)
            }
            Request::ListDel {
                list,
                prefixes,
                share: false,
            } => {
                let nets = prefixes.into_iter().map(Prefix::net).collect();
                changed(self.lists.change(list, Change::Remove(nets)).await)
            }
            Request::ListDel {
                list,
                prefixes,
                share: true,
            } => self.share_del(list, prefixes).await,
            Request::ClusterStatus {} => match self.cluster_report() {
                Some(report) => Reply::ClusterStatus(report),
                None => Reply::invalid("no [cluster] in the config: this host is not in a fleet"),
            },
            Request::ListShow { list } => Reply::Listed {
                entries: self
                    .lists
                    .show(list)
                    .into_iter()
                    .map(|(net, meta)| {
                        let ban =
                            list == ListKind::Deny && self.ledgers.is_ban(&net, meta.expiry());
                        ListedEntry {
                            prefix: net.to_string(),
                            expires: meta.expiry(),
                            reason: meta.reason,
                            added: meta.added,
                            manual: meta.manual && !ban,
                            feeds: meta.feeds.into_iter().collect(),
                            ban,
                            shared_by: meta.shared.map(|claim| claim.origin),
                        }
                    })
                    .collect(),
            },
            Request::RelayGrant { ip, ttl_secs } => {
                let ttl = ttl_secs.unwrap_or_else(|| {
                    Ttl::from_secs(DEFAULT_GRANT_SECS).expect("the default TTL is valid")
                });
                match self.ledgers.grant(ip, ttl) {
                    Ok(grant) => Reply::RelayGranted(GrantReport {
                        ip: crate::netaddr::canonical(ip),
                        added: grant.added,
                        expiry: grant.expires,
                    }),
                    Err(e) => ledger_error(e),
                }
            }
            Request::RelayRevoke { ip } => match self.ledgers.revoke(ip) {
                Ok(()) => Reply::RelayRevoked { ip },
                Err(e) => ledger_error(e),
            },
            Request::RelayList {} => Reply::RelayListed {
                grants: self.ledgers.grants(),
            },
            Request::BansList {} => Reply::BansListed {
                bans: self.ledgers.bans(),
            },
            Request::BansClear { ip } => match self.ledgers.clear_bans(ip).await {
                Ok(cleared) => Reply::BansCleared { cleared },
                Err(e) => ledger_error(e),
            },
        }
    }

    /// `add --share`: a shared entry here (so `del --share` ends it), then
    /// published; a prefix broader than the fleet accepts is refused first.
    async fn share_add(&self, list: ListKind, entries: Vec<WireEntry>) -> Reply {
        let outbox = &self.lists.outbox;
        let Some(node) = outbox.node() else {
            return Reply::invalid(NO_CLUSTER);
        };
        let items = match new_entries(entries) {
            Ok(items) => items,
            Err(e) => return Reply::invalid(e.to_string()),
        };
        let kind = verdict_kind(list);
        if let Some(e) = items
            .iter()
            .find_map(|i| wire::check_breadth(kind, &i.net).err())
        {
            return Reply::invalid(e.to_string());
        }
        let ops = items
            .iter()
            .map(|item| {
                SharedOp::Add(SharedEntry {
                    net: item.net,
                    reason: item.reason.clone(),
                    expires: item.expires,
                    origin: node.to_owned(),
                })
            })
            .collect();
        let result = self.lists.change(list, Change::Shared(ops)).await;
        if result.is_ok() {
            for item in items {
                outbox.publish(Op::Add, kind, item.net, item.expires, item.reason);
            }
        }
        changed(result)
    }

    /// `del --share`: the fleet's claims end here and on every host.
    async fn share_del(&self, list: ListKind, prefixes: Vec<Prefix>) -> Reply {
        let outbox = &self.lists.outbox;
        if !outbox.enabled() {
            return Reply::invalid(NO_CLUSTER);
        }
        let nets: Vec<_> = prefixes.into_iter().map(Prefix::net).collect();
        let ops = nets.iter().map(|&net| SharedOp::Remove(net)).collect();
        let result = self.lists.change(list, Change::Shared(ops)).await;
        if result.is_ok() {
            for net in nets {
                outbox.publish(Op::Del, verdict_kind(list), net, None, None);
            }
        }
        changed(result)
    }

    fn cluster_report(&self) -> Option<ClusterReport> {
        let (config, stats) = self.cluster.as_ref()?;
        let mut report = stats.report();
        report.node = config.node_name.clone();
        report.redis = config.redacted_url();
        report.pending = self.lists.outbox.pending();
        Some(report)
    }

    async fn reload(&self) -> Reply {
        let (respond, reply) = oneshot::channel();
        if self.reloads.send(respond).await.is_err() {
            return Reply::failed("the daemon is shutting down");
        }
        reply
            .await
            .unwrap_or_else(|_| Reply::failed("the daemon is shutting down"))
    }

    async fn stats(&self) -> Reply {
        let snapshot = match self.kernel.counters() {
            Ok(snapshot) => snapshot,
            Err(e) => return Reply::failed(format!("{e:#}")),
        };
        let counters: BTreeMap<String, u64> = Counter::ALL
            .iter()
            .map(|&c| (c.name().to_string(), snapshot.get(c)))
            .collect();
        let (deny_entries, allow_entries) = self.lists.counts();
        let (bans, relay_grants, greylist) = self.ledgers.report();
        Reply::Stats(Box::new(StatsReport {
            counters,
            deny_entries,
            allow_entries,
            interfaces: self
                .kernel
                .attachments()
                .iter()
                .map(|(name, mode)| InterfaceReport {
                    name: name.clone(),
                    mode: *mode,
                })
                .collect(),
            uptime_secs: self.started.elapsed().as_secs(),
            smtp: self.smtp_stats.as_ref().map(|s| s.report()),
            dnsbl: self.screen.report(),
            bans: self.bans_configured.then_some(bans),
            relay_grants,
            greylist,
            cluster: self.cluster_report(),
        }))
    }
}

const NO_CLUSTER: &str = "--share needs [cluster] in the config: this host is not in a fleet";

fn verdict_kind(list: ListKind) -> VerdictKind {
    match list {
        ListKind::Deny => VerdictKind::Deny,
        ListKind::Allow => VerdictKind::Allow,
    }
}

fn changed(result: Result<Changed, ListError>) -> Reply {
    match result {
        Ok(c) => Reply::Changed(ChangeSummary {
            list: Some(c.list),
            added: c.added,
            updated: c.updated,
            removed: c.removed,
            total: c.total,
        }),
        Err(e @ ListError::NotListed(_)) => Reply::invalid(e.to_string()),
        Err(e @ (ListError::OverCapacity(_) | ListError::Storage(_) | ListError::Kernel(_))) => {
            Reply::failed(e.to_string())
        }
    }
}

fn ledger_error(error: LedgerError) -> Reply {
    match error {
        e @ LedgerError::Grant(GrantError::NotGranted(_)) => Reply::invalid(e.to_string()),
        e @ (LedgerError::Grant(GrantError::Full)
        | LedgerError::Save { .. }
        | LedgerError::Clock) => Reply::failed(e.to_string()),
        LedgerError::Lists(e) => changed(Err(e)),
    }
}

/// Wire entries (prefixes already validated by their type) → store entries,
/// with the TTL turned into an absolute expiry by checked arithmetic.
fn new_entries(entries: Vec<WireEntry>) -> Result<Vec<NewEntry>, TtlError> {
    let now = unix_now();
    entries
        .into_iter()
        .map(|e| {
            Ok(NewEntry {
                net: e.prefix.net(),
                reason: e.reason,
                expires: e.ttl_secs.map(|ttl| ttl.expires_at(now)).transpose()?,
            })
        })
        .collect()
}
