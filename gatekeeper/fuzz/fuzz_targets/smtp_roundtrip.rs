//! What is sent upstream agrees with what was judged: any accepted MAIL or
//! RCPT renders to printable text (spaces only quoted) that parses back to
//! the same mailbox and the same relay verdict; HELO names are canonical.
#![no_main]

use gatekeeper::smtp::parse::{parse_command, parse_helo_name, parse_path, Command, Path, ReversePath};
use gatekeeper::smtp::policy::RelayPolicy;
use libfuzzer_sys::fuzz_target;

fn check(path: &Path) {
    let wire = path.to_wire();
    let (mut quoted, mut escaped) = (false, false);
    for b in wire.bytes() {
        assert!((0x20..0x7f).contains(&b), "{wire:?}");
        match b {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            b' ' => assert!(quoted, "unquoted space in {wire:?}"),
            _ => {}
        }
    }
    assert!(path.raw.bytes().all(|b| (0x20..0x7f).contains(&b)));
    let back = parse_path(&format!("<{wire}>"))
        .unwrap_or_else(|e| panic!("{:?} -> {wire:?}: {e}", path.raw));
    assert!(back.source_route.is_empty());
    assert_eq!(back.local_part, path.local_part);
    assert_eq!(back.domain, path.domain);
    assert_eq!(back.to_wire(), wire);
    if path.source_route.is_empty() {
        let policy = RelayPolicy::new(&["example.org".into(), ".example.net".into()], vec![], vec![]);
        assert_eq!(policy.classify(&back), policy.classify(path), "{wire:?}");
    }
}

fuzz_target!(|line: &[u8]| {
    match parse_command(line) {
        Ok(Command::Rcpt { to }) => check(&to),
        Ok(Command::Mail { from, params }) => {
            if let ReversePath::Path(path) = &from {
                check(path);
            }
            let mail = format!("MAIL FROM:<{}>{}", from.to_wire(), params.to_wire());
            assert_eq!(
                parse_command(mail.as_bytes()),
                Ok(Command::Mail { from: reparsed(&from), params })
            );
        }
        Ok(Command::Ehlo(name) | Command::Helo(name)) => {
            assert_eq!(parse_helo_name(&name).as_deref(), Ok(name.as_str()));
        }
        _ => {}
    }
});

/// The reverse path as the MTA will parse it (route dropped, `raw` canonical).
fn reparsed(from: &ReversePath) -> ReversePath {
    match from {
        ReversePath::Null => ReversePath::Null,
        ReversePath::Path(p) => ReversePath::Path(Path {
            source_route: Vec::new(),
            raw: p.to_wire(),
            ..p.clone()
        }),
    }
}
