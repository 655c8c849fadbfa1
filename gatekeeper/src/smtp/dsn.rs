//! Delivery status notification parameters (RFC 3461): parsed into values
//! and rendered again from them, so nothing the client wrote is forwarded
//! raw. Pure.

use super::parse::ParseError;

/// `RET=`: how much of the message a failure report returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ret {
    Full,
    Hdrs,
}

/// `NOTIFY=`: `NEVER`, or any of SUCCESS, FAILURE, DELAY.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Notify {
    pub never: bool,
    pub success: bool,
    pub failure: bool,
    pub delay: bool,
}

/// `ORCPT=addr-type;xtext`: the original recipient, decoded. It names who
/// the client first addressed, never where the mail goes: the relay
/// decision does not look at it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orcpt {
    /// Lower-cased: `rfc822` (or `utf-8` with SMTPUTF8).
    pub addr_type: String,
    pub address: String,
}

/// RFC 3461 section 4.4: ENVID at most 100 characters (encoded).
const MAX_ENVID: usize = 100;
/// Section 4.2: ORCPT's address at most 500 characters (encoded).
const MAX_ORCPT: usize = 500;

pub fn parse_ret(value: &str) -> Result<Ret, ParseError> {
    match value.to_ascii_uppercase().as_str() {
        "FULL" => Ok(Ret::Full),
        "HDRS" => Ok(Ret::Hdrs),
        _ => Err(ParseError::Syntax("RET=FULL or RET=HDRS")),
    }
}

/// ENVID's decoded value: printable ASCII, within the length limit.
pub fn parse_envid(value: &str) -> Result<String, ParseError> {
    if value.is_empty() || value.len() > MAX_ENVID {
        return Err(ParseError::Syntax("ENVID=<xtext> of 1 to 100 characters"));
    }
    decode_xtext(value).ok_or(ParseError::Syntax("ENVID=<xtext>"))
}

pub fn parse_notify(value: &str) -> Result<Notify, ParseError> {
    let bad = ParseError::Syntax("NOTIFY=NEVER or a list of SUCCESS,FAILURE,DELAY");
    let mut notify = Notify::default();
    for word in value.split(',') {
        let flag = match word.to_ascii_uppercase().as_str() {
            "NEVER" => &mut notify.never,
            "SUCCESS" => &mut notify.success,
            "FAILURE" => &mut notify.failure,
            "DELAY" => &mut notify.delay,
            _ => return Err(bad),
        };
        if *flag {
            return Err(bad);
        }
        *flag = true;
    }
    if notify.never && (notify.success || notify.failure || notify.delay) {
        return Err(bad);
    }
    Ok(notify)
}

/// `utf8` allows the `utf-8` address type (RFC 6533), only in an SMTPUTF8
/// transaction.
pub fn parse_orcpt(value: &str, utf8: bool) -> Result<Orcpt, ParseError> {
    let bad = ParseError::Syntax("ORCPT=rfc822;<xtext address>");
    if value.len() > MAX_ORCPT + 10 {
        return Err(bad);
    }
    let (addr_type, encoded) = value.split_once(';').ok_or(bad.clone())?;
    let addr_type = addr_type.to_ascii_lowercase();
    if !(addr_type == "rfc822" || (utf8 && addr_type == "utf-8"))
        || encoded.is_empty()
        || encoded.len() > MAX_ORCPT
    {
        return Err(bad);
    }
    let address = decode_xtext(encoded).ok_or(bad)?;
    Ok(Orcpt { addr_type, address })
}

/// xtext (RFC 3461 section 4): `+XX` hex escapes, everything else printable
/// ASCII other than `+` and `=`. The decoded text must be printable ASCII
/// too (a decoded CR or LF would be a header injection in the DSN).
pub fn decode_xtext(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let decoded = if b == b'+' {
            let hex = text.get(i + 1..i + 3)?;
            if !hex
                .bytes()
                .all(|h| h.is_ascii_digit() || (b'A'..=b'F').contains(&h))
            {
                return None;
            }
            i += 3;
            u8::from_str_radix(hex, 16).ok()?
        } else if (b'!'..=b'~').contains(&b) && b != b'=' {
            i += 1;
            b
        } else {
            return None;
        };
        if !(b' '..=b'~').contains(&decoded) {
            return None;
        }
        out.push(decoded as char);
    }
    Some(out)
}

/// The canonical xtext of printable ASCII: `+`, `=`, space and anything
/// outside `!`..`~` escaped.
pub fn encode_xtext(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

impl Ret {
    pub fn to_wire(self) -> &'static str {
        match self {
            Ret::Full => "FULL",
            Ret::Hdrs => "HDRS",
        }
    }
}

impl Notify {
    pub fn to_wire(self) -> String {
        if self.never {
            return "NEVER".into();
        }
        [
            (self.success, "SUCCESS"),
            (self.failure, "FAILURE"),
            (self.delay, "DELAY"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, word)| *word)
        .collect::<Vec<_>>()
        .join(",")
    }
}

impl Orcpt {
    pub fn to_wire(&self) -> String {
        format!("{};{}", self.addr_type, encode_xtext(&self.address))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xtext_round_trips_and_refuses_injection() {
        assert_eq!(decode_xtext("a+2Bb+3Dc").as_deref(), Some("a+b=c"));
        assert_eq!(encode_xtext("a+b=c d"), "a+2Bb+3Dc+20d");
        for bad in ["a+0D+0Ab", "a+0a", "a+G0", "a+2", "a=b", "a b", "é"] {
            assert_eq!(decode_xtext(bad), None, "{bad:?}");
        }
        let text = "x+y=z <a@b> \"q\"";
        assert_eq!(decode_xtext(&encode_xtext(text)).as_deref(), Some(text));
    }

    #[test]
    fn notify_is_never_alone_or_a_set() {
        assert_eq!(parse_notify("never").unwrap().to_wire(), "NEVER");
        assert_eq!(
            parse_notify("DELAY,success").unwrap().to_wire(),
            "SUCCESS,DELAY"
        );
        for bad in [
            "",
            "NEVER,SUCCESS",
            "SUCCESS,SUCCESS",
            "SOMETIMES",
            "SUCCESS,",
        ] {
            assert!(parse_notify(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ret_envid_orcpt() {
        assert_eq!(parse_ret("hdrs").unwrap(), Ret::Hdrs);
        assert!(parse_ret("ALL").is_err());
        assert_eq!(parse_envid("QQ314159+2B1").unwrap(), "QQ314159+1");
        assert!(parse_envid(&"x".repeat(101)).is_err());
        let orcpt = parse_orcpt("RFC822;bob+40example.org", false).unwrap();
        assert_eq!(orcpt.address, "bob@example.org");
        assert_eq!(orcpt.to_wire(), "rfc822;bob@example.org");
        assert!(parse_orcpt("utf-8;bob@example.org", false).is_err());
        assert!(parse_orcpt("utf-8;bob@example.org", true).is_ok());
        assert!(parse_orcpt("x400;bob", false).is_err());
        assert!(parse_orcpt("rfc822;", false).is_err());
        assert!(parse_orcpt("rfc822;a+0D+0ARCPT", false).is_err());
    }
}
