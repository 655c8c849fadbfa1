//! Reads a config file the way an operator wants it checked: every unknown
//! key and bad value at once, each named by its path (`smtp.listen[1]`),
//! then the checks that look across keys.
//!
//! Deserialization stops at its first error, so the document is read
//! repeatedly: each error's key is reported and taken out, until it reads.

use std::collections::BTreeMap;

use toml::Value;

use super::Config;
use crate::findings::Findings;

/// Enough for any real file; a safety net against a loop that makes no progress.
const MAX_ROUNDS: usize = 200;

/// The config (when it could be read at all) and everything wrong with it.
pub fn check_text(text: &str) -> (Option<Config>, Findings) {
    let mut findings = Findings::default();
    let mut document: Value = match toml::from_str(text) {
        Ok(document) => document,
        Err(e) => {
            findings.error(describe_toml_error(text, &e));
            return (None, findings);
        }
    };
    let mut removed = Removed::default();
    for _ in 0..MAX_ROUNDS {
        let error = match serde_path_to_error::deserialize::<_, Config>(document.clone()) {
            Ok(config) => {
                config.check(&mut findings);
                return (Some(config), findings);
            }
            Err(error) => error,
        };
        let path: Vec<Segment> = error
            .path()
            .iter()
            .filter_map(Segment::from_serde)
            .collect();
        // toml adds "in `key`" on a second line: the path already says it.
        let message = error.inner().to_string();
        let message = message.lines().next().unwrap_or_default().to_owned();
        if let Some(field) = missing_field(&message) {
            let mut key = path.clone();
            key.push(Segment::Key(field.to_owned()));
            if !removed.was_removed(&key) {
                findings.error(format!("{}: required key is missing", removed.name(&key)));
            }
            // Nothing can stand in for a required value: stop reading.
            return (None, findings);
        }
        findings.error(format!("{}: {message}", removed.name(&path)));
        if path.is_empty() || !remove(&mut document, &path) {
            return (None, findings);
        }
        removed.record(path);
    }
    (None, findings)
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Segment {
    Key(String),
    Index(usize),
}

impl Segment {
    fn from_serde(segment: &serde_path_to_error::Segment) -> Option<Segment> {
        match segment {
            serde_path_to_error::Segment::Map { key } => Some(Segment::Key(key.clone())),
            serde_path_to_error::Segment::Seq { index } => Some(Segment::Index(*index)),
            _ => None,
        }
    }
}

/// Keys and list items taken out so far. Removing a list item shifts the
/// ones after it, so later errors' indices are mapped back to the file's.
#[derive(Default)]
struct Removed {
    paths: Vec<Vec<Segment>>,
    /// Per list (its path in the file), the file indices removed from it.
    items: BTreeMap<Vec<Segment>, Vec<usize>>,
}

impl Removed {
    fn record(&mut self, path: Vec<Segment>) {
        let in_file = self.in_file(&path);
        if let Some((Segment::Index(index), list)) = in_file.split_last() {
            let removed = self.items.entry(list.to_vec()).or_default();
            removed.push(*index);
            removed.sort_unstable();
        }
        self.paths.push(in_file);
    }

    fn was_removed(&self, path: &[Segment]) -> bool {
        let in_file = self.in_file(path);
        self.paths.contains(&in_file)
    }

    /// `path` (as the current, shrunk document has it) as the file has it.
    fn in_file(&self, path: &[Segment]) -> Vec<Segment> {
        let mut out: Vec<Segment> = Vec::with_capacity(path.len());
        for segment in path {
            let segment = match segment {
                Segment::Index(index) => {
                    let mut original = *index;
                    for &gone in self.items.get(&out).map(Vec::as_slice).unwrap_or_default() {
                        if gone <= original {
                            original += 1;
                        }
                    }
                    Segment::Index(original)
                }
                key => key.clone(),
            };
            out.push(segment);
        }
        out
    }

    fn name(&self, path: &[Segment]) -> String {
        let mut name = String::new();
        for segment in self.in_file(path) {
            match segment {
                Segment::Key(key) if name.is_empty() => name.push_str(&key),
                Segment::Key(key) => {
                    name.push('.');
                    name.push_str(&key);
                }
                Segment::Index(index) => name.push_str(&format!("[{index}]")),
            }
        }
        if name.is_empty() {
            name.push_str("(top level)");
        }
        name
    }
}

fn missing_field(message: &str) -> Option<&str> {
    message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next())
}

/// Takes the value at `path` out of the document; false when it is not there.
fn remove(document: &mut Value, path: &[Segment]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut node = document;
    for segment in parents {
        node = match (segment, node) {
            (Segment::Key(key), Value::Table(table)) => match table.get_mut(key) {
                Some(child) => child,
                None => return false,
            },
            (Segment::Index(index), Value::Array(items)) => match items.get_mut(*index) {
                Some(child) => child,
                None => return false,
            },
            _ => return false,
        };
    }
    match (last, node) {
        (Segment::Key(key), Value::Table(table)) => table.remove(key).is_some(),
        (Segment::Index(index), Value::Array(items)) if *index < items.len() => {
            items.remove(*index);
            true
        }
        _ => false,
    }
}

/// Flattens toml's multi-line diagnostic into "line N `text`: message".
fn describe_toml_error(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim().replace('\n', " ");
    match error.span() {
        Some(span) => {
            let start = span.start.min(text.len());
            let line_no = text[..start].matches('\n').count() + 1;
            let line = text.lines().nth(line_no - 1).unwrap_or("").trim();
            format!("line {line_no} `{line}`: {message}")
        }
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        check_text(text).1.errors
    }

    #[test]
    fn every_unknown_key_and_bad_value_is_named_at_once() {
        let found = errors(
            r#"
interfaces = ["eth0"]
intrefaces = ["eth1"]
protected_ports = [25, 70000, 587, -1]
xdp_mode = "turbo"
[smtp]
upstream = "127.0.0.1:10025"
listen = ["0.0.0.0:25", "nonsense", "[::]:25", "also bad"]
max_errorz = 3
[dnsbl]
zones = ["bl.example.org"]
treshold = 2
"#,
        );
        for expected in [
            "intrefaces: unknown field",
            "protected_ports[1]: invalid value",
            "protected_ports[3]: invalid value",
            "xdp_mode: unknown variant",
            "smtp.listen[1]: invalid socket address",
            "smtp.listen[3]: invalid socket address",
            "smtp.max_errorz: unknown field",
            "dnsbl.treshold: unknown field",
        ] {
            assert!(
                found.iter().any(|e| e.starts_with(expected)),
                "{expected} not in {found:#?}"
            );
        }
        assert_eq!(found.len(), 8, "{found:#?}");
    }

    #[test]
    fn semantic_errors_follow_once_the_file_reads() {
        let (config, findings) = check_text(
            r#"
interfaces = ["eth0", "eth0"]
protected_ports = [25]
bogus = 1
[smtp]
upstream = "127.0.0.1:10025"
listen = ["0.0.0.0:25", "0.0.0.0:587", "0.0.0.0:25"]
local_domains = ["example.org", "EXAMPLE.org"]
[dnsbl]
zones = ["a.example.org*2", "b.example.org"]
threshold = 4
"#,
        );
        assert!(config.is_some());
        let errors = findings.errors.join("\n");
        for expected in [
            "bogus: unknown field",
            "interfaces[1]: 'eth0' is listed twice",
            "smtp.listen[2]: '0.0.0.0:25' is listed twice",
            "dnsbl.threshold: 4 cannot be reached",
        ] {
            assert!(errors.contains(expected), "{expected} not in {errors}");
        }
        let warnings = findings.warnings.join("\n");
        for expected in [
            "smtp.listen[1]: port 587 is not in protected_ports",
            "smtp.local_domains[1]: 'example.org' is listed twice",
        ] {
            assert!(warnings.contains(expected), "{expected} not in {warnings}");
        }
    }

    #[test]
    fn a_missing_required_key_is_named_with_its_table() {
        assert_eq!(
            errors("[smtp]\nupstream = \"127.0.0.1:1\""),
            ["interfaces: required key is missing"]
        );
        assert_eq!(
            errors("interfaces = []\n[smtp]\nlisten = [\"0.0.0.0:25\"]"),
            ["smtp.upstream: required key is missing"]
        );
        // A bad required value is one error, not two.
        assert_eq!(errors("interfaces = 3").len(), 1);
    }

    #[test]
    fn syntax_errors_give_the_line() {
        let found = errors("interfaces = [\"eth0\"]\nsmtp = [\n");
        assert_eq!(found.len(), 1);
        assert!(found[0].starts_with("line "), "{found:?}");
    }

    #[test]
    fn a_clean_file_has_no_findings() {
        let (config, findings) = check_text("interfaces = [\"eth0\"]\n");
        assert!(config.is_some());
        assert_eq!(findings, Findings::default());
    }
}
