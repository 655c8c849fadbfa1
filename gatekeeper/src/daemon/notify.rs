//! The systemd notify protocol (`Type=notify`): readiness, reloads, stopping
//! and the watchdog. Without `NOTIFY_SOCKET` every call is a no-op.

use std::time::Duration;

use sd_notify::NotifyState;
use tracing::{debug, warn};

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!(error = %e, "systemd notification failed");
    }
}

/// XDP is attached, every listener bound, the control socket served.
pub fn ready() {
    send(&[NotifyState::Ready]);
}

/// systemd 253+ wants the monotonic clock with RELOADING=1 to match the
/// READY=1 that ends the reload.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(e) => warn!(error = %e, "cannot read the monotonic clock for RELOADING=1"),
    }
}

pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// Pings the watchdog at half its interval, as sd_watchdog_enabled(3)
/// advises, while the runtime is alive; returns at once when none is set.
pub async fn watchdog() {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    debug!(?interval, "systemd watchdog enabled");
    let mut tick = tokio::time::interval((interval / 2).max(Duration::from_millis(1)));
    loop {
        tick.tick().await;
        send(&[NotifyState::Watchdog]);
    }
}
