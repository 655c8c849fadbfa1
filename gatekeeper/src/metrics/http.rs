//! `/metrics` over HTTP/1 with hyper; everything else is 404.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{ACCEPT, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

/// Scrapers are few; a flood of connections must not cost more than this many tasks.
const MAX_CONNECTIONS: usize = 32;
/// A client that does not finish its request headers in this time is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds `[metrics] listen`; done at start-up with the other listeners.
pub fn bind(addr: SocketAddr) -> Result<TcpListener> {
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("metrics.listen: cannot bind {addr}"))?;
    listener.set_nonblocking(true)?;
    Ok(TcpListener::from_std(listener)?)
}

/// Serves until dropped; dropping it also ends every open connection.
pub async fn serve(listener: TcpListener, registry: Arc<Registry>) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "metrics endpoint listening");
    }
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        let registry = registry.clone();
        connections.spawn(async move {
            let _slot = slot;
            let service = service_fn(move |request| {
                let response = respond(&registry, &request);
                async move { Ok::<_, Infallible>(response) }
            });
            let served = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                debug!(%peer, error = %e, "metrics connection ended with an error");
            }
        });
    }
}

/// The answer to one request. Pure but for encoding the registry.
fn respond<B>(registry: &Registry, request: &Request<B>) -> Response<Full<Bytes>> {
    if request.uri().path() != "/metrics" {
        return plain(
            StatusCode::NOT_FOUND,
            "not found; metrics are at /metrics\n",
        );
    }
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD only\n");
    }
    let accept = request
        .headers()
        .get(ACCEPT)
        .and_then(|value| value.to_str().ok());
    let (content_type, body) = super::encode(registry, accept);
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response.headers_mut().insert(
        CONTENT_TYPE,
        content_type.parse().expect("static content type"),
    );
    response
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        "text/plain; charset=utf-8"
            .parse()
            .expect("static content type"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn get(path: &str, method: Method) -> Response<Full<Bytes>> {
        let mut registry = super::super::new_registry();
        let counter = prometheus_client::metrics::counter::Counter::<u64>::default();
        registry.register("probes", "Probes", counter.clone());
        counter.inc();
        let request = Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .unwrap();
        respond(&registry, &request)
    }

    #[tokio::test]
    async fn serves_metrics_and_nothing_else() {
        let response = get("/metrics", Method::GET);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()[CONTENT_TYPE],
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE
        );
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(std::str::from_utf8(&body)
            .unwrap()
            .contains("gatekeeper_probes_total 1\n"));
        assert_eq!(get("/", Method::GET).status(), StatusCode::NOT_FOUND);
        assert_eq!(
            get("/metrics/x", Method::GET).status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            get("/metrics", Method::POST).status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }
}
