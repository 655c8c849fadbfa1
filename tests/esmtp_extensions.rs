//! The ESMTP extensions real senders use, through the gatekeeper to a real
//! Postfix that offers them (and on to the smtp-sink behind it), and absent
//! when Postfix does not offer them.

use sandbox::lab::{Lab, PeerSpec};
use sandbox::postfix::{Postfix, PostfixSpec};
use sandbox::smtp::SmtpClient;
use sandbox::{require_kernel_privileges, PATIENCE};

const SENDER: &str = "192.0.2.2";
const MX: &str = "192.0.2.1:25";

fn lab_with_postfix(tag: &str, main_cf_extra: &str) -> (Lab, Postfix) {
    lab_with_postfix_for(tag, main_cf_extra, "[\"example.org\"]")
}

/// The gatekeeper in front of Postfix, with `local_domains` as given (TOML).
fn lab_with_postfix_for(tag: &str, main_cf_extra: &str, local_domains: &str) -> (Lab, Postfix) {
    postfix_lab(
        tag,
        vec!["192.0.2.2/24"],
        main_cf_extra,
        &format!("local_domains = {local_domains}\n"),
    )
}

/// One sender namespace holding `senders`, Postfix, and the gatekeeper in
/// front of it with `smtp_extra` (TOML keys of `[smtp]`, `local_domains` among them).
fn postfix_lab(
    tag: &str,
    senders: Vec<&'static str>,
    main_cf_extra: &str,
    smtp_extra: &str,
) -> (Lab, Postfix) {
    let mut lab = Lab::new(
        tag,
        vec![PeerSpec {
            name: "sender",
            edge_addrs: vec!["192.0.2.1/24"],
            peer_addrs: senders,
        }],
    )
    .expect("building the lab");
    let postfix = Postfix::start(
        &lab.edge,
        &lab.dir().join("postfix"),
        &PostfixSpec {
            listen: "127.0.0.1:10025",
            sink_listen: "127.0.0.1:10026",
            users: &[],
            main_cf_extra,
        },
    )
    .expect("starting Postfix");
    lab.start_daemon(&format!(
        "[smtp]\nlisten = [\"0.0.0.0:25\"]\nhostname = \"mx.example.org\"\n\
         upstream = \"127.0.0.1:10025\"\n{smtp_extra}"
    ))
    .unwrap();
    (lab, postfix)
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn dsn_parameters_reach_the_mta_rebuilt_and_only_when_it_offers_dsn() {
    if !require_kernel_privileges(
        "dsn_parameters_reach_the_mta_rebuilt_and_only_when_it_offers_dsn",
    ) {
        return;
    }
    let (lab, postfix) = lab_with_postfix("dsn", "");
    let mut c = SmtpClient::connect(lab.peer("sender"), SENDER, MX).unwrap();
    assert_eq!(c.reply().unwrap().code, 220);
    let ehlo = c.cmd("EHLO sender.test").unwrap();
    assert!(ehlo.lines.iter().any(|l| l == "DSN"), "{ehlo}");
    let mail = c
        .cmd("MAIL FROM:<alice@sender.test> RET=HDRS ENVID=QQ314159+2Bx")
        .unwrap();
    assert_eq!(mail.code, 250, "{mail}");
    // ORCPT never turns a foreign recipient into a local one.
    let relay = c
        .cmd("RCPT TO:<victim@elsewhere.test> ORCPT=rfc822;bob+40example.org")
        .unwrap();
    assert_eq!(relay.code, 554, "{relay}");
    let rcpt = c
        .cmd("RCPT TO:<bob@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob+40example.org")
        .unwrap();
    assert_eq!(rcpt.code, 250, "{rcpt}");
    let bad = c
        .cmd("RCPT TO:<carol@example.org> NOTIFY=SOMETIMES")
        .unwrap();
    assert_eq!(bad.code, 501, "{bad}");
    assert_eq!(c.cmd("DATA").unwrap().code, 354);
    let queued = c.cmd("Subject: dsn\r\n\r\nwith receipts\r\n.").unwrap();
    assert_eq!(queued.code, 250, "{queued}");
    let _ = c.cmd("QUIT");

    // Postfix kept the DSN request and passed it on to the next hop.
    let delivered = postfix
        .wait_delivered(1, PATIENCE)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.daemon().log_text()));
    let message = &delivered[0];
    assert!(message.contains("RET=HDRS"), "{message}");
    assert!(message.contains("ENVID=QQ314159+2Bx"), "{message}");
    // The sender may not relay, so no success report (its MAIL FROM may be forged).
    assert!(message.contains("NOTIFY=FAILURE"), "{message}");
    assert!(!message.contains("SUCCESS"), "{message}");
    assert!(
        message.contains("ORCPT=rfc822;bob@example.org"),
        "{message}"
    );
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn without_dsn_or_chunking_behind_it_neither_is_offered_nor_accepted() {
    if !require_kernel_privileges(
        "without_dsn_or_chunking_behind_it_neither_is_offered_nor_accepted",
    ) {
        return;
    }
    let (lab, _postfix) =
        lab_with_postfix("nodsn", "smtpd_discard_ehlo_keywords = dsn, chunking\n");
    let mut c = SmtpClient::connect(lab.peer("sender"), SENDER, MX).unwrap();
    assert_eq!(c.reply().unwrap().code, 220);
    let ehlo = c.cmd("EHLO sender.test").unwrap();
    assert!(!ehlo.lines.iter().any(|l| l == "DSN"), "{ehlo}");
    assert!(!ehlo.lines.iter().any(|l| l == "CHUNKING"), "{ehlo}");
    assert_eq!(
        c.cmd("MAIL FROM:<a@sender.test> RET=FULL").unwrap().code,
        555
    );
    assert_eq!(c.cmd("MAIL FROM:<a@sender.test>").unwrap().code, 250);
    let rcpt = c.cmd("RCPT TO:<bob@example.org> NOTIFY=NEVER").unwrap();
    assert_eq!(rcpt.code, 555, "{rcpt}");
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn utf8_mail_reaches_postfix_intact_in_u_labels_and_a_labels() {
    if !require_kernel_privileges("utf8_mail_reaches_postfix_intact_in_u_labels_and_a_labels") {
        return;
    }
    // Postfix matches mydestination as written: both forms listed.
    let (lab, postfix) = lab_with_postfix_for(
        "utf8",
        "smtputf8_enable = yes\nmydestination = example.org, xn--exmple-cua.org, exämple.org\n",
        "[\"example.org\", \"exämple.org\"]",
    );
    let mut c = SmtpClient::connect(lab.peer("sender"), SENDER, MX).unwrap();
    assert_eq!(c.reply().unwrap().code, 220);
    let ehlo = c.cmd("EHLO sender.test").unwrap();
    assert!(ehlo.lines.iter().any(|l| l == "SMTPUTF8"), "{ehlo}");
    assert_eq!(c.cmd("MAIL FROM:<jöran@sender.test>").unwrap().code, 553);
    assert_eq!(
        c.cmd("MAIL FROM:<jöran@sender.test> SMTPUTF8")
            .unwrap()
            .code,
        250
    );
    for rcpt in ["<björn@exämple.org>", "<anna@xn--exmple-cua.org>"] {
        let reply = c.cmd(&format!("RCPT TO:{rcpt}")).unwrap();
        assert_eq!(reply.code, 250, "{rcpt}: {reply}");
    }
    assert_eq!(c.cmd("DATA").unwrap().code, 354);
    let queued = c
        .cmd("Subject: =?UTF-8?Q?gr=C3=BC=C3=9Fe?=\r\n\r\ngrüße\r\n.")
        .unwrap();
    assert_eq!(queued.code, 250, "{queued}");
    let _ = c.cmd("QUIT");
    // Each in a session of its own, so no error limit ends the table early.
    for lookalike in IDN_RELAY_ATTEMPTS {
        let mut c = SmtpClient::connect(lab.peer("sender"), SENDER, MX).unwrap();
        assert_eq!(c.reply().unwrap().code, 220);
        assert_eq!(c.cmd("EHLO sender.test").unwrap().code, 250);
        let mail = c.cmd("MAIL FROM:<jöran@sender.test> SMTPUTF8").unwrap();
        assert_eq!(mail.code, 250, "{mail}");
        let reply = c.cmd(&format!("RCPT TO:{lookalike}")).unwrap();
        assert!(
            (500..600).contains(&reply.code) && reply.code != 552,
            "{lookalike}: {reply}"
        );
        let _ = c.cmd("QUIT");
    }
    // Postfix queued it with the envelope as the client wrote it (smtp-sink
    // behind Postfix offers no SMTPUTF8, so Postfix's own log is the witness).
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let log = postfix.log_text();
        if log.contains("from=<jöran@sender.test>")
            && log.contains("to=<björn@exämple.org>")
            && log.contains("to=<anna@xn--exmple-cua.org>")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "Postfix never took the UTF-8 envelope:\n{log}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// UTF-8 recipients that must never pass for the local `exämple.org`:
/// foreign IDNs, confusables, lookalikes of `@ . % !`, invisible
/// characters, and the old relay tricks in UTF-8.
const IDN_RELAY_ATTEMPTS: &[&str] = &[
    "<x@bücher.test>",
    "<x@xn--bcher-kva.test>",
    "<x@exämple.org.bücher.test>",
    "<x@ex\u{430}mple.org>",
    "<x@exämple\u{ff0e}org>",
    "<x@exämple\u{3002}org>",
    "<x@exä\u{200b}mple.org>",
    "<x\u{ff20}bücher.test@exämple.org>",
    "<x\u{fe6b}bücher.test@exämple.org>",
    "<x%bücher.test@exämple.org>",
    "<x\u{ff05}bücher.test@exämple.org>",
    "<x\u{fe6a}bücher.test@exämple.org>",
    "<bücher.test!jörg@exämple.org>",
    "<bücher.test\u{ff01}jörg@exämple.org>",
    "<\"jörg@bücher.test\"@exämple.org>",
    "<@exämple.org:jörg@bücher.test>",
];

/// Messages in BDAT chunks with a bare CR or LF somewhere (the last one
/// sent with LAST): `<LF>.<LF>` and its cousins inside a chunk, across a
/// chunk boundary, and a CR left dangling at the very end.
const SMUGGLED_CHUNKS: &[&[&str]] = &[
    &["Subject: s\r\n\r\nhi\n.\nMAIL FROM:<x@y.test>\r\n"],
    &["Subject: s\r\n\r\nhi\r\n.\nRCPT TO:<v@victim.test>\r\n"],
    &["Subject: s\r\n\r\nhi\n.\r\nDATA\r\n"],
    &["Subject: s\r\n\r\nhi\r.\r\n"],
    &["Subject: s\r\n\r\nhi\r\n.", "\nQUIT\r\n"],
    &["Subject: s\r\n\r\nhi", "\n.\r\n"],
    &["Subject: s\r\n\r\nends in a bare CR\r"],
];

/// One BDAT command and its chunk, written raw; the reply to them.
fn chunk(c: &mut SmtpClient, body: &str, last: bool) -> sandbox::smtp::SmtpReply {
    use std::io::Write;
    let last = if last { " LAST" } else { "" };
    let wire = format!("BDAT {}{last}\r\n{body}", body.len());
    c.stream().write_all(wire.as_bytes()).unwrap();
    c.reply().unwrap()
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn bdat_chunks_reach_postfix_intact_and_a_bare_lf_in_one_never_does() {
    if !require_kernel_privileges(
        "bdat_chunks_reach_postfix_intact_and_a_bare_lf_in_one_never_does",
    ) {
        return;
    }
    let (lab, postfix) = lab_with_postfix("bdat", "");
    let mut c = SmtpClient::connect(lab.peer("sender"), SENDER, MX).unwrap();
    assert_eq!(c.reply().unwrap().code, 220);
    let ehlo = c.cmd("EHLO sender.test").unwrap();
    assert!(ehlo.lines.iter().any(|l| l == "CHUNKING"), "{ehlo}");

    // First the smuggling forms, each in its own message: refused before
    // Postfix has the whole chunk, and the session goes on (a chunk's end
    // is known).
    for chunks in SMUGGLED_CHUNKS {
        assert_eq!(c.cmd("MAIL FROM:<mallory@sender.test>").unwrap().code, 250);
        assert_eq!(c.cmd("RCPT TO:<bob@example.org>").unwrap().code, 250);
        let (last, first) = chunks.split_last().unwrap();
        for body in first {
            let reply = chunk(&mut c, body, false);
            assert_eq!(reply.code, 250, "{chunks:?}: {reply}");
        }
        let smuggled = chunk(&mut c, last, true);
        assert_eq!(smuggled.code, 554, "{chunks:?}: {smuggled}");
        assert!(smuggled.text().starts_with("5.5.2"), "{smuggled}");
        assert_eq!(c.cmd("RSET").unwrap().code, 250);
    }

    // Then a good one, cut mid-line and between CR and LF.
    assert_eq!(c.cmd("MAIL FROM:<alice@sender.test>").unwrap().code, 250);
    assert_eq!(c.cmd("RCPT TO:<bob@example.org>").unwrap().code, 250);
    for (body, last) in [
        ("Subject: chunked\r\n\r\nfirst li", false),
        ("ne, whole\r", false),
        ("\n.leading dot, not stuffed\r\n", true),
    ] {
        let reply = chunk(&mut c, body, last);
        assert_eq!(reply.code, 250, "{body:?}: {reply}");
    }
    let _ = c.cmd("QUIT");

    let delivered = postfix
        .wait_delivered(1, PATIENCE)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.daemon().log_text()));
    let message = &delivered[0];
    assert!(message.contains("Subject: chunked"), "{message}");
    assert!(message.contains("first line, whole"), "{message}");
    assert!(message.contains(".leading dot, not stuffed"), "{message}");
    // Postfix took it as three BDAT chunks, never as DATA.
    let log = postfix.log_text();
    assert!(
        log.lines().any(|l| l.contains("disconnect from")
            && l.contains(" bdat=3 ")
            && !l.contains(" data=")),
        "{log}"
    );
    // Postfix never queued the refused one (qmgr would log its sender).
    assert!(
        !postfix.log_text().contains("mallory"),
        "{}",
        postfix.log_text()
    );
}

/// The gatekeeper with `upstream_pool` in front of Postfix; one sender
/// namespace holding three client addresses.
fn pooled_lab(tag: &str, main_cf_extra: &str) -> (Lab, Postfix) {
    postfix_lab(
        tag,
        vec!["192.0.2.2/24", "192.0.2.3/24", "192.0.2.4/24"],
        main_cf_extra,
        "local_domains = [\"example.org\"]\nupstream_pool = 4\n",
    )
}

/// One message from each client, one after another; what Postfix delivered.
fn one_message_each(lab: &Lab, postfix: &Postfix, clients: &[(&str, &str)]) -> Vec<String> {
    for (source, helo) in clients {
        let mut c = SmtpClient::connect(lab.peer("sender"), source, MX).unwrap();
        assert_eq!(c.reply().unwrap().code, 220);
        assert_eq!(c.cmd(&format!("EHLO {helo}")).unwrap().code, 250);
        assert_eq!(c.cmd("MAIL FROM:<a@sender.test>").unwrap().code, 250);
        assert_eq!(c.cmd("RCPT TO:<bob@example.org>").unwrap().code, 250);
        assert_eq!(c.cmd("DATA").unwrap().code, 354);
        let queued = c
            .cmd(&format!("Subject: from {helo}\r\n\r\nhi\r\n."))
            .unwrap();
        assert_eq!(queued.code, 250, "{queued}");
        assert_eq!(c.cmd("QUIT").unwrap().code, 221);
    }
    postfix
        .wait_delivered(clients.len(), PATIENCE)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.daemon().log_text()))
}

const POOLED_CLIENTS: [(&str, &str); 3] = [
    ("192.0.2.2", "first.test"),
    ("192.0.2.3", "second.test"),
    ("192.0.2.4", "third.test"),
];

/// `upstream_pool` with a Postfix that authorizes XCLIENT for the clients
/// too: later clients' messages ride the first one's session, re-targeted,
/// and Postfix sees each client as itself.
#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn a_pooled_postfix_session_is_retargeted_at_each_client() {
    if !require_kernel_privileges("a_pooled_postfix_session_is_retargeted_at_each_client") {
        return;
    }
    let (lab, postfix) = pooled_lab("pool", "smtpd_authorized_xclient_hosts = 0.0.0.0/0\n");
    let delivered = one_message_each(&lab, &postfix, &POOLED_CLIENTS);
    for (source, helo) in POOLED_CLIENTS {
        let message = delivered
            .iter()
            .find(|m| m.contains(&format!("Subject: from {helo}")))
            .unwrap_or_else(|| panic!("no message from {helo}: {delivered:?}"));
        // Postfix's Received line names the client XCLIENT gave it, HELO included.
        assert!(
            message.contains(helo) && message.contains(source),
            "{message}"
        );
    }
    let log = postfix.log_text();
    for (source, _) in POOLED_CLIENTS {
        assert!(log.contains(&format!("client=unknown[{source}]")), "{log}");
    }
    let smtp = &lab.daemon().stats()["smtp"];
    assert_eq!(smtp["upstream_reused"], 2, "{smtp}\n{log}");
}

/// Postfix as usually configured (XCLIENT for the gatekeeper's address
/// only) refuses the second XCLIENT: the message still goes through on a
/// fresh session, and the pool stops trying after that one refusal.
#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn a_postfix_refusing_to_retarget_turns_the_pool_off_and_loses_nothing() {
    if !require_kernel_privileges(
        "a_postfix_refusing_to_retarget_turns_the_pool_off_and_loses_nothing",
    ) {
        return;
    }
    let (lab, postfix) = pooled_lab("poolno", "");
    let delivered = one_message_each(&lab, &postfix, &POOLED_CLIENTS);
    assert_eq!(delivered.len(), 3);
    let log = postfix.log_text();
    assert_eq!(
        log.matches("lost connection after XCLIENT").count(),
        1,
        "one refused re-target, then no more: {log}"
    );
    let smtp = &lab.daemon().stats()["smtp"];
    assert_eq!(smtp["upstream_reused"], 0, "{smtp}");
    assert!(
        lab.daemon().log_text().contains("upstream_pool is off"),
        "{}",
        lab.daemon().log_text()
    );
}
