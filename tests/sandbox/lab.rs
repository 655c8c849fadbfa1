//! An edge host and its peers: one namespace each, a veth pair per peer.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::daemon::Daemon;
use crate::netns::Netns;

/// A peer host: its namespace is joined to the edge by its own veth pair.
pub struct PeerSpec {
    pub name: &'static str,
    /// Addresses (CIDR) on the edge's side of this link.
    pub edge_addrs: Vec<&'static str>,
    /// Addresses (CIDR) on the peer's side.
    pub peer_addrs: Vec<&'static str>,
}

pub struct Lab {
    // Field order matters: the daemon stops before namespaces and files go.
    daemon: Option<Daemon>,
    pub edge: Netns,
    peers: Vec<(String, Netns)>,
    dir: tempfile::TempDir,
    tag: String,
}

/// Interface name of peer `i` on the edge side; the peer side is always `eth0`.
pub fn edge_iface(i: usize) -> String {
    format!("gk{i}")
}

impl Lab {
    /// The smallest lab: the edge (192.0.2.1/24 on `gk0`) and one peer (192.0.2.2/24).
    pub fn two_hosts(tag: &str, peer: &'static str) -> Result<Lab> {
        Lab::new(
            tag,
            vec![PeerSpec {
                name: peer,
                edge_addrs: vec!["192.0.2.1/24"],
                peer_addrs: vec!["192.0.2.2/24"],
            }],
        )
    }

    /// `tag` must be unique among concurrently running tests.
    pub fn new(tag: &str, peers: Vec<PeerSpec>) -> Result<Lab> {
        let tag = format!("{tag}-{}", std::process::id());
        let edge = Netns::create(&format!("gkt-{tag}-edge"))?;
        let mut lab = Lab {
            daemon: None,
            edge,
            peers: Vec::new(),
            dir: tempfile::Builder::new()
                .prefix("gatekeeper-lab-")
                .tempdir()?,
            tag,
        };
        for (i, spec) in peers.into_iter().enumerate() {
            let ns = Netns::create(&format!("gkt-{}-{}", lab.tag, spec.name))?;
            let edge_if = edge_iface(i);
            crate::netns::run(std::process::Command::new("ip").args([
                "link",
                "add",
                &edge_if,
                "netns",
                lab.edge.name(),
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns.name(),
            ]))?;
            for addr in &spec.edge_addrs {
                lab.edge.ip(&addr_args(addr, &edge_if))?;
            }
            for addr in &spec.peer_addrs {
                ns.ip(&addr_args(addr, "eth0"))?;
            }
            lab.edge.ip(&["link", "set", &edge_if, "up"])?;
            ns.ip(&["link", "set", "eth0", "up"])?;
            lab.peers.push((spec.name.to_owned(), ns));
        }
        Ok(lab)
    }

    pub fn peer(&self, name: &str) -> &Netns {
        &self
            .peers
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no peer {name}"))
            .1
    }

    pub fn edge_interfaces(&self) -> Vec<String> {
        (0..self.peers.len()).map(edge_iface).collect()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn control_socket(&self) -> PathBuf {
        self.dir().join("control.sock")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir().join("state")
    }

    pub fn bpffs_dir(&self) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/gkt-{}", self.tag))
    }

    /// A config for this lab's edge; `extra` is appended verbatim (TOML).
    pub fn config(&self, extra: &str) -> String {
        let interfaces: Vec<String> = self
            .edge_interfaces()
            .iter()
            .map(|i| format!("\"{i}\""))
            .collect();
        format!(
            "interfaces = [{}]\nstate_dir = \"{}\"\ncontrol_socket = \"{}\"\nbpffs_dir = \"{}\"\n{extra}\n",
            interfaces.join(", "),
            self.state_dir().display(),
            self.control_socket().display(),
            self.bpffs_dir().display(),
        )
    }

    /// Where the daemon's config lives (rewrite it, then reload).
    pub fn config_path(&self) -> PathBuf {
        self.dir().join("gatekeeper.toml")
    }

    pub fn write_config(&self, extra: &str) -> Result<PathBuf> {
        std::fs::write(self.config_path(), self.config(extra))?;
        Ok(self.config_path())
    }

    /// Starts the daemon on the edge with `config(extra)`.
    pub fn start_daemon(&mut self, extra: &str) -> Result<()> {
        self.start_daemon_with_env(extra, &[])
    }

    /// As `start_daemon`, with extra environment for the daemon.
    pub fn start_daemon_with_env(&mut self, extra: &str, env: &[(&str, &str)]) -> Result<()> {
        let config = self.write_config(extra)?;
        let log = self.next_log();
        let daemon = Daemon::start(&self.edge, &config, &self.control_socket(), &log, env)
            .context("starting gatekeeper")?;
        self.daemon = Some(daemon);
        Ok(())
    }

    /// Starts the daemon with this whole config text and environment, and
    /// does not wait for it: the caller knows when it is ready.
    pub fn spawn_daemon(&mut self, config: &str, env: &[(&str, &str)]) -> Result<()> {
        std::fs::write(self.config_path(), config)?;
        let log = self.next_log();
        let daemon = Daemon::spawn(
            &self.edge,
            &self.config_path(),
            &self.control_socket(),
            &log,
            env,
        )
        .context("starting gatekeeper")?;
        self.daemon = Some(daemon);
        Ok(())
    }

    fn next_log(&self) -> PathBuf {
        self.dir()
            .join(format!("daemon-{}.log", self.daemon_starts()))
    }

    fn daemon_starts(&self) -> usize {
        std::fs::read_dir(self.dir())
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().starts_with("daemon-"))
                    .count()
            })
            .unwrap_or(0)
    }

    pub fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("daemon not started")
    }

    pub fn take_daemon(&mut self) -> Daemon {
        self.daemon.take().expect("daemon not started")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(daemon) = self.daemon.take() {
            if std::thread::panicking() {
                eprintln!("--- gatekeeper log ---\n{}", daemon.log_text());
            }
            drop(daemon);
        }
        // A crashed daemon leaves pins; XDP links went with its process.
        let _ = std::fs::remove_dir_all(self.bpffs_dir());
    }
}

fn addr_args<'a>(addr: &'a str, dev: &'a str) -> Vec<&'a str> {
    let mut args = vec!["addr", "add", addr, "dev", dev];
    if addr.contains(':') {
        args.push("nodad");
    }
    args
}
