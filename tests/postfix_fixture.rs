//! The Postfix fixture itself, spoken to directly the way the gatekeeper
//! will: plaintext from loopback, XCLIENT first, then SMTP AUTH through real
//! Cyrus SASL, and relayed mail that really arrives at the sink.

use std::time::Duration;

use sandbox::postfix::{Postfix, PostfixSpec};
use sandbox::require_kernel_privileges;
use sandbox::smtp::SmtpClient;
use sandbox::Netns;

const USERS: &[(&str, &str)] = &[("alice@example.org", "s3cret pass"), ("bob", "hunter2")];

fn plain(user: &str, password: &str) -> String {
    sandbox::smtp::sasl_plain(user, password)
}

/// Where the instance runs: in a namespace, or on the host's loopback.
type Connect<'a> = &'a dyn Fn(&str) -> SmtpClient;

/// Greeting, XCLIENT (answered with a fresh 220), EHLO offering AUTH.
fn open(connect: Connect, dest: &str) -> SmtpClient {
    let mut c = connect(dest);
    let banner = c.reply().unwrap();
    assert_eq!(banner.code, 220, "{banner}");
    let xclient = c.cmd("XCLIENT ADDR=192.0.2.2 NAME=[UNAVAILABLE]").unwrap();
    assert_eq!(xclient.code, 220, "XCLIENT: {xclient}");
    let ehlo = c.cmd("EHLO frontend.test").unwrap();
    assert_eq!(ehlo.code, 250, "{ehlo}");
    assert!(
        ehlo.lines.iter().any(|l| l == "AUTH PLAIN LOGIN"),
        "EHLO must offer exactly PLAIN and LOGIN: {ehlo}"
    );
    c
}

fn expect(c: &mut SmtpClient, line: &str, code: u16) -> String {
    let reply = c.cmd(line).unwrap();
    assert_eq!(reply.code, code, "{line} -> {reply}");
    reply.text()
}

fn send_message(c: &mut SmtpClient, from: &str, rcpts: &[&str], marker: &str) {
    expect(c, &format!("MAIL FROM:<{from}>"), 250);
    for rcpt in rcpts {
        expect(c, &format!("RCPT TO:<{rcpt}>"), 250);
    }
    expect(c, "DATA", 354);
    expect(
        c,
        &format!("From: <{from}>\r\nSubject: {marker}\r\n\r\nbody of {marker}\r\n."),
        250,
    );
}

/// Every check of the brief against one instance at `listen`.
fn exercise(connect: Connect, postfix: &Postfix) {
    let dest = postfix.listen().to_string();

    // AUTH PLAIN, then relay to an outside domain and deliver locally.
    let mut c = open(connect, &dest);
    expect(
        &mut c,
        &format!("AUTH PLAIN {}", plain("alice@example.org", "s3cret pass")),
        235,
    );
    send_message(
        &mut c,
        "alice@example.org",
        &["someone@victim.test", "carol@example.org"],
        "plain-marker",
    );
    expect(&mut c, "QUIT", 221);

    // A wrong password: 535, and the session stays unauthenticated.
    let mut c = open(connect, &dest);
    expect(
        &mut c,
        &format!("AUTH PLAIN {}", plain("alice@example.org", "wrong")),
        535,
    );
    expect(&mut c, "MAIL FROM:<alice@example.org>", 250);
    let denied = expect(&mut c, "RCPT TO:<someone@victim.test>", 554);
    assert!(denied.contains("Relay access denied"), "{denied}");
    expect(&mut c, "QUIT", 221);

    // No AUTH at all: loopback is not in mynetworks.
    let mut c = open(connect, &dest);
    expect(&mut c, "MAIL FROM:<anyone@example.org>", 250);
    expect(&mut c, "RCPT TO:<someone@victim.test>", 554);
    expect(&mut c, "RCPT TO:<carol@example.org>", 250);
    expect(&mut c, "QUIT", 221);

    // AUTH LOGIN with its two 334 continuations; `bob` has no realm.
    let mut c = open(connect, &dest);
    assert_eq!(expect(&mut c, "AUTH LOGIN", 334), "VXNlcm5hbWU6"); // Username:
    assert_eq!(
        expect(&mut c, &sandbox::smtp::base64("bob@example.org"), 334),
        "UGFzc3dvcmQ6"
    ); // Password:
    expect(&mut c, &sandbox::smtp::base64("hunter2"), 235);
    send_message(
        &mut c,
        "bob@example.org",
        &["else@victim.test"],
        "login-marker",
    );
    expect(&mut c, "QUIT", 221);

    // Bare logins land in the example.org realm too.
    let mut c = open(connect, &dest);
    expect(
        &mut c,
        &format!("AUTH PLAIN {}", plain("alice", "s3cret pass")),
        235,
    );
    expect(&mut c, "QUIT", 221);
    let mut c = open(connect, &dest);
    expect(
        &mut c,
        &format!("AUTH PLAIN {}", plain("bob", "wrong")),
        535,
    );
    expect(&mut c, "QUIT", 221);

    let delivered = postfix.wait_delivered(2, Duration::from_secs(120)).unwrap();
    assert_eq!(delivered.len(), 2, "{delivered:#?}");
    let plain_msg = delivered
        .iter()
        .find(|m| m.contains("Subject: plain-marker"))
        .unwrap_or_else(|| panic!("{delivered:#?}"));
    assert!(
        plain_msg.contains("X-Rcpt-Args: <someone@victim.test>"),
        "{plain_msg}"
    );
    assert!(
        plain_msg.contains("X-Rcpt-Args: <carol@example.org>"),
        "{plain_msg}"
    );
    assert!(
        plain_msg.contains("X-Mail-Args: <alice@example.org>"),
        "{plain_msg}"
    );
    assert!(plain_msg.contains("body of plain-marker"), "{plain_msg}");
    // Postfix saw the XCLIENT address and the authenticated session.
    assert!(plain_msg.contains("(unknown [192.0.2.2])"), "{plain_msg}");
    assert!(
        plain_msg.contains("with ESMTPSA") || plain_msg.contains("with ESMTPA"),
        "{plain_msg}"
    );
    let login_msg = delivered
        .iter()
        .find(|m| m.contains("Subject: login-marker"))
        .unwrap_or_else(|| panic!("{delivered:#?}"));
    assert!(
        login_msg.contains("X-Rcpt-Args: <else@victim.test>"),
        "{login_msg}"
    );

    let log = postfix.log_text();
    assert!(
        log.contains("sasl_method=PLAIN, sasl_username=alice@example.org"),
        "{log}"
    );
    assert!(
        log.contains("sasl_method=LOGIN, sasl_username=bob@example.org"),
        "{log}"
    );
    assert!(log.contains("Relay access denied"), "{log}");
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn postfix_in_a_namespace_authenticates_and_relays_to_the_sink() {
    if !require_kernel_privileges("postfix_in_a_namespace_authenticates_and_relays_to_the_sink") {
        return;
    }
    let ns = Netns::create(&format!("gkt-pf-{}", std::process::id())).unwrap();
    let dir = tempfile::Builder::new()
        .prefix("gatekeeper-postfix-")
        .tempdir()
        .unwrap();
    let postfix = Postfix::start(
        &ns,
        &dir.path().join("postfix"),
        &PostfixSpec {
            listen: "127.0.0.1:10025",
            sink_listen: "127.0.0.1:10026",
            users: USERS,
            ..Default::default()
        },
    )
    .unwrap();
    exercise(
        &|dest| SmtpClient::connect(&ns, "127.0.0.1", dest).unwrap(),
        &postfix,
    );
    drop(postfix);
}
