//! The daemon's durability and the CLI's contract: exit codes, all-or-nothing
//! batches, imports, restarts and crashes.

use std::io::Write;
use std::process::{Command, Output};
use std::time::Duration;

use sandbox::daemon::{gatekeeper_bin, ok};
use sandbox::lab::{Lab, PeerSpec};
use sandbox::probe::{listen, outcome, Outcome};
use sandbox::require_kernel_privileges;

fn lab(tag: &str) -> Lab {
    Lab::new(
        tag,
        vec![PeerSpec {
            name: "client",
            edge_addrs: vec!["192.0.2.1/24", "2001:db8:1::1/64"],
            peer_addrs: vec!["192.0.2.2/24", "192.0.2.3/24", "2001:db8:1::2/64"],
        }],
    )
    .expect("building the lab")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn listed(lab: &Lab, list: &str) -> Vec<String> {
    ok(lab.daemon().cli(&[list, "list"]))
        .lines()
        .map(|l| l.split('\t').next().unwrap().to_owned())
        .collect()
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn bad_input_is_refused_with_exit_2_and_changes_nothing() {
    if !require_kernel_privileges("bad_input_is_refused") {
        return;
    }
    let mut lab = lab("badinput");
    lab.start_daemon("").unwrap();
    let gk = lab.daemon();
    ok(gk.cli(&["deny", "add", "192.0.2.50"]));

    let cases: &[(&[&str], &str)] = &[
        (&["deny", "add", "192.0.2.2", "not-an-ip"], "not-an-ip"),
        (&["deny", "add", "192.0.2.7/24"], "192.0.2.0/24"),
        (&["allow", "add", "2001:db8::1/64"], "2001:db8::/64"),
        (&["deny", "add", "192.0.2.0/33"], "192.0.2.0/33"),
        (&["deny", "del", "192.0.2.50", "192.0.2.99"], "192.0.2.99"),
        (&["deny", "del", "garbage"], "garbage"),
    ];
    for (args, named) in cases {
        let out = gk.cli(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(named),
            "{args:?} should name {named}: {}",
            stderr(&out)
        );
    }

    let file = lab.dir().join("bad.txt");
    std::fs::write(
        &file,
        "# list\n192.0.2.10\n192.0.2.11 ; SBL1\n192.0.2.13/30\n198.51.100.0/24\n",
    )
    .unwrap();
    let out = gk.cli(&["deny", "import", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("line 4"), "{}", stderr(&out));

    assert_eq!(
        listed(&lab, "deny"),
        ["192.0.2.50/32"],
        "nothing may have changed"
    );
    assert!(listed(&lab, "allow").is_empty());
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn import_reports_counts_and_keeps_reasons() {
    if !require_kernel_privileges("import_reports_counts_and_keeps_reasons") {
        return;
    }
    let mut lab = lab("import");
    listen(&lab.edge, 25).unwrap();
    lab.start_daemon("").unwrap();
    let gk = lab.daemon();
    let file = lab.dir().join("drop.txt");
    let mut text = String::from("; Spamhaus DROP List\n; Last-Modified: today\n");
    for i in 0..1000u32 {
        text.push_str(&format!("10.{}.{}.0/24 ; SBL{i}\n", i / 256, i % 256));
    }
    text.push_str("192.0.2.2/32 ; SBL-test\n2001:db8:1::/64 # plain comment\n");
    std::fs::write(&file, &text).unwrap();
    let out = ok(gk.cli(&["deny", "import", file.to_str().unwrap()]));
    assert!(out.contains("added 1002"), "{out}");
    let list: serde_json::Value =
        serde_json::from_str(&ok(gk.cli(&["deny", "list", "--json"]))).unwrap();
    let entries = list.as_array().unwrap();
    assert_eq!(entries.len(), 1002);
    let test_entry = entries
        .iter()
        .find(|e| e["prefix"] == "192.0.2.2/32")
        .unwrap();
    assert_eq!(test_entry["reason"], "SBL-test");
    let client = lab.peer("client");
    assert_eq!(
        outcome(client, "192.0.2.2", "192.0.2.1:25"),
        Outcome::TimedOut
    );
    assert_eq!(
        outcome(client, "2001:db8:1::2", "[2001:db8:1::1]:25"),
        Outcome::TimedOut
    );
    assert_eq!(
        outcome(client, "192.0.2.3", "192.0.2.1:25"),
        Outcome::Connected
    );
    // Importing again adds nothing new.
    assert!(ok(gk.cli(&["deny", "import", file.to_str().unwrap()])).contains("added 0"));
    assert_eq!(gk.stats()["deny_entries"], 1002);
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn entries_survive_clean_restart_and_crash() {
    if !require_kernel_privileges("entries_survive_clean_restart_and_crash") {
        return;
    }
    let mut lab = lab("restart");
    listen(&lab.edge, 25).unwrap();
    lab.start_daemon("").unwrap();
    ok(lab.daemon().cli(&[
        "deny",
        "add",
        "192.0.2.2",
        "2001:db8:1::2",
        "--reason",
        "durable",
    ]));
    ok(lab.daemon().cli(&["allow", "add", "192.0.2.3"]));

    // Clean stop: XDP detached, pins and socket gone.
    let status = lab.take_daemon().stop().unwrap();
    assert!(status.success(), "daemon exit status {status}");
    let link = lab.edge.ip(&["link", "show", "gk0"]).unwrap();
    assert!(
        !String::from_utf8_lossy(&link.stdout).contains("xdp"),
        "XDP still attached after stop"
    );
    assert!(
        !lab.bpffs_dir().join("DENY_V4").exists(),
        "pins left after a clean stop"
    );
    assert!(
        !lab.control_socket().exists(),
        "control socket left after a clean stop"
    );
    let client = lab.peer("client");
    assert_eq!(
        outcome(client, "192.0.2.2", "192.0.2.1:25"),
        Outcome::Connected,
        "no daemon, no drops"
    );

    lab.start_daemon("").unwrap();
    assert_eq!(listed(&lab, "deny"), ["192.0.2.2/32", "2001:db8:1::2/128"]);
    assert_eq!(listed(&lab, "allow"), ["192.0.2.3/32"]);
    let client = lab.peer("client");
    assert_eq!(
        outcome(client, "192.0.2.2", "192.0.2.1:25"),
        Outcome::TimedOut,
        "after restart"
    );
    assert_eq!(
        outcome(client, "2001:db8:1::2", "[2001:db8:1::1]:25"),
        Outcome::TimedOut
    );

    // Crash: an acknowledged entry must survive kill -9.
    ok(lab.daemon().cli(&["deny", "add", "192.0.2.3"]));
    ok(lab.daemon().cli(&["allow", "del", "192.0.2.3"]));
    lab.take_daemon().crash().unwrap();
    lab.start_daemon("").unwrap();
    assert_eq!(
        listed(&lab, "deny"),
        ["192.0.2.2/32", "192.0.2.3/32", "2001:db8:1::2/128"]
    );
    assert!(listed(&lab, "allow").is_empty());
    let client = lab.peer("client");
    assert_eq!(
        outcome(client, "192.0.2.3", "192.0.2.1:25"),
        Outcome::TimedOut,
        "after crash"
    );
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn kill_9_during_import_leaves_old_or_new_list() {
    if !require_kernel_privileges("kill_9_during_import_leaves_old_or_new_list") {
        return;
    }
    let mut lab = lab("killimport");
    lab.start_daemon("").unwrap();
    ok(lab.daemon().cli(&["deny", "add", "192.0.2.2"]));
    let file = lab.dir().join("big.txt");
    let mut text = String::with_capacity(8 << 20);
    for i in 0..200_000u32 {
        text.push_str(&format!(
            "{}.{}.{}.{}\n",
            11 + i / 65536 % 200,
            i / 256 % 256,
            i % 256,
            1 + i % 7
        ));
    }
    std::fs::write(&file, text).unwrap();
    let unique = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .collect::<std::collections::HashSet<_>>()
        .len();
    let mut outcomes = Vec::new();
    for delay_ms in [50u64, 200, 400, 700, 1200] {
        let before = listed(&lab, "deny").len();
        let mut import = Command::new(gatekeeper_bin())
            .arg("--control")
            .arg(lab.control_socket())
            .args(["deny", "import", file.to_str().unwrap(), "--replace"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        lab.take_daemon().crash().unwrap();
        let _ = import.wait();
        lab.start_daemon("").unwrap();
        let after = listed(&lab, "deny").len();
        assert!(
            after == before || after == unique,
            "kill -9 after {delay_ms} ms left {after} entries (old {before}, new {unique})"
        );
        outcomes.push(after == unique);
        // Back to the old list for the next round.
        let small = lab.dir().join("small.txt");
        std::fs::File::create(&small)
            .unwrap()
            .write_all(b"192.0.2.2\n")
            .unwrap();
        ok(lab
            .daemon()
            .cli(&["deny", "import", "--replace", small.to_str().unwrap()]));
        let leftovers: Vec<_> = std::fs::read_dir(lab.state_dir())
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(
            leftovers.is_empty(),
            "temp files survived a restart: {leftovers:?}"
        );
    }
    eprintln!("kill -9 rounds that ended with the new list: {outcomes:?}");
}

#[test]
fn cli_without_daemon_says_so_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(gatekeeper_bin())
        .arg("--control")
        .arg(dir.path().join("none.sock"))
        .args(["deny", "add", "192.0.2.1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("not running"), "{}", stderr(&out));
    // Bad input is still bad input, daemon or not.
    let out = Command::new(gatekeeper_bin())
        .arg("--control")
        .arg(dir.path().join("none.sock"))
        .args(["deny", "add", "192.0.2.1/8"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[test]
fn run_refuses_bad_config_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let run = |config: &str| -> Output {
        let path = dir.path().join("gk.toml");
        std::fs::write(&path, config).unwrap();
        Command::new(gatekeeper_bin())
            .args(["run", "-c"])
            .arg(&path)
            .output()
            .unwrap()
    };
    let base = format!(
        "state_dir = \"{0}/state\"\ncontrol_socket = \"{0}/c.sock\"\nbpffs_dir = \"/sys/fs/bpf/gkt-badcfg-{1}\"\n",
        dir.path().display(),
        std::process::id()
    );
    let cases = [
        (
            format!("interfaces = [\"lo\"]\nxdp_mode = \"turbo\"\n{base}"),
            "xdp_mode",
        ),
        (
            format!("interfaces = [\"lo\"]\nprotected_port = [25]\n{base}"),
            "protected_port",
        ),
        (
            format!("interfaces = [\"lo\"]\nprotected_ports = [0]\n{base}"),
            "protected_ports",
        ),
        (format!("interfaces = [\"lo\"\n{base}"), "line"),
        (
            format!("interfaces = [\"lo\"]\n{base}[smtp]\nupstream = \"127.0.0.1:10025\"\n[dnsbl]\nzones = [\"zen.spamhaus.org=127.0.0.[2..11\"]\n"),
            "zen.spamhaus.org=127.0.0.[2..11",
        ),
        (
            format!("interfaces = [\"lo\"]\n{base}[smtp]\nupstream = \"127.0.0.1:10025\"\n[dnsbl]\nzones = [\"bl.example.org*x\"]\n"),
            "bl.example.org*x",
        ),
    ];
    for (config, named) in &cases {
        let out = run(config);
        assert_eq!(out.status.code(), Some(1), "{config}: {}", stderr(&out));
        let message = stderr(&out);
        assert!(
            message.contains(named),
            "{config}: error should name {named}: {message}"
        );
        assert_eq!(
            message.trim().lines().count(),
            1,
            "one line expected: {message}"
        );
    }
    let out = Command::new(gatekeeper_bin())
        .args(["run", "-c"])
        .arg(dir.path().join("missing.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("missing.toml"), "{}", stderr(&out));

    if !require_kernel_privileges("run_refuses_bad_config (privileged cases)") {
        return;
    }
    let out = run(&format!("interfaces = [\"gkt-nosuchif0\"]\n{base}"));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("unknown interface 'gkt-nosuchif0'"),
        "{}",
        stderr(&out)
    );
    // Without root: a clear refusal, not an EPERM from deep inside.
    let path = dir.path().join("gk.toml");
    std::fs::write(&path, format!("interfaces = [\"lo\"]\n{base}")).unwrap();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(gatekeeper_bin())
        .args(["run", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("root"), "{}", stderr(&out));
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn kill_9_during_a_stream_of_changes_keeps_every_acknowledged_one() {
    if !require_kernel_privileges("kill_9_during_a_stream_of_changes") {
        return;
    }
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    // A tiny compaction threshold: journals rotate and fold into the
    // snapshot all the time, so the kills land in compactions too.
    const CONFIG: &str = "journal_compact_bytes = 1\n";
    let mut lab = lab("killstream");
    listen(&lab.edge, 25).unwrap();
    lab.start_daemon(CONFIG).unwrap();
    ok(lab.daemon().cli(&["deny", "add", "192.0.2.2"]));
    // Prefix → Some(listed) once acknowledged; None when the kill cut its
    // change short (then either state is allowed).
    let expected: Arc<Mutex<BTreeMap<String, Option<bool>>>> = Arc::default();
    expected
        .lock()
        .unwrap()
        .insert("192.0.2.2/32".into(), Some(true));
    for (round, delay_ms) in [150u64, 400, 700, 1000].into_iter().enumerate() {
        let socket = lab.control_socket();
        let clients: Vec<_> = (0..4usize)
            .map(|client| {
                let (socket, expected) = (socket.clone(), expected.clone());
                std::thread::spawn(move || {
                    let cli = |args: &[&str]| {
                        Command::new(gatekeeper_bin())
                            .arg("--control")
                            .arg(&socket)
                            .args(args)
                            .output()
                            .unwrap()
                            .status
                            .success()
                    };
                    for i in 0..10_000usize {
                        let prefix =
                            format!("10.{}.{}.{}/32", round * 4 + client, i / 256, i % 256);
                        // Add each prefix; delete every third one again.
                        let steps: &[(&str, bool)] = if i % 3 == 0 {
                            &[("add", true), ("del", false)]
                        } else {
                            &[("add", true)]
                        };
                        for &(verb, listed) in steps {
                            if cli(&["deny", verb, &prefix]) {
                                expected
                                    .lock()
                                    .unwrap()
                                    .insert(prefix.clone(), Some(listed));
                            } else {
                                expected.lock().unwrap().insert(prefix.clone(), None);
                                return i;
                            }
                        }
                    }
                    10_000
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(delay_ms));
        lab.take_daemon().crash().unwrap();
        let done: Vec<usize> = clients.into_iter().map(|c| c.join().unwrap()).collect();
        lab.start_daemon(CONFIG).unwrap();
        let listed: std::collections::BTreeSet<String> = listed(&lab, "deny").into_iter().collect();
        for (prefix, state) in expected.lock().unwrap().iter() {
            if let Some(present) = state {
                assert_eq!(
                    listed.contains(prefix),
                    *present,
                    "round {round} (kill after {delay_ms} ms, {done:?} prefixes per client): acknowledged state of {prefix} lost"
                );
            }
        }
        let known = expected.lock().unwrap().len();
        assert!(
            listed.len() <= known,
            "round {round}: {} entries listed, only {known} ever added",
            listed.len()
        );
        assert_eq!(
            lab.daemon().stats()["deny_entries"].as_u64(),
            Some(listed.len() as u64)
        );
    }
    let log: String = (0..5)
        .map(|i| {
            std::fs::read_to_string(lab.dir().join(format!("daemon-{i}.log"))).unwrap_or_default()
        })
        .collect();
    assert!(
        log.contains("journal compacted into the snapshot"),
        "no compaction happened; the test would not cover it"
    );
    assert!(lab.state_dir().join("deny.snapshot").exists());
    // The kernel agrees with the restored list.
    assert_eq!(
        outcome(lab.peer("client"), "192.0.2.2", "192.0.2.1:25"),
        Outcome::TimedOut
    );
    assert_eq!(
        outcome(lab.peer("client"), "192.0.2.3", "192.0.2.1:25"),
        Outcome::Connected
    );
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn format_1_list_files_are_migrated_on_start() {
    if !require_kernel_privileges("format_1_list_files_are_migrated_on_start") {
        return;
    }
    let mut lab = lab("migrate");
    listen(&lab.edge, 25).unwrap();
    std::fs::create_dir_all(lab.state_dir()).unwrap();
    std::fs::write(
        lab.state_dir().join("deny.json"),
        r#"{"version":1,"entries":[{"prefix":"192.0.2.2/32","reason":"old","added":1700000000},{"prefix":"2001:db8:1::2/128","added":1700000000}]}"#,
    )
    .unwrap();
    lab.start_daemon("").unwrap();
    assert_eq!(listed(&lab, "deny"), ["192.0.2.2/32", "2001:db8:1::2/128"]);
    assert!(!lab.state_dir().join("deny.json").exists());
    assert!(
        lab.daemon().log_text().contains("migrated"),
        "{}",
        lab.daemon().log_text()
    );
    assert_eq!(
        outcome(lab.peer("client"), "192.0.2.2", "192.0.2.1:25"),
        Outcome::TimedOut
    );
    ok(lab.daemon().cli(&["deny", "del", "192.0.2.2"]));
    lab.take_daemon().crash().unwrap();
    lab.start_daemon("").unwrap();
    assert_eq!(listed(&lab, "deny"), ["2001:db8:1::2/128"]);
}

/// One raw request line to the daemon, as a client other than the CLI would send it.
fn raw_request(lab: &Lab, line: &str) -> serde_json::Value {
    use std::io::{BufRead, BufReader};
    let mut stream = std::os::unix::net::UnixStream::connect(lab.control_socket()).unwrap();
    stream.write_all(line.as_bytes()).unwrap();
    stream.write_all(b"\n").unwrap();
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).unwrap();
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("{reply:?}: {e}"))
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn absurd_ttls_and_unknown_fields_are_refused_and_change_nothing() {
    if !require_kernel_privileges("absurd_ttls_and_unknown_fields_are_refused") {
        return;
    }
    let mut lab = lab("ttlfields");
    lab.start_daemon("").unwrap();
    let gk = lab.daemon();
    for ttl in ["18446744074s", "11y", "0s", "500ms"] {
        let out = gk.cli(&["deny", "add", "192.0.2.1", "--ttl", ttl]);
        assert_eq!(out.status.code(), Some(2), "--ttl {ttl}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("TTL"),
            "--ttl {ttl}: {}",
            stderr(&out)
        );
    }
    for line in [
        // `ttl` for `ttl_secs` used to make a permanent entry.
        r#"{"op":"list_add","list":"deny","entries":[{"prefix":"192.0.2.1","ttl":60}]}"#,
        r#"{"op":"list_add","list":"deny","entries":[{"prefix":"192.0.2.1","ttl_secs":18446744074}]}"#,
        r#"{"op":"list_add","list":"deny","entries":[{"prefix":"192.0.2.1","ttl_secs":0}]}"#,
        r#"{"op":"list_add","list":"deny","entries":[{"prefix":"192.0.2.7/24"}]}"#,
        r#"{"op":"list_add","list":"deny","entries":[],"replace":true}"#,
        r#"{"op":"stats","verbose":true}"#,
    ] {
        let reply = raw_request(&lab, line);
        assert_eq!(reply["reply"], "error", "{line}: {reply}");
        assert_eq!(reply["kind"], "invalid_input", "{line}: {reply}");
    }
    assert!(
        listed(&lab, "deny").is_empty(),
        "nothing may have been listed"
    );

    // The largest TTL is fine, and its expiry is what was asked for.
    ok(gk.cli(&["deny", "add", "192.0.2.1", "--ttl", "10y"]));
    let list: serde_json::Value =
        serde_json::from_str(&ok(gk.cli(&["deny", "list", "--json"]))).unwrap();
    let entry = &list[0];
    let lifetime = entry["expires"].as_u64().unwrap() - entry["added"].as_u64().unwrap();
    assert!(
        (315_576_000..315_576_000 + 60).contains(&lifetime),
        "10y became {lifetime} s"
    );
}

/// `gatekeeper --control SOCKET stats` as uid 65534 with the given group options.
fn stats_as_nobody(lab: &Lab, groups: &[&str]) -> Output {
    Command::new("setpriv")
        .arg("--reuid=65534")
        .args(groups)
        .args(["--inh-caps=-all", "--bounding-set=-all"])
        .arg(gatekeeper_bin())
        .arg("--control")
        .arg(lab.control_socket())
        .args(["stats", "--json"])
        .output()
        .unwrap()
}

fn socket_mode_and_gid(lab: &Lab) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(lab.control_socket()).unwrap();
    (meta.mode() & 0o7777, meta.gid())
}

fn chmod(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
#[cfg_attr(not(kernel_tests), ignore = "kernel-level: needs root, ip and nsenter")]
fn control_socket_serves_root_and_control_group_only() {
    if !require_kernel_privileges("control_socket_serves_root_and_control_group_only") {
        return;
    }
    const GROUP: &str = "4242"; // numeric: no /etc/group entry needed
    let no_groups = ["--regid=65534", "--clear-groups"];
    let mut lab = lab("peercred");
    lab.start_daemon("").unwrap();
    assert_eq!(socket_mode_and_gid(&lab).0, 0o600);
    chmod(lab.dir(), 0o755);
    let out = stats_as_nobody(&lab, &no_groups);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("permission denied"),
        "{}",
        stderr(&out)
    );

    // Even if the file mode let it in, the daemon checks the peer itself.
    chmod(&lab.control_socket(), 0o666);
    let out = stats_as_nobody(&lab, &no_groups);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("uid 65534 may not use the control socket"),
        "{}",
        stderr(&out)
    );
    assert!(
        lab.daemon()
            .log_text()
            .contains("control connection refused"),
        "refusal not logged:\n{}",
        lab.daemon().log_text()
    );
    ok(lab.daemon().cli(&["stats"]));

    lab.take_daemon().stop().unwrap();
    lab.start_daemon(&format!("control_group = \"{GROUP}\""))
        .unwrap();
    assert_eq!(socket_mode_and_gid(&lab), (0o660, 4242));
    let group_opt = format!("--groups={GROUP}");
    let primary_opt = format!("--regid={GROUP}");
    for (how, opts) in [
        ("supplementary", ["--regid=65534", group_opt.as_str()]),
        ("primary", [primary_opt.as_str(), "--clear-groups"]),
    ] {
        let out = stats_as_nobody(&lab, &opts);
        assert!(
            out.status.success(),
            "{how} member refused: {}",
            stderr(&out)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap();
    }
    let out = stats_as_nobody(&lab, &no_groups);
    assert_eq!(out.status.code(), Some(1), "non-member: {}", stderr(&out));
    chmod(&lab.control_socket(), 0o666);
    let out = stats_as_nobody(&lab, &no_groups);
    assert_eq!(out.status.code(), Some(1), "non-member: {}", stderr(&out));
    assert!(
        stderr(&out).contains("not in control_group '4242'"),
        "{}",
        stderr(&out)
    );
    ok(lab.daemon().cli(&["stats"]));

    lab.take_daemon().stop().unwrap();
    let err = lab
        .start_daemon("control_group = \"gkt-no-such-group\"")
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("control_group: no such group 'gkt-no-such-group'"),
        "{err:#}"
    );
}

/// No daemon, no root: `config check` reads the file and reports.
#[test]
fn config_check_names_every_problem_at_once_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gatekeeper.toml");
    let check = |text: &str| {
        std::fs::write(&path, text).unwrap();
        Command::new(gatekeeper_bin())
            .args(["config", "check"])
            .arg(&path)
            .output()
            .unwrap()
    };
    let out = check(
        "interfaces = [\"eth0\", \"eth0\"]\nintrefaces = [\"eth1\"]\nprotected_ports = [25, 70000]\n\
         [smtp]\nupstream = \"127.0.0.1:10025\"\nlisten = [\"0.0.0.0:25\", \"0.0.0.0:587\", \"bad\"]\n\
         [dnsbl]\nzones = [\"bl.example.org\"]\nthreshold = 2\n",
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let text = stderr(&out);
    for expected in [
        "intrefaces: unknown field",
        "protected_ports[1]",
        "smtp.listen[2]",
        "interfaces[1]: 'eth0' is listed twice",
        "dnsbl.threshold: 2 cannot be reached",
    ] {
        assert!(text.contains(expected), "{expected} missing from:\n{text}");
    }
    // Warnings alone leave the file valid.
    let out = check(
        "interfaces = [\"eth0\"]\n[smtp]\nupstream = \"127.0.0.1:10025\"\nlisten = [\"0.0.0.0:587\"]\n",
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("smtp.listen[0]: port 587 is not in protected_ports"),
        "{}",
        stderr(&out)
    );
    let missing = Command::new(gatekeeper_bin())
        .args(["config", "check"])
        .arg(dir.path().join("absent.toml"))
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
}
