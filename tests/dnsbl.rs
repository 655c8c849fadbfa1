//! DNSBL verdicts end to end: rbldnsd on the edge's loopback serves test
//! zones, the daemon asks it, refuses listed clients with 554 and feeds
//! them into the kernel, where XDP drops their next SYNs until expiry.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sandbox::daemon::ok;
use sandbox::dnsbl::{Dataset, Rbldnsd, SilentRelay};
use sandbox::lab::{Lab, PeerSpec};
use sandbox::probe::{connect_from, outcome, Outcome};
use sandbox::require_kernel_privileges;
use sandbox::smtp::SmtpClient;
use serde_json::Value;

const MX: &str = "192.0.2.1:25";
const MX_V6: &str = "[2001:db8:1::1]:25";
const CLEAN: &str = "192.0.2.2";
const LISTED: &str = "192.0.2.10";
const LISTED_V6: &str = "2001:db8:1::10";
const RBLDNSD: &str = "127.0.0.1:5300";
const RELAY: &str = "127.0.0.1:53";

fn lab(tag: &str, extra_peer_addrs: Vec<&'static str>) -> Lab {
    let mut peer_addrs = vec![
        "192.0.2.2/24",
        "192.0.2.10/24",
        "192.0.2.11/24",
        "192.0.2.12/24",
        "192.0.2.13/24",
        "192.0.2.14/24",
        "192.0.2.15/24",
        "2001:db8:1::2/64",
        "2001:db8:1::10/64",
    ];
    peer_addrs.extend(extra_peer_addrs);
    Lab::new(
        tag,
        vec![PeerSpec {
            name: "client",
            edge_addrs: vec!["192.0.2.1/24", "2001:db8:1::1/64", "198.51.100.254/24"],
            peer_addrs,
        }],
    )
    .expect("building the lab")
}

/// `[smtp]` (no MTA needed: nothing here gets past the banner) and `[dnsbl]` with `dnsbl_extra`.
fn config(zones: &[&str], dnsbl_extra: &str) -> String {
    let zones: Vec<String> = zones.iter().map(|z| format!("\"{z}\"")).collect();
    format!(
        "[smtp]\nlisten = [\"0.0.0.0:25\", \"[::]:25\"]\nhostname = \"mx.example.org\"\n\
         local_domains = [\"example.org\"]\nrelay_networks = [\"127.0.0.0/8\"]\nupstream = \"127.0.0.1:10025\"\n\
         [dnsbl]\nzones = [{}]\n{dnsbl_extra}\n",
        zones.join(", ")
    )
}

fn check(lab: &Lab, ip: &str, fresh: bool) -> Value {
    let mut args = vec!["check", ip, "--json"];
    if fresh {
        args.push("--fresh");
    }
    serde_json::from_str(&ok(lab.daemon().cli(&args))).expect("check --json is JSON")
}

fn zone<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["zones"]
        .as_array()
        .and_then(|zones| zones.iter().find(|z| z["zone"] == name))
        .unwrap_or_else(|| panic!("no zone {name} in {report:#}"))
}

fn zone_stats(lab: &Lab, name: &str) -> Value {
    let stats = lab.daemon().stats();
    stats["dnsbl"]["zones"]
        .as_array()
        .and_then(|zones| zones.iter().find(|z| z["zone"] == name).cloned())
        .unwrap_or_else(|| panic!("no zone {name} in stats {stats:#}"))
}

/// The banner (or refusal) a client at `source` gets.
fn greeting(lab: &Lab, source: &str) -> sandbox::smtp::SmtpReply {
    let dest = if source.contains(':') { MX_V6 } else { MX };
    let mut client = SmtpClient::connect(lab.peer("client"), source, dest).expect("connecting");
    client.reply().expect("a greeting")
}

/// rbldnsd on the edge's loopback at [`RBLDNSD`].
fn start_rbldnsd(lab: &Lab, datasets: &[Dataset]) -> Rbldnsd {
    Rbldnsd::start(
        &lab.edge,
        &lab.dir().join("rbldnsd"),
        RBLDNSD.parse().unwrap(),
        datasets,
    )
    .expect("starting rbldnsd")
}

fn query_name(ip: &str, zone: &str) -> String {
    let octets: Vec<&str> = ip.split('.').rev().collect();
    format!("{}.{zone}", octets.join("."))
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn zone_answers_weights_errors_and_health() {
    if !require_kernel_privileges("zone_answers_weights_errors_and_health") {
        return;
    }
    let mut lab = lab("dnsbl-zones", vec![]);
    let mut strong = Dataset::listing("strong.test", &[LISTED, "192.0.2.13"]);
    strong.lines.push(String::new());
    let rbldnsd = start_rbldnsd(
        &lab,
        &[
            strong,
            Dataset::ipv6("strong.test", &[LISTED_V6]),
            Dataset::listing("half-a.test", &["192.0.2.11", "192.0.2.12"]),
            Dataset::listing("half-b.test", &["192.0.2.11"]),
            Dataset::with_value("wl.test", "127.0.10.2", &["192.0.2.13", "192.0.2.15"]),
            Dataset::listing(
                "typo.test",
                &["192.0.2.14 :127.255.255.254:queried through a public resolver"],
            ),
            Dataset::listing("world.test", &["0.0.0.0/1", "128.0.0.0/1"]),
            Dataset::listing("silent.test", &[LISTED]),
        ],
    );
    let _relay = SilentRelay::start(
        &lab.edge,
        RELAY.parse().unwrap(),
        Some(rbldnsd.addr),
        &["silent.test"],
    )
    .unwrap();
    lab.start_daemon(&config(
        &[
            "strong.test*2",
            "half-a.test",
            "half-b.test",
            "wl.test=127.0.[0..255].[1..3]*-2",
            "typo.test",
            "world.test",
            "silent.test",
        ],
        &format!("threshold = 2\nallowlist_threshold = -1\ntimeout = \"1s\"\nnameservers = [\"{RELAY}\"]"),
    ))
    .unwrap();

    // Test points: a zone listing 127.0.0.1 is out of scoring, a silent one is unreachable.
    assert_eq!(zone_stats(&lab, "strong.test")["health"], "healthy");
    assert_eq!(zone_stats(&lab, "world.test")["health"], "lists_the_world");
    assert_eq!(zone_stats(&lab, "silent.test")["health"], "unreachable");

    // A listing, with its TXT; the silent zone costs exactly the timeout, never more.
    let started = Instant::now();
    let listed = check(&lab, LISTED, false);
    let took = started.elapsed();
    assert_eq!(listed["verdict"], "listed", "{listed:#}");
    assert_eq!(
        (listed["score"].as_i64(), listed["blocked_by"].as_str()),
        (Some(2), Some("strong.test"))
    );
    assert_eq!(zone(&listed, "strong.test")["codes"][0], "127.0.0.2");
    assert!(zone(&listed, "strong.test")["txt"]
        .as_str()
        .unwrap()
        .contains("Listed by strong.test"));
    assert_eq!(zone(&listed, "silent.test")["answer"], "timeout");
    assert_eq!(zone(&listed, "world.test")["answer"], "skipped");
    // Not before the 1 s deadline; and not a second timeout after it (a
    // sequential TXT lookup or a resolver retry would cost one more second).
    // The gap between the two is the slack a slow (emulated) machine gets.
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_millis(2000),
        "verdict took {took:?}"
    );
    assert_eq!(listed["cached"], false);

    let v6 = check(&lab, LISTED_V6, false);
    assert_eq!(
        (v6["verdict"].as_str(), v6["blocked_by"].as_str()),
        (Some("listed"), Some("strong.test")),
        "{v6:#}"
    );

    // Two zones whose weights only together reach the threshold.
    let one_half = check(&lab, "192.0.2.12", false);
    assert_eq!(
        (one_half["verdict"].as_str(), one_half["score"].as_i64()),
        (Some("clean"), Some(1))
    );
    let both_halves = check(&lab, "192.0.2.11", false);
    assert_eq!(
        (
            both_halves["verdict"].as_str(),
            both_halves["score"].as_i64()
        ),
        (Some("listed"), Some(2))
    );
    assert_eq!(both_halves["blocked_by"], "half-a.test");

    // A negative-weight allowlist cancels a listing, and alone marks the client trusted.
    let cancelled = check(&lab, "192.0.2.13", false);
    assert_eq!(
        (cancelled["verdict"].as_str(), cancelled["score"].as_i64()),
        (Some("clean"), Some(0)),
        "{cancelled:#}"
    );
    assert_eq!(zone(&cancelled, "wl.test")["codes"][0], "127.0.10.2");
    assert_eq!(check(&lab, "192.0.2.15", false)["verdict"], "trusted");

    // 127.255.255.254 is an error, counted, never a listing.
    let typo = check(&lab, "192.0.2.14", false);
    assert_eq!(typo["verdict"], "clean");
    assert_eq!(zone(&typo, "typo.test")["answer"], "error");
    assert!(zone(&typo, "typo.test")["detail"]
        .as_str()
        .unwrap()
        .contains("public"));
    let typo_stats = zone_stats(&lab, "typo.test");
    assert_eq!(
        (
            typo_stats["error_codes"].as_u64(),
            typo_stats["health"].as_str()
        ),
        (Some(1), Some("healthy"))
    );
    assert!(
        zone_stats(&lab, "silent.test")["timeouts"]
            .as_u64()
            .unwrap()
            >= 7
    );

    // Cached unless --fresh; concurrent fresh checks share one set of queries.
    let again = check(&lab, LISTED, false);
    assert_eq!(again["cached"], true);
    let name = query_name("192.0.2.12", "half-a.test");
    let before = rbldnsd.a_queries_for(&name);
    let parallel: Vec<_> = (0..6)
        .map(|_| {
            let cli = sandbox::daemon::gatekeeper_bin();
            let socket = lab.control_socket();
            std::thread::spawn(move || {
                std::process::Command::new(cli)
                    .arg("--control")
                    .arg(socket)
                    .args(["check", "192.0.2.12", "--fresh", "--json"])
                    .output()
                    .unwrap()
            })
        })
        .collect();
    for handle in parallel {
        let report: Value = serde_json::from_str(&ok(handle.join().unwrap())).unwrap();
        assert_eq!(report["cached"], false);
    }
    assert_eq!(
        rbldnsd.a_queries_for(&name),
        before + 1,
        "coalesced checks asked once"
    );
    assert!(lab.daemon().stats()["dnsbl"]["coalesced"].as_u64().unwrap() >= 1);
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn listed_client_refused_once_then_dropped_in_xdp_until_expiry() {
    if !require_kernel_privileges("listed_client_refused_once_then_dropped_in_xdp_until_expiry") {
        return;
    }
    let mut lab = lab("dnsbl-e2e", vec![]);
    let rbldnsd = start_rbldnsd(
        &lab,
        &[
            Dataset::listing("bl.test", &[LISTED]),
            Dataset::ipv6("bl.test", &[LISTED_V6]),
        ],
    );
    lab.start_daemon(&config(
        &["bl.test"],
        &format!("min_ttl = \"1s\"\nmax_ttl = \"10s\"\nnameservers = [\"{RBLDNSD}\"]"),
    ))
    .unwrap();
    let name = query_name(LISTED, "bl.test");
    let client = lab.peer("client");

    // Refused once, with the contract's reply, and closed.
    let mut refused = SmtpClient::connect(client, LISTED, MX).unwrap();
    let reply = refused.reply().unwrap();
    assert_eq!(reply.code, 554);
    assert_eq!(
        reply.text(),
        "5.7.1 Service unavailable; client [192.0.2.10] blocked using bl.test"
    );
    assert!(refused.is_closed());
    let listed_at = Instant::now();

    // Then its SYNs die in XDP; nobody else is affected.
    let dropped_before = lab.daemon().counter("dropped_dnsbl");
    assert_eq!(outcome(client, LISTED, MX), Outcome::TimedOut);
    assert!(lab.daemon().counter("dropped_dnsbl") > dropped_before);
    assert_eq!(greeting(&lab, CLEAN).code, 220);
    let listing: Value =
        serde_json::from_str(&ok(lab.daemon().cli(&["dnsbl", "list", "--json"]))).unwrap();
    let entry = listing
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["ip"] == LISTED)
        .expect("kernel entry listed");
    assert_eq!(entry["blocked_by"], "bl.test");
    assert!(entry["remaining_secs"].as_u64().unwrap() <= 10);
    assert_eq!(
        check(&lab, LISTED, false)["map_state"]["xdp_verdict"],
        "drop_dnsbl"
    );
    assert_eq!(
        rbldnsd.a_queries_for(&name),
        1,
        "one DNS round trip, then nothing"
    );

    // IPv6 the same way.
    let v6 = greeting(&lab, LISTED_V6);
    assert_eq!(
        v6.to_string(),
        "554 5.7.1 Service unavailable; client [2001:db8:1::10] blocked using bl.test"
    );
    assert_eq!(outcome(client, LISTED_V6, MX_V6), Outcome::TimedOut);

    // After the TTL the entry stops matching at once: the client connects and is checked again.
    std::thread::sleep(Duration::from_secs(11).saturating_sub(listed_at.elapsed()));
    assert_eq!(greeting(&lab, LISTED).code, 554);
    assert_eq!(rbldnsd.a_queries_for(&name), 2, "re-checked after expiry");
    assert_eq!(outcome(client, LISTED, MX), Outcome::TimedOut);

    // `dnsbl flush IP` forgets the verdict; an allowlisted prefix is never checked.
    let flushed: String = ok(lab.daemon().cli(&["dnsbl", "flush", LISTED]));
    assert!(flushed.contains("1 kernel entries"), "{flushed}");
    assert_eq!(greeting(&lab, LISTED).code, 554);
    assert_eq!(rbldnsd.a_queries_for(&name), 3);
    ok(lab.daemon().cli(&["allow", "add", "192.0.2.8/29"]));
    assert_eq!(
        greeting(&lab, LISTED).code,
        220,
        "allowlist beats the DNSBL entry in XDP and the screen"
    );
    ok(lab.daemon().cli(&["dnsbl", "flush"]));
    assert_eq!(greeting(&lab, LISTED).code, 220);
    assert_eq!(
        rbldnsd.a_queries_for(&name),
        3,
        "allowlisted clients are never DNSBL-checked"
    );
    let stats = lab.daemon().stats();
    assert_eq!(stats["dnsbl"]["zones"][0]["hits"], 4);
    assert_eq!(stats["smtp"]["refused_dnsbl"], 4);
    assert_eq!(stats["dnsbl"]["kernel_entries"], 0);
    lab.take_daemon().stop().unwrap();
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn silent_dnsbl_costs_one_timeout_for_many_clients() {
    if !require_kernel_privileges("silent_dnsbl_costs_one_timeout_for_many_clients") {
        return;
    }
    const CLIENTS: usize = 200;
    let sources: Vec<String> = (0..CLIENTS)
        .map(|i| format!("198.51.100.{}/24", i + 1))
        .collect();
    let leaked: Vec<&'static str> = sources
        .into_iter()
        .map(|s| &*Box::leak(s.into_boxed_str()))
        .collect();
    let mut lab = lab("dnsbl-silent", leaked);
    let _relay =
        SilentRelay::start(&lab.edge, RELAY.parse().unwrap(), None, &["silent.test"]).unwrap();
    lab.start_daemon(&config(
        &["silent.test"],
        &format!("timeout = \"2s\"\nnameservers = [\"{RELAY}\"]"),
    ))
    .unwrap();
    // A client checked earlier has a (fail-open) verdict cached.
    assert_eq!(greeting(&lab, CLEAN).code, 220);

    let client = lab.peer("client");
    let mx: SocketAddr = MX.parse().unwrap();
    let started = Instant::now();
    let waiting: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let source = format!("198.51.100.{}", i + 1).parse().unwrap();
            let (result, stream) = connect_from(client, source, mx).unwrap();
            assert_eq!(result, Outcome::Connected);
            std::thread::spawn(move || {
                let code = SmtpClient::over(stream.unwrap()).reply().map(|r| r.code);
                (code, Instant::now())
            })
        })
        .collect();
    // Meanwhile a client with a cached verdict is served at once.
    assert_eq!(greeting(&lab, CLEAN).code, 220);
    let cached_served_at = Instant::now();
    let mut last_connected_banner = None;
    for handle in waiting {
        let (code, at) = handle.join().unwrap();
        assert_eq!(code.unwrap(), 220, "fail open");
        last_connected_banner = Some(at);
    }
    let all_in = started.elapsed();
    // The client connected just before the cached one waits a full timeout.
    assert!(
        cached_served_at < last_connected_banner.unwrap(),
        "the cached client waited behind the silent DNSBL"
    );
    // Checks one after another would take CLIENTS × 2 s = 400 s; a bound of
    // 20 timeouts leaves emulated machines all the slack they need while only
    // serialised checks (a queue of them, or a handful at a time) cross it.
    let serialised = Duration::from_secs(2) * 20;
    assert!(
        all_in < serialised,
        "{CLIENTS} clients took {all_in:?}: checks were serialised, not one shared 2 s timeout"
    );
    let zone = &lab.daemon().stats()["dnsbl"]["zones"][0];
    assert!(
        zone["timeouts"].as_u64().unwrap() >= CLIENTS as u64,
        "{zone:#}"
    );
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn verdict_cache_survives_restart() {
    if !require_kernel_privileges("verdict_cache_survives_restart") {
        return;
    }
    let mut lab = lab("dnsbl-restart", vec![]);
    let rbldnsd = start_rbldnsd(&lab, &[Dataset::listing("bl.test", &[LISTED])]);
    let dnsbl = config(&["bl.test"], &format!("nameservers = [\"{RBLDNSD}\"]"));
    lab.start_daemon(&dnsbl).unwrap();
    assert_eq!(greeting(&lab, LISTED).code, 554);
    assert_eq!(greeting(&lab, CLEAN).code, 220);
    let (listed_name, clean_name) = (query_name(LISTED, "bl.test"), query_name(CLEAN, "bl.test"));
    assert_eq!(
        (
            rbldnsd.a_queries_for(&listed_name),
            rbldnsd.a_queries_for(&clean_name)
        ),
        (1, 1)
    );

    lab.take_daemon().stop().unwrap();
    assert!(lab.state_dir().join("dnsbl-cache.json").exists());
    lab.start_daemon(&dnsbl).unwrap();

    // The listed client is dropped in the kernel straight away, the clean one served from the cache.
    assert_eq!(outcome(lab.peer("client"), LISTED, MX), Outcome::TimedOut);
    assert_eq!(greeting(&lab, CLEAN).code, 220);
    let report = check(&lab, CLEAN, false);
    assert_eq!(
        (report["cached"].as_bool(), report["verdict"].as_str()),
        (Some(true), Some("clean"))
    );
    assert_eq!(
        (
            rbldnsd.a_queries_for(&listed_name),
            rbldnsd.a_queries_for(&clean_name)
        ),
        (1, 1),
        "no new queries for still-valid verdicts"
    );
    assert_eq!(
        lab.daemon().stats()["dnsbl"]["cache_hits"].as_u64(),
        Some(2)
    );
}
