//! The in-process SMTP relay checker: connections that survive XDP meet an
//! ESMTP front end that refuses third-party relay and proxies accepted mail
//! to the MTA behind.
//!
//! `parse` and `policy` are pure; `session` is the state machine over a
//! connection; `upstream` is the proxy; `proxy` (the PROXY header of a
//! trusted balancer, naming the real client), `gate` (limits) and the
//! [`Screen`] (DNSBL verdicts) are the connection entry point; [`serve`] runs
//! the accept loops and drains the sessions at shutdown.

pub mod chunk;
pub mod config;
pub mod dsn;
mod gate;
pub mod helo;
pub mod idn;
pub(crate) mod io;
pub mod parse;
pub mod policy;
mod pool;
pub mod proxy;
pub mod reply;
pub mod senders;
mod session;
pub mod stats;
#[cfg(test)]
mod tests;
mod upstream;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

use anyhow::{Context, Result};
use ipnet::IpNet;
use socket2::{Domain, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_rustls::rustls;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

pub use config::{AuthMode, SmtpConfig};
use gate::{ConnectionGate, GateLimits};
use helo::OurNames;
use policy::RelayPolicy;
use senders::DeniedSenders;
use stats::SmtpStats;

use crate::ledger::bans::AbuseKind;
use crate::ledger::greylist::{Checked, GreyVerdict};

/// What the daemon remembers about clients across sessions, as a session
/// needs it. Implemented by the daemon over its ledgers; sessions only ask.
pub trait ClientMemory: Send + Sync {
    /// Whether `client` holds a live relay grant (POP-before-SMTP).
    fn relay_granted(&self, client: IpAddr) -> bool;
    /// Counts an abuse event; `group` is what a ban would cover. Never
    /// called for clients that may relay (relay networks, grants, AUTH).
    fn abuse(&self, client: IpAddr, group: IpNet, kind: AbuseKind);
    /// Greylisting of one delivery attempt; `None` when greylisting is off
    /// or the client is exempt (allowlisted).
    fn greylist(
        &self,
        client: IpAddr,
        sender: &str,
        recipient: &str,
    ) -> Option<(GreyVerdict, Checked)>;
}

/// Called when a client talks before the greeting, with its address and what
/// to ban: its group (/32 for IPv4, `/ipv6_client_prefix` for IPv6), narrowed to the
/// address itself if the group holds a relay network; never for relay clients.
pub type PregreetHook = Arc<dyn Fn(IpAddr, IpNet) + Send + Sync>;

/// What the connection-time screen decided about a client.
pub enum Screening {
    Pass,
    /// Pass, and spare it the pre-greet wait.
    Trusted,
    /// Send this reply line instead of a banner and close.
    Refuse(ScreenRefusal),
}

/// Why the screen refused a client; each reason has its own counter.
pub enum ScreenRefusal {
    /// On the denylist (XDP should have dropped it: a second line of defence).
    Denylisted(String),
    /// Listed by the DNSBLs (a live kernel entry, or a fresh verdict).
    Dnsbl(String),
    /// No forward-confirmed reverse DNS (`client_require_fcrdns`, or its
    /// weight tipping the DNSBL score).
    Fcrdns(String),
}

/// Judges a client before its banner; the daemon wires the DNSBL engine in here.
pub type Screen =
    Arc<dyn Fn(IpAddr) -> Pin<Box<dyn Future<Output = Screening> + Send>> + Send + Sync>;

/// Everything a session needs, shared by all of them.
pub struct SmtpContext {
    pub config: SmtpConfig,
    pub policy: RelayPolicy,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub stats: Arc<SmtpStats>,
    gate: Arc<ConnectionGate>,
    /// `max_upstream_sessions` slots, one held per open upstream session.
    upstream_slots: Arc<Semaphore>,
    /// Idle upstream sessions for the next transaction (`upstream_pool`).
    upstream_pool: Option<Arc<pool::UpstreamPool>>,
    pub on_pregreet: Option<PregreetHook>,
    pub screen: Option<Screen>,
    pub memory: Option<Arc<dyn ClientMemory>>,
    pub denied_senders: DeniedSenders,
    pub our_names: OurNames,
    /// The AUTH mechanisms the MTA offered in its latest EHLO (`None`: not
    /// learned yet), shared across reloads.
    auth_mechanisms: Arc<std::sync::RwLock<Option<Vec<String>>>>,
    /// The extensions the MTA offered in its latest EHLO (`None`: not
    /// learned yet), shared across reloads.
    upstream_extensions: Arc<std::sync::RwLock<Option<upstream::Extensions>>>,
    /// When learning from the MTA last failed: EHLOs in the next
    /// `LEARN_RETRY` do not try again, so a silent MTA cannot make every
    /// client's EHLO wait out `upstream_connect_timeout`.
    learning_failed: Arc<std::sync::Mutex<Option<tokio::time::Instant>>>,
}

/// How long a failed attempt to learn the MTA's EHLO stands.
const LEARN_RETRY: std::time::Duration = std::time::Duration::from_secs(10);

impl SmtpContext {
    pub fn new(
        config: SmtpConfig,
        stats: Arc<SmtpStats>,
        on_pregreet: Option<PregreetHook>,
    ) -> Result<SmtpContext> {
        let gate = ConnectionGate::new(gate_limits(&config));
        let upstream_slots = Arc::new(Semaphore::new(config.max_upstream_sessions));
        Self::build(config, stats, on_pregreet, gate, upstream_slots)
    }

    /// The context for sessions accepted after a reload. Sessions already
    /// open keep the one they started with; the connection counts carry over
    /// (so a reload frees no slots), and so do the upstream slots unless
    /// their number changed. TLS certificate and key are read afresh.
    pub fn successor(
        &self,
        config: SmtpConfig,
        on_pregreet: Option<PregreetHook>,
    ) -> Result<SmtpContext> {
        let upstream_slots = if config.max_upstream_sessions == self.config.max_upstream_sessions {
            self.upstream_slots.clone()
        } else {
            Arc::new(Semaphore::new(config.max_upstream_sessions))
        };
        let mut next = Self::build(
            config,
            self.stats.clone(),
            on_pregreet,
            self.gate.clone(),
            upstream_slots,
        )?;
        next.gate.set_limits(gate_limits(&next.config));
        next.screen = self.screen.clone();
        next.memory = self.memory.clone();
        next.auth_mechanisms = self.auth_mechanisms.clone();
        if next.config.upstream == self.config.upstream {
            next.upstream_extensions = self.upstream_extensions.clone();
            next.learning_failed = self.learning_failed.clone();
        }
        // Pooled sessions stay only where they are still what the config asks for.
        let (old, new) = (&self.config, &next.config);
        let same_pool = new.upstream == old.upstream
            && Arc::ptr_eq(&next.upstream_slots, &self.upstream_slots)
            && new.upstream_pool == old.upstream_pool
            && new.upstream_pool_idle == old.upstream_pool_idle
            && new.hostname == old.hostname
            && new.upstream_timeout == old.upstream_timeout;
        if same_pool {
            next.upstream_pool = self.upstream_pool.clone();
        } else if let Some(pool) = &self.upstream_pool {
            pool.drain();
        }
        Ok(next)
    }

    fn build(
        config: SmtpConfig,
        stats: Arc<SmtpStats>,
        on_pregreet: Option<PregreetHook>,
        gate: Arc<ConnectionGate>,
        upstream_slots: Arc<Semaphore>,
    ) -> Result<SmtpContext> {
        let own_literals = if config.accept_own_literals {
            config
                .listen
                .iter()
                .map(|a| a.ip())
                .filter(|ip| !ip.is_unspecified())
                .collect()
        } else {
            Vec::new()
        };
        let policy = RelayPolicy::new(
            &config.local_domains,
            config.relay_networks.clone(),
            own_literals,
        );
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(load_tls(cert, key)?),
            _ => None,
        };
        let denied_senders = DeniedSenders::new(
            &config.denied_sender_domains,
            config.denied_sender_domains_file.as_deref(),
        )
        .map_err(|e| anyhow::anyhow!("smtp.denied_sender_domains: {e}"))?;
        let listen_ips = config
            .listen
            .iter()
            .map(|a| a.ip())
            .filter(|ip| !ip.is_unspecified())
            .collect();
        let our_names = OurNames::new(&config.hostname, &config.local_domains, listen_ips);
        let upstream_pool = (config.upstream_pool > 0).then(|| {
            let pool = Arc::new(pool::UpstreamPool::new(
                config.upstream_pool,
                config.upstream_pool_idle,
            ));
            pool::spawn_reaper(&pool);
            pool
        });
        Ok(SmtpContext {
            upstream_pool,
            memory: None,
            denied_senders,
            our_names,
            auth_mechanisms: Arc::default(),
            upstream_extensions: Arc::default(),
            learning_failed: Arc::default(),
            gate,
            upstream_slots,
            config,
            policy,
            tls,
            stats,
            on_pregreet,
            screen: None,
        })
    }
}

impl SmtpContext {
    /// The mechanisms to offer: the MTA's, less channel-binding ones
    /// (`-PLUS`), which cannot work through a TLS terminator.
    fn offered_auth(&self) -> Option<Vec<String>> {
        let learned = self
            .auth_mechanisms
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        let usable: Vec<String> = learned
            .into_iter()
            .filter(|m| !m.ends_with("-PLUS"))
            .collect();
        (!usable.is_empty()).then_some(usable)
    }

    fn learn_auth(&self, mechanisms: Vec<String>) {
        *self
            .auth_mechanisms
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(mechanisms);
    }

    /// What the MTA offered last; `None` until an upstream session was set up.
    fn upstream_extensions(&self) -> Option<upstream::Extensions> {
        *self
            .upstream_extensions
            .read()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Whether an attempt to learn from the MTA failed within `LEARN_RETRY`.
    fn learning_recently_failed(&self) -> bool {
        let failed = *self
            .learning_failed
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        failed.is_some_and(|at| at.elapsed() < LEARN_RETRY)
    }

    /// Records a failed attempt to learn from the MTA; a busy upstream slot
    /// says nothing about the MTA, so it does not count.
    fn note_learning_failure(&self, error: &upstream::UpstreamError) {
        if matches!(error, upstream::UpstreamError::Busy) {
            return;
        }
        *self
            .learning_failed
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(tokio::time::Instant::now());
    }

    fn learn_extensions(&self, extensions: upstream::Extensions) {
        *self
            .upstream_extensions
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(extensions);
    }

    fn auth_learned(&self) -> bool {
        self.auth_mechanisms
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }
}

fn gate_limits(config: &SmtpConfig) -> GateLimits {
    GateLimits {
        max_total: config.max_connections,
        max_per_client: config.max_connections_per_ip,
        ipv6_prefix: config.ipv6_client_prefix,
        rate_per_minute: config.max_connection_rate,
        rate_exempt: config.relay_networks.clone(),
    }
}

fn load_tls(cert: &std::path::Path, key: &std::path::Path) -> Result<tokio_rustls::TlsAcceptor> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("smtp.tls_cert {}: {e}", cert.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "smtp.tls_cert {}: no certificate found",
        cert.display()
    );
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow::anyhow!("smtp.tls_key {}: {e}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("smtp.tls_cert/tls_key do not form a usable certificate and key")?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Binds every `listen` address; IPv6 sockets are v6-only so `0.0.0.0:25` and `[::]:25` coexist.
pub fn bind(config: &SmtpConfig) -> Result<Vec<TcpListener>> {
    config
        .listen
        .iter()
        .map(|addr| {
            let socket = Socket::new(Domain::for_address(*addr), Type::STREAM, None)?;
            if addr.is_ipv6() {
                socket.set_only_v6(true)?;
            }
            socket.set_reuse_address(true)?;
            socket.set_nonblocking(true)?;
            socket
                .bind(&(*addr).into())
                .with_context(|| format!("smtp.listen: cannot bind {addr}"))?;
            socket.listen(1024)?;
            let listener = TcpListener::from_std(socket.into())?;
            Ok(listener)
        })
        .collect()
}

/// Runs the accept loops until `shutdown` is cancelled, then stops accepting
/// and returns once every session has ended: idle ones at once with
/// `421 4.3.2`, a message in flight after the MTA's answer to it, and any
/// left at `drain_timeout` are dropped. Each connection gets the context
/// current when it is accepted (a reload publishes a new one in `contexts`).
pub async fn serve(
    listeners: Vec<TcpListener>,
    contexts: watch::Receiver<Arc<SmtpContext>>,
    shutdown: CancellationToken,
) {
    let sessions = TaskTracker::new();
    let dropped = CancellationToken::new();
    let mut loops = tokio::task::JoinSet::new();
    for listener in listeners {
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "SMTP front end listening");
        }
        loops.spawn(accept_loop(
            listener,
            contexts.clone(),
            shutdown.clone(),
            sessions.clone(),
            dropped.clone(),
        ));
    }
    while loops.join_next().await.is_some() {}
    sessions.close();
    let drain_timeout = contexts.borrow().config.drain_timeout;
    if tokio::time::timeout(drain_timeout, sessions.wait())
        .await
        .is_err()
    {
        warn!(
            left = sessions.len(),
            "SMTP sessions still open at the drain deadline are dropped"
        );
        dropped.cancel();
        sessions.wait().await;
    }
}

/// Accepts until shutdown; the listener closes when this returns.
async fn accept_loop(
    listener: TcpListener,
    contexts: watch::Receiver<Arc<SmtpContext>>,
    shutdown: CancellationToken,
    sessions: TaskTracker,
    dropped: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let ctx = contexts.borrow().clone();
                let connection = handle_connection(stream, peer, ctx, shutdown.clone());
                let dropped = dropped.clone();
                sessions.spawn(async move {
                    tokio::select! {
                        _ = connection => {}
                        _ = dropped.cancelled() => {}
                    }
                });
            }
            Err(e) => {
                warn!(error = %e, "SMTP accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// Bounds how long unacknowledged data may sit on a client socket, so a dead
/// or zero-window peer is cut off by the kernel too.
fn tune_client_socket(stream: &TcpStream, config: &SmtpConfig) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    SockRef::from(stream).set_tcp_user_timeout(Some(config.write_timeout))
}

/// The connection entry point: the gate and the screen decide, then the session runs.
async fn handle_connection(
    stream: TcpStream,
    peer: SocketAddr,
    ctx: Arc<SmtpContext>,
    shutdown: CancellationToken,
) {
    if let Err(e) = tune_client_socket(&stream, &ctx.config) {
        debug!(client = %crate::netaddr::canonical(peer.ip()), error = %e, "cannot set client socket options");
    }
    let local = stream.local_addr().ok().map(|a| a.ip());
    run_connection(Box::new(stream), peer, local, ctx, shutdown).await
}

/// Everything after the socket options, over any stream (tests use in-memory ones).
async fn run_connection(
    stream: Box<dyn io::Stream>,
    peer: SocketAddr,
    local: Option<IpAddr>,
    ctx: Arc<SmtpContext>,
    shutdown: CancellationToken,
) {
    let open = ctx.stats.open_session();
    let client = crate::netaddr::canonical(peer.ip());
    let mut conn: io::Conn = io::client_conn(stream);
    let Some(peer) = proxied_client(&mut conn, peer, &ctx).await else {
        return;
    };
    let _admission = match ctx.gate.admit(peer.ip()) {
        Ok(admission) => admission,
        Err(refusal) => {
            let (counter, reason) = match refusal {
                gate::Refusal::RateLimited => {
                    (&ctx.stats.refused_connection_rate, "connection_rate")
                }
                _ => (&ctx.stats.refused_connection_limit, "connection_limit"),
            };
            SmtpStats::bump(counter);
            log_refused(client, reason);
            refuse(&mut conn, &refusal.reply(&ctx.config.hostname), &ctx.config).await;
            return;
        }
    };
    let trusted = match &ctx.screen {
        None => false,
        Some(screen) => match screen(peer.ip()).await {
            Screening::Pass => false,
            Screening::Trusted => true,
            Screening::Refuse(refusal) => {
                let (counter, reason, reply) = match &refusal {
                    ScreenRefusal::Denylisted(reply) => {
                        (&ctx.stats.refused_denylisted, "denylisted", reply)
                    }
                    ScreenRefusal::Dnsbl(reply) => (&ctx.stats.refused_dnsbl, "dnsbl", reply),
                    ScreenRefusal::Fcrdns(reply) => (&ctx.stats.refused_fcrdns, "fcrdns", reply),
                };
                SmtpStats::bump(counter);
                log_refused(client, reason);
                refuse(&mut conn, reply, &ctx.config).await;
                return;
            }
        },
    };
    let mut session = session::Session::new(ctx.clone(), peer, trusted, shutdown, open.accepted);
    session.set_local(local);
    if let Err(e) = session.run(&mut conn).await {
        debug!(%client, error = %e, "SMTP session ended with an I/O error");
    }
}

/// The client a connection is judged as: the peer itself, or for a peer in
/// `proxy_protocol_from` the client its PROXY header names. `None`: close
/// (a missing, bad or late header, or the balancer's own health check).
async fn proxied_client(
    conn: &mut io::Conn,
    peer: SocketAddr,
    ctx: &SmtpContext,
) -> Option<SocketAddr> {
    let balancer = crate::netaddr::canonical(peer.ip());
    if !ctx
        .config
        .proxy_protocol_from
        .iter()
        .any(|net| net.contains(&balancer))
    {
        return Some(peer);
    }
    let stats = &ctx.stats;
    match tokio::time::timeout(ctx.config.proxy_protocol_timeout, proxy::read_header(conn)).await {
        Ok(Ok(proxy::Source::Client(client))) => {
            debug!(%client, balancer = %peer, "PROXY header");
            Some(client)
        }
        Ok(Ok(proxy::Source::Local)) => {
            SmtpStats::bump(&stats.proxy_local_closed);
            debug!(balancer = %peer, "PROXY header for the balancer's own connection; closed");
            None
        }
        Ok(Err(e)) => {
            SmtpStats::bump(&stats.proxy_header_invalid);
            warn!(balancer = %peer, error = %e, "closing a connection from smtp.proxy_protocol_from");
            None
        }
        Err(_) => {
            SmtpStats::bump(&stats.proxy_header_invalid);
            warn!(
                balancer = %peer,
                timeout = ?ctx.config.proxy_protocol_timeout,
                "closing a connection from smtp.proxy_protocol_from: no PROXY header in time"
            );
            None
        }
    }
}

/// The session-end line of a connection refused before its banner.
fn log_refused(client: IpAddr, reason: &'static str) {
    info!(%client, outcome = %"refused", %reason, "SMTP session ended");
}

/// A reply instead of a banner; the connection closes after it.
async fn refuse(conn: &mut io::Conn, reply: &str, config: &SmtpConfig) {
    let wire = format!("{reply}\r\n");
    let _ = session::write_reply(conn, wire.as_bytes(), config.write_timeout).await;
}
