//! Auto-bans end to end: an outside client that keeps trying to relay is
//! banned into the kernel denylist and its SYNs die in XDP; an allowlisted
//! one never is; `bans clear` restores access; a ban runs out by itself.

use sandbox::daemon::ok;
use sandbox::lab::{Lab, PeerSpec};
use sandbox::probe::{outcome, Outcome};
use sandbox::smtp::{SmtpClient, SmtpSink};
use sandbox::{eventually, require_kernel_privileges};

const ABUSER: &str = "192.0.2.2";
const ALLOWED: &str = "192.0.2.4";
const ABUSER_V6: &str = "2001:db8:1::2";
const MX: &str = "192.0.2.1:25";
const MX_V6: &str = "[2001:db8:1::1]:25";

fn bans_lab(tag: &str, bans: &str) -> (Lab, SmtpSink) {
    let mut lab = Lab::new(
        tag,
        vec![PeerSpec {
            name: "client",
            edge_addrs: vec!["192.0.2.1/24", "2001:db8:1::1/64"],
            peer_addrs: vec![
                "192.0.2.2/24",
                "192.0.2.4/24",
                "2001:db8:1::2/64",
                "2001:db8:1::3/64",
            ],
        }],
    )
    .expect("building the lab");
    let sink = SmtpSink::start(&lab.edge, &lab.dir().join("sink"), "127.0.0.1:10025").unwrap();
    let config = format!(
        "[smtp]\nlisten = [\"0.0.0.0:25\", \"[::]:25\"]\nhostname = \"mx.example.org\"\n\
         local_domains = [\"example.org\"]\nupstream = \"127.0.0.1:10025\"\n[bans]\n{bans}\n"
    );
    lab.start_daemon(&config).unwrap();
    (lab, sink)
}

/// One session with `attempts` relay attempts, each refused.
fn try_relay(lab: &Lab, source: &str, attempts: usize) {
    let dest = if source.contains(':') { MX_V6 } else { MX };
    let mut c = SmtpClient::connect(lab.peer("client"), source, dest).unwrap();
    c.start_transaction("abuser.test", "<a@abuser.test>")
        .unwrap();
    for i in 0..attempts {
        let reply = c.cmd(&format!("RCPT TO:<victim{i}@victim.test>")).unwrap();
        assert_eq!(reply.code, 554, "{reply}");
    }
    let _ = c.cmd("QUIT");
}

fn dest_for(source: &str) -> &'static str {
    if source.contains(':') {
        MX_V6
    } else {
        MX
    }
}

fn json(out: std::process::Output) -> serde_json::Value {
    serde_json::from_str(&ok(out)).expect("JSON")
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn relay_abusers_are_dropped_in_xdp_allowlisted_ones_never_and_clear_restores() {
    if !require_kernel_privileges("relay_abusers_are_dropped_in_xdp") {
        return;
    }
    let (lab, _sink) = bans_lab("bans", "threshold = 3\nttl = \"1h\"\n");
    let gk = lab.daemon();
    ok(gk.cli(&["allow", "add", ALLOWED]));
    let client = lab.peer("client");

    // Two attempts: counted, not yet banned.
    try_relay(&lab, ABUSER, 2);
    assert_eq!(outcome(client, ABUSER, MX), Outcome::Connected);
    // The third crosses the threshold: the kernel drops its SYNs.
    try_relay(&lab, ABUSER, 1);
    let dropped = gk.counter("dropped_deny");
    eventually("the abuser's SYNs are dropped", || {
        outcome(client, ABUSER, MX) == Outcome::TimedOut
    });
    assert!(gk.counter("dropped_deny") > dropped);

    let bans = json(gk.cli(&["bans", "list", "--json"]));
    assert_eq!(bans.as_array().unwrap().len(), 1, "{bans}");
    assert_eq!(bans[0]["client"], "192.0.2.2/32");
    assert_eq!(bans[0]["reason"], "relay_attempt");
    assert_eq!(bans[0]["events"], 3);
    assert!(bans[0]["expiry"].as_u64().unwrap() > 0);
    // The denylist tells the ban from the operator's entries.
    ok(gk.cli(&["deny", "add", "203.0.113.0/24"]));
    let deny = json(gk.cli(&["deny", "list", "--json"]));
    let entry = |prefix: &str| {
        deny.as_array()
            .unwrap()
            .iter()
            .find(|e| e["prefix"] == prefix)
            .cloned()
            .unwrap_or_else(|| panic!("{prefix} not in {deny}"))
    };
    assert_eq!(entry("192.0.2.2/32")["ban"], true);
    assert_eq!(entry("192.0.2.2/32")["manual"], false);
    assert_eq!(entry("203.0.113.0/24").get("ban"), None);

    // The allowlisted client tries far more and is never banned.
    try_relay(&lab, ALLOWED, 9);
    try_relay(&lab, ALLOWED, 9);
    assert_eq!(outcome(client, ALLOWED, MX), Outcome::Connected);
    assert_eq!(
        json(gk.cli(&["bans", "list", "--json"]))
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let stats = gk.stats();
    assert_eq!(stats["bans"]["issued"], 1, "{stats}");
    assert_eq!(stats["bans"]["active"], 1, "{stats}");
    assert_eq!(stats["bans"]["events"]["relay_attempt"], 3, "{stats}");

    // Cleared: access is back, and the operator's entry stays.
    let cleared = ok(gk.cli(&["bans", "clear", ABUSER]));
    assert!(cleared.contains("cleared 1"), "{cleared}");
    assert_eq!(outcome(client, ABUSER, MX), Outcome::Connected);
    assert!(json(gk.cli(&["bans", "list", "--json"]))
        .as_array()
        .unwrap()
        .is_empty());
    let deny = json(gk.cli(&["deny", "list", "--json"]));
    assert_eq!(deny.as_array().unwrap().len(), 1, "{deny}");
    // `bans clear` was a pardon: the next ban is a first offence again. An
    // operator who then lists the address permanently owns the entry, and
    // `bans clear` leaves it.
    try_relay(&lab, ABUSER, 3);
    eventually("the second ban drops SYNs", || {
        outcome(client, ABUSER, MX) == Outcome::TimedOut
    });
    let bans = json(gk.cli(&["bans", "list", "--json"]));
    assert_eq!(bans[0]["offences"], 1, "{bans}");
    let length = bans[0]["expiry"].as_u64().unwrap() - bans[0]["added"].as_u64().unwrap();
    assert_eq!(length, 3600, "{bans}");
    ok(gk.cli(&["deny", "add", ABUSER, "--reason", "operator"]));
    ok(gk.cli(&["bans", "clear", "--all"]));
    assert_eq!(outcome(client, ABUSER, MX), Outcome::TimedOut);
    let deny = json(gk.cli(&["deny", "list", "--json"]));
    let kept = deny
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["prefix"] == "192.0.2.2/32")
        .cloned()
        .unwrap_or_else(|| panic!("operator entry gone: {deny}"));
    assert_eq!(kept.get("expires"), None, "{kept}");
    assert_eq!(kept.get("ban"), None, "{kept}");
    // Bad input is refused with exit 2.
    assert_eq!(gk.cli(&["bans", "clear"]).status.code(), Some(2));
    assert_eq!(gk.cli(&["bans", "clear", "x.y"]).status.code(), Some(2));
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn an_ipv6_ban_covers_the_64_and_runs_out_by_itself() {
    if !require_kernel_privileges("an_ipv6_ban_covers_the_64") {
        return;
    }
    let (lab, _sink) = bans_lab("bans6", "threshold = 2\nttl = \"10s\"\nttl_max = \"10s\"\n");
    let gk = lab.daemon();
    let client = lab.peer("client");
    try_relay(&lab, ABUSER_V6, 2);
    eventually("the /64 is dropped", || {
        outcome(client, "2001:db8:1::3", dest_for(ABUSER_V6)) == Outcome::TimedOut
    });
    let bans = json(gk.cli(&["bans", "list", "--json"]));
    assert_eq!(bans[0]["client"], "2001:db8:1::/64", "{bans}");
    // XDP stops matching when the ban expires, and the sweep removes it.
    eventually("the ban runs out", || {
        outcome(client, ABUSER_V6, dest_for(ABUSER_V6)) == Outcome::Connected
    });
    eventually("the ban leaves the lists", || {
        json(gk.cli(&["bans", "list", "--json"]))
            .as_array()
            .unwrap()
            .is_empty()
            && json(gk.cli(&["deny", "list", "--json"]))
                .as_array()
                .unwrap()
                .is_empty()
    });
}
