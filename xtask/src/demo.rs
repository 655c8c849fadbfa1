//! `cargo xtask demo`: an edge host, an attacker and a legitimate client in
//! network namespaces. `gatekeeper probe` first finds the MTA alone an open
//! relay, then finds it closed with the gatekeeper in front (from an
//! outside IPv6 tester). The gatekeeper's SMTP front end refuses the
//! attacker's relay attempt and delivers the client's mail to the MTA
//! behind (Postfix's smtp-sink); then the attacker is denylisted with the
//! CLI and its SYNs die in XDP while the client's connections go through.
//! A spam bot listed by a DNSBL (rbldnsd on the edge's loopback) is refused
//! once with 554, and from then on its SYNs die in XDP too.

use std::process::Command;

use anyhow::{ensure, Result};
use sandbox::dnsbl::{Dataset, Rbldnsd};
use sandbox::lab::{Lab, PeerSpec};
use sandbox::probe::{outcome, Outcome};
use sandbox::smtp::{SmtpClient, SmtpSink};

use crate::{build, setup};

const ATTACKER: &str = "203.0.113.66";
const CLIENT: &str = "198.51.100.25";
const SPAM_BOT: &str = "192.0.2.99";
const TESTER: &str = "2001:db8:7::2";
const SMTP: &str = "[smtp]
listen = [\"0.0.0.0:25\", \"[::]:25\"]
hostname = \"mx.example.org\"
local_domains = [\"example.org\"]
relay_networks = [\"127.0.0.0/8\"]
upstream = \"127.0.0.1:10025\"

[dnsbl]
zones = [\"bl.demo.test*2\"]
threshold = 2
nameservers = [\"127.0.0.1:5300\"]";

pub fn run() -> Result<()> {
    setup::ensure_runtime()?;
    let binary = build::run()?;
    ensure!(
        setup::is_root(),
        "the demo creates network namespaces and loads XDP: run it as root"
    );
    std::env::set_var("GATEKEEPER_BIN", &binary);

    step("Sandbox: edge host mx.example.org (gatekeeper on gk0-gk2; smtp-sink behind it on 127.0.0.1:10025;\n   rbldnsd serving the DNSBL bl.demo.test on 127.0.0.1:5300),\n   attacker 203.0.113.66, legitimate client 198.51.100.25, DNSBL-listed spam bot 192.0.2.99");
    let mut lab = Lab::new(
        "demo",
        vec![
            PeerSpec {
                name: "attacker",
                edge_addrs: vec!["203.0.113.1/24"],
                peer_addrs: vec!["203.0.113.66/24"],
            },
            PeerSpec {
                name: "client",
                edge_addrs: vec!["198.51.100.1/24"],
                peer_addrs: vec!["198.51.100.25/24"],
            },
            PeerSpec {
                name: "tester",
                edge_addrs: vec!["2001:db8:7::1/64"],
                peer_addrs: vec!["2001:db8:7::2/64"],
            },
            PeerSpec {
                name: "spambot",
                edge_addrs: vec!["192.0.2.1/24"],
                peer_addrs: vec!["192.0.2.99/24"],
            },
        ],
    )?;
    let sink = SmtpSink::start(&lab.edge, &lab.dir().join("sink"), "127.0.0.1:10025")?;
    let _rbldnsd = Rbldnsd::start(
        &lab.edge,
        &lab.dir().join("rbldnsd"),
        "127.0.0.1:5300".parse()?,
        &[Dataset::listing("bl.demo.test", &[SPAM_BOT])],
    )?;

    step("Before: `gatekeeper probe` tests the MTA on its own (smtp-sink accepts anything)");
    probe(
        &lab.edge,
        &["127.0.0.1:10025", "--local-domain", "example.org"],
        1,
    )?;

    println!("{}", lab.config(SMTP));
    lab.start_daemon(SMTP)?;
    println!(
        "gatekeeper run: XDP attached, SMTP front end on port 25, control socket {}",
        lab.control_socket().display()
    );

    step("After: the same probe from outside (2001:db8:7::2), through the gatekeeper");
    // Allowlisted for the run, so the auto-bans do not cut the probe short.
    cli(
        &lab,
        &[
            "allow",
            "add",
            TESTER,
            "--ttl",
            "10m",
            "--reason",
            "demo: relay probe",
        ],
    )?;
    probe(
        lab.peer("tester"),
        &[
            "[2001:db8:7::1]:25",
            "--source",
            TESTER,
            "--local-domain",
            "example.org",
        ],
        0,
    )?;

    step("The attacker tries to relay through mx.example.org (percent hack, forged local sender)");
    let mut attacker = SmtpClient::connect(lab.peer("attacker"), ATTACKER, "203.0.113.1:25")?;
    attacker.start_transaction("spam.test", "<ceo@example.org>")?;
    for rcpt in [
        "<victim%elsewhere.test@example.org>",
        "<victim@elsewhere.test>",
        "<@example.org:victim@elsewhere.test>",
    ] {
        let reply = attacker.cmd(&format!("RCPT TO:{rcpt}"))?;
        println!("  RCPT TO:{rcpt}\n    -> {reply}");
        ensure!(reply.code == 554, "relay attempt was not refused");
    }
    let _ = attacker.cmd("QUIT");

    step("The legitimate client sends mail to a local user");
    let mut client = SmtpClient::connect(lab.peer("client"), CLIENT, "198.51.100.1:25")?;
    client.start_transaction("client.test", "<alice@client.test>")?;
    println!(
        "  RCPT TO:<bob@example.org> -> {}",
        client.cmd("RCPT TO:<bob@example.org>")?
    );
    println!("  DATA -> {}", client.cmd("DATA")?);
    client.send(b"Subject: hello from the demo\r\n\r\nHi Bob!\r\n")?;
    let accepted = client.cmd(".")?;
    println!("  . -> {accepted}");
    ensure!(accepted.code == 250, "legitimate mail was not accepted");
    let _ = client.cmd("QUIT");
    let delivered = sink.messages();
    ensure!(
        delivered.len() == 1,
        "smtp-sink holds {} messages, expected 1",
        delivered.len()
    );
    println!("  smtp-sink received it:");
    for line in delivered[0].lines().take(12) {
        println!("    | {line}");
    }

    step("Operator denylists the attacker's network");
    cli(
        &lab,
        &[
            "deny",
            "add",
            "203.0.113.0/24",
            "--reason",
            "demo: relay probing",
        ],
    )?;
    cli(&lab, &["deny", "list"])?;

    step("The attacker's SYNs now die in XDP; the client is untouched");
    let mut drops = 0;
    for attempt in 1..=3 {
        let result = outcome(lab.peer("attacker"), ATTACKER, "203.0.113.1:25");
        drops += u32::from(result == Outcome::TimedOut);
        show(&format!("attacker #{attempt}"), result);
    }
    let client = outcome(lab.peer("client"), CLIENT, "198.51.100.1:25");
    show("client    ", client);
    ensure!(
        drops == 3 && client == Outcome::Connected,
        "the demo did not show the expected verdicts"
    );

    step("A spam bot listed by the DNSBL connects: one DNS round trip, 554, closed");
    let mut bot = SmtpClient::connect(lab.peer("spambot"), SPAM_BOT, "192.0.2.1:25")?;
    let refusal = bot.reply()?;
    println!("  {SPAM_BOT} <- {refusal}");
    ensure!(
        refusal.code == 554,
        "the DNSBL-listed client was not refused"
    );

    step("Its address went into the kernel's DNSBL map: its next SYNs die in XDP");
    let mut bot_drops = 0;
    for attempt in 1..=2 {
        let result = outcome(lab.peer("spambot"), SPAM_BOT, "192.0.2.1:25");
        bot_drops += u32::from(result == Outcome::TimedOut);
        show(&format!("spam bot #{attempt}"), result);
    }
    ensure!(
        bot_drops == 2,
        "the DNSBL-listed client was not dropped in XDP"
    );
    cli(&lab, &["dnsbl", "list"])?;
    cli(&lab, &["check", SPAM_BOT])?;

    step("gatekeeper stats");
    cli(&lab, &["stats"])?;
    let dropped = lab.daemon().counter("dropped_deny");
    ensure!(
        dropped >= 3,
        "dropped_deny is {dropped}, expected at least 3"
    );
    let dropped_dnsbl = lab.daemon().counter("dropped_dnsbl");
    ensure!(
        dropped_dnsbl >= 2,
        "dropped_dnsbl is {dropped_dnsbl}, expected at least 2"
    );

    step("Cleaning up: daemon stopped (XDP detached), namespaces removed");
    lab.take_daemon().stop()?;
    drop(lab);
    println!("\ndemo finished: relay refused, legitimate mail delivered, {dropped} denylisted and {dropped_dnsbl} DNSBL-listed SYNs dropped in the kernel");
    Ok(())
}

/// Runs `gatekeeper probe` from `ns` and shows a few of its rows and its
/// verdict; fails unless it exits with `expected` (0 closed, 1 open).
fn probe(ns: &sandbox::Netns, args: &[&str], expected: i32) -> Result<()> {
    println!("$ gatekeeper probe {}", args.join(" "));
    let out = sandbox::daemon::relay_probe(Some(ns), args);
    let text = String::from_utf8_lossy(&out.stdout);
    const SHOWN: &[&str] = &[
        "CASE ",
        "control/",
        "foreign/plain ",
        "forged-sender/local-sender ",
        "percent/percent ",
        "bang/bang ",
        "source-route/route-local ",
        "quoted/quoted-at ",
    ];
    let mut lines = text.lines().peekable();
    let mut cases = 0;
    while let Some(line) = lines.next() {
        let is_row = !line.starts_with(' ')
            && lines
                .peek()
                .is_some_and(|l| l.trim_start().starts_with("->"));
        cases += usize::from(is_row);
        if SHOWN.iter().any(|s| line.starts_with(s)) {
            println!("  {line}");
            if is_row {
                println!("  {}", lines.next().unwrap_or_default());
            }
        } else if line.starts_with("warning:") || line.starts_with("verdict:") {
            println!("  {line}");
        }
    }
    println!(
        "  ({cases} cases in all; exit status {})",
        out.status.code().unwrap_or(-1)
    );
    ensure!(
        out.status.code() == Some(expected),
        "probe exited {:?}, expected {expected}:\n{text}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn step(title: &str) {
    println!("\n== {title}");
}

fn show(who: &str, result: Outcome) {
    let text = match result {
        Outcome::Connected => "connected",
        Outcome::Refused => "refused (RST)",
        Outcome::TimedOut => "no answer: SYN dropped",
    };
    println!("  {who} -> port 25: {text}");
}

fn cli(lab: &Lab, args: &[&str]) -> Result<()> {
    println!("$ gatekeeper {}", args.join(" "));
    let out = Command::new(sandbox::daemon::gatekeeper_bin())
        .arg("--control")
        .arg(lab.control_socket())
        .args(args)
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    ensure!(out.status.success(), "gatekeeper {} failed", args.join(" "));
    Ok(())
}
