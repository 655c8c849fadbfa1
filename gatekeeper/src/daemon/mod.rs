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

use crate::config::Config;
use crate::control::protocol::{InterfaceReport, Reply, Request, StatsReport, WireEntry};
use crate::control::server::{run_locked, ControlSocket, Handler};
use crate::kernel::{check_privileges, Kernel};
use crate::lists::store::{remove_stale_temp_files, ListStore};
use crate::lists::ttl::Ttl;
use crate::lists::ListKind;
use crate::smtp::{self, stats::SmtpStats, SmtpContext};
use lists::ListService;
use screen::ScreenService;

struct Daemon {
    lists: ListService,
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
    let deny = ListStore::open(&config.state_dir, ListKind::Deny)?;
    let allow = ListStore::open(&config.state_dir, ListKind::Allow)?;

    // Bind first: a second daemon must fail before touching the first one's pins.
    let control = ControlSocket::bind(&config.control_socket, config.control_group.as_deref())?;
    let smtp_listeners = config.smtp.as_ref().map(smtp::bind).transpose()?;
    let mut kernel = Kernel::load(&config)?;
    let screen = match ScreenService::new(&config, &mut kernel) {
        Ok(screen) => screen,
        Err(e) => {
            kernel.shutdown();
            return Err(e);
        }
    };
    let mut lists = ListService::new(deny, allow, kernel)?;
    if let Err(e) = lists.kernel.attach(&config.interfaces, config.xdp_mode) {
        lists.kernel.shutdown();
        return Err(e);
    }

    let socket_path = control.path().to_owned();
    let smtp_stats = smtp_listeners
        .as_ref()
        .map(|_| Arc::new(SmtpStats::default()));
    let daemon = Arc::new(Mutex::new(Daemon {
        lists,
        started: Instant::now(),
        smtp_stats: smtp_stats.clone(),
    }));
    // Zones are judged before the first client (or `check`) is, so a zone
    // listing the world never blocks anyone. Costs at most one DNSBL timeout.
    let health = screen.start_health_checks().await;
    let server = tokio::spawn(control.serve(control_handler(daemon.clone(), screen.clone())));
    let sweeper = tokio::spawn(sweep_expired(daemon.clone(), screen.clone()));
    let smtp_task = match (config.smtp.clone(), smtp_listeners, smtp_stats) {
        (Some(smtp_config), Some(listeners), Some(stats)) => {
            let hook = pregreet_hook(&smtp_config, daemon.clone());
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
                          // Wait for an in-flight change to finish so its acknowledgement holds.
    let daemon = tokio::task::spawn_blocking(move || {
        let guard = daemon.lock();
        drop(guard);
        Arc::try_unwrap(daemon).ok()
    })
    .await?;
    if let Some(daemon) = daemon.and_then(|m| m.into_inner().ok()) {
        daemon.lists.kernel.shutdown();
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

async fn sweep_expired(daemon: Arc<Mutex<Daemon>>, screen: Arc<ScreenService>) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    loop {
        tick.tick().await;
        let daemon = daemon.clone();
        let screen = screen.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Ok(mut daemon) = daemon.lock() {
                daemon.lists.sweep_expired();
            }
            screen.sweep();
        })
        .await;
    }
}

/// DNSBL verbs run without the daemon lock (they wait on DNS); list changes take it.
fn control_handler(daemon: Arc<Mutex<Daemon>>, screen: Arc<ScreenService>) -> Handler {
    Arc::new(move |request| {
        let daemon = daemon.clone();
        let screen = screen.clone();
        Box::pin(async move {
            match request {
                Request::Check { ip, fresh } => screen.check(ip, fresh).await,
                Request::DnsblList {} => screen.list(),
                Request::DnsblFlush { ip } => screen.flush(ip),
                Request::Stats {} => {
                    let mut reply = run_locked(daemon, |d| d.stats()).await;
                    if let Reply::Stats(report) = &mut reply {
                        report.dnsbl = screen.report();
                    }
                    reply
                }
                other => run_locked(daemon, move |d| d.handle(other)).await,
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
fn pregreet_hook(
    config: &smtp::SmtpConfig,
    daemon: Arc<Mutex<Daemon>>,
) -> Option<smtp::PregreetHook> {
    if config.pregreet_deny_ttl.is_zero() {
        return None;
    }
    // Config validation caps it at the maximum TTL; sub-second rounds up to 1 s.
    let ttl = Ttl::from_duration(config.pregreet_deny_ttl.max(Duration::from_secs(1))).ok()?;
    Some(Arc::new(move |client: IpAddr| {
        let daemon = daemon.clone();
        tokio::task::spawn_blocking(move || {
            let Ok(mut daemon) = daemon.lock() else {
                return;
            };
            let entry = WireEntry {
                prefix: client.into(),
                reason: Some("talked before the SMTP greeting".into()),
                ttl_secs: Some(ttl),
            };
            if let Reply::Error { message, .. } =
                daemon.lists.add(ListKind::Deny, vec![entry], false)
            {
                warn!(%client, %message, "denylisting a pre-greet client failed");
            } else {
                info!(%client, ttl_secs = ttl.secs(), "pre-greet client denylisted");
            }
        });
    }))
}

impl Daemon {
    fn handle(&mut self, request: Request) -> Reply {
        match request {
            Request::ListAdd { list, entries } => self.lists.add(list, entries, false),
            Request::ListReplace { list, entries } => self.lists.add(list, entries, true),
            Request::ListDel { list, prefixes } => self.lists.remove(list, prefixes),
            Request::ListShow { list } => self.lists.show(list),
            Request::Stats {} => self.stats(),
            Request::Check { .. } | Request::DnsblList {} | Request::DnsblFlush { .. } => {
                Reply::failed("DNSBL requests are served by the screen, not the list service")
            }
        }
    }

    fn stats(&self) -> Reply {
        let snapshot = match self.lists.kernel.counters() {
            Ok(snapshot) => snapshot,
            Err(e) => return Reply::failed(format!("{e:#}")),
        };
        let counters: BTreeMap<String, u64> = Counter::ALL
            .iter()
            .map(|&c| (c.name().to_string(), snapshot.get(c)))
            .collect();
        Reply::Stats(StatsReport {
            counters,
            deny_entries: self.lists.store(ListKind::Deny).entries().len(),
            allow_entries: self.lists.store(ListKind::Allow).entries().len(),
            interfaces: self
                .lists
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
