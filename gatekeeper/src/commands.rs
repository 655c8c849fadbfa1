//! The operator's verbs: validate locally, send to the daemon, print the reply.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use crate::cli::{
    BansAction, Cli, ClusterAction, Command, ConfigAction, DnsblAction, FeedsAction, ListAction,
    RelayAction,
};
use crate::config::check::check_text;
use crate::config::{Config, DEFAULT_PATH};
use crate::control::client;
use crate::control::protocol::{
    CheckReport, DnsblStats, ErrorKind, FeedReport, PackedEntries, RefreshResult, Reply, Request,
    StatsReport, WireEntry,
};
use crate::lists::listfile::{parse_list, ListFormat};
use crate::lists::prefix::Prefix;
use crate::lists::ListKind;

/// Bad input from the operator: exit status 2, nothing changed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

pub fn dispatch(cli: &Cli) -> Result<()> {
    if let Command::Config {
        action: ConfigAction::Check { file },
    } = &cli.command
    {
        return config_check(file.as_deref().unwrap_or(&cli.config));
    }
    let socket = control_socket(cli)?;
    match &cli.command {
        Command::Run | Command::Probe(_) => unreachable!("handled by main"),
        Command::Deny { action } => list_action(&socket, ListKind::Deny, action),
        Command::Allow { action } => list_action(&socket, ListKind::Allow, action),
        Command::Stats { json } => stats(&socket, *json),
        Command::Check { ip, fresh, json } => check(&socket, ip, *fresh, *json),
        Command::Dnsbl { action } => dnsbl_action(&socket, action),
        Command::Reload => reload(&socket),
        Command::Config { .. } => unreachable!("handled above"),
        Command::Feeds { action } => feeds_action(&socket, action),
        Command::Relay { action } => relay_action(&socket, action),
        Command::Bans { action } => bans_action(&socket, action),
        Command::Cluster {
            action: ClusterAction::Status(args),
        } => cluster_status(&socket, args.json),
    }
}

/// Prints every finding, one per line; only errors make the file invalid.
fn config_check(path: &std::path::Path) -> Result<()> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| UsageError(format!("cannot read {}: {e}", path.display())))?;
    let (_, findings) = check_text(&text);
    for warning in &findings.warnings {
        eprintln!("{}: warning: {warning}", path.display());
    }
    for error in &findings.errors {
        eprintln!("{}: error: {error}", path.display());
    }
    if !findings.is_ok() {
        return Err(UsageError(format!(
            "{}: {} error(s), {} warning(s)",
            path.display(),
            findings.errors.len(),
            findings.warnings.len()
        ))
        .into());
    }
    println!(
        "{}: valid ({} warning(s))",
        path.display(),
        findings.warnings.len()
    );
    Ok(())
}

fn reload(socket: &std::path::Path) -> Result<()> {
    match client::send(socket, &Request::Reload {})? {
        Reply::Reloaded(summary) => {
            for warning in &summary.warnings {
                eprintln!("warning: {warning}");
            }
            if summary.applied.is_empty() {
                println!("reloaded: no changes");
            } else {
                println!("reloaded: {}", summary.applied.join(", "));
            }
            Ok(())
        }
        Reply::Error {
            kind: ErrorKind::InvalidInput,
            message,
        } => Err(UsageError(format!(
            "reload refused, the running config is unchanged:\n{message}"
        ))
        .into()),
        Reply::Error { message, .. } => bail!("reload failed: {message}"),
        _ => bail!("unexpected reply from the daemon"),
    }
}

fn feeds_action(socket: &std::path::Path, action: &FeedsAction) -> Result<()> {
    match action {
        FeedsAction::List(args) => {
            let Reply::FeedsListed { feeds } =
                expect_ok(client::send(socket, &Request::FeedsList {})?)?
            else {
                bail!("unexpected reply from the daemon");
            };
            if args.json {
                println!("{}", serde_json::to_string_pretty(&feeds)?);
            } else {
                feeds.iter().for_each(print_feed);
            }
        }
        FeedsAction::Refresh { name } => {
            let request = Request::FeedsRefresh { name: name.clone() };
            let Reply::FeedsRefreshed { results } = expect_ok(client::send(socket, &request)?)?
            else {
                bail!("unexpected reply from the daemon");
            };
            let mut failed = Vec::new();
            for r in &results {
                match &r.error {
                    Some(error) => {
                        println!("{}: failed: {error} (the last good copy stays)", r.name);
                        failed.push(r.name.as_str());
                    }
                    None => println!(
                        "{}: {}: added {}, removed {}, unchanged {} (now {} entries)",
                        r.name,
                        r.result.name(),
                        r.added,
                        r.removed,
                        r.unchanged,
                        r.entries
                    ),
                }
            }
            if results.iter().any(|r| r.result == RefreshResult::Failed) {
                bail!("refresh failed for {}", failed.join(", "));
            }
        }
    }
    Ok(())
}

fn relay_action(socket: &std::path::Path, action: &RelayAction) -> Result<()> {
    let now = crate::clock::unix_now();
    match action {
        RelayAction::Grant { ip, ttl } => {
            let request = Request::RelayGrant {
                ip: parse_ip(ip)?,
                ttl_secs: Some(*ttl),
            };
            let Reply::RelayGranted(grant) = expect_ok(client::send(socket, &request)?)? else {
                bail!("unexpected reply from the daemon");
            };
            println!(
                "{} may relay for {}s",
                grant.ip,
                grant.expiry.saturating_sub(now)
            );
        }
        RelayAction::Revoke { ip } => {
            let request = Request::RelayRevoke { ip: parse_ip(ip)? };
            let Reply::RelayRevoked { ip } = expect_ok(client::send(socket, &request)?)? else {
                bail!("unexpected reply from the daemon");
            };
            println!("{ip}: relay grant revoked");
        }
        RelayAction::List(args) => {
            let Reply::RelayListed { grants } =
                expect_ok(client::send(socket, &Request::RelayList {})?)?
            else {
                bail!("unexpected reply from the daemon");
            };
            if args.json {
                println!("{}", serde_json::to_string_pretty(&grants)?);
            } else {
                for g in grants {
                    println!("{}	expires in {}s", g.ip, g.expiry.saturating_sub(now));
                }
            }
        }
    }
    Ok(())
}

fn bans_action(socket: &std::path::Path, action: &BansAction) -> Result<()> {
    match action {
        BansAction::List(args) => {
            let Reply::BansListed { bans } =
                expect_ok(client::send(socket, &Request::BansList {})?)?
            else {
                bail!("unexpected reply from the daemon");
            };
            if args.json {
                println!("{}", serde_json::to_string_pretty(&bans)?);
            } else {
                let now = crate::clock::unix_now();
                for b in bans {
                    println!(
                        "{}	{}	{} events	expires in {}s	offence {}",
                        b.client,
                        b.reason.name(),
                        b.events,
                        b.expiry.saturating_sub(now),
                        b.offences
                    );
                }
            }
        }
        BansAction::Clear { ip, .. } => {
            let ip = ip.as_deref().map(parse_ip).transpose()?;
            let Reply::BansCleared { cleared } =
                expect_ok(client::send(socket, &Request::BansClear { ip })?)?
            else {
                bail!("unexpected reply from the daemon");
            };
            println!("cleared {cleared} ban(s)");
        }
    }
    Ok(())
}

fn print_feed(feed: &FeedReport) {
    let now = crate::clock::unix_now();
    let ago = |t: Option<u64>| match t {
        Some(t) => format!("{}s ago", now.saturating_sub(t)),
        None => "never".into(),
    };
    let source = feed.url.as_deref().or(feed.path.as_deref()).unwrap_or("");
    println!("{} ({}list) {source}", feed.name, feed.list);
    println!(
        "  every {}s, {} entries, last success {}, next refresh {}",
        feed.interval_secs,
        feed.entries,
        ago(feed.last_success),
        match feed.next_refresh {
            Some(t) => format!("in {}s", t.saturating_sub(now)),
            None => "pending".into(),
        }
    );
    println!(
        "  refreshes: {} updated, {} unchanged, {} failed",
        feed.updated, feed.unchanged, feed.failures
    );
    if let Some(error) = &feed.last_error {
        println!("  last error: {error}");
    }
}

fn parse_ip(text: &str) -> Result<std::net::IpAddr> {
    text.parse()
        .map_err(|_| UsageError(format!("'{text}' is not an IP address")).into())
}

fn parse_prefix(text: &str) -> Result<Prefix, UsageError> {
    text.parse()
        .map_err(|e: crate::lists::prefix::PrefixError| UsageError(e.to_string()))
}

fn check(socket: &std::path::Path, ip: &str, fresh: bool, json: bool) -> Result<()> {
    let request = Request::Check {
        ip: parse_ip(ip)?,
        fresh,
    };
    let Reply::Checked(report) = expect_ok(client::send(socket, &request)?)? else {
        bail!("unexpected reply from the daemon");
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_check(&report);
    }
    Ok(())
}

fn print_check(report: &CheckReport) {
    let now = crate::clock::unix_now();
    let map = &report.map_state;
    println!("{}", report.ip);
    let dnsbl_entry = match map.dnsbl_until {
        Some(until) => format!("live for {}s more", until.saturating_sub(now)),
        None => "none".into(),
    };
    println!(
        "  kernel    {} (allowlisted: {}, denylisted: {}, DNSBL entry: {dnsbl_entry})",
        map.xdp_verdict,
        yes_no(map.allowlisted),
        yes_no(map.denylisted)
    );
    if report.verdict == "not_configured" {
        println!("  dnsbl     not configured");
        return;
    }
    let mut verdict = format!(
        "{} (score {} / threshold {})",
        report.verdict,
        report.score.unwrap_or(0),
        report.threshold.unwrap_or(0)
    );
    if let Some(zone) = &report.blocked_by {
        verdict.push_str(&format!(", blocked using {zone}"));
    }
    if !report.screened {
        verdict.push_str("; not screened at connection time (allowlisted or relay network)");
    }
    println!("  verdict   {verdict}");
    println!(
        "  cache     {}, {}s left",
        if report.cached { "hit" } else { "fresh lookup" },
        report.ttl_secs.unwrap_or(0)
    );
    for zone in &report.zones {
        let answer = serde_json::to_value(zone.answer.answer).unwrap_or_default();
        let codes: Vec<String> = zone.answer.codes.iter().map(|c| c.to_string()).collect();
        let mut line = format!(
            "  zone      {} *{} {} [{}] health {}",
            zone.answer.zone,
            zone.answer.weight,
            answer.as_str().unwrap_or("?"),
            codes.join(","),
            zone.health.name()
        );
        if let Some(detail) = &zone.answer.detail {
            line.push_str(&format!(" ({detail})"));
        }
        if let Some(txt) = &zone.answer.txt {
            line.push_str(&format!(" \"{txt}\""));
        }
        println!("{line}");
    }
}

fn yes_no(value: bool) -> &'static str {
    if value {
        "yes"
    } else {
        "no"
    }
}

fn dnsbl_action(socket: &std::path::Path, action: &DnsblAction) -> Result<()> {
    match action {
        DnsblAction::List(args) => {
            let Reply::DnsblListed { entries } =
                expect_ok(client::send(socket, &Request::DnsblList {})?)?
            else {
                bail!("unexpected reply from the daemon");
            };
            if args.json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else {
                for e in entries {
                    let zone = e.blocked_by.as_deref().unwrap_or("");
                    println!("{}\texpires in {}s\t{zone}", e.ip, e.remaining_secs);
                }
            }
        }
        DnsblAction::Flush { ip } => {
            let ip = ip.as_deref().map(parse_ip).transpose()?;
            let request = Request::DnsblFlush { ip };
            let Reply::DnsblFlushed(summary) = expect_ok(client::send(socket, &request)?)? else {
                bail!("unexpected reply from the daemon");
            };
            println!(
                "flushed {} kernel entries and {} cached verdicts",
                summary.kernel_entries_removed, summary.cached_verdicts_removed
            );
        }
    }
    Ok(())
}

/// `--control` wins; else the config's socket; a missing default config means the default socket.
fn control_socket(cli: &Cli) -> Result<PathBuf> {
    if let Some(path) = &cli.control {
        return Ok(path.clone());
    }
    if cli.config.as_os_str() == DEFAULT_PATH && !cli.config.exists() {
        return Ok(PathBuf::from("/run/gatekeeper/control.sock"));
    }
    Ok(Config::load(&cli.config)?.control_socket)
}

fn list_action(socket: &std::path::Path, list: ListKind, action: &ListAction) -> Result<()> {
    match action {
        ListAction::Add {
            prefixes,
            reason,
            ttl,
            share,
        } => {
            let entries = prefixes
                .iter()
                .map(|p| {
                    parse_prefix(p).map(|prefix| WireEntry {
                        prefix,
                        reason: reason.clone(),
                        ttl_secs: *ttl,
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let reply = expect_ok(client::send(
                socket,
                &Request::ListAdd {
                    list,
                    entries,
                    share: *share,
                },
            )?)?;
            print_change(&reply);
        }
        ListAction::Del { prefixes, share } => {
            let prefixes = prefixes
                .iter()
                .map(|p| parse_prefix(p))
                .collect::<Result<Vec<_>, _>>()?;
            let request = Request::ListDel {
                list,
                prefixes,
                share: *share,
            };
            print_change(&expect_ok(client::send(socket, &request)?)?);
        }
        ListAction::List(args) => {
            let Reply::Listed { entries } =
                expect_ok(client::send(socket, &Request::ListShow { list })?)?
            else {
                bail!("unexpected reply from the daemon");
            };
            if args.json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else {
                let now = crate::clock::unix_now();
                for e in entries {
                    let mut line = e.prefix;
                    line.push('\t');
                    if e.ban {
                        line.push_str("[ban] ");
                    }
                    line.push_str(e.reason.as_deref().unwrap_or(""));
                    if let Some(expires) = e.expires {
                        line.push_str(&format!("\texpires in {}s", expires.saturating_sub(now)));
                    }
                    println!("{}", line.trim_end());
                }
            }
        }
        ListAction::Import { file, replace } => {
            let text = read_list_file(file)?;
            let lines = parse_list(&text, ListFormat::Auto)
                .map_err(|e| UsageError(format!("{}: {e}; nothing imported", file.display())))?;
            let entries = lines
                .into_iter()
                .map(|l| {
                    Prefix::try_from(l.prefix)
                        .map(|prefix| (prefix, l.reason))
                        .map_err(|e| {
                            UsageError(format!("{}: {e}; nothing imported", file.display()))
                        })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let request = Request::ListImport {
                list,
                entries: PackedEntries(entries),
                replace: *replace,
            };
            let reply = expect_ok(client::send(socket, &request)?)?;
            if let Reply::Changed(s) = &reply {
                println!(
                    "imported {}: added {}, updated {}, removed {} ({}list now holds {})",
                    file.display(),
                    s.added,
                    s.updated,
                    s.removed,
                    list,
                    s.total
                );
            }
        }
    }
    Ok(())
}

fn read_list_file(file: &std::path::Path) -> Result<String> {
    if file.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading the list from stdin")?;
        return Ok(text);
    }
    std::fs::read_to_string(file)
        .map_err(|e| UsageError(format!("cannot read {}: {e}", file.display())).into())
}

fn stats(socket: &std::path::Path, json: bool) -> Result<()> {
    let Reply::Stats(report) = expect_ok(client::send(socket, &Request::Stats {})?)? else {
        bail!("unexpected reply from the daemon");
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_stats(&report);
    }
    Ok(())
}

fn print_stats(report: &StatsReport) {
    // Wide enough for the longest counter name, `dropped_unwalkable`.
    for counter in gatekeeper_common::Counter::ALL {
        let value = report.counters.get(counter.name()).copied().unwrap_or(0);
        println!("{:<20}{value}", counter.name());
    }
    println!("{:<20}{}", "deny_entries", report.deny_entries);
    println!("{:<20}{}", "allow_entries", report.allow_entries);
    let interfaces: Vec<String> = report
        .interfaces
        .iter()
        .map(|i| {
            format!(
                "{} ({})",
                i.name,
                serde_json::to_value(i.mode)
                    .map(|v| v.as_str().unwrap_or("?").to_string())
                    .unwrap_or_default()
            )
        })
        .collect();
    println!("{:<20}{}", "interfaces", interfaces.join(", "));
    println!("{:<20}{}s", "uptime", report.uptime_secs);
    if let Some(smtp) = &report.smtp {
        let value = serde_json::to_value(smtp).unwrap_or_default();
        for (name, value) in value.as_object().into_iter().flatten() {
            match value.as_object() {
                Some(by_reason) => {
                    for (reason, count) in by_reason {
                        println!("smtp.{name}.{reason:<20}{count}");
                    }
                }
                None => println!("smtp.{name:<32}{value}"),
            }
        }
    }
    println!("{:<32}{}", "relay_grants", report.relay_grants);
    if let Some(bans) = &report.bans {
        println!("{:<32}{}", "bans.active", bans.active);
        println!("{:<32}{}", "bans.issued", bans.issued);
        for (kind, count) in &bans.events {
            println!("bans.events.{kind:<20}{count}");
        }
    }
    if let Some(greylist) = &report.greylist {
        println!("{:<32}{}", "greylist.triplets", greylist.triplets);
        println!("{:<32}{}", "greylist.passed", greylist.passed);
    }
    if let Some(dnsbl) = &report.dnsbl {
        print_dnsbl_stats(dnsbl);
    }
}

fn print_dnsbl_stats(dnsbl: &DnsblStats) {
    let engine = &dnsbl.engine;
    println!("{:<32}{}", "dnsbl.checks", engine.checks);
    println!(
        "{:<32}{:.3}",
        "dnsbl.cache_hit_ratio", engine.cache_hit_ratio
    );
    println!("{:<32}{}", "dnsbl.cache_entries", engine.cache_entries);
    println!("{:<32}{}", "dnsbl.coalesced", engine.coalesced);
    println!("{:<32}{}", "dnsbl.overloaded", engine.overloaded);
    println!("{:<32}{}", "dnsbl.blocked", dnsbl.blocked);
    println!("{:<32}{}", "dnsbl.kernel_entries", dnsbl.kernel_entries);
    for zone in &engine.zones {
        println!(
            "dnsbl.zone {} *{}: health {}, queries {}, hits {}, errors {} (codes {}, timeouts {}, failures {})",
            zone.zone,
            zone.weight,
            zone.health.name(),
            zone.queries,
            zone.hits,
            zone.errors,
            zone.error_codes,
            zone.timeouts,
            zone.failures
        );
    }
}

fn print_change(reply: &Reply) {
    if let Reply::Changed(s) = reply {
        let list = s.list.map(ListKind::name).unwrap_or("list");
        println!(
            "{list}: added {}, updated {}, removed {} (now {} entries)",
            s.added, s.updated, s.removed, s.total
        );
    }
}

/// Daemon-side refusals keep their meaning: invalid input exits 2, failures 1.
fn expect_ok(reply: Reply) -> Result<Reply> {
    match reply {
        Reply::Error {
            kind: ErrorKind::InvalidInput,
            message,
        } => Err(UsageError(format!("{message}; nothing changed")).into()),
        Reply::Error {
            kind: ErrorKind::Failed,
            message,
        } => bail!("{message}; nothing changed"),
        ok => Ok(ok),
    }
}

fn cluster_status(socket: &std::path::Path, json: bool) -> Result<()> {
    let Reply::ClusterStatus(report) =
        expect_ok(client::send(socket, &Request::ClusterStatus {})?)?
    else {
        bail!("unexpected reply from the daemon");
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("node: {}", report.node);
    println!("redis: {}", report.redis);
    println!(
        "connected: {}{}",
        if report.connected { "yes" } else { "no" },
        report
            .last_error
            .as_deref()
            .map(|e| format!(" (last error: {e})"))
            .unwrap_or_default()
    );
    println!(
        "last stream id: {}",
        report.last_stream_id.as_deref().unwrap_or("-")
    );
    println!("lag: {:.3} s", report.lag_seconds);
    println!(
        "applied: {}, published: {}, pending: {}, reconnects: {}",
        report.applied, report.published, report.pending, report.reconnects
    );
    let skipped: Vec<String> = report
        .skipped
        .iter()
        .filter(|(_, &n)| n > 0)
        .map(|(reason, n)| format!("{reason}={n}"))
        .collect();
    println!(
        "skipped: {}",
        if skipped.is_empty() {
            "0".to_owned()
        } else {
            skipped.join(", ")
        }
    );
    let peers: Vec<&str> = report.peers.iter().map(|p| p.node.as_str()).collect();
    println!("peers: {}", peers.join(", "));
    Ok(())
}
