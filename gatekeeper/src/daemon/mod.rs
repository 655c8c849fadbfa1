//! `gatekeeper run`: start-up, the tasks of a running daemon, and a clean
//! shutdown that always ends in kernel teardown.
//!
//! Ownership carries the life cycle: `run` owns the [`Kernel`] (whose `Drop`
//! detaches XDP and removes the pins), every task is spawned on one
//! [`TaskTracker`] and obeys one [`CancellationToken`], and the services the
//! tasks share hold map handles only, never the attachment. So no clone of
//! anything a task holds can keep the teardown from running.

mod feeds;
mod fleet;
mod ledgers;
mod lists;
mod metrics;
mod notify;
mod reload;
mod router;
mod screen;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ipnet::IpNet;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::clock::unix_now;
use crate::cluster::{ClusterStats, Op, Outbox, VerdictKind};
use crate::config::Config;
use crate::control::protocol::Reply;
use crate::control::server::ControlSocket;
use crate::kernel::{check_privileges, Kernel};
use crate::lists::store::{Change, ListStore, NewEntry, StoreOptions};
use crate::lists::ttl::Ttl;
use crate::lists::ListKind;
use crate::persist::remove_stale_temp_files;
use crate::smtp::{self, stats::SmtpStats, SmtpContext};
use feeds::FeedService;
use lists::ListService;
use reload::Live;
use router::Router;
use screen::ScreenService;

/// How often expired list entries are swept out of the store and the kernel.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);
/// Beyond the SMTP drain: time for the other tasks to notice the shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Runs the daemon until SIGTERM/SIGINT; `path` is re-read on reload.
pub async fn run(config: Config, path: PathBuf) -> Result<()> {
    // First: SIGHUP's default action kills, and a SIGTERM during start-up
    // should wait for a clean stop rather than leave pins behind.
    let mut signals = Signals::install()?;
    check_privileges()?;
    raise_file_limit();
    pin_mmap_threshold();
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
    let metrics_listener = config
        .metrics
        .as_ref()
        .map(|m| crate::metrics::bind(m.listen))
        .transpose()?;
    // From here on every return path drops `kernel`, which tears it down.
    let cluster_stats = Arc::new(ClusterStats::default());
    let (outbox, outbox_receiver) = match &config.cluster {
        Some(cluster) => {
            let (outbox, receiver) = Outbox::new(cluster.node_name.clone(), cluster_stats.clone());
            (outbox, Some(receiver))
        }
        None => (Outbox::default(), None),
    };
    let mut kernel = Kernel::load(&config)?;
    let screen = ScreenService::new(&config, &mut kernel, outbox.clone())?;
    let maps = kernel
        .take_list_maps()
        .context("the kernel list maps were already taken")?;
    let lists = Arc::new(ListService::new(deny, allow, maps, outbox)?);
    let feeds = Arc::new(FeedService::new(
        &config.feeds,
        lists.clone(),
        &config.state_dir,
    )?);
    feeds.prune().await?;
    let ledgers = Arc::new(ledgers::Ledgers::open(
        &config.state_dir,
        config.bans.as_ref(),
        config.greylist.as_ref(),
        lists.clone(),
    )?);
    kernel.attach(&config.interfaces, config.xdp_mode)?;
    let status = kernel
        .take_status()
        .context("the kernel counters were already taken")?;

    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    let smtp_stats = smtp_listeners
        .as_ref()
        .map(|_| Arc::new(SmtpStats::default()));
    let (reload_requests, mut reloads) = mpsc::channel(4);
    let router = Arc::new(Router {
        lists: lists.clone(),
        screen: screen.clone(),
        kernel: status,
        started: Instant::now(),
        smtp_stats: smtp_stats.clone(),
        reloads: reload_requests,
        feeds: feeds.clone(),
        ledgers: ledgers.clone(),
        bans_configured: config.bans.is_some(),
        cluster: config.cluster.clone().map(|c| (c, cluster_stats.clone())),
    });
    // Zones are judged before the first client (or `check`) is, so a zone
    // listing the world never blocks anyone. Costs at most one DNSBL timeout.
    let mut health_watch = None;
    if let Some(engine) = screen.start_health_checks().await {
        let watch = shutdown.child_token();
        tasks.spawn(until_cancelled(watch.clone(), engine.watch_health()));
        health_watch = Some(watch);
    }
    if let Some(listener) = metrics_listener {
        let registry = Arc::new(metrics::registry(router.clone()));
        tasks.spawn(until_cancelled(
            shutdown.clone(),
            crate::metrics::serve(listener, registry),
        ));
    }
    let socket_path = control.path().to_owned();
    tasks.spawn(until_cancelled(
        shutdown.clone(),
        control.serve(router.handler()),
    ));
    tasks.spawn(until_cancelled(
        shutdown.clone(),
        sweep_expired(lists.clone(), screen.clone(), ledgers.clone()),
    ));
    tasks.spawn(until_cancelled(
        shutdown.clone(),
        save_greylist(ledgers.clone()),
    ));
    tasks.spawn(until_cancelled(shutdown.clone(), notify::watchdog()));
    if let (Some(cluster), Some(receiver)) = (config.cluster.clone(), outbox_receiver) {
        let fleet = Arc::new(fleet::FleetService {
            lists: lists.clone(),
            screen: screen.clone(),
        });
        tasks.spawn(until_cancelled(
            shutdown.clone(),
            crate::cluster::run(cluster, fleet, receiver, cluster_stats),
        ));
    }
    // In the background: a slow feed server never delays start-up.
    tasks.spawn(until_cancelled(shutdown.clone(), feeds.clone().run()));
    let mut smtp_contexts = None;
    if let (Some(smtp_config), Some(listeners), Some(stats)) =
        (config.smtp.clone(), smtp_listeners, smtp_stats)
    {
        let hook = pregreet_hook(&smtp_config, lists.clone());
        let mut ctx = SmtpContext::new(smtp_config, stats, hook)?;
        ctx.screen = Some(screen_hook(screen.clone()));
        ctx.memory = Some(Arc::new(ledgers::Memory(ledgers.clone())));
        let (publish, contexts) = watch::channel(Arc::new(ctx));
        tasks.spawn(smtp::serve(listeners, contexts, shutdown.clone()));
        smtp_contexts = Some(publish);
    }
    info!(socket = %socket_path.display(), "gatekeeper running");
    notify::ready().await;

    let mut live = Live {
        path,
        config,
        kernel,
        screen: screen.clone(),
        lists: lists.clone(),
        ledgers: ledgers.clone(),
        smtp: smtp_contexts,
        health_watch,
        tasks: tasks.clone(),
        shutdown: shutdown.clone(),
    };
    loop {
        tokio::select! {
            event = signals.next() => match event {
                SignalEvent::Stop(name) => {
                    info!("{name} received, shutting down");
                    break;
                }
                SignalEvent::Hangup => {
                    info!("SIGHUP received, reloading {}", live.path.display());
                    if let Reply::Error { message, .. } = live.reload().await {
                        warn!("reload refused: {}", message.replace('\n', "; "));
                    }
                }
            },
            Some(respond) = reloads.recv() => {
                let _ = respond.send(live.reload().await);
            }
        }
    }
    notify::stopping().await;
    // The running config's drain: a reload may have changed it.
    let drain = live
        .config
        .smtp
        .as_ref()
        .map_or(Duration::ZERO, |smtp| smtp.drain_timeout);
    shutdown.cancel();
    tasks.close();
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
    ledgers.save_greylist();
    lists.close().await;
    drop(live);
    info!("gatekeeper stopped");
    Ok(())
}

/// The signals the main loop answers.
struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    fn install() -> Result<Signals> {
        let install = |kind: SignalKind, name: &str| {
            signal(kind).with_context(|| format!("installing the {name} handler"))
        };
        Ok(Signals {
            term: install(SignalKind::terminate(), "SIGTERM")?,
            int: install(SignalKind::interrupt(), "SIGINT")?,
            hup: install(SignalKind::hangup(), "SIGHUP")?,
        })
    }

    async fn next(&mut self) -> SignalEvent {
        tokio::select! {
            _ = self.term.recv() => SignalEvent::Stop("SIGTERM"),
            _ = self.int.recv() => SignalEvent::Stop("SIGINT"),
            _ = self.hup.recv() => SignalEvent::Hangup,
        }
    }
}

enum SignalEvent {
    Stop(&'static str),
    Hangup,
}

/// Runs `task` until it ends or the daemon shuts down, whichever is first.
pub(crate) async fn until_cancelled(
    shutdown: CancellationToken,
    task: impl std::future::Future<Output = ()>,
) {
    tokio::select! {
        () = task => {}
        () = shutdown.cancelled() => {}
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

/// Buffers of a MiB and more (a big import's request, plans and batches)
/// come from mmap and go back to the system when freed. glibc otherwise
/// raises the threshold after the first such free and keeps every later
/// buffer's pages: 100 MiB of RSS nobody uses after a million-prefix import.
fn pin_mmap_threshold() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; it has no memory-safety preconditions.
    if unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20) } != 1 {
        warn!("could not pin the allocator's mmap threshold");
    }
}

async fn sweep_expired(
    lists: Arc<ListService>,
    screen: Arc<ScreenService>,
    ledgers: Arc<ledgers::Ledgers>,
) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    loop {
        tick.tick().await;
        lists.sweep_expired().await;
        let sweeping = ledgers.clone();
        let _ = tokio::task::spawn_blocking(move || sweeping.sweep()).await;
        let screen = screen.clone();
        let _ = tokio::task::spawn_blocking(move || screen.sweep()).await;
    }
}

/// The greylist changes with every new triplet: saved on an interval, not per change.
async fn save_greylist(ledgers: Arc<ledgers::Ledgers>) {
    let mut tick = tokio::time::interval(ledgers::GREYLIST_SAVE_INTERVAL);
    tick.tick().await;
    loop {
        tick.tick().await;
        let saving = ledgers.clone();
        let _ = tokio::task::spawn_blocking(move || saving.save_greylist()).await;
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
pub(crate) fn pregreet_hook(
    config: &smtp::SmtpConfig,
    lists: Arc<ListService>,
) -> Option<smtp::PregreetHook> {
    if config.pregreet_deny_ttl.is_zero() {
        return None;
    }
    // Config validation caps it at the maximum TTL; sub-second rounds up to 1 s.
    let ttl = Ttl::from_duration(config.pregreet_deny_ttl.max(Duration::from_secs(1))).ok()?;
    Some(Arc::new(move |client: IpAddr, ban: IpNet| {
        if lists.covering(ListKind::Deny, client) {
            return; // denylisted since its SYN passed: nothing to add
        }
        let lists = lists.clone();
        tokio::spawn(async move {
            let expires = ttl.expires_at(unix_now());
            let entry = match expires {
                Ok(expires) => NewEntry {
                    net: ban,
                    reason: Some("talked before the SMTP greeting".into()),
                    expires: Some(expires),
                },
                Err(e) => {
                    return warn!(%client, %ban, error = %e, "pre-greet client not denylisted")
                }
            };
            match lists.change(ListKind::Deny, Change::Add(vec![entry])).await {
                Ok(_) => {
                    info!(%client, %ban, ttl_secs = ttl.secs(), "pre-greet client denylisted");
                    let reason = Some("ban: talked before the SMTP greeting".to_owned());
                    lists
                        .outbox
                        .publish(Op::Add, VerdictKind::Ban, ban, expires.ok(), reason);
                }
                Err(e) => warn!(%client, %ban, error = %e, "denylisting a pre-greet client failed"),
            }
        });
    }))
}
