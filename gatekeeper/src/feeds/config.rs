//! `[[feeds]]` entries and their validation.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use crate::lists::listfile::ListFormat;
use crate::lists::ListKind;

/// The shortest refresh interval: feed publishers ask for no more (Spamhaus: hourly).
pub const MIN_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedConfig {
    /// Unique; names the feed's entries in the store, so renaming a feed replaces them.
    pub name: String,
    /// An http or https URL; exactly one of `url` and `path`.
    #[serde(default)]
    pub url: Option<Url>,
    /// A local file (absolute), re-read on each refresh.
    #[serde(default)]
    pub path: Option<PathBuf>,
    pub list: ListKind,
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    #[serde(default)]
    pub format: ListFormat,
    /// Whole-request limit for a download.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Largest body accepted; a bigger one is a failed refresh.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
}

fn default_interval() -> Duration {
    Duration::from_secs(3600)
}
fn default_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_max_bytes() -> u64 {
    32 << 20
}

/// Where a feed comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source<'a> {
    Url(&'a Url),
    Path(&'a std::path::Path),
}

impl std::fmt::Display for Source<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Url(url) => write!(f, "{url}"),
            Source::Path(path) => write!(f, "{}", path.display()),
        }
    }
}

impl FeedConfig {
    /// Valid after [`validate`]: exactly one of `url` and `path` is set.
    pub fn source(&self) -> Source<'_> {
        match (&self.url, &self.path) {
            (Some(url), _) => Source::Url(url),
            (None, Some(path)) => Source::Path(path),
            (None, None) => unreachable!("validated: a feed has a url or a path"),
        }
    }
}

/// Checks every feed; the error names the key and the feed (`feeds[2].url: ...`).
pub fn validate(feeds: &[FeedConfig]) -> Result<(), String> {
    for (i, feed) in feeds.iter().enumerate() {
        let key = |field: &str| format!("feeds[{i}].{field}");
        let name = &feed.name;
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !name_ok {
            return Err(format!(
                "{}: '{name}' must be 1-64 characters of A-Z a-z 0-9 _ . -",
                key("name")
            ));
        }
        if let Some(first) = feeds[..i].iter().position(|f| f.name == *name) {
            return Err(format!(
                "{}: '{name}' is already the name of feeds[{first}]",
                key("name")
            ));
        }
        match (&feed.url, &feed.path) {
            (Some(_), Some(_)) => {
                return Err(format!("feeds[{i}] ({name}): set url or path, not both"))
            }
            (None, None) => return Err(format!("feeds[{i}] ({name}): set url or path")),
            (Some(url), None) => {
                if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
                    return Err(format!(
                        "{} ({name}): '{url}' is not an http or https URL",
                        key("url")
                    ));
                }
            }
            (None, Some(path)) => {
                if !path.is_absolute() {
                    return Err(format!(
                        "{} ({name}): '{}' must be an absolute path",
                        key("path"),
                        path.display()
                    ));
                }
            }
        }
        if feed.interval < MIN_INTERVAL {
            return Err(format!(
                "{} ({name}): must be at least {}",
                key("interval"),
                humantime::format_duration(MIN_INTERVAL)
            ));
        }
        if feed.timeout < Duration::from_secs(1) {
            return Err(format!("{} ({name}): must be at least 1s", key("timeout")));
        }
        if feed.max_bytes == 0 {
            return Err(format!("{} ({name}): must be at least 1", key("max_bytes")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Wrapper {
        feeds: Vec<FeedConfig>,
    }

    fn parse(text: &str) -> Result<Vec<FeedConfig>, String> {
        let feeds = toml::from_str::<Wrapper>(text)
            .map_err(|e| e.to_string())?
            .feeds;
        validate(&feeds)?;
        Ok(feeds)
    }

    #[test]
    fn defaults_and_both_sources() {
        let feeds = parse(
            r#"
[[feeds]]
name = "drop"
url = "https://www.spamhaus.org/drop/drop_v4.json"
list = "deny"

[[feeds]]
name = "partners"
path = "/etc/gatekeeper/partners.txt"
list = "allow"
interval = "10m"
format = "text"
"#,
        )
        .unwrap();
        assert_eq!(feeds[0].interval, Duration::from_secs(3600));
        assert_eq!(feeds[0].format, ListFormat::Auto);
        assert!(matches!(feeds[0].source(), Source::Url(_)));
        assert_eq!(feeds[1].list, ListKind::Allow);
        assert_eq!(feeds[1].interval, Duration::from_secs(600));
        assert!(matches!(feeds[1].source(), Source::Path(_)));
    }

    #[test]
    fn errors_name_the_feed_and_key() {
        let ok = "name = \"a\"\nurl = \"http://192.0.2.1/x\"\nlist = \"deny\"\n";
        let cases = [
            (format!("{ok}[[feeds]]\n{ok}"), "feeds[1].name"),
            (
                "name = \"a b\"\npath = \"/x\"\nlist = \"deny\"".into(),
                "feeds[0].name",
            ),
            (
                "name = \"a\"\nurl = \"ftp://192.0.2.1/x\"\nlist = \"deny\"".into(),
                "feeds[0].url",
            ),
            (
                "name = \"a\"\npath = \"rel.txt\"\nlist = \"deny\"".into(),
                "feeds[0].path",
            ),
            (
                "name = \"a\"\nlist = \"deny\"".into(),
                "feeds[0] (a): set url or path",
            ),
            (
                "name = \"a\"\npath = \"/x\"\nurl = \"http://192.0.2.1/\"\nlist = \"deny\"".into(),
                "not both",
            ),
            (format!("{ok}interval = \"30s\""), "feeds[0].interval"),
            (format!("{ok}max_bytes = 0"), "feeds[0].max_bytes"),
            (format!("{ok}timeout = \"0s\""), "feeds[0].timeout"),
            (format!("{ok}lists = \"deny\""), "lists"),
            (
                "name = \"a\"\npath = \"/x\"\nlist = \"grey\"".into(),
                "grey",
            ),
        ];
        for (body, expected) in cases {
            let text = format!("[[feeds]]\n{body}\n");
            let err = parse(&text).unwrap_err();
            assert!(err.contains(expected), "{text:?} gave {err:?}");
        }
    }
}
