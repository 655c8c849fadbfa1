//! The state machine over one client connection.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::time::timeout;
use tracing::debug;

use super::io::{read_line, trim_eol, Conn, Detached, Line};
use super::parse::{parse_command, Command, MailParams, Path, ReversePath};
use super::policy::Decision;
use super::reply::Reply;
use super::stats::SmtpStats;
use super::upstream::{ClientInfo, Upstream, UpstreamError};
use super::SmtpContext;

/// RFC 5321 §4.5.3.1.4: a command line is at most 512 octets with its CRLF.
const MAX_COMMAND_LINE: usize = 512;
/// RFC 5321 §4.5.3.1.6: a text line is at most 1000 octets with its CRLF.
const MAX_TEXT_LINE: usize = 1000;

enum Flow {
    Continue,
    Close,
}

struct Transaction {
    /// The MAIL command as it will be forwarded.
    mail_line: String,
    recipients: usize,
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
}

/// Why a message could not be accepted, decided while its data streamed past.
enum DataProblem {
    TooBig,
    LineTooLong,
    Upstream(UpstreamError),
}

impl Session {
    pub fn new(ctx: Arc<SmtpContext>, peer: SocketAddr, trusted: bool) -> Session {
        Session {
            trusted,
            ctx,
            peer,
            helo: None,
            esmtp: false,
            tls_active: false,
            tx: None,
            upstream: None,
            errors: 0,
        }
    }

    fn client_ip(&self) -> IpAddr {
        super::policy::canonical(self.peer.ip())
    }

    pub async fn run(&mut self, conn: &mut Conn) -> std::io::Result<()> {
        if !self.greet(conn).await? {
            return Ok(());
        }
        loop {
            let config = &self.ctx.config;
            let limit = if self.tx.is_some() {
                config.command_timeout
            } else {
                config.pre_mail_timeout
            };
            let line = match timeout(limit, read_line(conn, MAX_COMMAND_LINE)).await {
                Ok(line) => line?,
                Err(_) => {
                    SmtpStats::bump(&self.ctx.stats.timeouts);
                    let host = &self.ctx.config.hostname;
                    send(conn, &format!("421 4.4.2 {host} Error: timeout exceeded")).await?;
                    break;
                }
            };
            let flow = match line {
                Line::Eof => break,
                Line::TooLong => self.error(conn, "500 5.5.2 Error: line too long").await?,
                Line::Complete(bytes) => self.dispatch(conn, trim_eol(&bytes)).await?,
            };
            if let Flow::Close = flow {
                break;
            }
        }
        if let Some(upstream) = self.upstream.take() {
            upstream.quit().await;
        }
        Ok(())
    }

    /// Sends the banner; with `greet_wait`, first a `220-` teaser and a pause
    /// in which a well-behaved client stays silent. Returns false to close.
    async fn greet(&mut self, conn: &mut Conn) -> std::io::Result<bool> {
        let host = self.ctx.config.hostname.clone();
        let wait = self.ctx.config.greet_wait;
        if !wait.is_zero() && !self.trusted {
            send(conn, &format!("220-{host} ESMTP")).await?;
            if let Ok(read) = timeout(wait, conn.fill_buf()).await {
                if read?.is_empty() {
                    return Ok(false);
                }
                SmtpStats::bump(&self.ctx.stats.pregreet);
                debug!(client = %self.peer, "client talked before the greeting");
                if let Some(hook) = &self.ctx.on_pregreet {
                    hook(self.client_ip());
                }
                send(
                    conn,
                    &format!(
                        "554 5.7.1 {host} Error: protocol violation: talked before the greeting"
                    ),
                )
                .await?;
                return Ok(false);
            }
        }
        send(conn, &format!("220 {host} ESMTP Gatekeeper")).await?;
        Ok(true)
    }

    async fn dispatch(&mut self, conn: &mut Conn, line: &[u8]) -> std::io::Result<Flow> {
        let command = match parse_command(line) {
            Ok(command) => command,
            Err(e) => return self.error(conn, &e.reply()).await,
        };
        let host = self.ctx.config.hostname.clone();
        match command {
            Command::Ehlo(name) => {
                self.reset_transaction().await;
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
                send_reply(conn, &Reply { code: 250, lines }).await?;
            }
            Command::Helo(name) => {
                self.reset_transaction().await;
                self.helo = Some(name);
                self.esmtp = false;
                send(conn, &format!("250 {host}")).await?;
            }
            Command::Mail { from, params } => return self.mail(conn, from, params).await,
            Command::Rcpt { to } => return self.rcpt(conn, to).await,
            Command::Data => return self.data(conn).await,
            Command::Rset => {
                self.reset_transaction().await;
                send(conn, "250 2.0.0 Ok").await?;
            }
            Command::Noop => send(conn, "250 2.0.0 Ok").await?,
            Command::Help => {
                send(
                    conn,
                    "214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY",
                )
                .await?
            }
            Command::Vrfy => {
                send(
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
                send(conn, "221 2.0.0 Bye").await?;
                return Ok(Flow::Close);
            }
            Command::StartTls => return self.starttls(conn).await,
        }
        Ok(Flow::Continue)
    }

    async fn mail(
        &mut self,
        conn: &mut Conn,
        from: ReversePath,
        params: MailParams,
    ) -> std::io::Result<Flow> {
        if self.helo.is_none() {
            return self
                .error(conn, "503 5.5.1 Error: send HELO/EHLO first")
                .await;
        }
        if self.tx.is_some() {
            return self
                .error(conn, "503 5.5.1 Error: nested MAIL command")
                .await;
        }
        let max = self.ctx.config.max_message_size;
        if params.size.is_some_and(|size| size > max) {
            return self
                .error(conn, "552 5.3.4 Error: message size exceeds fixed limit")
                .await;
        }
        let mail_line = format!("MAIL FROM:<{}>{}", from.to_wire(), params.to_wire());
        self.tx = Some(Transaction {
            mail_line,
            recipients: 0,
        });
        send(conn, "250 2.1.0 Ok").await?;
        Ok(Flow::Continue)
    }

    async fn rcpt(&mut self, conn: &mut Conn, to: Path) -> std::io::Result<Flow> {
        let Some(tx) = &self.tx else {
            return self.error(conn, "503 5.5.1 Error: need MAIL command").await;
        };
        if tx.recipients >= self.ctx.config.max_recipients {
            send(conn, "452 4.5.3 Error: too many recipients").await?;
            return Ok(Flow::Continue);
        }
        if let Decision::Refuse(reason) = self.ctx.policy.decide(&to, self.client_ip()) {
            self.ctx.stats.relay_denied(reason);
            debug!(client = %self.peer, rcpt = %to.raw, reason = reason.name(), "relay refused");
            return self
                .error(
                    conn,
                    &format!("554 5.7.1 <{}>: Relay access denied", to.raw),
                )
                .await;
        }
        let reply = match self.forward_rcpt(&to).await {
            Ok(reply) => reply,
            Err(UpstreamError::Refused(reply)) => reply,
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
        if reply.is_positive() {
            if let Some(tx) = &mut self.tx {
                tx.recipients += 1;
            }
            SmtpStats::bump(&self.ctx.stats.recipients_accepted);
        }
        send_reply(conn, &reply).await?;
        Ok(Flow::Continue)
    }

    /// Opens the upstream session and its MAIL on first use, then forwards the RCPT.
    async fn forward_rcpt(&mut self, to: &Path) -> Result<Reply, UpstreamError> {
        if self.upstream.is_none() {
            let client = ClientInfo {
                addr: self.peer,
                helo: self.helo.clone(),
                esmtp: self.esmtp,
            };
            let config = &self.ctx.config;
            let upstream = Upstream::connect(
                config.upstream,
                &config.hostname,
                &client,
                config.upstream_timeout,
            )
            .await?;
            self.upstream = Some(upstream);
        }
        let mail_line = self
            .tx
            .as_ref()
            .map(|tx| tx.mail_line.clone())
            .unwrap_or_default();
        let rcpt_line = format!("RCPT TO:<{}>", to.to_wire());
        let upstream = self.upstream.as_mut().expect("connected above");
        if upstream.in_transaction {
            upstream.command(&rcpt_line).await
        } else {
            upstream.mail_and_rcpt(&mail_line, &rcpt_line).await
        }
    }

    async fn data(&mut self, conn: &mut Conn) -> std::io::Result<Flow> {
        let Some(tx) = &self.tx else {
            return self.error(conn, "503 5.5.1 Error: need MAIL command").await;
        };
        if tx.recipients == 0 {
            return self
                .error(conn, "554 5.5.1 Error: no valid recipients")
                .await;
        }
        let Some(upstream) = self.upstream.as_mut() else {
            return self.error(conn, "503 5.5.1 Error: need RCPT command").await;
        };
        match upstream.command("DATA").await {
            Ok(reply) if reply.code == 354 => {}
            Ok(reply) => {
                self.reset_transaction().await;
                send_reply(conn, &reply).await?;
                return Ok(Flow::Continue);
            }
            Err(e) => {
                SmtpStats::bump(&self.ctx.stats.upstream_failures);
                debug!(error = %e, "upstream failed at DATA");
                self.upstream = None;
                self.tx = None;
                send(
                    conn,
                    "451 4.3.0 Error: mail system behind the gatekeeper failed, try again later",
                )
                .await?;
                return Ok(Flow::Continue);
            }
        }
        send(conn, "354 End data with <CR><LF>.<CR><LF>").await?;
        self.receive_data(conn).await
    }

    /// Streams the message to the upstream line by line. Nothing is
    /// acknowledged before the upstream accepted it; a message that goes
    /// wrong is abandoned by dropping the upstream connection mid-DATA, so
    /// the MTA discards it.
    async fn receive_data(&mut self, conn: &mut Conn) -> std::io::Result<Flow> {
        let max = self.ctx.config.max_message_size;
        let mut size: u64 = 0;
        let mut problem: Option<DataProblem> = None;
        loop {
            let line =
                match timeout(self.ctx.config.data_timeout, read_line(conn, MAX_TEXT_LINE)).await {
                    Ok(line) => line?,
                    Err(_) => {
                        SmtpStats::bump(&self.ctx.stats.timeouts);
                        self.abandon_transaction();
                        let host = &self.ctx.config.hostname;
                        send(conn, &format!("421 4.4.2 {host} Error: timeout exceeded")).await?;
                        return Ok(Flow::Close);
                    }
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
                self.abandon_transaction();
                send(
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
                        if reply.is_positive() {
                            SmtpStats::bump(&self.ctx.stats.messages_delivered);
                        }
                        reply
                    }
                    Err(e) => self.upstream_failed(e),
                }
            }
            Some(DataProblem::Upstream(e)) => self.upstream_failed(e),
            Some(DataProblem::TooBig) => {
                SmtpStats::bump(&self.ctx.stats.oversize_refused);
                self.abandon_transaction();
                Reply::parse_line("552 5.3.4 Error: message size exceeds fixed limit")
            }
            Some(DataProblem::LineTooLong) => {
                self.abandon_transaction();
                Reply::parse_line("554 5.6.0 Error: message line longer than 1000 octets")
            }
        };
        self.tx = None;
        if reply.is_error() && reply.code >= 500 {
            self.errors += 1;
        }
        send_reply(conn, &reply).await?;
        Ok(Flow::Continue)
    }

    fn upstream_failed(&mut self, error: UpstreamError) -> Reply {
        SmtpStats::bump(&self.ctx.stats.upstream_failures);
        debug!(error = %error, "upstream failed during DATA");
        self.abandon_transaction();
        match error {
            UpstreamError::Refused(reply) => reply,
            _ => Reply::new(451, "4.3.0 Error: mail system behind the gatekeeper failed; message not accepted, try again later"),
        }
    }

    /// Drops the upstream connection without ending the message: the MTA discards it.
    fn abandon_transaction(&mut self) {
        self.upstream = None;
        self.tx = None;
    }

    async fn reset_transaction(&mut self) {
        self.tx = None;
        if let Some(upstream) = self.upstream.as_mut().filter(|u| u.in_transaction) {
            match upstream.command("RSET").await {
                Ok(reply) if reply.is_positive() => upstream.in_transaction = false,
                _ => self.upstream = None,
            }
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
        send(conn, "220 2.0.0 Ready to start TLS").await?;
        let plain = std::mem::replace(conn, BufReader::new(Box::new(Detached))).into_inner();
        let tls = match timeout(Duration::from_secs(30), acceptor.accept(plain)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                debug!(client = %self.peer, error = %e, "TLS handshake failed");
                return Ok(Flow::Close);
            }
            Err(_) => return Ok(Flow::Close),
        };
        *conn = BufReader::new(Box::new(tls));
        // RFC 3207 §4.2: forget everything learned before the handshake.
        self.tls_active = true;
        self.helo = None;
        self.esmtp = false;
        self.tx = None;
        if let Some(upstream) = self.upstream.take() {
            upstream.quit().await;
        }
        Ok(Flow::Continue)
    }

    /// Sends an error reply and enforces the hard error limit.
    async fn error(&mut self, conn: &mut Conn, reply: &str) -> std::io::Result<Flow> {
        send(conn, reply).await?;
        self.errors += 1;
        if self.errors >= self.ctx.config.max_errors {
            SmtpStats::bump(&self.ctx.stats.error_limit_disconnects);
            let host = &self.ctx.config.hostname;
            send(conn, &format!("421 4.7.0 {host} Error: too many errors")).await?;
            return Ok(Flow::Close);
        }
        Ok(Flow::Continue)
    }
}

/// A data line must end in CRLF and contain no other CR or LF.
fn has_bare_cr_or_lf(line: &[u8]) -> bool {
    match line.strip_suffix(b"\r\n") {
        Some(body) => body.iter().any(|&b| b == b'\r' || b == b'\n'),
        None => true,
    }
}

async fn send(conn: &mut Conn, line: &str) -> std::io::Result<()> {
    let mut wire = Vec::with_capacity(line.len() + 2);
    wire.extend_from_slice(line.as_bytes());
    wire.extend_from_slice(b"\r\n");
    let stream = conn.get_mut();
    stream.write_all(&wire).await?;
    stream.flush().await
}

async fn send_reply(conn: &mut Conn, reply: &Reply) -> std::io::Result<()> {
    let stream = conn.get_mut();
    stream.write_all(&reply.to_wire()).await?;
    stream.flush().await
}

#[cfg(test)]
mod tests {
    use super::has_bare_cr_or_lf;

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
