//! DNSBL engine figures for `cargo xtask bench` (not a test): run inside a
//! namespace whose loopback has rbldnsd serving `ZONE`, prints one JSON object.
//!
//! Usage: dnsbl_bench NAMESERVER ZONE UNCACHED CACHED_ITERATIONS CONCURRENCY

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use gatekeeper::dnsbl::answer::query_name;
use gatekeeper::dnsbl::{DnsblConfig, DnsblEngine};
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RecordType;
use hickory_resolver::Resolver;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(
        args.len() == 5,
        "usage: dnsbl_bench NAMESERVER ZONE UNCACHED CACHED_ITERATIONS CONCURRENCY"
    );
    let nameserver: SocketAddr = args[0].parse().context("NAMESERVER")?;
    let zone = args[1].clone();
    let uncached: u32 = args[2].parse().context("UNCACHED")?;
    let cached_iterations: u32 = args[3].parse().context("CACHED_ITERATIONS")?;
    let concurrency: usize = args[4].parse().context("CONCURRENCY")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(measure(
        nameserver,
        zone,
        uncached,
        cached_iterations,
        concurrency,
    ))
}

/// Distinct documentation addresses, so every verdict is a cache miss.
fn client(round: u32, i: u32) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(
        0x2001,
        0xdb8,
        round as u16,
        0,
        0,
        0,
        (i >> 16) as u16,
        i as u16,
    ))
}

async fn measure(
    nameserver: SocketAddr,
    zone: String,
    uncached: u32,
    cached_iterations: u32,
    concurrency: usize,
) -> Result<()> {
    let config: DnsblConfig = toml::from_str(&format!(
        "zones = [\"{zone}\"]\nnameservers = [\"{nameserver}\"]\nmax_inflight = {concurrency}\ncache_size = {}\ntimeout = \"5s\"",
        uncached * 4 + 16
    ))?;
    config.validate().map_err(anyhow::Error::msg)?;
    let engine = DnsblEngine::new(config)?;

    // Baseline: the same A queries through a bare hickory resolver, same concurrency.
    let mut server = NameServerConfig::udp(nameserver.ip());
    for connection in &mut server.connections {
        connection.port = nameserver.port();
    }
    let mut builder = Resolver::builder_with_config(
        ResolverConfig::from_name_servers(vec![server]),
        TokioRuntimeProvider::default(),
    );
    builder.options_mut().cache_size = 0;
    let resolver = Arc::new(builder.build()?);
    let slots = Arc::new(Semaphore::new(concurrency));

    let started = Instant::now();
    let mut raw = JoinSet::new();
    for i in 0..uncached {
        let (resolver, slots) = (resolver.clone(), slots.clone());
        let name = query_name(client(1, i), &zone);
        raw.spawn(async move {
            let _slot = slots.acquire().await;
            let _ = resolver.lookup(name.as_str(), RecordType::A).await;
        });
    }
    while raw.join_next().await.is_some() {}
    let raw_per_sec = f64::from(uncached) / started.elapsed().as_secs_f64();

    let started = Instant::now();
    let mut checks = JoinSet::new();
    for i in 0..uncached {
        let engine = engine.clone();
        checks.spawn(async move { engine.check(client(2, i), false).await.cached });
    }
    while let Some(cached) = checks.join_next().await {
        anyhow::ensure!(!cached?, "an uncached check hit the cache");
    }
    let verdicts_per_sec = f64::from(uncached) / started.elapsed().as_secs_f64();

    // Sequential latency: one fresh verdict at a time, then the same address from the cache.
    let sequential = (uncached / 10).max(10);
    let started = Instant::now();
    for i in 0..sequential {
        engine.check(client(3, i), false).await;
    }
    let uncached_latency_ns = started.elapsed().as_nanos() as f64 / f64::from(sequential);
    let warm = client(3, 0);
    let started = Instant::now();
    for _ in 0..cached_iterations {
        let checked = engine.check(warm, false).await;
        anyhow::ensure!(checked.cached, "a repeated check missed the cache");
    }
    let cached_latency_ns = started.elapsed().as_nanos() as f64 / f64::from(cached_iterations);

    let report = engine.report();
    println!(
        "{}",
        serde_json::json!({
            "raw_lookups_per_sec": raw_per_sec,
            "verdicts_per_sec": verdicts_per_sec,
            "uncached_latency_ns": uncached_latency_ns,
            "cached_latency_ns": cached_latency_ns,
            "timeouts": report.zones[0].timeouts,
            "failures": report.zones[0].failures,
        })
    );
    Ok(())
}
