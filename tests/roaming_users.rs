//! Roaming users end to end: a real Postfix with Cyrus SASL behind the
//! gatekeeper. AUTH crosses the gatekeeper only after STARTTLS, Postfix
//! checks the password, and relay to an outside domain really arrives at the
//! sink behind Postfix. Relay grants (POP-before-SMTP) and greylisting, with
//! smtp-sink behind, run out and survive a restart as they should.

use sandbox::daemon::ok;
use sandbox::lab::{Lab, PeerSpec};
use sandbox::postfix::{Postfix, PostfixSpec};
use sandbox::smtp::{sasl_plain, test_certificate, SmtpClient, SmtpSink};
use sandbox::{eventually, require_kernel_privileges, PATIENCE};

const ROAMER: &str = "192.0.2.2";
const MX: &str = "192.0.2.1:25";
const MX_V6: &str = "[2001:db8:1::1]:25";

fn client_lab(tag: &str) -> Lab {
    Lab::new(
        tag,
        vec![PeerSpec {
            name: "client",
            edge_addrs: vec!["192.0.2.1/24", "2001:db8:1::1/64"],
            peer_addrs: vec![
                "192.0.2.2/24",
                "192.0.2.3/24",
                "192.0.2.4/24",
                "2001:db8:1::2/64",
            ],
        }],
    )
    .expect("building the lab")
}

fn smtp_config(upstream: &str, extra: &str) -> String {
    format!(
        "[smtp]\nlisten = [\"0.0.0.0:25\", \"[::]:25\"]\nhostname = \"mx.example.org\"\n\
         local_domains = [\"example.org\"]\nupstream = \"{upstream}\"\n{extra}\n"
    )
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn auth_after_starttls_lets_a_roaming_user_relay_through_postfix() {
    if !require_kernel_privileges("auth_after_starttls_lets_a_roaming_user_relay_through_postfix") {
        return;
    }
    let mut lab = client_lab("auth");
    let postfix = Postfix::start(
        &lab.edge,
        &lab.dir().join("postfix"),
        &PostfixSpec {
            listen: "127.0.0.1:10025",
            sink_listen: "127.0.0.1:10026",
            users: &[("alice@example.org", "correct horse")],
            main_cf_extra: "",
        },
    )
    .expect("starting Postfix with SASL");
    let (cert, key, der) = test_certificate(lab.dir(), "mx.example.org");
    let extra = format!(
        "auth = \"upstream\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
        cert.display(),
        key.display()
    );
    lab.start_daemon(&smtp_config("127.0.0.1:10025", &extra))
        .unwrap();

    // In clear: AUTH is neither offered nor accepted.
    let mut c = SmtpClient::connect(lab.peer("client"), ROAMER, MX).unwrap();
    assert_eq!(c.reply().unwrap().code, 220);
    let ehlo = c.cmd("EHLO roamer.test").unwrap();
    assert!(!ehlo.lines.iter().any(|l| l.starts_with("AUTH")), "{ehlo}");
    let refused = c
        .cmd(&format!(
            "AUTH PLAIN {}",
            sasl_plain("alice@example.org", "correct horse")
        ))
        .unwrap();
    assert_eq!(refused.code, 538, "{refused}");

    // After STARTTLS: Postfix's mechanisms are offered; a wrong password is
    // Postfix's 535, and relay stays refused.
    let mut tls = c.starttls(&der, "mx.example.org").unwrap();
    let ehlo = tls.cmd("EHLO roamer.test").unwrap();
    assert!(ehlo.lines.iter().any(|l| l == "AUTH PLAIN LOGIN"), "{ehlo}");
    let wrong = tls
        .cmd(&format!(
            "AUTH PLAIN {}",
            sasl_plain("alice@example.org", "guess")
        ))
        .unwrap();
    assert_eq!(wrong.code, 535, "{wrong}");
    assert_eq!(tls.cmd("MAIL FROM:<alice@example.org>").unwrap().code, 250);
    assert_eq!(tls.cmd("RCPT TO:<friend@victim.test>").unwrap().code, 554);
    assert_eq!(tls.cmd("RSET").unwrap().code, 250);

    // The right password: relay to the outside, delivered behind Postfix.
    let right = tls
        .cmd(&format!(
            "AUTH PLAIN {}",
            sasl_plain("alice@example.org", "correct horse")
        ))
        .unwrap();
    assert_eq!(right.code, 235, "{right}");
    assert_eq!(tls.cmd("MAIL FROM:<alice@example.org>").unwrap().code, 250);
    let rcpt = tls.cmd("RCPT TO:<friend@victim.test>").unwrap();
    assert_eq!(rcpt.code, 250, "{rcpt}");
    assert_eq!(tls.cmd("DATA").unwrap().code, 354);
    let queued = tls
        .cmd("Subject: roaming\r\n\r\nsent from the road\r\n.")
        .unwrap();
    assert_eq!(queued.code, 250, "{queued}");
    assert_eq!(tls.cmd("QUIT").unwrap().code, 221);

    let delivered = postfix
        .wait_delivered(1, PATIENCE)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.daemon().log_text()));
    assert!(
        delivered[0].contains("sent from the road"),
        "{}",
        delivered[0]
    );
    assert!(
        delivered[0].contains("friend@victim.test"),
        "{}",
        delivered[0]
    );
    // Postfix saw the roaming user's own address (XCLIENT) and its SASL login.
    let log = postfix.log_text();
    assert!(log.contains("client=unknown[192.0.2.2]"), "{log}");
    assert!(log.contains("sasl_username=alice@example.org"), "{log}");

    let smtp = &lab.daemon().stats()["smtp"];
    assert_eq!(smtp["auth_successes"], 1, "{smtp}");
    assert_eq!(smtp["auth_failures"], 1, "{smtp}");
    assert_eq!(smtp["auth_refused"], 1, "{smtp}");
    assert_eq!(smtp["relay_by_auth"], 1, "{smtp}");
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn a_relay_grant_lets_an_address_relay_until_it_expires_and_survives_a_restart() {
    if !require_kernel_privileges("a_relay_grant_lets_an_address_relay_until_it_expires") {
        return;
    }
    let mut lab = client_lab("grant");
    let sink = SmtpSink::start(&lab.edge, &lab.dir().join("sink"), "127.0.0.1:10025").unwrap();
    let config = smtp_config("127.0.0.1:10025", "");
    lab.start_daemon(&config).unwrap();
    let rcpt = |lab: &Lab, source: &str| {
        let mut c = SmtpClient::connect(lab.peer("client"), source, MX).unwrap();
        c.start_transaction("roamer.test", "<alice@example.org>")
            .unwrap();
        let code = c.cmd("RCPT TO:<friend@victim.test>").unwrap().code;
        let _ = c.cmd("QUIT");
        code
    };
    assert_eq!(rcpt(&lab, ROAMER), 554);

    // What a Dovecot post-login hook runs.
    let granted = ok(lab.daemon().cli(&["relay", "grant", ROAMER, "--ttl", "1h"]));
    assert!(granted.contains("may relay"), "{granted}");
    ok(lab
        .daemon()
        .cli(&["relay", "grant", "192.0.2.3", "--ttl", "3s"]));
    assert_eq!(rcpt(&lab, ROAMER), 250);
    assert_eq!(rcpt(&lab, "192.0.2.3"), 250);
    // Exact addresses only: the neighbour is not granted.
    assert_eq!(rcpt(&lab, "192.0.2.4"), 554);
    let listed: serde_json::Value =
        serde_json::from_str(&ok(lab.daemon().cli(&["relay", "list", "--json"]))).unwrap();
    let ips: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["ip"].as_str().unwrap())
        .collect();
    assert_eq!(ips, [ROAMER, "192.0.2.3"], "{listed}");
    assert!(listed[0]["expiry"].as_u64().unwrap() > listed[1]["expiry"].as_u64().unwrap());

    // The short grant runs out.
    eventually("the 3 s grant expires", || rcpt(&lab, "192.0.2.3") == 554);

    // Bad input: a clear error, exit 2.
    let bad = lab.daemon().cli(&["relay", "grant", "not-an-ip"]);
    assert_eq!(bad.status.code(), Some(2));
    let bad = lab.daemon().cli(&["relay", "grant", ROAMER, "--ttl", "0s"]);
    assert_eq!(bad.status.code(), Some(2));
    let missing = lab.daemon().cli(&["relay", "revoke", "192.0.2.3"]);
    assert_eq!(missing.status.code(), Some(2), "{missing:?}");

    // The long grant survives a restart; then it is revoked.
    lab.take_daemon().stop().unwrap();
    lab.start_daemon(&config).unwrap();
    assert_eq!(rcpt(&lab, ROAMER), 250);
    ok(lab.daemon().cli(&["relay", "revoke", ROAMER]));
    assert_eq!(rcpt(&lab, ROAMER), 554);
    assert!(sink.messages().is_empty(), "nothing was sent: only RCPTs");
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn greylisting_defers_a_first_attempt_passes_the_retry_and_remembers_the_network() {
    if !require_kernel_privileges("greylisting_defers_a_first_attempt") {
        return;
    }
    let mut lab = client_lab("grey");
    let sink = SmtpSink::start(&lab.edge, &lab.dir().join("sink"), "127.0.0.1:10025").unwrap();
    let config = format!(
        "{}[greylist]\nenabled = true\ndelay = \"2s\"\nretry_window = \"1h\"\n",
        smtp_config("127.0.0.1:10025", "")
    );
    lab.start_daemon(&config).unwrap();
    let deliver = |lab: &Lab, source: &str, from: &str| {
        let dest = if source.contains(':') { MX_V6 } else { MX };
        let mut c = SmtpClient::connect(lab.peer("client"), source, dest).unwrap();
        c.start_transaction("sender.test", from).unwrap();
        let reply = c.cmd("RCPT TO:<user@example.org>").unwrap();
        if reply.code == 250 {
            assert_eq!(c.cmd("DATA").unwrap().code, 354);
            assert_eq!(c.cmd("Subject: grey\r\n\r\nhello\r\n.").unwrap().code, 250);
        }
        let _ = c.cmd("QUIT");
        reply
    };
    let first = deliver(&lab, ROAMER, "<news@sender.test>");
    assert_eq!(first.code, 451, "{first}");
    assert!(first.text().starts_with("4.7.1 "), "{first}");
    assert!(sink.messages().is_empty());
    // A retry from a neighbour of the same /24 passes once the delay is over.
    eventually("the retry passes after the delay", || {
        deliver(&lab, "192.0.2.3", "<news@sender.test>").code == 250
    });
    assert_eq!(sink.messages().len(), 1);
    let smtp = &lab.daemon().stats()["smtp"];
    assert!(smtp["greylist_deferred"].as_u64().unwrap() >= 1, "{smtp}");
    assert_eq!(smtp["greylist_passed"], 1, "{smtp}");

    // The network is remembered, across a clean restart: a new triplet passes.
    lab.take_daemon().stop().unwrap();
    lab.start_daemon(&config).unwrap();
    assert_eq!(deliver(&lab, ROAMER, "<other@sender.test>").code, 250);
    assert_eq!(lab.daemon().stats()["smtp"]["greylist_known"], 1);
    // Another network is greylisted.
    assert_eq!(
        deliver(&lab, "2001:db8:1::2", "<news@sender.test>").code,
        451
    );
    let greylist = &lab.daemon().stats()["greylist"];
    assert_eq!(greylist["passed"], 1, "{greylist}");
}
