//! Client checks at the front door, end to end: forward-confirmed reverse
//! DNS answered by a real dnsmasq (refusal and DNSBL score), and a greeting
//! that claims to be us.

use sandbox::dnsbl::Dnsmasq;
use sandbox::lab::{Lab, PeerSpec};
use sandbox::require_kernel_privileges;
use sandbox::smtp::{SmtpClient, SmtpSink};

const MX: &str = "192.0.2.1:25";
const CONFIRMED: &str = "192.0.2.2";
const LIAR: &str = "192.0.2.3";
const NO_PTR: &str = "192.0.2.4";
const RELAY_HOST: &str = "192.0.2.5";

fn lab(tag: &str) -> Lab {
    Lab::new(
        tag,
        vec![PeerSpec {
            name: "client",
            edge_addrs: vec!["192.0.2.1/24"],
            peer_addrs: vec![
                "192.0.2.2/24",
                "192.0.2.3/24",
                "192.0.2.4/24",
                "192.0.2.5/24",
            ],
        }],
    )
    .expect("building the lab")
}

fn dns(lab: &Lab) -> Dnsmasq {
    Dnsmasq::start(
        &lab.edge,
        "127.0.0.1:5353".parse().unwrap(),
        &[
            // Answered here, NXDOMAIN when unknown: no forwarding anywhere.
            "local=/2.0.192.in-addr.arpa/",
            "local=/test/",
            "host-record=mail.sender.test,192.0.2.2",
            // A PTR whose name points elsewhere: not confirmed.
            "ptr-record=3.2.0.192.in-addr.arpa,mail.bank.test",
            "host-record=mail.bank.test,198.51.100.9",
        ],
    )
    .expect("starting dnsmasq")
}

fn smtp(extra: &str) -> String {
    format!(
        "[smtp]\nlisten = [\"0.0.0.0:25\"]\nhostname = \"mx.example.org\"\n\
         local_domains = [\"example.org\"]\nrelay_networks = [\"192.0.2.5/32\"]\n\
         upstream = \"127.0.0.1:10025\"\n{extra}\n"
    )
}

fn banner(lab: &Lab, source: &str) -> u16 {
    let mut c = SmtpClient::connect(lab.peer("client"), source, MX).unwrap();
    let code = c.reply().unwrap().code;
    let _ = c.cmd("QUIT");
    code
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn clients_without_forward_confirmed_reverse_dns_are_refused_when_required() {
    if !require_kernel_privileges("clients_without_forward_confirmed_reverse_dns") {
        return;
    }
    let mut lab = lab("fcrdns");
    let _dns = dns(&lab);
    let _sink = SmtpSink::start(&lab.edge, &lab.dir().join("sink"), "127.0.0.1:10025").unwrap();
    // An empty zone list is not allowed: one zone that lists nobody.
    lab.start_daemon(&format!(
        "{}[dnsbl]\nzones = [\"bl.test\"]\nnameservers = [\"127.0.0.1:5353\"]\n",
        smtp("client_require_fcrdns = true")
    ))
    .unwrap();
    assert_eq!(banner(&lab, CONFIRMED), 220);
    let mut c = SmtpClient::connect(lab.peer("client"), LIAR, MX).unwrap();
    let refused = c.reply().unwrap();
    assert_eq!(refused.code, 450, "{refused}");
    assert!(refused.text().starts_with("4.7.25 "), "{refused}");
    assert_eq!(banner(&lab, NO_PTR), 450);
    // Relay networks are not asked about.
    assert_eq!(banner(&lab, RELAY_HOST), 220);
    let smtp = &lab.daemon().stats()["smtp"];
    assert_eq!(smtp["refused_fcrdns"], 2, "{smtp}");
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn the_fcrdns_weight_tips_a_dnsbl_score_without_a_kernel_entry() {
    if !require_kernel_privileges("the_fcrdns_weight_tips_a_dnsbl_score") {
        return;
    }
    let mut lab = lab("fcrdnsw");
    let _dns = dns(&lab);
    let _sink = SmtpSink::start(&lab.edge, &lab.dir().join("sink"), "127.0.0.1:10025").unwrap();
    lab.start_daemon(&format!(
        "{}[dnsbl]\nzones = [\"bl.test\"]\nnameservers = [\"127.0.0.1:5353\"]\nthreshold = 2\nfcrdns_weight = 2\n",
        smtp("")
    ))
    .unwrap();
    assert_eq!(banner(&lab, CONFIRMED), 220);
    assert_eq!(banner(&lab, NO_PTR), 554);
    // Not a listing: nothing goes into the kernel, the client still connects.
    let listed = sandbox::daemon::ok(lab.daemon().cli(&["dnsbl", "list", "--json"]));
    assert_eq!(listed.trim(), "[]", "{listed}");
    assert_eq!(lab.daemon().stats()["smtp"]["refused_fcrdns"], 1);
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn a_greeting_that_claims_to_be_us_is_refused_from_outside() {
    if !require_kernel_privileges("a_greeting_that_claims_to_be_us") {
        return;
    }
    let mut lab = lab("helo");
    let _sink = SmtpSink::start(&lab.edge, &lab.dir().join("sink"), "127.0.0.1:10025").unwrap();
    lab.start_daemon(&smtp("denied_sender_domains = [\"spam.test\"]"))
        .unwrap();
    let mut c = SmtpClient::connect(lab.peer("client"), CONFIRMED, MX).unwrap();
    assert_eq!(c.reply().unwrap().code, 220);
    for helo in ["mx.example.org", "example.org", "[192.0.2.1]"] {
        let reply = c.cmd(&format!("EHLO {helo}")).unwrap();
        assert_eq!(reply.code, 550, "{helo}: {reply}");
        assert!(reply.text().starts_with("5.7.1 "), "{reply}");
    }
    assert_eq!(c.cmd("EHLO client.sender.test").unwrap().code, 250);
    let denied = c.cmd("MAIL FROM:<boss@spam.test>").unwrap();
    assert_eq!(denied.code, 554, "{denied}");
    // A relay client (a local host) may greet with our name.
    let mut c = SmtpClient::connect(lab.peer("client"), RELAY_HOST, MX).unwrap();
    assert_eq!(c.reply().unwrap().code, 220);
    assert_eq!(c.cmd("EHLO mx.example.org").unwrap().code, 250);
    let smtp = &lab.daemon().stats()["smtp"];
    assert_eq!(smtp["helo_refused_claims_us"], 3, "{smtp}");
    assert_eq!(smtp["sender_denied"], 1, "{smtp}");
}
