//! A named network namespace that is deleted when dropped.

use std::fs::File;
use std::process::{Command, Output};

use anyhow::{bail, Context, Result};
use nix::sched::{setns, CloneFlags};

pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `name`, replacing a leftover of the same name from a crashed run.
    pub fn create(name: &str) -> Result<Netns> {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        run(Command::new("ip").args(["netns", "add", name]))?;
        let ns = Netns {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command that runs inside this namespace's network stack only
    /// (unlike `ip netns exec`, the mount namespace and /sys stay the host's).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs `f` on a thread that has entered this namespace; sockets it
    /// creates stay in the namespace after it returns.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let file = File::open(self.path()).with_context(|| format!("opening {}", self.path()))?;
        std::thread::scope(|scope| {
            scope
                .spawn(move || -> Result<T> {
                    setns(&file, CloneFlags::CLONE_NEWNET)
                        .with_context(|| format!("entering netns {}", self.name))?;
                    Ok(f())
                })
                .join()
                .map_err(|_| anyhow::anyhow!("thread in netns panicked"))?
        })
    }

    pub fn mac_of(&self, interface: &str) -> Result<[u8; 6]> {
        let out = self.ip(&["-o", "link", "show", interface])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mac = text
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .context("no link/ether address")?;
        let mut bytes = [0u8; 6];
        for (slot, part) in bytes.iter_mut().zip(mac.split(':')) {
            *slot = u8::from_str_radix(part, 16)?;
        }
        Ok(bytes)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Runs a command and fails with its stderr if it exits non-zero.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Lets daemons that drop root (smtp-sink as `nobody`, rbldnsd as `rbldns`)
/// reach `dir` through its parents and write in it. Parents only gain the
/// read and search bits: replacing their mode once turned `/tmp` (1777)
/// into 0755, which broke every unprivileged writer on the machine (apt).
pub fn open_to_service_users(dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    for ancestor in dir.ancestors().take(3) {
        let Ok(meta) = std::fs::metadata(ancestor) else {
            continue;
        };
        let current = meta.permissions().mode() & 0o7777;
        let wanted = if ancestor == dir { 0o777 } else { 0o555 };
        if current & wanted != wanted {
            let _ = std::fs::set_permissions(
                ancestor,
                std::fs::Permissions::from_mode(current | wanted),
            );
        }
    }
}
