//! The real `gatekeeper` binary, run as a daemon inside a namespace.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::netns::Netns;

/// Path of the gatekeeper binary under test: `GATEKEEPER_BIN`, else the release build.
pub fn gatekeeper_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("GATEKEEPER_BIN") {
        return PathBuf::from(path);
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/gatekeeper");
    assert!(
        path.exists(),
        "{} missing: build it with `cargo xtask build` (or run tests via `cargo xtask test`)",
        path.display()
    );
    path
}

pub struct Daemon {
    child: Option<Child>,
    log: PathBuf,
    control: PathBuf,
}

impl Daemon {
    /// Starts `gatekeeper run -c config` in `ns` and waits until it answers on `control`.
    pub fn start(
        ns: &Netns,
        config: &Path,
        control: &Path,
        log: &Path,
        env: &[(&str, &str)],
    ) -> Result<Daemon> {
        let mut daemon = Daemon::spawn(ns, config, control, log, env)?;
        daemon.wait_ready()?;
        Ok(daemon)
    }

    /// Starts the daemon without waiting for it (a test that waits for
    /// systemd's READY=1 itself).
    pub fn spawn(
        ns: &Netns,
        config: &Path,
        control: &Path,
        log: &Path,
        env: &[(&str, &str)],
    ) -> Result<Daemon> {
        let log_file = std::fs::File::create(log)?;
        let child = ns
            .command(gatekeeper_bin().to_str().context("binary path")?)
            .args(["run", "-c"])
            .arg(config)
            .envs(env.iter().copied())
            .env(
                "RUST_LOG",
                std::env::var("GATEKEEPER_LOG").unwrap_or("info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .context("spawning gatekeeper run")?;
        Ok(Daemon {
            child: Some(child),
            log: log.to_owned(),
            control: control.to_owned(),
        })
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                bail!(
                    "gatekeeper exited during start-up ({status}):\n{}",
                    self.log_text()
                );
            }
            let out = self.cli(&["stats", "--json"]);
            if out.status.success() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "gatekeeper did not become ready in 20 s:\n{}",
            self.log_text()
        )
    }

    /// Runs a CLI verb against this daemon's control socket.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(gatekeeper_bin())
            .arg("--control")
            .arg(&self.control)
            .args(args)
            .output()
            .expect("spawning gatekeeper CLI")
    }

    pub fn stats(&self) -> serde_json::Value {
        let out = self.cli(&["stats", "--json"]);
        assert!(
            out.status.success(),
            "stats failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("stats --json is JSON")
    }

    pub fn counter(&self, name: &str) -> u64 {
        self.stats()[name]
            .as_u64()
            .unwrap_or_else(|| panic!("stats has no counter {name}"))
    }

    /// Sends SIGHUP: reload the config file.
    pub fn hangup(&self) -> Result<()> {
        self.signal(nix::sys::signal::Signal::SIGHUP)
    }

    fn signal(&self, signal: nix::sys::signal::Signal) -> Result<()> {
        let child = self.child.as_ref().context("daemon not running")?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal)?;
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends SIGTERM without waiting: the clean shutdown path begins.
    pub fn terminate(&self) -> Result<()> {
        self.signal(nix::sys::signal::Signal::SIGTERM)
    }

    /// SIGTERM and wait: the clean shutdown path. The wait is generous (a
    /// drain may be in progress, and emulated machines are slow); it only
    /// catches a daemon that does not exit at all.
    pub fn stop(mut self) -> Result<std::process::ExitStatus> {
        self.terminate()?;
        let mut child = self.child.take().context("daemon already gone")?;
        wait_with_timeout(&mut child, Duration::from_secs(90))
    }

    /// Where the daemon writes its log (it outlives the daemon).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// SIGKILL: the crash path. Nothing gets a chance to clean up.
    pub fn crash(mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    pub fn log_text(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }
}

fn wait_with_timeout(child: &mut Child, limit: Duration) -> Result<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("daemon did not exit within {limit:?} of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The stdout of a CLI run that must have succeeded; fails the test with its stderr otherwise.
pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "CLI failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `gatekeeper probe ARGS...` run from `ns` (the host when `None`): no
/// daemon, no config, its exit status is the verdict.
pub fn relay_probe(ns: Option<&Netns>, args: &[&str]) -> Output {
    let bin = gatekeeper_bin();
    let mut cmd = match ns {
        Some(ns) => ns.command(bin.to_str().expect("binary path")),
        None => Command::new(&bin),
    };
    cmd.arg("probe")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running gatekeeper probe")
}
