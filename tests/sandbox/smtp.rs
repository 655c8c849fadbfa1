//! SMTP peers for tests: Postfix's smtp-sink as the MTA behind the
//! gatekeeper, and a line-level client that shows every reply.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::netns::Netns;
use crate::probe::{connect_from, Outcome};

/// `smtp-sink` in a namespace, dumping each message to its own file.
pub struct SmtpSink {
    child: Child,
    dir: PathBuf,
}

impl SmtpSink {
    pub fn start(ns: &Netns, dir: &Path, listen: &str) -> Result<SmtpSink> {
        std::fs::create_dir_all(dir)?;
        // smtp-sink drops to `nobody`, which must reach and write the dump directory.
        crate::netns::open_to_service_users(dir);
        let child = ns
            .command("smtp-sink")
            .args(["-u", "nobody", "-h", "sink.test", "-d"])
            .arg(dir.join("msg."))
            .arg(listen)
            .arg("256")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting smtp-sink (Debian package postfix)")?;
        let sink = SmtpSink {
            child,
            dir: dir.to_owned(),
        };
        let addr: SocketAddr = listen.parse()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let up = ns.run(move || {
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            })?;
            if up {
                return Ok(sink);
            }
            if Instant::now() > deadline {
                bail!("smtp-sink did not start listening on {listen}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Contents of every dumped message, oldest first.
    pub fn messages(&self) -> Vec<String> {
        sink_dumps(&self.dir)
    }
}

/// The files an smtp-sink dumped into `dir`, oldest first.
pub fn sink_dumps(dir: &Path) -> Vec<String> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
    files
        .iter()
        .filter_map(|p| std::fs::read(p).ok())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .collect()
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A blocking SMTP client that exposes raw replies.
pub struct SmtpClient {
    reader: BufReader<TcpStream>,
}

/// One reply: its code and all its lines (without the code prefix).
#[derive(Debug, Clone)]
pub struct SmtpReply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl SmtpReply {
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }
}

impl std::fmt::Display for SmtpReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code, self.text())
    }
}

impl SmtpClient {
    pub fn connect(ns: &Netns, source: &str, dest: &str) -> Result<SmtpClient> {
        let source: IpAddr = source.parse()?;
        let dest: SocketAddr = dest.parse()?;
        let (outcome, stream) = connect_from(ns, source, dest)?;
        match (outcome, stream) {
            (Outcome::Connected, Some(stream)) => Ok(SmtpClient::over(stream)),
            (other, _) => bail!("connecting {source} -> {dest}: {other:?}"),
        }
    }

    pub fn over(stream: TcpStream) -> SmtpClient {
        stream.set_read_timeout(Some(Duration::from_secs(10))).ok();
        SmtpClient {
            reader: BufReader::new(stream),
        }
    }

    pub fn stream(&mut self) -> &mut TcpStream {
        self.reader.get_mut()
    }

    pub fn into_stream(self) -> TcpStream {
        self.reader.into_inner()
    }

    /// Reads one reply; `Err` when the server closed the connection.
    pub fn reply(&mut self) -> Result<SmtpReply> {
        read_reply(&mut self.reader)
    }

    /// STARTTLS, then the TLS handshake trusting only `cert_der` for `name`.
    pub fn starttls(mut self, cert_der: &[u8], name: &str) -> Result<TlsSmtpClient> {
        use tokio_rustls::rustls;
        let reply = self.cmd("STARTTLS")?;
        anyhow::ensure!(reply.code == 220, "STARTTLS: {reply}");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(rustls_pki_types::CertificateDer::from(cert_der.to_vec()))?;
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from(name.to_owned())?;
        let connection = rustls::ClientConnection::new(std::sync::Arc::new(config), name)?;
        let tls = rustls::StreamOwned::new(connection, self.into_stream());
        Ok(TlsSmtpClient {
            reader: BufReader::new(tls),
        })
    }

    pub fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.reader.get_mut().write_all(bytes)?;
        Ok(())
    }

    /// Sends a command line and reads its reply.
    pub fn cmd(&mut self, line: &str) -> Result<SmtpReply> {
        self.send(format!("{line}\r\n").as_bytes())?;
        self.reply()
    }

    /// True when the server closed the connection (reads EOF).
    pub fn is_closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(self.reader.read(&mut byte), Ok(0))
    }

    /// Greeting, EHLO, MAIL: ready for RCPT.
    pub fn start_transaction(&mut self, helo: &str, from: &str) -> Result<()> {
        let banner = self.reply()?;
        anyhow::ensure!(banner.code == 220, "banner {banner}");
        let ehlo = self.cmd(&format!("EHLO {helo}"))?;
        anyhow::ensure!(ehlo.code == 250, "EHLO {ehlo}");
        let mail = self.cmd(&format!("MAIL FROM:{from}"))?;
        anyhow::ensure!(mail.code == 250, "MAIL {mail}");
        Ok(())
    }
}

/// An SMTP session after STARTTLS.
pub struct TlsSmtpClient {
    reader: BufReader<
        tokio_rustls::rustls::StreamOwned<tokio_rustls::rustls::ClientConnection, TcpStream>,
    >,
}

impl TlsSmtpClient {
    pub fn reply(&mut self) -> Result<SmtpReply> {
        read_reply(&mut self.reader)
    }

    pub fn cmd(&mut self, line: &str) -> Result<SmtpReply> {
        self.reader
            .get_mut()
            .write_all(format!("{line}\r\n").as_bytes())?;
        self.reply()
    }
}

/// One reply off any stream; `Err` when the server closed the connection.
fn read_reply(reader: &mut impl BufRead) -> Result<SmtpReply> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            bail!("connection closed (after {lines:?})");
        }
        let line = line.trim_end_matches(['\r', '\n']);
        let code: u16 = line
            .get(..3)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("bad reply {line:?}"))?;
        lines.push(line.get(4..).unwrap_or("").to_owned());
        if line.as_bytes().get(3) != Some(&b'-') {
            return Ok(SmtpReply { code, lines });
        }
    }
}

/// A self-signed certificate for `name`, written into `dir`: (cert, key, DER).
pub fn test_certificate(dir: &Path, name: &str) -> (PathBuf, PathBuf, Vec<u8>) {
    let certified = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.key_pair.serialize_pem()).unwrap();
    (cert, key, certified.cert.der().to_vec())
}

/// SASL PLAIN's initial response for `user` / `password`.
pub fn sasl_plain(user: &str, password: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"))
}

pub fn base64(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// A scripted MTA that speaks like Postfix (XCLIENT answered with a fresh
/// 220) and records every line of the first session that carries a MAIL.
/// Sessions without one (the gatekeeper learning the MTA's EHLO) are
/// answered and forgotten.
pub struct ScriptedMta {
    handle: std::thread::JoinHandle<Vec<String>>,
}

impl ScriptedMta {
    pub fn start(
        ns: &Netns,
        listen: &str,
        extensions: &'static [&'static str],
    ) -> Result<ScriptedMta> {
        let addr: SocketAddr = listen.parse()?;
        let listener = ns.run(move || std::net::TcpListener::bind(addr))??;
        let handle = std::thread::spawn(move || loop {
            let Ok((stream, _)) = listener.accept() else {
                return Vec::new();
            };
            let seen = scripted_session(stream, extensions);
            if seen
                .iter()
                .any(|l| l.to_ascii_uppercase().starts_with("MAIL"))
            {
                return seen;
            }
        });
        Ok(ScriptedMta { handle })
    }

    /// Every line received (commands and message lines), once the session ended.
    pub fn lines(self) -> Vec<String> {
        self.handle.join().unwrap_or_default()
    }
}

/// One session: every line received, until the client leaves.
fn scripted_session(stream: TcpStream, extensions: &[&str]) -> Vec<String> {
    let mut seen = Vec::new();
    let mut out = stream.try_clone().expect("clone");
    let mut reader = BufReader::new(stream);
    let _ = out.write_all(b"220 scripted.test ESMTP\r\n");
    let mut in_data = false;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return seen;
        }
        let line = line.trim_end_matches(['\r', '\n']).to_owned();
        let reply: String = if in_data {
            if line == "." {
                in_data = false;
                "250 2.0.0 Ok: queued\r\n".into()
            } else {
                seen.push(line);
                continue;
            }
        } else {
            let verb = line.split(' ').next().unwrap_or("").to_ascii_uppercase();
            match verb.as_str() {
                "EHLO" => {
                    let mut r = String::from("250-scripted.test\r\n");
                    for ext in extensions {
                        r.push_str(&format!("250-{ext}\r\n"));
                    }
                    r.push_str("250 ENHANCEDSTATUSCODES\r\n");
                    r
                }
                "XCLIENT" => "220 scripted.test ESMTP\r\n".into(),
                "DATA" => {
                    in_data = true;
                    "354 go ahead\r\n".into()
                }
                "QUIT" => "221 2.0.0 Bye\r\n".into(),
                _ => "250 2.0.0 Ok\r\n".into(),
            }
        };
        seen.push(line);
        if out.write_all(reply.as_bytes()).is_err() {
            return seen;
        }
    }
}
