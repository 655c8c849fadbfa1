//! Daemon side of the control socket.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, warn};

use super::protocol::{Reply, Request};

/// A request is one line; a million-prefix import is about 40 MB of JSON.
const MAX_REQUEST_BYTES: u64 = 512 << 20;

/// Handles one request. Handlers that fsync or touch a million map entries
/// go through [`run_locked`], which moves them to a blocking thread.
pub type Handler =
    Arc<dyn Fn(Request) -> Pin<Box<dyn Future<Output = Reply> + Send>> + Send + Sync>;

pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    /// Binds `path` with mode 0600, refusing to steal the socket of a live daemon.
    pub fn bind(path: &Path) -> Result<ControlSocket> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("control_socket: cannot create {}", dir.display()))?;
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another gatekeeper daemon is already running on {}",
                path.display()
            );
        }
        match std::fs::remove_file(path) {
            Ok(()) => debug!(path = %path.display(), "removed stale control socket"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
        let listener = UnixListener::bind(path)
            .with_context(|| format!("control_socket: cannot bind {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("control_socket: cannot chmod {}", path.display()))?;
        Ok(ControlSocket {
            listener,
            path: path.to_owned(),
        })
    }

    pub async fn serve(self, handler: Handler) {
        loop {
            match self.listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(serve_connection(stream, handler.clone()));
                }
                Err(e) => warn!(error = %e, "control socket accept failed"),
            }
        }
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

async fn serve_connection(stream: UnixStream, handler: Handler) {
    let (reader, mut writer) = stream.into_split();
    let mut lines = BufReader::new(reader.take(MAX_REQUEST_BYTES));
    let mut line = String::new();
    loop {
        line.clear();
        match lines.read_line(&mut line).await {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => {
                debug!(error = %e, "control connection read failed");
                return;
            }
        }
        let received = std::time::Instant::now();
        let parsed = serde_json::from_str::<Request>(&line);
        debug!(
            bytes = line.len(),
            parse_ms = received.elapsed().as_millis() as u64,
            "control request"
        );
        let reply = match parsed {
            Ok(request) => handler(request).await,
            Err(e) if !line.ends_with('\n') => {
                Reply::invalid(format!("request too large or truncated: {e}"))
            }
            Err(e) => Reply::invalid(format!("malformed request: {e}")),
        };
        let mut out = serde_json::to_vec(&reply).unwrap_or_else(|e| {
            format!(r#"{{"reply":"error","kind":"failed","message":"encoding reply: {e}"}}"#)
                .into_bytes()
        });
        out.push(b'\n');
        if writer.write_all(&out).await.is_err() {
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
