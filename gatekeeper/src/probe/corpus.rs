//! The relay tricks, as data: `corpus.tsv` holds one row per spelling, so a
//! new trick is one line there, not code here.

use std::net::IpAddr;

/// The table compiled into the binary.
pub const TABLE: &str = include_str!("corpus.tsv");

/// The family of the one case every run must see accepted.
pub const CONTROL: &str = "control";

/// One row of the table, placeholders still in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row<'a> {
    pub family: &'a str,
    pub case: &'a str,
    pub mail_from: &'a str,
    pub rcpt_to: &'a str,
    pub about: &'a str,
}

impl Row<'_> {
    pub fn id(&self) -> String {
        format!("{}/{}", self.family, self.case)
    }

    pub fn is_control(&self) -> bool {
        self.family == CONTROL
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("corpus line {line}: {problem}")]
pub struct CorpusError {
    pub line: usize,
    pub problem: String,
}

/// Parses the table: `#` comments and blank lines skipped, five tab-separated
/// columns, case ids unique, exactly one control row.
pub fn parse(table: &str) -> Result<Vec<Row<'_>>, CorpusError> {
    let mut rows: Vec<Row> = Vec::new();
    for (index, line) in table.lines().enumerate() {
        let error = |problem: String| CorpusError {
            line: index + 1,
            problem,
        };
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let columns: Vec<&str> = line.split('\t').collect();
        let [family, case, mail_from, rcpt_to, about] = columns[..] else {
            return Err(error(format!(
                "{} columns, expected 5 (family, case, mail_from, rcpt_to, about)",
                columns.len()
            )));
        };
        if family.is_empty() || case.is_empty() || rcpt_to.is_empty() {
            return Err(error("family, case and rcpt_to must not be empty".into()));
        }
        for text in [mail_from, rcpt_to] {
            if let Some(unknown) = unknown_placeholder(text) {
                return Err(error(format!("unknown placeholder {{{unknown}}}")));
            }
        }
        let row = Row {
            family,
            case,
            mail_from,
            rcpt_to,
            about,
        };
        if rows.iter().any(|r| r.id() == row.id()) {
            return Err(error(format!("duplicate case {}", row.id())));
        }
        rows.push(row);
    }
    match rows.iter().filter(|r| r.is_control()).count() {
        1 => Ok(rows),
        n => Err(CorpusError {
            line: 0,
            problem: format!("{n} control rows, expected exactly 1"),
        }),
    }
}

const PLACEHOLDERS: &[&str] = &[
    "sender",
    "user",
    "local",
    "LOCAL",
    "victim",
    "VICTIM",
    "literal",
    "literal_v6",
];

fn unknown_placeholder(text: &str) -> Option<&str> {
    let mut rest = text;
    while let Some(start) = rest.find('{') {
        let after = &rest[start + 1..];
        let end = after.find('}')?;
        let name = &after[..end];
        if !PLACEHOLDERS.contains(&name) {
            return Some(name);
        }
        rest = &after[end + 1..];
    }
    None
}

/// What the placeholders stand for in one run.
#[derive(Debug, Clone)]
pub struct Target {
    pub sender: String,
    pub user: String,
    pub local_domain: String,
    pub victim: String,
    /// The address the probe connected to.
    pub server: IpAddr,
}

impl Target {
    pub fn expand(&self, template: &str) -> String {
        let (literal, literal_v6) = literals(self.server);
        template
            .replace("{sender}", &self.sender)
            .replace("{user}", &self.user)
            .replace("{LOCAL}", &self.local_domain.to_ascii_uppercase())
            .replace("{local}", &self.local_domain)
            .replace("{VICTIM}", &self.victim.to_ascii_uppercase())
            .replace("{victim}", &self.victim)
            .replace("{literal_v6}", &literal_v6)
            .replace("{literal}", &literal)
    }
}

/// The server's address as an RFC 5321 literal, and a second spelling of the
/// same address in IPv6 form: v4-mapped for IPv4, fully expanded for IPv6.
fn literals(server: IpAddr) -> (String, String) {
    match server {
        IpAddr::V4(v4) => (format!("[{v4}]"), format!("[IPv6:::ffff:{v4}]")),
        IpAddr::V6(v6) => {
            let expanded = v6
                .segments()
                .iter()
                .map(|s| format!("{s:x}"))
                .collect::<Vec<_>>()
                .join(":");
            (format!("[IPv6:{v6}]"), format!("[IPv6:{expanded}]"))
        }
    }
}

/// `--only`: a pattern with `*` is a glob over `family/case`; without, a
/// case-insensitive substring of it. The control always runs.
pub fn selected(row: &Row, pattern: Option<&str>) -> bool {
    let Some(pattern) = pattern else {
        return true;
    };
    if row.is_control() {
        return true;
    }
    let id = row.id().to_ascii_lowercase();
    let pattern = pattern.to_ascii_lowercase();
    pattern.split(',').map(str::trim).any(|p| {
        if p.contains('*') {
            glob(p.as_bytes(), id.as_bytes())
        } else {
            !p.is_empty() && id.contains(p)
        }
    })
}

/// `*` matches any run; iterative with one backtrack point, so O(n·m).
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((star_p, star_t)) = star {
            p = star_p + 1;
            t = star_t + 1;
            star = Some((star_p, star_t + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_table_parses_and_covers_the_guide() {
        let rows = parse(TABLE).unwrap();
        assert!(rows.len() > 40, "{} rows", rows.len());
        for family in [
            "foreign",
            "forged-sender",
            "percent",
            "bang",
            "source-route",
            "quoted",
            "embedded",
            "literal",
            "lookalike",
            "syntax",
        ] {
            assert!(rows.iter().any(|r| r.family == family), "no {family} case");
        }
        assert!(rows.iter().any(|r| r.mail_from == "<>"));
    }

    #[test]
    fn bad_tables_are_refused_with_the_line() {
        let control = "control\tc\t<{sender}>\t<{user}@{local}>\tx\n";
        assert_eq!(parse("a\tb\tc\n").unwrap_err().line, 1);
        let unknown = format!("{control}f\tc\t<x>\t<{{nope}}@x>\tx\n");
        let error = parse(&unknown).unwrap_err();
        assert_eq!(error.line, 2);
        assert!(error.problem.contains("nope"));
        let duplicate = format!("{control}f\tc\t<x>\t<y>\tx\nf\tc\t<x>\t<z>\tx\n");
        assert!(parse(&duplicate).unwrap_err().problem.contains("duplicate"));
        assert!(parse("f\tc\t<x>\t<y>\tx\n").is_err(), "no control");
    }

    #[test]
    fn placeholders_expand() {
        let target = Target {
            sender: "probe@relay-test.invalid".into(),
            user: "postmaster".into(),
            local_domain: "example.org".into(),
            victim: "relay-test.invalid".into(),
            server: "192.0.2.1".parse().unwrap(),
        };
        assert_eq!(
            target.expand("<relaytest%{victim}@{LOCAL}>"),
            "<relaytest%relay-test.invalid@EXAMPLE.ORG>"
        );
        assert_eq!(
            target.expand("<@{literal}:x@{VICTIM}> {literal_v6}"),
            "<@[192.0.2.1]:x@RELAY-TEST.INVALID> [IPv6:::ffff:192.0.2.1]"
        );
        let v6 = Target {
            server: "2001:db8::1".parse().unwrap(),
            ..target
        };
        assert_eq!(
            v6.expand("{literal} {literal_v6}"),
            "[IPv6:2001:db8::1] [IPv6:2001:db8:0:0:0:0:0:1]"
        );
    }

    #[test]
    fn only_selects_by_substring_or_glob() {
        let rows = parse(TABLE).unwrap();
        let pick = |p| {
            rows.iter()
                .filter(|r| selected(r, Some(p)))
                .map(Row::id)
                .collect::<Vec<_>>()
        };
        let percent = pick("percent");
        assert!(percent.contains(&"control/local-recipient".to_owned()));
        assert!(percent.contains(&"percent/percent".to_owned()));
        assert!(percent.contains(&"quoted/quoted-percent".to_owned()));
        assert!(!percent.contains(&"bang/bang".to_owned()));
        let globbed = pick("bang/*");
        assert!(globbed
            .iter()
            .all(|id| id.starts_with("bang/") || id.starts_with("control/")));
        assert!(globbed.len() > 2);
        assert_eq!(pick("foreign/plain,bang/bang-bare").len(), 3);
        assert!(!glob(
            b"*e*e*e*e*e*e*e*e*r*x",
            b"eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeer"
        ));
        assert!(glob(b"*a*b", b"xxaxxb"));
        assert!(!glob(b"a*", b"ba"));
    }
}
