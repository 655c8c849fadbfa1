//! A real DNSBL server for tests: rbldnsd on the edge's loopback, and a
//! small UDP relay in front of it that can keep chosen zones silent.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::netns::Netns;

/// One rbldnsd dataset: zone name, dataset type (`ip4set`, `ip6trie`...) and its lines.
pub struct Dataset {
    pub zone: &'static str,
    pub kind: &'static str,
    pub lines: Vec<String>,
}

impl Dataset {
    /// Every address listed with `127.0.0.2` and a TXT reason, plus the RFC 5782 test point.
    pub fn listing(zone: &'static str, addrs: &[&str]) -> Dataset {
        Self::with_value(zone, "127.0.0.2", addrs)
    }

    /// Listed addresses answered with `value` (`:A:TXT` default line).
    pub fn with_value(zone: &'static str, value: &str, addrs: &[&str]) -> Dataset {
        let mut lines = vec![format!(":{value}:Listed by {zone} for $")];
        lines.push("127.0.0.2".into());
        lines.extend(addrs.iter().map(|a| a.to_string()));
        Dataset {
            zone,
            kind: "ip4set",
            lines,
        }
    }

    pub fn ipv6(zone: &'static str, addrs: &[&str]) -> Dataset {
        let mut lines = vec![format!(":127.0.0.2:Listed by {zone} (IPv6)")];
        lines.extend(addrs.iter().map(|a| a.to_string()));
        Dataset {
            zone,
            kind: "ip6trie",
            lines,
        }
    }
}

/// rbldnsd (Debian package) serving `datasets` on `listen` inside `ns`,
/// logging every query so tests can count them.
pub struct Rbldnsd {
    child: Child,
    dir: PathBuf,
    pub addr: SocketAddr,
}

impl Rbldnsd {
    pub fn start(
        ns: &Netns,
        dir: &Path,
        addr: SocketAddr,
        datasets: &[Dataset],
    ) -> Result<Rbldnsd> {
        std::fs::create_dir_all(dir)?;
        // rbldnsd drops to its own user, which must read the zone files and write the log.
        crate::netns::open_to_service_users(dir);
        let mut specs = Vec::new();
        for (i, dataset) in datasets.iter().enumerate() {
            let file = format!("zone{i}.data");
            std::fs::write(dir.join(&file), dataset.lines.join("\n") + "\n")?;
            specs.push(format!("{}:{}:{file}", dataset.zone, dataset.kind));
        }
        let log = dir.join("queries.log");
        let child = ns
            .command("rbldnsd")
            .args(["-n", "-u", "rbldns", "-t", "30", "-b"])
            .arg(format!("{}/{}", addr.ip(), addr.port()))
            .arg("-w")
            .arg(dir)
            .arg("-l")
            .arg(format!("+{}", log.display()))
            .args(&specs)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting rbldnsd (Debian package rbldnsd)")?;
        let server = Rbldnsd {
            child,
            dir: dir.to_owned(),
            addr,
        };
        // rbldnsd binds before loading zones and answers once loaded: poll the test point.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if ns.run(move || probe_once(addr))? {
                return Ok(server);
            }
            if Instant::now() > deadline {
                bail!("rbldnsd did not answer on {addr}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("queries.log")).unwrap_or_default()
    }

    /// Every query name and type received so far, e.g. `10.2.0.192.bl.test A`.
    pub fn queries(&self) -> Vec<String> {
        self.log_text()
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                (fields.len() >= 4).then(|| format!("{} {}", fields[2], fields[3]))
            })
            .collect()
    }

    /// How many A queries asked about `name` (a full query name).
    pub fn a_queries_for(&self, name: &str) -> usize {
        let wanted = format!("{name} A");
        self.queries().iter().filter(|q| **q == wanted).count()
    }
}

impl Drop for Rbldnsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// dnsmasq as an authoritative-enough server of PTR and A/AAAA records,
/// for forward-confirmed reverse DNS: `records` are `--host-record` and
/// `--ptr-record` arguments, e.g. `host-record=mail.test,192.0.2.2`.
pub struct Dnsmasq {
    child: Child,
    pub addr: SocketAddr,
}

impl Dnsmasq {
    pub fn start(ns: &Netns, addr: SocketAddr, records: &[&str]) -> Result<Dnsmasq> {
        let child = ns
            .command("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--no-poll",
                "--bind-interfaces",
                "--user=root",
                "--pid-file=",
                "--log-facility=-",
            ])
            .arg(format!("--listen-address={}", addr.ip()))
            .arg(format!("--port={}", addr.port()))
            .args(records.iter().map(|r| format!("--{r}")))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting dnsmasq (Debian package dnsmasq-base)")?;
        let server = Dnsmasq { child, addr };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if ns.run(move || probe_once(addr))? {
                return Ok(server);
            }
            if Instant::now() > deadline {
                bail!("dnsmasq did not answer on {addr}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One query for the RFC 5782 test point of the first zone is enough to know it is up.
fn probe_once(addr: SocketAddr) -> bool {
    let Ok(socket) = UdpSocket::bind("127.0.0.1:0") else {
        return false;
    };
    let _ = socket.set_read_timeout(Some(Duration::from_millis(200)));
    // version.bind CH TXT: answered by rbldnsd once it serves.
    let query = dns_query(0x4747, "version.bind", 16, 3);
    if socket.send_to(&query, addr).is_err() {
        return false;
    }
    let mut buf = [0u8; 512];
    socket.recv_from(&mut buf).is_ok()
}

/// A minimal DNS query packet.
pub fn dns_query(id: u16, name: &str, qtype: u16, qclass: u16) -> Vec<u8> {
    let mut packet = Vec::with_capacity(64);
    packet.extend_from_slice(&id.to_be_bytes());
    packet.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        packet.push(label.len() as u8);
        packet.extend_from_slice(label.as_bytes());
    }
    packet.push(0);
    packet.extend_from_slice(&qtype.to_be_bytes());
    packet.extend_from_slice(&qclass.to_be_bytes());
    packet
}

/// The query name of a DNS packet, lower-cased, without the trailing dot.
fn question_name(packet: &[u8]) -> Option<String> {
    let mut labels = Vec::new();
    let mut at = 12;
    loop {
        let len = *packet.get(at)? as usize;
        if len == 0 {
            return Some(labels.join(".").to_ascii_lowercase());
        }
        labels.push(String::from_utf8_lossy(packet.get(at + 1..at + 1 + len)?).into_owned());
        at += 1 + len;
    }
}

/// A UDP relay in front of rbldnsd: queries under `silent` zones are read
/// and never answered (a DNSBL server that is down); the rest are relayed.
pub struct SilentRelay {
    stop: Arc<AtomicBool>,
    pub addr: SocketAddr,
}

impl SilentRelay {
    pub fn start(
        ns: &Netns,
        addr: SocketAddr,
        upstream: Option<SocketAddr>,
        silent: &[&str],
    ) -> Result<SilentRelay> {
        let (front, back) = ns.run(move || -> Result<(UdpSocket, UdpSocket)> {
            let front = UdpSocket::bind(addr)
                .with_context(|| format!("binding the DNS relay on {addr}"))?;
            let back = UdpSocket::bind("127.0.0.1:0")?;
            Ok((front, back))
        })??;
        front.set_read_timeout(Some(Duration::from_millis(100)))?;
        back.set_read_timeout(Some(Duration::from_millis(100)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let silent: Vec<String> = silent.iter().map(|z| z.to_ascii_lowercase()).collect();
        // Query id → client, so answers find their way back.
        let waiting: Arc<Mutex<HashMap<u16, SocketAddr>>> = Arc::default();
        let (front_out, back_in) = (front.try_clone()?, back.try_clone()?);
        let (running, answers_waiting) = (stop.clone(), waiting.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !running.load(Ordering::Relaxed) {
                let Ok((len, client)) = front.recv_from(&mut buf) else {
                    continue;
                };
                let packet = &buf[..len];
                let name = question_name(packet).unwrap_or_default();
                let is_silent = silent
                    .iter()
                    .any(|z| name == *z || name.ends_with(&format!(".{z}")));
                if let (false, Some(upstream), true) = (is_silent, upstream, len >= 2) {
                    waiting
                        .lock()
                        .unwrap()
                        .insert(u16::from_be_bytes([packet[0], packet[1]]), client);
                    let _ = back.send_to(packet, upstream);
                }
            }
        });
        let running = stop.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !running.load(Ordering::Relaxed) {
                let Ok((len, _)) = back_in.recv_from(&mut buf) else {
                    continue;
                };
                let id = u16::from_be_bytes([buf[0], buf[1.min(len.saturating_sub(1))]]);
                if let Some(client) = answers_waiting.lock().unwrap().remove(&id) {
                    let _ = front_out.send_to(&buf[..len], client);
                }
            }
        });
        Ok(SilentRelay { stop, addr })
    }
}

impl Drop for SilentRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
