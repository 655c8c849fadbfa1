//! Internationalised addresses (RFC 6531): UTF-8 local parts and U-label
//! domains, judged in one canonical form. Pure.
//!
//! The relay policy compares A-labels (`xn--…`, UTS #46 processing,
//! nontransitional). A name that only becomes canonical by mapping
//! (full-width letters, compatibility forms) is refused rather than mapped,
//! and so is any character that merely looks like `@`, `.`, `%` or `!`: such
//! a name must never turn into something local on the way.

use icu_normalizer::ComposingNormalizerBorrowed;
use unicode_security::MixedScript;

/// Full-width and small forms of the routing characters, and the dots UTS #46
/// would map to a label separator.
pub fn is_lookalike_separator(c: char) -> bool {
    matches!(
        c,
        '\u{FF20}' | '\u{FE6B}' // ＠ ﹫
        | '\u{FF0E}' | '\u{3002}' | '\u{FF61}' | '\u{FE52}' | '\u{2024}' // ． 。 ｡ ﹒ ․
        | '\u{FF05}' | '\u{FE6A}' | '\u{2052}' // ％ ﹪ ⁒
        | '\u{FF01}' | '\u{FE57}' | '\u{01C3}' // ！ ﹗ ǃ
    )
}

/// Invisible and direction-changing characters: no address needs them.
pub fn is_invisible(c: char) -> bool {
    c.is_control()
        || c.is_whitespace()
        || matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}' | '\u{00AD}')
}

pub fn nfc(text: &str) -> String {
    ComposingNormalizerBorrowed::new_nfc()
        .normalize(text)
        .into_owned()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdnDomain {
    /// The A-label form the policy compares (lower case).
    pub ascii: String,
    /// The U-label form as sent upstream (what the client wrote, normalised).
    pub unicode: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdnError {
    #[error("invalid internationalised domain")]
    Invalid,
    #[error("domain label mixes scripts (a confusable)")]
    MixedScript,
    #[error("domain is not in its canonical form (full-width or compatibility characters)")]
    NotCanonical,
}

/// A domain holding non-ASCII: converted, and refused unless it already was
/// in the form UTS #46 maps it to (Unicode lower case aside) and each label
/// is of one script.
pub fn parse_unicode_domain(name: &str) -> Result<IdnDomain, IdnError> {
    if name
        .chars()
        .any(|c| is_lookalike_separator(c) || is_invisible(c))
    {
        return Err(IdnError::Invalid);
    }
    // Transitional (IDNA2003-style) processing maps these deviations
    // (ß → ss, ς → σ): the MTA behind could route the U-label forwarded to
    // it elsewhere than the A-label judged here.
    if name.chars().any(|c| matches!(c, '\u{DF}' | '\u{3C2}')) {
        return Err(IdnError::Invalid);
    }
    let ascii = idna::domain_to_ascii_strict(name).map_err(|_| IdnError::Invalid)?;
    let (unicode, result) = idna::domain_to_unicode(&ascii);
    result.map_err(|_| IdnError::Invalid)?;
    if unicode != nfc(&name.to_lowercase()) {
        return Err(IdnError::NotCanonical);
    }
    if !unicode.split('.').all(|label| label.is_single_script()) {
        return Err(IdnError::MixedScript);
    }
    Ok(IdnDomain {
        ascii: ascii.to_ascii_lowercase(),
        unicode,
    })
}

/// A `local_domains` entry in either form, as the policy compares it.
pub fn canonical_domain(name: &str) -> Result<String, IdnError> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_ascii() {
        return Ok(name.to_ascii_lowercase());
    }
    parse_unicode_domain(name).map(|d| d.ascii)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn u_labels_and_a_labels_meet_in_one_form() {
        let d = parse_unicode_domain("exämple.org").unwrap();
        assert_eq!(d.ascii, "xn--exmple-cua.org");
        assert_eq!(d.unicode, "exämple.org");
        assert_eq!(
            canonical_domain("EXÄMPLE.org.").unwrap(),
            "xn--exmple-cua.org"
        );
        assert_eq!(
            canonical_domain("xn--exmple-cua.ORG").unwrap(),
            "xn--exmple-cua.org"
        );
        // NFD input is normalised, not refused.
        assert_eq!(
            parse_unicode_domain("exa\u{308}mple.org").unwrap().ascii,
            "xn--exmple-cua.org"
        );
    }

    #[test]
    fn lookalikes_and_confusables_are_refused_not_mapped() {
        for bad in [
            "ｅｘａｍｐｌｅ.org", // full-width letters map to example.org
            "example。org",       // ideographic full stop maps to '.'
            "example．org",
            "bad＠example.org",
            "exa\u{200B}mple.org", // zero-width space
            "straße.example",      // a deviation character
            "xn--.org",
            "",
        ] {
            assert!(parse_unicode_domain(bad).is_err(), "{bad:?} accepted");
        }
        // Cyrillic 'а' among Latin letters.
        assert_eq!(
            parse_unicode_domain("ex\u{430}mple.org"),
            Err(IdnError::MixedScript)
        );
        // One script per label is fine, even a non-Latin one.
        assert!(parse_unicode_domain("пример.рф").is_ok());
        assert!(is_lookalike_separator('\u{FF05}'));
        assert!(!is_lookalike_separator('%'));
    }
}
