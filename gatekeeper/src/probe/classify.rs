//! What a reply means for a relay case, and what the cases add up to. Pure:
//! no I/O, so every rule is unit-tested.

use serde::Serialize;

use crate::smtp::reply::Reply;

/// How one case ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// 5xx to MAIL or RCPT.
    Refused,
    /// 4xx: not a refusal, the server may take it on a retry.
    Deferred,
    /// 2xx to RCPT: the server took responsibility for the recipient.
    Accepted,
    /// No usable answer: connection failure, timeout, garbled or 3xx reply.
    Error,
}

/// Where in the session the outcome was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Connect,
    Greeting,
    Ehlo,
    Starttls,
    Mail,
    Rcpt,
}

/// A reply to MAIL or RCPT. A 3xx there is no acceptance, and no refusal either.
pub fn classify(reply: &Reply) -> Outcome {
    match reply.code / 100 {
        2 => Outcome::Accepted,
        4 => Outcome::Deferred,
        5 => Outcome::Refused,
        _ => Outcome::Error,
    }
}

/// A refusal for the recipient domain's existence (RFC 3463 X.1.2 bad
/// destination system, X.1.10 null MX): says nothing about relaying.
pub fn refuses_the_domain(reply: &Reply) -> bool {
    let Some(first) = reply.lines.first() else {
        return false;
    };
    let status = first.split_whitespace().next().unwrap_or("");
    let mut parts = status.split('.');
    matches!(
        (parts.next(), parts.next(), parts.next(), parts.next()),
        (Some("4" | "5"), Some("1"), Some("2" | "10"), None)
    )
}

/// MAIL decides unless it was accepted; then RCPT does.
pub fn transaction(mail: &Reply, rcpt: Option<&Reply>) -> (Outcome, Stage) {
    match (classify(mail), rcpt) {
        (Outcome::Accepted, Some(rcpt)) => (classify(rcpt), Stage::Rcpt),
        (Outcome::Accepted, None) => (Outcome::Error, Stage::Rcpt),
        (outcome, _) => (outcome, Stage::Mail),
    }
}

/// What the run shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// The control was accepted and every relay case refused.
    Closed,
    /// At least one relay case was accepted at RCPT.
    Open,
    /// Nothing can be concluded: the control was not accepted, some case
    /// got no usable answer, or some case was deferred (a deferral is not a
    /// pass: the server may accept it on a retry).
    Untestable,
}

impl Verdict {
    /// 0 closed, 1 open, 2 could not test.
    pub fn exit_code(self) -> u8 {
        match self {
            Verdict::Closed => 0,
            Verdict::Open => 1,
            Verdict::Untestable => 2,
        }
    }
}

/// An accepted relay case makes the server open whatever else happened (even
/// with a failed control: the acceptance is the finding).
pub fn verdict(control: Outcome, cases: &[Outcome]) -> Verdict {
    if cases.contains(&Outcome::Accepted) {
        Verdict::Open
    } else if control != Outcome::Accepted
        || cases.is_empty()
        || cases
            .iter()
            .any(|c| matches!(c, Outcome::Deferred | Outcome::Error))
    {
        Verdict::Untestable
    } else {
        Verdict::Closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Outcome::*;

    fn reply(code: u16) -> Reply {
        Reply::new(code, "x")
    }

    #[test]
    fn reply_classes() {
        assert_eq!(classify(&reply(250)), Accepted);
        assert_eq!(classify(&reply(251)), Accepted);
        assert_eq!(classify(&reply(450)), Deferred);
        assert_eq!(classify(&reply(554)), Refused);
        assert_eq!(classify(&reply(354)), Error, "3xx to RCPT is no acceptance");
    }

    #[test]
    fn domain_existence_refusals_are_told_apart() {
        assert!(refuses_the_domain(&Reply::new(
            550,
            "5.1.2 Domain not found"
        )));
        assert!(refuses_the_domain(&Reply::new(
            450,
            "4.1.2 <x@y>: Recipient address rejected: Domain not found"
        )));
        assert!(refuses_the_domain(&Reply::new(556, "5.1.10 null MX")));
        assert!(!refuses_the_domain(&Reply::new(
            554,
            "5.7.1 Relay access denied"
        )));
        assert!(!refuses_the_domain(&Reply::new(550, "5.1.20 x")));
        assert!(!refuses_the_domain(&Reply::new(550, "relay denied")));
    }

    #[test]
    fn mail_decides_unless_accepted() {
        assert_eq!(
            transaction(&reply(553), Some(&reply(250))),
            (Refused, Stage::Mail)
        );
        assert_eq!(transaction(&reply(421), None), (Deferred, Stage::Mail));
        assert_eq!(
            transaction(&reply(250), Some(&reply(554))),
            (Refused, Stage::Rcpt)
        );
        assert_eq!(
            transaction(&reply(250), Some(&reply(250))),
            (Accepted, Stage::Rcpt)
        );
        assert_eq!(transaction(&reply(250), None), (Error, Stage::Rcpt));
    }

    #[test]
    fn verdicts() {
        assert_eq!(verdict(Accepted, &[Refused, Refused]), Verdict::Closed);
        assert_eq!(verdict(Accepted, &[Refused, Accepted]), Verdict::Open);
        assert_eq!(verdict(Refused, &[Accepted]), Verdict::Open);
        assert_eq!(verdict(Refused, &[Refused]), Verdict::Untestable);
        assert_eq!(verdict(Deferred, &[Refused]), Verdict::Untestable);
        assert_eq!(verdict(Accepted, &[Refused, Deferred]), Verdict::Untestable);
        assert_eq!(verdict(Accepted, &[Error]), Verdict::Untestable);
        assert_eq!(
            verdict(Accepted, &[]),
            Verdict::Untestable,
            "nothing tested"
        );
        assert_eq!(Verdict::Closed.exit_code(), 0);
        assert_eq!(Verdict::Open.exit_code(), 1);
        assert_eq!(Verdict::Untestable.exit_code(), 2);
    }
}
