//! Node-local debug endpoint (default 127.0.0.1:15000): readiness, metrics,
//! config and live connections. Bound to loopback because it reveals workload
//! identities and traffic.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::metrics::Format;
use crate::reconciler::Agent;

/// Serves the endpoint until the process exits, or until the agent hands over
/// (the successor then serves it on the same socket).
pub async fn serve(listener: TcpListener, agent: Arc<Agent>) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = agent.drain.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            // Out of descriptors: reset the waiting client rather than spin.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                if !agent.limits.shed_one(&listener, "", "admin") {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| route(req, agent.clone()));
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "admin connection error");
            }
        });
    }
}

/// Binds the admin address, with a clear error if it is taken.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding the admin endpoint on {addr}: {e}"))
}

fn respond(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()))
        .expect("static response parts are valid")
}

fn json(value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => respond(StatusCode::OK, "application/json", body),
        Err(e) => respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            e.to_string(),
        ),
    }
}

async fn route(
    req: Request<Incoming>,
    agent: Arc<Agent>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::GET {
        return Ok(respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n",
        ));
    }
    let response = match req.uri().path() {
        // Ready stays ready with the CA files gone: traffic flows on the
        // certificates loaded before, and the body says what is wrong.
        "/healthz/ready" if agent.is_ready() => {
            let body = match agent.identity.as_ref().and_then(|i| i.error()) {
                Some(e) => format!(
                    "ready\nwarning: mesh CA: {e}; serving with the CA and certificates loaded before\n"
                ),
                None => "ready\n".to_owned(),
            };
            respond(StatusCode::OK, "text/plain", body)
        }
        "/healthz/ready" => respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "config not applied yet\n",
        ),
        "/metrics" => {
            agent.metrics.refresh_from_kernel(&agent.capture);
            let accept = req
                .headers()
                .get(hyper::header::ACCEPT)
                .and_then(|v| v.to_str().ok());
            let format = Format::negotiate(accept);
            respond(
                StatusCode::OK,
                format.content_type(),
                agent.metrics.encode_as(format),
            )
        }
        "/config_dump" => json(&agent.config_dump().await),
        "/connections" if req.uri().query() == Some("failed") => json(&agent.connections.failed()),
        "/connections" => json(&agent.connections.snapshot()),
        "/debug/explain" => {
            let query = crate::explain::Query::from_url_query(req.uri().query().unwrap_or(""));
            match query {
                Ok(q) => match agent.explain(&q).await {
                    Ok(e) => json(&e),
                    Err(e) => respond(StatusCode::NOT_FOUND, "text/plain", format!("{e}\n")),
                },
                Err(e) => respond(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
            }
        }
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "endpoints: /healthz/ready /metrics /config_dump /connections /connections?failed /debug/explain?source=ns/name&destination=host:port\n",
        ),
    };
    Ok(response)
}
