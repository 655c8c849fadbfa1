//! Import and feed files in every format: never a panic, and whatever is
//! accepted is canonical (what the store and the kernel maps require).
#![no_main]

use gatekeeper::lists::listfile::{parse_list, ListFormat};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    for format in [ListFormat::Auto, ListFormat::Text, ListFormat::Json] {
        if let Ok(lines) = parse_list(text, format) {
            for line in lines {
                assert_eq!(line.prefix.trunc(), line.prefix);
            }
        }
    }
});
