//! Per-packet verdict cost with `BPF_PROG_TEST_RUN` (`bpftool prog run`):
//! a bare `XDP_DROP` floor program, Gatekeeper's program on typical packets
//! with growing lists, and xdp-filter on the same packets; plus the kernel
//! memory of the maps and the cost of tearing 1M prefixes down.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use sandbox::frames::{ipv4_udp, Ipv4Syn, Ipv6Syn};
use sandbox::lab::Lab;
use sandbox::Netns;
use serde_json::Value;

use super::{generate_shaped, ListShape};
use crate::build;

/// Denylisted in every list size; all packets but the clean ones come from it.
const LISTED_V4: [u8; 4] = [203, 0, 113, 7];
const CLEAN_V4: [u8; 4] = [198, 51, 100, 7];
const LISTED_V6: &str = "2001:db8:7::7";

pub struct VerdictFigures {
    pub repeat: u32,
    /// Median of every floor sample of the run.
    pub floor_ns: f64,
    /// (list size label, packet label, ns, ratio to the floor samples taken beside it)
    pub rows: Vec<(String, &'static str, f64, f64)>,
    /// (packet label, ns, ratio)
    pub xdp_filter: Vec<(&'static str, f64, f64)>,
    /// (label, bytes of kernel memory, entries)
    pub map_memory: Vec<(String, u64, usize)>,
    pub teardown: Duration,
}

struct Packet {
    label: &'static str,
    file: PathBuf,
}

pub fn run(quick: bool) -> Result<VerdictFigures> {
    let repeat = if quick { 100_000 } else { 1_000_000 };
    let sizes: &[usize] = if quick {
        &[1_000, 10_000]
    } else {
        &[1_000, 100_000, 1_000_000]
    };
    let v6_size = if quick { 10_000 } else { 100_000 };

    let mut lab = Lab::two_hosts("benchverdict", "peer")?;
    let packets = write_packets(lab.dir())?;
    let floor = Floor::load(&lab)?;

    lab.start_daemon("[maps]\ndeny_v4 = 1100000\ndeny_v6 = 200000\n")?;
    let program = attached_program(&lab.edge, "gk0")?;
    let mut rows = Vec::new();
    let mut map_memory = Vec::new();
    // The first round's list at three sizes, then the harsher shapes at the largest.
    let largest = *sizes.last().context("sizes")?;
    let lists = sizes.iter().map(|&size| (size, ListShape::Mixed)).chain(
        ListShape::ALL
            .into_iter()
            .filter(|&shape| shape != ListShape::Mixed)
            .map(|shape| (largest, shape)),
    );
    for (size, shape) in lists {
        let list = lab.dir().join(format!("v4-{size}-{shape:?}.txt"));
        let mut prefixes = generate_shaped(size - 1, shape)
            .into_iter()
            .filter(|p| !covers(p, CLEAN_V4))
            .collect::<Vec<_>>();
        prefixes.push("203.0.113.7/32".into());
        prefixes.push("2001:db8:7::7/128".into());
        std::fs::write(&list, prefixes.join("\n"))?;
        import(&lab, &list)?;
        let label = match shape {
            ListShape::Mixed => format!("{size} IPv4 prefixes"),
            other => format!("{size} IPv4 prefixes, {} shape", other.label()),
        };
        for packet in &packets {
            let (ns, ratio) = floor.compare(&program, &packet.file, repeat)?;
            rows.push((label.clone(), packet.label, ns, ratio));
        }
        let bytes = map_bytes(&lab, "DENY_V4")?
            + map_bytes(&lab, "DENY_V4_EXACT")?
            + map_bytes(&lab, "DENY_V4_SLOTS")?;
        map_memory.push((label, bytes, prefixes.len() - 1));
    }
    // Tearing down the largest tries: the daemon's stop removes the pins, the kernel frees them.
    let started = Instant::now();
    lab.take_daemon().stop()?;
    let teardown = started.elapsed();

    lab.start_daemon("[maps]\ndeny_v4 = 1100000\ndeny_v6 = 200000\n")?;
    let program = attached_program(&lab.edge, "gk0")?;
    let list = lab.dir().join("v6.txt");
    let mut v6 = generate_v6_prefixes(v6_size - 1);
    v6.push(format!("{LISTED_V6}/128"));
    std::fs::write(&list, v6.join("\n"))?;
    import(&lab, &list)?;
    let label = format!("{v6_size} IPv6 prefixes");
    for packet in packets.iter().filter(|p| p.label.contains("IPv6")) {
        let (ns, ratio) = floor.compare(&program, &packet.file, repeat)?;
        rows.push((label.clone(), packet.label, ns, ratio));
    }
    let bytes = map_bytes(&lab, "DENY_V6")? + map_bytes(&lab, "DENY_V6_EXACT")?;
    map_memory.push((label, bytes, v6.len()));
    lab.take_daemon().stop()?;

    let xdp_filter = xdp_filter(&packets, repeat, &floor)?;
    let floor_ns = super::median(floor.samples.borrow().clone());
    Ok(VerdictFigures {
        repeat,
        floor_ns,
        rows,
        xdp_filter,
        map_memory,
        teardown,
    })
}

fn write_packets(dir: &Path) -> Result<Vec<Packet>> {
    let (dst, src) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
    let listed_syn = Ipv4Syn {
        source: LISTED_V4,
        ..Ipv4Syn::default()
    };
    let frames: Vec<(&'static str, Vec<u8>)> = vec![
        (
            "SYN :25 from a denylisted source (drop)",
            listed_syn.frame(dst, src),
        ),
        (
            "SYN :25 from a clean source (pass)",
            Ipv4Syn {
                source: CLEAN_V4,
                ..Ipv4Syn::default()
            }
            .frame(dst, src),
        ),
        (
            "ACK segment :25 from a denylisted source (pass)",
            Ipv4Syn {
                flags: 0x10,
                ..listed_syn
            }
            .frame(dst, src),
        ),
        ("UDP datagram (pass)", ipv4_udp(dst, src, LISTED_V4)),
        (
            "IPv6 SYN :25 from a denylisted source (drop)",
            Ipv6Syn {
                source: LISTED_V6.parse()?,
                ext_headers: vec![],
                first_fragment: false,
                vlan_tags: 0,
            }
            .frame(dst, src),
        ),
        (
            "VLAN-tagged SYN :25 from a denylisted source (drop)",
            Ipv4Syn {
                vlan_tags: 1,
                ..listed_syn
            }
            .frame(dst, src),
        ),
    ];
    frames
        .into_iter()
        .enumerate()
        .map(|(i, (label, frame))| {
            let file = dir.join(format!("packet-{i}.bin"));
            std::fs::write(&file, frame)?;
            Ok(Packet { label, file })
        })
        .collect()
}

fn covers(prefix: &str, addr: [u8; 4]) -> bool {
    let net: ipnet::Ipv4Net = prefix.parse().expect("generated prefix");
    net.contains(&std::net::Ipv4Addr::from(addr))
}

fn generate_v6_prefixes(count: usize) -> Vec<String> {
    let lengths = [128u8, 128, 128, 64, 48, 56, 32];
    let mut next = super::xorshift(0x2545_f491_4f6c_dd1d);
    let mut seen = std::collections::HashSet::with_capacity(count);
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let state = next();
        let len = lengths[(state >> 50) as usize % lengths.len()];
        // Inside 2001:db8::/32, away from the listed 2001:db8:7::/48.
        let low = u128::from(state) << 64 | u128::from(state.rotate_left(29));
        let addr = (0x2001_0db8u128 << 96) | (low >> 32) & !(0xffffu128 << 80) | (0x8000u128 << 80);
        let net = ipnet::Ipv6Net::new(std::net::Ipv6Addr::from(addr), len)
            .expect("lengths are at most 128")
            .trunc();
        if seen.insert(net) {
            out.push(net.to_string());
        }
    }
    out
}

fn import(lab: &Lab, list: &Path) -> Result<()> {
    let out = lab.daemon().cli(&[
        "deny",
        "import",
        "--replace",
        list.to_str().context("list path")?,
    ]);
    ensure!(
        out.status.success(),
        "import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The program attached to `interface` in `ns`, as `id N` for bpftool.
fn attached_program(ns: &Netns, interface: &str) -> Result<String> {
    let out = ns
        .command("bpftool")
        .args(["-j", "net", "show", "dev", interface])
        .output()?;
    ensure!(
        out.status.success(),
        "bpftool net show: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown: Value = serde_json::from_slice(&out.stdout)?;
    let id = shown[0]["xdp"][0]["id"]
        .as_u64()
        .context("no XDP program attached")?;
    Ok(id.to_string())
}

/// Median of three `bpftool prog run` averages, in ns.
fn run_program(id: &str, packet: &Path, repeat: u32) -> Result<f64> {
    let mut runs = Vec::new();
    for _ in 0..3 {
        let out = std::process::Command::new("bpftool")
            .args(["prog", "run", "id", id, "data_in"])
            .arg(packet)
            .args(["repeat", &repeat.to_string()])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "bpftool prog run: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        runs.push(parse_duration_ns(&text).with_context(|| format!("bpftool said {text:?}"))?);
    }
    Ok(super::median(runs))
}

/// `Return value: 1, duration (average): 32ns`
fn parse_duration_ns(text: &str) -> Option<f64> {
    let after = text.split("duration").nth(1)?;
    let digits: String = after
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// The bench-only floor program, loaded once; every measurement alternates
/// it with the program under test on the same packet, so drifts in machine
/// speed hit both sides of a ratio alike.
struct Floor {
    id: String,
    pin: PathBuf,
    samples: std::cell::RefCell<Vec<f64>>,
}

impl Floor {
    fn load(lab: &Lab) -> Result<Floor> {
        let object = build::workspace_root().join("target/bpfel-unknown-none/release/bench-floor");
        let pin = PathBuf::from(format!("/sys/fs/bpf/gkbench-floor-{}", std::process::id()));
        let _ = std::fs::remove_file(&pin);
        let out = lab
            .edge
            .command("bpftool")
            .args(["prog", "load"])
            .arg(&object)
            .arg(&pin)
            .args(["type", "xdp"])
            .output()?;
        ensure!(
            out.status.success(),
            "loading the floor program: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut floor = Floor {
            id: String::new(),
            pin,
            samples: Default::default(),
        };
        let shown = std::process::Command::new("bpftool")
            .args(["-j", "prog", "show", "pinned"])
            .arg(&floor.pin)
            .output()?;
        let id = serde_json::from_slice::<Value>(&shown.stdout)?["id"]
            .as_u64()
            .context("floor program id")?;
        floor.id = id.to_string();
        Ok(floor)
    }

    /// The program's ns per packet and its ratio to the floor, both medians of three alternating runs.
    fn compare(&self, program: &str, packet: &Path, repeat: u32) -> Result<(f64, f64)> {
        let (mut floor, mut measured) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            floor.push(run_program(&self.id, packet, repeat)?);
            measured.push(run_program(program, packet, repeat)?);
        }
        self.samples.borrow_mut().extend(&floor);
        let (floor, measured) = (super::median(floor), super::median(measured));
        Ok((measured, measured / floor))
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.pin);
    }
}

/// Kernel memory of a pinned map (fdinfo `memlock`, the map's own accounting).
fn map_bytes(lab: &Lab, name: &str) -> Result<u64> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(lab.bpffs_dir().join(name))
        .output()?;
    ensure!(
        out.status.success(),
        "bpftool map show: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Value>(&out.stdout)?["bytes_memlock"]
        .as_u64()
        .context("no bytes_memlock")
}

/// xdp-filter (xdp-tools) in a lab of its own, dropping the same source.
fn xdp_filter(
    packets: &[Packet],
    repeat: u32,
    floor: &Floor,
) -> Result<Vec<(&'static str, f64, f64)>> {
    let lab = Lab::two_hosts("benchxdpfilter", "peer")?;
    let run = |args: &[&str]| -> Result<()> {
        let out = lab.edge.command("xdp-filter").args(args).output()?;
        if !out.status.success() {
            bail!(
                "xdp-filter {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    };
    // libxdp leaves its bpffs directory behind; remove it afterwards if we caused it.
    let libxdp_dir = Path::new("/sys/fs/bpf/xdp");
    let libxdp_dir_was_there = libxdp_dir.exists();
    run(&["load", "gk0", "-m", "skb"])?;
    let result = (|| {
        run(&["ip", "203.0.113.7", "-m", "src"])?;
        run(&["ip", LISTED_V6, "-m", "src"])?;
        let program = attached_program(&lab.edge, "gk0")?;
        packets
            .iter()
            .map(|p| {
                let (ns, ratio) = floor.compare(&program, &p.file, repeat)?;
                Ok((p.label, ns, ratio))
            })
            .collect::<Result<Vec<_>>>()
    })();
    let _ = run(&["unload", "gk0", "--all"]);
    if !libxdp_dir_was_there {
        let _ = std::fs::remove_dir(libxdp_dir); // only succeeds when empty
    }
    result
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_bpftool_durations() {
        assert_eq!(
            super::parse_duration_ns("Return value: 1, duration (average): 32ns\n"),
            Some(32.0)
        );
        assert_eq!(super::parse_duration_ns("nothing"), None);
    }
}
