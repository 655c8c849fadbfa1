//! The proxy to the MTA behind us: one upstream SMTP session per client
//! transaction, opened at its first recipient and closed when it ends, so an
//! idle client holds none of the `max_upstream_sessions`.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::timeout;

use super::io::{read_line, Line};
use super::reply::{Reply, ReplyParser};

/// What the MTA behind should learn about the real client (Postfix XCLIENT).
pub struct ClientInfo {
    pub addr: SocketAddr,
    pub helo: Option<String>,
    pub esmtp: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream {0} unreachable: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("upstream timed out")]
    Timeout,
    /// All `max_upstream_sessions` stayed busy for `upstream_wait`.
    #[error("no upstream session free")]
    Busy,
    #[error("upstream connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("upstream closed the connection")]
    Closed,
    #[error(transparent)]
    Protocol(#[from] super::reply::MalformedReply),
    /// The upstream refused a step of the session set-up; its reply is kept for the client.
    #[error("upstream refused: {} {}", .0.code, .0.lines.join(" "))]
    Refused(Reply),
}

/// SMTP extensions passed through only when the MTA behind offers them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Extensions {
    /// RFC 3461 delivery status notifications.
    pub dsn: bool,
    /// RFC 6531 internationalised addresses.
    pub smtputf8: bool,
    /// RFC 3030 BDAT: chunks are passed on as chunks, never turned into DATA.
    pub chunking: bool,
}

pub struct Upstream {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: BufWriter<tokio::net::tcp::OwnedWriteHalf>,
    timeout: Duration,
    /// XFORWARD line sent before each MAIL (its attributes last one transaction).
    forward: Option<String>,
    /// The upstream offers PIPELINING: transaction start goes in one round trip.
    pipelining: bool,
    /// The SASL mechanisms its EHLO offered (to the real client, after XCLIENT).
    auth: Vec<String>,
    extensions: Extensions,
    /// The XCLIENT attributes the MTA's first EHLO offered; `Some` means the
    /// session can be re-targeted at another client.
    xclient: Option<Vec<String>>,
    /// The XFORWARD attributes the current EHLO offered.
    xforward: Option<Vec<String>>,
    /// Whether the session sits between transactions after a delivered
    /// message (nothing of a client pending), so it may serve another one.
    reusable: bool,
    /// Transactions started on this session.
    pub uses: u32,
    /// One of the `max_upstream_sessions` slots, freed when the session ends.
    _slot: OwnedSemaphorePermit,
}

const MAX_REPLY_LINE: usize = 4096;

/// How long an upstream session may take to set up, and to answer afterwards.
pub struct Timeouts {
    pub connect: Duration,
    pub reply: Duration,
}

impl Upstream {
    /// Connects, greets, and passes the real client on with XCLIENT when
    /// offered, all within `timeouts.connect`.
    pub async fn connect(
        addr: SocketAddr,
        our_name: &str,
        client: &ClientInfo,
        timeouts: Timeouts,
        slot: OwnedSemaphorePermit,
    ) -> Result<Upstream, UpstreamError> {
        timeout(
            timeouts.connect,
            Self::set_up(addr, our_name, client, timeouts.reply, slot),
        )
        .await
        .map_err(|_| UpstreamError::Timeout)?
    }

    async fn set_up(
        addr: SocketAddr,
        our_name: &str,
        client: &ClientInfo,
        reply_timeout: Duration,
        slot: OwnedSemaphorePermit,
    ) -> Result<Upstream, UpstreamError> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| UpstreamError::Connect(addr, e))?;
        let _ = stream.set_nodelay(true);
        let (read, write) = stream.into_split();
        let mut upstream = Upstream {
            reader: BufReader::new(read),
            writer: BufWriter::new(write),
            timeout: reply_timeout,
            forward: None,
            pipelining: false,
            auth: Vec::new(),
            extensions: Extensions::default(),
            xclient: None,
            xforward: None,
            reusable: false,
            uses: 0,
            _slot: slot,
        };
        upstream.expect_success(None).await?;
        let ehlo = upstream
            .expect_success(Some(&format!("EHLO {our_name}")))
            .await?;
        upstream.xclient = offered(&ehlo, "XCLIENT");
        upstream.adopt(&ehlo);
        upstream.introduce(our_name, client).await?;
        Ok(upstream)
    }

    /// Hands an idle session (see [`Self::is_reusable`]) to another client:
    /// XCLIENT again with every attribute replaced, and a fresh EHLO, within
    /// `limit`. Without XCLIENT only the XFORWARD line changes.
    pub async fn retarget(
        &mut self,
        our_name: &str,
        client: &ClientInfo,
        limit: Duration,
    ) -> Result<(), UpstreamError> {
        self.reusable = false;
        timeout(limit, self.introduce(our_name, client))
            .await
            .map_err(|_| UpstreamError::Timeout)?
    }

    /// Tells the MTA who the client is: XCLIENT when offered (it restarts
    /// the session, so EHLO again, as the client did), else XFORWARD per
    /// transaction.
    async fn introduce(
        &mut self,
        our_name: &str,
        client: &ClientInfo,
    ) -> Result<(), UpstreamError> {
        if let Some(attributes) = self.xclient.clone() {
            let command = client_attributes("XCLIENT", &attributes, client);
            self.expect_success(Some(&command)).await?;
            // What this EHLO offers is what the session has from now on.
            let helo = client.helo.as_deref().unwrap_or(our_name);
            let ehlo = self.expect_success(Some(&format!("EHLO {helo}"))).await?;
            self.adopt(&ehlo);
        }
        self.forward = self
            .xforward
            .as_ref()
            .map(|a| client_attributes("XFORWARD", a, client));
        Ok(())
    }

    /// What the session offers from this EHLO on.
    fn adopt(&mut self, ehlo: &Reply) {
        self.xforward = offered(ehlo, "XFORWARD");
        self.pipelining = offered(ehlo, "PIPELINING").is_some();
        self.auth = offered(ehlo, "AUTH").unwrap_or_default();
        self.extensions = Extensions {
            dsn: offered(ehlo, "DSN").is_some(),
            smtputf8: offered(ehlo, "SMTPUTF8").is_some(),
            chunking: offered(ehlo, "CHUNKING").is_some(),
        };
    }

    /// Between transactions right after a delivered message, so nothing of
    /// its client is pending at the MTA, and re-targetable with XCLIENT (the
    /// round trip also proves the session alive). Every XCLIENT on a session
    /// sends the same attributes, all the first EHLO offered of those a
    /// client is known by, so each one the previous client set is replaced,
    /// and one never offered was never set.
    pub fn is_reusable(&self) -> bool {
        self.reusable && self.xclient.is_some()
    }

    /// The extensions the MTA offers this session (after XCLIENT).
    pub fn extensions(&self) -> Extensions {
        self.extensions
    }

    /// The SASL mechanisms the MTA offers this session, upper-case.
    pub fn auth_mechanisms(&self) -> &[String] {
        &self.auth
    }

    /// Starts a transaction: XFORWARD (when offered), MAIL and the RCPTs, in
    /// one round trip when the upstream offers PIPELINING. A refused
    /// XFORWARD or MAIL is an error; the RCPT replies come back in order.
    pub async fn start_transaction(
        &mut self,
        mail_line: &str,
        rcpt_lines: &[String],
    ) -> Result<Vec<Reply>, UpstreamError> {
        self.reusable = false;
        self.uses += 1;
        let set_up: Vec<String> = self
            .forward
            .iter()
            .cloned()
            .chain([mail_line.to_owned()])
            .collect();
        if !self.pipelining {
            for line in &set_up {
                self.expect_success(Some(line)).await?;
            }
            let mut replies = Vec::with_capacity(rcpt_lines.len());
            for line in rcpt_lines {
                replies.push(self.command(line).await?);
            }
            return Ok(replies);
        }
        for line in set_up.iter().chain(rcpt_lines) {
            self.writer.write_all(line.as_bytes()).await?;
            self.writer.write_all(b"\r\n").await?;
        }
        self.writer.flush().await?;
        let mut refusal = None;
        for _ in &set_up {
            if let Err(e) = success(self.read_reply().await?) {
                refusal.get_or_insert(e);
            }
        }
        let mut replies = Vec::with_capacity(rcpt_lines.len());
        for _ in rcpt_lines {
            replies.push(self.read_reply().await?);
        }
        match refusal {
            Some(e) => Err(e),
            None => Ok(replies),
        }
    }

    /// Sends one command line and returns the reply, whatever its code.
    /// Any command but the transaction's own leaves the session unfit for
    /// another client.
    pub async fn command(&mut self, line: &str) -> Result<Reply, UpstreamError> {
        self.reusable = false;
        self.writer.write_all(line.as_bytes()).await?;
        self.writer.write_all(b"\r\n").await?;
        self.writer.flush().await?;
        self.read_reply().await
    }

    async fn expect_success(&mut self, line: Option<&str>) -> Result<Reply, UpstreamError> {
        let reply = match line {
            Some(line) => self.command(line).await?,
            None => self.read_reply().await?,
        };
        success(reply)
    }

    pub async fn read_reply(&mut self) -> Result<Reply, UpstreamError> {
        let mut parser = ReplyParser::default();
        loop {
            let line = timeout(self.timeout, read_line(&mut self.reader, MAX_REPLY_LINE))
                .await
                .map_err(|_| UpstreamError::Timeout)??;
            match line {
                Line::Complete(bytes) => {
                    if let Some(reply) = parser.push(&bytes)? {
                        return Ok(reply);
                    }
                }
                Line::TooLong => {
                    return Err(super::reply::MalformedReply("over-long reply line".into()).into())
                }
                Line::Eof => return Err(UpstreamError::Closed),
            }
        }
    }

    /// Queues message bytes (already dot-stuffed, CRLF terminated) for the upstream.
    pub async fn send_data(&mut self, bytes: &[u8]) -> Result<(), UpstreamError> {
        timeout(self.timeout, self.writer.write_all(bytes))
            .await
            .map_err(|_| UpstreamError::Timeout)??;
        Ok(())
    }

    /// Ends the message and waits for the upstream's verdict on it.
    pub async fn finish_data(&mut self) -> Result<Reply, UpstreamError> {
        self.writer.write_all(b".\r\n").await?;
        timeout(self.timeout, self.writer.flush())
            .await
            .map_err(|_| UpstreamError::Timeout)??;
        let reply = self.read_reply().await?;
        self.reusable = reply.is_success();
        Ok(reply)
    }

    /// Queues a BDAT command line; its `size` octets follow through [`Self::send_data`].
    pub async fn start_chunk(&mut self, size: u64, last: bool) -> Result<(), UpstreamError> {
        let line = match last {
            true => format!("BDAT {size} LAST\r\n"),
            false => format!("BDAT {size}\r\n"),
        };
        self.send_data(line.as_bytes()).await
    }

    /// After a whole chunk was queued: the upstream's reply to it (a
    /// delivered `last` chunk ends the transaction).
    pub async fn finish_chunk(&mut self, last: bool) -> Result<Reply, UpstreamError> {
        timeout(self.timeout, self.writer.flush())
            .await
            .map_err(|_| UpstreamError::Timeout)??;
        let reply = self.read_reply().await?;
        self.reusable = last && reply.is_success();
        Ok(reply)
    }

    pub async fn quit(mut self) {
        let _ = timeout(Duration::from_secs(5), self.command("QUIT")).await;
    }
}

/// A 2xx is success and 4xx/5xx a refusal kept for the client; anything
/// else (3xx, 1xx) is nonsense at this step and ends the session.
fn success(reply: Reply) -> Result<Reply, UpstreamError> {
    match reply.code / 100 {
        2 => Ok(reply),
        4 | 5 => Err(UpstreamError::Refused(reply)),
        _ => Err(super::reply::MalformedReply(format!("unexpected {} reply", reply.code)).into()),
    }
}

/// The attribute names an EHLO keyword (XCLIENT, XFORWARD) was advertised with.
fn offered(ehlo: &Reply, keyword: &str) -> Option<Vec<String>> {
    ehlo.lines.iter().find_map(|line| {
        let mut words = line.split_whitespace();
        words
            .next()
            .filter(|w| w.eq_ignore_ascii_case(keyword))
            .map(|_| words.map(str::to_ascii_uppercase).collect())
    })
}

/// `KEYWORD ATTR=value ...` with only the attributes the server offered
/// (Postfix refuses unknown ones).
fn client_attributes(keyword: &str, offered: &[String], client: &ClientInfo) -> String {
    let proto = if client.esmtp { "ESMTP" } else { "SMTP" };
    let candidates = [
        ("ADDR", Some(xclient_addr(client.addr))),
        ("PORT", Some(client.addr.port().to_string())),
        ("PROTO", Some(proto.to_owned())),
        // Explicitly unknown rather than left out: a re-targeted session
        // must not keep the previous client's.
        (
            "HELO",
            Some(
                client
                    .helo
                    .as_deref()
                    .map_or("[UNAVAILABLE]".to_owned(), xtext),
            ),
        ),
        ("NAME", Some("[UNAVAILABLE]".to_owned())),
    ];
    let mut line = keyword.to_owned();
    for (name, value) in candidates {
        if let (true, Some(value)) = (offered.iter().any(|o| o == name), value) {
            line.push_str(&format!(" {name}={value}"));
        }
    }
    line
}

fn xclient_addr(addr: SocketAddr) -> String {
    match crate::netaddr::canonical(addr.ip()) {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => format!("IPV6:{v6}"),
    }
}

/// RFC 3461 xtext, which XCLIENT attribute values use (DSN's encoder).
fn xtext(value: &str) -> String {
    super::dsn::encode_xtext(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xtext_encodes_specials() {
        assert_eq!(xtext("client.example"), "client.example");
        assert_eq!(xtext("a+b=c d"), "a+2Bb+3Dc+20d");
    }

    #[test]
    fn only_offered_attributes_are_sent() {
        let ehlo = Reply {
            code: 250,
            lines: vec![
                "sink".into(),
                "XCLIENT NAME HELO".into(),
                "XFORWARD NAME ADDR PROTO HELO".into(),
            ],
        };
        let client = ClientInfo {
            addr: "192.0.2.2:4000".parse().unwrap(),
            helo: Some("client.test".into()),
            esmtp: true,
        };
        let xclient = offered(&ehlo, "XCLIENT").unwrap();
        assert_eq!(
            client_attributes("XCLIENT", &xclient, &client),
            "XCLIENT HELO=client.test NAME=[UNAVAILABLE]"
        );
        let xforward = offered(&ehlo, "XFORWARD").unwrap();
        assert_eq!(
            client_attributes("XFORWARD", &xforward, &client),
            "XFORWARD ADDR=192.0.2.2 PROTO=ESMTP HELO=client.test NAME=[UNAVAILABLE]"
        );
        assert_eq!(offered(&ehlo, "STARTTLS"), None);
    }

    #[test]
    fn xclient_addresses() {
        assert_eq!(xclient_addr("192.0.2.1:25".parse().unwrap()), "192.0.2.1");
        assert_eq!(
            xclient_addr("[::ffff:192.0.2.1]:25".parse().unwrap()),
            "192.0.2.1"
        );
        assert_eq!(
            xclient_addr("[2001:db8::1]:25".parse().unwrap()),
            "IPV6:2001:db8::1"
        );
    }
}
