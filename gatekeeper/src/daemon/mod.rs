//! `gatekeeper run`: start-up, the tasks of a running daemon, and a clean
//! shutdown that always ends in kernel teardown.
//!
//! Ownership carries the life cycle: `run` owns the [`Kernel`] (whose `Drop`
//! detaches XDP and removes the pins), every task is spawned on one
//! [`TaskTracker`] and obeys one [`CancellationToken`], and the services the
//! tasks share hold map handles only, never the attachment. So no clone of
//! anything a task holds can keep the teardown from running.

mod feeds;
mod lists;
mod router;
mod screen;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::clock::unix_now;
use crate::config::Config;
use crate::control::server::ControlSocket;
use crate::kernel::{check_privileges, Kernel};
use crate::lists::store::{Change, ListStore, NewEntry, StoreOptions};
use crate::lists::ttl::Ttl;
use crate::lists::ListKind;
use crate::persist::remove_stale_temp_files;
use crate::smtp::{self, stats::SmtpStats, SmtpContext};
use feeds::FeedService;
use lists::ListService;
use router::Router;
use screen::ScreenService;

/// How often expired list entries are swept out of the store and the kernel.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);
/// Beyond the SMTP drain: time for the other tasks to notice the shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

pub async fn run(config: Config) -> Result<()> {
    check_privileges()?;
    raise_file_limit();
    warn_about_unprotected_listen_ports(&config);
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
    let control = ControlSocket::bind(&config.control_socket, config.control_group.as_deref())?;
    let smtp_listeners = config.smtp.as_ref().map(smtp::bind).transpose()?;
    // From here on every return path drops `kernel`, which tears it down.
    let mut kernel = Kernel::load(&config)?;
    let screen = ScreenService::new(&config, &mut kernel)?;
    let maps = kernel
        .take_list_maps()
        .context("the kernel list maps were already taken")?;
    let lists = Arc::new(ListService::new(deny, allow, maps)?);
    let feeds = Arc::new(FeedService::new(
        &config.feeds,
        lists.clone(),
        &config.state_dir,
    )?);
    feeds.prune().await?;
    kernel.attach(&config.interfaces, config.xdp_mode)?;
    let status = kernel
        .take_status()
        .context("the kernel counters were already taken")?;

    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    let smtp_stats = smtp_listeners
        .as_ref()
        .map(|_| Arc::new(SmtpStats::default()));
    let router = Arc::new(Router {
        lists: lists.clone(),
        screen: screen.clone(),
        kernel: status,
        started: Instant::now(),
        smtp_stats: smtp_stats.clone(),
        feeds: feeds.clone(),
    });
    // Zones are judged before the first client (or `check`) is, so a zone
    // listing the world never blocks anyone. Costs at most one DNSBL timeout.
    if let Some(engine) = screen.start_health_checks().await {
        tasks.spawn(until_cancelled(shutdown.clone(), engine.watch_health()));
    }
    let socket_path = control.path().to_owned();
    tasks.spawn(until_cancelled(
        shutdown.clone(),
        control.serve(router.handler()),
    ));
    tasks.spawn(until_cancelled(
        shutdown.clone(),
        sweep_expired(lists.clone(), screen.clone()),
    ));
    // In the background: a slow feed server never delays start-up.
    tasks.spawn(until_cancelled(shutdown.clone(), feeds.clone().run()));
    let mut drain = Duration::ZERO;
    if let (Some(smtp_config), Some(listeners), Some(stats)) =
        (config.smtp.clone(), smtp_listeners, smtp_stats)
    {
        drain = smtp_config.drain_timeout;
        let hook = pregreet_hook(&smtp_config, lists.clone());
        let mut ctx = SmtpContext::new(smtp_config, stats, hook)?;
        ctx.screen = Some(screen_hook(screen.clone()));
        tasks.spawn(smtp::serve(listeners, Arc::new(ctx), shutdown.clone()));
    }
    tasks.close();
    info!(socket = %socket_path.display(), "gatekeeper running");

    wait_for_signal().await?;
    shutdown.cancel();
    if tokio::time::timeout(drain + SHUTDOWN_GRACE, tasks.wait())
        .await
        .is_err()
    {
        warn!(
            remaining = tasks.len(),
            "tasks still running past the shutdown deadline; tearing down anyway"
        );
    }
    screen.save_cache();
    lists.close().await;
    drop(kernel);
    info!("gatekeeper stopped");
    Ok(())
}

async fn wait_for_signal() -> Result<()> {
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::select! {
        _ = sigterm.recv() => info!("SIGTERM received, shutting down"),
        _ = sigint.recv() => info!("SIGINT received, shutting down"),
    }
    Ok(())
}

/// Runs `task` until it ends or the daemon shuts down, whichever is first.
async fn until_cancelled(shutdown: CancellationToken, task: impl std::future::Future<Output = ()>) {
    tokio::select! {
        () = task => {}
        () = shutdown.cancelled() => {}
    }
}

/// XDP judges SYNs to `protected_ports` only; a front-end port outside them
/// still refuses listed clients (the screen), but only after the handshake.
fn warn_about_unprotected_listen_ports(config: &Config) {
    let Some(smtp) = &config.smtp else { return };
    for addr in &smtp.listen {
        let port = addr.port();
        if !config.protected_ports.contains(&port) {
            warn!(
                %addr,
                "smtp.listen port {port} is not in protected_ports: XDP will not drop listed sources' SYNs to it (the SMTP front end still refuses them)"
            );
        }
    }
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

fn screen_hook(screen: Arc<ScreenService>) -> smtp::Screen {
    Arc::new(move |client| {
        let screen = screen.clone();
        Box::pin(async move { screen.screen(client).await })
    })
}

/// With `pregreet_deny_ttl` set, a client that talks before the greeting is
/// denylisted in the kernel for that long (its /64 for IPv6: the hook gets
/// the client's group).
fn pregreet_hook(config: &smtp::SmtpConfig, lists: Arc<ListService>) -> Option<smtp::PregreetHook> {
    if config.pregreet_deny_ttl.is_zero() {
        return None;
    }
    // Config validation caps it at the maximum TTL; sub-second rounds up to 1 s.
    let ttl = Ttl::from_duration(config.pregreet_deny_ttl.max(Duration::from_secs(1))).ok()?;
    Some(Arc::new(move |client: ipnet::IpNet| {
        if lists.covering(ListKind::Deny, client.network()) {
            return; // denylisted since its SYN passed: nothing to add
        }
        let lists = lists.clone();
        tokio::spawn(async move {
            let entry = match ttl.expires_at(unix_now()) {
                Ok(expires) => NewEntry {
                    net: client,
                    reason: Some("talked before the SMTP greeting".into()),
                    expires: Some(expires),
                },
                Err(e) => return warn!(%client, error = %e, "pre-greet client not denylisted"),
            };
            match lists.change(ListKind::Deny, Change::Add(vec![entry])).await {
                Ok(_) => info!(%client, ttl_secs = ttl.secs(), "pre-greet client denylisted"),
                Err(e) => warn!(%client, error = %e, "denylisting a pre-greet client failed"),
            }
        });
    }))
}
