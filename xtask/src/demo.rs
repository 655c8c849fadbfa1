//! `cargo xtask demo`: an edge host, an attacker and a legitimate client in
//! network namespaces; the attacker is denylisted with the CLI and its SYNs
//! die in XDP while the client's connections go through.

use std::process::Command;

use anyhow::{ensure, Context, Result};
use sandbox::lab::{Lab, PeerSpec};
use sandbox::probe::{listen, outcome, Outcome};

use crate::{build, setup};

const ATTACKER: &str = "203.0.113.66";
const CLIENT: &str = "198.51.100.25";

pub fn run() -> Result<()> {
    setup::ensure_runtime()?;
    let binary = build::run()?;
    ensure!(
        setup::is_root(),
        "the demo creates network namespaces and loads XDP: run it as root"
    );
    std::env::set_var("GATEKEEPER_BIN", &binary);

    step(
        "Sandbox: edge host (gatekeeper on gk0, gk1), attacker 203.0.113.66, client 198.51.100.25",
    );
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
        ],
    )?;
    listen(&lab.edge, 25).context("port-25 listener on the edge")?;
    println!("{}", lab.config(""));
    lab.start_daemon("")?;
    println!(
        "gatekeeper run: XDP attached, control socket {}",
        lab.control_socket().display()
    );

    step("Before any listing, both reach port 25");
    show(
        "attacker",
        outcome(lab.peer("attacker"), ATTACKER, "203.0.113.1:25"),
    );
    show(
        "client  ",
        outcome(lab.peer("client"), CLIENT, "198.51.100.1:25"),
    );

    step("Operator denylists the attacker's network");
    cli(
        &lab,
        &[
            "deny",
            "add",
            "203.0.113.0/24",
            "--reason",
            "demo: spam flood",
        ],
    )?;
    cli(&lab, &["deny", "list"])?;

    step("Attacker's SYNs now die in XDP; the client is untouched");
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

    step("gatekeeper stats");
    cli(&lab, &["stats"])?;
    let dropped = lab.daemon().counter("dropped_deny");
    ensure!(
        dropped >= 3,
        "dropped_deny is {dropped}, expected at least 3"
    );

    step("Cleaning up: daemon stopped (XDP detached), namespaces removed");
    lab.take_daemon().stop()?;
    drop(lab);
    println!("\ndemo finished: {dropped} SYNs dropped in the kernel, legitimate client served");
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
