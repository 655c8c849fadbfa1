//! CLI side of the control socket: one blocking request, one reply.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::{bail, Context, Result};

use super::protocol::{Reply, Request};

/// Sends `request` to the daemon listening on `socket`.
///
/// Connection failures become one clear "daemon not running" message, since
/// that is what they mean in practice.
pub fn send(socket: &Path, request: &Request) -> Result<Reply> {
    let stream = match UnixStream::connect(socket) {
        Ok(stream) => stream,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            bail!(
                "gatekeeper daemon is not running (nothing listening on {})",
                socket.display()
            )
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            bail!(
                "permission denied on {}: the control socket is for root and the daemon's control_group",
                socket.display()
            )
        }
        Err(e) => {
            return Err(e).with_context(|| format!("connecting to {}", socket.display()));
        }
    };
    // A daemon that refuses the request (or the peer) may close before reading
    // all of it: its reply, already sent, says why, so read it before the write error.
    let sent = write_request(&stream, request);
    let mut line = String::new();
    let read = BufReader::new(&stream).read_line(&mut line);
    if line.is_empty() {
        sent?;
        read.context("reading the daemon's reply")?;
        bail!("the daemon closed the connection without replying");
    }
    serde_json::from_str(&line).context("decoding the daemon's reply")
}

fn write_request(stream: &UnixStream, request: &Request) -> Result<()> {
    let mut writer = std::io::BufWriter::new(stream);
    serde_json::to_writer(&mut writer, request).context("encoding request")?;
    writer.write_all(b"\n")?;
    writer.flush().context("sending request to the daemon")
}
