//! DNSBL figures: the engine against rbldnsd (cached and uncached verdicts,
//! next to bare resolver lookups) and SMTP connection set-up latency with
//! DNSBL checks off, on with cold verdicts, and on with cached verdicts.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use sandbox::dnsbl::{Dataset, Rbldnsd};
use sandbox::lab::{Lab, PeerSpec};
use sandbox::smtp::SmtpClient;
use serde_json::Value;

use crate::build;

pub struct DnsblFigures {
    pub concurrency: usize,
    pub uncached: u32,
    pub engine: Value,
    pub clients: usize,
    pub setup_off: Percentiles,
    pub setup_cold: Percentiles,
    pub setup_cached: Percentiles,
}

#[derive(Clone, Copy)]
pub struct Percentiles {
    pub p50: Duration,
    pub p99: Duration,
}

const RBLDNSD: &str = "127.0.0.1:5300";
const ZONE: &str = "bl.bench.test";

pub fn run(quick: bool) -> Result<DnsblFigures> {
    let bench = build::example("dnsbl_bench")?;
    let clients = if quick { 20 } else { 200 };
    let sources: Vec<&'static str> = (0..clients)
        .map(|i| &*Box::leak(format!("198.51.100.{}/24", i + 1).into_boxed_str()))
        .collect();
    let mut lab = Lab::new(
        "benchdnsbl",
        vec![PeerSpec {
            name: "client",
            edge_addrs: vec!["198.51.100.254/24"],
            peer_addrs: sources,
        }],
    )?;
    let _rbldnsd = Rbldnsd::start(
        &lab.edge,
        &lab.dir().join("rbldnsd"),
        RBLDNSD.parse()?,
        // The bench's clients are not listed: a listed verdict costs a TXT lookup too,
        // which the one-query baseline would not.
        &[
            Dataset::listing(ZONE, &["192.0.2.0/24"]),
            Dataset::ipv6(ZONE, &["2001:db8:ff::/64"]),
        ],
    )?;

    let (uncached, cached_iterations, concurrency) = if quick {
        (500, 10_000, 32)
    } else {
        (20_000, 200_000, 64)
    };
    let out = lab
        .edge
        .command(bench.to_str().context("bench path")?)
        .args([
            RBLDNSD,
            ZONE,
            &uncached.to_string(),
            &cached_iterations.to_string(),
            &concurrency.to_string(),
        ])
        .output()?;
    ensure!(
        out.status.success(),
        "dnsbl_bench: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let engine: Value = serde_json::from_slice(&out.stdout).context("dnsbl_bench output")?;

    let smtp = "[smtp]\nlisten = [\"198.51.100.254:25\"]\nhostname = \"mx.example.org\"\n\
                local_domains = [\"example.org\"]\nupstream = \"127.0.0.1:10025\"\nmax_connections_per_ip = 10000\n";
    lab.start_daemon(smtp)?;
    let setup_off = connection_setup(&lab, clients)?;
    lab.take_daemon().stop()?;
    lab.start_daemon(&format!(
        "{smtp}[dnsbl]\nzones = [\"{ZONE}\"]\nnameservers = [\"{RBLDNSD}\"]\n"
    ))?;
    let setup_cold = connection_setup(&lab, clients)?;
    let setup_cached = connection_setup(&lab, clients)?;
    lab.take_daemon().stop()?;
    Ok(DnsblFigures {
        concurrency,
        uncached,
        engine,
        clients,
        setup_off,
        setup_cold,
        setup_cached,
    })
}

/// Connect-to-banner latency, one client address after another.
fn connection_setup(lab: &Lab, clients: usize) -> Result<Percentiles> {
    let mut samples = Vec::with_capacity(clients);
    for i in 0..clients {
        let source = format!("198.51.100.{}", i + 1);
        let started = Instant::now();
        let mut client = SmtpClient::connect(lab.peer("client"), &source, "198.51.100.254:25")?;
        let banner = client.reply()?;
        samples.push(started.elapsed());
        ensure!(banner.code == 220, "{source} got {banner}");
    }
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    Ok(Percentiles {
        p50: at(0.50),
        p99: at(0.99),
    })
}
