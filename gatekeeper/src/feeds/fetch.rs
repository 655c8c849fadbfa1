//! Getting a feed's bytes: conditional HTTP(S) requests with a size cap
//! and a timeout, or a local file.

use std::time::Duration;

use reqwest::header::{HeaderMap, ETAG, IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};

use super::config::Source;

/// What the server said identifies the copy we hold (RFC 9110 validators).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Validators {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_modified: Option<String>,
}

impl Validators {
    fn from_headers(headers: &HeaderMap) -> Validators {
        let text = |name| {
            headers
                .get(name)
                .and_then(|v: &reqwest::header::HeaderValue| v.to_str().ok())
                .map(str::to_owned)
        };
        Validators {
            etag: text(ETAG),
            last_modified: text(LAST_MODIFIED),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Fetched {
    /// 304: the copy we hold is current.
    NotModified,
    Body {
        text: String,
        validators: Validators,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("request failed: {0}")]
    Request(String),
    #[error("HTTP status {0}")]
    Status(StatusCode),
    #[error("body over the {0}-byte limit (max_bytes)")]
    TooLarge(u64),
    #[error("body is not UTF-8 text")]
    NotText,
    #[error("cannot read {path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
}

/// One HTTP client for every feed (connection reuse, one TLS setup).
///
/// A host without CA certificates (a minimal container, the test VM) cannot
/// verify any server, but plain-HTTP feeds (a local mirror) must still work
/// there: the client then trusts no root, so every https feed fails its
/// certificate check, loudly, while http ones are fetched.
pub fn client() -> Result<reqwest::Client, FetchError> {
    // reqwest is built without a default crypto provider; the rest of the
    // daemon's TLS uses ring, so feeds do too. Already installed is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let builder = || {
        reqwest::Client::builder()
            .user_agent(concat!("gatekeeper/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(20))
    };
    match builder().build() {
        Ok(client) => Ok(client),
        Err(system_roots) => {
            let reason = error_chain(&system_roots);
            tracing::warn!(
                error = %reason,
                "no usable system CA certificates: https feeds will fail verification, http and file feeds work"
            );
            builder().tls_certs_only(Vec::new()).build().map_err(|e| {
                FetchError::Request(format!("{reason}; without roots: {}", error_chain(&e)))
            })
        }
    }
}

/// Fetches `source`, conditionally on `held` (the validators of the copy we hold).
/// `client` is needed for URLs only: a host without CA certificates (where
/// it cannot be built) still serves path feeds, and starts at all.
pub async fn fetch(
    client: &Result<reqwest::Client, FetchError>,
    source: Source<'_>,
    held: &Validators,
    timeout: Duration,
    max_bytes: u64,
) -> Result<Fetched, FetchError> {
    match source {
        Source::Url(url) => {
            let client = client
                .as_ref()
                .map_err(|e| FetchError::Request(format!("no HTTP client: {e}")))?;
            fetch_url(client, url.clone(), held, timeout, max_bytes).await
        }
        Source::Path(path) => read_file(path, max_bytes).await,
    }
}

async fn fetch_url(
    client: &reqwest::Client,
    url: url::Url,
    held: &Validators,
    timeout: Duration,
    max_bytes: u64,
) -> Result<Fetched, FetchError> {
    let mut request = client.get(url).timeout(timeout);
    if let Some(etag) = &held.etag {
        request = request.header(IF_NONE_MATCH, etag);
    }
    if let Some(date) = &held.last_modified {
        request = request.header(IF_MODIFIED_SINCE, date);
    }
    let failed = |e: reqwest::Error| FetchError::Request(error_chain(&e));
    let mut response = request.send().await.map_err(failed)?;
    match response.status() {
        StatusCode::NOT_MODIFIED => return Ok(Fetched::NotModified),
        status if !status.is_success() => return Err(FetchError::Status(status)),
        _ => {}
    }
    if response.content_length().is_some_and(|len| len > max_bytes) {
        return Err(FetchError::TooLarge(max_bytes));
    }
    let validators = Validators::from_headers(response.headers());
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(failed)? {
        if (body.len() + chunk.len()) as u64 > max_bytes {
            return Err(FetchError::TooLarge(max_bytes));
        }
        body.extend_from_slice(&chunk);
    }
    let text = String::from_utf8(body).map_err(|_| FetchError::NotText)?;
    Ok(Fetched::Body { text, validators })
}

/// A local file is read whole each time (no validators: parsing is cheap
/// and an unchanged file changes nothing in the store).
async fn read_file(path: &std::path::Path, max_bytes: u64) -> Result<Fetched, FetchError> {
    let failed = |source| FetchError::File {
        path: path.display().to_string(),
        source,
    };
    let len = tokio::fs::metadata(path).await.map_err(failed)?.len();
    if len > max_bytes {
        return Err(FetchError::TooLarge(max_bytes));
    }
    let bytes = tokio::fs::read(path).await.map_err(failed)?;
    if bytes.len() as u64 > max_bytes {
        return Err(FetchError::TooLarge(max_bytes));
    }
    let text = String::from_utf8(bytes).map_err(|_| FetchError::NotText)?;
    Ok(Fetched::Body {
        text,
        validators: Validators::default(),
    })
}

/// reqwest's error with its causes ("error sending request: connection refused").
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
