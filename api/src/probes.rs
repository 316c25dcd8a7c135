//! The HTTP endpoints every Tessera binary serves on its metrics address:
//! `/metrics` (a Prometheus registry in OpenMetrics text), `/healthz`
//! (the process answers) and `/readyz` (it finished starting).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::warn;

/// What `/readyz` asks: true once the process is ready.
pub type Readiness = Arc<dyn Fn() -> bool + Send + Sync>;

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

/// The answer to a GET of `path`.
pub fn respond(path: &str, registry: &Registry, ready: &Readiness) -> Response<Full<Bytes>> {
    match path {
        "/metrics" => {
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, registry) {
                Ok(()) => {
                    let mut r = text(StatusCode::OK, body);
                    if let Ok(v) =
                        "application/openmetrics-text; version=1.0.0; charset=utf-8".parse()
                    {
                        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
                    }
                    r
                }
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("encoding metrics failed: {e}\n"),
                ),
            }
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" if ready() => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "initializing\n".into()),
        _ => text(
            StatusCode::NOT_FOUND,
            "try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

/// Binds `addr` and serves the endpoints until the task is dropped; returns
/// the bound address (useful with port 0).
pub async fn serve(
    addr: SocketAddr,
    registry: Registry,
    ready: Readiness,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let registry = Arc::new(registry);
    let task = tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    warn!(error = %e, "metrics listener accept failed");
                    continue;
                }
            };
            let (registry, ready) = (registry.clone(), ready.clone());
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let response = respond(req.uri().path(), &registry, &ready);
                        async move { Ok::<_, Infallible>(response) }
                    });
                let io = hyper_util::rt::TokioIo::new(stream);
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await
                {
                    warn!(error = %e, "metrics connection failed");
                }
            });
        }
    });
    Ok((bound, task))
}
