//! A fleet of three edge hosts sharing verdicts through a real Redis: a
//! verdict one host takes (DNSBL listing, ban, `deny add --share`) drops the
//! source's SYNs in every host's XDP; local policy wins; bad data in the
//! stream is skipped and counted; Redis lost and back, the hosts catch up.

use sandbox::daemon::ok;
use sandbox::dnsbl::{Dataset, Rbldnsd};
use sandbox::fleet::{node_name, Fleet, MX};
use sandbox::lab::Lab;
use sandbox::probe::{outcome, Outcome};
use sandbox::smtp::{SmtpClient, SmtpSink};
use sandbox::{eventually, require_kernel_privileges};
use serde_json::Value;

/// DNSBL-listed (on A's rbldnsd).
const LISTED: &str = "192.0.2.10";
/// DNSBL-listed too, and allowlisted on B.
const LISTED_ALLOWED: &str = "192.0.2.11";
/// Tries to relay through B until banned.
const ABUSER: &str = "192.0.2.12";
/// `deny add --share` on C.
const SHARED: &str = "192.0.2.13";
const CLIENTS: [&str; 8] = [
    "192.0.2.2/24",
    "192.0.2.10/24",
    "192.0.2.11/24",
    "192.0.2.12/24",
    "192.0.2.13/24",
    "192.0.2.14/24",
    "192.0.2.15/24",
    "192.0.2.16/24",
];

fn smtp_section(extra: &str) -> String {
    format!(
        "[smtp]\nlisten = [\"0.0.0.0:25\"]\nhostname = \"mx.example.org\"\n\
         local_domains = [\"example.org\"]\nrelay_networks = [\"127.0.0.0/8\"]\n\
         upstream = \"127.0.0.1:10025\"\n{extra}\n"
    )
}

fn status(lab: &Lab) -> Value {
    serde_json::from_str(&ok(lab.daemon().cli(&["cluster", "status", "--json"])))
        .expect("cluster status --json is JSON")
}

fn connected(lab: &Lab) -> bool {
    status(lab)["connected"] == true
}

/// The deny entry for `ip`/32, if listed.
fn deny_entry(lab: &Lab, ip: &str) -> Option<Value> {
    let entries: Value =
        serde_json::from_str(&ok(lab.daemon().cli(&["deny", "list", "--json"]))).unwrap();
    let prefix = format!("{ip}/32");
    entries
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["prefix"] == prefix.as_str())
        .cloned()
}

fn shared_by(lab: &Lab, ip: &str) -> Option<String> {
    deny_entry(lab, ip).and_then(|e| e["shared_by"].as_str().map(str::to_owned))
}

fn syn(lab: &Lab, source: &str) -> Outcome {
    outcome(lab.peer("client"), source, MX)
}

fn skipped(lab: &Lab, reason: &str) -> u64 {
    status(lab)["skipped"][reason].as_u64().unwrap_or(0)
}

#[test]
#[cfg_attr(
    not(kernel_tests),
    ignore = "kernel-level: needs root, ip, nsenter, redis-server"
)]
fn verdicts_taken_on_one_host_drop_on_every_host() {
    if !require_kernel_privileges("verdicts_taken_on_one_host_drop_on_every_host") {
        return;
    }
    let mut fleet = Fleet::new("fleet", 3, &CLIENTS).expect("building the fleet");
    let sinks: Vec<SmtpSink> = fleet
        .hosts
        .iter()
        .map(|lab| SmtpSink::start(&lab.edge, &lab.dir().join("sink"), "127.0.0.1:10025").unwrap())
        .collect();
    let a = &fleet.hosts[0];
    let rbldnsd = Rbldnsd::start(
        &a.edge,
        &a.dir().join("rbldnsd"),
        "127.0.0.1:5300".parse().unwrap(),
        &[Dataset::listing("bl.test", &[LISTED, LISTED_ALLOWED])],
    )
    .expect("starting rbldnsd");
    let dnsbl =
        "[dnsbl]\nzones = [\"bl.test\"]\nnameservers = [\"127.0.0.1:5300\"]\nmin_ttl = \"1h\"\n";
    fleet.start(0, &smtp_section(dnsbl)).unwrap();
    let bans = "[bans]\nthreshold = 3\nttl = \"1h\"\n[metrics]\nlisten = \"127.0.0.1:9425\"\n";
    fleet.start(1, &smtp_section(bans)).unwrap();
    fleet.start(2, &smtp_section("")).unwrap();
    let (a, b, c) = (fleet.host(0), fleet.host(1), fleet.host(2));
    for lab in [a, b, c] {
        eventually("every host reaches Redis", || connected(lab));
    }
    ok(b.daemon()
        .cli(&["allow", "add", LISTED_ALLOWED, "--reason", "partner"]));

    // Before any verdict, B and C let the sources through.
    for lab in [b, c] {
        assert_eq!(syn(lab, LISTED), Outcome::Connected);
    }

    // A DNSBL listing earned on A...
    for source in [LISTED, LISTED_ALLOWED] {
        let mut client = SmtpClient::connect(a.peer("client"), source, MX).unwrap();
        assert_eq!(client.reply().unwrap().code, 554);
    }
    // ...drops the source on B and C, each in its own kernel.
    for lab in [b, c] {
        eventually("A's DNSBL listing reaches the host", || {
            shared_by(lab, LISTED).as_deref() == Some("edge-a")
        });
        assert_eq!(syn(lab, LISTED), Outcome::TimedOut);
    }
    // An address B allowlists stays reachable on B, though C drops it.
    eventually("C takes the second listing", || {
        shared_by(c, LISTED_ALLOWED).is_some()
    });
    assert_eq!(syn(c, LISTED_ALLOWED), Outcome::TimedOut);
    eventually("B skips it for local precedence", || {
        skipped(b, "local_precedence") >= 1
    });
    assert!(deny_entry(b, LISTED_ALLOWED).is_none());
    assert_eq!(syn(b, LISTED_ALLOWED), Outcome::Connected);

    // A ban earned on B reaches A and C.
    assert_eq!(syn(a, ABUSER), Outcome::Connected);
    let mut relay = SmtpClient::connect(b.peer("client"), ABUSER, MX).unwrap();
    relay
        .start_transaction("abuser.test", "<x@abuser.test>")
        .unwrap();
    for i in 0..3 {
        let reply = relay.cmd(&format!("RCPT TO:<v{i}@victim.test>")).unwrap();
        assert_eq!(reply.code, 554, "{reply}");
    }
    drop(relay);
    for lab in [a, c] {
        eventually("B's ban reaches the host", || {
            shared_by(lab, ABUSER).as_deref() == Some("edge-b")
        });
        assert_eq!(syn(lab, ABUSER), Outcome::TimedOut);
    }

    // `deny add --share` on C reaches all; `del --share` withdraws it everywhere.
    ok(c.daemon().cli(&[
        "deny", "add", SHARED, "--share", "--ttl", "1h", "--reason", "manual",
    ]));
    for lab in [a, b] {
        eventually("C's shared entry reaches the host", || {
            shared_by(lab, SHARED).as_deref() == Some("edge-c")
        });
        assert_eq!(syn(lab, SHARED), Outcome::TimedOut);
    }
    let plain_del = c.daemon().cli(&["deny", "del", SHARED]);
    assert!(
        !plain_del.status.success(),
        "a plain del leaves shared entries alone"
    );
    ok(c.daemon().cli(&["deny", "del", SHARED, "--share"]));
    for lab in [a, b, c] {
        eventually("the withdrawal reaches the host", || {
            deny_entry(lab, SHARED).is_none()
        });
        assert_eq!(syn(lab, SHARED), Outcome::Connected);
    }

    // Bad data in the stream is skipped and counted, never applied.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let bad = [
        "not json".to_owned(),
        r#"{"op":"add","kind":"deny","prefix":"192.0.2.14/24","origin":"rogue"}"#.to_owned(),
        format!(
            r#"{{"op":"add","kind":"ban","prefix":"192.0.2.15","origin":"rogue","expires":{}}}"#,
            u64::MAX
        ),
        r#"{"op":"add","kind":"deny","prefix":"0.0.0.0/0","origin":"rogue"}"#.to_owned(),
    ];
    for value in &bad {
        fleet
            .redis
            .cli(&["XADD", "gatekeeper:verdicts", "*", "v", value]);
    }
    let good = format!(
        r#"{{"op":"add","kind":"deny","prefix":"192.0.2.16","origin":"tester","expires":{}}}"#,
        now + 3600
    );
    fleet
        .redis
        .cli(&["XADD", "gatekeeper:verdicts", "*", "v", &good]);
    for lab in [a, b, c] {
        eventually("the good entry after the bad ones arrives", || {
            shared_by(lab, "192.0.2.16").as_deref() == Some("tester")
        });
        let s = status(lab);
        assert!(s["skipped"]["malformed"].as_u64() >= Some(1), "{s:#}");
        assert!(s["skipped"]["prefix"].as_u64() >= Some(2), "{s:#}");
        assert!(s["skipped"]["expiry"].as_u64() >= Some(1), "{s:#}");
        assert!(deny_entry(lab, "192.0.2.15").is_none());
        assert_eq!(syn(lab, "192.0.2.14"), Outcome::Connected);
        let peers: Vec<&str> = s["peers"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["node"].as_str())
            .collect();
        for i in 0..3 {
            assert!(peers.contains(&node_name(i).as_str()), "{s:#}");
        }
    }
    // What Prometheus reads on B agrees with `cluster status`.
    let (_, _, body) =
        sandbox::scrape::http_get(&b.edge, "127.0.0.1:9425".parse().unwrap(), "/metrics");
    sandbox::scrape::promtool_check(b.dir(), &body);
    let exposed = sandbox::scrape::samples(&body);
    let s = status(b);
    assert_eq!(
        exposed.get("gatekeeper_cluster_connected"),
        Some(&1.0),
        "{body}"
    );
    assert_eq!(
        exposed.get("gatekeeper_cluster_peers"),
        Some(&3.0),
        "{body}"
    );
    assert_eq!(
        exposed.get("gatekeeper_cluster_applied_total").copied(),
        s["applied"].as_f64(),
        "{body}"
    );
    assert_eq!(
        exposed.get("gatekeeper_cluster_published_total").copied(),
        Some(1.0),
        "B published one ban: {body}"
    );
    assert!(exposed.get(r#"gatekeeper_cluster_skipped_total{reason="malformed"}"#) >= Some(&1.0));
    drop((sinks, rbldnsd));
}

#[test]
#[cfg_attr(
    not(kernel_tests),
    ignore = "kernel-level: needs root, ip, nsenter, redis-server"
)]
fn hosts_ride_out_a_redis_outage_and_a_late_host_catches_up() {
    if !require_kernel_privileges("hosts_ride_out_a_redis_outage_and_a_late_host_catches_up") {
        return;
    }
    const BEFORE: &str = "192.0.2.10";
    const SHORT: &str = "192.0.2.11";
    const DURING: &str = "192.0.2.12";
    let mut fleet = Fleet::new("outage", 3, &CLIENTS).expect("building the fleet");
    fleet.start(0, "").unwrap();
    fleet.start(1, "").unwrap();
    let (a, b) = (fleet.host(0), fleet.host(1));
    for lab in [a, b] {
        eventually("the host reaches Redis", || connected(lab));
    }
    ok(a.daemon().cli(&["deny", "add", BEFORE, "--share"]));
    ok(a.daemon()
        .cli(&["deny", "add", SHORT, "--share", "--ttl", "20s"]));
    eventually("both verdicts reach B", || {
        shared_by(b, BEFORE).is_some() && shared_by(b, SHORT).is_some()
    });

    fleet.redis.kill();
    let (a, b) = (fleet.host(0), fleet.host(1));
    for lab in [a, b] {
        eventually("the host notices the outage", || !connected(lab));
    }
    // B keeps enforcing what it holds; A takes a verdict meanwhile.
    assert_eq!(syn(b, BEFORE), Outcome::TimedOut);
    ok(a.daemon()
        .cli(&["deny", "add", DURING, "--share", "--ttl", "1h"]));
    assert_eq!(status(a)["pending"], 1);
    assert!(shared_by(b, DURING).is_none());
    // The short verdict runs out during the outage.
    eventually("the 20 s entry expires on B", || {
        deny_entry(b, SHORT).is_none()
    });
    // A host that starts while Redis is down runs on its own state (no SMTP here: a passed SYN meets a RST).
    fleet.start(2, "").unwrap();
    let c = fleet.host(2);
    assert!(!connected(c));
    assert_eq!(syn(c, BEFORE), Outcome::Refused);

    fleet.redis.restart().unwrap();
    let (a, b, c) = (fleet.host(0), fleet.host(1), fleet.host(2));
    for lab in [b, c] {
        eventually("the verdict taken during the outage arrives", || {
            shared_by(lab, DURING).as_deref() == Some("edge-a")
        });
        assert_eq!(syn(lab, DURING), Outcome::TimedOut);
        // The late host has the full live set; nothing expired comes back.
        assert_eq!(shared_by(lab, BEFORE).as_deref(), Some("edge-a"));
        assert!(
            deny_entry(lab, SHORT).is_none(),
            "an expired verdict came back"
        );
    }
    assert_eq!(syn(c, BEFORE), Outcome::TimedOut);
    assert_eq!(status(a)["pending"], 0);
    for lab in [a, b] {
        assert!(status(lab)["reconnects"].as_u64() >= Some(1));
    }

    // Redis back without its data: the hosts keep what they hold, and the
    // fleet works on.
    let reconnects = status(b)["reconnects"].as_u64().unwrap();
    fleet.redis.restart_empty().unwrap();
    let (a, b, c) = (fleet.host(0), fleet.host(1), fleet.host(2));
    eventually("B reconnects to the empty Redis", || {
        status(b)["reconnects"].as_u64() > Some(reconnects) && connected(b)
    });
    assert_eq!(shared_by(b, BEFORE).as_deref(), Some("edge-a"));
    assert_eq!(syn(b, BEFORE), Outcome::TimedOut);
    eventually("C reconnects too", || connected(c));
    ok(a.daemon()
        .cli(&["deny", "add", "192.0.2.14", "--share", "--ttl", "1h"]));
    for lab in [b, c] {
        eventually("a verdict after the reset arrives", || {
            shared_by(lab, "192.0.2.14").is_some()
        });
    }
}
