//! SMTP replies: parsing the upstream's, formatting ours.

/// A complete (possibly multi-line) reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    pub fn new(code: u16, text: impl Into<String>) -> Reply {
        Reply {
            code,
            lines: vec![text.into()],
        }
    }

    /// Parses the first line of `text` like "250 2.0.0 Ok" (for our own constant replies).
    pub fn parse_line(text: &str) -> Reply {
        let code = text.get(..3).and_then(|c| c.parse().ok()).unwrap_or(451);
        Reply::new(code, text.get(4..).unwrap_or("").to_owned())
    }

    /// 2xx only: a 3xx to anything but DATA is no acceptance.
    pub fn is_success(&self) -> bool {
        self.code / 100 == 2
    }

    pub fn is_error(&self) -> bool {
        self.code >= 400
    }

    /// Wire form: `code-text` continuation lines and a final `code text`, CRLF each.
    pub fn to_wire(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let last = self.lines.len().saturating_sub(1);
        for (i, line) in self.lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            out.extend_from_slice(format!("{}{sep}{line}\r\n", self.code).as_bytes());
        }
        if self.lines.is_empty() {
            out.extend_from_slice(format!("{}\r\n", self.code).as_bytes());
        }
        out
    }
}

/// Accumulates reply lines read from a server; `Some` once the last line arrived.
#[derive(Default)]
pub struct ReplyParser {
    code: Option<u16>,
    lines: Vec<String>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed SMTP reply line: {0:?}")]
pub struct MalformedReply(pub String);

impl ReplyParser {
    pub fn push(&mut self, line: &[u8]) -> Result<Option<Reply>, MalformedReply> {
        let text = String::from_utf8_lossy(super::io::trim_eol(line)).into_owned();
        let code = text
            .get(..3)
            .filter(|c| c.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|c| c.parse::<u16>().ok())
            .filter(|c| (200..600).contains(c))
            .ok_or_else(|| MalformedReply(text.clone()))?;
        if self.code.is_some_and(|c| c != code) {
            return Err(MalformedReply(text));
        }
        self.code = Some(code);
        let sep = text.as_bytes().get(3).copied();
        self.lines.push(text.get(4..).unwrap_or("").to_owned());
        match sep {
            Some(b'-') => Ok(None),
            None | Some(b' ') => Ok(Some(Reply {
                code,
                lines: std::mem::take(&mut self.lines),
            })),
            _ => Err(MalformedReply(text)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_line_round_trip() {
        let mut parser = ReplyParser::default();
        assert_eq!(parser.push(b"250-mx.example\r\n").unwrap(), None);
        let reply = parser.push(b"250 XCLIENT ADDR NAME\r\n").unwrap().unwrap();
        assert_eq!(reply.lines, ["mx.example", "XCLIENT ADDR NAME"]);
        assert_eq!(
            reply.to_wire(),
            b"250-mx.example\r\n250 XCLIENT ADDR NAME\r\n"
        );
        assert!(ReplyParser::default().push(b"hello\r\n").is_err());
        assert!(ReplyParser::default().push(b"999 no\r\n").is_err());
    }
}
