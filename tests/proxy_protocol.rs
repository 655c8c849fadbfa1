//! The SMTP front end behind a real HAProxy speaking the PROXY protocol:
//! clients reach the daemon only through the balancer, whose address is
//! trusted (`proxy_protocol_from`); the client it names is the one judged.
//!
//! Balancer namespace: eth0 198.51.100.2 towards the edge (198.51.100.1),
//! HAProxy on 203.0.113.1 (lo) with clients at 203.0.113.9 and .66 beside it.
//! A direct peer at 192.0.2.2 is outside `proxy_protocol_from`.

use sandbox::haproxy::{Haproxy, ProxyVersion};
use sandbox::lab::{Lab, PeerSpec};
use sandbox::require_kernel_privileges;
use sandbox::smtp::{ScriptedMta, SmtpClient};

const BALANCER: &str = "198.51.100.2";
const EDGE_FOR_BALANCER: &str = "198.51.100.1:25";
const CLIENT: &str = "203.0.113.9";
const LISTED_CLIENT: &str = "203.0.113.66";
const V1_FRONTEND: &str = "203.0.113.1:25";
const V2_FRONTEND: &str = "203.0.113.1:26";
const OUTSIDER: &str = "192.0.2.2";

struct ProxyLab {
    lab: Lab,
    _haproxy: Haproxy,
}

fn proxy_lab(tag: &str) -> ProxyLab {
    let mut lab = Lab::new(
        tag,
        vec![
            PeerSpec {
                name: "balancer",
                edge_addrs: vec!["198.51.100.1/24"],
                peer_addrs: vec!["198.51.100.2/24"],
            },
            PeerSpec {
                name: "outsider",
                edge_addrs: vec!["192.0.2.1/24"],
                peer_addrs: vec!["192.0.2.2/24"],
            },
        ],
    )
    .expect("building the lab");
    let balancer = lab.peer("balancer");
    for addr in ["203.0.113.1/32", "203.0.113.9/32", "203.0.113.66/32"] {
        balancer.ip(&["addr", "add", addr, "dev", "lo"]).unwrap();
    }
    // The balancer's address may relay (as a local HAProxy's 127.0.0.1
    // would): only the real client's address must count.
    let config = "[smtp]\nlisten = [\"0.0.0.0:25\"]\nhostname = \"mx.example.org\"\n\
         local_domains = [\"example.org\"]\nrelay_networks = [\"198.51.100.0/24\"]\n\
         upstream = \"127.0.0.1:10025\"\nproxy_protocol_from = [\"198.51.100.0/24\"]\n";
    lab.start_daemon(config).unwrap();
    let haproxy = Haproxy::start(
        lab.peer("balancer"),
        &lab.dir().join("haproxy"),
        &[
            (V1_FRONTEND, ProxyVersion::V1),
            (V2_FRONTEND, ProxyVersion::V2),
        ],
        EDGE_FOR_BALANCER,
    )
    .expect("starting haproxy");
    ProxyLab {
        lab,
        _haproxy: haproxy,
    }
}

impl ProxyLab {
    fn via_haproxy(&self, client: &str, frontend: &str) -> SmtpClient {
        SmtpClient::connect(self.lab.peer("balancer"), client, frontend).unwrap()
    }

    fn smtp_stats(&self) -> serde_json::Value {
        self.lab.daemon().stats()["smtp"].clone()
    }
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn haproxy_send_proxy_v1_and_v2_pass_the_real_client_to_the_mta() {
    if !require_kernel_privileges("haproxy_send_proxy_v1_and_v2_pass_the_real_client_to_the_mta") {
        return;
    }
    let lab = proxy_lab("pp-xclient");
    for frontend in [V1_FRONTEND, V2_FRONTEND] {
        let mta = ScriptedMta::start(
            &lab.lab.edge,
            "127.0.0.1:10025",
            &["XCLIENT NAME ADDR PORT PROTO HELO"],
        )
        .unwrap();
        let mut c = lab.via_haproxy(CLIENT, frontend);
        c.start_transaction("client.test", "<sender@client.test>")
            .unwrap();
        // The balancer's network may relay; the client behind it may not.
        let relay = c.cmd("RCPT TO:<user@victim.test>").unwrap();
        assert_eq!(relay.code, 554, "{frontend}: {relay}");
        assert_eq!(c.cmd("RCPT TO:<user@example.org>").unwrap().code, 250);
        assert_eq!(c.cmd("DATA").unwrap().code, 354);
        c.send(b"Subject: x\r\n\r\nbody\r\n").unwrap();
        assert_eq!(c.cmd(".").unwrap().code, 250);
        assert_eq!(c.cmd("QUIT").unwrap().code, 221);
        let lines = mta.lines();
        let xclient = lines
            .iter()
            .find(|l| l.starts_with("XCLIENT"))
            .unwrap_or_else(|| panic!("{frontend}: no XCLIENT in {lines:?}"));
        assert!(
            xclient.contains(&format!("ADDR={CLIENT} ")),
            "{frontend}: {xclient}"
        );
        assert!(!xclient.contains(BALANCER), "{frontend}: {xclient}");
    }
    let stats = lab.smtp_stats();
    assert_eq!(stats["relay_denied"]["foreign_domain"], 2, "{stats}");
    assert_eq!(stats["proxy_header_invalid"], 0, "{stats}");
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn a_denylisted_client_behind_a_clean_balancer_is_refused() {
    if !require_kernel_privileges("a_denylisted_client_behind_a_clean_balancer_is_refused") {
        return;
    }
    let lab = proxy_lab("pp-deny");
    sandbox::daemon::ok(lab.lab.daemon().cli(&["deny", "add", LISTED_CLIENT]));
    for frontend in [V1_FRONTEND, V2_FRONTEND] {
        let mut c = lab.via_haproxy(LISTED_CLIENT, frontend);
        let refusal = c.reply().unwrap();
        assert_eq!(refusal.code, 554, "{frontend}: {refusal}");
        assert!(c.is_closed(), "{frontend}");
        // Its neighbour through the same balancer is served.
        let mut c = lab.via_haproxy(CLIENT, frontend);
        assert_eq!(c.reply().unwrap().code, 220, "{frontend}");
        assert_eq!(c.cmd("QUIT").unwrap().code, 221);
    }
    assert_eq!(lab.smtp_stats()["refused_denylisted"], 2);
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn headers_are_required_from_the_balancer_and_refused_from_anyone_else() {
    if !require_kernel_privileges(
        "headers_are_required_from_the_balancer_and_refused_from_anyone_else",
    ) {
        return;
    }
    let lab = proxy_lab("pp-trust");
    // The balancer's own address, without a header: closed, no banner.
    let mut direct =
        SmtpClient::connect(lab.lab.peer("balancer"), BALANCER, EDGE_FOR_BALANCER).unwrap();
    direct.send(b"EHLO direct.test\r\n").unwrap();
    assert!(direct.is_closed(), "no banner, closed");
    // A header from an address outside proxy_protocol_from names nobody.
    let mut outsider =
        SmtpClient::connect(lab.lab.peer("outsider"), OUTSIDER, "192.0.2.1:25").unwrap();
    assert_eq!(outsider.reply().unwrap().code, 220);
    outsider
        .send(b"PROXY TCP4 198.51.100.9 192.0.2.1 40000 25\r\n")
        .unwrap();
    let refusal = outsider.reply().unwrap();
    assert_eq!(refusal.code, 554, "{refusal}");
    assert!(outsider.is_closed());
    let stats = lab.smtp_stats();
    assert_eq!(stats["proxy_header_invalid"], 1, "{stats}");
    assert_eq!(stats["proxy_header_untrusted"], 1, "{stats}");
    let log = lab.lab.daemon().log_text();
    assert!(
        log.contains("proxy_protocol_from") && log.contains(BALANCER),
        "the refusals are logged: {log}"
    );
}
