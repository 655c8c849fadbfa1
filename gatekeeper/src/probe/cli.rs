//! The `probe` verb: flags in, table or JSON out, the verdict as exit status.

use std::io::Write;

use super::{report, Options};
use crate::cli::ProbeArgs;

pub fn run(args: &ProbeArgs) -> anyhow::Result<u8> {
    let options = Options {
        target: args.target.clone(),
        local_domain: args.local_domain.clone(),
        local_user: args.local_user.clone(),
        victim: args.victim.clone(),
        sender: args.sender.clone(),
        helo: args.helo.clone(),
        source: args.source,
        timeout: args.timeout,
        only: args.only.clone(),
        starttls: args.starttls,
        smuggling: args.smuggling,
    };
    if args.timeout.is_zero() || args.timeout > std::time::Duration::from_secs(600) {
        anyhow::bail!("--timeout must be more than 0 and at most 10m");
    }
    let mut first = true;
    let mut progress = |case: &super::CaseReport| {
        if args.json {
            return;
        }
        let mut out = std::io::stdout().lock();
        if std::mem::take(&mut first) {
            let _ = writeln!(out, "{}", report::header(&args.target));
        }
        let _ = writeln!(out, "{}", report::row(case));
        if args.verbose {
            let _ = write!(out, "{}", report::transcript(case));
        }
    };
    let probe = super::run(&options, &mut progress)?;
    let mut stdout = std::io::stdout().lock();
    let written = if args.json {
        for warning in &probe.warnings {
            eprintln!("gatekeeper probe: warning: {warning}");
        }
        serde_json::to_writer_pretty(&mut stdout, &probe)
            .map_err(std::io::Error::from)
            .and_then(|()| writeln!(stdout))
    } else {
        writeln!(stdout, "{}", report::footer(&probe))
    };
    // The verdict stands even when the output could not be written (`| head`).
    if let Err(e) = written {
        eprintln!(
            "gatekeeper probe: writing the report: {e}; verdict: {}",
            probe.summary
        );
    }
    Ok(probe.exit_code)
}
