//! The in-process SMTP relay checker: connections that survive XDP meet an
//! ESMTP front end that refuses third-party relay and proxies accepted mail
//! to the MTA behind.
//!
//! `parse` and `policy` are pure; `session` is the state machine over a
//! connection; `upstream` is the proxy; `gate` (limits) and the [`Screen`]
//! (DNSBL verdicts) are the connection entry point.

pub mod config;
mod gate;
mod io;
pub mod parse;
pub mod policy;
pub mod reply;
mod session;
pub mod stats;
mod upstream;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

use anyhow::{Context, Result};
use socket2::{Domain, Socket, Type};
use tokio::io::BufReader;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;
use tracing::{debug, info, warn};

pub use config::SmtpConfig;
use gate::ConnectionGate;
use policy::RelayPolicy;
use stats::SmtpStats;

/// Called with the client's address when it talks before the greeting.
pub type PregreetHook = Arc<dyn Fn(IpAddr) + Send + Sync>;

/// What the connection-time screen decided about a client.
pub enum Screening {
    Pass,
    /// Pass, and spare it the pre-greet wait.
    Trusted,
    /// Send this reply line instead of a banner and close.
    Refuse(String),
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
    pub on_pregreet: Option<PregreetHook>,
    pub screen: Option<Screen>,
}

impl SmtpContext {
    pub fn new(
        config: SmtpConfig,
        stats: Arc<SmtpStats>,
        on_pregreet: Option<PregreetHook>,
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
        Ok(SmtpContext {
            gate: ConnectionGate::new(config.max_connections, config.max_connections_per_ip),
            config,
            policy,
            tls,
            stats,
            on_pregreet,
            screen: None,
        })
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

/// Runs the accept loops until the task is dropped.
pub async fn serve(listeners: Vec<TcpListener>, ctx: Arc<SmtpContext>) {
    let mut loops = tokio::task::JoinSet::new();
    for listener in listeners {
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "SMTP front end listening");
        }
        let ctx = ctx.clone();
        loops.spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, peer)) => {
                        tokio::spawn(handle_connection(stream, peer, ctx.clone()));
                    }
                    Err(e) => {
                        warn!(error = %e, "SMTP accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            }
        });
    }
    while loops.join_next().await.is_some() {}
}

/// The connection entry point: the gate and the screen decide, then the session runs.
async fn handle_connection(stream: TcpStream, peer: SocketAddr, ctx: Arc<SmtpContext>) {
    SmtpStats::bump(&ctx.stats.connections);
    let _ = stream.set_nodelay(true);
    let mut conn: io::Conn = BufReader::new(Box::new(stream));
    let _admission = match ctx.gate.admit(peer.ip()) {
        Ok(admission) => admission,
        Err(refusal) => {
            SmtpStats::bump(&ctx.stats.refused_connection_limit);
            refuse(&mut conn, &refusal.reply(&ctx.config.hostname)).await;
            return;
        }
    };
    let trusted = match &ctx.screen {
        None => false,
        Some(screen) => match screen(peer.ip()).await {
            Screening::Pass => false,
            Screening::Trusted => true,
            Screening::Refuse(reply) => {
                SmtpStats::bump(&ctx.stats.refused_dnsbl);
                refuse(&mut conn, &reply).await;
                return;
            }
        },
    };
    let mut session = session::Session::new(ctx, peer, trusted);
    if let Err(e) = session.run(&mut conn).await {
        debug!(client = %peer, error = %e, "SMTP session ended with an I/O error");
    }
}

/// A reply instead of a banner; the connection closes after it.
async fn refuse(conn: &mut io::Conn, reply: &str) {
    let _ = tokio::io::AsyncWriteExt::write_all(conn.get_mut(), format!("{reply}\r\n").as_bytes())
        .await;
}
