//! Checks the files the Debian package ships against the code they describe:
//! the default conffile must load, and gatekeeper.toml(5) must document
//! exactly the keys the config accepts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_aux::serde_introspection::serde_introspect;

use crate::config::{Config, MapCapacities};
use crate::dnsbl::DnsblConfig;
use crate::smtp::SmtpConfig;

fn packaging(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging")
        .join(file)
}

#[test]
fn shipped_conffile_loads_with_the_documented_defaults() {
    let config = Config::load(&packaging("gatekeeper.toml")).unwrap();
    assert_eq!(config.interfaces, ["eth0"]);
    assert_eq!(config.protected_ports, [25]);
    assert_eq!(config.state_dir, Path::new("/var/lib/gatekeeper"));
    assert_eq!(
        config.control_socket,
        Path::new("/run/gatekeeper/control.sock")
    );
    assert!(config.smtp.is_none() && config.dnsbl.is_none());
}

/// The unit's StateDirectory/RuntimeDirectory are where the config's defaults point.
#[test]
fn unit_directories_match_the_config_defaults() {
    let unit = std::fs::read_to_string(packaging("gatekeeper.service")).unwrap();
    let config = Config::parse("interfaces = []").unwrap();
    let dir_of = |key: &str| {
        let name = unit
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("unit has no {key}"));
        name.trim().to_owned()
    };
    assert_eq!(
        Path::new("/var/lib").join(dir_of("StateDirectory")),
        config.state_dir
    );
    assert_eq!(
        Path::new("/run").join(dir_of("RuntimeDirectory")),
        config.control_socket.parent().unwrap()
    );
}

/// Keys documented per table: `.TP` then `.B key` under `.SH TOP-LEVEL KEYS`
/// or `.SH TABLE [name]`.
fn documented_keys(page: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut tables: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut table: Option<String> = None;
    let mut after_tp = false;
    for line in page.lines() {
        if let Some(heading) = line.strip_prefix(".SH ") {
            table = if heading == "TOP-LEVEL KEYS" {
                Some(String::new())
            } else {
                heading
                    .strip_prefix("TABLE [")
                    .and_then(|rest| rest.strip_suffix(']'))
                    .map(str::to_owned)
            };
        } else if let (true, Some(table), Some(key)) = (after_tp, &table, line.strip_prefix(".B "))
        {
            tables.entry(table.clone()).or_default().insert(key.into());
        }
        after_tp = line == ".TP";
    }
    tables
}

#[test]
fn man_page_documents_every_config_key() {
    let page = std::fs::read_to_string(packaging("gatekeeper.toml.5")).unwrap();
    let documented = documented_keys(&page);
    let accepted: BTreeMap<String, BTreeSet<String>> = [
        ("", serde_introspect::<Config>()),
        ("maps", serde_introspect::<MapCapacities>()),
        ("smtp", serde_introspect::<SmtpConfig>()),
        ("dnsbl", serde_introspect::<DnsblConfig>()),
        (
            "metrics",
            serde_introspect::<crate::metrics::MetricsConfig>(),
        ),
        ("[feeds]", serde_introspect::<crate::feeds::FeedConfig>()),
        (
            "bans",
            serde_introspect::<crate::ledger::bans::BansConfig>(),
        ),
        (
            "bans.weights",
            serde_introspect::<crate::ledger::bans::Weights>(),
        ),
        (
            "greylist",
            serde_introspect::<crate::ledger::greylist::GreylistConfig>(),
        ),
        (
            "cluster",
            serde_introspect::<crate::cluster::ClusterConfig>(),
        ),
    ]
    .into_iter()
    .map(|(table, keys)| {
        let keys = keys.iter().map(|k| k.to_string()).collect();
        (table.to_owned(), keys)
    })
    .collect();
    assert_eq!(
        documented, accepted,
        "gatekeeper.toml(5) and the config structs disagree (left: documented, right: accepted)"
    );
}

#[test]
fn man_page_parser_sees_a_missing_key() {
    let page = std::fs::read_to_string(packaging("gatekeeper.toml.5")).unwrap();
    let without = page.replace(".TP\n.B upstream_wait\n", "");
    assert!(documented_keys(&page)["smtp"].contains("upstream_wait"));
    assert!(!documented_keys(&without)["smtp"].contains("upstream_wait"));
}
