//! The fleet's wire format: one JSON object per stream entry and per
//! snapshot field. Whatever can write to Redis can write here, so decoding
//! is a pure function that judges every field and never trusts a peer.

use std::fmt;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::lists::prefix::parse_prefix;
use crate::lists::ttl::MAX_TTL_SECS;
use crate::lists::ListKind;

/// Longest reason a peer may attach; longer ones are refused, not cut.
pub const MAX_REASON_BYTES: usize = 256;
/// Longest node name (`node_name`, and a peer's `origin`).
pub const MAX_ORIGIN_BYTES: usize = 64;
/// The broadest prefix the fleet may drop: a verdict wider than this is
/// refused, so one bad write to Redis cannot blackhole the Internet.
pub const MIN_PREFIX_V4: u8 = 8;
pub const MIN_PREFIX_V6: u8 = 16;

/// What kind of verdict a host took; it decides the list it lands in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VerdictKind {
    /// A DNSBL listing of one address.
    Dnsbl,
    /// An auto-ban (client or its /64).
    Ban,
    /// `deny add --share`.
    Deny,
    /// `allow add --share`.
    Allow,
}

impl VerdictKind {
    pub const ALL: [VerdictKind; 4] = [
        VerdictKind::Dnsbl,
        VerdictKind::Ban,
        VerdictKind::Deny,
        VerdictKind::Allow,
    ];

    pub fn name(self) -> &'static str {
        match self {
            VerdictKind::Dnsbl => "dnsbl",
            VerdictKind::Ban => "ban",
            VerdictKind::Deny => "deny",
            VerdictKind::Allow => "allow",
        }
    }

    /// The list a received verdict is applied to.
    pub fn list(self) -> ListKind {
        match self {
            VerdictKind::Allow => ListKind::Allow,
            VerdictKind::Dnsbl | VerdictKind::Ban | VerdictKind::Deny => ListKind::Deny,
        }
    }

    /// Kinds that must carry an expiry (they are never permanent locally either).
    fn must_expire(self) -> bool {
        matches!(self, VerdictKind::Dnsbl | VerdictKind::Ban)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Add,
    /// Withdraws the fleet's claim on a prefix (only shared entries go).
    Del,
}

/// One verdict as the fleet carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub op: Op,
    pub kind: VerdictKind,
    pub net: IpNet,
    /// Unix seconds; none = permanent (only `deny`/`allow`).
    pub expires: Option<u64>,
    /// The node that took it.
    pub origin: String,
    pub reason: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct WireVerdict {
    op: Op,
    kind: VerdictKind,
    prefix: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires: Option<u64>,
    origin: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

/// Why a received verdict was not applied; `label` is the metric's `reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Not JSON, or not the shape above.
    Malformed(String),
    /// Not a canonical, listable prefix, or one broader than the fleet may drop.
    Prefix(String),
    /// Missing where required, or beyond the longest TTL.
    Expiry(String),
    /// Ran out before it arrived (not an error: a late delivery).
    Expired,
    Origin,
    Reason,
}

impl Refused {
    pub const LABELS: [&'static str; 6] = [
        "malformed",
        "prefix",
        "expiry",
        "expired",
        "origin",
        "reason",
    ];

    pub fn label(&self) -> &'static str {
        match self {
            Refused::Malformed(_) => "malformed",
            Refused::Prefix(_) => "prefix",
            Refused::Expiry(_) => "expiry",
            Refused::Expired => "expired",
            Refused::Origin => "origin",
            Refused::Reason => "reason",
        }
    }
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refused::Malformed(e) => write!(f, "malformed: {e}"),
            Refused::Prefix(e) => write!(f, "prefix: {e}"),
            Refused::Expiry(e) => write!(f, "expiry: {e}"),
            Refused::Expired => f.write_str("expired before it arrived"),
            Refused::Origin => f.write_str("origin: not a node name"),
            Refused::Reason => f.write_str("reason: too long or has control characters"),
        }
    }
}

/// Whether `name` may name a node: `[A-Za-z0-9._-]{1,64}`.
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_ORIGIN_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn valid_reason(reason: &str) -> bool {
    reason.len() <= MAX_REASON_BYTES && !reason.chars().any(char::is_control)
}

/// The snapshot hash's field for a verdict: one live claim per kind and prefix.
pub fn snapshot_field(kind: VerdictKind, net: &IpNet) -> String {
    format!("{}|{net}", kind.name())
}

impl Verdict {
    pub fn encode(&self) -> String {
        let wire = WireVerdict {
            op: self.op,
            kind: self.kind,
            prefix: self.net.to_string(),
            expires: self.expires,
            origin: self.origin.clone(),
            reason: self.reason.clone(),
        };
        serde_json::to_string(&wire).expect("a verdict always serialises")
    }

    /// Decodes and judges one verdict received at `now` (unix seconds).
    pub fn decode(bytes: &[u8], now: u64) -> Result<Verdict, Refused> {
        let wire: WireVerdict =
            serde_json::from_slice(bytes).map_err(|e| Refused::Malformed(e.to_string()))?;
        let net = parse_prefix(&wire.prefix).map_err(|e| Refused::Prefix(e.to_string()))?;
        check_breadth(wire.kind, &net)?;
        if !valid_node_name(&wire.origin) {
            return Err(Refused::Origin);
        }
        if wire.reason.as_deref().is_some_and(|r| !valid_reason(r)) {
            return Err(Refused::Reason);
        }
        let verdict = Verdict {
            op: wire.op,
            kind: wire.kind,
            net,
            expires: wire.expires,
            origin: wire.origin,
            reason: wire.reason,
        };
        if verdict.op == Op::Add {
            verdict.check_expiry(now)?;
        }
        Ok(verdict)
    }

    /// An add must expire in (now, now + the longest TTL]; DNSBL listings and
    /// bans must expire at all.
    fn check_expiry(&self, now: u64) -> Result<(), Refused> {
        match self.expires {
            None if self.kind.must_expire() => Err(Refused::Expiry(format!(
                "a {} verdict must carry an expiry",
                self.kind.name()
            ))),
            None => Ok(()),
            Some(at) if at <= now => Err(Refused::Expired),
            Some(at) if at - now > MAX_TTL_SECS => Err(Refused::Expiry(format!(
                "{at} is more than {MAX_TTL_SECS} s away"
            ))),
            Some(_) => Ok(()),
        }
    }
}

pub fn check_breadth(kind: VerdictKind, net: &IpNet) -> Result<(), Refused> {
    let (len, max, min) = match net {
        IpNet::V4(n) => (n.prefix_len(), 32, MIN_PREFIX_V4),
        IpNet::V6(n) => (n.prefix_len(), 128, MIN_PREFIX_V6),
    };
    if kind == VerdictKind::Dnsbl && len != max {
        return Err(Refused::Prefix(format!(
            "a DNSBL verdict names one address, not {net}"
        )));
    }
    if len < min {
        return Err(Refused::Prefix(format!(
            "{net} is broader than the fleet may share (/{min} at most)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: u64 = 1_800_000_000;

    fn add(kind: VerdictKind, prefix: &str, expires: Option<u64>) -> Verdict {
        Verdict {
            op: Op::Add,
            kind,
            net: prefix.parse().unwrap(),
            expires,
            origin: "edge-a".into(),
            reason: Some("zen.example".into()),
        }
    }

    #[test]
    fn verdicts_round_trip() {
        for verdict in [
            add(VerdictKind::Dnsbl, "192.0.2.7/32", Some(NOW + 60)),
            add(VerdictKind::Ban, "2001:db8:1:2::/64", Some(NOW + 3600)),
            add(VerdictKind::Deny, "198.51.100.0/24", None),
            Verdict {
                op: Op::Del,
                reason: None,
                ..add(VerdictKind::Allow, "203.0.113.9/32", None)
            },
        ] {
            let back = Verdict::decode(verdict.encode().as_bytes(), NOW).unwrap();
            assert_eq!(back, verdict);
        }
    }

    fn refused(json: &str) -> &'static str {
        Verdict::decode(json.as_bytes(), NOW).unwrap_err().label()
    }

    #[test]
    fn bad_verdicts_are_refused_with_their_reason() {
        assert_eq!(refused("garbage"), "malformed");
        assert_eq!(
            refused(r#"{"op":"add","kind":"worm","prefix":"192.0.2.1","origin":"a"}"#),
            "malformed"
        );
        let base = |prefix: &str, kind: &str, expires: &str, origin: &str, reason: &str| {
            format!(
                r#"{{"op":"add","kind":"{kind}","prefix":"{prefix}","origin":"{origin}"{expires}{reason}}}"#
            )
        };
        let soon = format!(r#","expires":{}"#, NOW + 60);
        let ok = base("192.0.2.1", "dnsbl", &soon, "a", "");
        assert!(Verdict::decode(ok.as_bytes(), NOW).is_ok());
        assert_eq!(
            refused(&base("192.0.2.1/24", "deny", &soon, "a", "")),
            "prefix"
        );
        assert_eq!(
            refused(&base("192.0.2.0/24", "dnsbl", &soon, "a", "")),
            "prefix"
        );
        assert_eq!(
            refused(&base("0.0.0.0/0", "deny", &soon, "a", "")),
            "prefix"
        );
        assert_eq!(
            refused(&base("::ffff:192.0.2.1", "ban", &soon, "a", "")),
            "prefix"
        );
        assert_eq!(refused(&base("192.0.2.1", "dnsbl", "", "a", "")), "expiry");
        let absurd = format!(r#","expires":{}"#, u64::MAX);
        assert_eq!(
            refused(&base("192.0.2.1", "ban", &absurd, "a", "")),
            "expiry"
        );
        let past = format!(r#","expires":{}"#, NOW - 1);
        assert_eq!(
            refused(&base("192.0.2.1", "ban", &past, "a", "")),
            "expired"
        );
        assert_eq!(
            refused(&base("192.0.2.1", "ban", &soon, "a b", "")),
            "origin"
        );
        assert_eq!(refused(&base("192.0.2.1", "ban", &soon, "", "")), "origin");
        let control = r#","reason":"x\u001b[2J""#;
        assert_eq!(
            refused(&base("192.0.2.1", "ban", &soon, "a", control)),
            "reason"
        );
        let long = format!(r#","reason":"{}""#, "x".repeat(MAX_REASON_BYTES + 1));
        assert_eq!(
            refused(&base("192.0.2.1", "ban", &soon, "a", &long)),
            "reason"
        );
    }

    #[test]
    fn a_withdrawal_needs_no_expiry() {
        let del = r#"{"op":"del","kind":"deny","prefix":"198.51.100.0/24","origin":"c"}"#;
        let verdict = Verdict::decode(del.as_bytes(), NOW).unwrap();
        assert_eq!((verdict.op, verdict.expires), (Op::Del, None));
    }

    proptest! {
        #[test]
        fn decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Verdict::decode(&bytes, NOW);
        }

        #[test]
        fn decoded_adds_always_lie_in_the_window(
            kind in prop::sample::select(VerdictKind::ALL.to_vec()),
            addr in any::<u32>(),
            len in 0u8..=32,
            expires in proptest::option::of(any::<u64>()),
        ) {
            let net = ipnet::Ipv4Net::new(addr.into(), len).unwrap().trunc();
            let json = serde_json::json!({
                "op": "add", "kind": kind, "prefix": net.to_string(),
                "expires": expires, "origin": "n1",
            });
            if let Ok(v) = Verdict::decode(json.to_string().as_bytes(), NOW) {
                prop_assert!(v.net.prefix_len() >= MIN_PREFIX_V4);
                match v.expires {
                    Some(at) => prop_assert!(at > NOW && at - NOW <= MAX_TTL_SECS),
                    None => prop_assert!(!kind.must_expire()),
                }
            }
        }
    }
}
