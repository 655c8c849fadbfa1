//! Parsing of importable list files (imports and feeds): pure functions, no I/O.
//!
//! Accepts the Spamhaus DROP/EDROP text format (`192.0.2.0/24 ; SBL123`, with
//! `;` comment lines), plain one-prefix-per-line lists with `#` comments, and
//! the Spamhaus DROP JSON format (`drop_v4.json`, `drop_v6.json`: one object
//! per line, `{"cidr":"192.0.2.0/24","sblid":"SBL1","rir":"arin"}`, ending in
//! a `{"type":"metadata",...,"records":N}` line whose count is checked).

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::prefix::{parse_prefix, PrefixError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListLine {
    pub prefix: IpNet,
    /// Text after `;` (the SBL reference in DROP files), if any.
    pub reason: Option<String>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {problem}")]
pub struct ListFileError {
    pub line: usize,
    pub problem: String,
}

/// How a list file is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListFormat {
    /// JSON when the first non-blank line starts with `{`, else text.
    #[default]
    Auto,
    /// DROP text or plain one-prefix-per-line.
    Text,
    /// DROP JSON, one object per line.
    Json,
}

/// Parses a whole file in `format`; the first bad line rejects it, so an
/// import is all-or-nothing.
pub fn parse_list(text: &str, format: ListFormat) -> Result<Vec<ListLine>, ListFileError> {
    let json = match format {
        ListFormat::Auto => text
            .lines()
            .map(str::trim_start)
            .find(|l| !l.is_empty())
            .is_some_and(|l| l.starts_with('{')),
        ListFormat::Text => false,
        ListFormat::Json => true,
    };
    if json {
        parse_drop_json(text)
    } else {
        parse_list_file(text)
    }
}

/// One line of a DROP JSON file; fields Spamhaus may add are ignored.
#[derive(Deserialize)]
struct JsonLine {
    #[serde(rename = "type")]
    kind: Option<String>,
    cidr: Option<String>,
    sblid: Option<String>,
    records: Option<u64>,
}

/// The DROP JSON format: every line an object, a prefix (`cidr`) or the
/// metadata line; when the metadata gives a record count, it must match,
/// so a download cut at a line boundary is refused too.
pub fn parse_drop_json(text: &str) -> Result<Vec<ListLine>, ListFileError> {
    let mut entries = Vec::new();
    let mut declared: Option<(usize, u64)> = None;
    for (index, raw) in text.lines().enumerate() {
        let fail = |problem: String| ListFileError {
            line: index + 1,
            problem,
        };
        let raw = raw.trim();
        if raw.is_empty() {
            continue;
        }
        if declared.is_some() {
            return Err(fail("data after the metadata line".into()));
        }
        let line: JsonLine =
            serde_json::from_str(raw).map_err(|e| fail(format!("not a DROP JSON object: {e}")))?;
        match (line.kind.as_deref(), line.cidr) {
            (Some("metadata"), None) => declared = line.records.map(|n| (index + 1, n)),
            (Some(other), _) if other != "metadata" => {
                return Err(fail(format!("unknown line type '{other}'")))
            }
            (None, Some(cidr)) => {
                let prefix = parse_prefix(&cidr).map_err(|e| fail(e.to_string()))?;
                let reason = line.sblid.filter(|r| !r.is_empty());
                entries.push(ListLine { prefix, reason });
            }
            _ => return Err(fail("expected a \"cidr\" or a metadata line".into())),
        }
    }
    if let Some((line, records)) = declared {
        if records != entries.len() as u64 {
            return Err(ListFileError {
                line,
                problem: format!(
                    "metadata declares {records} records, the file holds {} (truncated download?)",
                    entries.len()
                ),
            });
        }
    }
    Ok(entries)
}

/// The text formats (DROP text and plain); the first bad line rejects the file.
pub fn parse_list_file(text: &str) -> Result<Vec<ListLine>, ListFileError> {
    let mut entries = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let fail = |problem: String| ListFileError {
            line: index + 1,
            problem,
        };
        let without_comment = raw.split('#').next().unwrap_or("");
        let (body, reason) = match without_comment.split_once(';') {
            Some((body, reason)) => (body, Some(reason.trim())),
            None => (without_comment, None),
        };
        let mut words = body.split_whitespace();
        let Some(first) = words.next() else {
            continue; // blank, `#` or `;` comment line
        };
        if let Some(extra) = words.next() {
            return Err(fail(format!(
                "unexpected '{extra}' after prefix '{first}' (reasons go after ';')"
            )));
        }
        let prefix = parse_prefix(first).map_err(|e: PrefixError| fail(e.to_string()))?;
        let reason = reason.filter(|r| !r.is_empty()).map(str::to_owned);
        entries.push(ListLine { prefix, reason });
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_spamhaus_drop_format() {
        let text = "; Spamhaus DROP List 2026/11/27 - (c) 2026 The Spamhaus Project\n\
                    ; Last-Modified: Fri, 27 Nov 2026 12:00:00 GMT\n\
                    192.0.2.0/24 ; SBL123\n\
                    198.51.100.0/25 ; SBL456\n";
        let lines = parse_list_file(text).unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].prefix.to_string(), "192.0.2.0/24");
        assert_eq!(lines[0].reason.as_deref(), Some("SBL123"));
    }

    #[test]
    fn parses_plain_lists_with_comments() {
        let text = "# attackers\n\n203.0.113.9\n  2001:db8::/48   # lab\r\n198.51.100.0/24\n";
        let lines = parse_list_file(text).unwrap();
        let prefixes: Vec<String> = lines.iter().map(|l| l.prefix.to_string()).collect();
        assert_eq!(
            prefixes,
            ["203.0.113.9/32", "2001:db8::/48", "198.51.100.0/24"]
        );
        assert!(lines.iter().all(|l| l.reason.is_none()));
    }

    #[test]
    fn first_bad_line_rejects_the_file() {
        let err = parse_list_file("192.0.2.0/24\n\n198.51.100.7/24\nfoo\n").unwrap_err();
        assert_eq!(err.line, 3);
        assert!(err.problem.contains("198.51.100.0/24"), "{err}");
        let err = parse_list_file("192.0.2.1 junk\n").unwrap_err();
        assert_eq!(err.line, 1);
    }

    const DROP_JSON: &str = r#"{"cidr":"192.0.2.0/24","sblid":"SBL256894","rir":"apnic"}
{"cidr":"198.51.100.0/22","sblid":"SBL1","rir":"arin"}
{"type":"metadata","timestamp":1764590000,"size":120,"records":2,"copyright":"(c) 2026 The Spamhaus Project SLU","terms":"https://www.spamhaus.org/drop/terms/"}
"#;

    #[test]
    fn parses_drop_json_and_detects_it() {
        for format in [ListFormat::Auto, ListFormat::Json] {
            let lines = parse_list(DROP_JSON, format).unwrap();
            assert_eq!(lines.len(), 2);
            assert_eq!(lines[0].prefix.to_string(), "192.0.2.0/24");
            assert_eq!(lines[0].reason.as_deref(), Some("SBL256894"));
            assert_eq!(lines[1].prefix.to_string(), "198.51.100.0/22");
        }
        let v6 = "{\"cidr\":\"2001:db8::/32\",\"sblid\":\"SBL9\",\"rir\":\"ripencc\"}\n";
        assert_eq!(parse_list(v6, ListFormat::Auto).unwrap().len(), 1);
        // Text stays text under auto-detection.
        let text = parse_list("; DROP\n192.0.2.0/24 ; SBL1\n", ListFormat::Auto).unwrap();
        assert_eq!(text[0].reason.as_deref(), Some("SBL1"));
        assert!(parse_list(DROP_JSON, ListFormat::Text).is_err());
    }

    #[test]
    fn malformed_drop_json_is_refused_with_its_line() {
        let cases = [
            // A download cut mid-line.
            (
                "{\"cidr\":\"192.0.2.0/24\"}\n{\"cidr\":\"198.51",
                2,
                "not a DROP JSON",
            ),
            // Cut at a line boundary: the count no longer matches.
            (
                "{\"cidr\":\"192.0.2.0/24\"}\n{\"type\":\"metadata\",\"records\":2}\n",
                2,
                "declares 2",
            ),
            ("{\"cidr\":\"192.0.2.7/24\"}\n", 1, "192.0.2.0/24"),
            ("{\"sblid\":\"SBL1\"}\n", 1, "cidr"),
            ("{\"cidr\":\"192.0.2.0/24\"}\n[1]\n", 2, "not a DROP JSON"),
            (
                "{\"type\":\"prefix\",\"cidr\":\"192.0.2.0/24\"}\n",
                1,
                "prefix",
            ),
            (
                "{\"type\":\"metadata\",\"records\":0}\n{\"cidr\":\"192.0.2.0/24\"}\n",
                2,
                "after the metadata",
            ),
        ];
        for (text, line, named) in cases {
            let err = parse_list(text, ListFormat::Auto).unwrap_err();
            assert_eq!(err.line, line, "{text:?}: {err}");
            assert!(err.to_string().contains(named), "{text:?}: {err}");
        }
    }
}
