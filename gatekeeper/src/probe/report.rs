//! The probe's output: a table for people, one JSON object for programs.

use std::fmt::Write;

use super::classify::Outcome;
use super::smuggling::FormResult;
use super::{CaseReport, ProbeReport};

/// The line printed as each case finishes (the table's rows).
pub fn row(case: &CaseReport) -> String {
    let result = match case.result {
        Outcome::Refused => "refused",
        Outcome::Deferred => "DEFERRED",
        Outcome::Accepted if case.family == super::corpus::CONTROL => "accepted",
        Outcome::Accepted => "ACCEPTED",
        Outcome::Error => "error",
    };
    let answer = match (&case.reply, &case.error) {
        (Some(reply), _) => format!("{} {}", reply.code, reply.text),
        (None, Some(error)) => error.clone(),
        (None, None) => String::new(),
    };
    format!(
        "{:<34} {:<9} MAIL FROM:{} RCPT TO:{}\n{:<34} {:<9} -> {}",
        case.id(),
        result,
        case.mail_from,
        case.rcpt_to,
        "",
        "",
        clip(&answer, 100)
    )
}

pub fn header(report_target: &str) -> String {
    format!(
        "probing {report_target}\n{:<34} {:<9} SENT / REPLY",
        "CASE", "RESULT"
    )
}

/// Everything after the rows: warnings, smuggling, the verdict line.
pub fn footer(report: &ProbeReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nserver {} ({}); local domain {}{}, user {}, victim {}",
        report.address,
        report.banner.as_deref().unwrap_or("no banner"),
        report.local_domain,
        if report.local_domain_guessed {
            " (guessed)"
        } else {
            ""
        },
        report.local_user,
        report.victim
    );
    if let Some(smuggling) = &report.smuggling {
        let _ = writeln!(
            out,
            "\nend-of-data forms (each in its own session to the local recipient):"
        );
        for form in &smuggling.forms {
            let _ = writeln!(
                out,
                "  {:<20} {}",
                form.form,
                form_result(form.result, form.reply.as_ref().map(|r| r.code))
            );
        }
        let command = match smuggling.bare_lf_commands {
            FormResult::Taken => "answered: bare LF ends a command line",
            FormResult::Refused => "refused",
            FormResult::NotTaken => "no answer: bare LF does not end a command line",
            FormResult::Error => "not tested (session failed)",
        };
        let _ = writeln!(out, "  {:<20} {command}", "NOOP<LF> command");
    }
    for warning in &report.warnings {
        let _ = writeln!(out, "warning: {warning}");
    }
    let _ = write!(out, "\nverdict: {}", report.summary);
    out
}

fn form_result(result: FormResult, code: Option<u16>) -> String {
    let code = code.map(|c| format!(" ({c})")).unwrap_or_default();
    match result {
        FormResult::Taken => format!("taken as end of data{code}"),
        FormResult::Refused => format!("refused{code}"),
        FormResult::NotTaken => "not taken (no answer: still data)".into(),
        FormResult::Error => "not tested (session failed)".into(),
    }
}

/// With `-v`: the case's transcript, indented.
pub fn transcript(case: &CaseReport) -> String {
    case.transcript
        .iter()
        .map(|line| format!("      {line}\n"))
        .collect()
}

fn clip(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_owned(),
    }
}
