//! Feeds against a real daemon: a publisher (the harness's HTTP server)
//! in a peer namespace on a documentation address, DROP text and JSON,
//! refreshes triggered with `feeds refresh` rather than waited for.

use std::process::Output;
use std::time::{Duration, Instant};

use sandbox::daemon::ok;
use sandbox::http::HttpServer;
use sandbox::lab::{Lab, PeerSpec};
use sandbox::probe::{listen, outcome, Outcome};
use sandbox::require_kernel_privileges;
use serde_json::Value;

const DROP_TXT: &str = "; Spamhaus DROP List 2026/12/02\n\
                        198.51.100.0/24 ; SBL1\n\
                        203.0.113.0/25 ; SBL2\n";
const DROP_JSON: &str = "{\"cidr\":\"2001:db8:5::/48\",\"sblid\":\"SBL3\",\"rir\":\"ripencc\"}\n\
                         {\"type\":\"metadata\",\"timestamp\":1764633600,\"size\":66,\"records\":1}\n";

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn feeds(lab: &Lab) -> Vec<Value> {
    let text = ok(lab.daemon().cli(&["feeds", "list", "--json"]));
    serde_json::from_str::<Value>(&text)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn feed(lab: &Lab, name: &str) -> Value {
    feeds(lab)
        .into_iter()
        .find(|f| f["name"] == name)
        .unwrap_or_else(|| panic!("no feed {name}"))
}

/// Prefix → (manual, feeds) of every denylist entry.
fn deny_list(lab: &Lab) -> Vec<(String, bool, Vec<String>)> {
    let text = ok(lab.daemon().cli(&["deny", "list", "--json"]));
    let list: Value = serde_json::from_str(&text).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let feeds = e["feeds"]
                .as_array()
                .map(|a| a.iter().map(|f| f.as_str().unwrap().to_owned()).collect())
                .unwrap_or_default();
            (
                e["prefix"].as_str().unwrap().to_owned(),
                e["manual"].as_bool().unwrap(),
                feeds,
            )
        })
        .collect()
}

fn entry(prefix: &str, manual: bool, feeds: &[&str]) -> (String, bool, Vec<String>) {
    (
        prefix.to_owned(),
        manual,
        feeds.iter().map(|f| f.to_string()).collect(),
    )
}

/// Waits for the start-up refreshes to end, well or not; generous, it
/// only catches one that never ends.
fn wait_for_first_attempts(lab: &Lab) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let pending = |f: &Value| f["last_success"].is_null() && f["failures"] == 0;
    while feeds(lab).iter().any(pending) {
        assert!(
            Instant::now() < deadline,
            "feeds never refreshed: {:?}",
            feeds(lab)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn feeds_refresh_their_own_entries_and_keep_the_last_good_copy() {
    if !require_kernel_privileges("feeds_refresh_their_own_entries") {
        return;
    }
    let mut lab = Lab::new(
        "feeds",
        vec![PeerSpec {
            name: "client",
            edge_addrs: vec!["192.0.2.1/24", "198.51.100.1/24"],
            peer_addrs: vec!["192.0.2.2/24", "198.51.100.7/24"],
        }],
    )
    .expect("building the lab");
    listen(&lab.edge, 25).unwrap();
    let server = HttpServer::start(lab.peer("client"), "192.0.2.2:8080".parse().unwrap()).unwrap();
    server.set("/drop.txt", DROP_TXT);
    server.set("/drop_v6.json", DROP_JSON);
    let config = format!(
        "[[feeds]]\nname = \"drop\"\nurl = \"{}\"\nlist = \"deny\"\n\n\
         [[feeds]]\nname = \"drop6\"\nurl = \"{}\"\nlist = \"deny\"\ninterval = \"2h\"\n",
        server.url("/drop.txt"),
        server.url("/drop_v6.json")
    );
    // No CA certificates on this host (a minimal container, the test VM):
    // plain-HTTP feeds must still be fetched, and the operator told why
    // https ones would fail.
    let no_roots = lab.dir().join("no-ca-certificates");
    std::fs::create_dir_all(&no_roots).unwrap();
    let empty_bundle = no_roots.join("empty.pem");
    std::fs::write(&empty_bundle, "").unwrap();
    lab.start_daemon_with_env(
        &config,
        &[
            ("SSL_CERT_FILE", empty_bundle.to_str().unwrap()),
            ("SSL_CERT_DIR", no_roots.to_str().unwrap()),
        ],
    )
    .unwrap();
    ok(lab
        .daemon()
        .cli(&["deny", "add", "192.0.2.128/25", "203.0.113.0/25"]));

    // Entries arrive at start, in the background.
    wait_for_first_attempts(&lab);
    assert_eq!(feed(&lab, "drop")["entries"], 2, "{:?}", feeds(&lab));
    assert_eq!(feed(&lab, "drop6")["entries"], 1);
    assert_eq!(
        deny_list(&lab),
        [
            entry("192.0.2.128/25", true, &[]),
            entry("198.51.100.0/24", false, &["drop"]),
            entry("203.0.113.0/25", true, &["drop"]),
            entry("2001:db8:5::/48", false, &["drop6"]),
        ]
    );
    assert!(
        lab.daemon()
            .log_text()
            .contains("no usable system CA certificates"),
        "{}",
        lab.daemon().log_text()
    );
    let client = lab.peer("client");
    assert_eq!(
        outcome(client, "198.51.100.7", "198.51.100.1:25"),
        Outcome::TimedOut
    );
    assert_eq!(
        outcome(client, "192.0.2.2", "192.0.2.1:25"),
        Outcome::Connected
    );

    // A changed copy replaces only the feed's own entries.
    server.set("/drop.txt", "203.0.113.128/25 ; SBL4\n");
    let out = ok(lab.daemon().cli(&["feeds", "refresh", "drop"]));
    assert!(
        out.contains("drop: updated: added 1, removed 2, unchanged 0"),
        "{out}"
    );
    assert_eq!(
        deny_list(&lab),
        [
            entry("192.0.2.128/25", true, &[]),
            entry("203.0.113.0/25", true, &[]),
            entry("203.0.113.128/25", false, &["drop"]),
            entry("2001:db8:5::/48", false, &["drop6"]),
        ]
    );
    assert_eq!(
        outcome(client, "198.51.100.7", "198.51.100.1:25"),
        Outcome::Connected
    );

    // Unchanged: a 304, no import.
    let (_, not_modified) = server.counts("/drop.txt");
    let out = ok(lab.daemon().cli(&["feeds", "refresh", "drop"]));
    assert!(out.contains("drop: unchanged"), "{out}");
    assert_eq!(server.counts("/drop.txt").1, not_modified + 1);
    assert_eq!(feed(&lab, "drop")["unchanged"], 1);
    assert_eq!(feed(&lab, "drop")["updated"], 2);

    // A malformed copy and a failing server: the last good copy stays.
    server.set("/drop.txt", "198.51.100.0/24 ; SBL1\ngarbage\n");
    server.fail("/drop_v6.json", 503);
    let out = lab.daemon().cli(&["feeds", "refresh"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let drop = feed(&lab, "drop");
    assert_eq!(drop["failures"], 1);
    assert!(
        drop["last_error"].as_str().unwrap().contains("line 2"),
        "{drop}"
    );
    let drop6 = feed(&lab, "drop6");
    assert_eq!(drop6["failures"], 1);
    assert!(
        drop6["last_error"].as_str().unwrap().contains("503"),
        "{drop6}"
    );
    assert_eq!(deny_list(&lab).len(), 4);
    assert_eq!(
        outcome(client, "198.51.100.7", "198.51.100.1:25"),
        Outcome::Connected
    );
    let log = lab.daemon().log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("feed refresh failed") && l.contains("drop6") && l.contains("503")),
        "{log}"
    );

    // `deny import` takes the JSON format too, as manual entries.
    let json = lab.dir().join("drop_v4.json");
    std::fs::write(
        &json,
        "{\"cidr\":\"198.18.0.0/15\",\"sblid\":\"SBL5\",\"rir\":\"arin\"}\n\
         {\"type\":\"metadata\",\"timestamp\":1764633600,\"size\":60,\"records\":1}\n",
    )
    .unwrap();
    let out = ok(lab
        .daemon()
        .cli(&["deny", "import", json.to_str().unwrap()]));
    assert!(out.contains("added 1"), "{out}");
    ok(lab.daemon().cli(&["deny", "del", "198.18.0.0/15"]));

    let out = lab.daemon().cli(&["feeds", "refresh", "nope"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("nope"), "{}", stderr(&out));
    // A prefix only a feed lists is the feed's to remove.
    let out = lab.daemon().cli(&["deny", "del", "203.0.113.128/25"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("feed drop"), "{}", stderr(&out));

    // Restart: the entries stay, and the held copy's validators are still
    // sent (drop6 answers 304). drop still serves garbage: its copy stays too.
    server.heal("/drop_v6.json");
    let (_, not_modified6) = server.counts("/drop_v6.json");
    let before = deny_list(&lab);
    lab.take_daemon().stop().unwrap();
    lab.start_daemon(&config).unwrap();
    assert_eq!(deny_list(&lab), before);
    wait_for_first_attempts(&lab);
    assert_eq!(server.counts("/drop_v6.json").1, not_modified6 + 1);
    assert_eq!(feed(&lab, "drop6")["unchanged"], 1);
    assert_eq!(feed(&lab, "drop")["failures"], 1);
    assert_eq!(deny_list(&lab), before);

    // A feed removed from the config takes its entries with it at the next start.
    lab.take_daemon().stop().unwrap();
    let only_drop6 = format!(
        "[[feeds]]\nname = \"drop6\"\nurl = \"{}\"\nlist = \"deny\"\n",
        server.url("/drop_v6.json")
    );
    lab.start_daemon(&only_drop6).unwrap();
    assert_eq!(
        deny_list(&lab),
        [
            entry("192.0.2.128/25", true, &[]),
            entry("203.0.113.0/25", true, &[]),
            entry("2001:db8:5::/48", false, &["drop6"]),
        ]
    );
}
