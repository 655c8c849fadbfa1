//! `denied_sender_domains`: MAIL FROM domains refused outright (Lotus
//! `SMTPMTA_DENIED_DOMAINS`). Pure matching; the file is read at start and
//! at each reload.

use std::path::Path;

/// Exact domains and, from `.example.com` entries, parents whose strict
/// subdomains are denied; lower-case, no trailing dot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeniedSenders {
    exact: Vec<String>,
    parents: Vec<String>,
}

impl DeniedSenders {
    pub fn new(entries: &[String], file: Option<&Path>) -> Result<DeniedSenders, String> {
        let mut denied = DeniedSenders::default();
        let mut all: Vec<String> = entries.to_vec();
        if let Some(path) = file {
            all.extend(Self::read_file(path)?);
        }
        for entry in all {
            let (name, parent) = Self::entry(&entry)?;
            match parent {
                true => denied.parents.push(name),
                false => denied.exact.push(name),
            }
        }
        Ok(denied)
    }

    /// One entry in canonical form, and whether it names subdomains.
    pub fn entry(text: &str) -> Result<(String, bool), String> {
        let text = text.trim().to_ascii_lowercase();
        let text = text.strip_suffix('.').unwrap_or(&text);
        let (name, parent) = match text.strip_prefix('.') {
            Some(name) => (name, true),
            None => (text, false),
        };
        if super::parse::parse_domain(name).is_err() || name.starts_with('[') {
            return Err(format!("'{text}' is not a domain"));
        }
        Ok((name.to_owned(), parent))
    }

    /// Entries of a file, one per line; blank lines and `#` comments skipped.
    pub fn read_file(path: &Path) -> Result<Vec<String>, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut entries = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            Self::entry(line).map_err(|e| format!("{}:{}: {e}", path.display(), n + 1))?;
            entries.push(line.to_owned());
        }
        Ok(entries)
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.parents.is_empty()
    }

    /// `domain` as the parser gives it: lower-case, no trailing dot.
    pub fn denies(&self, domain: &str) -> bool {
        self.exact.iter().any(|d| d == domain)
            || self.parents.iter().any(|p| {
                domain.len() > p.len() + 1
                    && domain.ends_with(p.as_str())
                    && domain[..domain.len() - p.len()].ends_with('.')
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_entries_and_subdomain_entries() {
        let denied = DeniedSenders::new(&["Spam.Test.".into(), ".bulk.test".into()], None).unwrap();
        assert!(denied.denies("spam.test"));
        assert!(!denied.denies("sub.spam.test"));
        assert!(!denied.denies("notspam.test"));
        assert!(denied.denies("a.bulk.test"));
        assert!(denied.denies("x.a.bulk.test"));
        assert!(!denied.denies("bulk.test"));
        assert!(!denied.denies("xbulk.test"));
    }

    #[test]
    fn a_file_adds_entries_and_bad_lines_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("denied");
        std::fs::write(
            &path,
            "# spammers\nfile.test\n\n.sub.file.test # and theirs\n",
        )
        .unwrap();
        let denied = DeniedSenders::new(&[], Some(&path)).unwrap();
        assert!(denied.denies("file.test"));
        assert!(denied.denies("a.sub.file.test"));
        std::fs::write(&path, "ok.test\nnot a domain\n").unwrap();
        let error = DeniedSenders::new(&[], Some(&path)).unwrap_err();
        assert!(error.contains(":2:"), "{error}");
        assert!(DeniedSenders::entry("[192.0.2.1]").is_err());
    }
}
