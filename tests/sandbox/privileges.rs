//! Deciding, loudly, whether a kernel-level test can run here.

/// True when the test can run. Without root it skips with a loud message,
/// except under CI (`CI=true`), where skipping is a failure.
pub fn require_kernel_privileges(test: &str) -> bool {
    let missing = if !nix::unistd::geteuid().is_root() {
        Some("not running as root")
    } else if which("ip").is_none() || which("nsenter").is_none() {
        Some("iproute2 `ip` or util-linux `nsenter` not installed")
    } else {
        None
    };
    let Some(reason) = missing else {
        return true;
    };
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: cannot run under CI: {reason}");
    }
    announce(&format!(
        "SKIPPED {test}: {reason}; this kernel-level test did NOT run"
    ));
    false
}

/// Prints a message that must not drown in captured test output: to stderr,
/// and to the file named by `GATEKEEPER_TEST_NOTES`, which `cargo xtask test`
/// prints after the run.
pub fn announce(message: &str) {
    eprintln!("\n*** {message} ***\n");
    if let Some(path) = std::env::var_os("GATEKEEPER_TEST_NOTES") {
        use std::io::Write;
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(file, "*** {message}");
        }
    }
}

pub fn which(tool: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(tool))
            .find(|path| path.is_file())
    })
}
