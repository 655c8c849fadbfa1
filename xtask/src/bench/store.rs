//! The durable store under load: single-change latency through the real
//! CLI with a large list loaded, and durable changes/s from concurrent
//! clients (group commit), each next to a baseline from the same run.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use sandbox::lab::Lab;

use super::{generate_prefixes, median};

pub struct StoreFigures {
    pub entries: usize,
    pub samples: usize,
    pub add: Duration,
    pub del: Duration,
    /// A read-only CLI round trip (`gatekeeper stats`).
    pub stats: Duration,
    pub clients: usize,
    pub changes_per_sec: f64,
    /// Append + fdatasync of a small record in the state directory, one after another.
    pub fsyncs_per_sec: f64,
}

pub fn run(quick: bool) -> Result<StoreFigures> {
    let (entries, samples, clients, per_client) = if quick {
        (10_000, 9, 8, 25)
    } else {
        (1_000_000, 41, 32, 250)
    };
    let mut lab = Lab::two_hosts("benchstore", "peer")?;
    lab.start_daemon("")?;
    let prefixes = generate_prefixes(entries);
    let list = lab.dir().join("list.txt");
    std::fs::write(&list, prefixes.join("\n"))?;
    let out = lab
        .daemon()
        .cli(&["deny", "import", list.to_str().unwrap()]);
    ensure!(
        out.status.success(),
        "import failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let loaded: HashSet<String> = prefixes.into_iter().collect();
    // Fresh /32s in 198.18.0.0/15 (benchmarking range) that the list does not hold.
    let mut fresh = (0u32..1 << 17)
        .map(|i| format!("198.{}.{}.{}/32", 18 + (i >> 16), (i >> 8) & 0xff, i & 0xff))
        .filter(|p| !loaded.contains(p));

    let timed = |args: &[&str]| -> Result<Duration> {
        let started = Instant::now();
        let out = lab.daemon().cli(args);
        let elapsed = started.elapsed();
        ensure!(
            out.status.success(),
            "gatekeeper {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(elapsed)
    };
    let (mut add, mut del, mut stats) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..samples {
        let prefix = fresh.next().context("out of fresh prefixes")?;
        stats.push(timed(&["stats"])?.as_secs_f64());
        add.push(timed(&["deny", "add", &prefix])?.as_secs_f64());
        del.push(timed(&["deny", "del", &prefix])?.as_secs_f64());
    }

    // Concurrent clients, each on its own control connection, one change at a time.
    let batches: Vec<Vec<String>> = (0..clients)
        .map(|_| fresh.by_ref().take(per_client).collect())
        .collect();
    ensure!(
        batches.iter().all(|b| b.len() == per_client),
        "out of fresh prefixes"
    );
    let socket = lab.control_socket();
    let started = Instant::now();
    let workers: Vec<_> = batches
        .into_iter()
        .map(|batch| {
            let socket = socket.clone();
            std::thread::spawn(move || change_stream(&socket, &batch))
        })
        .collect();
    for worker in workers {
        worker.join().expect("client thread")?;
    }
    let changes_per_sec = (clients * per_client) as f64 / started.elapsed().as_secs_f64();
    let fsyncs_per_sec = bare_fsync_rate(&lab.state_dir(), if quick { 50 } else { 500 })?;
    Ok(StoreFigures {
        entries,
        samples,
        add: Duration::from_secs_f64(median(add)),
        del: Duration::from_secs_f64(median(del)),
        stats: Duration::from_secs_f64(median(stats)),
        clients,
        changes_per_sec,
        fsyncs_per_sec,
    })
}

/// Adds each prefix with its own request and waits for each acknowledgement.
fn change_stream(socket: &Path, prefixes: &[String]) -> Result<()> {
    let stream = UnixStream::connect(socket).context("connecting to the control socket")?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let mut reply = String::new();
    for prefix in prefixes {
        writeln!(
            writer,
            "{{\"op\":\"list_add\",\"list\":\"deny\",\"entries\":[{{\"prefix\":\"{prefix}\"}}]}}"
        )?;
        reply.clear();
        reader.read_line(&mut reply)?;
        ensure!(
            reply.contains("\"changed\"") && reply.contains("\"added\":1"),
            "adding {prefix}: {reply}"
        );
    }
    Ok(())
}

/// Small appends, each fdatasynced before the next: the rate a store
/// without group commit could acknowledge at most.
fn bare_fsync_rate(dir: &Path, count: usize) -> Result<f64> {
    let path = dir.join("bench-fsync.tmp");
    let mut file = std::fs::File::create(&path)?;
    let started = Instant::now();
    for _ in 0..count {
        file.write_all(&[0u8; 64])?;
        file.sync_data()?;
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    std::fs::remove_file(&path)?;
    Ok(rate)
}
