//! Running as a systemd service: the real notify protocol (the test is the
//! service manager, listening on `NOTIFY_SOCKET`) and live reloads that keep
//! open sessions and the XDP program.

use std::os::unix::net::UnixDatagram;
use std::sync::mpsc;
use std::time::Duration;

use sandbox::daemon::ok;
use sandbox::lab::Lab;
use sandbox::probe::{listen, outcome, Outcome};
use sandbox::smtp::{SmtpClient, SmtpSink};
use sandbox::{require_kernel_privileges, PeerSpec};

const MX: &str = "192.0.2.1:25";
const CLIENT: &str = "192.0.2.2";
/// Denylisted: its SYNs to protected ports are dropped on `gk0`.
const LISTED: &str = "192.0.2.3";
/// Denylisted, behind `gk1`, which XDP joins at the reload.
const OTHER: &str = "198.51.100.2";
/// Only a failure waits this long for a notification.
const GUARD: Duration = Duration::from_secs(120);

/// The service manager's end of the notify protocol. Like systemd it reads
/// all the time (a reader thread): a full datagram queue would block the
/// daemon's sends.
struct Manager {
    messages: mpsc::Receiver<String>,
    watchdog_pings: usize,
}

impl Manager {
    fn bind(path: &std::path::Path) -> Manager {
        let socket = UnixDatagram::bind(path).unwrap();
        let (queue, messages) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                if queue.send(message).is_err() {
                    return;
                }
            }
        });
        Manager {
            messages,
            watchdog_pings: 0,
        }
    }

    fn recv(&self) -> String {
        self.messages
            .recv_timeout(GUARD)
            .expect("no notification from the daemon")
    }

    fn wait_for_watchdog_pings(&mut self, pings: usize) {
        while self.watchdog_pings < pings {
            let message = self.recv();
            assert_eq!(message.trim(), "WATCHDOG=1", "unexpected notification");
            self.watchdog_pings += 1;
        }
    }

    /// The next state change, counting watchdog pings on the way.
    fn next(&mut self) -> String {
        loop {
            let message = self.recv();
            if message.trim() == "WATCHDOG=1" {
                self.watchdog_pings += 1;
                continue;
            }
            return message;
        }
    }
}

fn smtp_table(domain: &str) -> String {
    format!(
        "[smtp]\nlisten = [\"0.0.0.0:25\"]\nhostname = \"mx.example.org\"\n\
         local_domains = [\"{domain}\"]\nrelay_networks = [\"127.0.0.0/8\"]\n\
         upstream = \"127.0.0.1:10025\"\n"
    )
}

fn config(lab: &Lab, interfaces: &str, ports: &str, domain: &str) -> String {
    let text = lab.config(&format!(
        "protected_ports = {ports}\n{}",
        smtp_table(domain)
    ));
    let (first, rest) = text.split_once('\n').unwrap();
    assert!(first.starts_with("interfaces = "), "{first}");
    format!("interfaces = {interfaces}\n{rest}")
}

/// The id of the XDP program attached to `interface`, if any.
fn xdp_prog_id(lab: &Lab, interface: &str) -> Option<u32> {
    let out = lab
        .edge
        .ip(&["-d", "link", "show", "dev", interface])
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let after = text.split("prog/xdp id ").nth(1)?;
    after.split_whitespace().next()?.parse().ok()
}

fn reload(lab: &Lab) -> (i32, String, String) {
    let out = lab.daemon().cli(&["reload"]);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn banner_code(lab: &Lab, source: &str) -> u16 {
    let mut client = SmtpClient::connect(lab.peer("client"), source, MX).unwrap();
    let code = client.reply().unwrap().code;
    let _ = client.cmd("QUIT");
    code
}

/// A new session's answer to RCPT TO:<user@domain>.
fn rcpt_code(lab: &Lab, domain: &str) -> u16 {
    let mut client = SmtpClient::connect(lab.peer("client"), CLIENT, MX).unwrap();
    client
        .start_transaction("client.test", "<sender@client.test>")
        .unwrap();
    let code = client
        .cmd(&format!("RCPT TO:<user@{domain}>"))
        .unwrap()
        .code;
    let _ = client.cmd("QUIT");
    code
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn notify_protocol_and_live_reload_keep_sessions_and_the_xdp_program() {
    if !require_kernel_privileges("notify_protocol_and_live_reload") {
        return;
    }
    let mut lab = Lab::new(
        "reload",
        vec![
            PeerSpec {
                name: "client",
                edge_addrs: vec!["192.0.2.1/24"],
                peer_addrs: vec!["192.0.2.2/24", "192.0.2.3/24"],
            },
            PeerSpec {
                name: "other",
                edge_addrs: vec!["198.51.100.1/24"],
                peer_addrs: vec!["198.51.100.2/24"],
            },
        ],
    )
    .unwrap();
    let sink = SmtpSink::start(&lab.edge, &lab.dir().join("sink"), "127.0.0.1:10025").unwrap();
    listen(&lab.edge, 2525).unwrap();
    let notify_path = lab.dir().join("notify.sock");
    let mut manager = Manager::bind(&notify_path);
    let first = config(&lab, "[\"gk0\"]", "[25]", "example.org");
    lab.spawn_daemon(
        &first,
        &[
            ("NOTIFY_SOCKET", notify_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "1000000"),
        ],
    )
    .unwrap();

    // READY=1 comes once everything it promises is there: the port answers,
    // XDP is attached, the control socket serves.
    assert_eq!(manager.next().trim(), "READY=1");
    assert_eq!(banner_code(&lab, CLIENT), 220);
    let program = xdp_prog_id(&lab, "gk0").expect("XDP attached at READY=1");
    ok(lab.daemon().cli(&["stats", "--json"]));
    assert_eq!(xdp_prog_id(&lab, "gk1"), None);
    ok(lab.daemon().cli(&["deny", "add", LISTED, OTHER]));
    assert_eq!(
        outcome(lab.peer("client"), LISTED, "192.0.2.1:2525"),
        Outcome::Connected,
        "2525 is not protected yet"
    );
    assert_eq!(
        outcome(lab.peer("other"), OTHER, "198.51.100.1:25"),
        Outcome::Connected,
        "no XDP on gk1 yet: the SYN passes (the front end refuses it)"
    );

    // A session open across the reload.
    let mut open = SmtpClient::connect(lab.peer("client"), CLIENT, MX).unwrap();
    open.start_transaction("client.test", "<sender@client.test>")
        .unwrap();
    assert_eq!(open.cmd("RCPT TO:<a@example.org>").unwrap().code, 250);

    let second = config(&lab, "[\"gk0\", \"gk1\"]", "[25, 2525]", "example.net");
    std::fs::write(lab.config_path(), &second).unwrap();
    let (code, stdout, stderr) = reload(&lab);
    assert_eq!(code, 0, "{stdout}{stderr}");
    for part in ["interfaces", "protected_ports", "smtp"] {
        assert!(stdout.contains(part), "{part} not in {stdout}");
    }
    let reloading = manager.next();
    assert!(reloading.contains("RELOADING=1"), "{reloading}");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    assert_eq!(manager.next().trim(), "READY=1");

    // The open session goes on with the settings it started with.
    assert_eq!(open.cmd("RCPT TO:<b@example.org>").unwrap().code, 250);
    assert_eq!(open.cmd("DATA").unwrap().code, 354);
    open.send(b"Subject: across a reload\r\n\r\nhi\r\n.\r\n")
        .unwrap();
    assert_eq!(open.reply().unwrap().code, 250);
    let _ = open.cmd("QUIT");
    // New sessions get the new policy.
    assert_eq!(rcpt_code(&lab, "example.org"), 554);
    assert_eq!(rcpt_code(&lab, "example.net"), 250);
    // The same program, now on both interfaces, judging the new port too.
    assert_eq!(xdp_prog_id(&lab, "gk0"), Some(program));
    assert_eq!(xdp_prog_id(&lab, "gk1"), Some(program));
    assert_eq!(
        outcome(lab.peer("client"), LISTED, "192.0.2.1:2525"),
        Outcome::TimedOut
    );
    assert_eq!(
        outcome(lab.peer("other"), OTHER, "198.51.100.1:25"),
        Outcome::TimedOut
    );

    // An invalid file is refused with every error named, and changes nothing.
    std::fs::write(
        lab.config_path(),
        second.replace("[smtp]\n", "bogus = 1\n[smtp]\nmax_errors = \"many\"\n"),
    )
    .unwrap();
    let (code, stdout, stderr) = reload(&lab);
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(stderr.contains("bogus"), "{stderr}");
    assert!(stderr.contains("smtp.max_errors"), "{stderr}");
    // Keys that need a restart are named, and nothing else is applied either.
    std::fs::write(
        lab.config_path(),
        config(&lab, "[\"gk0\"]", "[25]", "example.org").replace("/state\"", "/state-moved\""),
    )
    .unwrap();
    let (code, stdout, stderr) = reload(&lab);
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(stderr.contains("state_dir"), "{stderr}");
    assert_eq!(rcpt_code(&lab, "example.net"), 250);
    assert_eq!(xdp_prog_id(&lab, "gk1"), Some(program));

    // SIGHUP reloads too: back to the first config, gk1 detached.
    std::fs::write(lab.config_path(), &first).unwrap();
    lab.daemon().hangup().unwrap();
    assert!(manager.next().contains("RELOADING=1"));
    assert_eq!(manager.next().trim(), "READY=1");
    assert_eq!(rcpt_code(&lab, "example.org"), 250);
    assert_eq!(xdp_prog_id(&lab, "gk1"), None);
    assert_eq!(xdp_prog_id(&lab, "gk0"), Some(program));

    // The watchdog is pinged while the daemon runs.
    manager.wait_for_watchdog_pings(2);

    let daemon = lab.take_daemon();
    daemon.terminate().unwrap();
    assert_eq!(manager.next().trim(), "STOPPING=1");
    let status = daemon.stop().unwrap();
    assert!(status.success(), "{status}");
    // Nothing answers now: exit 1, not 2.
    let out = std::process::Command::new(sandbox::daemon::gatekeeper_bin())
        .args(["--control"])
        .arg(lab.control_socket())
        .arg("reload")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        sink.messages().len(),
        1,
        "the message sent across the reload"
    );
}
