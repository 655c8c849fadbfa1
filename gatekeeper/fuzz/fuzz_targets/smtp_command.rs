//! Any command line: parsing must never panic, and whatever parses as RCPT
//! must be classifiable by the relay policy.
#![no_main]

use gatekeeper::smtp::parse::{parse_command, Command};
use gatekeeper::smtp::policy::RelayPolicy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|line: &[u8]| {
    if let Ok(Command::Rcpt { to }) = parse_command(line) {
        let policy = RelayPolicy::new(&["example.org".into(), ".example.net".into()], vec![], vec![]);
        let _ = policy.classify(&to);
    }
});
