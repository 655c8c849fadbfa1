//! A real HAProxy (Debian package `haproxy`) in a namespace, in the
//! foreground, passing TCP on with a PROXY header; killed when dropped.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::netns::Netns;

/// Which PROXY header HAProxy puts before the stream.
#[derive(Debug, Clone, Copy)]
pub enum ProxyVersion {
    V1,
    V2,
    /// Plain TCP passthrough: the cheapest proxy, a baseline for the front door.
    None,
}

impl ProxyVersion {
    fn server_option(self) -> &'static str {
        match self {
            ProxyVersion::V1 => "send-proxy",
            ProxyVersion::V2 => "send-proxy-v2",
            ProxyVersion::None => "",
        }
    }
}

pub struct Haproxy {
    child: Child,
}

impl Haproxy {
    /// One TCP frontend per `(listen, version)`, each to `server`.
    pub fn start(
        ns: &Netns,
        dir: &Path,
        frontends: &[(&str, ProxyVersion)],
        server: &str,
    ) -> Result<Haproxy> {
        // maxconn must fit the open-file limit, or HAProxy refuses to start.
        let mut config = String::from(
            "global\n    maxconn 4000\n\ndefaults\n    mode tcp\n    timeout connect 10s\n    \
             timeout client 5m\n    timeout server 5m\n",
        );
        for (i, (listen, version)) in frontends.iter().enumerate() {
            config.push_str(&format!(
                "\nfrontend in{i}\n    bind {listen}\n    default_backend out{i}\n\n\
                 backend out{i}\n    server gatekeeper {server} {}\n",
                version.server_option()
            ));
        }
        std::fs::create_dir_all(dir)?;
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, config)?;
        let log = std::fs::File::create(dir.join("haproxy.log"))?;
        let child = ns
            .command("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting haproxy (Debian package haproxy)")?;
        let mut haproxy = Haproxy { child };
        let deadline = Instant::now() + Duration::from_secs(60);
        for (listen, _) in frontends {
            let port = listen.rsplit(':').next().unwrap_or_default();
            loop {
                if let Some(status) = haproxy.child.try_wait()? {
                    let log = std::fs::read_to_string(dir.join("haproxy.log")).unwrap_or_default();
                    bail!("haproxy exited ({status}): {log}");
                }
                let out = ns
                    .command("ss")
                    .args(["-Hltn", &format!("sport = :{port}")])
                    .output()?;
                if !out.stdout.is_empty() {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("haproxy did not start listening on {listen}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(haproxy)
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
