//! Parsing of importable list files.
//!
//! Accepts the Spamhaus DROP/EDROP text format (`192.0.2.0/24 ; SBL123`, with
//! `;` comment lines) and plain one-prefix-per-line lists with `#` comments.

use ipnet::IpNet;

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

/// Parses a whole file; the first bad line rejects it, so an import is all-or-nothing.
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
}
