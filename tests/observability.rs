//! What operators' tools read: `/metrics` judged by `promtool check metrics`
//! and compared with the traffic sent and with `stats --json`; the log lines
//! judged by `fail2ban-regex` with the shipped filter.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use sandbox::daemon::ok;
use sandbox::dnsbl::{Dataset, Rbldnsd};
use sandbox::lab::{Lab, PeerSpec};
use sandbox::require_kernel_privileges;
use sandbox::scrape::{promtool_check, samples};
use sandbox::smtp::{SmtpClient, SmtpSink};
use serde_json::Value;

const MX: &str = "192.0.2.1:25";
const SENDER: &str = "192.0.2.2";
const LISTED: &str = "192.0.2.10";
const RELAYER: &str = "192.0.2.20";
const PREGREETER: &str = "192.0.2.21";
const FUMBLER: &str = "192.0.2.22";
const RBLDNSD: &str = "127.0.0.1:5300";
const METRICS: &str = "127.0.0.1:9425";

fn lab(tag: &str) -> Lab {
    Lab::new(
        tag,
        vec![PeerSpec {
            name: "client",
            edge_addrs: vec!["192.0.2.1/24"],
            peer_addrs: vec![
                "192.0.2.2/24",
                "192.0.2.3/24",
                "192.0.2.10/24",
                "192.0.2.20/24",
                "192.0.2.21/24",
                "192.0.2.22/24",
            ],
        }],
    )
    .expect("building the lab")
}

/// `[smtp]` in front of smtp-sink at 127.0.0.1:10025, plus `extra` tables.
fn smtp_config(top: &str, smtp_extra: &str, extra: &str) -> String {
    format!(
        "{top}\n[smtp]\nlisten = [\"0.0.0.0:25\"]\nhostname = \"mx.example.org\"\n\
         local_domains = [\"example.org\"]\nrelay_networks = [\"127.0.0.0/8\"]\n\
         upstream = \"127.0.0.1:10025\"\n{smtp_extra}\n{extra}\n"
    )
}

fn client(lab: &Lab, source: &str) -> SmtpClient {
    SmtpClient::connect(lab.peer("client"), source, MX).expect("connecting")
}

fn deliver(lab: &Lab, source: &str) {
    let mut c = client(lab, source);
    c.start_transaction("client.test", "<a@client.test>")
        .unwrap();
    assert_eq!(c.cmd("RCPT TO:<user@example.org>").unwrap().code, 250);
    assert_eq!(c.cmd("DATA").unwrap().code, 354);
    let reply = c.cmd("Subject: hi\r\n\r\nhello\r\n.").unwrap();
    assert_eq!(reply.code, 250, "{reply}");
    assert_eq!(c.cmd("QUIT").unwrap().code, 221);
}

/// `count` refused relay recipients in one session, then QUIT.
fn relay_attempts(lab: &Lab, source: &str, count: usize) {
    let mut c = client(lab, source);
    c.start_transaction("relay.test", "<a@relay.test>").unwrap();
    for i in 0..count {
        let reply = c.cmd(&format!("RCPT TO:<victim{i}@victim.test>")).unwrap();
        assert_eq!(reply.code, 554, "{reply}");
    }
    assert_eq!(c.cmd("QUIT").unwrap().code, 221);
}

/// GET `path` from the metrics endpoint inside the edge namespace: (status line, headers, body).
fn http_get(lab: &Lab, path: &str) -> (String, String, String) {
    sandbox::scrape::http_get(&lab.edge, METRICS.parse().unwrap(), path)
}

fn sample(samples: &BTreeMap<String, f64>, name: &str) -> u64 {
    let value = samples
        .get(name)
        .unwrap_or_else(|| panic!("{name} not exposed; have {:#?}", samples.keys()));
    *value as u64
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn metrics_pass_promtool_and_match_the_traffic_and_stats() {
    if !require_kernel_privileges("metrics_pass_promtool_and_match_the_traffic_and_stats") {
        return;
    }
    const MAILS: usize = 3;
    const RELAYS: usize = 4;
    let mut lab = lab("metrics");
    let _sink = SmtpSink::start(&lab.edge, &lab.dir().join("sink"), "127.0.0.1:10025").unwrap();
    let _rbldnsd = Rbldnsd::start(
        &lab.edge,
        &lab.dir().join("rbldnsd"),
        RBLDNSD.parse().unwrap(),
        &[Dataset::listing("bl.test", &[LISTED])],
    )
    .expect("starting rbldnsd");
    let config = smtp_config(
        "",
        "",
        &format!(
            "[dnsbl]\nzones = [\"bl.test\"]\nnameservers = [\"{RBLDNSD}\"]\n\
             [metrics]\nlisten = \"{METRICS}\""
        ),
    );
    lab.start_daemon(&config).unwrap();
    let cli = |args: &[&str]| ok(lab.daemon().cli(args));
    cli(&["deny", "add", "198.51.100.0/24", "203.0.113.7"]);
    cli(&["deny", "add", "2001:db8:dead::/48"]);
    cli(&["allow", "add", "203.0.113.0/24"]);

    for _ in 0..MAILS {
        deliver(&lab, SENDER);
    }
    relay_attempts(&lab, SENDER, RELAYS);
    let mut listed = client(&lab, LISTED);
    assert_eq!(listed.reply().unwrap().code, 554);
    drop(listed);

    // Sessions end asynchronously after the client's last read: wait for the gauge.
    let mut body = String::new();
    for _ in 0..200 {
        let (status, headers, text) = http_get(&lab, "/metrics");
        assert!(status.contains(" 200 "), "{status}");
        assert!(
            headers.contains("content-type: text/plain; version=0.0.4"),
            "{headers}"
        );
        body = text;
        if samples(&body).get("gatekeeper_smtp_sessions") == Some(&0.0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    promtool_check(lab.dir(), &body);
    let stats: Value = lab.daemon().stats();
    let m = samples(&body);
    let smtp = &stats["smtp"];
    let json = |v: &Value| v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"));

    let sessions = (MAILS + 1 + 1) as u64;
    assert_eq!(sample(&m, "gatekeeper_smtp_sessions"), 0);
    assert_eq!(sample(&m, "gatekeeper_smtp_connections_total"), sessions);
    assert_eq!(json(&smtp["connections"]), sessions);
    let delivered = "gatekeeper_smtp_deliveries_total{result=\"delivered\"}";
    assert_eq!(sample(&m, delivered), MAILS as u64);
    assert_eq!(json(&smtp["messages_delivered"]), MAILS as u64);
    let relay = "gatekeeper_smtp_relay_denied_total{reason=\"foreign_domain\"}";
    assert_eq!(sample(&m, relay), RELAYS as u64);
    assert_eq!(json(&smtp["relay_denied"]["foreign_domain"]), RELAYS as u64);
    assert_eq!(
        sample(
            &m,
            "gatekeeper_smtp_relay_denied_total{reason=\"percent_hack\"}"
        ),
        0
    );
    assert_eq!(
        sample(&m, "gatekeeper_smtp_refused_total{reason=\"dnsbl\"}"),
        1
    );
    assert_eq!(json(&smtp["refused_dnsbl"]), 1);
    assert_eq!(
        sample(&m, "gatekeeper_smtp_recipients_accepted_total"),
        json(&smtp["recipients_accepted"])
    );
    // Every session that got a banner: all but the DNSBL-listed one.
    assert_eq!(
        sample(&m, "gatekeeper_smtp_banner_seconds_count"),
        sessions - 1
    );

    let zone = &stats["dnsbl"]["zones"][0];
    assert_eq!(zone["zone"], "bl.test");
    let queries = |result: &str| {
        sample(
            &m,
            &format!("gatekeeper_dnsbl_queries_total{{zone=\"bl.test\",result=\"{result}\"}}"),
        )
    };
    assert_eq!(queries("listed"), 1);
    assert_eq!(queries("listed"), json(&zone["hits"]));
    assert_eq!(queries("not_listed"), 1, "one clean client, cached after");
    assert_eq!(
        [
            "listed",
            "not_listed",
            "skipped",
            "error_code",
            "timeout",
            "failed"
        ]
        .map(queries)
        .iter()
        .sum::<u64>(),
        json(&zone["queries"])
    );
    assert_eq!(
        sample(
            &m,
            "gatekeeper_dnsbl_lookup_seconds_count{zone=\"bl.test\"}"
        ),
        2
    );
    assert_eq!(zone["health"], "healthy");
    assert_eq!(
        sample(&m, "gatekeeper_dnsbl_zone_healthy{zone=\"bl.test\"}"),
        1
    );
    assert_eq!(
        sample(&m, "gatekeeper_dnsbl_blocked_total"),
        json(&stats["dnsbl"]["blocked"])
    );
    assert_eq!(sample(&m, "gatekeeper_dnsbl_kernel_entries"), 1);
    assert_eq!(json(&stats["dnsbl"]["kernel_entries"]), 1);
    assert_eq!(
        sample(&m, "gatekeeper_dnsbl_checks_total{cache=\"hit\"}")
            + sample(&m, "gatekeeper_dnsbl_checks_total{cache=\"miss\"}"),
        json(&stats["dnsbl"]["checks"])
    );

    let entries = |list: &str, family: &str| {
        sample(
            &m,
            &format!("gatekeeper_list_entries{{list=\"{list}\",family=\"{family}\"}}"),
        )
    };
    assert_eq!((entries("deny", "ipv4"), entries("deny", "ipv6")), (2, 1));
    assert_eq!((entries("allow", "ipv4"), entries("allow", "ipv6")), (1, 0));
    assert_eq!(json(&stats["deny_entries"]), 3);

    // Every SYN came from our connections, all done before the scrape.
    let syns = |verdict: &str| {
        sample(
            &m,
            &format!("gatekeeper_xdp_syn_verdicts_total{{verdict=\"{verdict}\"}}"),
        )
    };
    assert_eq!(syns("pass"), sessions);
    assert_eq!(syns("pass"), json(&stats["passed"]));
    assert_eq!(
        syns("drop_deny") + syns("drop_dnsbl") + syns("pass_allow"),
        0
    );
    let packets = sample(&m, "gatekeeper_xdp_packets_total");
    assert!(
        packets >= sessions * 3 && packets <= json(&stats["packets"]),
        "{packets}"
    );
    assert_eq!(sample(&m, "gatekeeper_build_info{version=\"0.1.0\"}"), 1);

    // OpenMetrics for scrapers that ask for it; nothing but /metrics.
    let accept = "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text;version=1.0.0\r\nConnection: close\r\n\r\n";
    let response = lab
        .edge
        .run(move || -> std::io::Result<String> {
            let mut stream = TcpStream::connect(METRICS)?;
            stream.write_all(accept.as_bytes())?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok(response)
        })
        .unwrap()
        .unwrap();
    assert!(
        response
            .to_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{response}"
    );
    assert!(response.ends_with("# EOF\n"), "{response}");
    assert!(http_get(&lab, "/").0.contains(" 404 "));
    assert!(http_get(&lab, "/metricsx").0.contains(" 404 "));
}

/// Clients whose sessions fail2ban must not count.
fn normal_traffic(lab: &Lab) {
    deliver(lab, SENDER);
    // A client that just goes away, and one that makes one mistake.
    let mut c = client(lab, SENDER);
    assert_eq!(c.reply().unwrap().code, 220);
    drop(c);
    let mut c = client(lab, "192.0.2.3");
    assert_eq!(c.reply().unwrap().code, 220);
    // The parser refuses such a HELO; its text never reaches the log.
    let helo = "HELO x SMTP session ended client=203.0.113.9 outcome=error_limit";
    assert!(c.cmd(helo).unwrap().code >= 500);
    assert_eq!(c.cmd("QUIT").unwrap().code, 221);
}

/// Abusers: relay attempts (one line each), a pre-greet talker, a client that hits `max_errors`.
/// Returns the number of lines fail2ban must match.
fn abusive_traffic(lab: &Lab) -> usize {
    relay_attempts(lab, RELAYER, 2);
    let mut c = client(lab, PREGREETER);
    c.send(b"EHLO eager.test\r\n").unwrap();
    assert_eq!(c.reply().unwrap().code, 554, "talked before the greeting");
    let mut c = client(lab, FUMBLER);
    assert_eq!(c.reply().unwrap().code, 220);
    for _ in 0..3 {
        assert_eq!(c.cmd("BOGUS").unwrap().code, 500);
    }
    assert_eq!(c.reply().unwrap().code, 421, "max_errors = 3");
    2 + 1 + 1
}

fn fail2ban_filter_on_daemon_log(tag: &str, log_format: &str) {
    let mut lab = lab(tag);
    let _sink = SmtpSink::start(&lab.edge, &lab.dir().join("sink"), "127.0.0.1:10025").unwrap();
    let config = smtp_config(
        &format!("log_format = \"{log_format}\""),
        "greet_wait = \"300ms\"\nmax_errors = 3\npregreet_deny_ttl = \"1h\"",
        "",
    );
    lab.start_daemon(&config).unwrap();
    normal_traffic(&lab);
    let expected = abusive_traffic(&lab);
    normal_traffic(&lab);
    let daemon = lab.take_daemon();
    let log = daemon.log_path().to_owned();
    daemon.stop().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    if log_format == "json" {
        assert!(text.lines().all(|l| l.starts_with('{')), "{text}");
    }

    // The filter includes common.conf, found next to it once installed.
    let filter_dir = lab.dir().join("filter.d");
    std::fs::create_dir(&filter_dir).unwrap();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging/fail2ban/filter.d/gatekeeper.conf");
    std::fs::copy(&shipped, filter_dir.join("gatekeeper.conf")).unwrap();
    std::os::unix::fs::symlink(
        "/etc/fail2ban/filter.d/common.conf",
        filter_dir.join("common.conf"),
    )
    .unwrap();
    let out = Command::new("fail2ban-regex")
        .args(["-o", "ip"])
        .arg(&log)
        .arg(filter_dir.join("gatekeeper.conf"))
        .stdin(Stdio::null())
        .output()
        .expect("fail2ban-regex (Debian package fail2ban; cargo xtask setup installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fail2ban-regex failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let matched: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(matched.len(), expected, "matches {matched:?} in\n{text}");
    let addresses: BTreeSet<&str> = matched.iter().copied().collect();
    assert_eq!(
        addresses,
        BTreeSet::from([RELAYER, PREGREETER, FUMBLER]),
        "in\n{text}"
    );
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn fail2ban_filter_matches_the_abusers_in_text_logs() {
    if !require_kernel_privileges("fail2ban_filter_matches_the_abusers_in_text_logs") {
        return;
    }
    fail2ban_filter_on_daemon_log("f2btext", "text");
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn fail2ban_filter_matches_the_abusers_in_json_logs() {
    if !require_kernel_privileges("fail2ban_filter_matches_the_abusers_in_json_logs") {
        return;
    }
    fail2ban_filter_on_daemon_log("f2bjson", "json");
}
