//! SMTP command and path parsing: pure functions from bytes to values.
//!
//! The grammar is RFC 5321's, read the way the MTA behind us would read it:
//! the mailbox splits at the last unquoted `@`, so `user@victim@example.org`
//! is the local part `user@victim` at `example.org` (an embedded address the
//! policy refuses), not a syntax error another MTA might read differently.
//!
//! Nothing the client wrote is forwarded as text: what goes upstream is
//! rebuilt from the parsed values (`Path::to_wire`, `MailParams::to_wire`,
//! the canonical HELO name), so a byte the parser let through but the MTA
//! reads differently cannot reach it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const MAX_LOCAL_PART: usize = 64;
pub const MAX_DOMAIN: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// The client's name in canonical form (see [`parse_helo_name`]).
    Ehlo(String),
    Helo(String),
    Mail {
        from: ReversePath,
        params: MailParams,
    },
    Rcpt {
        to: Path,
        params: RcptParams,
    },
    Data,
    /// RFC 3030: a chunk of `size` octets follows the command line.
    Bdat {
        size: u64,
        last: bool,
    },
    Rset,
    Noop,
    Quit,
    Help,
    Vrfy,
    Expn,
    StartTls,
    /// RFC 4954: the mechanism upper-cased, and the initial response as sent.
    Auth {
        mechanism: String,
        initial: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReversePath {
    /// `<>`: bounces and other notifications.
    Null,
    Path(Path),
}

/// A path as the client wrote it, plus what it means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path {
    /// Domains of an RFC 821 source route (`<@a,@b:user@c>`), obsolete and a relay trick.
    pub source_route: Vec<String>,
    /// Local part after unquoting and unescaping.
    pub local_part: String,
    pub domain: Option<Domain>,
    /// The path's text between the angle brackets as the client wrote it, for
    /// replies and logs only (no control characters: the command passed the
    /// hygiene check). Never sent upstream: that is [`Path::to_wire`].
    pub raw: String,
    /// Holds non-ASCII (RFC 6531): only in an SMTPUTF8 transaction.
    pub utf8: bool,
    /// The domain's U-label form, sent upstream instead of its A-labels when
    /// the client wrote it so ([`Domain::Name`] holds the A-labels).
    pub unicode_domain: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Domain {
    /// Lower-cased, one trailing dot removed.
    Name(String),
    Literal(IpAddr),
    /// `[tag:content]` literals other than IPv6, validated per RFC 5321
    /// (`Standardized-tag ":" 1*dcontent`), kept as `tag:content`.
    GeneralLiteral(String),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MailParams {
    pub size: Option<u64>,
    pub body_8bit: bool,
    /// DSN (RFC 3461): forwarded only when the MTA behind offers DSN.
    pub ret: Option<super::dsn::Ret>,
    pub envid: Option<String>,
    /// RFC 6531: this transaction may carry UTF-8 addresses.
    pub smtputf8: bool,
}

impl MailParams {
    pub fn uses_dsn(&self) -> bool {
        self.ret.is_some() || self.envid.is_some()
    }

    /// For a client that may not relay: its MAIL FROM may be forged, so a
    /// report must not carry the message to it (RET=HDRS).
    pub fn limit_dsn(&mut self) {
        if self.ret.is_some() {
            self.ret = Some(super::dsn::Ret::Hdrs);
        }
    }
}

/// RCPT's parameters: DSN's only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RcptParams {
    pub notify: Option<super::dsn::Notify>,
    pub orcpt: Option<super::dsn::Orcpt>,
}

impl RcptParams {
    pub fn uses_dsn(&self) -> bool {
        self.notify.is_some() || self.orcpt.is_some()
    }

    /// For a client that may not relay: no success reports, which would
    /// send mail to a possibly forged MAIL FROM that delivery alone never
    /// would (failure and delay reports are bounces it gets anyway).
    pub fn limit_dsn(&mut self) {
        if let Some(notify) = self.notify.as_mut() {
            notify.success = false;
            if !(notify.failure || notify.delay) {
                notify.never = true;
            }
        }
    }

    /// As appended to the RCPT command sent upstream, rebuilt from the values.
    pub fn to_wire(&self) -> String {
        let mut out = String::new();
        if let Some(notify) = self.notify {
            out.push_str(&format!(" NOTIFY={}", notify.to_wire()));
        }
        if let Some(orcpt) = &self.orcpt {
            out.push_str(&format!(" ORCPT={}", orcpt.to_wire()));
        }
        out
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// A byte below 0x20 (other than the line's CRLF) or 0x7f: a CR here is
    /// where a filter that ends lines at CR would see a second command.
    #[error("501 5.5.2 Syntax error: control character in command")]
    ControlCharacter,
    #[error("500 5.5.2 Error: command not recognized")]
    UnknownCommand,
    #[error("501 5.5.4 Syntax: {0}")]
    Syntax(&'static str),
    #[error("501 5.1.3 Bad address syntax: {0}")]
    BadAddress(&'static str),
    #[error("555 5.5.4 Unsupported parameter: {0}")]
    UnsupportedParameter(String),
    /// A BDAT whose chunk size cannot be read: where its data ends is
    /// unknown, so the session cannot go on.
    #[error("501 5.5.4 Syntax: BDAT octets [LAST]")]
    BadChunk,
}

impl ParseError {
    /// The SMTP reply line (code, enhanced code, text) for this error.
    pub fn reply(&self) -> String {
        self.to_string()
    }
}

/// Parses one command line (without its CRLF, or the bare LF the session
/// also accepts as a command terminator).
pub fn parse_command(line: &[u8]) -> Result<Command, ParseError> {
    let parsed = parse_command_line(line);
    // `BDAT\t5`, `BDAT\xa05`...: any line a lenient reader could take for
    // BDAT counts as one (`BDATX` stays an unknown command).
    let is_bdat = line
        .get(..4)
        .is_some_and(|v| v.eq_ignore_ascii_case(b"BDAT"))
        && !line.get(4).is_some_and(u8::is_ascii_alphanumeric);
    match parsed {
        // Whatever is wrong with a BDAT line, its chunk's end is unknown.
        Err(_) if is_bdat => Err(ParseError::BadChunk),
        parsed => parsed,
    }
}

fn parse_command_line(line: &[u8]) -> Result<Command, ParseError> {
    if line.iter().any(|&b| b < 0x20 || b == 0x7f) {
        return Err(ParseError::ControlCharacter);
    }
    let line = std::str::from_utf8(line).map_err(|_| ParseError::Syntax("non-ASCII command"))?;
    // UTF-8 is for MAIL and RCPT paths only (RFC 6531); whether this
    // transaction may use it is the session's decision (SMTPUTF8).
    let verb_is_path = line
        .get(..4)
        .is_some_and(|v| v.eq_ignore_ascii_case("MAIL") || v.eq_ignore_ascii_case("RCPT"));
    if !(line.is_ascii() || verb_is_path && non_ascii_only_in_brackets(line)) {
        return Err(ParseError::Syntax(
            "non-ASCII outside an address in angle brackets",
        ));
    }
    let (verb, rest) = match line.find(' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, ""),
    };
    let no_args = |command: Command| {
        if rest.trim().is_empty() {
            Ok(command)
        } else {
            Err(ParseError::Syntax("no arguments allowed"))
        }
    };
    match verb.to_ascii_uppercase().as_str() {
        "EHLO" => parse_helo_name(rest).map(Command::Ehlo),
        "HELO" => parse_helo_name(rest).map(Command::Helo),
        "MAIL" => {
            let args =
                strip_keyword(rest, "FROM:").ok_or(ParseError::Syntax("MAIL FROM:<address>"))?;
            let (path, params) = split_path(args)?;
            let from = if path == "<>" {
                ReversePath::Null
            } else {
                ReversePath::Path(parse_path(path)?)
            };
            Ok(Command::Mail {
                from,
                params: parse_mail_params(params)?,
            })
        }
        "RCPT" => {
            let args = strip_keyword(rest, "TO:").ok_or(ParseError::Syntax("RCPT TO:<address>"))?;
            let (path, params) = split_path(args)?;
            Ok(Command::Rcpt {
                to: parse_path(path)?,
                params: parse_rcpt_params(params)?,
            })
        }
        "DATA" => no_args(Command::Data),
        "BDAT" => parse_bdat(rest),
        "RSET" => no_args(Command::Rset),
        "QUIT" => no_args(Command::Quit),
        "STARTTLS" => no_args(Command::StartTls),
        "NOOP" => Ok(Command::Noop),
        "HELP" => Ok(Command::Help),
        "VRFY" => Ok(Command::Vrfy),
        "EXPN" => Ok(Command::Expn),
        "AUTH" => parse_auth(rest),
        _ => Err(ParseError::UnknownCommand),
    }
}

/// UTF-8 may stand only between the path's `<` and `>`: the verb, the
/// keyword and the parameters stay ASCII (no Unicode spaces as separators).
fn non_ascii_only_in_brackets(line: &str) -> bool {
    let (Some(open), Some(close)) = (line.find('<'), line.rfind('>')) else {
        return false;
    };
    line.char_indices()
        .filter(|(_, c)| !c.is_ascii())
        .all(|(i, _)| open < i && i < close)
}

/// Validates an EHLO/HELO argument and returns its canonical form: an
/// address literal re-rendered from the parsed address, a name unchanged.
///
/// Realistic rather than strict: a name is 1 to 255 octets of dot-separated
/// labels (1 to 63 octets each, one trailing dot allowed) of letters, digits,
/// `-` and `_`, no label starting or ending with `-`, so single labels
/// (`localhost`, `DESKTOP-4F2K`) and underscores (`my_pc.lan`) pass, as they
/// do in Postfix. Anything that cannot be a name is refused: spaces, quotes,
/// brackets outside a literal, `@`, empty labels.
pub fn parse_helo_name(text: &str) -> Result<String, ParseError> {
    let arg = text.trim_matches(' ');
    if arg.is_empty() {
        return Err(ParseError::Syntax("EHLO/HELO hostname"));
    }
    let invalid = ParseError::Syntax("invalid EHLO/HELO name");
    if arg.starts_with('[') {
        return match parse_domain(arg) {
            Ok(literal) => Ok(literal.to_wire().into_owned()),
            Err(_) => Err(invalid),
        };
    }
    let name = arg.strip_suffix('.').unwrap_or(arg);
    let label_ok = |label: &str| {
        (1..=63).contains(&label.len())
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if name.is_empty() || name.len() > MAX_DOMAIN || !name.split('.').all(label_ok) {
        return Err(invalid);
    }
    Ok(arg.to_owned())
}

/// `AUTH mechanism [initial-response]`: a SASL mechanism name (RFC 4422:
/// 1 to 20 of A-Z, 0-9, `-`, `_`) and base64 or `=` (an empty response).
fn parse_auth(rest: &str) -> Result<Command, ParseError> {
    let mut words = rest.split(' ').filter(|w| !w.is_empty());
    let mechanism = words
        .next()
        .ok_or(ParseError::Syntax("AUTH mechanism [initial-response]"))?;
    let initial = words.next();
    if words.next().is_some() {
        return Err(ParseError::Syntax("AUTH mechanism [initial-response]"));
    }
    let mechanism = mechanism.to_ascii_uppercase();
    let name_ok = (1..=20).contains(&mechanism.len())
        && mechanism
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !name_ok {
        return Err(ParseError::Syntax("invalid SASL mechanism name"));
    }
    if let Some(response) = initial {
        if !is_sasl_response(response) {
            return Err(ParseError::Syntax("initial response is not base64"));
        }
    }
    Ok(Command::Auth {
        mechanism,
        initial: initial.map(str::to_owned),
    })
}

/// A SASL response line: base64 (RFC 4648 alphabet, padded), `=` for an
/// empty response, or `*` to cancel is checked by the caller.
pub fn is_sasl_response(text: &str) -> bool {
    if text == "=" {
        return true;
    }
    let body = text.trim_end_matches('=');
    !text.is_empty()
        && text.len().is_multiple_of(4)
        && text.len() - body.len() <= 2
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

/// `FROM:` / `TO:` case-insensitively, tolerating spaces around the colon as most MTAs do.
fn strip_keyword<'a>(rest: &'a str, keyword: &str) -> Option<&'a str> {
    let word = keyword.trim_end_matches(':');
    let rest = rest.trim_start_matches(' ');
    if !rest.get(..word.len())?.eq_ignore_ascii_case(word) {
        return None;
    }
    let rest = rest[word.len()..].trim_start_matches(' ');
    rest.strip_prefix(':').map(|r| r.trim_start_matches(' '))
}

/// Splits `<path> params` (or an unbracketed path); brackets may contain quoted spaces.
fn split_path(args: &str) -> Result<(&str, &str), ParseError> {
    if args.starts_with('<') {
        let mut close = None;
        scan_unquoted(args, |i, c| {
            if c == '>' {
                close = Some(i);
            }
            close.is_some()
        });
        return match close {
            Some(i) => Ok((&args[..=i], args[i + 1..].trim())),
            None => Err(ParseError::BadAddress("missing '>'")),
        };
    }
    // Unbracketed, as some clients send: the path ends at the first space.
    match args.find(' ') {
        Some(i) => Ok((&args[..i], args[i + 1..].trim())),
        None if args.is_empty() => Err(ParseError::BadAddress("empty address")),
        None => Ok((args, "")),
    }
}

/// Parses `<[@route,...:]local@domain>` or the same without brackets.
pub fn parse_path(text: &str) -> Result<Path, ParseError> {
    let inner = match text.strip_prefix('<') {
        Some(rest) => rest
            .strip_suffix('>')
            .ok_or(ParseError::BadAddress("missing '>'"))?,
        None => text,
    };
    if inner.is_empty() {
        return Err(ParseError::BadAddress("empty address"));
    }
    let utf8 = !inner.is_ascii();
    if utf8
        && inner
            .chars()
            .any(|c| super::idn::is_lookalike_separator(c) || super::idn::is_invisible(c))
    {
        return Err(ParseError::BadAddress(
            "character that looks like '@', '.', '%' or '!', or is invisible",
        ));
    }
    let (source_route, mailbox) = split_source_route(inner)?;
    let (local_raw, domain_raw) = split_mailbox(mailbox)?;
    let mut local_part = unquote_local_part(local_raw)?;
    if !local_part.is_ascii() {
        local_part = super::idn::nfc(&local_part);
    }
    if wire_local_part(&local_part).len() > MAX_LOCAL_PART {
        // What is forwarded must parse again (a dot-string holding '@' gains quotes).
        return Err(ParseError::BadAddress("local part longer than 64 octets"));
    }
    let mut unicode_domain = None;
    let domain = match domain_raw {
        Some(raw) if !raw.is_ascii() => {
            let name = raw.strip_suffix('.').unwrap_or(raw);
            let idn = super::idn::parse_unicode_domain(name).map_err(|_| {
                ParseError::BadAddress("invalid or confusable internationalised domain")
            })?;
            if idn.unicode.len() > MAX_DOMAIN {
                return Err(ParseError::BadAddress("bad domain length"));
            }
            unicode_domain = Some(idn.unicode);
            Some(Domain::Name(idn.ascii))
        }
        Some(raw) => Some(parse_domain(raw)?),
        None => None,
    };
    Ok(Path {
        source_route,
        local_part,
        domain,
        raw: inner.to_owned(),
        utf8,
        unicode_domain,
    })
}

fn split_source_route(inner: &str) -> Result<(Vec<String>, &str), ParseError> {
    if !inner.starts_with('@') {
        return Ok((Vec::new(), inner));
    }
    let colon = inner
        .find(':')
        .ok_or(ParseError::BadAddress("source route without ':'"))?;
    let mut route = Vec::new();
    for hop in inner[..colon].split(',') {
        let hop = hop
            .trim()
            .strip_prefix('@')
            .ok_or(ParseError::BadAddress("source route hop"))?;
        match parse_domain(hop)? {
            Domain::Name(name) => route.push(name),
            _ => route.push(hop.to_owned()),
        }
    }
    Ok((route, &inner[colon + 1..]))
}

/// Calls `visit` with each character outside quoted strings and address
/// literals (and its byte index) until it returns true; returns whether a
/// quoted string or literal was left open. A literal is opaque because its
/// dcontent may hold `"`, `@` and `>`; it cannot hold `]`.
fn scan_unquoted(text: &str, mut visit: impl FnMut(usize, char) -> bool) -> bool {
    let mut in_quotes = false;
    let mut in_literal = false;
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            ']' if in_literal => in_literal = false,
            _ if in_literal => {}
            '\\' if in_quotes => escaped = true,
            '"' => in_quotes = !in_quotes,
            '[' if !in_quotes => in_literal = true,
            _ if !in_quotes && visit(i, c) => return false,
            _ => {}
        }
    }
    in_quotes || in_literal
}

/// Splits at the last `@` outside a quoted string or literal.
fn split_mailbox(mailbox: &str) -> Result<(&str, Option<&str>), ParseError> {
    let mut at = None;
    let open_quote = scan_unquoted(mailbox, |i, c| {
        if c == '@' {
            at = Some(i);
        }
        false
    });
    if open_quote {
        return Err(ParseError::BadAddress(
            "unterminated quoted string or literal",
        ));
    }
    Ok(match at {
        Some(i) => (&mailbox[..i], Some(&mailbox[i + 1..])),
        None => (mailbox, None),
    })
}

/// RFC 5322 atext, plus RFC 6531's UTF8-non-ascii.
fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii()
}

/// Returns the local part as the MTA will see it: quotes removed, escapes resolved.
fn unquote_local_part(raw: &str) -> Result<String, ParseError> {
    if raw.is_empty() {
        return Err(ParseError::BadAddress("empty local part"));
    }
    if raw.len() > MAX_LOCAL_PART {
        return Err(ParseError::BadAddress("local part longer than 64 octets"));
    }
    if let Some(body) = raw.strip_prefix('"') {
        let body = body
            .strip_suffix('"')
            .ok_or(ParseError::BadAddress("text after a quoted local part"))?;
        let mut out = String::with_capacity(body.len());
        let mut chars = body.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some(e @ ' '..='~') => out.push(e),
                    _ => return Err(ParseError::BadAddress("bad escape in quoted local part")),
                },
                '"' => return Err(ParseError::BadAddress("stray quote in local part")),
                ' '..='~' => out.push(c),
                c if !c.is_ascii() => out.push(c),
                _ => return Err(ParseError::BadAddress("control character in local part")),
            }
        }
        return Ok(out);
    }
    // Dot-string; an unquoted '@' is kept so the policy can refuse it as an embedded address.
    if raw.starts_with('.') || raw.ends_with('.') || raw.contains("..") {
        return Err(ParseError::BadAddress("misplaced '.' in local part"));
    }
    if !raw.chars().all(|c| is_atext(c) || c == '.' || c == '@') {
        return Err(ParseError::BadAddress("invalid character in local part"));
    }
    Ok(raw.to_owned())
}

/// Parses a domain or address literal; names are lower-cased with one trailing dot removed.
pub fn parse_domain(text: &str) -> Result<Domain, ParseError> {
    if let Some(literal) = text.strip_prefix('[') {
        let literal = literal
            .strip_suffix(']')
            .ok_or(ParseError::BadAddress("unclosed address literal"))?;
        if let Some(v6) = literal
            .get(..5)
            .filter(|tag| tag.eq_ignore_ascii_case("IPv6:"))
            .map(|_| &literal[5..])
        {
            let addr: Ipv6Addr = v6
                .parse()
                .map_err(|_| ParseError::BadAddress("bad IPv6 literal"))?;
            return Ok(Domain::Literal(IpAddr::V6(addr)));
        }
        if let Ok(addr) = literal.parse::<Ipv4Addr>() {
            return Ok(Domain::Literal(IpAddr::V4(addr)));
        }
        return match literal.split_once(':') {
            Some((tag, content)) if is_standardized_tag(tag) && is_dcontent(content) => {
                Ok(Domain::GeneralLiteral(literal.to_owned()))
            }
            _ => Err(ParseError::BadAddress("bad address literal")),
        };
    }
    let name = text.strip_suffix('.').unwrap_or(text);
    if name.is_empty() || name.len() > MAX_DOMAIN {
        return Err(ParseError::BadAddress("bad domain length"));
    }
    for label in name.split('.') {
        let valid = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if !valid {
            return Err(ParseError::BadAddress("bad domain"));
        }
    }
    Ok(Domain::Name(name.to_ascii_lowercase()))
}

/// RFC 5321 `Standardized-tag = Ldh-str`: letters, digits and inner hyphens.
fn is_standardized_tag(tag: &str) -> bool {
    !tag.is_empty()
        && !tag.starts_with('-')
        && !tag.ends_with('-')
        && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// RFC 5321 `1*dcontent`, dcontent = %d33-90 / %d94-126 (printable, no `[\]`).
fn is_dcontent(content: &str) -> bool {
    !content.is_empty() && content.bytes().all(|b| matches!(b, 33..=90 | 94..=126))
}

/// A dot-string local part goes out as it is; anything else is quoted,
/// with a backslash only before `"` and `\`.
fn wire_local_part(local: &str) -> std::borrow::Cow<'_, str> {
    let dot_string = !local.is_empty()
        && local
            .split('.')
            .all(|atom| !atom.is_empty() && atom.chars().all(is_atext));
    if dot_string {
        return local.into();
    }
    let mut out = String::with_capacity(local.len() + 2);
    out.push('"');
    for c in local.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out.into()
}

impl Path {
    /// The canonical text between the angle brackets, as sent upstream: the
    /// local part re-quoted only when it is not a dot-string, the domain as
    /// parsed (lower-cased, literals rendered from the address). A source
    /// route is dropped, as RFC 5321 (section 3.6.1, appendix C) lets a
    /// server do: the relay decision already saw it.
    pub fn to_wire(&self) -> String {
        let local = wire_local_part(&self.local_part);
        match (&self.unicode_domain, &self.domain) {
            (Some(unicode), _) => format!("{local}@{unicode}"),
            (None, Some(domain)) => format!("{local}@{}", domain.to_wire()),
            (None, None) => local.into_owned(),
        }
    }
}

impl ReversePath {
    /// The text between the angle brackets of the MAIL command sent upstream.
    pub fn to_wire(&self) -> String {
        match self {
            ReversePath::Null => String::new(),
            ReversePath::Path(path) => path.to_wire(),
        }
    }
}

impl Domain {
    /// As parsed: names lower-cased, literals rendered from the address.
    pub fn to_wire(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Domain::Name(name) => name.into(),
            Domain::Literal(IpAddr::V4(v4)) => format!("[{v4}]").into(),
            Domain::Literal(IpAddr::V6(v6)) => format!("[IPv6:{v6}]").into(),
            Domain::GeneralLiteral(literal) => format!("[{literal}]").into(),
        }
    }
}

impl MailParams {
    /// The parameters we accepted, as appended to the MAIL command sent
    /// upstream (each with its leading space); nothing else is forwarded.
    pub fn to_wire(&self) -> String {
        let mut out = String::new();
        if let Some(size) = self.size {
            out.push_str(&format!(" SIZE={size}"));
        }
        if self.body_8bit {
            out.push_str(" BODY=8BITMIME");
        }
        if let Some(ret) = self.ret {
            out.push_str(&format!(" RET={}", ret.to_wire()));
        }
        if let Some(envid) = &self.envid {
            out.push_str(&format!(" ENVID={}", super::dsn::encode_xtext(envid)));
        }
        if self.smtputf8 {
            out.push_str(" SMTPUTF8");
        }
        out
    }
}

/// One ESMTP parameter: the key upper-cased, its value, the text as written.
type Param<'a> = (String, Option<&'a str>, &'a str);

/// `KEY=VALUE` or `KEY`; each key at most once.
fn split_params(params: &str) -> Result<Vec<Param<'_>>, ParseError> {
    let mut out: Vec<Param> = Vec::new();
    for param in params.split_whitespace() {
        let (key, value) = match param.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (param, None),
        };
        let key = key.to_ascii_uppercase();
        if out.iter().any(|(k, _, _)| *k == key) {
            return Err(ParseError::Syntax("a parameter given twice"));
        }
        out.push((key, value, param));
    }
    Ok(out)
}

fn parse_rcpt_params(params: &str) -> Result<RcptParams, ParseError> {
    let mut out = RcptParams::default();
    for (key, value, param) in split_params(params)? {
        match (key.as_str(), value) {
            ("NOTIFY", Some(v)) => out.notify = Some(super::dsn::parse_notify(v)?),
            ("ORCPT", Some(v)) => out.orcpt = Some(super::dsn::parse_orcpt(v, false)?),
            _ => return Err(ParseError::UnsupportedParameter(param.to_owned())),
        }
    }
    Ok(out)
}

/// `BDAT` SP chunk-size [SP `LAST`] (RFC 3030 section 2): exactly one
/// space between the words, so no two readings of the size exist.
fn parse_bdat(args: &str) -> Result<Command, ParseError> {
    let (size, last) = match args.split_once(' ') {
        Some((size, word)) if word.eq_ignore_ascii_case("LAST") => (size, true),
        Some(_) => return Err(ParseError::BadChunk),
        None => (args, false),
    };
    if size.is_empty() || size.len() > 20 || !size.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ParseError::BadChunk);
    }
    let size = size.parse().map_err(|_| ParseError::BadChunk)?;
    Ok(Command::Bdat { size, last })
}

fn parse_mail_params(params: &str) -> Result<MailParams, ParseError> {
    let mut out = MailParams::default();
    for (key, value, param) in split_params(params)? {
        match (key.as_str(), value) {
            ("SIZE", Some(v))
                if !v.is_empty() && v.len() <= 20 && v.bytes().all(|b| b.is_ascii_digit()) =>
            {
                out.size = Some(v.parse().map_err(|_| ParseError::Syntax("SIZE=<octets>"))?);
            }
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("8BITMIME") => out.body_8bit = true,
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("7BIT") => out.body_8bit = false,
            ("RET", Some(v)) => out.ret = Some(super::dsn::parse_ret(v)?),
            ("ENVID", Some(v)) => out.envid = Some(super::dsn::parse_envid(v)?),
            ("SMTPUTF8", None) => out.smtputf8 = true,
            _ => return Err(ParseError::UnsupportedParameter(param.to_owned())),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rcpt(line: &str) -> Path {
        match parse_command(line.as_bytes()) {
            Ok(Command::Rcpt { to, .. }) => to,
            other => panic!("{line:?} gave {other:?}"),
        }
    }

    #[test]
    fn bdat_sizes_are_read_exactly_or_refused() {
        assert_eq!(
            parse_command(b"BDAT 1000").unwrap(),
            Command::Bdat {
                size: 1000,
                last: false
            }
        );
        assert_eq!(
            parse_command(b"bdat 0 last").unwrap(),
            Command::Bdat {
                size: 0,
                last: true
            }
        );
        assert_eq!(
            parse_command(b"BDAT 18446744073709551615 LAST").unwrap(),
            Command::Bdat {
                size: u64::MAX,
                last: true
            }
        );
        for bad in [
            &b"BDAT"[..],
            b"BDAT ",
            b"BDAT -1",
            b"BDAT +5",
            b"BDAT 0x10",
            b"BDAT 1 2",
            b"BDAT 10 LAST extra",
            b"BDAT  10",
            b"BDAT 10  LAST",
            b"BDAT 18446744073709551616",
            b"BDAT 100000000000000000000",
            b"BDAT \xd9\xa1",
        ] {
            assert!(
                parse_command(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            parse_command(b"BDAT 1 2").unwrap_err(),
            ParseError::BadChunk
        );
        assert_eq!(
            parse_command(b"BDAT 1\x00").unwrap_err(),
            ParseError::BadChunk
        );
        assert_eq!(
            parse_command(b"BDAT \xd9\xa1").unwrap_err(),
            ParseError::BadChunk
        );
        for lenient in [&b"BDAT\t5"[..], b"bdat\xa05", b"BDAT:5"] {
            assert_eq!(parse_command(lenient).unwrap_err(), ParseError::BadChunk);
        }
        assert_eq!(
            parse_command(b"BDATX 1").unwrap_err(),
            ParseError::UnknownCommand
        );
    }

    #[test]
    fn parses_plain_commands() {
        assert_eq!(
            parse_command(b"EHLO client.example").unwrap(),
            Command::Ehlo("client.example".into())
        );
        assert_eq!(
            parse_command(b"helo [192.0.2.1]").unwrap(),
            Command::Helo("[192.0.2.1]".into())
        );
        assert_eq!(parse_command(b"data").unwrap(), Command::Data);
        assert_eq!(parse_command(b"NOOP anything").unwrap(), Command::Noop);
        assert_eq!(
            parse_command(b"DATA now").unwrap_err(),
            ParseError::Syntax("no arguments allowed")
        );
        assert_eq!(
            parse_command(b"EHLO").unwrap_err(),
            ParseError::Syntax("EHLO/HELO hostname")
        );
        assert_eq!(
            parse_command(b"FOO").unwrap_err(),
            ParseError::UnknownCommand
        );
        assert_eq!(parse_command(b"").unwrap_err(), ParseError::UnknownCommand);
        assert!(parse_command("EHLO h\u{e9}".as_bytes()).is_err());
    }

    #[test]
    fn parses_auth() {
        assert_eq!(
            parse_command(b"auth plain AGFsaWNlAHNlY3JldA==").unwrap(),
            Command::Auth {
                mechanism: "PLAIN".into(),
                initial: Some("AGFsaWNlAHNlY3JldA==".into())
            }
        );
        assert_eq!(
            parse_command(b"AUTH LOGIN").unwrap(),
            Command::Auth {
                mechanism: "LOGIN".into(),
                initial: None
            }
        );
        assert!(parse_command(b"AUTH PLAIN =").is_ok());
        assert!(parse_command(b"AUTH SCRAM-SHA-256 biwsbj11c2VyLHI9").is_ok());
        for bad in [
            &b"AUTH"[..],
            b"AUTH PLAIN a b",
            b"AUTH PL@IN",
            b"AUTH PLAIN not*base64",
            b"AUTH PLAIN abc",
            b"AUTH PLAIN a===",
            b"AUTH ABCDEFGHIJKLMNOPQRSTU",
        ] {
            assert!(
                parse_command(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(is_sasl_response("dGVzdA=="));
        assert!(!is_sasl_response("*"));
        assert!(!is_sasl_response(""));
    }

    #[test]
    fn parses_mail_with_params() {
        let cmd = parse_command(b"MAIL FROM:<a@b.example> SIZE=1000 BODY=8BITMIME").unwrap();
        let Command::Mail {
            from: ReversePath::Path(p),
            params,
        } = cmd
        else {
            panic!()
        };
        assert_eq!(p.local_part, "a");
        assert_eq!(
            params,
            MailParams {
                size: Some(1000),
                body_8bit: true,
                ..MailParams::default()
            }
        );
        assert_eq!(
            parse_command(b"mail from: <>").unwrap(),
            Command::Mail {
                from: ReversePath::Null,
                params: MailParams::default()
            }
        );
        assert!(matches!(
            parse_command(b"MAIL FROM:<a@b> SMTPUTF8=yes"),
            Err(ParseError::UnsupportedParameter(_))
        ));
        assert!(matches!(
            parse_command(b"MAIL FROM:<a@b> SIZE=x"),
            Err(ParseError::UnsupportedParameter(_))
        ));
        assert!(matches!(
            parse_command(b"MAIL TO:<a@b>"),
            Err(ParseError::Syntax(_))
        ));
    }

    #[test]
    fn utf8_stays_inside_the_angle_brackets() {
        for line in [
            "RCPT xé",
            "MAIL FROé:<a@b>",
            "RCPT TO:jöran@example.org",
            "MAIL FROM:<a@b>\u{3000}SIZE=1",
            "MAIL FROM:<a@b> ENVID=é",
            "VRFY jöran",
        ] {
            assert!(parse_command(line.as_bytes()).is_err(), "{line:?}");
        }
        assert!(parse_command("RCPT TO:<jöran@example.org>".as_bytes()).is_ok());
        // A bare UTF-8 local part (found by `echoed_text_is_printable`) is a
        // UTF-8 path that is forwarded as written.
        let Ok(Command::Rcpt { to, .. }) = parse_command("RCPT TO:<\u{800}>".as_bytes()) else {
            panic!()
        };
        assert!(to.utf8);
        assert_eq!(to.to_wire(), "\u{800}");
        for control in ["\u{85}", "\u{9b}", "\u{2028}"] {
            let line = format!("RCPT TO:<j{control}ran@example.org>");
            assert!(parse_command(line.as_bytes()).is_err(), "{line:?}");
        }
    }

    #[test]
    fn untrusted_clients_get_no_success_reports_and_headers_only() {
        let Command::Rcpt { mut params, .. } =
            parse_command(b"RCPT TO:<a@example.org> NOTIFY=SUCCESS").unwrap()
        else {
            panic!()
        };
        params.limit_dsn();
        assert_eq!(params.to_wire(), " NOTIFY=NEVER");
        let Command::Mail { mut params, .. } =
            parse_command(b"MAIL FROM:<a@b.example> RET=FULL").unwrap()
        else {
            panic!()
        };
        params.limit_dsn();
        assert_eq!(params.to_wire(), " RET=HDRS");
    }

    #[test]
    fn dsn_parameters_are_parsed_and_rebuilt() {
        let Command::Mail { params, .. } =
            parse_command(b"MAIL FROM:<a@b.example> ret=hdrs ENVID=QQ+2B1").unwrap()
        else {
            panic!()
        };
        assert!(params.uses_dsn());
        assert_eq!(params.to_wire(), " RET=HDRS ENVID=QQ+2B1");
        let Command::Rcpt { params, .. } = parse_command(
            b"RCPT TO:<bob@example.org> notify=failure,delay ORCPT=rfc822;Bob+40Example.org",
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(
            params.to_wire(),
            " NOTIFY=FAILURE,DELAY ORCPT=rfc822;Bob@Example.org"
        );
        for bad in [
            "MAIL FROM:<a@b> RET=ALL",
            "MAIL FROM:<a@b> RET=FULL RET=HDRS",
            "MAIL FROM:<a@b> ENVID=a+0D+0ARCPT",
            "RCPT TO:<a@b> NOTIFY=NEVER,SUCCESS",
            "RCPT TO:<a@b> ORCPT=x400;a",
            "RCPT TO:<a@b> NOTIFY=SUCCESS NOTIFY=DELAY",
        ] {
            assert!(
                matches!(parse_command(bad.as_bytes()), Err(ParseError::Syntax(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_command(b"RCPT TO:<a@b> XFOO=1"),
            Err(ParseError::UnsupportedParameter(_))
        ));
    }

    #[test]
    fn local_parts_are_unquoted_and_unescaped() {
        assert_eq!(
            rcpt(r#"RCPT TO:<"user@victim"@example.org>"#).local_part,
            "user@victim"
        );
        assert_eq!(rcpt(r#"RCPT TO:<"a\%b"@example.org>"#).local_part, "a%b");
        assert_eq!(
            rcpt(r#"RCPT TO:<"with space"@example.org>"#).local_part,
            "with space"
        );
        assert_eq!(
            rcpt("RCPT TO:<user%victim.test@example.org>").local_part,
            "user%victim.test"
        );
        assert_eq!(
            rcpt("RCPT TO:<victim.test!user@example.org>").local_part,
            "victim.test!user"
        );
        let p = rcpt("RCPT TO:<user@victim.test@example.org>");
        assert_eq!(
            (p.local_part.as_str(), p.domain),
            ("user@victim.test", Some(Domain::Name("example.org".into())))
        );
    }

    #[test]
    fn domains_literals_and_routes() {
        assert_eq!(
            rcpt("RCPT TO:<u@EXAMPLE.Org.>").domain,
            Some(Domain::Name("example.org".into()))
        );
        assert_eq!(
            rcpt("RCPT TO:<u@[192.0.2.1]>").domain,
            Some(Domain::Literal("192.0.2.1".parse().unwrap()))
        );
        assert_eq!(
            rcpt("RCPT TO:<u@[ipv6:2001:db8::1]>").domain,
            Some(Domain::Literal("2001:db8::1".parse().unwrap()))
        );
        let p = rcpt("RCPT TO:<@relay.test,@hop.test:user@victim.test>");
        assert_eq!(p.source_route, ["relay.test", "hop.test"]);
        assert_eq!(p.domain, Some(Domain::Name("victim.test".into())));
        assert_eq!(rcpt("RCPT TO:<Postmaster>").domain, None);
        assert_eq!(rcpt("RCPT TO:user@example.org").local_part, "user");
    }

    #[test]
    fn malformed_addresses_are_501() {
        for line in [
            "RCPT TO:<>",
            "RCPT TO:<u@>",
            "RCPT TO:<@x>",
            "RCPT TO:<u@exa mple.org>",
            "RCPT TO:<u@-bad.org>",
            "RCPT TO:<u@a..b>",
            "RCPT TO:<.u@example.org>",
            "RCPT TO:<\"open@example.org>",
            "RCPT TO:<u@[300.1.1.1]>",
            "RCPT TO:<u@[IPv6:zz]>",
            "RCPT TO:<u@example.org",
            "RCPT TO:<u(x)@example.org>",
        ] {
            let err = parse_command(line.as_bytes()).unwrap_err();
            assert!(
                err.reply().starts_with("501 5.1.3") || err.reply().starts_with("501"),
                "{line}: {err}"
            );
        }
        let long = format!("RCPT TO:<{}@example.org>", "a".repeat(65));
        assert!(parse_command(long.as_bytes()).is_err());
        assert!(matches!(
            parse_command(b"RCPT TO:<u@example.org> XNOTIFY=NEVER"),
            Err(ParseError::UnsupportedParameter(_))
        ));
    }
}

#[cfg(test)]
mod hygiene {
    use super::*;

    fn wire(line: &str) -> String {
        match parse_command(line.as_bytes()) {
            Ok(Command::Rcpt { to, .. }) => to.to_wire(),
            Ok(Command::Mail { from, params }) => format!("{}{}", from.to_wire(), params.to_wire()),
            other => panic!("{line:?} gave {other:?}"),
        }
    }

    fn helo(name: &str) -> Result<String, ParseError> {
        match parse_command(format!("EHLO {name}").as_bytes()) {
            Ok(Command::Ehlo(name)) => Ok(name),
            Ok(other) => panic!("{name:?} gave {other:?}"),
            Err(e) => Err(e),
        }
    }

    #[test]
    fn control_bytes_anywhere_in_any_command_are_501_5_5_2() {
        let lines = [
            "MAIL FROM:<a@b.example>",
            "MAIL FROM:<a@[x:ab]>",
            "RCPT TO:<user@example.org>",
            "RCPT TO:<\"a b\"@example.org>",
            "EHLO client.example",
            "HELO client.example",
            "NOOP x",
            "VRFY user",
            "EXPN list",
            "HELP me",
            "DATA",
            "RSET",
            "QUIT",
            "STARTTLS",
            "XYZZY plugh",
        ];
        for line in lines {
            for control in [b'\r', b'\n', 0, 0x1b, 0x7f, b'\t', 0x01, 0x1f] {
                // Inside the verb, after it, inside the argument, at the end.
                for at in [2, 4, line.len() - 1, line.len()] {
                    let mut bytes = line.as_bytes().to_vec();
                    bytes.insert(at, control);
                    let err = parse_command(&bytes).unwrap_err();
                    assert_eq!(err, ParseError::ControlCharacter, "{bytes:?}");
                    assert!(err.reply().starts_with("501 5.5.2 "), "{}", err.reply());
                }
            }
        }
        // The issue's measured injection: CRs inside a general literal.
        let injected = b"MAIL FROM:<a@[x:\"\rMAIL FROM:<>\rRCPT TO:<user@victim.test>\r\"]>";
        assert_eq!(
            parse_command(injected).unwrap_err(),
            ParseError::ControlCharacter
        );
        for spaced in [
            "MAIL FROM:<a@[x:a b]>",
            "MAIL FROM:<a@[x:\" RCPT TO:<v@victim.test> \"]>",
        ] {
            assert!(parse_command(spaced.as_bytes()).is_err(), "{spaced}");
        }
    }

    #[test]
    fn general_literals_follow_rfc5321() {
        for (addr, literal) in [
            ("<u@[x:abc]>", "x:abc"),
            ("<u@[X-400:c=us;a=;p=x]>", "X-400:c=us;a=;p=x"),
            ("<u@[tag:a:b:c]>", "tag:a:b:c"),
            ("<u@[t1:!~^_`{|}]>", "t1:!~^_`{|}"),
            // dcontent may hold what ends a path or splits a mailbox elsewhere.
            ("<u@[x:a@b]>", "x:a@b"),
            ("<u@[x:>]>", "x:>"),
            ("<u@[x:\"]>", "x:\""),
        ] {
            let Ok(Command::Rcpt { to, .. }) = parse_command(format!("RCPT TO:{addr}").as_bytes())
            else {
                panic!("{addr} refused")
            };
            assert_eq!(to.domain, Some(Domain::GeneralLiteral(literal.into())));
            assert_eq!(to.to_wire(), format!("u@[{literal}]"));
        }
        for bad in [
            "[:abc]",
            "[-x:abc]",
            "[x-:abc]",
            "[x_y:abc]",
            "[x:]",
            "[x:a b]",
            "[x:a\\b]",
            "[x:a[b]",
            "[x:a]b]",
            "[x]",
            "[]",
            "[IPv6:x:y]",
            "[ipv6:]",
        ] {
            assert!(parse_domain(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn helo_names_are_realistic_but_must_be_names() {
        for name in [
            "client.example",
            "localhost",
            "DESKTOP-4F2K",
            "my_pc.lan",
            "_gateway",
            "host.example.",
            "192.0.2.1",
            "mail-1.example.org",
        ] {
            assert_eq!(helo(name).as_deref(), Ok(name), "{name}");
        }
        assert_eq!(helo("[192.0.2.1]").unwrap(), "[192.0.2.1]");
        assert_eq!(helo("[IPv6:2001:DB8:0::1]").unwrap(), "[IPv6:2001:db8::1]");
        assert_eq!(helo("[x:y]").unwrap(), "[x:y]");
        assert_eq!(helo("  spaced.example  ").unwrap(), "spaced.example");
        for name in [
            "\"quoted\"",
            "a\"b",
            "host[1]",
            "[192.0.2.1",
            "192.0.2.1]",
            "[300.0.0.1]",
            "[x:a b]",
            "a..b",
            ".a",
            "..",
            "-a",
            "a-.example",
            "user@host",
            "a/b",
            "a,b",
            "a b",
            "a:b",
            "::1",
            "\\host",
        ] {
            assert_eq!(
                helo(name),
                Err(ParseError::Syntax("invalid EHLO/HELO name")),
                "{name}"
            );
        }
        assert!(helo(&format!("{}.example", "a".repeat(64))).is_err());
        assert!(helo(&["a"; 129].join(".")).is_err());
        assert!(helo(&["a"; 128].join(".")).is_ok(), "255 octets");
        assert_eq!(helo(""), Err(ParseError::Syntax("EHLO/HELO hostname")));
    }

    #[test]
    fn paths_are_rendered_canonically() {
        for (line, expected) in [
            (
                "MAIL FROM:<\"a b\"@EXAMPLE.net> BODY=8BITMIME",
                "\"a b\"@example.net BODY=8BITMIME",
            ),
            ("MAIL FROM:<> SIZE=100 BODY=7BIT", " SIZE=100"),
            (
                "mail from: <a@b.example> body=8bitmime size=7",
                "a@b.example SIZE=7 BODY=8BITMIME",
            ),
            (
                "MAIL FROM:<@relay.test,@hop.test:u@b.example>",
                "u@b.example",
            ),
            ("RCPT TO:<User@Example.ORG.>", "User@example.org"),
            ("RCPT TO:user@example.org", "user@example.org"),
            ("RCPT TO:<\"abc\"@x.example>", "abc@x.example"),
            ("RCPT TO:<\"a\\b.c\"@x.example>", "ab.c@x.example"),
            ("RCPT TO:<\"a\\\"b\"@x.example>", "\"a\\\"b\"@x.example"),
            ("RCPT TO:<\"a\\\\b\"@x.example>", "\"a\\\\b\"@x.example"),
            ("RCPT TO:<\"a..b\"@x.example>", "\"a..b\"@x.example"),
            ("RCPT TO:<\".a\"@x.example>", "\".a\"@x.example"),
            ("RCPT TO:<\"\"@x.example>", "\"\"@x.example"),
            ("RCPT TO:<\"a,b\"@x.example>", "\"a,b\"@x.example"),
            (
                "RCPT TO:<user@victim.test@example.org>",
                "\"user@victim.test\"@example.org",
            ),
            (
                "RCPT TO:<user%victim.test@example.org>",
                "user%victim.test@example.org",
            ),
            ("RCPT TO:<u@[IPv6:2001:DB8:0:0::1]>", "u@[IPv6:2001:db8::1]"),
            (
                "RCPT TO:<u@[ipv6:::ffff:192.0.2.1]>",
                "u@[IPv6:::ffff:192.0.2.1]",
            ),
            ("RCPT TO:<u@[192.0.2.1]>", "u@[192.0.2.1]"),
            ("RCPT TO:<Postmaster>", "Postmaster"),
        ] {
            assert_eq!(wire(line), expected, "{line}");
        }
    }

    #[test]
    fn the_local_part_limit_holds_for_what_is_forwarded() {
        // 64 octets as written, 66 once the embedded '@' forces quotes.
        let local = format!("{}@{}", "a".repeat(31), "b".repeat(32));
        let line = format!("RCPT TO:<{local}@example.org>");
        assert_eq!(
            parse_command(line.as_bytes()).unwrap_err(),
            ParseError::BadAddress("local part longer than 64 octets")
        );
        let fits = format!(
            "RCPT TO:<{}@{}@example.org>",
            "a".repeat(30),
            "b".repeat(31)
        );
        assert!(wire(&fits).starts_with('"'));
    }
}

/// Bounded fuzzing inside the normal test suite (the open-ended runs live in `gatekeeper/fuzz`).
#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::super::policy::{RelayPolicy, RelayReason};
    use super::*;

    fn policy() -> RelayPolicy {
        RelayPolicy::new(&["example.org".into()], vec![], vec![])
    }

    /// Printable ASCII, or, in a path that is UTF-8 (only accepted with
    /// SMTPUTF8), any character that is not a control.
    fn printable_char(c: char, utf8: bool) -> bool {
        (' '..='~').contains(&c) || utf8 && !c.is_ascii() && !c.is_control()
    }

    /// `path` as sent upstream: printable, spaces only inside its quoted
    /// local part, and read back as the same mailbox with the same verdict.
    fn check_round_trip(path: &Path) -> Result<(), TestCaseError> {
        let wire = path.to_wire();
        let mut in_quotes = false;
        let mut escaped = false;
        for c in wire.chars() {
            prop_assert!(printable_char(c, path.utf8), "{:?}", wire);
            match c {
                _ if escaped => escaped = false,
                '\\' if in_quotes => escaped = true,
                '"' => in_quotes = !in_quotes,
                ' ' => prop_assert!(in_quotes, "unquoted space in {:?}", wire),
                _ => {}
            }
        }
        let back = parse_path(&format!("<{wire}>"));
        prop_assert!(back.is_ok(), "{:?} -> {:?}: {:?}", path.raw, wire, back);
        let back = back.unwrap();
        prop_assert!(back.source_route.is_empty());
        prop_assert_eq!(&back.local_part, &path.local_part);
        prop_assert_eq!(&back.domain, &path.domain);
        prop_assert_eq!(back.to_wire(), wire.clone(), "rendering is not stable");
        if path.source_route.is_empty() {
            prop_assert_eq!(
                policy().classify(&back),
                policy().classify(path),
                "{:?}",
                wire
            );
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        #[test]
        fn arbitrary_bytes_never_panic(line in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_command(&line);
        }

        #[test]
        fn address_like_text_never_panics(
            verb in "(RCPT TO:|MAIL FROM:|rcpt to: )",
            addr in "[<>\"@%!.\\\\a-zA-Z0-9:\\[\\], =-]{0,90}",
        ) {
            if let Ok(Command::Rcpt { to, .. }) = parse_command(format!("{verb}{addr}").as_bytes()) {
                let _ = policy().classify(&to);
            }
        }

        /// Whatever the spelling, a local part carrying a routing character at
        /// our own domain is never judged local.
        #[test]
        fn routing_characters_are_never_local(
            left in "[a-z0-9.]{1,10}",
            special in "[@%!]",
            right in "[a-z0-9]{1,10}",
            quoted in any::<bool>(),
            domain in "(example\\.org|EXAMPLE\\.ORG|example\\.org\\.)",
        ) {
            let local = format!("{left}{special}{right}");
            let addr = if quoted { format!("<\"{local}\"@{domain}>") } else { format!("<{local}@{domain}>") };
            if let Ok(Command::Rcpt { to, .. }) = parse_command(format!("RCPT TO:{addr}").as_bytes()) {
                let reason = policy().classify(&to);
                prop_assert!(matches!(
                    reason,
                    Some(RelayReason::EmbeddedAt | RelayReason::PercentHack | RelayReason::BangPath)
                ), "{addr} judged {reason:?}");
            }
        }

        /// Whatever parses, the text sent upstream parses back to the same
        /// mailbox, is judged the same, and is printable with spaces only
        /// inside quotes.
        #[test]
        fn rendered_paths_parse_back_the_same(
            verb in "(RCPT TO:|MAIL FROM:)",
            addr in "[<>\"@%!.\\\\a-zA-Z0-9:\\[\\], =_-]{0,90}",
        ) {
            let path = match parse_command(format!("{verb}{addr}").as_bytes()) {
                Ok(Command::Rcpt { to, .. }) | Ok(Command::Mail { from: ReversePath::Path(to), .. }) => to,
                _ => return Ok(()),
            };
            check_round_trip(&path)?;
        }

        /// Any printable local part, quoted and escaped as a client may,
        /// at any domain form.
        #[test]
        fn quoted_local_parts_round_trip(
            local in "[ -~]{0,40}",
            escape_all in any::<bool>(),
            domain in "(EXAMPLE\\.org\\.?|[a-z0-9]{1,8}(\\.[a-z0-9]([a-z0-9-]{0,5}[a-z0-9])?)?|\\[192\\.0\\.2\\.([0-9]|[1-9][0-9])\\]|\\[IPv6:2001:DB8(:0){0,3}::[0-9a-f]{1,4}\\]|\\[[a-z][a-z0-9-]{0,4}[a-z0-9]:[!-Z^-~]{1,12}\\])",
        ) {
            let mut quoted = String::from("\"");
            for c in local.chars() {
                if escape_all || c == '"' || c == '\\' {
                    quoted.push('\\');
                }
                quoted.push(c);
            }
            quoted.push('"');
            let line = format!("RCPT TO:<{quoted}@{domain}>");
            match parse_command(line.as_bytes()) {
                Ok(Command::Rcpt { to, .. }) => {
                    prop_assert_eq!(&to.local_part, &local);
                    check_round_trip(&to)?;
                }
                // Only the 64-octet limit (as written or as sent) may refuse it.
                Err(e) => prop_assert_eq!(e, ParseError::BadAddress("local part longer than 64 octets"), "{}", line),
                Ok(other) => prop_assert!(false, "{:?}", other),
            }
        }

        /// A control byte anywhere in an otherwise valid command is 501 5.5.2.
        #[test]
        fn control_bytes_are_always_refused(
            line in "(MAIL FROM:<a@b.example> SIZE=10|RCPT TO:<\"a b\"@example.org>|EHLO client.example|NOOP|VRFY x)",
            control in prop_oneof![0u8..0x20, Just(0x7f)],
            at in any::<prop::sample::Index>(),
        ) {
            let mut bytes = line.into_bytes();
            bytes.insert(at.index(bytes.len() + 1), control);
            prop_assert_eq!(parse_command(&bytes), Err(ParseError::ControlCharacter));
        }

        /// What a reply may echo (`raw`) and the canonical HELO name never
        /// carry control bytes, whatever the input.
        #[test]
        fn echoed_text_is_printable(line in proptest::collection::vec(any::<u8>(), 0..100), prefix in "(RCPT TO:<|MAIL FROM:<|EHLO |HELO \\[)") {
            let mut bytes = prefix.into_bytes();
            bytes.extend(line);
            let printable = |text: &str| text.bytes().all(|b| (0x20..0x7f).contains(&b));
            match parse_command(&bytes) {
                Ok(Command::Rcpt { to, .. }) | Ok(Command::Mail { from: ReversePath::Path(to), .. }) => {
                    prop_assert_eq!(to.utf8, !to.raw.is_ascii());
                    prop_assert!(to.raw.chars().all(|c| printable_char(c, to.utf8)), "{:?}", to.raw);
                    check_round_trip(&to)?;
                }
                Ok(Command::Ehlo(name) | Command::Helo(name)) => {
                    prop_assert!(printable(&name) && !name.contains(' '));
                    prop_assert_eq!(parse_helo_name(&name), Ok(name.clone()));
                }
                _ => {}
            }
        }

        /// Plain mailboxes at our domain are local in any case spelling.
        #[test]
        fn plain_local_mailboxes_are_local(local in "[a-zA-Z0-9][a-zA-Z0-9_+-]{0,20}", upper in any::<bool>()) {
            let domain = if upper { "EXAMPLE.ORG" } else { "example.org" };
            let parsed = parse_command(format!("RCPT TO:<{local}@{domain}>").as_bytes());
            let Ok(Command::Rcpt { to, .. }) = parsed else { panic!("{local}: {parsed:?}") };
            prop_assert_eq!(policy().classify(&to), None);
        }
    }
}
