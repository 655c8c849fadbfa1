//! The SMTP relay checker end to end: a client namespace talks to the
//! daemon's front end, which forwards to Postfix's smtp-sink behind it.

use std::io::Write;
use std::time::Duration;

use sandbox::lab::{Lab, PeerSpec};
use sandbox::probe::{outcome, Outcome};
use sandbox::require_kernel_privileges;
use sandbox::smtp::{ScriptedMta, SmtpClient, SmtpSink};

const OUTSIDER: &str = "192.0.2.2";
const RELAY_CLIENT: &str = "192.0.2.3";
const OUTSIDER_V6: &str = "2001:db8:1::2";
const MX: &str = "192.0.2.1:25";
const MX_V6: &str = "[2001:db8:1::1]:25";

struct SmtpLab {
    lab: Lab,
    sink: Option<SmtpSink>,
}

/// Edge with the daemon's SMTP front end on port 25 and smtp-sink behind it on 127.0.0.1:10025.
fn smtp_lab(tag: &str, smtp_extra: &str, with_sink: bool) -> SmtpLab {
    let mut lab = Lab::new(
        tag,
        vec![PeerSpec {
            name: "client",
            edge_addrs: vec!["192.0.2.1/24", "2001:db8:1::1/64"],
            peer_addrs: vec!["192.0.2.2/24", "192.0.2.3/24", "2001:db8:1::2/64"],
        }],
    )
    .expect("building the lab");
    let sink = with_sink
        .then(|| SmtpSink::start(&lab.edge, &lab.dir().join("sink"), "127.0.0.1:10025").unwrap());
    let config = format!(
        "[smtp]\nlisten = [\"0.0.0.0:25\", \"[::]:25\"]\nhostname = \"mx.example.org\"\n\
         local_domains = [\"example.org\", \".sub.example.org\"]\n\
         relay_networks = [\"192.0.2.3/32\", \"127.0.0.0/8\"]\nupstream = \"127.0.0.1:10025\"\n{smtp_extra}\n"
    );
    lab.start_daemon(&config).unwrap();
    SmtpLab { lab, sink }
}

impl SmtpLab {
    fn client(&self, source: &str) -> SmtpClient {
        let dest = if source.contains(':') { MX_V6 } else { MX };
        SmtpClient::connect(self.lab.peer("client"), source, dest).unwrap()
    }

    fn sink(&self) -> &SmtpSink {
        self.sink.as_ref().unwrap()
    }

    fn smtp_stats(&self) -> serde_json::Value {
        self.lab.daemon().stats()["smtp"].clone()
    }

    /// One RCPT in a fresh session; returns the RCPT reply.
    fn try_rcpt(&self, source: &str, from: &str, rcpt: &str) -> sandbox::smtp::SmtpReply {
        let mut c = self.client(source);
        c.start_transaction("client.test", from).unwrap();
        let reply = c.cmd(&format!("RCPT TO:{rcpt}")).unwrap();
        let _ = c.cmd("QUIT");
        reply
    }
}

/// Relay attempts in many spellings, with the reason each must be counted under.
const RELAY_ATTEMPTS: &[(&str, &str)] = &[
    ("<user@victim.test>", "foreign_domain"),
    ("<USER@VICTIM.TEST>", "foreign_domain"),
    ("<user@victim.test.>", "foreign_domain"),
    ("user@victim.test", "foreign_domain"),
    ("<user@example.org.victim.test>", "foreign_domain"),
    ("<user@notexample.org>", "foreign_domain"),
    ("<user@sub.example.org>", "foreign_domain"),
    ("<user@192.0.2.1>", "foreign_domain"),
    ("<user%victim.test@example.org>", "percent_hack"),
    ("<\"user%victim.test\"@example.org>", "percent_hack"),
    ("<\"user\\%victim.test\"@EXAMPLE.ORG.>", "percent_hack"),
    ("<user%victim.test%relay.test@example.org>", "percent_hack"),
    ("<victim.test!user@example.org>", "bang_path"),
    ("<\"victim.test!user\"@example.org>", "bang_path"),
    ("<victim.test!user>", "bang_path"),
    ("<\"user@victim.test\"@example.org>", "embedded_at"),
    ("<user@victim.test@example.org>", "embedded_at"),
    ("<\"user\\@victim.test\"@example.org>", "embedded_at"),
    ("<@example.org:user@victim.test>", "source_route"),
    (
        "<@example.org,@mx.example.org:user@victim.test>",
        "source_route",
    ),
    ("<@example.org:user@example.org>", "source_route"),
    ("<user@[192.0.2.1]>", "address_literal"),
    ("<user@[203.0.113.9]>", "address_literal"),
    ("<user@[IPv6:2001:db8:1::1]>", "address_literal"),
    ("<user@[ipv6:2001:DB8::9]>", "address_literal"),
    ("<user>", "no_domain"),
];

const LOCAL_RECIPIENTS: &[&str] = &[
    "<user@example.org>",
    "<User@EXAMPLE.ORG.>",
    "<\"first last\"@example.org>",
    "<user@mx.sub.example.org>",
    "<postmaster>",
    "<Postmaster>",
];

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn relay_attempts_are_refused_however_disguised() {
    if !require_kernel_privileges("relay_attempts_are_refused_however_disguised") {
        return;
    }
    let lab = smtp_lab("relaytable", "", true);
    for sender in ["<forged@example.org>", "<>", "<someone@victim.test>"] {
        for (rcpt, reason) in RELAY_ATTEMPTS {
            let reply = lab.try_rcpt(OUTSIDER, sender, rcpt);
            assert_eq!(
                reply.code, 554,
                "outsider relay via {rcpt} from {sender}: {reply}"
            );
            assert!(
                reply.text().contains("5.7.1") && reply.text().contains("Relay access denied"),
                "{rcpt}: {reply}"
            );
            let _ = reason;
        }
    }
    // Counted per reason.
    let stats = lab.smtp_stats();
    for (_, reason) in RELAY_ATTEMPTS {
        let expected = 3 * RELAY_ATTEMPTS.iter().filter(|(_, r)| r == reason).count() as u64;
        assert_eq!(
            stats["relay_denied"][reason], expected,
            "stats for {reason}: {stats}"
        );
    }
    // DSN parameters (smtp-sink offers DSN) never change the decision: an
    // ORCPT naming a local address is not a destination, and parameters
    // smuggling a line end or bad xtext are refused as syntax.
    for (params, code) in [
        (" ORCPT=rfc822;user+40example.org", 554),
        (
            " NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;postmaster+40example.org",
            554,
        ),
        (" NOTIFY=NEVER", 554),
        (" ORCPT=rfc822;a+0D+0ARCPT+20TO:<x@example.org>", 501),
        (" NOTIFY=SUCCESS+0D+0A", 501),
    ] {
        let rcpt = format!("<user@victim.test>{params}");
        let reply = lab.try_rcpt(OUTSIDER, "<>", &rcpt);
        assert_eq!(reply.code, code, "{rcpt}: {reply}");
    }
    // Over IPv6 too.
    let reply = lab.try_rcpt(
        OUTSIDER_V6,
        "<forged@example.org>",
        "<user%victim.test@example.org>",
    );
    assert_eq!(reply.code, 554, "{reply}");
    // Local recipients are accepted with any sender, including the null sender.
    for sender in ["<>", "<forged@example.org>", "<someone@victim.test>"] {
        for rcpt in LOCAL_RECIPIENTS {
            let reply = lab.try_rcpt(OUTSIDER, sender, rcpt);
            assert_eq!(reply.code, 250, "local {rcpt} from {sender}: {reply}");
        }
    }
    let reply = lab.try_rcpt(OUTSIDER_V6, "<>", "<user@example.org>");
    assert_eq!(reply.code, 250, "{reply}");
    // The relay network may relay: every attempt above is accepted (smtp-sink takes anything).
    for (rcpt, _) in RELAY_ATTEMPTS {
        let reply = lab.try_rcpt(RELAY_CLIENT, "<user@example.org>", rcpt);
        assert_eq!(reply.code, 250, "relay client via {rcpt}: {reply}");
    }
}

/// A message with dot-stuffing, 8-bit text, a 998-octet line and an empty line.
fn test_message(marker: &str) -> (Vec<u8>, String) {
    let long = "x".repeat(998);
    let lines = [
        format!("Subject: {marker}"),
        "From: <sender@client.test>".to_owned(),
        String::new(),
        "..a line that started with a dot".to_owned(),
        "...two dots".to_owned(),
        "8-bit: gr\u{fc}\u{df}e".to_owned(),
        long,
        String::new(),
        "last line".to_owned(),
    ];
    let mut wire = Vec::new();
    let mut expected = String::new();
    for line in &lines {
        wire.extend_from_slice(line.as_bytes());
        wire.extend_from_slice(b"\r\n");
        expected.push_str(line.strip_prefix('.').unwrap_or(line));
        expected.push('\n');
    }
    (wire, expected)
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn legitimate_mail_is_delivered_intact_with_xclient() {
    if !require_kernel_privileges("legitimate_mail_is_delivered_intact_with_xclient") {
        return;
    }
    let lab = smtp_lab("deliver", "", true);
    let (wire, expected_body) = test_message("delivery-test");
    let mut c = lab.client(OUTSIDER);
    c.start_transaction("client.test", "<sender@client.test>")
        .unwrap();
    assert_eq!(c.cmd("RCPT TO:<user@example.org>").unwrap().code, 250);
    assert_eq!(c.cmd("RCPT TO:<user@victim.test>").unwrap().code, 554);
    assert_eq!(c.cmd("RCPT TO:<other@example.org>").unwrap().code, 250);
    assert_eq!(c.cmd("DATA").unwrap().code, 354);
    c.send(&wire).unwrap();
    let reply = c.cmd(".").unwrap();
    assert_eq!(reply.code, 250, "{reply}");
    assert_eq!(c.cmd("QUIT").unwrap().code, 221);

    let messages = lab.sink().messages();
    assert_eq!(messages.len(), 1, "{messages:?}");
    let dump = &messages[0];
    // smtp-sink offers XCLIENT for HELO and NAME only: the client's HELO name reaches it.
    assert!(
        dump.contains("X-Helo-Args: client.test"),
        "client HELO did not reach the MTA:\n{dump}"
    );
    assert!(dump.contains("X-Mail-Args: <sender@client.test>"), "{dump}");
    assert!(
        dump.contains("X-Rcpt-Args: <user@example.org>")
            && dump.contains("X-Rcpt-Args: <other@example.org>"),
        "{dump}"
    );
    assert!(
        !dump.contains("victim.test"),
        "refused recipient reached the MTA:\n{dump}"
    );
    let body_start = dump
        .find("Subject: delivery-test")
        .expect("message in dump");
    let body = &dump[body_start..];
    assert_eq!(
        body.trim_end_matches('\n'),
        expected_body.trim_end_matches('\n'),
        "message altered in transit"
    );
    assert_eq!(lab.smtp_stats()["messages_delivered"], 1);
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn pipelined_session_gets_every_reply_in_order() {
    if !require_kernel_privileges("pipelined_session_gets_every_reply_in_order") {
        return;
    }
    let lab = smtp_lab("pipeline", "", true);
    let mut c = lab.client(OUTSIDER);
    assert_eq!(c.reply().unwrap().code, 220);
    let (wire, _) = test_message("pipelined");
    let mut batch = b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<u1@example.org>\r\nRCPT TO:<x@victim.test>\r\nRCPT TO:<u2@example.org>\r\nDATA\r\n".to_vec();
    c.send(&batch).unwrap();
    let codes: Vec<u16> = (0..6).map(|_| c.reply().unwrap().code).collect();
    assert_eq!(codes, [250, 250, 250, 554, 250, 354]);
    batch = wire;
    batch.extend_from_slice(b".\r\nMAIL FROM:<>\r\nRCPT TO:<postmaster>\r\nDATA\r\n");
    c.send(&batch).unwrap();
    let codes: Vec<u16> = (0..4).map(|_| c.reply().unwrap().code).collect();
    assert_eq!(codes, [250, 250, 250, 354]);
    c.send(b"Subject: second\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        .unwrap();
    assert_eq!(c.reply().unwrap().code, 250);
    assert_eq!(c.reply().unwrap().code, 221);
    assert_eq!(lab.sink().messages().len(), 2);
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn smuggling_attempts_are_refused_before_anything_reaches_the_mta() {
    if !require_kernel_privileges("smuggling_attempts_are_refused") {
        return;
    }
    let lab = smtp_lab("smuggle", "", true);
    let tricks: &[&[u8]] = &[
        b"Subject: one\r\n\r\nhello\n.\nMAIL FROM:<x@victim.test>\r\nRCPT TO:<y@victim.test>\r\nDATA\r\nsmuggled\r\n.\r\n",
        b"Subject: two\r\n\r\nhello\n.\r\nMAIL FROM:<x@victim.test>\r\n.\r\n",
        b"Subject: three\r\n\r\nhello\r\n.\nMAIL FROM:<x@victim.test>\r\n.\r\n",
        b"Subject: four\r\n\r\nhello\r.\r\nMAIL FROM:<x@victim.test>\r\n.\r\n",
        b"Subject: five\r\n\r\nbare\rcr\r\n.\r\n",
    ];
    for trick in tricks {
        let mut c = lab.client(OUTSIDER);
        c.start_transaction("client.test", "<a@client.test>")
            .unwrap();
        assert_eq!(c.cmd("RCPT TO:<user@example.org>").unwrap().code, 250);
        assert_eq!(c.cmd("DATA").unwrap().code, 354);
        c.send(trick).unwrap();
        let reply = c.reply().unwrap();
        assert_eq!(
            reply.code,
            554,
            "{}: {reply}",
            String::from_utf8_lossy(trick)
        );
        assert!(c.is_closed(), "session must end after a smuggling attempt");
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        lab.sink().messages().is_empty(),
        "something reached the MTA: {:?}",
        lab.sink().messages()
    );
    assert_eq!(lab.smtp_stats()["smuggling_refused"], tricks.len() as u64);
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn upstream_down_or_dying_gives_4xx_and_nothing_is_acknowledged() {
    if !require_kernel_privileges("upstream_down_or_dying_gives_4xx") {
        return;
    }
    // Nothing listens on 10025: the first accepted recipient gets 451.
    let lab = smtp_lab("updown", "", false);
    let reply = lab.try_rcpt(OUTSIDER, "<a@client.test>", "<user@example.org>");
    assert_eq!(reply.code, 451, "{reply}");
    assert!(reply.text().starts_with("4.3.0"), "{reply}");

    // An MTA that dies in the middle of DATA.
    let listener = lab
        .lab
        .edge
        .run(|| std::net::TcpListener::bind("127.0.0.1:10025"))
        .unwrap()
        .unwrap();
    let dying = std::thread::spawn(move || loop {
        let (stream, _) = listener.accept().unwrap();
        let mut c = SmtpClient::over(stream.try_clone().unwrap());
        let mut out = stream;
        let read_line = |c: &mut SmtpClient| {
            let mut line = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(c.stream()), &mut line).ok();
            line
        };
        out.write_all(b"220 dying.test ESMTP\r\n").unwrap();
        read_line(&mut c);
        out.write_all(b"250 dying.test\r\n").unwrap();
        // The gatekeeper learning the MTA's EHLO says QUIT here: next session.
        if read_line(&mut c).to_ascii_uppercase().starts_with("QUIT") {
            continue;
        }
        for reply in ["250 ok\r\n", "250 ok\r\n", "354 go\r\n"] {
            out.write_all(reply.as_bytes()).unwrap();
            read_line(&mut c);
        }
        // Read a little of the message (above), then die without a final reply.
        drop(out);
        break;
    });
    let mut c = lab.client(OUTSIDER);
    c.start_transaction("client.test", "<a@client.test>")
        .unwrap();
    assert_eq!(c.cmd("RCPT TO:<user@example.org>").unwrap().code, 250);
    assert_eq!(c.cmd("DATA").unwrap().code, 354);
    let (wire, _) = test_message("dies");
    c.send(&wire).unwrap();
    let reply = c.cmd(".").unwrap();
    assert_eq!(
        reply.code / 100,
        4,
        "upstream died mid-DATA but the client got {reply}"
    );
    dying.join().unwrap();
    assert!(lab.smtp_stats()["upstream_failures"].as_u64().unwrap() >= 2);
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn limits_size_recipients_lines_and_errors() {
    if !require_kernel_privileges("limits_size_recipients_lines_and_errors") {
        return;
    }
    let lab = smtp_lab(
        "limits",
        "max_message_size = 4096\nmax_recipients = 3\nmax_errors = 4",
        true,
    );
    // SIZE declared too big.
    let mut c = lab.client(OUTSIDER);
    assert_eq!(c.reply().unwrap().code, 220);
    let ehlo = c.cmd("EHLO client.test").unwrap();
    for capability in ["PIPELINING", "SIZE 4096", "8BITMIME", "ENHANCEDSTATUSCODES"] {
        assert!(
            ehlo.lines.iter().any(|l| l == capability),
            "EHLO lacks {capability}: {ehlo}"
        );
    }
    assert!(
        !ehlo.lines.iter().any(|l| l == "STARTTLS"),
        "STARTTLS offered without a certificate"
    );
    assert_eq!(
        c.cmd("MAIL FROM:<a@client.test> SIZE=5000").unwrap().code,
        552
    );
    // Recipient limit.
    assert_eq!(
        c.cmd("MAIL FROM:<a@client.test> SIZE=100").unwrap().code,
        250
    );
    for i in 0..3 {
        assert_eq!(
            c.cmd(&format!("RCPT TO:<u{i}@example.org>")).unwrap().code,
            250
        );
    }
    let reply = c.cmd("RCPT TO:<u9@example.org>").unwrap();
    assert_eq!(
        (reply.code, reply.text().starts_with("4.5.3")),
        (452, true),
        "{reply}"
    );
    // Message larger than the limit, though SIZE said otherwise.
    assert_eq!(c.cmd("DATA").unwrap().code, 354);
    for _ in 0..100 {
        c.send(b"0123456789012345678901234567890123456789012345678901234567890123456789\r\n")
            .unwrap();
    }
    assert_eq!(c.cmd(".").unwrap().code, 552);
    // Over-long command line.
    let long = format!("NOOP {}", "x".repeat(600));
    assert_eq!(c.cmd(&long).unwrap().code, 500);
    // The gatekeeper forwards up to the limit and then drops the upstream
    // mid-DATA; smtp-sink may keep that fragment, but never the whole message.
    let line = "0123456789012345678901234567890123456789012345678901234567890123456789";
    assert!(
        lab.sink()
            .messages()
            .iter()
            .all(|m| m.matches(line).count() < 100 && m.len() < 4096 + 1024),
        "oversized message reached the MTA"
    );
    // Error limit: the fourth error ends the session with 421.
    let mut c = lab.client(OUTSIDER);
    assert_eq!(c.reply().unwrap().code, 220);
    for _ in 0..3 {
        assert_eq!(c.cmd("BOGUS").unwrap().code, 500);
    }
    assert_eq!(c.cmd("BOGUS").unwrap().code, 500);
    assert_eq!(c.reply().unwrap().code, 421);
    assert!(c.is_closed());
    // VRFY reveals nothing, EXPN is refused, HELO-less MAIL is out of sequence.
    let mut c = lab.client(OUTSIDER);
    assert_eq!(c.reply().unwrap().code, 220);
    assert_eq!(c.cmd("MAIL FROM:<a@client.test>").unwrap().code, 503);
    assert_eq!(c.cmd("VRFY root").unwrap().code, 252);
    assert_eq!(c.cmd("EXPN staff").unwrap().code, 502);
    assert_eq!(c.cmd("HELP").unwrap().code, 214);
    assert_eq!(c.cmd("NOOP").unwrap().code, 250);
    assert_eq!(
        c.cmd("RCPT TO:<user@example.org> XNOTIFY=NEVER")
            .unwrap()
            .code,
        555
    );
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn pregreet_talkers_are_refused_and_denylisted() {
    if !require_kernel_privileges("pregreet_talkers_are_refused_and_denylisted") {
        return;
    }
    let lab = smtp_lab(
        "pregreet",
        "greet_wait = \"1s\"\npregreet_deny_ttl = \"1h\"",
        true,
    );
    // A patient client gets the teaser, then the banner.
    let mut patient = lab.client(RELAY_CLIENT);
    let banner = patient.reply().unwrap();
    assert_eq!(banner.code, 220);
    assert_eq!(
        banner.lines.len(),
        2,
        "expected a 220- teaser before the banner: {banner:?}"
    );
    assert_eq!(patient.cmd("EHLO patient.test").unwrap().code, 250);
    // A bot talks at once.
    let mut bot = lab.client(OUTSIDER);
    bot.send(b"EHLO bot.test\r\n").unwrap();
    let reply = bot.reply().unwrap();
    assert_eq!(reply.code, 554, "{reply}");
    assert!(bot.is_closed());
    assert_eq!(lab.smtp_stats()["pregreet"], 1);
    // ... and its next SYN dies in XDP.
    std::thread::sleep(Duration::from_millis(300));
    let listed = lab.lab.daemon().cli(&["deny", "list"]);
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains("192.0.2.2/32"),
        "{listed:?}"
    );
    assert_eq!(
        outcome(lab.lab.peer("client"), OUTSIDER, MX),
        Outcome::TimedOut
    );
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn banner_comes_at_once_without_greet_wait() {
    if !require_kernel_privileges("banner_comes_at_once_without_greet_wait") {
        return;
    }
    let lab = smtp_lab("banner", "", true);
    let mut c = lab.client(OUTSIDER);
    let banner = c.reply().unwrap();
    assert_eq!((banner.code, banner.lines.len()), (220, 1), "{banner:?}");
    assert!(banner.text().starts_with("mx.example.org"), "{banner}");
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn xclient_tells_a_postfix_like_mta_the_real_client() {
    if !require_kernel_privileges("xclient_tells_a_postfix_like_mta_the_real_client") {
        return;
    }
    let lab = smtp_lab("xclient", "", false);
    let mta = ScriptedMta::start(
        &lab.lab.edge,
        "127.0.0.1:10025",
        &["XCLIENT NAME ADDR PORT PROTO HELO LOGIN"],
    )
    .unwrap();
    let mut c = lab.client(OUTSIDER);
    c.start_transaction("client.test", "<sender@client.test>")
        .unwrap();
    assert_eq!(c.cmd("RCPT TO:<user@example.org>").unwrap().code, 250);
    assert_eq!(c.cmd("DATA").unwrap().code, 354);
    c.send(b"Subject: x\r\n\r\nbody\r\n").unwrap();
    assert_eq!(c.cmd(".").unwrap().code, 250);
    assert_eq!(c.cmd("QUIT").unwrap().code, 221);
    let lines = mta.lines();
    let xclient = lines
        .iter()
        .find(|l| l.starts_with("XCLIENT"))
        .unwrap_or_else(|| panic!("no XCLIENT in {lines:?}"));
    for attribute in [
        "ADDR=192.0.2.2",
        "PROTO=ESMTP",
        "HELO=client.test",
        "NAME=[UNAVAILABLE]",
    ] {
        assert!(xclient.contains(attribute), "{xclient} lacks {attribute}");
    }
    assert!(xclient.contains("PORT="), "{xclient}");
    let after = lines
        .iter()
        .skip_while(|l| !l.starts_with("XCLIENT"))
        .skip(1)
        .cloned()
        .collect::<Vec<_>>();
    assert_eq!(
        after.first().map(String::as_str),
        Some("EHLO client.test"),
        "greets again after XCLIENT: {lines:?}"
    );
    assert!(
        after.contains(&"MAIL FROM:<sender@client.test>".to_owned()),
        "{lines:?}"
    );
    assert!(after.contains(&"body".to_owned()), "{lines:?}");
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn the_mta_receives_rebuilt_commands_and_never_control_bytes() {
    if !require_kernel_privileges("the_mta_receives_rebuilt_commands_and_never_control_bytes") {
        return;
    }
    let lab = smtp_lab("rebuilt", "", false);
    let mta = ScriptedMta::start(
        &lab.lab.edge,
        "127.0.0.1:10025",
        &["XCLIENT NAME ADDR PORT PROTO HELO"],
    )
    .unwrap();
    let mut c = lab.client(OUTSIDER);
    assert_eq!(c.reply().unwrap().code, 220);
    assert_eq!(c.cmd("EHLO [IPv6:2001:DB8:0::1]").unwrap().code, 250);
    // The injection the issue measured, and its relatives: refused before
    // any upstream session exists (it opens at the first accepted RCPT).
    let injections: &[&[u8]] = &[
        b"MAIL FROM:<a@[x:\"\rMAIL FROM:<>\rRCPT TO:<user@victim.test>\r\"]>\r\n",
        b"MAIL FROM:<a@[x:\0]>\r\n",
        b"MAIL FROM:<a\x1b@client.test>\r\n",
        b"EHLO evil\rRCPT TO:<user@victim.test>\r\n",
        b"NOOP \x7f\r\n",
        b"RCPT TO:<user@example.org>\r\r\n",
    ];
    for line in injections {
        c.send(line).unwrap();
        let reply = c.reply().unwrap();
        assert_eq!(reply.code, 501, "{line:?}: {reply}");
        assert!(reply.text().starts_with("5.5.2"), "{line:?}: {reply}");
    }
    let spaced = c
        .cmd("MAIL FROM:<a@[x:\" RCPT TO:<user@victim.test> \"]>")
        .unwrap();
    assert_eq!(spaced.code, 501, "general literal with spaces: {spaced}");
    let mail = c
        .cmd("MAIL FROM:<\"a b\"@EXAMPLE.net> BODY=8BITMIME")
        .unwrap();
    assert_eq!(mail.code, 250, "{mail}");
    assert_eq!(c.cmd("RCPT TO:<User@Example.ORG.>").unwrap().code, 250);
    assert_eq!(c.cmd("RCPT TO:<\"abc\"@example.org>").unwrap().code, 250);
    assert_eq!(c.cmd("DATA").unwrap().code, 354);
    c.send(b"Subject: x\r\n\r\nbody\r\n").unwrap();
    assert_eq!(c.cmd(".").unwrap().code, 250);
    assert_eq!(c.cmd("QUIT").unwrap().code, 221);

    let lines = mta.lines();
    let commands: Vec<&str> = lines
        .iter()
        .map(String::as_str)
        .filter(|l| l.starts_with(|c: char| c.is_ascii_uppercase()) && *l != "Subject: x")
        .collect();
    for expected in [
        "XCLIENT ",
        "EHLO [IPv6:2001:db8::1]",
        "MAIL FROM:<\"a b\"@example.net> BODY=8BITMIME",
        "RCPT TO:<User@example.org>",
        "RCPT TO:<abc@example.org>",
    ] {
        assert!(
            commands.iter().any(|l| l.starts_with(expected)),
            "MTA never got {expected:?}: {lines:?}"
        );
    }
    let xclient = commands.iter().find(|l| l.starts_with("XCLIENT")).unwrap();
    assert!(xclient.contains(" HELO=[IPv6:2001:db8::1]"), "{xclient}");
    assert_eq!(
        commands.iter().filter(|l| l.starts_with("MAIL")).count(),
        1,
        "one MAIL reached the MTA: {lines:?}"
    );
    for line in &lines {
        assert!(
            line.bytes().all(|b| (0x20..0x7f).contains(&b)),
            "control byte reached the MTA: {line:?}"
        );
        assert!(
            !line.contains("victim"),
            "injected text reached the MTA: {line:?}"
        );
    }
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn starttls_resets_the_session_and_discards_injected_plaintext() {
    use tokio_rustls::rustls;
    if !require_kernel_privileges("starttls_resets_the_session") {
        return;
    }
    let cert_dir = tempfile::tempdir().unwrap();
    let (cert, key, der) = sandbox::smtp::test_certificate(cert_dir.path(), "mx.example.org");
    let extra = format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"",
        cert.display(),
        key.display()
    );
    let lab = smtp_lab("starttls", &extra, true);

    let mut c = lab.client(OUTSIDER);
    assert_eq!(c.reply().unwrap().code, 220);
    let ehlo = c.cmd("EHLO client.test").unwrap();
    assert!(ehlo.lines.iter().any(|l| l == "STARTTLS"), "{ehlo}");
    assert_eq!(c.cmd("MAIL FROM:<a@client.test>").unwrap().code, 250);
    // RSET pipelined behind STARTTLS must die with the plaintext phase (CVE-2011-0411).
    c.send(b"STARTTLS\r\nRSET\r\n").unwrap();
    assert_eq!(c.reply().unwrap().code, 220);

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from(der))
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from("mx.example.org").unwrap();
    let connection = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let tls = rustls::StreamOwned::new(connection, c.into_stream());
    let mut reader = std::io::BufReader::new(tls);
    let mut cmd = |line: &str| -> (u16, Vec<String>) {
        use std::io::BufRead;
        reader
            .get_mut()
            .write_all(format!("{line}\r\n").as_bytes())
            .unwrap();
        let mut lines = Vec::new();
        loop {
            let mut text = String::new();
            reader.read_line(&mut text).unwrap();
            let text = text.trim_end().to_owned();
            let done = text.as_bytes().get(3) != Some(&b'-');
            lines.push(text);
            if done {
                return (lines[0][..3].parse().unwrap(), lines);
            }
        }
    };
    // The session starts over: the first reply is EHLO's, not the injected RSET's.
    let (code, lines) = cmd("EHLO client.test");
    assert_eq!(code, 250);
    assert!(
        lines[0].contains("mx.example.org"),
        "injected plaintext was answered: {lines:?}"
    );
    assert!(
        !lines.iter().any(|l| l.ends_with("STARTTLS")),
        "STARTTLS offered again: {lines:?}"
    );
    // The pre-TLS MAIL was forgotten.
    assert_eq!(cmd("RCPT TO:<user@example.org>").0, 503);
    assert_eq!(cmd("MAIL FROM:<a@client.test>").0, 250);
    assert_eq!(cmd("RCPT TO:<user@example.org>").0, 250);
    assert_eq!(cmd("RCPT TO:<user@victim.test>").0, 554);
    assert_eq!(cmd("DATA").0, 354);
    assert_eq!(cmd("Subject: over tls\r\n\r\nsecret\r\n.").0, 250);
    assert_eq!(cmd("STARTTLS").0, 503);
    assert_eq!(lab.sink().messages().len(), 1);
}
