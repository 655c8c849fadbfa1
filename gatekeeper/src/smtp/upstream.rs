//! The proxy to the MTA behind us: one upstream SMTP session per client
//! session, opened when the first recipient is accepted.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
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

pub struct Upstream {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: BufWriter<tokio::net::tcp::OwnedWriteHalf>,
    timeout: Duration,
    /// A MAIL was accepted and no DATA/RSET closed it yet.
    pub in_transaction: bool,
    /// XFORWARD line sent before each MAIL (its attributes last one transaction).
    forward: Option<String>,
    /// The upstream offers PIPELINING: transaction start goes in one round trip.
    pipelining: bool,
}

const MAX_REPLY_LINE: usize = 4096;

impl Upstream {
    /// Connects, greets, and passes the real client on with XCLIENT when offered.
    pub async fn connect(
        addr: SocketAddr,
        our_name: &str,
        client: &ClientInfo,
        limit: Duration,
    ) -> Result<Upstream, UpstreamError> {
        let stream = timeout(limit, TcpStream::connect(addr))
            .await
            .map_err(|_| UpstreamError::Timeout)?
            .map_err(|e| UpstreamError::Connect(addr, e))?;
        let _ = stream.set_nodelay(true);
        let (read, write) = stream.into_split();
        let mut upstream = Upstream {
            reader: BufReader::new(read),
            writer: BufWriter::new(write),
            timeout: limit,
            in_transaction: false,
            forward: None,
            pipelining: false,
        };
        upstream.expect_positive(None).await?;
        let ehlo = upstream
            .expect_positive(Some(&format!("EHLO {our_name}")))
            .await?;
        upstream.pipelining = offered(&ehlo, "PIPELINING").is_some();
        if let Some(attributes) = offered(&ehlo, "XCLIENT") {
            let command = client_attributes("XCLIENT", &attributes, client);
            upstream.expect_positive(Some(&command)).await?;
            // XCLIENT restarts the session: greet again, as the client did.
            let helo = client.helo.as_deref().unwrap_or(our_name);
            let ehlo = upstream
                .expect_positive(Some(&format!("EHLO {helo}")))
                .await?;
            upstream.forward =
                offered(&ehlo, "XFORWARD").map(|a| client_attributes("XFORWARD", &a, client));
        } else if let Some(attributes) = offered(&ehlo, "XFORWARD") {
            upstream.forward = Some(client_attributes("XFORWARD", &attributes, client));
        }
        Ok(upstream)
    }

    /// Starts a transaction with its first recipient: XFORWARD (when
    /// offered), MAIL and RCPT, in one round trip when the upstream offers
    /// PIPELINING. Returns the first refusal, else the RCPT reply.
    pub async fn mail_and_rcpt(
        &mut self,
        mail_line: &str,
        rcpt_line: &str,
    ) -> Result<Reply, UpstreamError> {
        let mut lines: Vec<String> = self.forward.iter().cloned().collect();
        lines.push(mail_line.to_owned());
        lines.push(rcpt_line.to_owned());
        if !self.pipelining {
            for (i, line) in lines.iter().enumerate() {
                let reply = self.command(line).await?;
                let last = i + 1 == lines.len();
                if i + 2 == lines.len() {
                    self.in_transaction = reply.is_positive();
                }
                if last || !reply.is_positive() {
                    return Ok(reply);
                }
            }
        }
        for line in &lines {
            self.writer.write_all(line.as_bytes()).await?;
            self.writer.write_all(b"\r\n").await?;
        }
        self.writer.flush().await?;
        let mut first_refusal = None;
        let mut last = None;
        for i in 0..lines.len() {
            let reply = self.read_reply().await?;
            if i + 2 == lines.len() {
                self.in_transaction = reply.is_positive();
            }
            if !reply.is_positive() && first_refusal.is_none() {
                first_refusal = Some(reply.clone());
            }
            last = Some(reply);
        }
        Ok(first_refusal
            .or(last)
            .expect("at least MAIL and RCPT were sent"))
    }

    /// Sends one command line and returns the reply, whatever its code.
    pub async fn command(&mut self, line: &str) -> Result<Reply, UpstreamError> {
        self.writer.write_all(line.as_bytes()).await?;
        self.writer.write_all(b"\r\n").await?;
        self.writer.flush().await?;
        self.read_reply().await
    }

    async fn expect_positive(&mut self, line: Option<&str>) -> Result<Reply, UpstreamError> {
        let reply = match line {
            Some(line) => self.command(line).await?,
            None => self.read_reply().await?,
        };
        if reply.is_positive() {
            Ok(reply)
        } else {
            Err(UpstreamError::Refused(reply))
        }
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
        self.in_transaction = false;
        self.writer.write_all(b".\r\n").await?;
        timeout(self.timeout, self.writer.flush())
            .await
            .map_err(|_| UpstreamError::Timeout)??;
        self.read_reply().await
    }

    pub async fn quit(mut self) {
        let _ = timeout(Duration::from_secs(5), self.command("QUIT")).await;
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
        ("HELO", client.helo.as_deref().map(xtext)),
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
    match super::policy::canonical(addr.ip()) {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => format!("IPV6:{v6}"),
    }
}

/// RFC 3461 xtext, which XCLIENT attribute values use.
fn xtext(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
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
