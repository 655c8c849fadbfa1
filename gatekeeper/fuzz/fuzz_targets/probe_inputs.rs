//! The probe's own parsers (its target, a hostile banner, a corpus table):
//! never a panic, and nothing accepted can break out of an SMTP command.
#![no_main]

use gatekeeper::probe::{corpus, target};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok((host, port)) = target::parse_host_port(text) {
        assert!(port != 0);
        assert!(!host.contains(['\r', '\n', ' ']));
    }
    if let Some(domain) = target::domain_from_banner(text) {
        assert!(target::is_domain(&domain));
    }
    let _ = corpus::parse(text);
});
