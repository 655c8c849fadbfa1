//! Idle upstream sessions kept after a delivered message (`upstream_pool`),
//! so the next client's transaction skips connect, greeting and the first
//! EHLO: the session is re-targeted with XCLIENT (Postfix takes it again
//! outside a transaction, replacing every attribute) before it carries
//! anything of the new client.
//!
//! An MTA may refuse the second XCLIENT: Postfix checks
//! `smtpd_authorized_xclient_hosts` against the client the first one named,
//! so it takes re-targeting only where that list covers the clients (a
//! listener only the gatekeeper reaches, with `static:all`). The first such
//! refusal turns the pool off, with a warning, until it is rebuilt (restart,
//! or a reload that changes it).
//!
//! Only a session whose last act was a delivered message comes back here;
//! an authenticated one, or one left mid-transaction, never does. A pooled
//! session keeps its `max_upstream_sessions` slot, so it is not pooled when
//! the slots are exhausted (a client may be waiting for one).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::reply::Reply;
use super::upstream::Upstream;

/// Transactions one upstream session may carry before it is retired.
pub const MAX_USES: u32 = 1000;

pub struct UpstreamPool {
    idle: Mutex<Vec<Idle>>,
    limit: usize,
    idle_for: Duration,
    /// The MTA refused to re-target a session: nothing is parked any more.
    off: AtomicBool,
}

struct Idle {
    upstream: Upstream,
    since: Instant,
}

impl UpstreamPool {
    pub fn new(limit: usize, idle_for: Duration) -> UpstreamPool {
        UpstreamPool {
            idle: Mutex::new(Vec::with_capacity(limit)),
            limit,
            idle_for,
            off: AtomicBool::new(false),
        }
    }

    /// The MTA answered a re-target with a refusal: pooling cannot work
    /// with it, so stop (once, loudly) and end what is parked.
    pub fn refused(&self, reply: &Reply) {
        if !self.off.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                code = reply.code,
                reply = %reply.lines.join(" "),
                "the MTA refused XCLIENT on a pooled session; upstream_pool is off until the pool is rebuilt \
                 (Postfix checks smtpd_authorized_xclient_hosts against the client the previous XCLIENT named)"
            );
        }
        self.drain();
    }

    /// The most recently parked session that has not idled too long (the
    /// MTA may have timed the older ones out); expired ones are dropped.
    pub fn take(&self) -> Option<Upstream> {
        let mut idle = self.lock();
        let now = Instant::now();
        while let Some(entry) = idle.pop() {
            if now.duration_since(entry.since) < self.idle_for {
                return Some(entry.upstream);
            }
        }
        None
    }

    /// Parks `upstream` if it may serve another client and there is room;
    /// otherwise gives it back for the caller to end.
    pub fn park(&self, upstream: Upstream) -> Option<Upstream> {
        if !upstream.is_reusable() || upstream.uses >= MAX_USES || self.off.load(Ordering::Relaxed)
        {
            return Some(upstream);
        }
        let mut idle = self.lock();
        if idle.len() >= self.limit {
            return Some(upstream);
        }
        idle.push(Idle {
            upstream,
            since: Instant::now(),
        });
        None
    }

    /// Removes the sessions idle for `idle_for` or longer, for a polite QUIT.
    pub fn expired(&self) -> Vec<Upstream> {
        let mut idle = self.lock();
        let now = Instant::now();
        let (old, fresh): (Vec<_>, Vec<_>) = idle
            .drain(..)
            .partition(|entry| now.duration_since(entry.since) >= self.idle_for);
        *idle = fresh;
        old.into_iter().map(|entry| entry.upstream).collect()
    }

    /// Ends every parked session at once (their slots go back); for a
    /// reload that replaced the pool.
    pub fn drain(&self) {
        self.lock().clear();
    }

    pub fn idle_for(&self) -> Duration {
        self.idle_for
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Closes expired sessions (with QUIT) every half idle period, until the
/// pool is dropped (a reload that replaced it, or shutdown).
pub fn spawn_reaper(pool: &std::sync::Arc<UpstreamPool>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let pool = std::sync::Arc::downgrade(pool);
    runtime.spawn(async move {
        loop {
            let Some(period) = pool.upgrade().map(|p| p.idle_for() / 2) else {
                return;
            };
            tokio::time::sleep(period).await;
            let Some(expired) = pool.upgrade().map(|p| p.expired()) else {
                return;
            };
            for upstream in expired {
                upstream.quit().await;
            }
        }
    });
}
