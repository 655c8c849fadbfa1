//! A private `redis-server` (Debian package redis-server): its own
//! namespace, addresses, port and directory; killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::netns::Netns;

pub struct Redis {
    child: Option<Child>,
    ns_path: String,
    dir: PathBuf,
    binds: Vec<String>,
    pub port: u16,
}

impl Redis {
    /// Starts it in `ns` listening on `binds`, with an append-only file
    /// synced on every write, so a kill and restart keeps the fleet's data.
    pub fn start(ns: &Netns, dir: &Path, binds: &[&str], port: u16) -> Result<Redis> {
        std::fs::create_dir_all(dir)?;
        let mut redis = Redis {
            child: None,
            ns_path: ns.path(),
            dir: dir.to_owned(),
            binds: binds.iter().map(|b| b.to_string()).collect(),
            port,
        };
        redis.spawn()?;
        Ok(redis)
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.ns_path))
            .arg("--")
            .arg(program);
        cmd
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::File::create(self.dir.join("redis.log"))?;
        let child = self
            .command("redis-server")
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .args(&self.binds)
            .arg("--dir")
            .arg(&self.dir)
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .args(["--daemonize", "no", "--protected-mode", "no"])
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .context("starting redis-server (Debian package redis-server)")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let pong = self.cli(&["PING"]);
            if pong.status.success() && String::from_utf8_lossy(&pong.stdout).contains("PONG") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "redis-server did not answer: {}",
                    std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `redis-cli` against the first bind address.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.command("redis-cli")
            .args(["-h", &self.binds[0], "-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("spawning redis-cli")
    }

    /// `redis-cli --pipe`: `input` is RESP, many commands at once.
    pub fn pipe(&self, input: &[u8]) -> Result<()> {
        use std::io::Write;
        let mut child = self
            .command("redis-cli")
            .args(["-h", &self.binds[0], "-p", &self.port.to_string(), "--pipe"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning redis-cli --pipe")?;
        child.stdin.take().unwrap().write_all(input)?;
        let out = child.wait_with_output()?;
        anyhow::ensure!(
            out.status.success(),
            "redis-cli --pipe: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        Ok(())
    }

    /// SIGKILL, as a crash or a lost host would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again with its data gone, as a Redis without persistence would.
    pub fn restart_empty(&mut self) -> Result<()> {
        self.kill();
        std::fs::remove_dir_all(&self.dir)?;
        std::fs::create_dir_all(&self.dir)?;
        self.spawn()
    }

    /// Starts it again on the same port and data directory.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}
