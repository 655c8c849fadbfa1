//! BDAT bodies cut into chunks anywhere: the verdict never depends on where
//! the cuts fall, and a body the scanner passes has no bare CR or LF and no
//! line over 1000 octets.
#![no_main]

use gatekeeper::smtp::chunk::BodyScanner;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (Vec<u8>, Vec<u16>)| {
    let (body, cuts) = input;
    let mut whole = BodyScanner::default();
    let expected = whole.scan(&body).and_then(|()| whole.finish());

    let mut points: Vec<usize> = cuts.iter().map(|&c| c as usize % (body.len() + 1)).collect();
    points.sort_unstable();
    let mut chunked = BodyScanner::default();
    let mut start = 0;
    let mut verdict = Ok(());
    for end in points.into_iter().chain([body.len()]) {
        verdict = verdict.and_then(|()| chunked.scan(&body[start..end]));
        start = end;
    }
    assert_eq!(verdict.and_then(|()| chunked.finish()), expected);

    if expected.is_ok() {
        let mut at = 0;
        while let Some(i) = body[at..].iter().position(|&b| b == b'\r' || b == b'\n') {
            assert_eq!(&body[at + i..at + i + 2], b"\r\n");
            assert!(i <= 998);
            at += i + 2;
        }
        assert!(body.len() - at <= 998);
    }
});
