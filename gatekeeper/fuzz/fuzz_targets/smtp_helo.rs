//! EHLO/HELO arguments: never a panic; an accepted name is printable, one
//! token, and canonical (it parses back to itself).
#![no_main]

use gatekeeper::smtp::parse::parse_helo_name;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok(name) = parse_helo_name(text) {
        assert!(name.bytes().all(|b| (0x21..0x7f).contains(&b)), "{name:?}");
        assert_eq!(parse_helo_name(&name).as_deref(), Ok(name.as_str()));
    }
});
