//! `--smuggling`: which line and end-of-data forms the server takes. Each
//! form gets its own session to the local recipient: the body is sent, then
//! the form, then the probe waits. A reply means the form ended the data; a
//! silence means it did not, and the connection is dropped so the server
//! discards the half-sent message. A server that takes only `<CRLF>.<CRLF>`
//! therefore receives exactly one (harmless) message: the control's.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::corpus::Target;
use super::session::{Session, Settings};
use crate::smtp::reply::Reply;

/// The forms, the standard one first (it calibrates the wait).
const FORMS: &[(&str, &[u8])] = &[
    ("<CR><LF>.<CR><LF>", b"\r\n.\r\n"),
    ("<LF>.<LF>", b"\n.\n"),
    ("<CR><LF>.<LF>", b"\r\n.\n"),
    ("<LF>.<CR><LF>", b"\n.\r\n"),
];

/// How long a silence must last to mean "not end of data": many times the
/// standard form's answer, never under two seconds, never over the timeout.
fn quiet_wait(standard: Duration, timeout: Duration) -> Duration {
    (standard * 20).max(Duration::from_secs(2)).min(timeout)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FormResult {
    /// Answered 2xx: the server ended the message there.
    Taken,
    /// Answered 4xx/5xx right there: the server saw the form and refused it.
    Refused,
    /// No answer within the wait: the form is data to this server.
    NotTaken,
    /// The session failed before the form could be sent.
    Error,
}

#[derive(Debug, Clone, Serialize)]
pub struct FormReport {
    pub form: String,
    pub result: FormResult,
    pub reply: Option<super::WireReply>,
    pub error: Option<String>,
    pub transcript: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SmugglingReport {
    /// Whether `NOOP<LF>` (no CR) was answered as a command.
    pub bare_lf_commands: FormResult,
    pub forms: Vec<FormReport>,
    /// The non-standard forms the server took as end of data.
    pub taken: Vec<String>,
    pub wait_ms: u64,
}

impl SmugglingReport {
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if !self.taken.is_empty() {
            warnings.push(format!(
                "the server took {} as end of data: if the MTA behind or in front of it \
                 disagrees, mail can be smuggled past its checks",
                self.taken.join(", ")
            ));
        }
        if self
            .forms
            .first()
            .is_some_and(|f| f.result != FormResult::Taken)
        {
            warnings.push(
                "--smuggling: the standard <CR><LF>.<CR><LF> was not answered with 2xx, \
                 so the other forms' results are not conclusive"
                    .into(),
            );
        }
        warnings
    }
}

pub fn run(settings: &Settings, target: &Target) -> SmugglingReport {
    let mut forms = Vec::new();
    let mut wait = settings.timeout;
    for (index, (name, form)) in FORMS.iter().enumerate() {
        let report = try_form(settings, target, name, form, wait, index == 0);
        if index == 0 {
            wait = quiet_wait(report.1, settings.timeout);
        }
        forms.push(report.0);
    }
    let taken = forms
        .iter()
        .skip(1)
        .filter(|f| f.result == FormResult::Taken)
        .map(|f| f.form.clone())
        .collect();
    SmugglingReport {
        bare_lf_commands: bare_lf_commands(settings, wait),
        forms,
        taken,
        wait_ms: wait.as_millis() as u64,
    }
}

/// The form's report and how long its answer took.
fn try_form(
    settings: &Settings,
    target: &Target,
    name: &str,
    form: &[u8],
    wait: Duration,
    standard: bool,
) -> (FormReport, Duration) {
    let mut report = FormReport {
        form: name.to_owned(),
        result: FormResult::Error,
        reply: None,
        error: None,
        transcript: Vec::new(),
    };
    let mut session = match Session::connect(settings) {
        Ok(s) => s,
        Err(f) => {
            report.error = Some(f.message);
            return (report, Duration::ZERO);
        }
    };
    if let Err(f) = session.handshake(settings) {
        report.error = Some(f.message);
        report.transcript = session.abandon();
        return (report, Duration::ZERO);
    }
    let sender = &target.sender;
    let recipient = format!("{}@{}", target.user, target.local_domain);
    let steps = [
        (format!("MAIL FROM:<{sender}>"), 2),
        (format!("RCPT TO:<{recipient}>"), 2),
        ("DATA".to_owned(), 3),
    ];
    for (command, class) in steps {
        match session.command(&command) {
            Ok(reply) if reply.code / 100 == class => {}
            Ok(reply) => {
                report.error = Some(format!("{command} answered {}", reply.code));
                report.reply = Some((&reply).into());
                report.transcript = session.finish();
                return (report, Duration::ZERO);
            }
            Err(e) => {
                report.error = Some(session.failure(super::Stage::Mail, e).message);
                report.transcript = session.abandon();
                return (report, Duration::ZERO);
            }
        }
    }
    let body = format!(
        "From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: gatekeeper probe: end-of-data test {name}\r\n\r\n\
         This message was sent by `gatekeeper probe --smuggling` to learn which end-of-data\r\n\
         forms this server takes. It can be deleted."
    );
    let mut payload = body.into_bytes();
    payload.extend_from_slice(form);
    if session.send_raw(&payload).is_err() {
        report.error = Some("sending the message failed".into());
        report.transcript = session.abandon();
        return (report, Duration::ZERO);
    }
    let sent = Instant::now();
    let answer = session.reply_within(if standard { settings.timeout } else { wait });
    let took = sent.elapsed();
    report.result = match &answer {
        Ok(reply) if reply.is_success() => FormResult::Taken,
        Ok(_) => FormResult::Refused,
        Err(None) => FormResult::NotTaken,
        Err(Some(_)) => FormResult::Refused,
    };
    match answer {
        Ok(reply) => {
            report.reply = Some((&reply).into());
            report.transcript = session.finish();
        }
        Err(e) => {
            // A closed connection right after the form is a refusal too.
            report.error = e;
            report.transcript = session.abandon();
        }
    }
    (report, took)
}

fn bare_lf_commands(settings: &Settings, wait: Duration) -> FormResult {
    let Ok(mut session) = Session::connect(settings) else {
        return FormResult::Error;
    };
    if session.handshake(settings).is_err() || session.send_raw(b"NOOP\n").is_err() {
        return FormResult::Error;
    }
    let result = match session.reply_within(wait) {
        Ok(Reply { code, .. }) if code / 100 == 2 => FormResult::Taken,
        Ok(_) | Err(Some(_)) => FormResult::Refused,
        Err(None) => FormResult::NotTaken,
    };
    let _ = session.abandon();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_has_a_floor_and_a_ceiling() {
        let timeout = Duration::from_secs(30);
        assert_eq!(
            quiet_wait(Duration::from_millis(1), timeout),
            Duration::from_secs(2)
        );
        assert_eq!(
            quiet_wait(Duration::from_millis(500), timeout),
            Duration::from_secs(10)
        );
        assert_eq!(quiet_wait(Duration::from_secs(5), timeout), timeout);
    }
}
