//! A fleet of edge hosts: one [`Lab`] each (the edge and its client), and a
//! hub namespace running Redis with a point-to-point veth to every edge.

use anyhow::Result;

use crate::lab::{Lab, PeerSpec};
use crate::netns::{self, Netns};
use crate::redis::Redis;

pub const REDIS_PORT: u16 = 6379;
/// Every edge's MX address, and the first address of its client.
pub const MX: &str = "192.0.2.1:25";

pub struct Fleet {
    // Field order: daemons (in the labs) stop before Redis and the hub go.
    pub hosts: Vec<Lab>,
    pub redis: Redis,
    _hub: Netns,
    _dir: tempfile::TempDir,
}

/// The hub's and the edge's address on edge `i`'s link (198.51.100.0/24, /30 each).
fn link_addrs(i: usize) -> (String, String) {
    let base = 4 * i as u8;
    (
        format!("198.51.100.{}", base + 1),
        format!("198.51.100.{}", base + 2),
    )
}

impl Fleet {
    /// `hosts` edges, each with a client holding `client_addrs` (CIDRs in
    /// 192.0.2.0/24; the edge is 192.0.2.1). The same addresses on every
    /// host: a verdict on one source is tested on all.
    pub fn new(tag: &str, hosts: usize, client_addrs: &[&'static str]) -> Result<Fleet> {
        let hub = Netns::create(&format!("gkt-{tag}-{}-hub", std::process::id()))?;
        let mut labs = Vec::new();
        let mut binds = Vec::new();
        for i in 0..hosts {
            let lab = Lab::new(
                &format!("{tag}{i}"),
                vec![PeerSpec {
                    name: "client",
                    edge_addrs: vec!["192.0.2.1/24"],
                    peer_addrs: client_addrs.to_vec(),
                }],
            )?;
            let (hub_addr, edge_addr) = link_addrs(i);
            let hub_if = format!("hub{i}");
            netns::run(std::process::Command::new("ip").args([
                "link",
                "add",
                &hub_if,
                "netns",
                hub.name(),
                "type",
                "veth",
                "peer",
                "name",
                "fleet0",
                "netns",
                lab.edge.name(),
            ]))?;
            hub.ip(&["addr", "add", &format!("{hub_addr}/30"), "dev", &hub_if])?;
            lab.edge
                .ip(&["addr", "add", &format!("{edge_addr}/30"), "dev", "fleet0"])?;
            hub.ip(&["link", "set", &hub_if, "up"])?;
            lab.edge.ip(&["link", "set", "fleet0", "up"])?;
            binds.push(hub_addr);
            labs.push(lab);
        }
        let dir = tempfile::Builder::new()
            .prefix("gatekeeper-fleet-")
            .tempdir()?;
        let binds: Vec<&str> = binds.iter().map(String::as_str).collect();
        let redis = Redis::start(&hub, &dir.path().join("redis"), &binds, REDIS_PORT)?;
        Ok(Fleet {
            hosts: labs,
            redis,
            _hub: hub,
            _dir: dir,
        })
    }

    /// The `[cluster]` section for host `i`, named `edge-<letter>`.
    pub fn cluster_section(&self, i: usize) -> String {
        let (hub_addr, _) = link_addrs(i);
        format!(
            "[cluster]\nredis = \"redis://{hub_addr}:{REDIS_PORT}/0\"\nnode_name = \"{}\"\n",
            node_name(i)
        )
    }

    /// Starts host `i`'s daemon with `extra` and its `[cluster]` section.
    pub fn start(&mut self, i: usize, extra: &str) -> Result<()> {
        let config = format!("{extra}\n{}", self.cluster_section(i));
        self.hosts[i].start_daemon(&config)
    }

    pub fn host(&self, i: usize) -> &Lab {
        &self.hosts[i]
    }
}

pub fn node_name(i: usize) -> String {
    format!("edge-{}", (b'a' + i as u8) as char)
}
