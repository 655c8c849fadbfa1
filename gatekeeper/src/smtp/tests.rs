//! In-process tests of the front end: the real `serve` on 127.0.0.1:0 with a
//! test config, real clients, and a scripted fake MTA that records what it
//! received and fails where it is told to. No root, loopback only.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout};
use tokio_util::sync::CancellationToken;

use super::io::{read_line, trim_eol, Line};
use super::reply::{Reply, ReplyParser};
use super::stats::{SmtpStats, SmtpStatsReport};
use super::{bind, serve, PregreetHook, SmtpConfig, SmtpContext};
use crate::ledger::bans::AbuseKind;
use crate::ledger::greylist::{Checked, GreyVerdict, Greylist, GreylistConfig};

/// Only a failure ever waits this long.
const GUARD: Duration = Duration::from_secs(120);

fn test_config(upstream: SocketAddr, extra: &str) -> SmtpConfig {
    let relay = if extra.contains("relay_networks") {
        ""
    } else {
        "relay_networks = []\n"
    };
    let local = if extra.contains("local_domains") {
        ""
    } else {
        "local_domains = [\"example.org\"]\n"
    };
    let text = format!(
        "listen = [\"127.0.0.1:0\"]\nhostname = \"gk.test\"\n{local}\
         {relay}upstream = \"{upstream}\"\n{extra}"
    );
    let config: SmtpConfig = toml::from_str(&text).expect("test config");
    config.validate().expect("valid test config");
    config
}

struct Front {
    addr: SocketAddr,
    ctx: Arc<SmtpContext>,
    /// What a reload does: publish the context for connections accepted next.
    publish: tokio::sync::watch::Sender<Arc<SmtpContext>>,
    shutdown: CancellationToken,
    served: JoinHandle<()>,
}

impl Front {
    async fn start(upstream: SocketAddr, extra: &str) -> Front {
        Front::with_hook(upstream, extra, None).await
    }

    async fn with_hook(upstream: SocketAddr, extra: &str, hook: Option<PregreetHook>) -> Front {
        Front::build(upstream, extra, hook, None, true).await
    }

    async fn with_memory(upstream: SocketAddr, extra: &str, memory: Arc<FakeMemory>) -> Front {
        Front::build(upstream, extra, None, Some(memory), true).await
    }

    /// A front end that learns the MTA's extensions at the first EHLO (one
    /// extra upstream session); the others start knowing there are none, so
    /// their MTA session logs hold only what the test caused.
    async fn learning(upstream: SocketAddr, extra: &str) -> Front {
        Front::build(upstream, extra, None, None, false).await
    }

    async fn build(
        upstream: SocketAddr,
        extra: &str,
        hook: Option<PregreetHook>,
        memory: Option<Arc<FakeMemory>>,
        extensions_known: bool,
    ) -> Front {
        let config = test_config(upstream, extra);
        let listeners = bind(&config).unwrap();
        let addr = listeners[0].local_addr().unwrap();
        let mut ctx = SmtpContext::new(config, Arc::new(SmtpStats::default()), hook).unwrap();
        if extensions_known {
            ctx.learn_extensions(super::upstream::Extensions::default());
        }
        ctx.memory = memory.map(|m| m as Arc<dyn super::ClientMemory>);
        let ctx = Arc::new(ctx);
        let shutdown = CancellationToken::new();
        let (publish, contexts) = tokio::sync::watch::channel(ctx.clone());
        let served = tokio::spawn(serve(listeners, contexts, shutdown.clone()));
        Front {
            addr,
            ctx,
            publish,
            shutdown,
            served,
        }
    }

    fn stats(&self) -> SmtpStatsReport {
        self.ctx.stats.report()
    }

    /// A session over an in-memory stream: no kernel I/O, so paused time is exact.
    async fn memory_client(&self) -> Client {
        let (ours, theirs) = tokio::io::duplex(64 << 10);
        let peer = "192.0.2.7:40000".parse().unwrap();
        tokio::spawn(super::run_connection(
            Box::new(theirs),
            peer,
            None,
            self.ctx.clone(),
            self.shutdown.clone(),
        ));
        let mut client = Client::over(ours);
        assert_eq!(client.reply().await.expect("banner").code, 220);
        client
    }

    /// Connected and past the banner.
    async fn client(&self) -> Client {
        let mut client = Client::connect(self.addr).await;
        let banner = client.reply().await.expect("banner");
        assert_eq!(banner.code, 220, "{banner:?}");
        client
    }
}

struct Client {
    reader: BufReader<Box<dyn AsyncRead + Unpin + Send>>,
    writer: Box<dyn AsyncWrite + Unpin + Send>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        Client::over(TcpStream::connect(addr).await.unwrap())
    }

    fn over<S: AsyncRead + AsyncWrite + Send + 'static>(stream: S) -> Client {
        let (read, writer) = tokio::io::split(stream);
        Client {
            reader: BufReader::new(Box::new(read)),
            writer: Box::new(writer),
        }
    }

    /// One raw reply line (for replies the parser would rightly call malformed).
    async fn line(&mut self) -> String {
        match timeout(GUARD, read_line(&mut self.reader, 4096)).await {
            Ok(Ok(Line::Complete(line))) => String::from_utf8_lossy(&line).into_owned(),
            other => panic!("no line: {other:?}"),
        }
    }

    /// The next reply, or `None` once the server closed.
    async fn reply(&mut self) -> Option<Reply> {
        let mut parser = ReplyParser::default();
        loop {
            match timeout(GUARD, read_line(&mut self.reader, 4096))
                .await
                .expect("no reply in time")
            {
                Ok(Line::Complete(line)) => {
                    if let Some(reply) = parser.push(&line).expect("well-formed reply") {
                        return Some(reply);
                    }
                }
                Ok(Line::TooLong) => panic!("over-long reply"),
                Ok(Line::Eof) | Err(_) => return None,
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.unwrap();
    }

    /// A write the server no longer takes is fine: its last reply is still there to read.
    async fn cmd(&mut self, line: &str) -> Reply {
        let _ = self
            .writer
            .write_all(format!("{line}\r\n").as_bytes())
            .await;
        self.reply()
            .await
            .unwrap_or_else(|| panic!("closed after {line}"))
    }

    async fn code(&mut self, line: &str) -> u16 {
        self.cmd(line).await.code
    }

    async fn start_transaction(&mut self) {
        assert_eq!(self.code("EHLO client.test").await, 250);
        assert_eq!(self.code("MAIL FROM:<sender@client.test>").await, 250);
    }

    /// A BDAT command and its chunk, sized here; the reply to them.
    async fn chunk(&mut self, body: &str, last: bool) -> Reply {
        let last = if last { " LAST" } else { "" };
        self.send(format!("BDAT {}{last}\r\n{body}", body.len()).as_bytes())
            .await;
        self.reply().await.expect("a reply to BDAT")
    }

    async fn is_closed(&mut self) -> bool {
        self.reply().await.is_none()
    }
}

/// What the fake MTA answers to the n-th RCPT it receives (counted over all sessions).
enum Step {
    Reply(&'static str),
    Close,
}

struct Script {
    greet: bool,
    ehlo: Vec<&'static str>,
    /// Offered by the EHLO after XCLIENT (XCLIENT is offered if `ehlo` lists it).
    ehlo_after_xclient: Vec<&'static str>,
    rcpt: Box<dyn Fn(usize) -> Step + Send + Sync>,
    /// After MAIL, wait this long for another line before answering, and
    /// record whether one came (the client pipelined).
    hold_mail: Option<Duration>,
    /// Close the session right after accepting a message (an MTA that timed
    /// an idle session out).
    close_after_message: bool,
    /// Refuse XCLIENT once one was taken, as Postfix does unless the
    /// client the first one named is authorized too.
    refuse_second_xclient: bool,
}

impl Default for Script {
    fn default() -> Script {
        Script {
            greet: true,
            ehlo: vec!["PIPELINING"],
            ehlo_after_xclient: vec![],
            rcpt: Box::new(|_| Step::Reply("250 2.1.5 Ok")),
            hold_mail: None,
            close_after_message: false,
            refuse_second_xclient: false,
        }
    }
}

#[derive(Default)]
struct MtaLog {
    /// Every line received, per session.
    sessions: Mutex<Vec<Vec<String>>>,
    /// Per MAIL held: did the next command arrive before the reply?
    pipelined: Mutex<Vec<bool>>,
    rcpts: AtomicUsize,
    open: AtomicUsize,
    max_open: AtomicUsize,
}

struct Mta {
    addr: SocketAddr,
    log: Arc<MtaLog>,
}

impl Mta {
    async fn start(script: Script) -> Mta {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(MtaLog::default());
        let script = Arc::new(script);
        let shared = log.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let index = {
                    let mut sessions = shared.sessions.lock().unwrap();
                    sessions.push(Vec::new());
                    sessions.len() - 1
                };
                let open = shared.open.fetch_add(1, SeqCst) + 1;
                shared.max_open.fetch_max(open, SeqCst);
                let (script, log) = (script.clone(), shared.clone());
                tokio::spawn(async move {
                    mta_session(stream, &script, &log, index).await;
                    log.open.fetch_sub(1, SeqCst);
                });
            }
        });
        Mta { addr, log }
    }

    fn sessions(&self) -> Vec<Vec<String>> {
        self.log.sessions.lock().unwrap().clone()
    }
}

async fn mta_session(stream: TcpStream, script: &Script, log: &MtaLog, index: usize) {
    let (read, mut out) = stream.into_split();
    let mut reader = BufReader::new(read);
    if !script.greet {
        // Hold the connection open, silently, until the gatekeeper gives up.
        while let Ok(Line::Complete(_)) = read_line(&mut reader, 4096).await {}
        return;
    }
    let _ = out.write_all(b"220 fake.test ESMTP\r\n").await;
    let mut after_xclient = false;
    let mut pending: Option<String> = None;
    loop {
        let line = match pending.take() {
            Some(line) => line,
            None => match read_line(&mut reader, 4096).await {
                Ok(Line::Complete(bytes)) => String::from_utf8_lossy(trim_eol(&bytes)).into_owned(),
                _ => return,
            },
        };
        log.sessions.lock().unwrap()[index].push(line.clone());
        let verb = line
            .split([' ', ':'])
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        let reply: String = match verb.as_str() {
            "EHLO" => {
                let extensions = if after_xclient {
                    &script.ehlo_after_xclient
                } else {
                    &script.ehlo
                };
                let mut r = String::from("250-fake.test\r\n");
                for ext in extensions {
                    r.push_str(&format!("250-{ext}\r\n"));
                }
                r + "250 ENHANCEDSTATUSCODES\r\n"
            }
            "XCLIENT" if after_xclient && script.refuse_second_xclient => {
                "550 5.7.0 Error: insufficient authorization\r\n".into()
            }
            "XCLIENT" => {
                after_xclient = true;
                "220 fake.test ESMTP\r\n".into()
            }
            "MAIL" => {
                if let Some(hold) = script.hold_mail {
                    let next = timeout(hold, read_line(&mut reader, 4096)).await;
                    let came = matches!(next, Ok(Ok(Line::Complete(_))));
                    log.pipelined.lock().unwrap().push(came);
                    if let Ok(Ok(Line::Complete(bytes))) = next {
                        pending = Some(String::from_utf8_lossy(trim_eol(&bytes)).into_owned());
                    }
                }
                "250 2.1.0 Ok\r\n".into()
            }
            "RCPT" => match (script.rcpt)(log.rcpts.fetch_add(1, SeqCst)) {
                Step::Reply(text) => format!("{text}\r\n"),
                Step::Close => return,
            },
            "DATA" => {
                if out.write_all(b"354 go ahead\r\n").await.is_err() {
                    return;
                }
                loop {
                    match read_line(&mut reader, 4096).await {
                        Ok(Line::Complete(bytes)) if bytes == b".\r\n" => break,
                        Ok(Line::Complete(bytes)) => log.sessions.lock().unwrap()[index]
                            .push(String::from_utf8_lossy(trim_eol(&bytes)).into_owned()),
                        _ => return,
                    }
                }
                if script.close_after_message {
                    let _ = out.write_all(b"250 2.0.0 Ok: queued\r\n").await;
                    return;
                }
                "250 2.0.0 Ok: queued\r\n".into()
            }
            "BDAT" => {
                // The chunk, exactly, logged as one `CHUNK ...` entry.
                let mut words = line.split(' ').skip(1);
                let size: usize = words.next().and_then(|n| n.parse().ok()).unwrap_or(0);
                let last = words.next().is_some();
                let mut chunk = vec![0; size];
                if tokio::io::AsyncReadExt::read_exact(&mut reader, &mut chunk)
                    .await
                    .is_err()
                {
                    return;
                }
                let logged = format!("CHUNK {}", String::from_utf8_lossy(&chunk).escape_default());
                log.sessions.lock().unwrap()[index].push(logged);
                match last {
                    true => "250 2.0.0 Ok: queued\r\n".into(),
                    false => format!("250 2.0.0 Ok: {size} octets\r\n"),
                }
            }
            "QUIT" => {
                let _ = out.write_all(b"221 2.0.0 Bye\r\n").await;
                return;
            }
            "AUTH" => match fake_auth(&line, &mut reader, &mut out, log, index).await {
                Some(reply) => reply,
                None => return,
            },
            _ => "250 2.0.0 Ok\r\n".into(),
        };
        if out.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// An address nothing listens on (bound, then closed).
/// The one account the fake MTA knows: `alice` / `secret`.
const GOOD_PLAIN: &str = "AGFsaWNlAHNlY3JldA==";
const ALICE: &str = "YWxpY2U=";
const SECRET: &str = "c2VjcmV0";

/// SASL PLAIN (initial response or continuation) and LOGIN, as Postfix answers them.
async fn fake_auth(
    line: &str,
    reader: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    out: &mut tokio::net::tcp::OwnedWriteHalf,
    log: &MtaLog,
    index: usize,
) -> Option<String> {
    let mut words = line.split(' ').skip(1);
    let mechanism = words.next().unwrap_or("").to_ascii_uppercase();
    let mut responses: Vec<String> = words.next().map(str::to_owned).into_iter().collect();
    let needed = if mechanism == "LOGIN" { 2 } else { 1 };
    let prompts = ["334 VXNlcm5hbWU6\r\n", "334 UGFzc3dvcmQ6\r\n"];
    while responses.len() < needed {
        let prompt = if mechanism == "LOGIN" {
            prompts[responses.len()]
        } else {
            "334 \r\n"
        };
        out.write_all(prompt.as_bytes()).await.ok()?;
        let Ok(Line::Complete(bytes)) = read_line(reader, 20000).await else {
            return None;
        };
        let text = String::from_utf8_lossy(trim_eol(&bytes)).into_owned();
        log.sessions.lock().unwrap()[index].push(text.clone());
        if text == "*" {
            return Some("501 5.7.0 Authentication aborted\r\n".into());
        }
        responses.push(text);
    }
    let good = match mechanism.as_str() {
        "PLAIN" => responses == [GOOD_PLAIN],
        "LOGIN" => responses == [ALICE, SECRET],
        _ => false,
    };
    Some(match good {
        true => "235 2.7.0 Authentication successful\r\n".into(),
        false => "535 5.7.8 Error: authentication failed: bad credentials\r\n".into(),
    })
}

async fn nowhere() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
}

async fn send_message(c: &mut Client) -> Reply {
    assert_eq!(c.code("DATA").await, 354);
    c.send(b"Subject: test\r\n\r\nbody\r\n").await;
    c.cmd(".").await
}

fn rcpts(session: &[String]) -> Vec<&str> {
    session
        .iter()
        .filter(|l| l.starts_with("RCPT"))
        .map(String::as_str)
        .collect()
}

#[tokio::test]
async fn state_machine_sequence_errors_rset_and_helo_vs_ehlo() {
    let front = Front::start(nowhere().await, "").await;
    let mut c = front.client().await;
    assert_eq!(c.code("MAIL FROM:<a@client.test>").await, 503);
    let ehlo = c.cmd("EHLO client.test").await;
    assert_eq!(ehlo.code, 250);
    assert!(ehlo.lines.len() > 1 && ehlo.lines.contains(&"PIPELINING".to_owned()));
    assert_eq!(c.code("RCPT TO:<user@example.org>").await, 503);
    assert_eq!(c.code("DATA").await, 503);
    assert_eq!(c.code("MAIL FROM:<a@client.test>").await, 250);
    assert_eq!(
        c.code("MAIL FROM:<a@client.test>").await,
        503,
        "nested MAIL"
    );
    assert_eq!(c.code("DATA").await, 554, "DATA without recipients");
    assert_eq!(c.code("RCPT TO:<user@victim.test>").await, 554, "relay");
    assert_eq!(c.code("RSET").await, 250);
    assert_eq!(
        c.code("RCPT TO:<user@example.org>").await,
        503,
        "RSET ended it"
    );
    let helo = c.cmd("HELO client.test").await;
    assert_eq!((helo.code, helo.lines.len()), (250, 1), "{helo:?}");
    assert_eq!(c.code("MAIL FROM:<a@client.test>").await, 250);
    assert_eq!(c.code("QUIT").await, 221);
    assert!(c.is_closed().await);
}

#[tokio::test]
async fn pipelined_group_gets_its_replies_in_order() {
    let mta = Mta::start(Script::default()).await;
    let front = Front::start(mta.addr, "").await;
    let mut c = front.client().await;
    assert_eq!(c.code("EHLO client.test").await, 250);
    c.send(
        b"MAIL FROM:<a@client.test>\r\nRCPT TO:<one@example.org>\r\nRCPT TO:<x@victim.test>\r\n\
          RCPT TO:<two@example.org>\r\nDATA\r\n",
    )
    .await;
    let mut codes = Vec::new();
    for _ in 0..5 {
        codes.push(c.reply().await.unwrap().code);
    }
    assert_eq!(codes, [250, 250, 554, 250, 354]);
    c.send(b"Subject: t\r\n\r\nhi\r\n.\r\nQUIT\r\n").await;
    assert_eq!(c.reply().await.unwrap().code, 250);
    assert_eq!(c.reply().await.unwrap().code, 221);
    let sessions = mta.sessions();
    assert_eq!(
        rcpts(&sessions[0]),
        ["RCPT TO:<one@example.org>", "RCPT TO:<two@example.org>"]
    );
    assert_eq!(front.stats().messages_delivered, 1);
}

#[tokio::test]
async fn a_reload_applies_to_new_sessions_while_open_ones_keep_their_settings() {
    let mta = Mta::start(Script::default()).await;
    let front = Front::start(mta.addr, "max_connections_per_ip = 2").await;
    let mut before = front.client().await;
    before.start_transaction().await;
    let next = test_config(mta.addr, "max_connections_per_ip = 2\nmax_recipients = 1");
    let mut next = SmtpConfig {
        local_domains: vec!["example.net".into()],
        ..next
    };
    next.listen = front.ctx.config.listen.clone();
    let successor = front.ctx.successor(next, None).unwrap();
    front.publish.send_replace(Arc::new(successor));

    let mut after = front.client().await;
    after.start_transaction().await;
    // The new session has the new policy: example.org is now a relay target.
    assert_eq!(after.code("RCPT TO:<u@example.org>").await, 554);
    assert_eq!(after.code("RCPT TO:<u@example.net>").await, 250);
    // The open session goes on with the old one, limits included.
    assert_eq!(before.code("RCPT TO:<u@example.org>").await, 250);
    assert_eq!(before.code("RCPT TO:<v@example.org>").await, 250);
    assert_eq!(before.code("RCPT TO:<u@example.net>").await, 554);
    // The connection counts carried over: two open, the per-client cap is two.
    let mut third = Client::connect(front.addr).await;
    assert_eq!(third.reply().await.expect("refusal").code, 421);
    assert_eq!(send_message(&mut before).await.code, 250);
    assert_eq!(send_message(&mut after).await.code, 250);
}

#[tokio::test]
async fn max_commands_ends_the_session_with_421() {
    let front = Front::start(nowhere().await, "max_commands = 5").await;
    let mut c = front.client().await;
    for _ in 0..5 {
        assert_eq!(c.code("NOOP").await, 250);
    }
    let reply = c.cmd("NOOP").await;
    assert_eq!(reply.code, 421, "{reply:?}");
    assert!(reply.lines[0].starts_with("4.7.0 gk.test"), "{reply:?}");
    assert!(c.is_closed().await);
    assert_eq!(front.stats().command_limit_disconnects, 1);
}

#[tokio::test(start_paused = true)]
async fn max_session_time_caps_a_session_kept_busy_with_noops() {
    let front = Front::start(nowhere().await, "max_session_time = \"10m\"").await;
    let mut c = front.memory_client().await;
    let mut answered = 0;
    let mut last = None;
    // A NOOP every 59 s beats the 1-minute idle timeout, for 20 minutes.
    for _ in 0..20 {
        sleep(Duration::from_secs(59)).await;
        let reply = c.cmd("NOOP").await;
        if reply.code != 250 {
            last = Some(reply);
            break;
        }
        answered += 1;
    }
    let last = last.expect("no session time limit");
    assert_eq!(last.code, 421, "{last:?}");
    assert!(last.lines[0].starts_with("4.4.2 gk.test"), "{last:?}");
    assert_eq!(answered, 10, "NOOPs answered within 10 minutes");
    assert!(c.is_closed().await);
    let stats = front.stats();
    assert_eq!((stats.session_time_disconnects, stats.timeouts), (1, 0));
}

#[tokio::test]
async fn a_client_that_stops_reading_is_dropped_at_the_write_timeout() {
    let front = Front::start(
        nowhere().await,
        "write_timeout = \"300ms\"\nmax_commands = 100000000",
    )
    .await;
    // A small receive window and a big pipelined burst it never reads replies to.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&front.addr.into()).unwrap();
    socket.set_nonblocking(true).unwrap();
    let stream = TcpStream::from_std(socket.into()).unwrap();
    let (_read, mut write) = stream.into_split();
    let burst = tokio::spawn(async move {
        let chunk = b"HELP\r\n".repeat(10_000);
        while write.write_all(&chunk).await.is_ok() {}
    });
    timeout(GUARD, async {
        while front.stats().write_timeouts == 0 || front.ctx.gate.open() > 0 {
            sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the session kept its slot");
    // The burst's writes fail once the session dropped the connection.
    timeout(GUARD, burst).await.unwrap().unwrap();
    assert_eq!(front.stats().write_timeouts, 1);
}

#[tokio::test]
async fn client_sockets_get_tcp_user_timeout() {
    let config = test_config(nowhere().await, "write_timeout = \"90s\"");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let _client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (accepted, _) = listener.accept().await.unwrap();
    super::tune_client_socket(&accepted, &config).unwrap();
    let sock = socket2::SockRef::from(&accepted);
    assert_eq!(
        sock.tcp_user_timeout().unwrap(),
        Some(Duration::from_secs(90))
    );
    assert!(sock.tcp_nodelay().unwrap());
}

#[tokio::test]
async fn max_upstream_sessions_caps_concurrent_mta_sessions() {
    let mta = Mta::start(Script::default()).await;
    let front = Front::start(
        mta.addr,
        "max_upstream_sessions = 1\nupstream_wait = \"200ms\"",
    )
    .await;
    let mut a = front.client().await;
    let mut b = front.client().await;
    a.start_transaction().await;
    b.start_transaction().await;
    assert_eq!(a.code("RCPT TO:<one@example.org>").await, 250);
    let busy = b.cmd("RCPT TO:<two@example.org>").await;
    assert_eq!(busy.code, 451, "{busy:?}");
    assert!(busy.lines[0].starts_with("4.3.2"), "{busy:?}");
    // The slot is freed when A's transaction ends, not when A leaves.
    assert_eq!(a.code("RSET").await, 250);
    assert_eq!(b.code("RCPT TO:<two@example.org>").await, 250);
    assert_eq!(send_message(&mut b).await.code, 250);
    assert_eq!(mta.log.max_open.load(SeqCst), 1);
    assert_eq!(front.stats().upstream_busy, 1);
}

#[tokio::test]
async fn upstream_connect_timeout_bounds_a_silent_mta() {
    let mta = Mta::start(Script {
        greet: false,
        ..Script::default()
    })
    .await;
    // The reply timeout would keep the client waiting for an hour.
    let front = Front::start(
        mta.addr,
        "upstream_timeout = \"1h\"\nupstream_connect_timeout = \"200ms\"",
    )
    .await;
    let mut c = front.client().await;
    c.start_transaction().await;
    let reply = c.cmd("RCPT TO:<user@example.org>").await;
    assert_eq!(reply.code, 451, "{reply:?}");
    assert_eq!(front.stats().upstream_failures, 1);
}

#[tokio::test]
async fn recipients_the_mta_refuses_count_toward_max_errors() {
    let mta = Mta::start(Script {
        rcpt: Box::new(|_| Step::Reply("550 5.1.1 No such user")),
        ..Script::default()
    })
    .await;
    let front = Front::start(mta.addr, "max_errors = 3").await;
    let mut c = front.client().await;
    c.start_transaction().await;
    assert_eq!(c.code("RCPT TO:<a@example.org>").await, 550);
    assert_eq!(c.code("RCPT TO:<b@example.org>").await, 550);
    assert_eq!(c.code("RCPT TO:<c@example.org>").await, 550);
    let last = c.reply().await.expect("421 after the third refusal");
    assert_eq!(last.code, 421, "{last:?}");
    assert!(last.lines[0].contains("gk.test"), "{last:?}");
    assert!(c.is_closed().await);
    assert_eq!(front.stats().error_limit_disconnects, 1);
}

#[tokio::test]
async fn mta_dying_after_two_recipients_gets_the_transaction_replayed() {
    let mta = Mta::start(Script {
        rcpt: Box::new(|n| match n {
            2 => Step::Close,
            _ => Step::Reply("250 2.1.5 Ok"),
        }),
        ..Script::default()
    })
    .await;
    let front = Front::start(mta.addr, "").await;
    let mut c = front.client().await;
    c.start_transaction().await;
    for rcpt in ["a", "b", "c", "d"] {
        let reply = c.cmd(&format!("RCPT TO:<{rcpt}@example.org>")).await;
        assert_eq!(reply.code, 250, "{rcpt}: {reply:?}");
    }
    assert_eq!(send_message(&mut c).await.code, 250);
    let sessions = mta.sessions();
    let delivered = sessions.last().unwrap();
    assert_eq!(
        rcpts(delivered),
        [
            "RCPT TO:<a@example.org>",
            "RCPT TO:<b@example.org>",
            "RCPT TO:<c@example.org>",
            "RCPT TO:<d@example.org>"
        ],
        "{sessions:?}"
    );
    assert!(delivered.contains(&"MAIL FROM:<sender@client.test>".to_owned()));
    assert_eq!(front.stats().transactions_replayed, 1);
}

#[tokio::test]
async fn recipients_lost_with_the_mta_make_data_fail_temporarily() {
    // The MTA dies at the third RCPT and then refuses every recipient for a while.
    let mta = Mta::start(Script {
        rcpt: Box::new(|n| match n {
            0 | 1 => Step::Reply("250 2.1.5 Ok"),
            2 => Step::Close,
            _ => Step::Reply("451 4.3.0 try again later"),
        }),
        ..Script::default()
    })
    .await;
    let front = Front::start(mta.addr, "").await;
    let mut c = front.client().await;
    c.start_transaction().await;
    assert_eq!(c.code("RCPT TO:<a@example.org>").await, 250);
    assert_eq!(c.code("RCPT TO:<b@example.org>").await, 250);
    assert_ne!(c.code("RCPT TO:<c@example.org>").await / 100, 2);
    assert_ne!(c.code("RCPT TO:<d@example.org>").await / 100, 2);
    let data = c.cmd("DATA").await;
    assert_eq!(data.code / 100, 4, "DATA after losing a and b: {data:?}");
    assert!(
        mta.sessions()
            .iter()
            .all(|s| !s.contains(&"DATA".to_owned())),
        "{:?}",
        mta.sessions()
    );
    assert_eq!(front.stats().transactions_lost, 1);
    // The session goes on: a new transaction may start.
    assert_eq!(c.code("MAIL FROM:<sender@client.test>").await, 250);
}

#[tokio::test]
async fn a_3xx_reply_to_rcpt_is_not_an_acceptance() {
    let mta = Mta::start(Script {
        rcpt: Box::new(|_| Step::Reply("354 what?")),
        ..Script::default()
    })
    .await;
    let front = Front::start(mta.addr, "").await;
    let mut c = front.client().await;
    c.start_transaction().await;
    let reply = c.cmd("RCPT TO:<user@example.org>").await;
    assert_eq!(reply.code / 100, 4, "{reply:?}");
    assert_eq!(c.code("DATA").await, 554, "no valid recipients");
    assert_eq!(front.stats().recipients_accepted, 0);
}

#[tokio::test]
async fn pipelining_is_taken_from_the_ehlo_after_xclient() {
    const XCLIENT: &str = "XCLIENT ADDR NAME PORT PROTO HELO";
    // Offered before XCLIENT only: MAIL must wait for its reply.
    let withdrawn = Mta::start(Script {
        ehlo: vec!["PIPELINING", XCLIENT],
        ehlo_after_xclient: vec![],
        hold_mail: Some(Duration::from_millis(300)),
        ..Script::default()
    })
    .await;
    // Offered after XCLIENT only: MAIL and RCPT go together.
    let granted = Mta::start(Script {
        ehlo: vec![XCLIENT],
        ehlo_after_xclient: vec!["PIPELINING"],
        hold_mail: Some(Duration::from_secs(10)),
        ..Script::default()
    })
    .await;
    for (mta, expected) in [(&withdrawn, false), (&granted, true)] {
        let front = Front::start(mta.addr, "").await;
        let mut c = front.client().await;
        c.start_transaction().await;
        assert_eq!(c.code("RCPT TO:<user@example.org>").await, 250);
        assert_eq!(send_message(&mut c).await.code, 250);
        assert_eq!(*mta.log.pipelined.lock().unwrap(), [expected]);
    }
}

const POOL_XCLIENT: &str = "XCLIENT ADDR NAME PORT PROTO HELO";

/// An MTA offering every XCLIENT attribute, before XCLIENT only.
fn pool_script() -> Script {
    Script {
        ehlo: vec!["PIPELINING", POOL_XCLIENT],
        ehlo_after_xclient: vec!["PIPELINING"],
        ..Script::default()
    }
}

/// The fake MTA and a front end with `upstream_pool = 4` in front of it.
async fn pooled(script: Script) -> (Mta, Front) {
    let mta = Mta::start(script).await;
    let front = Front::start(mta.addr, "upstream_pool = 4\n").await;
    (mta, front)
}

/// One message from a fresh client greeting as `helo`, then QUIT.
async fn deliver_one(front: &Front, helo: &str) {
    let mut c = front.client().await;
    assert_eq!(c.code(&format!("EHLO {helo}")).await, 250);
    assert_eq!(c.code("MAIL FROM:<sender@client.test>").await, 250);
    assert_eq!(c.code("RCPT TO:<user@example.org>").await, 250);
    assert_eq!(send_message(&mut c).await.code, 250);
    assert_eq!(c.code("QUIT").await, 221);
}

#[tokio::test]
async fn a_pooled_upstream_session_is_retargeted_at_each_client_with_xclient() {
    let mta = Mta::start(Script {
        ehlo: vec!["PIPELINING", POOL_XCLIENT],
        ehlo_after_xclient: vec!["PIPELINING", POOL_XCLIENT],
        ..Script::default()
    })
    .await;
    let front = Front::start(mta.addr, "upstream_pool = 4\n").await;
    deliver_one(&front, "first.test").await;
    deliver_one(&front, "second.test").await;

    let sessions = mta.sessions();
    assert_eq!(
        sessions.len(),
        1,
        "one upstream session carried both: {sessions:?}"
    );
    let session = &sessions[0];
    let xclients: Vec<&String> = session
        .iter()
        .filter(|l| l.starts_with("XCLIENT"))
        .collect();
    assert_eq!(xclients.len(), 2, "{session:?}");
    assert!(xclients[0].contains("HELO=first.test"), "{xclients:?}");
    assert!(xclients[1].contains("HELO=second.test"), "{xclients:?}");
    for attribute in [
        "ADDR=127.0.0.1",
        "PORT=",
        "PROTO=ESMTP",
        "NAME=[UNAVAILABLE]",
    ] {
        assert!(
            xclients[1].contains(attribute),
            "{attribute} not replaced: {xclients:?}"
        );
    }
    // The second client's XCLIENT comes after the first message, then EHLO as the client did.
    let second = session.iter().position(|l| l == xclients[1]).unwrap();
    assert!(session[..second].iter().any(|l| l == "body"));
    assert_eq!(session[second + 1], "EHLO second.test");
    assert!(
        !session.iter().any(|l| l == "QUIT"),
        "the session stayed open: {session:?}"
    );
    assert_eq!(front.stats().upstream_reused, 1);
    assert_eq!(front.stats().messages_delivered, 2);
}

#[tokio::test]
async fn a_pooled_session_the_mta_closed_is_replaced_by_a_fresh_one() {
    let (mta, front) = pooled(Script {
        close_after_message: true,
        ..pool_script()
    })
    .await;
    deliver_one(&front, "first.test").await;
    deliver_one(&front, "second.test").await;
    assert_eq!(mta.sessions().len(), 2);
    assert_eq!(front.stats().upstream_reused, 0);
    assert_eq!(front.stats().messages_delivered, 2);
}

#[tokio::test]
async fn a_partial_xclient_offer_is_sent_whole_to_every_client() {
    // smtp-sink's offer: the attributes it takes are replaced for each
    // client; the others are never set, so none can carry the last client's.
    let mta = Mta::start(Script {
        ehlo: vec!["PIPELINING", "XCLIENT NAME HELO"],
        ehlo_after_xclient: vec!["PIPELINING"],
        ..Script::default()
    })
    .await;
    let front = Front::start(mta.addr, "upstream_pool = 4\n").await;
    deliver_one(&front, "first.test").await;
    deliver_one(&front, "second.test").await;
    let sessions = mta.sessions();
    assert_eq!(sessions.len(), 1);
    let xclients: Vec<&String> = sessions[0]
        .iter()
        .filter(|l| l.starts_with("XCLIENT"))
        .collect();
    assert_eq!(
        xclients,
        [
            "XCLIENT HELO=first.test NAME=[UNAVAILABLE]",
            "XCLIENT HELO=second.test NAME=[UNAVAILABLE]"
        ]
    );
    assert_eq!(front.stats().upstream_reused, 1);
}

#[tokio::test]
async fn a_session_without_xclient_is_never_pooled() {
    let mta = Mta::start(Script {
        ehlo: vec!["PIPELINING", "XFORWARD NAME ADDR PROTO HELO"],
        ..Script::default()
    })
    .await;
    let front = Front::start(mta.addr, "upstream_pool = 4\n").await;
    deliver_one(&front, "first.test").await;
    deliver_one(&front, "second.test").await;
    assert_eq!(mta.sessions().len(), 2);
    assert_eq!(front.stats().upstream_reused, 0);
}

#[tokio::test]
async fn an_mta_refusing_to_retarget_turns_the_pool_off() {
    let (mta, front) = pooled(Script {
        refuse_second_xclient: true,
        ..pool_script()
    })
    .await;
    for helo in ["first.test", "second.test", "third.test"] {
        deliver_one(&front, helo).await;
    }
    let sessions = mta.sessions();
    assert_eq!(sessions.len(), 3, "{sessions:?}");
    let xclients = sessions
        .concat()
        .into_iter()
        .filter(|l| l.starts_with("XCLIENT"))
        .count();
    assert_eq!(
        xclients, 4,
        "one refused re-target, then no more tries: {sessions:?}"
    );
    assert_eq!(front.stats().upstream_reused, 0);
    assert_eq!(front.stats().messages_delivered, 3);
}

#[tokio::test]
async fn a_session_left_mid_transaction_is_never_pooled() {
    let (mta, front) = pooled(pool_script()).await;
    let mut c = front.client().await;
    c.start_transaction().await;
    assert_eq!(c.code("RCPT TO:<user@example.org>").await, 250);
    assert_eq!(c.code("RSET").await, 250);
    assert_eq!(c.code("QUIT").await, 221);
    deliver_one(&front, "second.test").await;
    let sessions = mta.sessions();
    assert_eq!(sessions.len(), 2, "{sessions:?}");
    assert_eq!(sessions[0].last().map(String::as_str), Some("QUIT"));
    assert_eq!(front.stats().upstream_reused, 0);
}

#[tokio::test]
async fn pregreet_bans_cover_the_client_group_and_never_relay_networks() {
    let banned: Arc<Mutex<Vec<IpNet>>> = Arc::default();
    let record = banned.clone();
    let hook: PregreetHook = Arc::new(move |_client, net| record.lock().unwrap().push(net));
    for (relay, expected) in [("[]", vec!["127.0.0.1/32"]), ("[\"127.0.0.0/8\"]", vec![])] {
        banned.lock().unwrap().clear();
        let extra = format!("greet_wait = \"30s\"\nrelay_networks = {relay}");
        let front = Front::with_hook(nowhere().await, &extra, Some(hook.clone())).await;
        let mut c = Client::connect(front.addr).await;
        c.send(b"EHLO early.test\r\n").await;
        assert!(c.line().await.starts_with("220-"), "the teaser");
        assert!(c.line().await.starts_with("554 5.7.1"));
        let expected: Vec<IpNet> = expected.iter().map(|n| n.parse().unwrap()).collect();
        assert_eq!(
            *banned.lock().unwrap(),
            expected,
            "relay_networks = {relay}"
        );
    }
}

#[tokio::test]
async fn shutdown_tells_an_idle_session_421_and_serve_returns() {
    let front = Front::start(nowhere().await, "").await;
    let mut c = front.client().await;
    assert_eq!(c.code("EHLO client.test").await, 250);
    front.shutdown.cancel();
    let reply = c.reply().await.expect("a reply before closing");
    assert_eq!(reply.code, 421, "{reply:?}");
    assert!(reply.lines[0].starts_with("4.3.2"), "{reply:?}");
    assert!(
        reply.lines[0].contains("Service shutting down"),
        "{reply:?}"
    );
    assert!(c.is_closed().await);
    timeout(GUARD, front.served).await.unwrap().unwrap();
    assert!(
        TcpStream::connect(front.addr).await.is_err(),
        "still accepting"
    );
    assert_eq!(front.ctx.stats.report().shutdown_disconnects, 1);
}

#[tokio::test]
async fn shutdown_lets_a_message_in_flight_finish_first() {
    let mta = Mta::start(Script::default()).await;
    let front = Front::start(mta.addr, "").await;
    let mut c = front.client().await;
    c.start_transaction().await;
    assert_eq!(c.code("RCPT TO:<user@example.org>").await, 250);
    assert_eq!(c.code("DATA").await, 354);
    c.send(b"Subject: in flight\r\n\r\n").await;
    front.shutdown.cancel();
    sleep(Duration::from_millis(50)).await;
    c.send(b"body\r\n").await;
    let done = c.cmd(".").await;
    assert_eq!(done.code, 250, "the MTA's answer first: {done:?}");
    let bye = c.reply().await.expect("421 after the message");
    assert_eq!(bye.code, 421, "{bye:?}");
    assert!(bye.lines[0].starts_with("4.3.2"), "{bye:?}");
    assert!(c.is_closed().await);
    timeout(GUARD, front.served).await.unwrap().unwrap();
    assert!(mta.sessions()[0].contains(&"body".to_owned()));
}

#[tokio::test]
async fn sessions_left_at_the_drain_deadline_are_dropped() {
    let mta = Mta::start(Script::default()).await;
    let front = Front::start(mta.addr, "drain_timeout = \"300ms\"\ndata_timeout = \"1h\"").await;
    let mut c = front.client().await;
    c.start_transaction().await;
    assert_eq!(c.code("RCPT TO:<user@example.org>").await, 250);
    assert_eq!(c.code("DATA").await, 354);
    front.shutdown.cancel();
    timeout(GUARD, front.served)
        .await
        .expect("serve outlived the drain deadline")
        .unwrap();
    assert!(c.is_closed().await);
    assert_eq!(front.ctx.gate.open(), 0);
}

/// A context with `proxy_protocol_from = 198.51.100.0/24` (also a relay
/// network, as a balancer's address often is), a screen refusing 203.0.113.66,
/// and the screened addresses recorded.
fn proxy_context(
    upstream: SocketAddr,
    extra: &str,
    hook: Option<PregreetHook>,
) -> (Arc<SmtpContext>, Arc<Mutex<Vec<std::net::IpAddr>>>) {
    let extra = format!(
        "proxy_protocol_from = [\"198.51.100.0/24\"]\nrelay_networks = [\"198.51.100.0/24\"]\n{extra}"
    );
    let config = test_config(upstream, &extra);
    let mut ctx = SmtpContext::new(config, Arc::new(SmtpStats::default()), hook).unwrap();
    ctx.learn_extensions(super::upstream::Extensions::default());
    let screened: Arc<Mutex<Vec<std::net::IpAddr>>> = Arc::default();
    let record = screened.clone();
    ctx.screen = Some(Arc::new(move |client| {
        record.lock().unwrap().push(client);
        Box::pin(async move {
            if client == "203.0.113.66".parse::<std::net::IpAddr>().unwrap() {
                super::Screening::Refuse(super::ScreenRefusal::Denylisted(
                    "554 5.7.1 denylisted".into(),
                ))
            } else {
                super::Screening::Pass
            }
        })
    }));
    (Arc::new(ctx), screened)
}

/// An in-memory connection from `peer` that first sends `first`.
async fn connect_from(ctx: &Arc<SmtpContext>, peer: &str, first: &[u8]) -> Client {
    let (ours, theirs) = tokio::io::duplex(64 << 10);
    tokio::spawn(super::run_connection(
        Box::new(theirs),
        peer.parse().unwrap(),
        None,
        ctx.clone(),
        CancellationToken::new(),
    ));
    let mut client = Client::over(ours);
    client.send(first).await;
    client
}

fn v1_header(client: &str) -> Vec<u8> {
    format!("PROXY TCP4 {client} 198.51.100.1 40000 25\r\n").into_bytes()
}

fn v2_header(client: &str) -> Vec<u8> {
    use ppp::v2;
    let src: SocketAddr = format!("{client}:40000").parse().unwrap();
    let dst: SocketAddr = "198.51.100.1:25".parse().unwrap();
    v2::Builder::with_addresses(
        v2::Version::Two | v2::Command::Proxy,
        v2::Protocol::Stream,
        (src, dst),
    )
    .build()
    .unwrap()
}

#[tokio::test]
async fn proxy_header_client_is_what_the_screen_relay_policy_and_xclient_see() {
    let mta = Mta::start(Script {
        ehlo: vec!["XCLIENT ADDR NAME PORT PROTO HELO"],
        ..Script::default()
    })
    .await;
    let (ctx, screened) = proxy_context(mta.addr, "", None);
    for (i, header) in [v1_header("203.0.113.9"), v2_header("203.0.113.10")]
        .into_iter()
        .enumerate()
    {
        let mut c = connect_from(&ctx, "198.51.100.1:50000", &header).await;
        assert_eq!(c.reply().await.expect("banner").code, 220);
        c.start_transaction().await;
        // The balancer may relay; the client it names may not.
        let relay = c.cmd("RCPT TO:<user@elsewhere.test>").await;
        assert_eq!(relay.code, 554, "{relay:?}");
        assert_eq!(c.code("RCPT TO:<user@example.org>").await, 250);
        assert_eq!(send_message(&mut c).await.code, 250);
        let client = format!("203.0.113.{}", 9 + i);
        // The second client may ride the first one's pooled session, re-targeted.
        let xclients: Vec<String> = mta
            .sessions()
            .concat()
            .into_iter()
            .filter(|l| l.starts_with("XCLIENT"))
            .collect();
        let xclient = &xclients[i];
        assert!(
            xclient.starts_with(&format!("XCLIENT ADDR={client} ")),
            "{xclient}"
        );
    }
    assert_eq!(
        *screened.lock().unwrap(),
        [
            "203.0.113.9".parse::<std::net::IpAddr>().unwrap(),
            "203.0.113.10".parse().unwrap()
        ]
    );
    // A denylisted client is refused though the balancer is clean.
    let mut c = connect_from(&ctx, "198.51.100.1:50001", &v1_header("203.0.113.66")).await;
    assert_eq!(c.reply().await.expect("refusal").code, 554);
    assert!(c.is_closed().await);
    assert_eq!(ctx.stats.report().refused_denylisted, 1);
}

#[tokio::test(start_paused = true)]
async fn trusted_peers_without_a_good_header_are_closed_without_a_banner() {
    let (ctx, screened) = proxy_context(nowhere().await, "", None);
    let local = {
        use ppp::v2;
        v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Local,
            v2::Protocol::Stream,
            v2::Addresses::Unspecified,
        )
        .build()
        .unwrap()
    };
    for first in [
        &b"EHLO direct.test\r\n"[..],
        b"PROXY TCP4 203.0.113.9 198.51.100.1 40000 25\n",
        b"PROXY TCP4 203.0.113.9 198.51.100.1 40000\r\n",
        b"", // silent: closed at proxy_protocol_timeout
    ] {
        let mut c = connect_from(&ctx, "198.51.100.1:50000", first).await;
        assert!(c.is_closed().await, "{:?}", String::from_utf8_lossy(first));
    }
    // Health checks (LOCAL, UNKNOWN) are closed too, counted apart.
    for first in [&local[..], b"PROXY UNKNOWN\r\n"] {
        let mut c = connect_from(&ctx, "198.51.100.1:50000", first).await;
        assert!(c.is_closed().await);
    }
    let stats = ctx.stats.report();
    assert_eq!(stats.proxy_header_invalid, 4);
    assert_eq!(stats.proxy_local_closed, 2);
    assert!(screened.lock().unwrap().is_empty(), "nobody was screened");
}

#[tokio::test(start_paused = true)]
async fn a_header_from_an_untrusted_client_is_refused_not_obeyed() {
    let banned: Arc<Mutex<Vec<IpNet>>> = Arc::default();
    let record = banned.clone();
    let hook: PregreetHook = Arc::new(move |_client, net| record.lock().unwrap().push(net));
    for extra in ["", "greet_wait = \"5s\""] {
        let (ctx, screened) = proxy_context(nowhere().await, extra, Some(hook.clone()));
        for header in [v1_header("198.51.100.9"), v2_header("198.51.100.9")] {
            let mut c = connect_from(&ctx, "192.0.2.7:40000", &header).await;
            let line = c.line().await;
            assert!(line.starts_with("220"), "{line}");
            let line = c.line().await;
            assert!(line.starts_with("554 5.7.1"), "{extra}: {line}");
            assert!(c.is_closed().await);
        }
        assert_eq!(ctx.stats.report().proxy_header_untrusted, 2, "{extra}");
        let ip: std::net::IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(*screened.lock().unwrap(), [ip, ip]);
    }
    assert!(banned.lock().unwrap().is_empty(), "refused, not banned");
}

#[tokio::test(start_paused = true)]
async fn after_the_header_limits_and_pregreet_bans_judge_the_real_client() {
    let banned: Arc<Mutex<Vec<IpNet>>> = Arc::default();
    let record = banned.clone();
    let hook: PregreetHook = Arc::new(move |_client, net| record.lock().unwrap().push(net));
    let extra = "greet_wait = \"5s\"\nmax_connections_per_ip = 1";
    let (ctx, _) = proxy_context(nowhere().await, extra, Some(hook));
    // SMTP sent with the header is left for the pre-greet check: the real client is banned.
    let mut early = v2_header("203.0.113.9");
    early.extend_from_slice(b"EHLO early.test\r\n");
    let mut c = connect_from(&ctx, "198.51.100.1:50000", &early).await;
    assert!(c.line().await.starts_with("220-"));
    assert!(c.line().await.starts_with("554 5.7.1"));
    assert!(c.is_closed().await);
    assert_eq!(
        *banned.lock().unwrap(),
        ["203.0.113.9/32".parse::<IpNet>().unwrap()]
    );
    // One connection per client, however many share the balancer.
    let mut a = connect_from(&ctx, "198.51.100.1:50001", &v1_header("203.0.113.20")).await;
    let mut b = connect_from(&ctx, "198.51.100.1:50002", &v1_header("203.0.113.21")).await;
    assert!(a.line().await.starts_with("220-"));
    assert!(b.line().await.starts_with("220-"));
    let mut again = connect_from(&ctx, "198.51.100.1:50003", &v1_header("203.0.113.20")).await;
    assert!(again.line().await.starts_with("421 4.7.0"));
}

/// The daemon's ledgers as a session sees them, with a clock the test sets.
#[derive(Default)]
struct FakeMemory {
    granted: Mutex<Vec<std::net::IpAddr>>,
    abuse: Mutex<Vec<(IpNet, AbuseKind)>>,
    greylist: Option<Mutex<Greylist>>,
    now: std::sync::atomic::AtomicU64,
}

impl FakeMemory {
    fn with_greylist() -> FakeMemory {
        FakeMemory {
            greylist: Some(Mutex::new(Greylist::new(
                GreylistConfig {
                    enabled: true,
                    ..GreylistConfig::default()
                },
                Default::default(),
                0,
            ))),
            ..FakeMemory::default()
        }
    }

    fn abuse(&self) -> Vec<AbuseKind> {
        self.abuse.lock().unwrap().iter().map(|(_, k)| *k).collect()
    }
}

impl super::ClientMemory for FakeMemory {
    fn relay_granted(&self, client: std::net::IpAddr) -> bool {
        self.granted.lock().unwrap().contains(&client)
    }

    fn abuse(&self, _client: std::net::IpAddr, group: IpNet, kind: AbuseKind) {
        self.abuse.lock().unwrap().push((group, kind));
    }

    fn greylist(
        &self,
        client: std::net::IpAddr,
        sender: &str,
        recipient: &str,
    ) -> Option<(GreyVerdict, Checked)> {
        let now = self.now.load(SeqCst);
        Some(
            self.greylist
                .as_ref()?
                .lock()
                .unwrap()
                .check(client, sender, recipient, now),
        )
    }
}

fn auth_mta() -> Script {
    Script {
        ehlo: vec![
            "PIPELINING",
            "XCLIENT ADDR NAME HELO PROTO",
            "AUTH PLAIN LOGIN",
        ],
        ehlo_after_xclient: vec!["PIPELINING", "AUTH PLAIN LOGIN SCRAM-SHA-256-PLUS"],
        ..Script::default()
    }
}

const AUTH_PLAINTEXT_OK: &str = "auth = \"upstream\"\nauth_require_tls = false\n";

#[tokio::test]
async fn auth_is_passed_through_and_relay_rides_the_same_upstream_session() {
    let mta = Mta::start(auth_mta()).await;
    let memory = Arc::new(FakeMemory::default());
    let front = Front::with_memory(mta.addr, AUTH_PLAINTEXT_OK, memory.clone()).await;
    let mut c = front.client().await;
    let ehlo = c.cmd("EHLO client.test").await;
    // The MTA's mechanisms, less the channel-binding one that cannot cross us.
    assert!(
        ehlo.lines.contains(&"AUTH PLAIN LOGIN".to_owned()),
        "{ehlo:?}"
    );
    assert_eq!(c.code("MAIL FROM:<alice@client.test>").await, 250);
    assert_eq!(c.code("RCPT TO:<friend@victim.test>").await, 554);
    assert_eq!(c.code("RSET").await, 250);
    assert_eq!(c.code("AUTH PLAIN bm90LXRoaXM=").await, 535);
    assert_eq!(c.code(&format!("AUTH PLAIN {GOOD_PLAIN}")).await, 235);
    assert_eq!(c.code("AUTH PLAIN x").await, 501, "a syntax error first");
    assert_eq!(c.code(&format!("AUTH PLAIN {GOOD_PLAIN}")).await, 503);
    for round in 0..2 {
        assert_eq!(c.code("MAIL FROM:<alice@client.test>").await, 250);
        assert_eq!(
            c.code("RCPT TO:<friend@victim.test>").await,
            250,
            "round {round}"
        );
        assert_eq!(send_message(&mut c).await.code, 250);
    }
    assert_eq!(c.code("QUIT").await, 221);
    assert!(c.is_closed().await);
    let stats = front.stats();
    assert_eq!((stats.auth_successes, stats.auth_failures), (1, 1));
    assert_eq!(stats.relay_by_auth, 2);
    // The session that authenticated carried both transactions.
    let sessions = mta.sessions();
    let authed: Vec<&Vec<String>> = sessions
        .iter()
        .filter(|s| s.iter().any(|l| l == &format!("AUTH PLAIN {GOOD_PLAIN}")))
        .collect();
    assert_eq!(authed.len(), 1, "{sessions:?}");
    assert_eq!(rcpts(authed[0]), ["RCPT TO:<friend@victim.test>"; 2]);
    assert!(authed[0][0].starts_with("EHLO"), "{:?}", authed[0]);
    assert!(
        authed[0][1].starts_with("XCLIENT ADDR=127.0.0.1"),
        "{:?}",
        authed[0]
    );
    // The failed attempt counts towards a ban; the rest came before it or after AUTH.
    assert_eq!(
        memory.abuse(),
        [AbuseKind::RelayAttempt, AbuseKind::AuthFailure]
    );
}

#[tokio::test]
async fn auth_login_continuations_cancel_and_garbage() {
    let mta = Mta::start(auth_mta()).await;
    let front = Front::start(mta.addr, AUTH_PLAINTEXT_OK).await;
    let mut c = front.client().await;
    assert_eq!(c.code("EHLO client.test").await, 250);
    let prompt = c.cmd("AUTH LOGIN").await;
    assert_eq!(
        (prompt.code, prompt.lines[0].as_str()),
        (334, "VXNlcm5hbWU6")
    );
    assert_eq!(c.code(ALICE).await, 334);
    assert_eq!(c.code(SECRET).await, 235);
    assert_eq!(c.code("MAIL FROM:<alice@client.test>").await, 250);
    assert_eq!(c.code("RCPT TO:<friend@victim.test>").await, 250);

    let mut c = front.client().await;
    assert_eq!(c.code("EHLO client.test").await, 250);
    assert_eq!(c.code("AUTH LOGIN").await, 334);
    assert_eq!(c.code("*").await, 501, "cancelled by the client");
    assert_eq!(c.code("AUTH LOGIN").await, 334);
    assert_eq!(
        c.code("MAIL FROM:<smuggled@x.test>").await,
        501,
        "not base64"
    );
    assert_eq!(c.code("AUTH CRAM-MD5").await, 504, "not offered by the MTA");
    assert_eq!(c.code("MAIL FROM:<a@client.test>").await, 250);
    assert_eq!(c.code("RCPT TO:<friend@victim.test>").await, 554);
    // The non-base64 line never reached the MTA.
    assert!(!mta
        .sessions()
        .concat()
        .iter()
        .any(|l| l.contains("smuggled")));
    let stats = front.stats();
    assert_eq!(stats.auth_successes, 1);
    assert_eq!(stats.auth_refused, 1);
}

#[tokio::test]
async fn auth_off_or_before_ehlo_is_refused_and_never_advertised() {
    let mta = Mta::start(auth_mta()).await;
    let front = Front::start(mta.addr, "").await;
    let mut c = front.client().await;
    let ehlo = c.cmd("EHLO client.test").await;
    assert!(
        !ehlo.lines.iter().any(|l| l.starts_with("AUTH")),
        "{ehlo:?}"
    );
    assert_eq!(c.code(&format!("AUTH PLAIN {GOOD_PLAIN}")).await, 503);
    let front = Front::start(mta.addr, AUTH_PLAINTEXT_OK).await;
    let mut c = front.client().await;
    assert_eq!(c.code("HELO client.test").await, 250);
    assert_eq!(c.code(&format!("AUTH PLAIN {GOOD_PLAIN}")).await, 503);
    assert!(!mta
        .sessions()
        .concat()
        .iter()
        .any(|l| l.starts_with("AUTH")));
}

#[tokio::test]
async fn relay_grants_let_an_address_relay_and_are_not_greylisted() {
    let mta = Mta::start(Script::default()).await;
    let memory = Arc::new(FakeMemory::with_greylist());
    let front = Front::with_memory(mta.addr, "", memory.clone()).await;
    let mut c = front.client().await;
    c.start_transaction().await;
    assert_eq!(c.code("RCPT TO:<friend@victim.test>").await, 554);
    memory
        .granted
        .lock()
        .unwrap()
        .push("127.0.0.1".parse().unwrap());
    assert_eq!(c.code("RCPT TO:<friend@victim.test>").await, 250);
    assert_eq!(c.code("RCPT TO:<user@example.org>").await, 250);
    assert_eq!(front.stats().relay_by_grant, 1);
    assert_eq!(front.stats().greylist_deferred, 0);
    // The refused attempt was counted while the address had no grant.
    assert_eq!(memory.abuse(), [AbuseKind::RelayAttempt]);
}

#[tokio::test]
async fn greylisting_defers_the_first_attempt_and_passes_a_timely_retry() {
    let mta = Mta::start(Script::default()).await;
    let memory = Arc::new(FakeMemory::with_greylist());
    let front = Front::with_memory(mta.addr, "", memory.clone()).await;
    let mut c = front.client().await;
    c.start_transaction().await;
    let reply = c.cmd("RCPT TO:<user@example.org>").await;
    assert_eq!(reply.code, 451, "{reply:?}");
    assert!(reply.lines[0].starts_with("4.7.1 "), "{reply:?}");
    assert!(reply.lines[0].contains("300 seconds"), "{reply:?}");
    memory.now.store(100, SeqCst);
    assert_eq!(c.code("RCPT TO:<user@example.org>").await, 451, "too early");
    memory.now.store(301, SeqCst);
    assert_eq!(c.code("RCPT TO:<user@example.org>").await, 250);
    // Now the network is known: another triplet passes at once.
    assert_eq!(c.code("RCPT TO:<other@example.org>").await, 250);
    let stats = front.stats();
    assert_eq!(
        (
            stats.greylist_deferred,
            stats.greylist_passed,
            stats.greylist_known
        ),
        (2, 1, 1)
    );
    // Deferrals are not errors: nothing counted towards max_errors or bans.
    assert!(memory.abuse().is_empty());
    assert_eq!(rcpts(&mta.sessions()[0]).len(), 2);
}

#[tokio::test]
async fn helo_claiming_to_be_us_is_refused_from_outside_only() {
    let mta = Mta::start(Script::default()).await;
    let memory = Arc::new(FakeMemory::default());
    let front = Front::with_memory(mta.addr, "helo_require_fqdn = true", memory.clone()).await;
    let mut c = front.client().await;
    for (helo, code) in [
        ("EHLO gk.test", 550),
        ("HELO GK.TEST.", 550),
        ("EHLO example.org", 550),
        ("EHLO [127.0.0.1]", 550),
        ("EHLO localhost", 504),
        ("EHLO bad..name", 501),
    ] {
        let reply = c.cmd(helo).await;
        assert_eq!(reply.code, code, "{helo}: {reply:?}");
    }
    assert_eq!(
        c.code("MAIL FROM:<a@client.test>").await,
        503,
        "no greeting was accepted"
    );
    assert_eq!(c.code("EHLO client.test").await, 250);
    let stats = front.stats();
    assert_eq!(
        (stats.helo_refused_claims_us, stats.helo_refused_not_fqdn),
        (4, 1)
    );
    assert_eq!(memory.abuse().len(), 7);
    // A relay client may call itself what it likes (a local submission host).
    let front = Front::start(
        mta.addr,
        "relay_networks = [\"127.0.0.0/8\"]\nhelo_require_fqdn = true",
    )
    .await;
    let mut c = front.client().await;
    assert_eq!(c.code("EHLO gk.test").await, 250);
    assert_eq!(c.code("HELO localhost").await, 250);
}

#[tokio::test]
async fn denied_sender_domains_are_refused_at_mail() {
    let mta = Mta::start(Script::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("denied");
    std::fs::write(&file, "# from a file\nfile.test\n").unwrap();
    let extra = format!(
        "denied_sender_domains = [\"spam.test\", \".bulk.test\"]\ndenied_sender_domains_file = \"{}\"",
        file.display()
    );
    let front = Front::start(mta.addr, &extra).await;
    let mut c = front.client().await;
    assert_eq!(c.code("EHLO client.test").await, 250);
    for (from, code) in [
        ("<a@spam.test>", 554),
        ("<a@SPAM.TEST.>", 554),
        ("<a@x.bulk.test>", 554),
        ("<a@file.test>", 554),
        ("<a@bulk.test>", 250),
    ] {
        let reply = c.cmd(&format!("MAIL FROM:{from}")).await;
        assert_eq!(reply.code, code, "{from}: {reply:?}");
        if code == 554 {
            assert!(reply.lines[0].starts_with("5.7.1 "), "{reply:?}");
        }
    }
    assert_eq!(c.code("RSET").await, 250);
    assert_eq!(
        c.code("MAIL FROM:<>").await,
        250,
        "bounces are never denied"
    );
    assert_eq!(front.stats().sender_denied, 4);
}

#[tokio::test]
async fn abuse_events_name_their_kind_and_spare_relay_clients() {
    let mta = Mta::start(Script {
        rcpt: Box::new(|_| Step::Reply("550 5.1.1 unknown user")),
        ..Script::default()
    })
    .await;
    let memory = Arc::new(FakeMemory::default());
    let front = Front::with_memory(mta.addr, "", memory.clone()).await;
    let mut c = front.client().await;
    assert_eq!(c.code("MAIL FROM:<a@client.test>").await, 503);
    assert_eq!(c.code("BOGUS").await, 500);
    c.start_transaction().await;
    assert_eq!(c.code("RCPT TO:<nobody@example.org>").await, 550);
    assert_eq!(c.code("RCPT TO:<a%b@example.org>").await, 554);
    assert_eq!(
        memory.abuse(),
        [
            AbuseKind::ProtocolError,
            AbuseKind::ProtocolError,
            AbuseKind::RcptRefused,
            AbuseKind::RelayAttempt
        ]
    );
    let groups: Vec<IpNet> = memory
        .abuse
        .lock()
        .unwrap()
        .iter()
        .map(|(g, _)| *g)
        .collect();
    assert!(groups
        .iter()
        .all(|g| *g == "127.0.0.1/32".parse::<IpNet>().unwrap()));
    let spared = Arc::new(FakeMemory::default());
    let front = Front::with_memory(
        mta.addr,
        "relay_networks = [\"127.0.0.0/8\"]",
        spared.clone(),
    )
    .await;
    let mut c = front.client().await;
    assert_eq!(c.code("BOGUS").await, 500);
    c.start_transaction().await;
    assert_eq!(c.code("RCPT TO:<nobody@example.org>").await, 550);
    assert!(spared.abuse().is_empty());
}

#[tokio::test]
async fn dsn_is_offered_and_rebuilt_only_when_the_mta_offers_it() {
    let mta = Mta::start(Script {
        ehlo: vec!["PIPELINING", "DSN"],
        ..Script::default()
    })
    .await;
    let front = Front::learning(mta.addr, "").await;
    let mut c = front.client().await;
    let ehlo = c.cmd("EHLO client.test").await;
    assert!(ehlo.lines.contains(&"DSN".to_owned()), "{ehlo:?}");
    assert_eq!(
        c.code("MAIL FROM:<a@client.test> ret=hdrs ENVID=QQ+2B1")
            .await,
        250
    );
    // ORCPT names an original recipient, never a destination.
    assert_eq!(
        c.code("RCPT TO:<x@elsewhere.test> ORCPT=rfc822;bob+40example.org")
            .await,
        554
    );
    assert_eq!(
        c.code("RCPT TO:<bob@example.org> NOTIFY=failure,success ORCPT=rfc822;Bob+40example.org")
            .await,
        250
    );
    assert_eq!(
        c.code("RCPT TO:<carol@example.org> NOTIFY=SUCCESS+0D")
            .await,
        501
    );
    assert_eq!(send_message(&mut c).await.code, 250);
    let session = transaction_session(&mta);
    assert!(
        session.contains(&"MAIL FROM:<a@client.test> RET=HDRS ENVID=QQ+2B1".to_owned()),
        "{session:?}"
    );
    assert_eq!(
        rcpts(&session),
        // A client that may not relay gets no success reports (its MAIL FROM
        // may be forged).
        ["RCPT TO:<bob@example.org> NOTIFY=FAILURE ORCPT=rfc822;Bob@example.org"]
    );

    // An MTA without DSN: not offered, and refused as before.
    let plain = Mta::start(Script::default()).await;
    let front = Front::learning(plain.addr, "").await;
    let mut c = front.client().await;
    let ehlo = c.cmd("EHLO client.test").await;
    assert!(!ehlo.lines.contains(&"DSN".to_owned()), "{ehlo:?}");
    assert_eq!(c.code("MAIL FROM:<a@client.test> RET=FULL").await, 555);
    assert_eq!(c.code("MAIL FROM:<a@client.test>").await, 250);
    assert_eq!(c.code("RCPT TO:<bob@example.org> NOTIFY=NEVER").await, 555);
}

#[tokio::test]
async fn a_tls_handshake_or_binary_on_the_plaintext_port_is_answered_once_and_closed() {
    let mta = Mta::start(Script::default()).await;
    let front = Front::start(mta.addr, "").await;
    for hello in [
        &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..],
        b"\xff\xfb\x01\r\n",
    ] {
        let mut c = front.client().await;
        c.send(hello).await;
        let reply = c.reply().await.expect("one answer");
        assert_eq!(reply.code, 554, "{reply:?}");
        assert!(c.is_closed().await);
    }
    assert_eq!(front.stats().not_smtp_disconnects, 2);
    // A SIZE refused at MAIL counts as oversize.
    let mut c = front.client().await;
    c.cmd("EHLO client.test").await;
    assert_eq!(
        c.code("MAIL FROM:<a@client.test> SIZE=999999999999").await,
        552
    );
    assert_eq!(front.stats().oversize_refused, 1);
}

#[tokio::test]
async fn utf8_addresses_pass_only_in_an_smtputf8_transaction_and_are_judged_as_a_labels() {
    let mta = Mta::start(Script {
        ehlo: vec!["PIPELINING", "SMTPUTF8"],
        ..Script::default()
    })
    .await;
    let front = Front::learning(mta.addr, "local_domains = [\"exämple.org\"]").await;
    let mut c = front.client().await;
    let ehlo = c.cmd("EHLO client.test").await;
    assert!(ehlo.lines.contains(&"SMTPUTF8".to_owned()), "{ehlo:?}");
    assert_eq!(c.code("MAIL FROM:<jöran@client.test>").await, 553);
    assert_eq!(c.code("MAIL FROM:<jöran@client.test> SMTPUTF8").await, 250);
    assert_eq!(c.code("RCPT TO:<björn@exämple.org>").await, 250);
    assert_eq!(c.code("RCPT TO:<bob@XN--EXMPLE-CUA.org>").await, 250);
    for (rcpt, code) in [
        ("<x@ex\u{430}mple.org>", 501),           // Cyrillic а among Latin
        ("<x@ｅｘäｍｐｌｅ.org>", 501),           // full-width letters
        ("<x＠victim.test@exämple.org>", 501),    // a full-width @
        ("<x%victim.test@exämple.org>", 554),     // the percent hack, in UTF-8 too
        ("<\"x@victim.test\"@exämple.org>", 554), // a quoted @
        ("<björn@exämple.org.victim.test>", 554), // a lookalike
        ("<x@exämple。org>", 501),                // an ideographic full stop
    ] {
        assert_eq!(c.code(&format!("RCPT TO:{rcpt}")).await, code, "{rcpt}");
    }
    assert_eq!(send_message(&mut c).await.code, 250);
    let session = transaction_session(&mta);
    assert!(
        session.contains(&"MAIL FROM:<jöran@client.test> SMTPUTF8".to_owned()),
        "{session:?}"
    );
    assert_eq!(
        rcpts(&session),
        [
            "RCPT TO:<björn@exämple.org>",
            "RCPT TO:<bob@xn--exmple-cua.org>"
        ]
    );

    // Not offered by the MTA: not offered here, and UTF-8 stays refused.
    let plain = Mta::start(Script::default()).await;
    let front = Front::learning(plain.addr, "").await;
    let mut c = front.client().await;
    let ehlo = c.cmd("EHLO client.test").await;
    assert!(!ehlo.lines.contains(&"SMTPUTF8".to_owned()), "{ehlo:?}");
    assert_eq!(c.code("MAIL FROM:<a@client.test> SMTPUTF8").await, 555);
    assert_eq!(c.code("MAIL FROM:<a@client.test>").await, 250);
    assert_eq!(c.code("RCPT TO:<björn@example.org>").await, 553);
    assert_eq!(c.code("VRFY jöran").await, 501, "UTF-8 is for paths only");
}

/// The entries of the session that carried a transaction.
fn transaction_session(mta: &Mta) -> Vec<String> {
    mta.sessions()
        .into_iter()
        .find(|s| s.iter().any(|l| l.starts_with("MAIL")))
        .expect("a transaction upstream")
}

async fn chunking_front(extra: &str) -> (Mta, Front) {
    let mta = Mta::start(Script {
        ehlo: vec!["PIPELINING", "CHUNKING"],
        ..Script::default()
    })
    .await;
    let front = Front::learning(mta.addr, extra).await;
    (mta, front)
}

async fn chunked_transaction(front: &Front) -> Client {
    let mut c = front.client().await;
    let ehlo = c.cmd("EHLO client.test").await;
    assert!(ehlo.lines.contains(&"CHUNKING".to_owned()), "{ehlo:?}");
    assert_eq!(c.code("MAIL FROM:<a@client.test>").await, 250);
    assert_eq!(c.code("RCPT TO:<bob@example.org>").await, 250);
    c
}

#[tokio::test]
async fn bdat_chunks_reach_the_mta_as_the_same_chunks_and_are_never_commands() {
    let (mta, front) = chunking_front("").await;
    let mut c = chunked_transaction(&front).await;
    // Pipelined; the first chunk ends between CR and LF, and a chunk's
    // content that looks like commands is content.
    let first = "Subject: x\r";
    let second = "\nRCPT TO:<victim@elsewhere.test>\r\n.\r\nQUIT\r\n";
    c.send(
        format!(
            "BDAT {}\r\n{first}BDAT {} LAST\r\n{second}",
            first.len(),
            second.len()
        )
        .as_bytes(),
    )
    .await;
    let one = c.reply().await.unwrap();
    assert_eq!(
        (one.code, one.lines[0].as_str()),
        (250, "2.0.0 Ok: 11 octets received")
    );
    let queued = c.reply().await.unwrap();
    assert_eq!(queued.code, 250, "{queued:?}");
    assert!(
        queued.lines[0].contains("queued"),
        "the MTA's own reply: {queued:?}"
    );
    assert_eq!(c.code("NOOP").await, 250, "the session goes on");
    let session = transaction_session(&mta);
    let tail: Vec<&str> = session
        .iter()
        .skip_while(|l| !l.starts_with("BDAT"))
        .map(String::as_str)
        .collect();
    assert_eq!(
        tail,
        [
            "BDAT 11",
            "CHUNK Subject: x\\r",
            "BDAT 43 LAST",
            "CHUNK \\nRCPT TO:<victim@elsewhere.test>\\r\\n.\\r\\nQUIT\\r\\n",
            "QUIT",
        ]
    );
    assert_eq!(rcpts(&session), ["RCPT TO:<bob@example.org>"]);
    assert_eq!(front.stats().messages_delivered, 1);

    // No recipient joins a message already begun (it would be replayed
    // on a fresh MTA session without the chunks sent so far).
    let mut c = chunked_transaction(&front).await;
    assert_eq!(c.chunk("Hi\r\n", false).await.code, 250);
    assert_eq!(c.code("RCPT TO:<carol@example.org>").await, 503);
    assert_eq!(c.chunk("", true).await.code, 250);
    assert_eq!(front.stats().messages_delivered, 2);

    // DATA cannot finish a chunked message; BDAT 0 LAST can.
    let mut c = chunked_transaction(&front).await;
    assert_eq!(c.chunk("Hi\r\n", false).await.code, 250);
    assert_eq!(c.code("DATA").await, 503);
    assert_eq!(c.chunk("", true).await.code, 250);
    assert_eq!(front.stats().messages_delivered, 3);
}

#[tokio::test]
async fn a_bare_line_end_in_a_chunk_fails_the_message_before_the_mta_has_it_all() {
    let (mta, front) = chunking_front("").await;
    for body in [
        "Subject: x\r\n\r\nhello\n.\nMAIL FROM:<x@y.test>\r\n",
        "ends in a bare cr\r",
    ] {
        let mut c = chunked_transaction(&front).await;
        c.send(format!("BDAT {} LAST\r\n{body}", body.len()).as_bytes())
            .await;
        let refused = c.reply().await.unwrap();
        assert_eq!(refused.code, 554, "{body:?}: {refused:?}");
        assert!(refused.lines[0].starts_with("5.5.2"), "{refused:?}");
        // The chunk's end was known: the session goes on, the message does not.
        assert_eq!(c.code("RSET").await, 250);
        assert_eq!(c.code("MAIL FROM:<a@client.test>").await, 250);
    }
    sleep(Duration::from_millis(50)).await;
    let chunks: Vec<String> = mta
        .sessions()
        .concat()
        .into_iter()
        .filter(|l| l.starts_with("CHUNK"))
        .collect();
    assert!(
        chunks.is_empty(),
        "the MTA never had a whole chunk: {chunks:?}"
    );
    let stats = front.stats();
    assert_eq!((stats.smuggling_refused, stats.messages_delivered), (2, 0));
}

#[tokio::test]
async fn refused_chunks_are_read_to_their_end_and_limits_hold() {
    let (mta, front) = chunking_front("max_message_size = 2048\n").await;
    // Without MAIL: refused, and the QUIT inside the chunk is not obeyed.
    let mut c = front.client().await;
    assert_eq!(c.code("EHLO client.test").await, 250);
    assert_eq!(c.chunk("QUIT\r\n", false).await.code, 503);
    assert_eq!(c.code("NOOP").await, 250);

    // Over the size limit across chunks: that chunk is refused unread by
    // the MTA, later ones until RSET, and the session goes on.
    let mut c = chunked_transaction(&front).await;
    let line = format!("{}\r\n", "x".repeat(98));
    let kib = line.repeat(10);
    assert_eq!(c.chunk(&kib, false).await.code, 250);
    assert_eq!(c.chunk(&kib.repeat(2), false).await.code, 552);
    // Later chunks of the failed message: refused, uncounted (more than
    // max_errors of them end nothing).
    for _ in 0..12 {
        assert_eq!(c.chunk(&kib, false).await.code, 554);
    }
    assert_eq!(c.chunk("end", true).await.code, 554);
    assert_eq!(c.code("RSET").await, 250);
    assert_eq!(front.stats().oversize_refused, 1);

    // A line too long across a chunk boundary.
    let mut c = chunked_transaction(&front).await;
    let half = "y".repeat(600);
    assert_eq!(c.chunk(&half, false).await.code, 250);
    let refused = c.chunk(&format!("{half}\r\n"), true).await;
    assert_eq!(
        (refused.code, refused.lines[0].as_str()),
        (554, "5.6.0 Error: message line longer than 1000 octets")
    );

    // A chunk larger than any message: refused, and unreadable, so closed.
    let mut c = chunked_transaction(&front).await;
    assert_eq!(c.code("BDAT 4096").await, 552);
    assert!(c.is_closed().await);
    // A size that cannot be read: where the chunk ends is unknown.
    let mut c = chunked_transaction(&front).await;
    assert_eq!(c.code("BDAT 12x LAST").await, 501);
    assert!(c.is_closed().await);
    assert_eq!(front.stats().messages_delivered, 0);
    let delivered: Vec<String> = mta
        .sessions()
        .concat()
        .into_iter()
        .filter(|l| l.starts_with("CHUNK"))
        .collect();
    assert_eq!(
        delivered.len(),
        2,
        "the two accepted chunks only: {delivered:?}"
    );
}

#[tokio::test]
async fn without_chunking_behind_it_bdat_is_not_offered_and_ends_the_session() {
    let mta = Mta::start(Script::default()).await;
    let front = Front::learning(mta.addr, "").await;
    let mut c = front.client().await;
    let ehlo = c.cmd("EHLO client.test").await;
    assert!(!ehlo.lines.contains(&"CHUNKING".to_owned()), "{ehlo:?}");
    assert_eq!(c.code("MAIL FROM:<a@client.test>").await, 250);
    assert_eq!(c.code("RCPT TO:<bob@example.org>").await, 250);
    // Its chunk would be read as commands: answered once, then closed.
    assert_eq!(
        c.code("BDAT 26 LAST\r\nRCPT TO:<v@elsewhere.test>").await,
        503
    );
    assert!(c.is_closed().await);
    assert!(!mta
        .sessions()
        .concat()
        .iter()
        .any(|l| l.contains("elsewhere")));
}

#[tokio::test]
async fn a_silent_mta_is_asked_for_its_extensions_once_per_retry_period() {
    let mta = Mta::start(Script {
        greet: false,
        ..Script::default()
    })
    .await;
    let front = Front::learning(mta.addr, "upstream_connect_timeout = \"200ms\"\n").await;
    // The first EHLO waits out the connect timeout; the next ones, well
    // within the 10 s retry period, do not try again.
    for _ in 0..3 {
        let mut c = front.client().await;
        let ehlo = c.cmd("EHLO client.test").await;
        assert_eq!(ehlo.code, 250, "{ehlo:?}");
        assert!(!ehlo.lines.contains(&"DSN".to_owned()), "{ehlo:?}");
    }
    assert_eq!(mta.sessions().len(), 1, "one learning attempt");
}
