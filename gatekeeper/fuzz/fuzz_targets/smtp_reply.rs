//! Upstream replies, one LF-terminated line at a time: never a panic; a
//! completed reply has a valid code and survives its own wire form.
#![no_main]

use gatekeeper::smtp::reply::{Reply, ReplyParser};
use libfuzzer_sys::fuzz_target;

fn parse_all(bytes: &[u8]) -> Vec<Result<Reply, ()>> {
    let mut out = Vec::new();
    let mut parser = ReplyParser::default();
    for line in bytes.split_inclusive(|&b| b == b'\n') {
        match parser.push(line) {
            Ok(Some(reply)) => out.push(Ok(reply)),
            Ok(None) => {}
            Err(_) => {
                out.push(Err(()));
                parser = ReplyParser::default();
            }
        }
    }
    out
}

fuzz_target!(|bytes: &[u8]| {
    for reply in parse_all(bytes).into_iter().flatten() {
        assert!((200..600).contains(&reply.code));
        assert_eq!(parse_all(&reply.to_wire()), [Ok(reply.clone())]);
    }
});
