//! The daemon's life cycle: a clean stop that tells SMTP sessions and always
//! tears the kernel side down, a crash whose leftovers the next start
//! reclaims, and the SMTP front end refusing listed clients that XDP did not
//! judge.

use sandbox::daemon::ok;
use sandbox::lab::Lab;
use sandbox::probe::{outcome, Outcome};
use sandbox::require_kernel_privileges;
use sandbox::smtp::{SmtpClient, SmtpSink};

const CLIENT: &str = "192.0.2.2";
const MX: &str = "192.0.2.1:25";

fn smtp_config(listen: &str, extra: &str) -> String {
    format!(
        "[smtp]\nlisten = [\"{listen}\"]\nhostname = \"mx.example.org\"\n\
         local_domains = [\"example.org\"]\nrelay_networks = [\"127.0.0.0/8\"]\n\
         upstream = \"127.0.0.1:10025\"\n{extra}\n"
    )
}

fn xdp_attached(lab: &Lab) -> bool {
    let link = lab.edge.ip(&["link", "show", "gk0"]).unwrap();
    String::from_utf8_lossy(&link.stdout).contains("xdp")
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn clean_stop_tells_sessions_finishes_data_and_always_tears_down() {
    if !require_kernel_privileges("clean_stop_tells_sessions_finishes_data_and_always_tears_down") {
        return;
    }
    let mut lab = Lab::two_hosts("stop", "client").unwrap();
    let sink = SmtpSink::start(&lab.edge, &lab.dir().join("sink"), "127.0.0.1:10025").unwrap();
    // The pre-greet hook holds daemon state in every session: the old
    // teardown was skipped whenever any session outlived the accept loop.
    lab.start_daemon(&smtp_config(
        "0.0.0.0:25",
        "greet_wait = \"0s\"\npregreet_deny_ttl = \"1h\"",
    ))
    .unwrap();
    assert!(xdp_attached(&lab));
    let peer = lab.peer("client");

    let mut idle = SmtpClient::connect(peer, CLIENT, MX).unwrap();
    assert_eq!(idle.reply().unwrap().code, 220);
    assert_eq!(idle.cmd("EHLO client.test").unwrap().code, 250);

    let mut sending = SmtpClient::connect(peer, CLIENT, MX).unwrap();
    sending
        .start_transaction("client.test", "<sender@client.test>")
        .unwrap();
    assert_eq!(sending.cmd("RCPT TO:<user@example.org>").unwrap().code, 250);
    assert_eq!(sending.cmd("DATA").unwrap().code, 354);
    sending
        .send(b"Subject: in flight\r\n\r\nfirst half\r\n")
        .unwrap();

    let daemon = lab.take_daemon();
    let log = daemon.log_path().to_owned();
    daemon.terminate().unwrap();

    // The idle session is told, whenever the daemon gets to it.
    let told = idle.reply().unwrap();
    assert_eq!(told.code, 421, "{told}");
    assert!(told.text().contains("4.3.2"), "{told}");
    assert!(told.text().contains("Service shutting down"), "{told}");

    // The message in flight is finished and gets the MTA's verdict first.
    sending
        .send(b"second half, sent after SIGTERM\r\n.\r\n")
        .unwrap();
    let accepted = sending.reply().unwrap();
    assert_eq!(accepted.code, 250, "{accepted}");
    let next = sending.reply().unwrap();
    assert_eq!(next.code, 421, "{next}");

    let status = daemon.stop().unwrap();
    assert!(status.success(), "daemon exit status {status}");
    assert!(
        sink.messages()
            .iter()
            .any(|m| m.contains("second half, sent after SIGTERM")),
        "the in-flight message reached the MTA whole"
    );
    assert!(!xdp_attached(&lab), "XDP still attached after stop");
    assert!(
        !lab.bpffs_dir().join("DENY_V4").exists(),
        "pins left after a clean stop"
    );
    assert!(!lab.control_socket().exists(), "control socket left");
    let log = std::fs::read_to_string(log).unwrap();
    assert!(log.contains("kernel teardown complete"), "{log}");
    assert_eq!(
        outcome(lab.peer("client"), CLIENT, MX),
        Outcome::Refused,
        "nothing listens on :25 any more, and nothing drops"
    );
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn pins_of_a_killed_daemon_are_reclaimed_at_the_next_start() {
    if !require_kernel_privileges("pins_of_a_killed_daemon_are_reclaimed_at_the_next_start") {
        return;
    }
    let mut lab = Lab::two_hosts("reclaim", "client").unwrap();
    sandbox::probe::listen(&lab.edge, 25).unwrap();
    lab.start_daemon("").unwrap();
    ok(lab.daemon().cli(&["deny", "add", CLIENT]));
    lab.take_daemon().crash().unwrap();
    assert!(
        lab.bpffs_dir().join("DENY_V4").exists(),
        "kill -9 leaves the pins (nothing could remove them)"
    );
    assert!(!xdp_attached(&lab), "the XDP link died with the process");

    lab.start_daemon("").unwrap();
    let log = std::fs::read_to_string(lab.daemon().log_path()).unwrap();
    let reclaimed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("reclaimed the map pins"))
        .collect();
    assert_eq!(reclaimed.len(), 1, "one log line says so:\n{log}");
    assert_eq!(outcome(lab.peer("client"), CLIENT, MX), Outcome::TimedOut);
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn front_end_refuses_listed_clients_on_a_port_xdp_does_not_protect() {
    if !require_kernel_privileges("front_end_refuses_listed_clients_on_a_port_xdp_does_not_protect")
    {
        return;
    }
    let mut lab = Lab::new(
        "unprotected",
        vec![sandbox::PeerSpec {
            name: "client",
            edge_addrs: vec!["192.0.2.1/24"],
            peer_addrs: vec!["192.0.2.2/24", "192.0.2.3/24", "192.0.2.4/24"],
        }],
    )
    .unwrap();
    let sink = SmtpSink::start(&lab.edge, &lab.dir().join("sink"), "127.0.0.1:10025").unwrap();
    lab.start_daemon(&smtp_config("0.0.0.0:2525", "")).unwrap();
    let log = std::fs::read_to_string(lab.daemon().log_path()).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("2525") && l.contains("protected_ports")),
        "a listen port XDP does not protect is a warning at start:\n{log}"
    );
    ok(lab.daemon().cli(&["deny", "add", "192.0.2.0/24"]));
    ok(lab.daemon().cli(&["allow", "add", "192.0.2.3"]));
    let peer = lab.peer("client");
    let edge = "192.0.2.1:2525";

    // XDP passes SYNs to 2525, so the connection is made; the front end refuses it.
    let mut listed = SmtpClient::connect(peer, "192.0.2.2", edge).unwrap();
    let refused = listed.reply().unwrap();
    assert_eq!(refused.code, 554, "{refused}");
    assert!(refused.text().starts_with("5.7.1"), "{refused}");
    assert!(listed.is_closed(), "no service after the refusal");

    // The allowlist beats the denylist here as it does in XDP.
    let mut allowed = SmtpClient::connect(peer, "192.0.2.3", edge).unwrap();
    allowed
        .start_transaction("client.test", "<a@client.test>")
        .unwrap();
    assert_eq!(allowed.cmd("RCPT TO:<user@example.org>").unwrap().code, 250);
    assert_eq!(allowed.cmd("DATA").unwrap().code, 354);
    allowed
        .send(b"Subject: allowed\r\n\r\nhi\r\n.\r\n")
        .unwrap();
    assert_eq!(allowed.reply().unwrap().code, 250);
    let _ = allowed.cmd("QUIT");

    // Once the entry is gone, the same client is served.
    ok(lab.daemon().cli(&["deny", "del", "192.0.2.0/24"]));
    let mut cleared = SmtpClient::connect(peer, "192.0.2.4", edge).unwrap();
    assert_eq!(cleared.reply().unwrap().code, 220);
    let _ = cleared.cmd("QUIT");

    let smtp = &lab.daemon().stats()["smtp"];
    assert_eq!(smtp["refused_denylisted"], 1, "{smtp:#}");
    assert_eq!(
        sink.messages().len(),
        1,
        "only the allowlisted client's message"
    );
}
