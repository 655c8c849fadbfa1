//! The probe against scripted in-process servers on 127.0.0.1: no root, no
//! real MTA, every verdict and error path.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use super::classify::{Outcome, Verdict};
use super::{run, Options};

/// A server answering each RCPT with `policy(path)`; `banner` is its greeting.
fn fake_server(banner: &'static str, policy: fn(&str) -> &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let _ = stream.write_all(format!("{banner}\r\n").as_bytes());
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                    let upper = line.to_ascii_uppercase();
                    let reply = if upper.starts_with("EHLO") {
                        "250-fake.example.org\r\n250 PIPELINING".to_owned()
                    } else if upper.starts_with("RCPT TO:") {
                        policy(line[8..].trim_end()).to_owned()
                    } else if upper.starts_with("QUIT") {
                        let _ = stream.write_all(b"221 bye\r\n");
                        return;
                    } else {
                        "250 ok".to_owned()
                    };
                    let _ = stream.write_all(format!("{reply}\r\n").as_bytes());
                    line.clear();
                }
            });
        }
    });
    addr
}

fn options(addr: SocketAddr, only: Option<&str>) -> Options {
    Options {
        target: addr.to_string(),
        local_domain: Some("example.org".into()),
        local_user: "postmaster".into(),
        victim: "relay-test.invalid".into(),
        sender: None,
        helo: None,
        source: None,
        timeout: Duration::from_secs(30),
        only: only.map(str::to_owned),
        starttls: false,
        smuggling: false,
    }
}

fn local_only(rcpt: &str) -> &'static str {
    if rcpt == "<postmaster@example.org>" {
        "250 ok"
    } else {
        "554 5.7.1 relay access denied"
    }
}

#[test]
fn a_server_refusing_every_trick_is_closed() {
    let addr = fake_server("220 fake.example.org ESMTP", local_only);
    let report = run(&options(addr, None), &mut |_| {}).unwrap();
    assert_eq!(report.verdict, Verdict::Closed, "{}", report.summary);
    assert_eq!(report.control.result, Outcome::Accepted);
    assert!(report.cases.len() > 40);
    assert!(report.cases.iter().all(|c| c.result == Outcome::Refused));
    // Every session ended politely and never reached DATA.
    for case in &report.cases {
        assert!(case.transcript.iter().any(|l| l.starts_with("C: QUIT")));
        assert!(!case.transcript.iter().any(|l| l.starts_with("C: DATA")));
    }
}

#[test]
fn a_catch_all_makes_tricks_at_the_local_domain_inconclusive() {
    fn catch_all(rcpt: &str) -> &'static str {
        if rcpt.ends_with("@example.org>") {
            "250 ok"
        } else {
            "554 5.7.1 relay access denied"
        }
    }
    let addr = fake_server("220 fake.example.org ESMTP", catch_all);
    let report = run(&options(addr, Some("percent")), &mut |_| {}).unwrap();
    assert_eq!(report.verdict, Verdict::Untestable, "{}", report.summary);
    assert!(report.accepted.is_empty());
    assert!(report.warnings.iter().any(|w| w.contains("catch-all")));
}

#[test]
fn out_of_step_replies_and_domain_refusals_prove_nothing() {
    fn two_replies(_: &str) -> &'static str {
        "250 ok\r\n250 ok"
    }
    let addr = fake_server("220 fake.example.org ESMTP", two_replies);
    let report = run(&options(addr, Some("foreign/plain")), &mut |_| {}).unwrap();
    assert_eq!(report.verdict, Verdict::Untestable);
    assert!(
        report.accepted.is_empty(),
        "an extra reply must not read as acceptance"
    );

    fn no_such_domain(rcpt: &str) -> &'static str {
        if rcpt == "<postmaster@example.org>" {
            "250 ok"
        } else {
            "550 5.1.2 domain not found"
        }
    }
    let addr = fake_server("220 fake.example.org ESMTP", no_such_domain);
    let report = run(&options(addr, Some("foreign/plain")), &mut |_| {}).unwrap();
    assert_eq!(report.verdict, Verdict::Untestable);
    assert_eq!(report.cases[0].result, Outcome::Error);
}

#[test]
fn terminal_escapes_in_the_banner_never_reach_the_report() {
    let addr = fake_server("220 fake.example.org \x1b[8m\u{202e}ESMTP", local_only);
    let report = run(&options(addr, Some("foreign/plain")), &mut |_| {}).unwrap();
    let banner = report.banner.unwrap();
    assert!(
        !banner.contains('\x1b') && !banner.contains('\u{202e}'),
        "{banner:?}"
    );
}

#[test]
fn one_accepted_trick_makes_it_open_and_is_named() {
    fn percent_hole(rcpt: &str) -> &'static str {
        if rcpt.contains('%') && rcpt.ends_with("@example.org>") {
            "250 ok"
        } else {
            local_only(rcpt)
        }
    }
    let addr = fake_server("220 fake.example.org ESMTP", percent_hole);
    let report = run(&options(addr, None), &mut |_| {}).unwrap();
    assert_eq!(report.verdict, Verdict::Open);
    assert!(report.accepted.contains(&"percent/percent".to_owned()));
    assert!(!report.accepted.contains(&"foreign/plain".to_owned()));
    assert!(!report.warnings.iter().any(|w| w.contains("may trust")));
}

#[test]
fn deferrals_are_flagged_and_a_refused_control_is_untestable() {
    fn defers(rcpt: &str) -> &'static str {
        if rcpt == "<postmaster@example.org>" {
            "250 ok"
        } else {
            "454 4.7.1 relay access denied"
        }
    }
    let addr = fake_server("220 fake.example.org ESMTP", defers);
    let report = run(&options(addr, Some("foreign")), &mut |_| {}).unwrap();
    assert_eq!(
        report.verdict,
        Verdict::Untestable,
        "a deferral is not a pass"
    );
    assert!(
        report.summary.contains("deferral is not a pass"),
        "{}",
        report.summary
    );
    assert!(report.warnings.iter().any(|w| w.contains("deferred")));

    fn refuses_all(_: &str) -> &'static str {
        "550 no"
    }
    let addr = fake_server("220 fake.example.org ESMTP", refuses_all);
    let report = run(&options(addr, Some("foreign")), &mut |_| {}).unwrap();
    assert_eq!(report.verdict, Verdict::Untestable);
    assert!(report
        .warnings
        .iter()
        .any(|w| w.contains("control recipient")));
}

#[test]
fn garbled_replies_and_refused_greetings_are_errors_not_passes() {
    fn garbled(_: &str) -> &'static str {
        "hello there"
    }
    let addr = fake_server("220 fake.example.org ESMTP", garbled);
    let report = run(&options(addr, Some("foreign/plain")), &mut |_| {}).unwrap();
    assert_eq!(report.verdict, Verdict::Untestable);
    assert_eq!(report.cases[0].result, Outcome::Error);

    let addr = fake_server("554 go away", local_only);
    let report = run(&options(addr, Some("foreign/plain")), &mut |_| {}).unwrap();
    assert_eq!(report.verdict, Verdict::Untestable);
    assert_eq!(
        report.control.result,
        Outcome::Error,
        "a refused greeting says nothing of relaying"
    );
    assert_eq!(report.control.stage, super::classify::Stage::Greeting);
}

#[test]
fn the_local_domain_is_guessed_from_the_banner_with_a_warning() {
    let addr = fake_server("220 mx.example.org ESMTP", local_only);
    let mut opts = options(addr, Some("foreign/plain"));
    opts.local_domain = None;
    let report = run(&opts, &mut |_| {}).unwrap();
    assert_eq!(report.local_domain, "example.org");
    assert!(report.local_domain_guessed);
    assert_eq!(report.verdict, Verdict::Closed);

    let addr = fake_server("220 ESMTP ready", local_only);
    let mut opts = options(addr, None);
    opts.local_domain = None;
    assert!(
        run(&opts, &mut |_| {}).is_err(),
        "no host name to guess from"
    );
}

#[test]
fn unreachable_servers_and_bad_input_are_errors() {
    let free = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    assert!(run(&options(free, None), &mut |_| {}).is_err());
    let addr = fake_server("220 fake.example.org ESMTP", local_only);
    let mut bad = options(addr, None);
    bad.victim = "example.org".into();
    assert!(run(&bad, &mut |_| {}).is_err(), "victim = local domain");
    let mut bad = options(addr, None);
    bad.victim = "relay.EXAMPLE.org.".into();
    assert!(
        run(&bad, &mut |_| {}).is_err(),
        "victim under the local domain"
    );
    assert!(
        run(&options(addr, Some("no-such-case")), &mut |_| {}).is_err(),
        "nothing selected"
    );
    let mut bad = options(addr, None);
    bad.sender = Some("a@b.test>\r\nRCPT TO:<x@y.test".into());
    assert!(run(&bad, &mut |_| {}).is_err(), "command injection");
}
