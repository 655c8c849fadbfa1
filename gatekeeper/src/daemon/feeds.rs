//! The feed scheduler: each feed refreshed at start (in the background)
//! and on its interval, or on demand; a refresh replaces that feed's own
//! entries in one store change, or fails and keeps the last good copy.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use ipnet::IpNet;
use tracing::{info, warn};

use super::lists::{Changed, ListService};
use crate::clock::unix_now;
use crate::control::protocol::{FeedRefreshReport, FeedReport, RefreshResult};
use crate::feeds::config::Source;
use crate::feeds::fetch::{self, Fetched, Validators};
use crate::feeds::state::{FeedState, HeldCopy};
use crate::feeds::FeedConfig;
use crate::lists::listfile::parse_list;
use crate::lists::store::Change;
use crate::lists::ListKind;

/// After a failure the next try comes sooner than a long interval.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(300);

#[derive(Debug, Default)]
struct Status {
    last_success: Option<u64>,
    last_attempt: Option<u64>,
    last_error: Option<String>,
    next_refresh: Option<u64>,
    updated: u64,
    unchanged: u64,
    failures: u64,
}

struct Feed {
    config: FeedConfig,
    /// One refresh of a feed at a time (the schedule and `feeds refresh`).
    busy: tokio::sync::Mutex<()>,
    status: Mutex<Status>,
}

/// A refresh in the feed's terms: its prefixes before and after.
struct Counts {
    /// The store's view (`None`: nothing applied).
    changed: Option<Changed>,
    added: usize,
    removed: usize,
    unchanged: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("no feed named '{0}' is configured")]
pub struct UnknownFeed(pub String);

pub struct FeedService {
    lists: Arc<ListService>,
    /// Built once; an error (e.g. no CA certificates) fails URL feeds only.
    client: Result<reqwest::Client, fetch::FetchError>,
    state: Mutex<FeedState>,
    feeds: Vec<Feed>,
}

impl FeedService {
    pub fn new(
        configs: &[FeedConfig],
        lists: Arc<ListService>,
        state_dir: &std::path::Path,
    ) -> Result<FeedService> {
        Ok(FeedService {
            lists,
            client: fetch::client(),
            state: Mutex::new(FeedState::load(state_dir)),
            feeds: configs
                .iter()
                .map(|config| Feed {
                    config: config.clone(),
                    busy: tokio::sync::Mutex::new(()),
                    status: Mutex::new(Status::default()),
                })
                .collect(),
        })
    }

    /// Removes the entries (and validators) of feeds no longer configured
    /// for a list: a feed dropped from the config, or moved to the other list.
    pub async fn prune(&self) -> Result<()> {
        for kind in [ListKind::Deny, ListKind::Allow] {
            for name in self.lists.feeds(kind) {
                if self.configured(&name, kind) {
                    continue;
                }
                let change = Change::Feed {
                    feed: name.clone(),
                    entries: Vec::new(),
                };
                let changed = self.lists.change(kind, change).await?;
                info!(feed = %name, list = %kind, removed = changed.removed, "feed no longer configured; its entries removed");
            }
        }
        let names: Vec<&str> = self.feeds.iter().map(|f| f.config.name.as_str()).collect();
        lock(&self.state).retain(|name| names.contains(&name))?;
        Ok(())
    }

    fn configured(&self, name: &str, kind: ListKind) -> bool {
        self.feeds
            .iter()
            .any(|f| f.config.name == name && f.config.list == kind)
    }

    /// Refreshes every feed now and then on its interval, until dropped.
    pub async fn run(self: Arc<Self>) {
        let mut tasks = tokio::task::JoinSet::new();
        for index in 0..self.feeds.len() {
            let service = self.clone();
            tasks.spawn(async move { service.schedule(index).await });
        }
        while tasks.join_next().await.is_some() {}
    }

    async fn schedule(&self, index: usize) {
        let feed = &self.feeds[index];
        loop {
            let report = self.refresh_feed(feed).await;
            let wait = match report.result {
                RefreshResult::Failed => feed.config.interval.min(RETRY_AFTER_FAILURE),
                _ => feed.config.interval,
            };
            lock(&feed.status).next_refresh = Some(unix_now().saturating_add(wait.as_secs()));
            tokio::time::sleep(wait).await;
        }
    }

    /// Refreshes `name`, or every feed, now.
    pub async fn refresh(&self, name: Option<&str>) -> Result<Vec<FeedRefreshReport>, UnknownFeed> {
        let chosen: Vec<&Feed> = match name {
            Some(name) => vec![self
                .feeds
                .iter()
                .find(|f| f.config.name == name)
                .ok_or_else(|| UnknownFeed(name.to_owned()))?],
            None => self.feeds.iter().collect(),
        };
        let mut reports = Vec::new();
        for feed in chosen {
            reports.push(self.refresh_feed(feed).await);
        }
        Ok(reports)
    }

    /// Every feed's state and counters (also what the metrics registry reads:
    /// `gatekeeper_feed_refreshes_total{feed,result}`, `gatekeeper_feed_entries{feed}`).
    pub fn list(&self) -> Vec<FeedReport> {
        self.feeds
            .iter()
            .map(|feed| {
                let config = &feed.config;
                let status = lock(&feed.status);
                let (url, path) = match config.source() {
                    Source::Url(url) => (Some(url.to_string()), None),
                    Source::Path(path) => (None, Some(path.display().to_string())),
                };
                FeedReport {
                    name: config.name.clone(),
                    url,
                    path,
                    list: config.list,
                    interval_secs: config.interval.as_secs(),
                    entries: self.lists.feed_len(config.list, &config.name),
                    last_success: status.last_success,
                    last_attempt: status.last_attempt,
                    last_error: status.last_error.clone(),
                    next_refresh: status.next_refresh,
                    updated: status.updated,
                    unchanged: status.unchanged,
                    failures: status.failures,
                }
            })
            .collect()
    }

    async fn refresh_feed(&self, feed: &Feed) -> FeedRefreshReport {
        let _busy = feed.busy.lock().await;
        let config = &feed.config;
        let now = unix_now();
        lock(&feed.status).last_attempt = Some(now);
        let outcome = self.fetch_and_apply(config, now).await;
        let entries = self.lists.feed_len(config.list, &config.name);
        let mut status = lock(&feed.status);
        let report = |result, counts: Option<Counts>, error| {
            let counts = counts.unwrap_or(Counts {
                changed: None,
                added: 0,
                removed: 0,
                unchanged: entries,
            });
            FeedRefreshReport {
                name: config.name.clone(),
                result,
                added: counts.added,
                removed: counts.removed,
                unchanged: counts.unchanged,
                entries,
                error,
            }
        };
        match outcome {
            Ok(counts) => {
                let changed = counts.as_ref().and_then(|c| c.changed);
                let result = match changed {
                    Some(c) if c.added + c.updated + c.removed > 0 => {
                        status.updated += 1;
                        RefreshResult::Updated
                    }
                    _ => {
                        status.unchanged += 1;
                        RefreshResult::Unchanged
                    }
                };
                status.last_success = Some(now);
                status.last_error = None;
                info!(feed = %config.name, result = result.name(), entries, "feed refreshed");
                report(result, counts, None)
            }
            Err(error) => {
                status.failures += 1;
                status.last_error = Some(error.clone());
                warn!(feed = %config.name, source = %config.source(), error = %error, "feed refresh failed; keeping the last good copy");
                report(RefreshResult::Failed, None, Some(error))
            }
        }
    }

    /// `None`: not modified. Errors are one line, for logs and `feeds list`.
    async fn fetch_and_apply(
        &self,
        config: &FeedConfig,
        now: u64,
    ) -> Result<Option<Counts>, String> {
        let source = config.source().to_string();
        let held = self.held_validators(config, &source);
        let fetched = fetch::fetch(
            &self.client,
            config.source(),
            &held,
            config.timeout,
            config.max_bytes,
        )
        .await
        .map_err(|e| e.to_string())?;
        let (text, validators) = match fetched {
            Fetched::NotModified => return Ok(None),
            Fetched::Body { text, validators } => (text, validators),
        };
        let lines = parse_list(&text, config.format).map_err(|e| format!("malformed list: {e}"))?;
        let entries: Vec<(IpNet, Option<String>)> =
            lines.into_iter().map(|l| (l.prefix, l.reason)).collect();
        let before = self.lists.feed_nets(config.list, &config.name);
        let after: HashSet<IpNet> = entries.iter().map(|(net, _)| *net).collect();
        let change = Change::Feed {
            feed: config.name.clone(),
            entries,
        };
        let changed = self
            .lists
            .change(config.list, change)
            .await
            .map_err(|e| e.to_string())?;
        let copy = HeldCopy {
            source,
            list: config.list,
            validators,
            entries: self.lists.feed_len(config.list, &config.name),
            fetched: now,
        };
        if let Err(e) = lock(&self.state).set(&config.name, Some(copy)) {
            warn!(feed = %config.name, error = %e, "cannot save the feed's validators; the next start fetches it afresh");
        }
        let unchanged = after.intersection(&before).count();
        Ok(Some(Counts {
            changed: Some(changed),
            added: after.len() - unchanged,
            removed: before.len() - unchanged,
            unchanged,
        }))
    }

    /// The validators of the copy the store holds, if the state file's
    /// record is for this source and list and agrees with the store.
    fn held_validators(&self, config: &FeedConfig, source: &str) -> Validators {
        let state = lock(&self.state);
        match state.get(&config.name) {
            Some(copy)
                if copy.source == source
                    && copy.list == config.list
                    && copy.entries == self.lists.feed_len(config.list, &config.name) =>
            {
                copy.validators.clone()
            }
            _ => Validators::default(),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
