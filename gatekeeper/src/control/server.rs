//! Daemon side of the control socket.

use std::future::Future;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use super::framing::{read_line, Frame};
use super::peer::{Access, Peer};
use super::protocol::{decode_request, Reply, Request};

/// Handles one request. Handlers that fsync or touch a million map entries
/// go through [`run_locked`], which moves them to a blocking thread.
pub type Handler =
    Arc<dyn Fn(Request) -> Pin<Box<dyn Future<Output = Reply> + Send>> + Send + Sync>;

/// What one peer may cost the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlLimits {
    /// One request line; a million-prefix import is about 40 MB of JSON.
    pub max_line_bytes: usize,
    /// Longest wait for the next byte of a request, or for the peer to take a reply.
    pub idle_timeout: Duration,
    /// Control connections served at once; more are refused with an error line.
    pub max_connections: usize,
}

impl Default for ControlLimits {
    fn default() -> Self {
        ControlLimits {
            max_line_bytes: 128 << 20,
            idle_timeout: Duration::from_secs(60),
            max_connections: 16,
        }
    }
}

/// Replies are written in pieces, each under the idle limit, so a reader
/// that stops reading is dropped without capping a large, steady reply.
const WRITE_CHUNK: usize = 64 << 10;

pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
    access: Arc<Access>,
    limits: ControlLimits,
}

impl ControlSocket {
    /// Binds `path` (0600, or 0660 owned by `control_group`), refusing to
    /// steal the socket of a live daemon.
    ///
    /// The socket is bound in a fresh 0700 directory, given its final owner
    /// and mode there, then renamed into place: it is never reachable with a
    /// wider mode, whatever the umask.
    pub fn bind(path: &Path, control_group: Option<&str>) -> Result<ControlSocket> {
        let access = Access::resolve(control_group)?;
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            bail!("control_socket: '{}' is not a file path", path.display());
        };
        prepare_directory(dir)?;
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another gatekeeper daemon is already running on {}",
                path.display()
            );
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => bail!(
                "control_socket: {} exists and is not a socket; not replacing it",
                path.display()
            ),
            Ok(_) => debug!(path = %path.display(), "replacing stale control socket"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("control_socket: {}", path.display())),
        }
        let staging = tempfile::Builder::new()
            .prefix(".gatekeeper-bind-")
            .tempdir_in(dir)
            .with_context(|| {
                format!(
                    "control_socket: cannot create a directory in {}",
                    dir.display()
                )
            })?;
        let staged = staging.path().join(name);
        let listener = UnixListener::bind(&staged)
            .with_context(|| format!("control_socket: cannot bind {}", path.display()))?;
        if let Some(gid) = access.socket_group() {
            nix::unistd::chown(&staged, None, Some(gid)).with_context(|| {
                format!("control_group: cannot give {} to gid {gid}", path.display())
            })?;
        }
        std::fs::set_permissions(
            &staged,
            std::fs::Permissions::from_mode(access.socket_mode()),
        )
        .with_context(|| format!("control_socket: cannot chmod {}", path.display()))?;
        std::fs::rename(&staged, path).with_context(|| {
            format!(
                "control_socket: cannot move the socket to {}",
                path.display()
            )
        })?;
        Ok(ControlSocket {
            listener,
            path: path.to_owned(),
            access: Arc::new(access),
            limits: ControlLimits::default(),
        })
    }

    pub fn with_limits(mut self, limits: ControlLimits) -> ControlSocket {
        self.limits = limits;
        self
    }

    pub async fn serve(self, handler: Handler) {
        let slots = Arc::new(Semaphore::new(self.limits.max_connections));
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, typically: back off instead of spinning.
                    warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if let Err(refusal) = self.admit(&stream) {
                refuse(&stream, &refusal);
                continue;
            }
            match slots.clone().try_acquire_owned() {
                Ok(slot) => {
                    let handler = handler.clone();
                    let limits = self.limits;
                    tokio::spawn(async move {
                        serve_connection(stream, handler, limits).await;
                        drop(slot);
                    });
                }
                Err(_) => {
                    let message = format!(
                        "too many control connections (limit {}); try again",
                        self.limits.max_connections
                    );
                    warn!(
                        limit = self.limits.max_connections,
                        "control connection refused: at the connection limit"
                    );
                    refuse(&stream, &message);
                }
            }
        }
    }

    /// Checks the peer's credentials; refusals are logged here.
    fn admit(&self, stream: &UnixStream) -> Result<(), String> {
        let peer = match stream.peer_cred() {
            Ok(cred) => Peer {
                uid: cred.uid(),
                gid: cred.gid(),
                pid: cred.pid(),
            },
            Err(e) => {
                warn!(error = %e, "control connection refused: no peer credentials");
                return Err(format!("permission denied: no peer credentials ({e})"));
            }
        };
        self.access.check(stream.as_fd(), &peer).inspect_err(|reason| {
            warn!(uid = peer.uid, gid = peer.gid, pid = ?peer.pid, %reason, "control connection refused");
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlSocket {
    /// The socket file goes with the listener, on shutdown and on failed start-up alike.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Creates the socket's directory (0755) if needed and refuses one where
/// anybody could replace the socket with their own.
fn prepare_directory(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .with_context(|| format!("control_socket: cannot create {}", dir.display()))?;
    let mode = std::fs::metadata(dir)
        .with_context(|| format!("control_socket: {}", dir.display()))?
        .permissions()
        .mode();
    if mode & 0o002 != 0 && mode & 0o1000 == 0 {
        bail!(
            "control_socket: {} is writable by everyone (mode {:o}); use a directory only root can write",
            dir.display(),
            mode & 0o7777
        );
    }
    Ok(())
}

/// One error line and close. Non-blocking: a fresh connection's buffer has room,
/// and a refused peer must not hold up the accept loop.
fn refuse(stream: &UnixStream, message: &str) {
    let _ = stream.try_write(&encode(&Reply::failed(message)));
}

fn encode(reply: &Reply) -> Vec<u8> {
    let mut out = serde_json::to_vec(reply).unwrap_or_else(|e| {
        format!(r#"{{"reply":"error","kind":"failed","message":"encoding reply: {e}"}}"#)
            .into_bytes()
    });
    out.push(b'\n');
    out
}

async fn serve_connection(stream: UnixStream, handler: Handler, limits: ControlLimits) {
    let (reader, mut writer) = stream.into_split();
    let mut reader = BufReader::with_capacity(WRITE_CHUNK, reader);
    loop {
        let (reply, then_close) =
            match read_line(&mut reader, limits.max_line_bytes, limits.idle_timeout).await {
                Frame::Closed => return,
                Frame::Failed(e) => {
                    debug!(error = %e, "control connection read failed");
                    return;
                }
                Frame::Idle => {
                    debug!("control connection idle; closing");
                    let secs = limits.idle_timeout.as_secs_f64();
                    (
                        Reply::failed(format!("idle for {secs}s; closing the connection")),
                        true,
                    )
                }
                Frame::TooLong => {
                    warn!(
                        limit = limits.max_line_bytes,
                        "control request over the line limit; closing"
                    );
                    let message = format!(
                        "request line longer than {} bytes; closing the connection",
                        limits.max_line_bytes
                    );
                    (Reply::invalid(message), true)
                }
                Frame::Line(line) => {
                    let received = std::time::Instant::now();
                    let decoded = decode_request(&line);
                    debug!(
                        bytes = line.len(),
                        parse_ms = received.elapsed().as_millis() as u64,
                        "control request"
                    );
                    drop(line);
                    match decoded {
                        Ok(request) => (handler(request).await, false),
                        Err(refusal) => (Reply::invalid(refusal.to_string()), false),
                    }
                }
            };
        let out = encode(&reply);
        drop(reply);
        for chunk in out.chunks(WRITE_CHUNK) {
            match tokio::time::timeout(limits.idle_timeout, writer.write_all(chunk)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return,
            }
        }
        if then_close {
            let _ = writer.shutdown().await;
            return;
        }
    }
}

/// Runs `f` on shared daemon state on a blocking thread, one request at a time.
pub async fn run_locked<T: Send + 'static>(
    state: Arc<Mutex<T>>,
    f: impl FnOnce(&mut T) -> Reply + Send + 'static,
) -> Reply {
    tokio::task::spawn_blocking(move || match state.lock() {
        Ok(mut guard) => f(&mut guard),
        Err(_) => Reply::failed("daemon state poisoned by an earlier panic; restart gatekeeper"),
    })
    .await
    .unwrap_or_else(|e| Reply::failed(format!("request handler crashed: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::protocol::{ChangeSummary, ErrorKind};
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    }

    /// Serves every request with an empty change summary.
    fn start(limits: ControlLimits) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let socket = ControlSocket::bind(&path, None)
            .unwrap()
            .with_limits(limits);
        let handler: Handler =
            Arc::new(|_| Box::pin(async { Reply::Changed(ChangeSummary::default()) }));
        tokio::spawn(socket.serve(handler));
        (dir, path)
    }

    struct Client {
        reader: BufReader<tokio::net::unix::OwnedReadHalf>,
        writer: tokio::net::unix::OwnedWriteHalf,
    }

    impl Client {
        async fn connect(path: &Path) -> Client {
            let (reader, writer) = UnixStream::connect(path).await.unwrap().into_split();
            Client {
                reader: BufReader::new(reader),
                writer,
            }
        }

        async fn send(&mut self, bytes: &[u8]) {
            self.writer.write_all(bytes).await.unwrap();
        }

        async fn reply(&mut self) -> Reply {
            let mut line = String::new();
            self.reader.read_line(&mut line).await.unwrap();
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
        }

        async fn closed_by_daemon(&mut self) -> bool {
            let mut rest = Vec::new();
            matches!(self.reader.read_to_end(&mut rest).await, Ok(0))
        }
    }

    fn error(reply: Reply) -> (ErrorKind, String) {
        match reply {
            Reply::Error { kind, message } => (kind, message),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    const STATS: &[u8] = b"{\"op\":\"stats\"}\n";

    #[tokio::test]
    async fn socket_is_private_from_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/control.sock");
        let socket = ControlSocket::bind(&path, None).unwrap();
        assert_eq!(mode(&path), 0o600);
        let parent = path.parent().unwrap();
        assert_eq!(mode(parent) & 0o022, 0, "directory writable by others");
        let names: Vec<_> = std::fs::read_dir(parent)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["control.sock"], "staging directory left behind");
        drop(socket);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn group_socket_is_0660_and_group_owned() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let gid = nix::unistd::getegid().as_raw();
        let _socket = ControlSocket::bind(&path, Some(&gid.to_string())).unwrap();
        assert_eq!(mode(&path), 0o660);
        assert_eq!(std::fs::metadata(&path).unwrap().gid(), gid);
    }

    #[tokio::test]
    async fn refuses_shared_directories_and_non_sockets() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = ControlSocket::bind(&dir.path().join("c.sock"), None)
            .err()
            .unwrap();
        assert!(err.to_string().contains("writable by everyone"), "{err}");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let file = dir.path().join("precious");
        std::fs::write(&file, "keep me").unwrap();
        let err = ControlSocket::bind(&file, None).err().unwrap();
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
    }

    #[tokio::test]
    async fn over_long_line_gets_an_error_then_close() {
        let limits = ControlLimits {
            max_line_bytes: 1024,
            ..ControlLimits::default()
        };
        let (_dir, path) = start(limits);
        let mut client = Client::connect(&path).await;
        client.send(STATS).await;
        assert!(matches!(client.reply().await, Reply::Changed(_)));
        let mut long = vec![b' '; 2000];
        long.push(b'\n');
        client.send(&long).await;
        let (kind, message) = error(client.reply().await);
        assert_eq!(kind, ErrorKind::InvalidInput);
        assert!(message.contains("longer than 1024 bytes"), "{message}");
        assert!(client.closed_by_daemon().await);
    }

    #[tokio::test]
    async fn the_cli_client_sees_the_refusal_of_a_request_far_over_the_cap() {
        use crate::control::protocol::WireEntry;
        use crate::lists::ListKind;
        let limits = ControlLimits {
            max_line_bytes: 1024,
            ..ControlLimits::default()
        };
        let (_dir, path) = start(limits);
        // Megabytes the daemon never reads: the client's write fails, the reply still arrives.
        let entries = (0..100_000u32)
            .map(|i| WireEntry {
                prefix: std::net::IpAddr::from(std::net::Ipv4Addr::from(i)).into(),
                reason: Some("bulk".into()),
                ttl_secs: None,
            })
            .collect();
        let request = Request::ListAdd {
            list: ListKind::Deny,
            entries,
            share: false,
        };
        let reply =
            tokio::task::spawn_blocking(move || crate::control::client::send(&path, &request))
                .await
                .unwrap()
                .unwrap();
        let (kind, message) = error(reply);
        assert_eq!(kind, ErrorKind::InvalidInput);
        assert!(message.contains("longer than 1024 bytes"), "{message}");
    }

    #[tokio::test]
    async fn invalid_utf8_gets_an_error_and_the_connection_lives_on() {
        let (_dir, path) = start(ControlLimits::default());
        let mut client = Client::connect(&path).await;
        client.send(b"{\"op\":\"\xff\xfe\"}\n").await;
        let (kind, message) = error(client.reply().await);
        assert_eq!(kind, ErrorKind::InvalidInput);
        assert!(message.contains("UTF-8"), "{message}");
        client.send(STATS).await;
        assert!(matches!(client.reply().await, Reply::Changed(_)));
    }

    #[tokio::test]
    async fn idle_connections_are_closed_with_a_reason() {
        let limits = ControlLimits {
            idle_timeout: Duration::from_millis(200),
            ..ControlLimits::default()
        };
        let (_dir, path) = start(limits);
        let mut client = Client::connect(&path).await;
        client.send(STATS).await;
        assert!(matches!(client.reply().await, Reply::Changed(_)));
        // Half a request, then silence.
        client.send(b"{\"op\":").await;
        let (kind, message) = error(client.reply().await);
        assert_eq!(kind, ErrorKind::Failed);
        assert!(message.contains("idle"), "{message}");
        assert!(client.closed_by_daemon().await);
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_refused_and_slots_come_back() {
        let limits = ControlLimits {
            max_connections: 2,
            ..ControlLimits::default()
        };
        let (_dir, path) = start(limits);
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut client = Client::connect(&path).await;
            client.send(STATS).await;
            assert!(matches!(client.reply().await, Reply::Changed(_)));
            held.push(client);
        }
        let mut extra = Client::connect(&path).await;
        let (kind, message) = error(extra.reply().await);
        assert_eq!(kind, ErrorKind::Failed);
        assert!(
            message.contains("too many control connections (limit 2)"),
            "{message}"
        );
        assert!(extra.closed_by_daemon().await);
        // Held connections are still served; a closed one frees its slot.
        held[1].send(STATS).await;
        assert!(matches!(held[1].reply().await, Reply::Changed(_)));
        drop(held.remove(0));
        loop {
            let mut client = Client::connect(&path).await;
            // Refused while the slot is still being released: the write may meet a closed socket.
            let _ = client.writer.write_all(STATS).await;
            if let Reply::Changed(_) = client.reply().await {
                break;
            }
            tokio::task::yield_now().await;
        }
    }
}
