//! The fleet through a real Redis: how long a verdict taken on host A takes
//! to be in the kernel denylists of B and C, and how many verdicts per
//! second one host applies from the stream, each next to a local baseline.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use sandbox::fleet::Fleet;
use sandbox::lab::Lab;

use super::dnsbl::Percentiles;
use super::median;

pub struct ClusterFigures {
    pub verdicts: usize,
    pub propagation: Percentiles,
    /// `deny add` acknowledged on B itself (store, fsync, kernel map).
    pub local_add: Duration,
    pub applied: usize,
    pub applied_per_sec: f64,
    /// The same number of entries through one `deny import` on a host.
    pub import_per_sec: f64,
}

/// A control-socket connection kept open: one JSON line out, one back.
struct Control {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    line: String,
}

impl Control {
    fn open(socket: &Path) -> Result<Control> {
        let stream = UnixStream::connect(socket).context("connecting to the control socket")?;
        Ok(Control {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            line: String::new(),
        })
    }

    fn ask(&mut self, request: &str) -> Result<&str> {
        writeln!(self.writer, "{request}")?;
        self.line.clear();
        self.reader.read_line(&mut self.line)?;
        Ok(&self.line)
    }

    fn add(&mut self, prefix: &str, share: bool) -> Result<()> {
        let reply = self.ask(&format!(
            "{{\"op\":\"list_add\",\"list\":\"deny\",\"share\":{share},\"entries\":[{{\"prefix\":\"{prefix}\",\"ttl_secs\":3600}}]}}"
        ))?;
        ensure!(reply.contains("\"changed\""), "adding {prefix}: {reply}");
        Ok(())
    }

    /// Whether `ip` is in this host's kernel denylist (`check` reads the pinned map).
    fn denylisted(&mut self, ip: &str) -> Result<bool> {
        let reply = self.ask(&format!("{{\"op\":\"check\",\"ip\":\"{ip}\"}}"))?;
        let value: serde_json::Value = serde_json::from_str(reply)?;
        Ok(value["map_state"]["denylisted"] == true)
    }

    fn applied(&mut self) -> Result<u64> {
        let reply = self.ask("{\"op\":\"cluster_status\"}")?;
        let value: serde_json::Value = serde_json::from_str(reply)?;
        value["applied"]
            .as_u64()
            .with_context(|| format!("cluster status: {reply}"))
    }
}

/// The i-th address of 198.18.0.0/15 (benchmarking range), from `base`.
fn bench_addr(base: u32, i: usize) -> String {
    let n = base + i as u32;
    format!(
        "198.{}.{}.{}",
        18 + ((n >> 16) & 1),
        (n >> 8) & 0xff,
        n & 0xff
    )
}

pub fn run(quick: bool) -> Result<ClusterFigures> {
    let (verdicts, applied) = if quick { (50, 2_000) } else { (1_000, 20_000) };
    let mut fleet = Fleet::new("benchfleet", 3, &["192.0.2.2/24"])?;
    for i in 0..3 {
        fleet.start(i, "")?;
    }
    let mut hosts: Vec<Control> = fleet
        .hosts
        .iter()
        .map(|lab| Control::open(&lab.control_socket()))
        .collect::<Result<_>>()?;
    for host in &mut hosts {
        wait_until(|| {
            Ok(host
                .ask("{\"op\":\"cluster_status\"}")?
                .contains("\"connected\":true"))
        })?;
    }

    // Propagation: A acknowledges a shared verdict; B and C are polled
    // until their kernel denylists hold it.
    let mut samples = Vec::with_capacity(verdicts * 2);
    for i in 0..verdicts {
        let ip = bench_addr(0, i);
        hosts[0].add(&ip, true)?;
        let taken = Instant::now();
        let (mut on_b, mut on_c) = (None, None);
        while on_b.is_none() || on_c.is_none() {
            if on_b.is_none() && hosts[1].denylisted(&ip)? {
                on_b = Some(taken.elapsed());
            }
            if on_c.is_none() && hosts[2].denylisted(&ip)? {
                on_c = Some(taken.elapsed());
            }
            if taken.elapsed() > Duration::from_secs(30) {
                bail!("{ip} never reached B and C");
            }
        }
        samples.extend([on_b.unwrap(), on_c.unwrap()]);
    }
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    let propagation = Percentiles {
        p50: at(0.50),
        p99: at(0.99),
    };
    let mut local = Vec::new();
    for i in 0..verdicts.min(200) {
        let started = Instant::now();
        hosts[1].add(&bench_addr(40_000, i), false)?;
        local.push(started.elapsed().as_secs_f64());
    }

    // Throughput: verdicts of a foreign origin written straight into the
    // stream; B's applied counter tells when it holds them all.
    let expires = crate::bench::unix_now() + 3600;
    let mut resp = Vec::new();
    for i in 0..applied {
        let json = format!(
            r#"{{"op":"add","kind":"deny","prefix":"{}/32","origin":"bench","expires":{expires}}}"#,
            bench_addr(60_000, i)
        );
        let args = ["XADD", "gatekeeper:verdicts", "*", "v", json.as_str()];
        write!(resp, "*{}\r\n", args.len())?;
        for arg in args {
            write!(resp, "${}\r\n{arg}\r\n", arg.len())?;
        }
    }
    let before = hosts[1].applied()?;
    let started = Instant::now();
    fleet.redis.pipe(&resp)?;
    wait_until(|| Ok(hosts[1].applied()? >= before + applied as u64))?;
    let applied_per_sec = applied as f64 / started.elapsed().as_secs_f64();
    let import_per_sec = import_rate(&fleet.hosts[0], applied)?;
    Ok(ClusterFigures {
        verdicts,
        propagation,
        local_add: Duration::from_secs_f64(median(local)),
        applied,
        applied_per_sec,
        import_per_sec,
    })
}

/// Entries/s of one `deny import` of `count` fresh /32s on `lab`.
fn import_rate(lab: &Lab, count: usize) -> Result<f64> {
    let list: Vec<String> = (0..count).map(|i| bench_addr(100_000, i)).collect();
    let path = lab.dir().join("bench-import.txt");
    std::fs::write(&path, list.join("\n"))?;
    let started = Instant::now();
    let out = lab
        .daemon()
        .cli(&["deny", "import", path.to_str().unwrap()]);
    let elapsed = started.elapsed();
    ensure!(
        out.status.success(),
        "import failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(count as f64 / elapsed.as_secs_f64())
}

fn wait_until(mut done: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done()? {
        ensure!(Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
