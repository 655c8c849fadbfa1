//! Paths and domains on their own; a parsed path's local part never keeps
//! quoting that would hide `@`, `%` or `!` from the policy.
#![no_main]

use gatekeeper::smtp::parse::{parse_domain, parse_path};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let _ = parse_domain(text);
    if let Ok(path) = parse_path(text) {
        if !text.contains('"') {
            assert!(!path.local_part.contains('"'));
        }
    }
});
