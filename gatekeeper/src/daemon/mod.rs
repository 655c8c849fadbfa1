//! `gatekeeper run`: start-up, the control loop and clean shutdown.

mod lists;
mod screen;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use gatekeeper_common::Counter;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

use crate::clock::unix_now;
use crate::config::Config;
use crate::control::protocol::{
    ChangeSummary, InterfaceReport, ListedEntry, Reply, Request, StatsReport, WireEntry,
};
use crate::control::server::{run_locked, ControlSocket, Handler};
use crate::kernel::{check_privileges, Kernel};
use crate::lists::prefix::{parse_prefix, PrefixError};
use crate::lists::store::{Change, ListStore, NewEntry, StoreOptions};
use crate::lists::ListKind;
use crate::persist::remove_stale_temp_files;
use crate::smtp::{self, stats::SmtpStats, SmtpContext};
use lists::{Changed, ListError, ListService};
use screen::ScreenService;

struct Daemon {
    kernel: Kernel,
    lists: Arc<ListService>,
    started: Instant,
    smtp_stats: Option<Arc<SmtpStats>>,
}

/// How often expired list entries are swept out of the store and the kernel.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

pub async fn run(config: Config) -> Result<()> {
    check_privileges()?;
    raise_file_limit();
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("state_dir {}: cannot create", config.state_dir.display()))?;
    let stale = remove_stale_temp_files(&config.state_dir)
        .with_context(|| format!("state_dir {}: cannot read", config.state_dir.display()))?;
    if stale > 0 {
        info!(count = stale, "removed temp files of an interrupted write");
    }
    let options = StoreOptions::new(config.journal_compact_bytes);
    let deny = ListStore::open(&config.state_dir, ListKind::Deny, options.clone())?;
    let allow = ListStore::open(&config.state_dir, ListKind::Allow, options)?;

    // Bind first: a second daemon must fail before touching the first one's pins.
    let control = ControlSocket::bind(&config.control_socket)?;
    let smtp_listeners = config.smtp.as_ref().map(smtp::bind).transpose()?;
    let mut kernel = Kernel::load(&config)?;
    let screen = match ScreenService::new(&config, &mut kernel) {
        Ok(screen) => screen,
        Err(e) => {
            kernel.shutdown();
            return Err(e);
        }
    };
    let maps = kernel
        .take_list_maps()
        .context("list maps already handed out")?;
    let lists = match ListService::new(deny, allow, maps) {
        Ok(lists) => Arc::new(lists),
        Err(e) => {
            kernel.shutdown();
            return Err(e);
        }
    };
    if let Err(e) = kernel.attach(&config.interfaces, config.xdp_mode) {
        lists.close().await;
        kernel.shutdown();
        return Err(e);
    }

    let socket_path = control.path().to_owned();
    let smtp_stats = smtp_listeners
        .as_ref()
        .map(|_| Arc::new(SmtpStats::default()));
    let daemon = Arc::new(Mutex::new(Daemon {
        kernel,
        lists: lists.clone(),
        started: Instant::now(),
        smtp_stats: smtp_stats.clone(),
    }));
    // Zones are judged before the first client (or `check`) is, so a zone
    // listing the world never blocks anyone. Costs at most one DNSBL timeout.
    let health = screen.start_health_checks().await;
    let server = tokio::spawn(control.serve(control_handler(
        daemon.clone(),
        lists.clone(),
        screen.clone(),
    )));
    let sweeper = tokio::spawn(sweep_expired(lists.clone(), screen.clone()));
    let smtp_task = match (config.smtp.clone(), smtp_listeners, smtp_stats) {
        (Some(smtp_config), Some(listeners), Some(stats)) => {
            let hook = pregreet_hook(&smtp_config, lists.clone());
            let mut ctx = SmtpContext::new(smtp_config, stats, hook)?;
            if config.dnsbl.is_some() {
                ctx.screen = Some(screen_hook(screen.clone()));
            }
            Some(tokio::spawn(smtp::serve(listeners, Arc::new(ctx))))
        }
        _ => None,
    };
    info!(socket = %socket_path.display(), "gatekeeper running");

    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::select! {
        _ = sigterm.recv() => info!("SIGTERM received, shutting down"),
        _ = sigint.recv() => info!("SIGINT received, shutting down"),
    }
    if let Some(task) = smtp_task {
        task.abort();
    }
    if let Some(task) = health {
        task.abort();
    }
    screen.save_cache();
    sweeper.abort();
    server.abort();
    let _ = server.await; // drops the listener, which removes the socket file
    lists.close().await;
    let daemon = tokio::task::spawn_blocking(move || {
        let guard = daemon.lock();
        drop(guard);
        Arc::try_unwrap(daemon).ok()
    })
    .await?;
    if let Some(daemon) = daemon.and_then(|m| m.into_inner().ok()) {
        daemon.kernel.shutdown();
    }
    info!("gatekeeper stopped");
    Ok(())
}

/// Every SMTP connection holds a socket (two while proxying): lift the soft
/// descriptor limit to the hard one, as busy servers do.
fn raise_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
            info!(from = soft, to = hard, "raised the open-file limit");
        }
    }
}

async fn sweep_expired(lists: Arc<ListService>, screen: Arc<ScreenService>) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    loop {
        tick.tick().await;
        lists.sweep_expired().await;
        let screen = screen.clone();
        let _ = tokio::task::spawn_blocking(move || screen.sweep()).await;
    }
}

/// DNSBL verbs and list changes run without the daemon lock (they wait on
/// DNS and on the group commit); stats take it for the kernel counters.
fn control_handler(
    daemon: Arc<Mutex<Daemon>>,
    lists: Arc<ListService>,
    screen: Arc<ScreenService>,
) -> Handler {
    Arc::new(move |request| {
        let daemon = daemon.clone();
        let lists = lists.clone();
        let screen = screen.clone();
        Box::pin(async move {
            match request {
                Request::ListAdd { list, entries } => add(&lists, list, entries, false).await,
                Request::ListReplace { list, entries } => add(&lists, list, entries, true).await,
                Request::ListDel { list, prefixes } => remove(&lists, list, prefixes).await,
                Request::ListShow { list } => show(&lists, list),
                Request::Check { ip, fresh } => screen.check(&ip, fresh).await,
                Request::DnsblList => screen.list(),
                Request::DnsblFlush { ip } => screen.flush(ip.as_deref()),
                Request::Stats => {
                    let mut reply = run_locked(daemon, |d| d.stats()).await;
                    if let Reply::Stats(report) = &mut reply {
                        report.dnsbl = screen.report();
                    }
                    reply
                }
            }
        })
    })
}

fn screen_hook(screen: Arc<ScreenService>) -> smtp::Screen {
    Arc::new(move |client| {
        let screen = screen.clone();
        Box::pin(async move { screen.screen(client).await })
    })
}

/// With `pregreet_deny_ttl` set, a client that talks before the greeting is
/// denylisted in the kernel for that long.
fn pregreet_hook(config: &smtp::SmtpConfig, lists: Arc<ListService>) -> Option<smtp::PregreetHook> {
    let ttl = config.pregreet_deny_ttl;
    if ttl.is_zero() {
        return None;
    }
    Some(Arc::new(move |client: IpAddr| {
        if lists.covering(ListKind::Deny, client) {
            return; // listed since its SYN passed: nothing to add
        }
        let lists = lists.clone();
        tokio::spawn(async move {
            let entry = NewEntry {
                net: client.into(),
                reason: Some("talked before the SMTP greeting".into()),
                expires: Some(unix_now().saturating_add(ttl.as_secs().max(1))),
            };
            match lists.change(ListKind::Deny, Change::Add(vec![entry])).await {
                Ok(_) => info!(%client, ttl_secs = ttl.as_secs(), "pre-greet client denylisted"),
                Err(e) => warn!(%client, error = %e, "denylisting a pre-greet client failed"),
            }
        });
    }))
}

async fn add(lists: &ListService, kind: ListKind, entries: Vec<WireEntry>, replace: bool) -> Reply {
    let items = match parse_entries(entries) {
        Ok(items) => items,
        Err(e) => return Reply::invalid(e.to_string()),
    };
    let change = if replace {
        Change::Replace(items)
    } else {
        Change::Add(items)
    };
    changed_reply(lists.change(kind, change).await)
}

async fn remove(lists: &ListService, kind: ListKind, prefixes: Vec<String>) -> Reply {
    let nets: Result<Vec<_>, _> = prefixes.iter().map(|p| parse_prefix(p)).collect();
    match nets {
        Ok(nets) => changed_reply(lists.change(kind, Change::Remove(nets)).await),
        Err(e) => Reply::invalid(e.to_string()),
    }
}

fn show(lists: &ListService, kind: ListKind) -> Reply {
    let entries = lists
        .show(kind)
        .into_iter()
        .map(|(net, meta)| ListedEntry {
            prefix: net.to_string(),
            reason: meta.reason,
            added: meta.added,
            expires: meta.expires,
        })
        .collect();
    Reply::Listed { entries }
}

fn changed_reply(result: Result<Changed, ListError>) -> Reply {
    match result {
        Ok(c) => Reply::Changed(ChangeSummary {
            list: Some(c.list),
            added: c.added,
            updated: c.updated,
            removed: c.removed,
            total: c.total,
        }),
        Err(e @ ListError::NotListed(_)) => Reply::invalid(e.to_string()),
        Err(e) => Reply::failed(e.to_string()),
    }
}

fn parse_entries(entries: Vec<WireEntry>) -> Result<Vec<NewEntry>, PrefixError> {
    let now = unix_now();
    entries
        .into_iter()
        .map(|e| {
            parse_prefix(&e.prefix).map(|net| NewEntry {
                net,
                reason: e.reason,
                expires: e.ttl_secs.map(|ttl| now.saturating_add(ttl.max(1))),
            })
        })
        .collect()
}

impl Daemon {
    fn stats(&self) -> Reply {
        let (deny_entries, allow_entries) = self.lists.counts();
        let snapshot = match self.kernel.counters() {
            Ok(snapshot) => snapshot,
            Err(e) => return Reply::failed(format!("{e:#}")),
        };
        let counters: BTreeMap<String, u64> = Counter::ALL
            .iter()
            .map(|&c| (c.name().to_string(), snapshot.get(c)))
            .collect();
        Reply::Stats(StatsReport {
            counters,
            deny_entries,
            allow_entries,
            interfaces: self
                .kernel
                .attachments()
                .into_iter()
                .map(|(name, mode)| InterfaceReport { name, mode })
                .collect(),
            uptime_secs: self.started.elapsed().as_secs(),
            smtp: self.smtp_stats.as_ref().map(|s| s.report()),
            dnsbl: None,
        })
    }
}
