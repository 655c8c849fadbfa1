//! `gatekeeper probe` against real servers started here: a closed Postfix,
//! one opened by the classic misconfiguration (trusting a local MAIL FROM),
//! one that trusts the prober's address, and the gatekeeper in front of an
//! accept-everything smtp-sink. The probe runs from its own namespace as a
//! separate process, exactly as an operator would run it.

use std::process::Output;

use sandbox::daemon::relay_probe;
use sandbox::lab::{Lab, PeerSpec};
use sandbox::postfix::{Postfix, PostfixSpec};
use sandbox::require_kernel_privileges;
use sandbox::smtp::{test_certificate, SmtpSink};
use serde_json::Value;

const TESTER: &str = "192.0.2.2";

/// Nothing may leave, whatever the probe gets accepted.
const DISCARD_ALL: &str = "local_transport = discard:\nrelay_transport = discard:\n\
                           default_transport = discard:\nrelayhost =\n";

fn lab(tag: &str) -> Lab {
    Lab::new(
        tag,
        vec![PeerSpec {
            name: "tester",
            edge_addrs: vec!["192.0.2.1/24"],
            peer_addrs: vec!["192.0.2.2/24"],
        }],
    )
    .expect("building the lab")
}

fn postfix(lab: &Lab, name: &str, listen: &str, sink: &str, extra: &str) -> Postfix {
    Postfix::start(
        &lab.edge,
        &lab.dir().join(name),
        &PostfixSpec {
            listen,
            sink_listen: sink,
            users: &[],
            main_cf_extra: &format!("{DISCARD_ALL}{extra}"),
        },
    )
    .unwrap_or_else(|e| panic!("starting the {name} Postfix: {e:#}"))
}

/// Runs the probe from the tester with `--json`; returns its exit status and report.
fn probe_json(lab: &Lab, target: &str, extra: &[&str]) -> (i32, Value, Output) {
    let mut args = vec![target, "--source", TESTER, "--timeout", "60s", "--json"];
    args.extend_from_slice(extra);
    let out = relay_probe(Some(lab.peer("tester")), &args);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "probe {target}: no JSON report ({e}): status {}, stdout {}, stderr {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().expect("exit status"), report, out)
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {value}"))
        .iter()
        .map(|v| v.as_str().expect("a string").to_owned())
        .collect()
}

fn cases_with(report: &Value, result: &str) -> Vec<String> {
    report["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .filter(|c| c["result"] == result)
        .map(|c| {
            format!(
                "{}/{}",
                c["family"].as_str().unwrap(),
                c["case"].as_str().unwrap()
            )
        })
        .collect()
}

fn assert_nothing_queued(postfix: &Postfix) {
    let queue = postfix.queue_text();
    assert!(queue.contains("Mail queue is empty"), "{queue}");
    assert!(
        postfix.delivered().is_empty(),
        "the probe got mail delivered"
    );
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn probe_tells_an_open_postfix_from_a_closed_one() {
    if !require_kernel_privileges("probe_tells_an_open_postfix_from_a_closed_one") {
        return;
    }
    let lab = lab("prbpf");
    let closed = postfix(&lab, "closed", "192.0.2.1:2525", "127.0.0.1:10026", "");
    // The guide's classic hole: relay allowed for any MAIL FROM in the local domain.
    let open = postfix(
        &lab,
        "open",
        "192.0.2.1:2526",
        "127.0.0.1:10027",
        "smtpd_relay_restrictions = permit_mynetworks, \
         check_sender_access inline:{ example.org=OK }, reject_unauth_destination\n",
    );

    let (status, report, out) =
        probe_json(&lab, "192.0.2.1:2525", &["--local-domain", "example.org"]);
    assert_eq!(
        status,
        0,
        "closed Postfix: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(report["verdict"], "closed", "{}", report["summary"]);
    assert_eq!(report["control"]["result"], "accepted");
    assert!(strings(&report["accepted"]).is_empty());
    assert!(cases_with(&report, "error").is_empty(), "{report}");
    let cases = report["cases"].as_array().unwrap();
    assert!(cases.len() >= 40, "only {} cases ran", cases.len());
    // The default local domain comes from the banner (mx.example.org).
    let (status, guessed, _) = probe_json(&lab, "192.0.2.1:2525", &["--only", "percent"]);
    assert_eq!(status, 0);
    assert_eq!(guessed["local_domain"], "example.org");
    assert_eq!(guessed["local_domain_guessed"], true);
    assert!(guessed["cases"].as_array().unwrap().len() < cases.len());
    // A control that is refused makes the run meaningless: exit 2.
    let (status, report, _) = probe_json(
        &lab,
        "192.0.2.1:2525",
        &[
            "--local-domain",
            "example.org",
            "--local-user",
            "no\"body",
            "--only",
            "percent/percent",
        ],
    );
    assert_eq!(status, 2, "{}", report["summary"]);
    assert_eq!(report["verdict"], "untestable");
    assert_ne!(report["control"]["result"], "accepted");
    assert_nothing_queued(&closed);

    let (status, report, _) =
        probe_json(&lab, "192.0.2.1:2526", &["--local-domain", "example.org"]);
    assert_eq!(status, 1, "open Postfix: {}", report["summary"]);
    assert_eq!(report["verdict"], "open");
    let accepted = strings(&report["accepted"]);
    assert!(
        accepted.contains(&"forged-sender/local-sender".to_owned()),
        "{accepted:?}"
    );
    assert!(
        !accepted.contains(&"foreign/plain".to_owned()),
        "a plain foreign relay must still be refused: {accepted:?}"
    );
    assert!(
        !strings(&report["warnings"])
            .iter()
            .any(|w| w.contains("may trust")),
        "no trusted-address warning when only tricks got through"
    );
    // The readable form names the tricks too.
    let table = relay_probe(
        Some(lab.peer("tester")),
        &[
            "192.0.2.1:2526",
            "--source",
            TESTER,
            "--local-domain",
            "example.org",
            "--only",
            "forged-sender",
        ],
    );
    assert_eq!(table.status.code(), Some(1));
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("OPEN RELAY"), "{text}");
    assert!(text.contains("forged-sender/local-sender"), "{text}");
    assert_nothing_queued(&open);
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn probe_warns_of_a_trusted_address_and_refuses_to_guess() {
    if !require_kernel_privileges("probe_warns_of_a_trusted_address_and_refuses_to_guess") {
        return;
    }
    let lab = lab("prbtr");
    // Trusts the tester's network: everything is accepted from there.
    let trusting = postfix(
        &lab,
        "trusting",
        "192.0.2.1:2527",
        "127.0.0.1:10028",
        "mynetworks = 192.0.2.0/24\n",
    );
    let (status, report, _) = probe_json(
        &lab,
        "192.0.2.1:2527",
        &["--local-domain", "example.org", "--only", "foreign"],
    );
    assert_eq!(status, 1);
    assert!(
        strings(&report["warnings"])
            .iter()
            .any(|w| w.contains("may trust this client's address (192.0.2.2)")),
        "{}",
        report["warnings"]
    );

    assert_nothing_queued(&trusting);

    // No server at all, and bad input: exit 2, never 1.
    let nothing = relay_probe(
        Some(lab.peer("tester")),
        &["192.0.2.1:2599", "--timeout", "60s"],
    );
    assert_eq!(nothing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&nothing.stderr).contains("could not test"));
    let injected = relay_probe(
        Some(lab.peer("tester")),
        &["192.0.2.1:2527", "--victim", "x.test\r\nRCPT TO:<a@b.test>"],
    );
    assert_eq!(injected.status.code(), Some(2));
    assert!(injected.stdout.is_empty());
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn probe_finds_the_gatekeeper_closed_in_front_of_an_open_mta() {
    if !require_kernel_privileges("probe_finds_the_gatekeeper_closed_in_front_of_an_open_mta") {
        return;
    }
    let mut lab = lab("prbgk");
    let sink = SmtpSink::start(&lab.edge, &lab.dir().join("sink"), "127.0.0.1:10025").unwrap();

    // The MTA alone, from its own host: it accepts anything.
    let direct = relay_probe(
        Some(&lab.edge),
        &[
            "127.0.0.1:10025",
            "--local-domain",
            "example.org",
            "--only",
            "foreign/plain",
            "--json",
        ],
    );
    assert_eq!(direct.status.code(), Some(1));
    let direct: Value = serde_json::from_slice(&direct.stdout).unwrap();
    assert!(strings(&direct["warnings"])
        .iter()
        .any(|w| w.contains("may trust")));

    let (cert, key, _) = test_certificate(lab.dir(), "mx.example.org");
    lab.start_daemon(&format!(
        "[smtp]\nlisten = [\"0.0.0.0:25\"]\nhostname = \"mx.example.org\"\n\
         local_domains = [\"example.org\"]\nupstream = \"127.0.0.1:10025\"\n\
         tls_cert = \"{}\"\ntls_key = \"{}\"\n\n[bans]\nenabled = false\n",
        cert.display(),
        key.display()
    ))
    .unwrap();

    let (status, report, out) = probe_json(
        &lab,
        "192.0.2.1:25",
        &["--local-domain", "example.org", "--starttls", "--smuggling"],
    );
    assert_eq!(
        status,
        0,
        "{}\n{}\n{}",
        report["summary"],
        String::from_utf8_lossy(&out.stderr),
        lab.daemon().log_text()
    );
    assert_eq!(report["verdict"], "closed");
    assert_eq!(
        report["control"]["tls"], true,
        "STARTTLS was offered and used"
    );
    assert!(cases_with(&report, "error").is_empty(), "{report}");
    let smuggling = &report["smuggling"];
    assert_eq!(smuggling["forms"][0]["result"], "taken", "{smuggling}");
    assert!(strings(&smuggling["taken"]).is_empty(), "{smuggling}");
    for form in &smuggling["forms"].as_array().unwrap()[1..] {
        assert_ne!(form["result"], "taken", "{form}");
        assert_ne!(form["result"], "error", "{form}");
    }
    // Only the standard form's message reached the MTA: one harmless
    // message, to the local recipient.
    let messages = sink.messages();
    assert_eq!(messages.len(), 1, "{messages:#?}");
    assert!(
        messages[0].contains("postmaster@example.org"),
        "{}",
        messages[0]
    );
}
