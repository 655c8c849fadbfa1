//! The systemd notify protocol (`Type=notify`): readiness, reloads, stopping
//! and the watchdog. Without `NOTIFY_SOCKET` every call is a no-op.
//!
//! A datagram send blocks while the manager's queue is full, so every send
//! runs on the blocking pool: a manager that stops reading never stalls the
//! runtime's workers (and the sessions on them).

use std::time::Duration;

use sd_notify::NotifyState;
use tracing::{debug, warn};

async fn send(states: Vec<NotifyState<'static>>) {
    let sent = tokio::task::spawn_blocking(move || sd_notify::notify(&states)).await;
    match sent {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %e, "systemd notification failed"),
        Err(e) => warn!(error = %e, "systemd notification task failed"),
    }
}

/// XDP is attached, every listener bound, the control socket served.
pub async fn ready() {
    send(vec![NotifyState::Ready]).await;
}

/// systemd 253+ wants the monotonic clock with RELOADING=1 to match the
/// READY=1 that ends the reload.
pub async fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(vec![NotifyState::Reloading, now]).await,
        Err(e) => warn!(error = %e, "cannot read the monotonic clock for RELOADING=1"),
    }
}

pub async fn stopping() {
    send(vec![NotifyState::Stopping]).await;
}

/// Pings the watchdog at half its interval, as sd_watchdog_enabled(3)
/// advises, while the runtime is alive; returns at once when none is set.
pub async fn watchdog() {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    debug!(?interval, "systemd watchdog enabled");
    let mut tick = tokio::time::interval((interval / 2).max(Duration::from_millis(1)));
    // After a stall, one ping, not a burst of them.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        send(vec![NotifyState::Watchdog]).await;
    }
}
