//! A SYN flood over veth from one namespace into the protected one: the same
//! traffic against Gatekeeper's XDP (generic and native), nftables with the
//! same prefixes (netdev ingress and prerouting), and no filter at all.
//! Reports packets received per second and the softirq CPU each cost.
//! The sender is trafgen (netsniff-ng) on one CPU, replaying the frames round-robin.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use sandbox::frames::{with_ipv4_tcp_checksums, Ipv4Syn};
use sandbox::lab::Lab;
use serde_json::Value;

use super::generate_prefixes;

pub struct FloodRow {
    pub mode: &'static str,
    pub sent_pps: f64,
    pub received_pps: f64,
    pub softirq_ns_per_packet: f64,
    /// Protected SYNs dropped, as the filter counts them (XDP counters or nft).
    pub dropped_share: Option<f64>,
}

/// Sources 192.0.2.16–.127 are clean, .128–.239 inside a denylisted /25: half the flood is listed.
const DENIED: &str = "192.0.2.128/25";

pub fn run(quick: bool) -> Result<Vec<FloodRow>> {
    let duration = Duration::from_secs(if quick { 1 } else { 5 });
    let list_size = if quick { 1_000 } else { 100_000 };
    let mut lab = Lab::two_hosts("benchflood", "flooder")?;
    let flooder = lab.peer("flooder");
    let (dst, src) = (lab.edge.mac_of("gk0")?, flooder.mac_of("eth0")?);
    let frames: Vec<Vec<u8>> = (16u8..240)
        .map(|last| {
            with_ipv4_tcp_checksums(
                Ipv4Syn {
                    source: [192, 0, 2, last],
                    ..Ipv4Syn::default()
                }
                .frame(dst, src),
            )
        })
        .collect();
    let mut prefixes: Vec<String> = generate_prefixes(list_size)
        .into_iter()
        .filter(|p| {
            !p.parse::<ipnet::Ipv4Net>()
                .is_ok_and(|n| n.contains(&std::net::Ipv4Addr::new(192, 0, 2, 16)))
        })
        .collect();
    prefixes.push(DENIED.into());
    let list = lab.dir().join("flood-deny.txt");
    std::fs::write(&list, prefixes.join("\n"))?;

    let mut rows = Vec::new();
    rows.push(measure(
        &lab,
        "no filter (the kernel answers RSTs)",
        &frames,
        duration,
        None,
    )?);

    lab.start_daemon("xdp_mode = \"skb\"")?;
    let out = lab
        .daemon()
        .cli(&["deny", "import", list.to_str().context("list path")?]);
    ensure!(
        out.status.success(),
        "import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    rows.push(measure(
        &lab,
        "Gatekeeper XDP, generic (skb) mode",
        &frames,
        duration,
        Some(Counters::Xdp),
    )?);
    lab.take_daemon().stop()?;
    lab.start_daemon("xdp_mode = \"native\"")?;
    rows.push(measure(
        &lab,
        "Gatekeeper XDP, native mode",
        &frames,
        duration,
        Some(Counters::Xdp),
    )?);
    lab.take_daemon().stop()?;

    for (mode, family, hook) in [
        (
            "nftables netdev ingress, same set",
            "netdev",
            "type filter hook ingress device \"gk0\" priority -500;",
        ),
        (
            "nftables ip prerouting, same set",
            "ip",
            "type filter hook prerouting priority -300;",
        ),
    ] {
        let ruleset = nft_ruleset(family, hook, &prefixes);
        let file = lab.dir().join("flood.nft");
        std::fs::write(&file, ruleset)?;
        let out = lab.edge.command("nft").arg("-f").arg(&file).output()?;
        ensure!(
            out.status.success(),
            "nft -f: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let row = measure(&lab, mode, &frames, duration, Some(Counters::Nft(family)));
        let _ = lab
            .edge
            .command("nft")
            .args(["delete", "table", family, "gkflood"])
            .output();
        rows.push(row?);
    }
    Ok(rows)
}

enum Counters {
    Xdp,
    Nft(&'static str),
}

fn measure(
    lab: &Lab,
    mode: &'static str,
    frames: &[Vec<u8>],
    duration: Duration,
    counters: Option<Counters>,
) -> Result<FloodRow> {
    let rx_before = rx_packets(lab)?;
    let softirq_before = softirq_jiffies()?;
    let dropped_before = dropped(lab, &counters)?;
    let sent = trafgen(lab, frames, duration)?;
    std::thread::sleep(Duration::from_millis(200)); // let queued packets drain
    let received = rx_packets(lab)? - rx_before;
    let softirq = softirq_jiffies()? - softirq_before;
    let dropped = dropped(lab, &counters)? - dropped_before;
    let seconds = duration.as_secs_f64();
    // /proc/stat counts in USER_HZ (100 per second).
    let softirq_ns = softirq as f64 * 10_000_000.0;
    Ok(FloodRow {
        mode,
        sent_pps: sent as f64 / seconds,
        received_pps: received as f64 / seconds,
        softirq_ns_per_packet: softirq_ns / (received.max(1)) as f64,
        dropped_share: counters.map(|_| dropped as f64 / received.max(1) as f64),
    })
}

/// Runs trafgen in the flooder's namespace for `duration`; returns the frames
/// that left the flooder's interface (its own counter: trafgen's summary is
/// missing when it stops on a full TX ring).
fn trafgen(lab: &Lab, frames: &[Vec<u8>], duration: Duration) -> Result<u64> {
    let flooder = lab.peer("flooder");
    let tx_before = link_packets(flooder, "eth0", "tx")?;
    let config = lab.dir().join("flood.trafgen");
    let text: Vec<String> = frames
        .iter()
        .map(|f| {
            let bytes: Vec<String> = f.iter().map(|b| format!("0x{b:02x}")).collect();
            format!("{{ {} }}", bytes.join(", "))
        })
        .collect();
    std::fs::write(&config, text.join("\n") + "\n")?;
    use std::os::unix::process::CommandExt;
    let child = lab
        .peer("flooder")
        .command("trafgen")
        .arg("-i")
        .arg(&config)
        .args(["-o", "eth0", "--cpus", "1", "-q"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .context("starting trafgen (Debian package netsniff-ng)")?;
    std::thread::sleep(duration);
    // Like Ctrl-C: trafgen's forked workers stop only when the whole group gets SIGINT.
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )?;
    child.wait_with_output()?;
    Ok(link_packets(flooder, "eth0", "tx")? - tx_before)
}

fn rx_packets(lab: &Lab) -> Result<u64> {
    link_packets(&lab.edge, "gk0", "rx")
}

/// An interface's `rx` or `tx` packet counter in `ns`.
fn link_packets(ns: &sandbox::Netns, interface: &str, direction: &str) -> Result<u64> {
    let out = ns
        .command("ip")
        .args(["-j", "-s", "link", "show", interface])
        .output()?;
    let shown: Value = serde_json::from_slice(&out.stdout).context("ip -j -s link")?;
    shown[0]["stats64"][direction]["packets"]
        .as_u64()
        .with_context(|| format!("no {direction} packet count for {interface}"))
}

/// Softirq time of all CPUs, in USER_HZ ticks.
fn softirq_jiffies() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let cpu = stat.lines().next().context("empty /proc/stat")?;
    cpu.split_whitespace()
        .nth(7)
        .and_then(|v| v.parse().ok())
        .context("no softirq field in /proc/stat")
}

fn dropped(lab: &Lab, counters: &Option<Counters>) -> Result<u64> {
    match counters {
        None => Ok(0),
        Some(Counters::Xdp) => Ok(lab.daemon().counter("dropped_deny")),
        Some(Counters::Nft(family)) => {
            let out = lab
                .edge
                .command("nft")
                .args(["-j", "list", "table", family, "gkflood"])
                .output()?;
            let listed: Value = serde_json::from_slice(&out.stdout).context("nft -j list")?;
            Ok(listed["nftables"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|item| item["rule"]["expr"].as_array())
                .flatten()
                .filter_map(|expr| expr["counter"]["packets"].as_u64())
                .sum())
        }
    }
}

fn nft_ruleset(family: &str, hook: &str, prefixes: &[String]) -> String {
    let mut text = format!(
        "table {family} gkflood {{\n  set deny4 {{\n    type ipv4_addr\n    flags interval\n    auto-merge\n    elements = {{\n"
    );
    for prefix in prefixes {
        text.push_str("      ");
        text.push_str(prefix);
        text.push_str(",\n");
    }
    text.push_str(&format!(
        "    }}\n  }}\n  chain filter {{\n    {hook}\n    tcp dport 25 tcp flags & (syn | ack) == syn ip saddr @deny4 counter drop\n  }}\n}}\n"
    ));
    text
}
