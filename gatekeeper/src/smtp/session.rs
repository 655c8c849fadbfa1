//! The state machine over one client connection.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::time::{timeout, timeout_at, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::chunk::{BodyProblem, BodyScanner};
use super::io::{read_line, trim_eol, Conn, Detached, Line};
use super::parse::{parse_command, Command, MailParams, ParseError, Path, RcptParams, ReversePath};
use super::policy::Decision;
use super::proxy;
use super::reply::Reply;
use super::stats::SmtpStats;
use super::upstream::{ClientInfo, Extensions, Timeouts, Upstream, UpstreamError};
use super::{AuthMode, SmtpContext};
use crate::ledger::bans::AbuseKind;
use crate::ledger::greylist::{Checked, GreyVerdict};

/// RFC 5321 §4.5.3.1.4: a command line is at most 512 octets with its CRLF.
const MAX_COMMAND_LINE: usize = 512;
/// After the MTA lost acknowledged recipients: temporary, so the client retries the whole message.
const LOST: &str = "451 4.3.0 Error: mail system behind the gatekeeper failed mid-transaction; recipients lost, send the message again later";
/// RFC 5321 §4.5.3.1.6: a text line is at most 1000 octets with its CRLF.
const MAX_TEXT_LINE: usize = 1000;
/// RFC 4954 §4: a SASL response line may be 12288 octets.
const MAX_AUTH_LINE: usize = 12288;
const AUTH_UNAVAILABLE: &str =
    "454 4.7.0 Temporary authentication failure: mail system behind the gatekeeper unavailable";

enum Flow {
    Continue,
    Close,
}

/// RFC 6531 section 3.5: a UTF-8 address outside an SMTPUTF8 transaction.
const NEEDS_SMTPUTF8: &str = "553 5.6.7 Error: UTF-8 addresses need MAIL FROM with SMTPUTF8";

struct Transaction {
    /// The MAIL command as it will be forwarded.
    mail_line: String,
    /// The reverse path as greylisting keys it (`""` for `<>`).
    sender: String,
    /// The RCPT commands the client got 250 for: replayed whole on a fresh
    /// upstream session if the MTA fails mid-transaction.
    accepted: Vec<String>,
    /// An acknowledged recipient could not be replayed: DATA gets 451.
    lost: bool,
    /// MAIL declared SMTPUTF8: UTF-8 recipients may follow.
    smtputf8: bool,
    /// The message is coming in BDAT chunks (DATA is out for this transaction).
    chunks: Option<Chunked>,
}

/// A message arriving in BDAT chunks.
#[derive(Default)]
struct Chunked {
    /// Octets accepted so far.
    size: u64,
    scanner: BodyScanner,
    /// A chunk was refused with this code: the rest of the message is read
    /// and discarded until RSET, so pipelined chunks are not taken for commands.
    failed: Option<u16>,
}

/// Why a BDAT chunk is refused before any of it reaches the MTA.
enum ChunkRefusal {
    NoMail,
    NoRecipients,
    Lost,
    /// The message failed at an earlier chunk, with this code.
    Failed(u16),
    TooBig,
    /// The upstream session for this message offers no CHUNKING (the MTA
    /// changed since EHLO was answered): a chunk is never turned into DATA.
    NotUpstream,
}

/// What waiting for more of a chunk produced.
enum Filled<'c> {
    Bytes(&'c [u8]),
    Eof,
    Timeout { session_time: bool },
}

/// How a session ended, as the session-end log line spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The client sent QUIT.
    Quit,
    /// The client closed the connection (or it broke) without QUIT.
    Disconnected,
    Pregreet,
    Timeout,
    SessionTime,
    Shutdown,
    CommandLimit,
    ErrorLimit,
    Smuggling,
    WriteTimeout,
    TlsFailed,
    /// The first bytes were a TLS handshake or binary data, not a command.
    NotSmtp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NotSmtp {
    TlsHandshake,
    Binary,
}

/// What the first byte a client sends says about it (pure): a TLS record
/// (0x16, handshake) or an SSLv2-style hello (high bit set), or any byte no
/// SMTP command can start with.
fn classify_first_byte(byte: u8) -> Option<NotSmtp> {
    match byte {
        0x16 | 0x80 => Some(NotSmtp::TlsHandshake),
        b if b >= 0x80 || (b < 0x20 && b != b'\r' && b != b'\n') || b == 0x7f => {
            Some(NotSmtp::Binary)
        }
        _ => None,
    }
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Quit => "quit",
            Outcome::Disconnected => "disconnected",
            Outcome::Pregreet => "pregreet",
            Outcome::Timeout => "timeout",
            Outcome::SessionTime => "session_time",
            Outcome::Shutdown => "shutdown",
            Outcome::CommandLimit => "command_limit",
            Outcome::ErrorLimit => "error_limit",
            Outcome::Smuggling => "smuggling",
            Outcome::WriteTimeout => "write_timeout",
            Outcome::TlsFailed => "tls_failed",
            Outcome::NotSmtp => "not_smtp",
        }
    }
}

/// What the session-end line counts.
#[derive(Default)]
struct Tally {
    recipients: usize,
    delivered: usize,
    relay_denied: usize,
}

/// What waiting for the next command line produced.
enum Wait {
    Line(Line),
    /// The first bytes are not SMTP: a TLS ClientHello (a client that
    /// wanted port 465) or other binary data.
    NotSmtp(NotSmtp),
    Timeout,
    SessionTime,
    Shutdown,
}

pub struct Session {
    ctx: Arc<SmtpContext>,
    peer: SocketAddr,
    helo: Option<String>,
    esmtp: bool,
    tls_active: bool,
    tx: Option<Transaction>,
    upstream: Option<Upstream>,
    errors: usize,
    /// DNSBL-trusted (allowlist score): spared the pre-greet wait.
    trusted: bool,
    /// `max_session_time` after the connection was accepted.
    deadline: Instant,
    commands: usize,
    shutdown: CancellationToken,
    accepted: Instant,
    outcome: Outcome,
    tally: Tally,
    /// The address the client connected to (HELO literals naming it are forged).
    local: Option<IpAddr>,
    /// The SASL mechanism the MTA behind accepted; relay is allowed from then on.
    authenticated: Option<String>,
    /// The authenticated upstream session between transactions: the MTA's
    /// own `permit_sasl_authenticated` holds only on it.
    pinned: Option<Upstream>,
    /// A refused recipient counts towards a ban once per session: one
    /// message to ten stale addresses is a sender's mistake, not an attack.
    rcpt_refusal_counted: bool,
    /// Likewise a chunked message refused for a bare CR/LF: the session
    /// goes on after it, so it must not earn a ban alone by repetition.
    chunk_smuggling_counted: bool,
    /// The MTA's extensions as this session's EHLO offered them: what the
    /// client was told is what its commands are judged by.
    offered: Extensions,
}

/// A line of the SASL exchange from the client.
enum SaslLine {
    Response(String),
    Cancel,
    Invalid,
    TooLong,
    Closed,
    Timeout,
}

/// Why a message could not be accepted, decided while its data streamed past.
enum DataProblem {
    TooBig,
    LineTooLong,
    Upstream(UpstreamError),
}

/// Why a chunk could not be accepted, decided while it streamed past.
enum ChunkProblem {
    Body(BodyProblem),
    Upstream(UpstreamError),
}

impl Session {
    pub fn new(
        ctx: Arc<SmtpContext>,
        peer: SocketAddr,
        trusted: bool,
        shutdown: CancellationToken,
        accepted: Instant,
    ) -> Session {
        Session {
            accepted,
            outcome: Outcome::Disconnected,
            tally: Tally::default(),
            trusted,
            deadline: Instant::now() + ctx.config.max_session_time,
            commands: 0,
            shutdown,
            ctx,
            peer,
            helo: None,
            esmtp: false,
            tls_active: false,
            tx: None,
            upstream: None,
            errors: 0,
            local: None,
            authenticated: None,
            pinned: None,
            rcpt_refusal_counted: false,
            chunk_smuggling_counted: false,
            offered: Extensions::default(),
        }
    }

    pub fn set_local(&mut self, local: Option<IpAddr>) {
        self.local = local;
    }

    /// Relay networks, a relay grant or an authenticated session.
    fn may_relay(&self) -> bool {
        self.authenticated.is_some()
            || self.ctx.policy.may_relay(self.client_ip())
            || self.granted()
    }

    fn granted(&self) -> bool {
        self.ctx
            .memory
            .as_ref()
            .is_some_and(|m| m.relay_granted(self.client_ip()))
    }

    /// Counts an abuse event towards a ban; clients that may relay and
    /// DNSBL-trusted ones are never banned.
    fn abuse(&self, kind: AbuseKind) {
        let Some(memory) = &self.ctx.memory else {
            return;
        };
        if self.trusted || self.may_relay() {
            return;
        }
        if let Some(group) = self.ban_target() {
            memory.abuse(self.client_ip(), group, kind);
        }
    }

    fn client_ip(&self) -> IpAddr {
        crate::netaddr::canonical(self.peer.ip())
    }

    pub async fn run(&mut self, conn: &mut Conn) -> std::io::Result<()> {
        let result = self.converse(conn).await;
        if let Err(e) = &result {
            if e.kind() == std::io::ErrorKind::TimedOut {
                // The client stopped taking replies: nothing more can reach it.
                SmtpStats::bump(&self.ctx.stats.write_timeouts);
                self.outcome = Outcome::WriteTimeout;
            }
        }
        self.end_transaction().await;
        if let Some(pinned) = self.pinned.take() {
            pinned.quit().await;
        }
        self.log_end();
        result
    }

    /// The one line per session end that people and fail2ban read; the
    /// client's text (HELO) comes last and quoted, after the fields filters match.
    fn log_end(&self) {
        info!(
            client = %self.client_ip(),
            outcome = %self.outcome.name(),
            commands = self.commands,
            errors = self.errors,
            recipients = self.tally.recipients,
            delivered = self.tally.delivered,
            relay_denied = self.tally.relay_denied,
            tls = self.tls_active,
            auth = self.authenticated.as_deref().unwrap_or("-"),
            helo = ?self.helo.as_deref().unwrap_or(""),
            "SMTP session ended"
        );
    }

    async fn converse(&mut self, conn: &mut Conn) -> std::io::Result<()> {
        if !self.greet(conn).await? {
            return Ok(());
        }
        let host = self.ctx.config.hostname.clone();
        loop {
            let line = match self.next_command(conn).await? {
                Wait::Line(line) => line,
                Wait::Timeout => {
                    SmtpStats::bump(&self.ctx.stats.timeouts);
                    self.outcome = Outcome::Timeout;
                    self.send(conn, &format!("421 4.4.2 {host} Error: timeout exceeded"))
                        .await?;
                    return Ok(());
                }
                Wait::SessionTime => return self.session_too_long(conn).await,
                Wait::NotSmtp(kind) => {
                    // Answered once, then closed: every further byte would
                    // be another 500, and the client is waiting for a ServerHello.
                    SmtpStats::bump(&self.ctx.stats.not_smtp_disconnects);
                    self.outcome = Outcome::NotSmtp;
                    if kind == NotSmtp::Binary {
                        self.abuse(AbuseKind::ProtocolError);
                    }
                    let reply = match kind {
                        NotSmtp::TlsHandshake => {
                            "554 5.5.1 Error: TLS handshake on a plaintext port (use STARTTLS)"
                        }
                        NotSmtp::Binary => {
                            "554 5.5.1 Error: binary data where a command was expected"
                        }
                    };
                    self.send(conn, reply).await?;
                    return Ok(());
                }
                Wait::Shutdown => {
                    SmtpStats::bump(&self.ctx.stats.shutdown_disconnects);
                    self.outcome = Outcome::Shutdown;
                    self.send(conn, &format!("421 4.3.2 {host} Service shutting down"))
                        .await?;
                    return Ok(());
                }
            };
            if line != Line::Eof {
                self.commands += 1;
                if self.commands > self.ctx.config.max_commands {
                    SmtpStats::bump(&self.ctx.stats.command_limit_disconnects);
                    self.outcome = Outcome::CommandLimit;
                    self.send(conn, &format!("421 4.7.0 {host} Error: too many commands"))
                        .await?;
                    return Ok(());
                }
            }
            let flow = match line {
                Line::Eof => return Ok(()),
                Line::TooLong => self.error(conn, "500 5.5.2 Error: line too long").await?,
                Line::Complete(bytes)
                    if self.commands == 1
                        && proxy::looks_like_header(&[&bytes[..], conn.buffer()].concat()) =>
                {
                    return self.refuse_proxy_header(conn).await;
                }
                Line::Complete(bytes) => self.dispatch(conn, trim_eol(&bytes)).await?,
            };
            if let Flow::Close = flow {
                return Ok(());
            }
        }
    }

    /// The next command, unless a timeout, the session's life or shutdown
    /// comes first. Shutdown is checked first, so a client pipelining
    /// commands still hears of it at the next command boundary.
    async fn next_command(&self, conn: &mut Conn) -> std::io::Result<Wait> {
        let config = &self.ctx.config;
        let limit = if self.tx.is_some() {
            config.command_timeout
        } else {
            config.pre_mail_timeout
        };
        let by_command = Instant::now() + limit;
        let deadline = by_command.min(self.deadline);
        let first_command = self.commands == 0;
        tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => Ok(Wait::Shutdown),
            line = timeout_at(deadline, async {
                if first_command {
                    // Judged on the first byte, before waiting for a line
                    // end that a TLS client will never send.
                    let first = conn.fill_buf().await?.first().copied();
                    if let Some(kind) = first.and_then(classify_first_byte) {
                        return Ok(Err(kind));
                    }
                }
                read_line(conn, MAX_COMMAND_LINE).await.map(Ok)
            }) => match line {
                Ok(Ok(Ok(line))) => Ok(Wait::Line(line)),
                Ok(Ok(Err(kind))) => Ok(Wait::NotSmtp(kind)),
                Ok(Err(e)) => Err(e),
                Err(_) if deadline < by_command => Ok(Wait::SessionTime),
                Err(_) => Ok(Wait::Timeout),
            },
        }
    }

    async fn session_too_long(&mut self, conn: &mut Conn) -> std::io::Result<()> {
        SmtpStats::bump(&self.ctx.stats.session_time_disconnects);
        self.outcome = Outcome::SessionTime;
        let host = &self.ctx.config.hostname;
        let reply = format!("421 4.4.2 {host} Error: session time limit exceeded");
        self.send(conn, &reply).await
    }

    /// Sends the banner; with `greet_wait`, first a `220-` teaser and a pause
    /// in which a well-behaved client stays silent. Returns false to close.
    async fn greet(&mut self, conn: &mut Conn) -> std::io::Result<bool> {
        let host = self.ctx.config.hostname.clone();
        let wait = self.ctx.config.greet_wait;
        self.ctx
            .stats
            .banner_seconds
            .observe(self.accepted.elapsed().as_secs_f64());
        if !wait.is_zero() && !self.trusted {
            self.send(conn, &format!("220-{host} ESMTP")).await?;
            if let Ok(read) = timeout(wait, conn.fill_buf()).await {
                let early = read?;
                if early.is_empty() {
                    return Ok(false);
                }
                if proxy::looks_like_header(early) {
                    self.refuse_proxy_header(conn).await?;
                    return Ok(false);
                }
                SmtpStats::bump(&self.ctx.stats.pregreet);
                self.outcome = Outcome::Pregreet;
                self.abuse(AbuseKind::Pregreet);
                if let (Some(hook), Some(target)) = (&self.ctx.on_pregreet, self.ban_target()) {
                    hook(self.client_ip(), target);
                }
                self.send(
                    conn,
                    &format!(
                        "554 5.7.1 {host} Error: protocol violation: talked before the greeting"
                    ),
                )
                .await?;
                return Ok(false);
            }
        }
        self.send(conn, &format!("220 {host} ESMTP Gatekeeper"))
            .await?;
        Ok(true)
    }

    /// A PROXY header from a client outside `proxy_protocol_from` (or a second
    /// one through a balancer): refused, not banned, since it is more often a
    /// balancer missing from the list than a bot.
    async fn refuse_proxy_header(&self, conn: &mut Conn) -> std::io::Result<()> {
        SmtpStats::bump(&self.ctx.stats.proxy_header_untrusted);
        warn!(client = %self.peer, "PROXY header from a client outside smtp.proxy_protocol_from; refused");
        let host = &self.ctx.config.hostname;
        let reply = format!(
            "554 5.7.1 {host} Error: PROXY protocol header from an address not allowed to send one"
        );
        self.send(conn, &reply).await
    }

    /// What a pre-greet ban covers: the client's group, narrowed to its own
    /// address when the group holds a relay network; relay clients never.
    fn ban_target(&self) -> Option<IpNet> {
        let client = self.client_ip();
        let policy = &self.ctx.policy;
        if policy.may_relay(client) {
            return None;
        }
        let group = crate::netaddr::client_group(client, self.ctx.config.ipv6_client_prefix);
        if policy.overlaps_relay_networks(&group) {
            return Some(IpNet::from(client));
        }
        Some(group)
    }

    async fn dispatch(&mut self, conn: &mut Conn, line: &[u8]) -> std::io::Result<Flow> {
        let command = match parse_command(line) {
            Ok(command) => command,
            Err(e @ ParseError::BadChunk) => {
                // Where the chunk ends is unknown: its bytes would be read as commands.
                self.abuse(AbuseKind::ProtocolError);
                self.abandon_transaction();
                self.send(conn, &e.reply()).await?;
                return Ok(Flow::Close);
            }
            Err(e) => return self.protocol_error(conn, &e.reply()).await,
        };
        let host = self.ctx.config.hostname.clone();
        match command {
            Command::Ehlo(name) => {
                if let Some(refusal) = self.judge_helo(&name) {
                    return self.protocol_error(conn, &refusal).await;
                }
                self.end_transaction().await;
                self.helo = Some(name);
                self.esmtp = true;
                let mut lines = vec![
                    host,
                    "PIPELINING".to_owned(),
                    format!("SIZE {}", self.ctx.config.max_message_size),
                    "8BITMIME".to_owned(),
                    "ENHANCEDSTATUSCODES".to_owned(),
                ];
                if self.ctx.tls.is_some() && !self.tls_active {
                    lines.push("STARTTLS".to_owned());
                }
                if let Some(mechanisms) = self.auth_to_offer().await {
                    lines.push(format!("AUTH {}", mechanisms.join(" ")));
                }
                let extensions = self.extensions_to_offer().await;
                self.offered = extensions;
                if extensions.dsn {
                    lines.push("DSN".to_owned());
                }
                if extensions.smtputf8 {
                    lines.push("SMTPUTF8".to_owned());
                }
                if extensions.chunking {
                    lines.push("CHUNKING".to_owned());
                }
                self.send_reply(conn, &Reply { code: 250, lines }).await?;
            }
            Command::Helo(name) => {
                if let Some(refusal) = self.judge_helo(&name) {
                    return self.protocol_error(conn, &refusal).await;
                }
                self.end_transaction().await;
                self.helo = Some(name);
                self.esmtp = false;
                self.send(conn, &format!("250 {host}")).await?;
            }
            Command::Mail { from, params } => return self.mail(conn, from, params).await,
            Command::Rcpt { to, params } => return self.rcpt(conn, to, params).await,
            Command::Data => return self.data(conn).await,
            Command::Bdat { size, last } => return self.bdat(conn, size, last).await,
            Command::Rset => {
                self.end_transaction().await;
                self.send(conn, "250 2.0.0 Ok").await?;
            }
            Command::Noop => self.send(conn, "250 2.0.0 Ok").await?,
            Command::Help => {
                self.send(
                    conn,
                    "214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY",
                )
                .await?
            }
            Command::Vrfy => {
                self.send(
                    conn,
                    "252 2.5.2 Cannot VRFY user; send mail and delivery will be attempted",
                )
                .await?
            }
            Command::Expn => {
                return self
                    .error(conn, "502 5.5.1 Error: EXPN not available")
                    .await
            }
            Command::Quit => {
                self.outcome = Outcome::Quit;
                self.send(conn, "221 2.0.0 Bye").await?;
                return Ok(Flow::Close);
            }
            Command::StartTls => return self.starttls(conn).await,
            Command::Auth { mechanism, initial } => {
                return self.auth(conn, mechanism, initial).await
            }
        }
        Ok(Flow::Continue)
    }

    /// The refusal of a greeting from outside that names us or, with
    /// `helo_require_fqdn`, is no dotted name. Clients that may relay are not judged.
    fn judge_helo(&self, name: &str) -> Option<String> {
        if self.may_relay() {
            return None;
        }
        let problem =
            self.ctx
                .our_names
                .judge(name, self.local, self.ctx.config.helo_require_fqdn)?;
        info!(client = %self.client_ip(), reason = %problem.name(), helo = ?name, "greeting refused");
        Some(match problem {
            super::helo::HeloProblem::ClaimsUs => {
                SmtpStats::bump(&self.ctx.stats.helo_refused_claims_us);
                format!("550 5.7.1 <{name}>: Helo command rejected: you are not me")
            }
            super::helo::HeloProblem::NotFqdn => {
                SmtpStats::bump(&self.ctx.stats.helo_refused_not_fqdn);
                format!("504 5.5.2 <{name}>: Helo command rejected: need fully-qualified hostname")
            }
        })
    }

    /// The mechanisms EHLO offers: only with `auth = "upstream"`, after
    /// STARTTLS unless `auth_require_tls` is off, and as the MTA offers
    /// them (learned from one upstream session if no session taught us yet).
    /// The MTA's extensions, learned from one upstream session the first
    /// time a client says EHLO (and refreshed by every later one); none
    /// while the MTA cannot be reached.
    async fn extensions_to_offer(&self) -> Extensions {
        if let Some(known) = self.ctx.upstream_extensions() {
            return known;
        }
        if self.ctx.learning_recently_failed() {
            return Extensions::default();
        }
        match self.connect_upstream().await {
            Ok(upstream) => {
                let extensions = upstream.extensions();
                upstream.quit().await;
                extensions
            }
            Err(e) => {
                debug!(error = %e, "cannot learn the MTA's extensions");
                self.ctx.note_learning_failure(&e);
                Extensions::default()
            }
        }
    }

    async fn auth_to_offer(&self) -> Option<Vec<String>> {
        let config = &self.ctx.config;
        if config.auth != AuthMode::Upstream
            || (config.auth_require_tls && !self.tls_active)
            || self.authenticated.is_some()
        {
            return None;
        }
        if !self.ctx.auth_learned() && !self.ctx.learning_recently_failed() {
            match self.connect_upstream().await {
                Ok(upstream) => {
                    // Learned even when empty: an MTA without AUTH is asked once.
                    self.ctx.learn_auth(upstream.auth_mechanisms().to_vec());
                    upstream.quit().await
                }
                Err(e) => {
                    debug!(error = %e, "cannot learn the MTA's AUTH mechanisms");
                    self.ctx.note_learning_failure(&e);
                }
            }
        }
        self.ctx.offered_auth()
    }

    /// AUTH, passed through: the exchange runs on a fresh upstream session
    /// (XCLIENT first, so the MTA judges the real client), line by line;
    /// on 235 that session stays with this one for its transactions.
    async fn auth(
        &mut self,
        conn: &mut Conn,
        mechanism: String,
        initial: Option<String>,
    ) -> std::io::Result<Flow> {
        let config = &self.ctx.config;
        let refusal = if config.auth != AuthMode::Upstream {
            Some("503 5.5.1 Error: authentication not enabled")
        } else if config.auth_require_tls && !self.tls_active {
            Some("538 5.7.11 Encryption required for requested authentication mechanism")
        } else if !self.esmtp {
            Some("503 5.5.1 Error: send EHLO first")
        } else if self.authenticated.is_some() {
            Some("503 5.5.1 Error: already authenticated")
        } else if self.tx.is_some() {
            Some("503 5.5.1 Error: MAIL transaction in progress")
        } else if !self
            .ctx
            .offered_auth()
            .is_some_and(|offered| offered.contains(&mechanism))
        {
            Some("504 5.5.4 Unrecognized authentication type")
        } else {
            None
        };
        if let Some(reply) = refusal {
            SmtpStats::bump(&self.ctx.stats.auth_refused);
            // Counted towards max_errors, not a ban: a misconfigured mail
            // client behind an office NAT must not ban the office.
            return self.error(conn, reply).await;
        }
        let mut upstream = match self.connect_upstream().await {
            Ok(upstream) => upstream,
            Err(e) => {
                if matches!(e, UpstreamError::Busy) {
                    SmtpStats::bump(&self.ctx.stats.upstream_busy);
                } else {
                    SmtpStats::bump(&self.ctx.stats.upstream_failures);
                }
                debug!(error = %e, "no upstream session for AUTH");
                self.send(conn, AUTH_UNAVAILABLE).await?;
                return Ok(Flow::Continue);
            }
        };
        let mut line = match initial {
            Some(response) => format!("AUTH {mechanism} {response}"),
            None => format!("AUTH {mechanism}"),
        };
        loop {
            let reply = match upstream.command(&line).await {
                Ok(reply) => reply,
                Err(e) => {
                    SmtpStats::bump(&self.ctx.stats.upstream_failures);
                    debug!(error = %e, "upstream failed during AUTH");
                    self.send(conn, AUTH_UNAVAILABLE).await?;
                    return Ok(Flow::Continue);
                }
            };
            match reply.code {
                334 => {}
                235 => {
                    SmtpStats::bump(&self.ctx.stats.auth_successes);
                    info!(client = %self.client_ip(), %mechanism, "client authenticated by the MTA behind");
                    self.authenticated = Some(mechanism);
                    self.pinned = Some(upstream);
                    self.send_reply(conn, &reply).await?;
                    return Ok(Flow::Continue);
                }
                code => {
                    SmtpStats::bump(&self.ctx.stats.auth_failures);
                    info!(client = %self.client_ip(), %mechanism, code, "authentication failed");
                    upstream.quit().await;
                    self.send_reply(conn, &reply).await?;
                    if code == 535 {
                        self.abuse(AbuseKind::AuthFailure);
                    }
                    return self.count_error(conn).await;
                }
            }
            self.send_reply(conn, &reply).await?;
            line = match self.sasl_line(conn).await? {
                SaslLine::Response(text) => text,
                SaslLine::Cancel => "*".to_owned(),
                problem => {
                    // The MTA's exchange is abandoned with its session.
                    SmtpStats::bump(&self.ctx.stats.auth_failures);
                    drop(upstream);
                    return match problem {
                        SaslLine::TooLong => {
                            self.protocol_error(
                                conn,
                                "500 5.5.6 Authentication exchange line is too long",
                            )
                            .await
                        }
                        SaslLine::Invalid => {
                            self.protocol_error(
                                conn,
                                "501 5.5.2 Error: invalid SASL response (not base64)",
                            )
                            .await
                        }
                        SaslLine::Timeout => {
                            SmtpStats::bump(&self.ctx.stats.timeouts);
                            self.outcome = Outcome::Timeout;
                            let host = &self.ctx.config.hostname;
                            self.send(conn, &format!("421 4.4.2 {host} Error: timeout exceeded"))
                                .await?;
                            Ok(Flow::Close)
                        }
                        _ => Ok(Flow::Close),
                    };
                }
            };
        }
    }

    /// One client line of a SASL exchange: base64, empty, or `*` (cancel).
    async fn sasl_line(&mut self, conn: &mut Conn) -> std::io::Result<SaslLine> {
        let deadline = (Instant::now() + self.ctx.config.command_timeout).min(self.deadline);
        let line = match timeout_at(deadline, read_line(conn, MAX_AUTH_LINE)).await {
            Ok(line) => line?,
            Err(_) => return Ok(SaslLine::Timeout),
        };
        self.commands += 1;
        let bytes = match line {
            Line::Eof => return Ok(SaslLine::Closed),
            Line::TooLong => return Ok(SaslLine::TooLong),
            Line::Complete(bytes) => bytes,
        };
        let text = trim_eol(&bytes);
        Ok(match std::str::from_utf8(text) {
            Ok("*") => SaslLine::Cancel,
            Ok("") => SaslLine::Response(String::new()),
            Ok(t) if super::parse::is_sasl_response(t) => SaslLine::Response(t.to_owned()),
            _ => SaslLine::Invalid,
        })
    }

    /// An error reply for bad syntax or a command out of sequence: counted
    /// towards `max_errors` and towards a ban.
    async fn protocol_error(&mut self, conn: &mut Conn, reply: &str) -> std::io::Result<Flow> {
        self.abuse(AbuseKind::ProtocolError);
        self.error(conn, reply).await
    }

    async fn mail(
        &mut self,
        conn: &mut Conn,
        from: ReversePath,
        params: MailParams,
    ) -> std::io::Result<Flow> {
        if self.helo.is_none() {
            return self
                .protocol_error(conn, "503 5.5.1 Error: send HELO/EHLO first")
                .await;
        }
        if self.tx.is_some() {
            return self
                .protocol_error(conn, "503 5.5.1 Error: nested MAIL command")
                .await;
        }
        if self.authenticated.is_some() && self.pinned.is_none() && self.upstream.is_none() {
            // The authenticated upstream session is gone (MTA timeout, an
            // abandoned message): relay ends with it; the client may AUTH again.
            info!(client = %self.client_ip(), "authenticated upstream session lost; authentication ends");
            self.authenticated = None;
        }
        if let ReversePath::Path(Path {
            domain: Some(super::parse::Domain::Name(domain)),
            raw,
            ..
        }) = &from
        {
            if self.ctx.denied_senders.denies(domain) {
                SmtpStats::bump(&self.ctx.stats.sender_denied);
                info!(client = %self.client_ip(), sender = ?raw, "sender domain denied");
                let reply = format!("554 5.7.1 <{raw}>: Sender address rejected: domain denied");
                return self.error(conn, &reply).await;
            }
        }
        if params.uses_dsn() && !self.dsn_offered() {
            return self
                .error(conn, "555 5.5.4 Unsupported parameter: DSN is not offered")
                .await;
        }
        if params.smtputf8 && !self.smtputf8_offered() {
            return self
                .error(
                    conn,
                    "555 5.5.4 Unsupported parameter: SMTPUTF8 is not offered",
                )
                .await;
        }
        if matches!(&from, ReversePath::Path(p) if p.utf8) && !params.smtputf8 {
            return self.error(conn, NEEDS_SMTPUTF8).await;
        }
        let max = self.ctx.config.max_message_size;
        if params.size.is_some_and(|size| size > max) {
            SmtpStats::bump(&self.ctx.stats.oversize_refused);
            return self
                .error(conn, "552 5.3.4 Error: message size exceeds fixed limit")
                .await;
        }
        let mut params = params;
        if !self.may_relay() {
            params.limit_dsn();
        }
        let sender = from.to_wire();
        let mail_line = format!("MAIL FROM:<{sender}>{}", params.to_wire());
        self.tx = Some(Transaction {
            sender,
            mail_line,
            accepted: Vec::new(),
            lost: false,
            smtputf8: params.smtputf8,
            chunks: None,
        });
        self.send(conn, "250 2.1.0 Ok").await?;
        Ok(Flow::Continue)
    }

    /// DSN parameters pass only to an MTA whose EHLO offered DSN.
    fn dsn_offered(&self) -> bool {
        self.esmtp && self.offered.dsn
    }

    fn smtputf8_offered(&self) -> bool {
        self.esmtp && self.offered.smtputf8
    }

    fn chunking_offered(&self) -> bool {
        self.esmtp && self.offered.chunking
    }

    async fn rcpt(
        &mut self,
        conn: &mut Conn,
        to: Path,
        params: RcptParams,
    ) -> std::io::Result<Flow> {
        let Some(tx) = &self.tx else {
            return self
                .protocol_error(conn, "503 5.5.1 Error: need MAIL command")
                .await;
        };
        if tx.chunks.is_some() {
            // The message has begun: a recipient now would mean a replayed
            // transaction carrying only the chunks still to come.
            return self
                .protocol_error(conn, "503 5.5.1 Error: RCPT after BDAT")
                .await;
        }
        if params.uses_dsn() && !self.dsn_offered() {
            return self
                .error(conn, "555 5.5.4 Unsupported parameter: DSN is not offered")
                .await;
        }
        if to.utf8 && !tx.smtputf8 {
            return self.error(conn, NEEDS_SMTPUTF8).await;
        }
        if tx.accepted.len() >= self.ctx.config.max_recipients {
            self.send(conn, "452 4.5.3 Error: too many recipients")
                .await?;
            return Ok(Flow::Continue);
        }
        if tx.lost {
            // DATA will say so too; the transaction stays for that.
            self.send(conn, LOST).await?;
            return Ok(Flow::Continue);
        }
        let decision = self.ctx.policy.decide_for(&to, self.may_relay());
        if let Decision::Refuse(reason) = decision {
            self.ctx.stats.relay_denied(reason);
            self.tally.relay_denied += 1;
            self.abuse(AbuseKind::RelayAttempt);
            info!(
                client = %self.client_ip(),
                reason = %reason.name(),
                rcpt = ?to.raw,
                helo = ?self.helo.as_deref().unwrap_or(""),
                "relay refused"
            );
            return self
                .error(
                    conn,
                    &format!("554 5.7.1 <{}>: Relay access denied", to.raw),
                )
                .await;
        }
        if decision == Decision::Relay && !self.ctx.policy.may_relay(self.client_ip()) {
            match self.authenticated.is_some() {
                true => SmtpStats::bump(&self.ctx.stats.relay_by_auth),
                false => SmtpStats::bump(&self.ctx.stats.relay_by_grant),
            }
        }
        if decision == Decision::Local {
            if let Some(retry_after) = self.greylisted(&to) {
                let reply = format!(
                    "451 4.7.1 <{}>: Recipient address rejected: greylisted, try again in {retry_after} seconds",
                    to.raw
                );
                self.send(conn, &reply).await?;
                return Ok(Flow::Continue);
            }
        }
        // ORCPT and NOTIFY ride along rebuilt; the relay decision above
        // judged the path alone.
        let mut params = params;
        if !self.may_relay() {
            params.limit_dsn();
        }
        let rcpt_line = format!("RCPT TO:<{}>{}", to.to_wire(), params.to_wire());
        let reply = match self.forward_rcpt(&rcpt_line).await {
            Ok(reply) if reply.is_success() => reply,
            Ok(reply) if reply.code < 400 => {
                // A 3xx (or 1xx) to RCPT: the MTA's state is unknown, so the
                // session is dropped and the transaction replayed if it goes on.
                SmtpStats::bump(&self.ctx.stats.upstream_failures);
                debug!(
                    code = reply.code,
                    "upstream gave a non-2xx, non-error reply to RCPT"
                );
                self.upstream = None;
                Reply::new(
                    451,
                    "4.3.0 Error: mail system behind the gatekeeper misbehaved, try again later",
                )
            }
            // The MTA refused (unknown user, ...): counts like our own refusals,
            // so harvesting addresses ends at `max_errors`.
            Ok(reply) | Err(UpstreamError::Refused(reply)) => {
                self.send_reply(conn, &reply).await?;
                if reply.code >= 500 && !self.rcpt_refusal_counted {
                    self.rcpt_refusal_counted = true;
                    self.abuse(AbuseKind::RcptRefused);
                }
                return self.count_error(conn).await;
            }
            Err(UpstreamError::Busy) => {
                SmtpStats::bump(&self.ctx.stats.upstream_busy);
                Reply::new(
                    451,
                    "4.3.2 Error: mail system behind the gatekeeper busy, try again later",
                )
            }
            Err(e) => {
                SmtpStats::bump(&self.ctx.stats.upstream_failures);
                debug!(error = %e, "upstream failed at RCPT");
                self.upstream = None;
                Reply::new(
                    451,
                    "4.3.0 Error: mail system behind the gatekeeper unavailable, try again later",
                )
            }
        };
        if reply.is_success() {
            if let Some(tx) = &mut self.tx {
                tx.accepted.push(rcpt_line);
            }
            SmtpStats::bump(&self.ctx.stats.recipients_accepted);
            self.tally.recipients += 1;
        }
        self.send_reply(conn, &reply).await?;
        Ok(Flow::Continue)
    }

    /// Forwards a RCPT on the open upstream session; if there is none, or it
    /// just failed, opens a fresh one and replays the transaction first.
    async fn forward_rcpt(&mut self, rcpt_line: &str) -> Result<Reply, UpstreamError> {
        if let Some(upstream) = self.upstream.as_mut() {
            match upstream.command(rcpt_line).await {
                Ok(reply) => return Ok(reply),
                Err(e) => {
                    SmtpStats::bump(&self.ctx.stats.upstream_failures);
                    debug!(error = %e, "upstream failed at RCPT; reopening");
                    self.upstream = None;
                }
            }
        }
        let mut replies = self.open_transaction(Some(rcpt_line)).await?;
        Ok(replies.pop().expect("one reply per RCPT sent"))
    }

    /// Opens an upstream session (waiting at most `upstream_wait` for a free
    /// one) and starts the transaction on it: MAIL, every recipient already
    /// acknowledged, then `extra`. Returns the replies to `extra`. If an
    /// acknowledged recipient does not get 250 again, the transaction is lost.
    async fn open_transaction(&mut self, extra: Option<&str>) -> Result<Vec<Reply>, UpstreamError> {
        let Some(tx) = self.tx.as_ref() else {
            return Err(UpstreamError::Closed);
        };
        let replayed = tx.accepted.len();
        let mut lines = tx.accepted.clone();
        lines.extend(extra.map(str::to_owned));
        let mail_line = tx.mail_line.clone();
        // An authenticated session has one upstream session; a new one would
        // not be authenticated, so losing it loses the transaction.
        let started = match self.pinned.take() {
            Some(pinned) => Ok(pinned),
            None if self.authenticated.is_some() => Err(UpstreamError::Closed),
            None => self.upstream_for_transaction().await,
        };
        let result = match started {
            Ok(mut upstream) => match upstream.start_transaction(&mail_line, &lines).await {
                Ok(replies) => {
                    self.upstream = Some(upstream);
                    Ok(replies)
                }
                // A refused MAIL leaves an authenticated session usable.
                Err(UpstreamError::Refused(reply)) if self.authenticated.is_some() => {
                    self.pinned = Some(upstream);
                    Err(UpstreamError::Refused(reply))
                }
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        if replayed == 0 {
            return result;
        }
        let kept = result
            .as_ref()
            .is_ok_and(|replies| replies[..replayed].iter().all(Reply::is_success));
        if kept {
            SmtpStats::bump(&self.ctx.stats.transactions_replayed);
        } else {
            debug!(client = %self.client_ip(), "acknowledged recipients could not be replayed");
            self.upstream = None;
            if let Some(tx) = &mut self.tx {
                tx.lost = true;
            }
        }
        let mut replies = result?;
        Ok(replies.split_off(replayed))
    }

    /// The greylist's answer for this recipient: seconds until a retry
    /// passes, or `None` to go on. Clients that may relay and DNSBL-trusted
    /// ones are never greylisted (the daemon spares allowlisted ones).
    fn greylisted(&self, to: &Path) -> Option<u64> {
        let memory = self.ctx.memory.as_ref()?;
        if self.trusted || self.may_relay() {
            return None;
        }
        let sender = self.tx.as_ref().map_or("", |tx| tx.sender.as_str());
        let (verdict, checked) = memory.greylist(self.client_ip(), sender, &to.to_wire())?;
        let stats = &self.ctx.stats;
        match checked {
            Checked::Known => SmtpStats::bump(&stats.greylist_known),
            Checked::Retried => SmtpStats::bump(&stats.greylist_passed),
            Checked::New | Checked::Early => SmtpStats::bump(&stats.greylist_deferred),
        }
        match verdict {
            GreyVerdict::Pass => None,
            GreyVerdict::Defer { retry_after } => {
                info!(client = %self.client_ip(), sender = ?sender, rcpt = ?to.raw, retry_after, "greylisted");
                Some(retry_after)
            }
        }
    }

    /// A pooled session re-targeted at this client if one answers, else a fresh one.
    async fn upstream_for_transaction(&self) -> Result<Upstream, UpstreamError> {
        let config = &self.ctx.config;
        if let Some(pool) = &self.ctx.upstream_pool {
            // A few tries within one set-up deadline: older sessions may have
            // been closed by the MTA meanwhile.
            let deadline = Instant::now() + config.upstream_connect_timeout;
            for _ in 0..3 {
                let left = deadline.saturating_duration_since(Instant::now());
                let Some(mut upstream) = pool.take().filter(|_| !left.is_zero()) else {
                    break;
                };
                let retargeted = upstream
                    .retarget(&config.hostname, &self.client_info(), left)
                    .await;
                match retargeted {
                    Ok(()) => {
                        SmtpStats::bump(&self.ctx.stats.upstream_reused);
                        self.ctx.learn_extensions(upstream.extensions());
                        return Ok(upstream);
                    }
                    // 421: the MTA was closing the idle session anyway.
                    Err(UpstreamError::Refused(reply)) if reply.code != 421 => {
                        pool.refused(&reply);
                        break;
                    }
                    Err(e) => {
                        debug!(error = %e, "pooled upstream session unusable; trying another")
                    }
                }
            }
        }
        self.connect_upstream().await
    }

    fn client_info(&self) -> ClientInfo {
        ClientInfo {
            addr: self.peer,
            helo: self.helo.clone(),
            esmtp: self.esmtp,
        }
    }

    async fn connect_upstream(&self) -> Result<Upstream, UpstreamError> {
        let config = &self.ctx.config;
        // Idle pooled sessions never make a fresh one wait: one gives its slot up.
        if self.ctx.upstream_slots.available_permits() == 0 {
            if let Some(pool) = &self.ctx.upstream_pool {
                drop(pool.take());
            }
        }
        let slot = timeout(
            config.upstream_wait,
            self.ctx.upstream_slots.clone().acquire_owned(),
        )
        .await
        .map_err(|_| UpstreamError::Busy)?
        .map_err(|_| UpstreamError::Busy)?;
        let client = self.client_info();
        let timeouts = Timeouts {
            connect: config.upstream_connect_timeout,
            reply: config.upstream_timeout,
        };
        let upstream =
            Upstream::connect(config.upstream, &config.hostname, &client, timeouts, slot).await?;
        // An empty list may be this client's view only (Postfix's
        // smtpd_sasl_exceptions_networks): it never hides AUTH from the rest.
        if config.auth == AuthMode::Upstream && !upstream.auth_mechanisms().is_empty() {
            self.ctx.learn_auth(upstream.auth_mechanisms().to_vec());
        }
        self.ctx.learn_extensions(upstream.extensions());
        Ok(upstream)
    }

    /// The answer to a transaction that lost acknowledged recipients: it ends here.
    async fn send_lost(&mut self, conn: &mut Conn) -> std::io::Result<Flow> {
        SmtpStats::bump(&self.ctx.stats.transactions_lost);
        self.end_transaction().await;
        self.send(conn, LOST).await?;
        Ok(Flow::Continue)
    }

    async fn data(&mut self, conn: &mut Conn) -> std::io::Result<Flow> {
        let Some(tx) = &self.tx else {
            return self
                .protocol_error(conn, "503 5.5.1 Error: need MAIL command")
                .await;
        };
        if tx.chunks.is_some() {
            return self
                .protocol_error(conn, "503 5.5.1 Error: DATA after BDAT in one transaction")
                .await;
        }
        if tx.lost {
            return self.send_lost(conn).await;
        }
        if tx.accepted.is_empty() {
            return self
                .error(conn, "554 5.5.1 Error: no valid recipients")
                .await;
        }
        if !self.upstream_for_message().await {
            return self.send_lost(conn).await;
        }
        let Some(upstream) = self.upstream.as_mut() else {
            return self.send_lost(conn).await;
        };
        match upstream.command("DATA").await {
            Ok(reply) if reply.code == 354 => {}
            Ok(reply) => {
                SmtpStats::bump(&self.ctx.stats.messages_rejected);
                self.end_transaction().await;
                self.send_reply(conn, &reply).await?;
                return Ok(Flow::Continue);
            }
            Err(e) => {
                SmtpStats::bump(&self.ctx.stats.upstream_failures);
                SmtpStats::bump(&self.ctx.stats.messages_failed);
                debug!(error = %e, "upstream failed at DATA");
                self.abandon_transaction();
                self.send(
                    conn,
                    "451 4.3.0 Error: mail system behind the gatekeeper failed, try again later",
                )
                .await?;
                return Ok(Flow::Continue);
            }
        }
        self.send(conn, "354 End data with <CR><LF>.<CR><LF>")
            .await?;
        self.receive_data(conn).await
    }

    /// The upstream session the message goes to: if the MTA failed after the
    /// last RCPT, a fresh one with the transaction replayed. False when the
    /// acknowledged recipients are lost.
    async fn upstream_for_message(&mut self) -> bool {
        if self.upstream.is_none() {
            let reopened = self.open_transaction(None).await;
            if self.tx.as_ref().is_some_and(|tx| tx.lost) || reopened.is_err() {
                return false;
            }
        }
        self.upstream.is_some()
    }

    /// Streams the message to the upstream line by line. Nothing is
    /// acknowledged before the upstream accepted it; a message that goes
    /// wrong is abandoned by dropping the upstream connection mid-DATA, so
    /// the MTA discards it. Shutdown waits for it (up to the drain deadline).
    async fn receive_data(&mut self, conn: &mut Conn) -> std::io::Result<Flow> {
        let max = self.ctx.config.max_message_size;
        let mut size: u64 = 0;
        let mut problem: Option<DataProblem> = None;
        loop {
            let by_chunk = Instant::now() + self.ctx.config.data_timeout;
            let deadline = by_chunk.min(self.deadline);
            let line = match timeout_at(deadline, read_line(conn, MAX_TEXT_LINE)).await {
                Ok(line) => line?,
                Err(_) => return self.data_stalled(conn, deadline < by_chunk).await,
            };
            let bytes = match line {
                Line::Eof => {
                    self.abandon_transaction();
                    return Ok(Flow::Close);
                }
                Line::TooLong => {
                    problem.get_or_insert(DataProblem::LineTooLong);
                    continue;
                }
                Line::Complete(bytes) => bytes,
            };
            if bytes == b".\r\n" {
                break;
            }
            if has_bare_cr_or_lf(&bytes) {
                // The client and the MTA could disagree on where this message
                // ends (SMTP smuggling): nothing more is forwarded, the session ends.
                SmtpStats::bump(&self.ctx.stats.smuggling_refused);
                self.outcome = Outcome::Smuggling;
                self.abuse(AbuseKind::Smuggling);
                self.abandon_transaction();
                self.send(
                    conn,
                    "554 5.5.2 Error: bare <CR> or <LF> in message data refused",
                )
                .await?;
                return Ok(Flow::Close);
            }
            size += bytes.len() as u64;
            if size > max {
                problem.get_or_insert(DataProblem::TooBig);
            }
            if problem.is_none() {
                if let Some(upstream) = self.upstream.as_mut() {
                    if let Err(e) = upstream.send_data(&bytes).await {
                        problem = Some(DataProblem::Upstream(e));
                    }
                }
            }
        }
        let reply = match problem {
            None => {
                let finished = match self.upstream.as_mut() {
                    Some(upstream) => upstream.finish_data().await,
                    None => Err(UpstreamError::Closed),
                };
                match finished {
                    Ok(reply) => {
                        if reply.is_success() {
                            SmtpStats::bump(&self.ctx.stats.messages_delivered);
                            self.tally.delivered += 1;
                        } else {
                            SmtpStats::bump(&self.ctx.stats.messages_rejected);
                        }
                        reply
                    }
                    Err(e) => {
                        self.abandon_transaction();
                        self.upstream_failed(e)
                    }
                }
            }
            Some(DataProblem::Upstream(e)) => {
                self.abandon_transaction();
                self.upstream_failed(e)
            }
            Some(DataProblem::TooBig) => {
                SmtpStats::bump(&self.ctx.stats.oversize_refused);
                self.abandon_transaction();
                Reply::parse_line("552 5.3.4 Error: message size exceeds fixed limit")
            }
            Some(DataProblem::LineTooLong) => {
                SmtpStats::bump(&self.ctx.stats.long_line_refused);
                self.abandon_transaction();
                Reply::parse_line("554 5.6.0 Error: message line longer than 1000 octets")
            }
        };
        if reply.is_error() && reply.code >= 500 {
            self.errors += 1;
        }
        self.send_reply(conn, &reply).await?;
        self.end_transaction().await;
        Ok(Flow::Continue)
    }

    /// RFC 3030 BDAT. Every chunk is read to its last octet, even when it is
    /// refused, so no byte of it is ever taken for a command; what reaches
    /// the MTA goes as BDAT chunks of the same sizes, and the client's reply
    /// to a chunk comes only after the MTA's.
    async fn bdat(&mut self, conn: &mut Conn, size: u64, last: bool) -> std::io::Result<Flow> {
        if !self.chunking_offered() {
            // Its chunk would follow as if it were commands: no way to go on.
            self.abuse(AbuseKind::ProtocolError);
            self.abandon_transaction();
            self.send(conn, "503 5.5.1 Error: BDAT without CHUNKING offered")
                .await?;
            return Ok(Flow::Close);
        }
        if size > self.ctx.config.max_message_size {
            // Never acceptable, and not worth reading: the session ends.
            SmtpStats::bump(&self.ctx.stats.oversize_refused);
            self.abandon_transaction();
            self.send(
                conn,
                "552 5.3.4 Error: chunk exceeds the message size limit",
            )
            .await?;
            return Ok(Flow::Close);
        }
        let mut refusal = self.chunk_refusal(size);
        if refusal.is_none() && self.tx.as_ref().is_some_and(|tx| tx.chunks.is_none()) {
            // The first chunk: the upstream session as DATA would have it.
            if !self.upstream_for_message().await {
                refusal = Some(ChunkRefusal::Lost);
            } else if !self
                .upstream
                .as_ref()
                .is_some_and(|u| u.extensions().chunking)
            {
                refusal = Some(ChunkRefusal::NotUpstream);
            }
        }
        if refusal.is_none() && self.upstream.is_none() {
            // Lost between chunks: the message failed already.
            refusal = Some(ChunkRefusal::Failed(451));
        }
        if let Some(refusal) = refusal {
            return self.refuse_chunk(conn, size, last, refusal).await;
        }
        self.receive_chunk(conn, size, last).await
    }

    fn chunk_refusal(&self, size: u64) -> Option<ChunkRefusal> {
        let Some(tx) = &self.tx else {
            return Some(ChunkRefusal::NoMail);
        };
        let chunks = tx.chunks.as_ref();
        if let Some(code) = chunks.and_then(|c| c.failed) {
            Some(ChunkRefusal::Failed(code))
        } else if tx.lost {
            Some(ChunkRefusal::Lost)
        } else if tx.accepted.is_empty() {
            Some(ChunkRefusal::NoRecipients)
        } else if chunks.map_or(0, |c| c.size).saturating_add(size)
            > self.ctx.config.max_message_size
        {
            Some(ChunkRefusal::TooBig)
        } else {
            None
        }
    }

    /// Reads and discards a refused chunk, then answers it.
    async fn refuse_chunk(
        &mut self,
        conn: &mut Conn,
        size: u64,
        last: bool,
        refusal: ChunkRefusal,
    ) -> std::io::Result<Flow> {
        let mut remaining = size;
        while remaining > 0 {
            let taken = match self.fill_chunk(conn, remaining).await? {
                Filled::Bytes(piece) => piece.len(),
                Filled::Eof => {
                    self.abandon_transaction();
                    return Ok(Flow::Close);
                }
                Filled::Timeout { session_time } => {
                    return self.data_stalled(conn, session_time).await
                }
            };
            conn.consume(taken);
            remaining -= taken as u64;
        }
        let reply = match refusal {
            // Not counted as abuse: a client pipelining chunks after a
            // refused MAIL is following RFC 3030.
            ChunkRefusal::NoMail => {
                return self.error(conn, "503 5.5.1 Error: need MAIL command").await
            }
            ChunkRefusal::Failed(code) => {
                // Already answered (and counted) once: later chunks of the
                // same message hear the same class of reply, uncounted.
                let reply = match code {
                    400..=499 => "451 4.3.0 Error: this message already failed; send RSET",
                    _ => "554 5.5.0 Error: this message already failed; send RSET",
                };
                if last {
                    self.tx = None;
                }
                self.send(conn, reply).await?;
                return Ok(Flow::Continue);
            }
            ChunkRefusal::Lost => {
                SmtpStats::bump(&self.ctx.stats.transactions_lost);
                Reply::parse_line(LOST)
            }
            ChunkRefusal::NoRecipients => Reply::parse_line("554 5.5.1 Error: no valid recipients"),
            ChunkRefusal::TooBig => {
                SmtpStats::bump(&self.ctx.stats.oversize_refused);
                Reply::parse_line("552 5.3.4 Error: message size exceeds fixed limit")
            }
            ChunkRefusal::NotUpstream => {
                SmtpStats::bump(&self.ctx.stats.upstream_failures);
                Reply::parse_line("451 4.3.0 Error: mail system behind the gatekeeper takes no BDAT now, try again later")
            }
        };
        self.chunk_failed(conn, last, reply).await
    }

    /// Streams one accepted chunk to the MTA as a chunk of the same size.
    /// Its last octet is held back until the whole chunk (and, for LAST,
    /// the whole message) passed the body rules: an MTA that has every
    /// octet of a LAST chunk may already have queued the message.
    async fn receive_chunk(
        &mut self,
        conn: &mut Conn,
        size: u64,
        last: bool,
    ) -> std::io::Result<Flow> {
        // Out of `self` while the chunk streams; an early return drops both,
        // and with them the message.
        let (Some(mut upstream), Some(mut chunks)) = (
            self.upstream.take(),
            self.tx
                .as_mut()
                .map(|tx| tx.chunks.take().unwrap_or_default()),
        ) else {
            return self
                .refuse_chunk(conn, size, last, ChunkRefusal::Failed(451))
                .await;
        };
        let mut problem = upstream
            .start_chunk(size, last)
            .await
            .err()
            .map(ChunkProblem::Upstream);
        let mut remaining = size;
        let mut held: Option<u8> = None;
        while remaining > 0 {
            let piece = match self.fill_chunk(conn, remaining).await? {
                Filled::Bytes(piece) => piece,
                Filled::Eof => {
                    self.abandon_transaction();
                    return Ok(Flow::Close);
                }
                Filled::Timeout { session_time } => {
                    return self.data_stalled(conn, session_time).await
                }
            };
            let taken = piece.len();
            if problem.is_none() {
                if let Err(e) = chunks.scanner.scan(piece) {
                    problem = Some(ChunkProblem::Body(e));
                }
            }
            if problem.is_none() {
                let (send, keep) = match taken as u64 == remaining {
                    true => piece.split_at(taken - 1),
                    false => (piece, &[][..]),
                };
                held = keep.first().copied();
                if let Err(e) = upstream.send_data(send).await {
                    problem = Some(ChunkProblem::Upstream(e));
                }
            }
            conn.consume(taken);
            remaining -= taken as u64;
        }
        if problem.is_none() && last {
            problem = chunks.scanner.finish().err().map(ChunkProblem::Body);
        }
        let answer = match problem {
            Some(problem) => Err(problem),
            None => {
                let sent = match held {
                    Some(byte) => upstream.send_data(&[byte]).await,
                    None => Ok(()),
                };
                match sent {
                    Ok(()) => upstream
                        .finish_chunk(last)
                        .await
                        .map_err(ChunkProblem::Upstream),
                    Err(e) => Err(ChunkProblem::Upstream(e)),
                }
            }
        };
        chunks.size += size;
        self.upstream = Some(upstream);
        if let Some(tx) = self.tx.as_mut() {
            tx.chunks = Some(chunks);
        }
        let reply = match answer {
            Ok(reply) if last => {
                if reply.is_success() {
                    SmtpStats::bump(&self.ctx.stats.messages_delivered);
                    self.tally.delivered += 1;
                } else {
                    SmtpStats::bump(&self.ctx.stats.messages_rejected);
                }
                self.end_transaction().await;
                self.send_reply(conn, &reply).await?;
                if reply.code >= 500 {
                    return self.count_error(conn).await;
                }
                return Ok(Flow::Continue);
            }
            Ok(reply) if reply.is_success() => {
                let ack = Reply::new(250, format!("2.0.0 Ok: {size} octets received"));
                self.send_reply(conn, &ack).await?;
                return Ok(Flow::Continue);
            }
            Ok(reply) => reply,
            Err(ChunkProblem::Upstream(e)) => self.upstream_failed(e),
            Err(ChunkProblem::Body(BodyProblem::BareLineEnd)) => {
                SmtpStats::bump(&self.ctx.stats.smuggling_refused);
                if !self.chunk_smuggling_counted {
                    self.chunk_smuggling_counted = true;
                    self.abuse(AbuseKind::Smuggling);
                }
                Reply::parse_line("554 5.5.2 Error: bare <CR> or <LF> in message data refused")
            }
            Err(ChunkProblem::Body(BodyProblem::LineTooLong)) => {
                SmtpStats::bump(&self.ctx.stats.long_line_refused);
                Reply::parse_line("554 5.6.0 Error: message line longer than 1000 octets")
            }
        };
        self.chunk_failed(conn, last, reply).await
    }

    /// Waits for more of a chunk, at most `remaining` octets of it: at most
    /// `data_timeout`, within the session's life.
    async fn fill_chunk<'c>(
        &self,
        conn: &'c mut Conn,
        remaining: u64,
    ) -> std::io::Result<Filled<'c>> {
        let by_chunk = Instant::now() + self.ctx.config.data_timeout;
        let deadline = by_chunk.min(self.deadline);
        match timeout_at(deadline, conn.fill_buf()).await {
            Ok(Ok([])) => Ok(Filled::Eof),
            Ok(Ok(bytes)) => {
                let taken = bytes
                    .len()
                    .min(usize::try_from(remaining).unwrap_or(usize::MAX));
                Ok(Filled::Bytes(&bytes[..taken]))
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Ok(Filled::Timeout {
                session_time: deadline < by_chunk,
            }),
        }
    }

    /// A refused chunk fails its message: the MTA's session is dropped (so
    /// it discards what it has, even mid-chunk) and, unless it was the last
    /// chunk, later chunks are read and refused until RSET. An
    /// authenticated client loses the one upstream session its relay right
    /// rides on, so its session ends rather than refusing what it pipelined next.
    async fn chunk_failed(
        &mut self,
        conn: &mut Conn,
        last: bool,
        reply: Reply,
    ) -> std::io::Result<Flow> {
        self.upstream = None;
        match (last, self.tx.as_mut()) {
            (false, Some(tx)) => tx.chunks.get_or_insert_default().failed = Some(reply.code),
            _ => self.tx = None,
        }
        self.send_reply(conn, &reply).await?;
        if self.authenticated.is_some() {
            let host = &self.ctx.config.hostname;
            self.send(
                conn,
                &format!(
                    "421 4.7.0 {host} Error: authenticated session ends with the failed message"
                ),
            )
            .await?;
            return Ok(Flow::Close);
        }
        if reply.code >= 500 {
            return self.count_error(conn).await;
        }
        Ok(Flow::Continue)
    }

    /// The client's reply to an upstream failure while a message streamed.
    fn upstream_failed(&self, error: UpstreamError) -> Reply {
        SmtpStats::bump(&self.ctx.stats.upstream_failures);
        debug!(error = %error, "upstream failed during the message");
        match error {
            UpstreamError::Refused(reply) => {
                SmtpStats::bump(&self.ctx.stats.messages_rejected);
                reply
            }
            _ => {
                SmtpStats::bump(&self.ctx.stats.messages_failed);
                Reply::new(451, "4.3.0 Error: mail system behind the gatekeeper failed; message not accepted, try again later")
            }
        }
    }

    /// A client that stopped sending its message: dropped, so the MTA discards it.
    async fn data_stalled(&mut self, conn: &mut Conn, session_time: bool) -> std::io::Result<Flow> {
        self.abandon_transaction();
        if session_time {
            self.session_too_long(conn).await?;
            return Ok(Flow::Close);
        }
        SmtpStats::bump(&self.ctx.stats.timeouts);
        let host = &self.ctx.config.hostname;
        self.send(conn, &format!("421 4.4.2 {host} Error: timeout exceeded"))
            .await?;
        Ok(Flow::Close)
    }

    /// Drops the upstream connection without ending the message: the MTA discards it.
    fn abandon_transaction(&mut self) {
        self.upstream = None;
        self.tx = None;
    }

    /// Ends the transaction and its upstream session (QUIT discards an
    /// unfinished transaction), freeing the upstream slot.
    async fn end_transaction(&mut self) {
        self.tx = None;
        let Some(mut upstream) = self.upstream.take() else {
            return;
        };
        if self.authenticated.is_none() {
            // Pooled only while a slot is free: a client may be waiting for one.
            let pool = self.ctx.upstream_pool.as_ref();
            let unparked = match pool.filter(|_| self.ctx.upstream_slots.available_permits() > 0) {
                Some(pool) => pool.park(upstream),
                None => Some(upstream),
            };
            if let Some(upstream) = unparked {
                upstream.quit().await;
            }
            return;
        }
        // Authenticated: the session is kept for the next transaction.
        match upstream.command("RSET").await {
            Ok(reply) if reply.is_success() => self.pinned = Some(upstream),
            _ => debug!(client = %self.client_ip(), "authenticated upstream session lost at RSET"),
        }
    }

    async fn starttls(&mut self, conn: &mut Conn) -> std::io::Result<Flow> {
        let Some(acceptor) = self.ctx.tls.clone() else {
            return self
                .error(conn, "502 5.5.1 Error: command not implemented")
                .await;
        };
        if self.tls_active {
            return self
                .error(conn, "503 5.5.1 Error: TLS already active")
                .await;
        }
        // Plaintext pipelined after STARTTLS must not survive into the TLS session (CVE-2011-0411).
        let buffered = conn.buffer().len();
        conn.consume(buffered);
        self.send(conn, "220 2.0.0 Ready to start TLS").await?;
        let plain = std::mem::replace(conn, BufReader::new(Box::new(Detached))).into_inner();
        let tls = match timeout(Duration::from_secs(30), acceptor.accept(plain)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                debug!(client = %self.client_ip(), error = %e, "TLS handshake failed");
                self.outcome = Outcome::TlsFailed;
                return Ok(Flow::Close);
            }
            Err(_) => {
                self.outcome = Outcome::TlsFailed;
                return Ok(Flow::Close);
            }
        };
        *conn = super::io::client_conn(Box::new(tls));
        // RFC 3207 §4.2: forget everything learned before the handshake.
        self.tls_active = true;
        self.helo = None;
        self.esmtp = false;
        self.end_transaction().await;
        self.authenticated = None;
        if let Some(pinned) = self.pinned.take() {
            pinned.quit().await;
        }
        Ok(Flow::Continue)
    }

    /// Sends an error reply and enforces the hard error limit.
    async fn error(&mut self, conn: &mut Conn, reply: &str) -> std::io::Result<Flow> {
        self.send(conn, reply).await?;
        self.count_error(conn).await
    }

    /// Counts an error reply already sent; at `max_errors` the session ends.
    async fn count_error(&mut self, conn: &mut Conn) -> std::io::Result<Flow> {
        self.errors += 1;
        if self.errors >= self.ctx.config.max_errors {
            SmtpStats::bump(&self.ctx.stats.error_limit_disconnects);
            self.outcome = Outcome::ErrorLimit;
            let host = &self.ctx.config.hostname;
            self.send(conn, &format!("421 4.7.0 {host} Error: too many errors"))
                .await?;
            return Ok(Flow::Close);
        }
        Ok(Flow::Continue)
    }

    async fn send(&self, conn: &mut Conn, line: &str) -> std::io::Result<()> {
        let mut wire = Vec::with_capacity(line.len() + 2);
        wire.extend_from_slice(line.as_bytes());
        wire.extend_from_slice(b"\r\n");
        write_reply(conn, &wire, self.ctx.config.write_timeout).await
    }

    async fn send_reply(&self, conn: &mut Conn, reply: &Reply) -> std::io::Result<()> {
        write_reply(conn, &reply.to_wire(), self.ctx.config.write_timeout).await
    }
}

/// A data line must end in CRLF and contain no other CR or LF.
fn has_bare_cr_or_lf(line: &[u8]) -> bool {
    match line.strip_suffix(b"\r\n") {
        Some(body) => body.iter().any(|&b| b == b'\r' || b == b'\n'),
        None => true,
    }
}

/// Writes to the client, or `TimedOut` if it does not take the bytes within
/// `limit` (a client that stops reading must not hold its slot).
pub async fn write_reply(conn: &mut Conn, wire: &[u8], limit: Duration) -> std::io::Result<()> {
    let stream = conn.get_mut();
    timeout(limit, async {
        stream.write_all(wire).await?;
        stream.flush().await
    })
    .await
    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

#[cfg(test)]
mod tests {
    use super::has_bare_cr_or_lf;

    #[test]
    fn first_bytes_that_are_not_smtp() {
        use super::{classify_first_byte, NotSmtp};
        assert_eq!(classify_first_byte(0x16), Some(NotSmtp::TlsHandshake));
        assert_eq!(classify_first_byte(0x80), Some(NotSmtp::TlsHandshake));
        assert_eq!(classify_first_byte(0xff), Some(NotSmtp::Binary));
        assert_eq!(classify_first_byte(0x00), Some(NotSmtp::Binary));
        for ok in *b"EeHhQq\r\n " {
            assert_eq!(classify_first_byte(ok), None, "{ok:#x}");
        }
    }

    #[test]
    fn bare_line_ends_are_detected() {
        assert!(!has_bare_cr_or_lf(b"normal line\r\n"));
        assert!(!has_bare_cr_or_lf(b"..dot-stuffed\r\n"));
        assert!(has_bare_cr_or_lf(b"bare lf\n"));
        assert!(has_bare_cr_or_lf(b".\n"));
        assert!(has_bare_cr_or_lf(b"a\rb\r\n"));
        assert!(has_bare_cr_or_lf(b"\r\r\n"));
    }
}
