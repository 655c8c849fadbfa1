//! `gatekeeper run`: start-up, the control loop and clean shutdown.

mod lists;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use gatekeeper_common::Counter;
use tokio::signal::unix::{signal, SignalKind};
use tracing::info;

use crate::config::Config;
use crate::control::protocol::{InterfaceReport, Reply, Request, StatsReport};
use crate::control::server::{locked, ControlSocket};
use crate::kernel::{check_privileges, Kernel};
use crate::lists::store::{remove_stale_temp_files, ListStore};
use crate::lists::ListKind;
use lists::ListService;

struct Daemon {
    lists: ListService,
    started: Instant,
}

pub async fn run(config: Config) -> Result<()> {
    check_privileges()?;
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
    let control = ControlSocket::bind(&config.control_socket)?;
    let kernel = Kernel::load(&config)?;
    let mut lists = ListService::new(deny, allow, kernel)?;
    if let Err(e) = lists.kernel.attach(&config.interfaces, config.xdp_mode) {
        lists.kernel.shutdown();
        return Err(e);
    }

    let socket_path = control.path().to_owned();
    let daemon = Arc::new(Mutex::new(Daemon {
        lists,
        started: Instant::now(),
    }));
    let server = tokio::spawn(control.serve(locked(daemon.clone(), Daemon::handle)));
    info!(socket = %socket_path.display(), "gatekeeper running");

    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::select! {
        _ = sigterm.recv() => info!("SIGTERM received, shutting down"),
        _ = sigint.recv() => info!("SIGINT received, shutting down"),
    }
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

impl Daemon {
    fn handle(&mut self, request: Request) -> Reply {
        match request {
            Request::ListAdd { list, entries } => self.lists.add(list, entries, false),
            Request::ListReplace { list, entries } => self.lists.add(list, entries, true),
            Request::ListDel { list, prefixes } => self.lists.remove(list, prefixes),
            Request::ListShow { list } => self.lists.show(list),
            Request::Stats => self.stats(),
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
        })
    }
}
