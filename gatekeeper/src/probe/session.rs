//! One SMTP client session of the probe. Blocking std I/O: a run makes one
//! connection at a time, and the server is not trusted, so every reply is
//! bounded in size, line count and time, and everything said is kept in a
//! transcript.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

use super::classify::Stage;
use crate::smtp::reply::{Reply, ReplyParser};

const MAX_LINE: usize = 4096;
const MAX_REPLY_LINES: usize = 200;
const MAX_TRANSCRIPT_LINES: usize = 600;
const MAX_SHOWN: usize = 300;

#[derive(Debug, Clone)]
pub struct Settings {
    pub addr: SocketAddr,
    /// The name given on the command line, for TLS SNI.
    pub server_name: String,
    pub source: Option<IpAddr>,
    /// For the connection and for each reply.
    pub timeout: Duration,
    pub helo: String,
    pub starttls: bool,
}

/// Why a session ended before its transaction.
#[derive(Debug, Clone)]
pub struct Failure {
    pub stage: Stage,
    pub message: String,
    pub reply: Option<Reply>,
}

impl Failure {
    fn io(stage: Stage, message: String) -> Failure {
        Failure {
            stage,
            message,
            reply: None,
        }
    }
}

/// The socket with the current deadline: every read and write (rustls's
/// inner loops included) gets only the time that is left, so a server that
/// drips one byte at a time cannot stretch a reply past it.
struct Deadlined {
    socket: TcpStream,
    deadline: Instant,
}

impl Deadlined {
    fn remaining(&self) -> std::io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        Ok(left)
    }
}

impl Read for Deadlined {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.socket.set_read_timeout(Some(self.remaining()?))?;
        self.socket.read(buf)
    }
}

impl Write for Deadlined {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.socket.set_write_timeout(Some(self.remaining()?))?;
        self.socket.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.socket.flush()
    }
}

enum Transport {
    Plain(Deadlined),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, Deadlined>>),
}

impl Transport {
    fn set_deadline(&mut self, deadline: Instant) {
        match self {
            Transport::Plain(s) => s.deadline = deadline,
            Transport::Tls(s) => s.sock.deadline = deadline,
        }
    }
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Transport::Plain(s) => s.read(buf),
            Transport::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Transport::Plain(s) => s.write(buf),
            Transport::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Transport::Plain(s) => s.flush(),
            Transport::Tls(s) => s.flush(),
        }
    }
}

pub struct Session {
    transport: Option<Transport>,
    pending: Vec<u8>,
    timeout: Duration,
    pub transcript: Vec<String>,
    pub banner: Option<Reply>,
    pub tls: bool,
    /// The server offered STARTTLS (in the last EHLO before TLS).
    pub tls_offered: bool,
    /// Our end of the connection: the address the server judged.
    pub local: Option<SocketAddr>,
}

/// `Err(None)` is a timeout, distinguishable where a silence means something.
type ReadResult<T> = Result<T, Option<String>>;

impl Session {
    pub fn connect(settings: &Settings) -> Result<Session, Failure> {
        let fail = |e: std::io::Error| {
            Failure::io(
                Stage::Connect,
                format!("connecting to {}: {e}", settings.addr),
            )
        };
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(settings.addr),
            socket2::Type::STREAM,
            None,
        )
        .map_err(fail)?;
        if let Some(source) = settings.source {
            socket
                .bind(&SocketAddr::new(source, 0).into())
                .map_err(|e| Failure::io(Stage::Connect, format!("binding {source}: {e}")))?;
        }
        socket
            .connect_timeout(&settings.addr.into(), settings.timeout)
            .map_err(fail)?;
        let stream: TcpStream = socket.into();
        stream.set_nodelay(true).map_err(fail)?;
        let local = stream.local_addr().ok();
        Ok(Session {
            local,
            transport: Some(Transport::Plain(Deadlined {
                socket: stream,
                deadline: Instant::now() + settings.timeout,
            })),
            pending: Vec::new(),
            timeout: settings.timeout,
            transcript: Vec::new(),
            banner: None,
            tls: false,
            tls_offered: false,
        })
    }

    /// Greeting, EHLO (HELO if EHLO is refused), and STARTTLS when asked for
    /// and offered.
    pub fn handshake(&mut self, settings: &Settings) -> Result<(), Failure> {
        let banner = self.reply().map_err(|e| self.failure(Stage::Greeting, e))?;
        self.banner = Some(banner.clone());
        if banner.code != 220 {
            return Err(Failure {
                stage: Stage::Greeting,
                message: "the server did not greet with 220".into(),
                reply: Some(banner),
            });
        }
        let ehlo = self.hello(&settings.helo)?;
        self.tls_offered = ehlo
            .lines
            .iter()
            .skip(1)
            .any(|l| l.trim().eq_ignore_ascii_case("STARTTLS"));
        if settings.starttls && self.tls_offered {
            self.starttls(&settings.server_name)?;
            self.hello(&settings.helo)?;
        }
        Ok(())
    }

    fn hello(&mut self, helo: &str) -> Result<Reply, Failure> {
        let ehlo = self
            .command(&format!("EHLO {helo}"))
            .map_err(|e| self.failure(Stage::Ehlo, e))?;
        if ehlo.is_success() {
            return Ok(ehlo);
        }
        let fallback = self
            .command(&format!("HELO {helo}"))
            .map_err(|e| self.failure(Stage::Ehlo, e))?;
        if fallback.is_success() {
            Ok(fallback)
        } else {
            Err(Failure {
                stage: Stage::Ehlo,
                message: "EHLO and HELO were refused".into(),
                reply: Some(fallback),
            })
        }
    }

    fn starttls(&mut self, server_name: &str) -> Result<(), Failure> {
        let reply = self
            .command("STARTTLS")
            .map_err(|e| self.failure(Stage::Starttls, e))?;
        if reply.code != 220 {
            return Err(Failure {
                stage: Stage::Starttls,
                message: "STARTTLS was refused".into(),
                reply: Some(reply),
            });
        }
        if !self.pending.is_empty() {
            // Plaintext sent after the 220 would be read as if it came over
            // TLS (the STARTTLS injection attack): refuse to go on.
            return Err(Failure::io(
                Stage::Starttls,
                "the server sent data after its 220 to STARTTLS".into(),
            ));
        }
        let Some(Transport::Plain(mut socket)) = self.transport.take() else {
            return Err(Failure::io(Stage::Starttls, "TLS already on".into()));
        };
        let name = ServerName::try_from(server_name.to_owned())
            .unwrap_or_else(|_| ServerName::try_from("invalid").expect("a valid DNS name"));
        let mut connection = rustls::ClientConnection::new(tls_config(), name)
            .map_err(|e| Failure::io(Stage::Starttls, format!("TLS set-up: {e}")))?;
        socket.deadline = Instant::now() + self.timeout;
        while connection.is_handshaking() {
            connection
                .complete_io(&mut socket)
                .map_err(|e| Failure::io(Stage::Starttls, format!("TLS handshake: {e}")))?;
        }
        self.note("-- TLS established (certificate not verified)");
        self.transport = Some(Transport::Tls(Box::new(rustls::StreamOwned::new(
            connection, socket,
        ))));
        self.tls = true;
        Ok(())
    }

    /// Sends one command line (CRLF added) and reads the reply.
    pub fn command(&mut self, line: &str) -> ReadResult<Reply> {
        self.send_raw(format!("{line}\r\n").as_bytes())?;
        self.reply()
    }

    /// Sends bytes as they are; the transcript shows line ends escaped.
    pub fn send_raw(&mut self, bytes: &[u8]) -> ReadResult<()> {
        self.note(&format!("C: {}", shown(bytes)));
        let transport = self
            .transport
            .as_mut()
            .ok_or(Some("not connected".into()))?;
        transport.set_deadline(Instant::now() + self.timeout);
        transport
            .write_all(bytes)
            .and_then(|()| transport.flush())
            .map_err(|e| Some(format!("sending: {e}")))
    }

    /// One whole reply within the timeout.
    pub fn reply(&mut self) -> ReadResult<Reply> {
        self.reply_within(self.timeout)
    }

    /// One whole reply within `wait`; `Err(None)` if none came.
    pub fn reply_within(&mut self, wait: Duration) -> ReadResult<Reply> {
        let deadline = Instant::now() + wait;
        let mut parser = ReplyParser::default();
        for _ in 0..MAX_REPLY_LINES {
            let line = self.line(deadline)?;
            self.note(&format!("S: {}", shown(crate::smtp::io::trim_eol(&line))));
            match parser.push(&line) {
                // The probe never pipelines: anything after a whole reply
                // would be taken as the next command's answer.
                Ok(Some(_)) if !self.pending.is_empty() => {
                    return Err(Some(
                        "the server sent more than one reply: replies would be out of step".into(),
                    ))
                }
                Ok(Some(reply)) => return Ok(reply),
                Ok(None) => {}
                Err(e) => return Err(Some(e.to_string())),
            }
        }
        Err(Some(format!("reply of over {MAX_REPLY_LINES} lines")))
    }

    fn line(&mut self, deadline: Instant) -> ReadResult<Vec<u8>> {
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                return Ok(self.pending.drain(..=end).collect());
            }
            if self.pending.len() > MAX_LINE {
                return Err(Some(format!("reply line of over {MAX_LINE} octets")));
            }
            if Instant::now() >= deadline {
                return Err(None);
            }
            let transport = self
                .transport
                .as_mut()
                .ok_or(Some("not connected".into()))?;
            transport.set_deadline(deadline);
            let mut chunk = [0u8; 4096];
            match transport.read(&mut chunk) {
                Ok(0) => return Err(Some("the server closed the connection".into())),
                Ok(n) => self.pending.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Some(format!("reading: {e}"))),
            }
        }
    }

    /// The failure for a read that went wrong at `stage`.
    pub fn failure(&self, stage: Stage, error: Option<String>) -> Failure {
        Failure::io(
            stage,
            error.unwrap_or_else(|| format!("no reply within {:?}", self.timeout)),
        )
    }

    pub fn note(&mut self, line: &str) {
        if self.transcript.len() < MAX_TRANSCRIPT_LINES {
            self.transcript.push(line.to_owned());
        }
    }

    /// RSET and QUIT, briefly, ignoring what comes back; then the transcript.
    pub fn finish(mut self) -> Vec<String> {
        self.timeout = self.timeout.min(Duration::from_secs(5));
        if self.command("RSET").is_ok() {
            let _ = self.command("QUIT");
        }
        self.transcript
    }

    /// Drops the connection without a word: whatever transaction is open is
    /// abandoned by the server.
    pub fn abandon(mut self) -> Vec<String> {
        self.note("-- connection dropped");
        self.transcript
    }
}

/// Printable, one line: CR and LF shown as `\r` and `\n`, long lines cut.
fn shown(bytes: &[u8]) -> String {
    let text: String = bytes.escape_ascii().to_string();
    match text.char_indices().nth(MAX_SHOWN) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}

/// The probe tests relaying, not certificates: any certificate is taken, and
/// the report says so.
fn tls_config() -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    Arc::new(config)
}

#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::shown;

    #[test]
    fn transcript_lines_are_printable() {
        assert_eq!(shown(b"DATA\r\n"), "DATA\\r\\n");
        assert_eq!(shown(b"a\x00\x1b[31m"), "a\\x00\\x1b[31m");
        assert!(shown(&[b'x'; 1000]).ends_with("..."));
    }
}
