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
    let mut lab = Lab::new(
        tag,
        vec![PeerSpec {
            name: "sender",
            edge_addrs: vec!["192.0.2.1/24"],
            peer_addrs: vec!["192.0.2.2/24"],
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
         local_domains = {local_domains}\nupstream = \"127.0.0.1:10025\"\n"
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
fn without_dsn_behind_it_is_neither_offered_nor_accepted() {
    if !require_kernel_privileges("without_dsn_behind_it_is_neither_offered_nor_accepted") {
        return;
    }
    let (lab, _postfix) = lab_with_postfix("nodsn", "smtpd_discard_ehlo_keywords = dsn\n");
    let mut c = SmtpClient::connect(lab.peer("sender"), SENDER, MX).unwrap();
    assert_eq!(c.reply().unwrap().code, 220);
    let ehlo = c.cmd("EHLO sender.test").unwrap();
    assert!(!ehlo.lines.iter().any(|l| l == "DSN"), "{ehlo}");
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
    for lookalike in ["<x@ex\u{430}mple.org>", "<x%victim.test@exämple.org>"] {
        let reply = c.cmd(&format!("RCPT TO:{lookalike}")).unwrap();
        assert!(reply.code >= 500, "{lookalike}: {reply}");
    }
    assert_eq!(c.cmd("DATA").unwrap().code, 354);
    let queued = c
        .cmd("Subject: =?UTF-8?Q?gr=C3=BC=C3=9Fe?=\r\n\r\ngrüße\r\n.")
        .unwrap();
    assert_eq!(queued.code, 250, "{queued}");
    let _ = c.cmd("QUIT");
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
