//! The body rules for BDAT chunks (RFC 3030), judged byte by byte across
//! chunk boundaries, with no I/O.
//!
//! A chunk's end is given by its size, so no dot can end a message early;
//! the danger is later: an MTA that relays the message on with DATA may
//! treat a bare LF or CR as a line end, and `<LF>.<LF>` inside a chunk
//! would become the end of data at the next hop (SMTP smuggling). Without
//! BINARYMIME (never offered) a body is lines ending in CRLF, so a bare CR
//! or LF anywhere in a message is refused, as over-long lines are for DATA.

/// Why a chunked message is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyProblem {
    /// A CR not followed by LF, or an LF not preceded by CR.
    BareLineEnd,
    /// A line longer than RFC 5321's 1000 octets with its CRLF.
    LineTooLong,
}

/// The state of one message's scan; feed it every chunk in order.
#[derive(Debug, Default)]
pub struct BodyScanner {
    /// The last byte seen was a CR (its LF may start the next chunk).
    after_cr: bool,
    /// Octets of the current line so far, its CR included.
    line_len: usize,
    problem: Option<BodyProblem>,
}

/// RFC 5321 section 4.5.3.1.6, with the CRLF.
const MAX_LINE: usize = 1000;

impl BodyScanner {
    /// Scans the next bytes of the message; the first problem found stays.
    pub fn scan(&mut self, bytes: &[u8]) -> Result<(), BodyProblem> {
        if let Some(problem) = self.problem {
            return Err(problem);
        }
        for &byte in bytes {
            let found = match (self.after_cr, byte) {
                (true, b'\n') => {
                    self.after_cr = false;
                    self.line_len = 0;
                    None
                }
                (true, _) | (false, b'\n') => Some(BodyProblem::BareLineEnd),
                (false, b'\r') => {
                    self.after_cr = true;
                    self.line_len += 1;
                    None
                }
                (false, _) => {
                    self.line_len += 1;
                    // The line can still end in CRLF within the limit only
                    // while it holds at most 998 octets of text.
                    (self.line_len > MAX_LINE - 2).then_some(BodyProblem::LineTooLong)
                }
            };
            if let Some(problem) = found {
                self.problem = Some(problem);
                return Err(problem);
            }
        }
        Ok(())
    }

    /// The verdict at the end of the message: a CR left dangling is bare.
    /// (A last line without CRLF is left to the MTA, as RFC 3030 allows.)
    pub fn finish(&self) -> Result<(), BodyProblem> {
        match self.problem {
            Some(problem) => Err(problem),
            None if self.after_cr => Err(BodyProblem::BareLineEnd),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn whole(body: &[u8]) -> Result<(), BodyProblem> {
        let mut scanner = BodyScanner::default();
        scanner.scan(body)?;
        scanner.finish()
    }

    #[test]
    fn lines_must_end_in_crlf() {
        assert_eq!(whole(b"Subject: x\r\n\r\nbody\r\n"), Ok(()));
        assert_eq!(whole(b"no final line end"), Ok(()));
        assert_eq!(whole(b""), Ok(()));
        for bad in [
            &b"a\nb\r\n"[..],
            b"a\r\n.\n",
            b"\n.\n",
            b"a\rb\r\n",
            b"a\r\r\n",
            b"ends in cr\r",
        ] {
            assert_eq!(whole(bad), Err(BodyProblem::BareLineEnd), "{bad:?}");
        }
    }

    #[test]
    fn line_length_is_counted_across_chunks() {
        let mut exact = vec![b'x'; 998];
        exact.extend_from_slice(b"\r\n");
        assert_eq!(whole(&exact), Ok(()));
        let mut long = vec![b'x'; 999];
        long.extend_from_slice(b"\r\n");
        assert_eq!(whole(&long), Err(BodyProblem::LineTooLong));
        let mut split = BodyScanner::default();
        split.scan(&[b'y'; 600]).unwrap();
        assert_eq!(split.scan(&[b'y'; 600]), Err(BodyProblem::LineTooLong));
        // The first problem stays, whatever follows.
        assert_eq!(split.scan(b"\r\n"), Err(BodyProblem::LineTooLong));
        assert_eq!(split.finish(), Err(BodyProblem::LineTooLong));
    }

    #[test]
    fn any_split_gives_the_verdict_of_the_whole() {
        let bodies: [&[u8]; 5] = [
            b"a\r\nb\r\n",
            b"a\r\n.\r\nb",
            b"a\n.\nb",
            b"a\r\r\nb\r\n",
            b"ok\r\n\r",
        ];
        for body in bodies {
            let expected = whole(body);
            for cut in 0..=body.len() {
                let mut scanner = BodyScanner::default();
                let verdict = scanner
                    .scan(&body[..cut])
                    .and_then(|()| scanner.scan(&body[cut..]))
                    .and_then(|()| scanner.finish());
                assert_eq!(verdict, expected, "{body:?} cut at {cut}");
            }
        }
    }

    proptest! {
        /// Chunk boundaries anywhere never change the verdict, and a body
        /// that passes has CRLF line ends only, each line within the limit
        /// (what `fuzz_targets/bdat_body.rs` checks at length).
        #[test]
        fn the_verdict_ignores_chunk_boundaries(
            body in prop::collection::vec(
                prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'.'), Just(b'x')],
                0..1200,
            ),
            cuts in prop::collection::vec(0usize..1200, 0..6),
        ) {
            let expected = whole(&body);
            let mut points: Vec<usize> = cuts.into_iter().map(|c| c % (body.len() + 1)).collect();
            points.sort_unstable();
            let mut scanner = BodyScanner::default();
            let mut start = 0;
            let mut verdict = Ok(());
            for end in points.into_iter().chain([body.len()]) {
                verdict = verdict.and_then(|()| scanner.scan(&body[start..end]));
                start = end;
            }
            prop_assert_eq!(verdict.and_then(|()| scanner.finish()), expected);
            if expected.is_ok() {
                let text = String::from_utf8(body).unwrap();
                for line in text.split("\r\n") {
                    prop_assert!(!line.contains(['\r', '\n']) && line.len() <= 998);
                }
            }
        }
    }
}
