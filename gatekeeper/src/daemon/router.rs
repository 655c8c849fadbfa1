//! The one place where control requests meet the daemon's services, and
//! their domain results and errors become control replies.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use gatekeeper_common::Counter;

use super::lists::ListService;
use super::screen::{ScreenError, ScreenService};
use crate::control::protocol::{InterfaceReport, Reply, Request, StatsReport};
use crate::control::server::{run_locked, Handler};
use crate::kernel::KernelStatus;
use crate::lists::ListKind;
use crate::smtp::stats::SmtpStats;

pub struct Router {
    pub lists: Arc<Mutex<ListService>>,
    pub screen: Arc<ScreenService>,
    pub kernel: KernelStatus,
    pub started: Instant,
    pub smtp_stats: Option<Arc<SmtpStats>>,
}

impl Router {
    pub fn handler(self: &Arc<Self>) -> Handler {
        let router = self.clone();
        Arc::new(move |request| {
            let router = router.clone();
            Box::pin(async move { router.route(request).await })
        })
    }

    /// DNSBL verbs never wait for the list lock (they may wait on DNS).
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
            Request::ListAdd { list, entries } => {
                run_locked(self.lists.clone(), move |l| l.add(list, entries, false)).await
            }
            Request::ListReplace { list, entries } => {
                run_locked(self.lists.clone(), move |l| l.add(list, entries, true)).await
            }
            Request::ListDel { list, prefixes } => {
                run_locked(self.lists.clone(), move |l| l.remove(list, prefixes)).await
            }
            Request::ListShow { list } => {
                run_locked(self.lists.clone(), move |l| l.show(list)).await
            }
        }
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
        let (deny_entries, allow_entries) = {
            let lists = self.lists.lock().unwrap_or_else(|p| p.into_inner());
            (
                lists.store(ListKind::Deny).entries().len(),
                lists.store(ListKind::Allow).entries().len(),
            )
        };
        Reply::Stats(StatsReport {
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
        })
    }
}
