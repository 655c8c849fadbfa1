//! `gatekeeper probe`: tests any SMTP server for third-party relay. Every
//! trick of the corpus runs in a fresh session up to RCPT and no further, so
//! nothing is ever queued; the answer is only believed when a local control
//! recipient was accepted.

pub mod classify;
pub mod cli;
pub mod corpus;
pub mod report;
pub mod session;
pub mod smuggling;
pub mod target;

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

use serde::Serialize;

use classify::{Outcome, Stage, Verdict};
use corpus::Row;
use session::{Failure, Session, Settings};
use target::TargetError;

use crate::smtp::reply::Reply;

pub const DEFAULT_VICTIM: &str = "relay-test.invalid";

/// What the operator asked for (the CLI's flags, already parsed).
#[derive(Debug, Clone)]
pub struct Options {
    pub target: String,
    pub local_domain: Option<String>,
    pub local_user: String,
    pub victim: String,
    pub sender: Option<String>,
    pub helo: Option<String>,
    pub source: Option<IpAddr>,
    pub timeout: Duration,
    pub only: Option<String>,
    pub starttls: bool,
    pub smuggling: bool,
}

/// One case as sent and answered.
#[derive(Debug, Clone, Serialize)]
pub struct CaseReport {
    pub family: String,
    pub case: String,
    pub about: String,
    pub mail_from: String,
    pub rcpt_to: String,
    pub result: Outcome,
    pub stage: Stage,
    /// The reply that decided it (MAIL's or RCPT's), if any.
    pub reply: Option<WireReply>,
    /// What went wrong, for `error`.
    pub error: Option<String>,
    pub tls: bool,
    pub transcript: Vec<String>,
}

impl CaseReport {
    pub fn id(&self) -> String {
        format!("{}/{}", self.family, self.case)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct WireReply {
    pub code: u16,
    pub text: String,
}

impl From<&Reply> for WireReply {
    fn from(reply: &Reply) -> WireReply {
        WireReply {
            code: reply.code,
            text: printable(&reply.lines.join(" / ")),
        }
    }
}

/// The server is not trusted: no terminal escapes or bidi overrides reach
/// the operator's terminal, and no reply text grows without bound.
pub fn printable(text: &str) -> String {
    const MAX: usize = 512;
    let mut out: String = text
        .chars()
        .take(MAX)
        .map(|c| {
            let format = matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}');
            if c.is_control() || format {
                '?'
            } else {
                c
            }
        })
        .collect();
    if text.chars().nth(MAX).is_some() {
        out.push_str("...");
    }
    out
}

/// The whole run, as `--json` prints it.
#[derive(Debug, Serialize)]
pub struct ProbeReport {
    pub target: String,
    pub address: SocketAddr,
    /// The address the probe connected from.
    pub source: Option<IpAddr>,
    pub banner: Option<String>,
    pub local_domain: String,
    pub local_domain_guessed: bool,
    pub local_user: String,
    pub victim: String,
    pub sender: String,
    pub helo: String,
    pub verdict: Verdict,
    pub exit_code: u8,
    pub summary: String,
    pub control: CaseReport,
    pub cases: Vec<CaseReport>,
    /// `family/case` of every relay case the server accepted.
    pub accepted: Vec<String>,
    pub warnings: Vec<String>,
    pub smuggling: Option<smuggling::SmugglingReport>,
}

/// Input the probe refuses before connecting: exit status 2.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Input(#[from] TargetError),
    #[error("resolving {0}: {1}")]
    Resolve(String, String),
    #[error("{0}")]
    Corpus(#[from] corpus::CorpusError),
    #[error("could not test: {0}")]
    Unreachable(String),
    #[error("{0}")]
    NoLocalDomain(String),
}

pub fn run(
    options: &Options,
    progress: &mut dyn FnMut(&CaseReport),
) -> Result<ProbeReport, ProbeError> {
    let (host, port) = target::parse_host_port(&options.target)?;
    if let Some(domain) = &options.local_domain {
        target::check_domain("--local-domain", domain)?;
    }
    target::check_domain("--victim", &options.victim)?;
    let victim = target::normal_domain(&options.victim);
    target::check_path_text("--local-user", &options.local_user)?;
    if options.local_user.contains('@') {
        return Err(TargetError("--local-user is a local part, without @".into()).into());
    }
    let sender = options.sender.clone().unwrap_or_else(|| {
        format!(
            "gatekeeper-probe@{}",
            target::normal_domain(&options.victim)
        )
    });
    target::check_path_text("--sender", &sender)?;
    let helo = options
        .helo
        .clone()
        .unwrap_or_else(|| format!("probe.{}", target::normal_domain(&options.victim)));
    target::check_path_text("--helo", &helo)?;
    let rows: Vec<Row> = corpus::parse(corpus::TABLE)?
        .into_iter()
        .filter(|r| corpus::selected(r, options.only.as_deref()))
        .collect();

    if !rows.iter().any(|r| !r.is_control()) {
        return Err(TargetError(format!(
            "--only {:?} selects no relay case",
            options.only.as_deref().unwrap_or("")
        ))
        .into());
    }
    let address = resolve(&host, port, options.source)?;
    let settings = Settings {
        addr: address,
        server_name: host.clone(),
        source: options.source,
        timeout: options.timeout,
        helo: helo.clone(),
        starttls: options.starttls,
    };

    // The control runs first: its banner names the default local domain.
    let control_row = rows
        .iter()
        .find(|r| r.is_control())
        .expect("corpus::parse insists on a control row");
    let mut warnings = Vec::new();
    let first = open(&settings);
    let source = first.as_ref().ok().and_then(|s| s.local).map(|a| a.ip());
    let banner = match &first {
        Ok(session) => session.banner.clone(),
        Err(failed) if failed.failure.stage == Stage::Connect => {
            return Err(ProbeError::Unreachable(failed.failure.message.clone()))
        }
        Err(failed) => failed.banner.clone(),
    };
    let banner_text = banner.as_ref().map(|b| printable(&b.lines.join(" / ")));
    let (local_domain, guessed) = match &options.local_domain {
        Some(domain) => (target::normal_domain(domain), false),
        None => {
            let guess = banner
                .as_ref()
                .and_then(|b| b.lines.first())
                .and_then(|line| target::domain_from_banner(line))
                .ok_or_else(|| {
                    ProbeError::NoLocalDomain(format!(
                        "the banner ({}) names no host to take the local domain from: give --local-domain",
                        banner_text.as_deref().unwrap_or("none")
                    ))
                })?;
            warnings.push(format!(
                "--local-domain not given: using {guess}, from the banner's host name"
            ));
            (guess, true)
        }
    };
    if victim == local_domain || victim.ends_with(&format!(".{local_domain}")) {
        return Err(TargetError(format!(
            "--victim {victim} is {local_domain} or under it: it must be an outside domain"
        ))
        .into());
    }
    let placeholders = corpus::Target {
        sender: sender.clone(),
        user: options.local_user.clone(),
        local_domain: local_domain.clone(),
        victim: victim.clone(),
        server: address.ip(),
    };

    let control = run_case(&placeholders, control_row, first);
    progress(&control);
    let mut cases: Vec<CaseReport> = Vec::new();
    for row in rows.iter().filter(|r| !r.is_control()) {
        let case = run_case(&placeholders, row, open(&settings));
        progress(&case);
        cases.push(case);
    }

    // A server that takes any local part at the local domain accepts every
    // trick addressed there as a local delivery: those acceptances prove nothing.
    let catch_all = control.result == Outcome::Accepted
        && cases
            .iter()
            .any(|c| c.result == Outcome::Accepted && ends_at(&c.rcpt_to, &local_domain))
        && catch_all_accepted(&settings, &placeholders);
    if catch_all {
        for case in cases
            .iter_mut()
            .filter(|c| c.result == Outcome::Accepted && ends_at(&c.rcpt_to, &local_domain))
        {
            case.result = Outcome::Error;
            case.error = Some(format!(
                "accepted, but so is any unknown user at {local_domain} (catch-all): a local delivery cannot be told from a relay"
            ));
        }
        warnings.push(format!(
            "the server accepts any local part at {local_domain} (a catch-all): the tricks addressed there are inconclusive"
        ));
    }
    let outcomes: Vec<Outcome> = cases.iter().map(|c| c.result).collect();
    let verdict = classify::verdict(control.result, &outcomes);
    let accepted: Vec<String> = cases
        .iter()
        .filter(|c| c.result == Outcome::Accepted)
        .map(CaseReport::id)
        .collect();
    if cases
        .iter()
        .any(|c| c.family == "foreign" && c.case == "plain" && c.result == Outcome::Accepted)
    {
        warnings.push(format!(
            "even the plainest relay (foreign sender, foreign recipient) was accepted: the server \
             may trust this client's address{}, which makes a closed server look open; probe from \
             an address it does not trust",
            source.map(|s| format!(" ({s})")).unwrap_or_default()
        ));
    }
    if control.result != Outcome::Accepted {
        warnings.push(format!(
            "the control recipient <{}@{}> was not accepted ({}): the relay results mean nothing \
             until it is (check --local-domain, --local-user, --sender)",
            options.local_user,
            local_domain,
            control
                .reply
                .as_ref()
                .map(|r| format!("{} {}", r.code, r.text))
                .or(control.error.clone())
                .unwrap_or_default()
        ));
    }
    if cases.iter().any(|c| c.result == Outcome::Deferred) {
        warnings.push(
            "some cases were deferred (4xx): a deferral is not a refusal, the server may accept them on a retry"
                .into(),
        );
    }
    if options.starttls && !control.tls {
        warnings.push("--starttls: the server did not offer STARTTLS; tested in plaintext".into());
    }
    // DATA goes only to a recipient the server has shown to be local, on a
    // server that relays nothing, at a domain the operator named.
    let smuggling_safe = verdict == Verdict::Closed && options.local_domain.is_some();
    if options.smuggling && !smuggling_safe {
        warnings.push(
            "--smuggling skipped: it sends a message, so it runs only against a server found \
             closed, with --local-domain given"
                .into(),
        );
    }
    let smuggling =
        (options.smuggling && smuggling_safe).then(|| smuggling::run(&settings, &placeholders));
    if let Some(report) = &smuggling {
        warnings.extend(report.warnings());
    }
    let summary = summary(verdict, &control, &cases, &accepted);
    Ok(ProbeReport {
        target: options.target.clone(),
        address,
        source,
        banner: banner_text,
        local_domain,
        local_domain_guessed: guessed,
        local_user: options.local_user.clone(),
        victim,
        sender,
        helo,
        verdict,
        exit_code: verdict.exit_code(),
        summary,
        control,
        cases,
        accepted,
        warnings,
        smuggling,
    })
}

fn summary(
    verdict: Verdict,
    control: &CaseReport,
    cases: &[CaseReport],
    accepted: &[String],
) -> String {
    let count = |o: Outcome| cases.iter().filter(|c| c.result == o).count();
    match verdict {
        Verdict::Open => format!(
            "OPEN RELAY: {} of {} relay cases accepted ({}); a server that accepts at RCPT and \
             bounces later is still open (to testers, and a backscatter source)",
            accepted.len(),
            cases.len(),
            abbreviated(accepted, 8)
        ),
        Verdict::Closed => format!(
            "closed: all {} relay cases refused; the control recipient was accepted",
            cases.len()
        ),
        Verdict::Untestable if control.result != Outcome::Accepted => format!(
            "could not test: the control recipient was {} (a result is only believed when it is accepted)",
            describe(control.result)
        ),
        Verdict::Untestable if count(Outcome::Deferred) > 0 => format!(
            "could not test: {} relay cases deferred (4xx), {} refused, none accepted; a deferral \
             is not a pass (the server may accept on a retry): a closed server refuses with 5xx \
             (Postfix: reject_unauth_destination, not defer_unauth_destination)",
            count(Outcome::Deferred),
            count(Outcome::Refused)
        ),
        Verdict::Untestable => format!(
            "could not test every case: {} refused, {} deferred, {} without an answer, none accepted",
            count(Outcome::Refused),
            count(Outcome::Deferred),
            count(Outcome::Error)
        ),
    }
}

/// The first `max` names, then how many more (the JSON has them all).
fn abbreviated(names: &[String], max: usize) -> String {
    match names.len().checked_sub(max) {
        Some(more) if more > 0 => format!("{}, and {more} more", names[..max].join(", ")),
        _ => names.join(", "),
    }
}

fn describe(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Refused => "refused",
        Outcome::Deferred => "deferred",
        Outcome::Accepted => "accepted",
        Outcome::Error => "not answered",
    }
}

/// The first address the name resolves to, of the family `--source` needs.
fn resolve(host: &str, port: u16, source: Option<IpAddr>) -> Result<SocketAddr, ProbeError> {
    let addresses: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| ProbeError::Resolve(host.to_owned(), e.to_string()))?
        .collect();
    addresses
        .iter()
        .find(|a| source.is_none_or(|s| s.is_ipv4() == a.is_ipv4()))
        .copied()
        .ok_or_else(|| {
            ProbeError::Resolve(
                host.to_owned(),
                "no address of the --source address's family".into(),
            )
        })
}

/// Whether the path's final domain is the local domain (any case, trailing dot).
fn ends_at(path: &str, local_domain: &str) -> bool {
    let inner = path.trim().trim_start_matches('<').trim_end_matches('>');
    inner
        .rsplit_once('@')
        .is_some_and(|(_, domain)| target::normal_domain(domain) == local_domain)
}

/// The negative control: a user that cannot exist at the local domain.
fn catch_all_accepted(settings: &Settings, target: &corpus::Target) -> bool {
    let unknown = format!(
        "<gatekeeper-probe-no-such-user-{}@{}>",
        std::process::id(),
        target.local_domain
    );
    let row = Row {
        family: "control",
        case: "unknown-local-user",
        mail_from: "<{sender}>",
        rcpt_to: &unknown,
        about: "",
    };
    run_case(target, &row, open(settings)).result == Outcome::Accepted
}

/// A session that did not get past the greeting, EHLO or STARTTLS.
struct NotOpened {
    failure: Failure,
    banner: Option<Reply>,
    transcript: Vec<String>,
}

/// A connected session past EHLO (and STARTTLS), or why not.
fn open(settings: &Settings) -> Result<Session, NotOpened> {
    let mut session = Session::connect(settings).map_err(|failure| NotOpened {
        failure,
        banner: None,
        transcript: Vec::new(),
    })?;
    match session.handshake(settings) {
        Ok(()) => Ok(session),
        Err(failure) => Err(NotOpened {
            failure,
            banner: session.banner.clone(),
            transcript: session.abandon(),
        }),
    }
}

fn run_case(target: &corpus::Target, row: &Row, opened: Result<Session, NotOpened>) -> CaseReport {
    let mail_from = target.expand(row.mail_from);
    let rcpt_to = target.expand(row.rcpt_to);
    let mut report = CaseReport {
        family: row.family.to_owned(),
        case: row.case.to_owned(),
        about: row.about.to_owned(),
        mail_from: mail_from.clone(),
        rcpt_to: rcpt_to.clone(),
        result: Outcome::Error,
        stage: Stage::Connect,
        reply: None,
        error: None,
        tls: false,
        transcript: Vec::new(),
    };
    let mut session = match opened {
        Ok(session) => session,
        Err(NotOpened {
            failure,
            transcript,
            ..
        }) => {
            report.stage = failure.stage;
            report.reply = failure.reply.as_ref().map(WireReply::from);
            // Refused before MAIL is no answer about relaying: a server that
            // starts turning the probe away must not look closed.
            report.result = Outcome::Error;
            report.error = Some(failure.message);
            report.transcript = transcript;
            return report;
        }
    };
    report.tls = session.tls;
    let mail = match session.command(&format!("MAIL FROM:{mail_from}")) {
        Ok(reply) => reply,
        Err(e) => {
            report.stage = Stage::Mail;
            report.error = Some(session.failure(Stage::Mail, e).message);
            report.transcript = session.abandon();
            return report;
        }
    };
    let rcpt = if mail.is_success() {
        match session.command(&format!("RCPT TO:{rcpt_to}")) {
            Ok(reply) => Some(reply),
            Err(e) => {
                report.stage = Stage::Rcpt;
                report.error = Some(session.failure(Stage::Rcpt, e).message);
                report.transcript = session.abandon();
                return report;
            }
        }
    } else {
        None
    };
    let (outcome, stage) = classify::transaction(&mail, rcpt.as_ref());
    report.result = outcome;
    report.stage = stage;
    let deciding = if stage == Stage::Rcpt {
        rcpt.as_ref()
    } else {
        Some(&mail)
    };
    report.reply = deciding.map(WireReply::from);
    if outcome == Outcome::Error {
        report.error = Some("a reply that is neither acceptance nor refusal".into());
    } else if stage == Stage::Rcpt
        && outcome != Outcome::Accepted
        && deciding.is_some_and(classify::refuses_the_domain)
    {
        report.result = Outcome::Error;
        report.error = Some(
            "refused because the domain does not resolve, not for relaying: inconclusive (use a --victim domain that resolves)"
                .into(),
        );
    }
    report.transcript = session.finish();
    report
}

#[cfg(test)]
mod tests;
