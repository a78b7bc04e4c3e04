//! Node-local debug endpoint (default 127.0.0.1:15000): readiness, metrics,
//! config and live connections. Bound to loopback because it reveals workload
//! identities and traffic.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::metrics::Format;
use crate::reconciler::Agent;

/// Every admin response: whole documents, or the trace's stream of lines.
type Body = UnsyncBoxBody<Bytes, Infallible>;

/// How long `/debug/trace` streams when the watcher names no duration.
const TRACE_DEFAULT_SECONDS: u64 = 30;
/// The longest trace one request may hold the kernel's trace bits on for.
const TRACE_MAX_SECONDS: u64 = 3600;

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

fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()).boxed_unsync())
        .expect("static response parts are valid")
}

fn json(value: &impl serde::Serialize) -> Response<Body> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => respond(StatusCode::OK, "application/json", body),
        Err(e) => respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            e.to_string(),
        ),
    }
}

async fn route(req: Request<Incoming>, agent: Arc<Agent>) -> Result<Response<Body>, Infallible> {
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
        "/debug/trace" => trace(&agent, req.uri().query().unwrap_or("")).await,
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "endpoints: /healthz/ready /metrics /config_dump /connections /connections?failed /debug/explain?source=ns/name&destination=host:port /debug/trace?workload=ns/name&seconds=30\n",
        ),
    };
    Ok(response)
}

/// `/debug/trace?workload=<ns/name | pod ip>&seconds=<n>`: switches the
/// kernel's verdict reports on for that workload and streams them as JSON
/// lines until the time is up, the watcher goes away or the agent drains;
/// then switches them off again. The first line says what is traced.
async fn trace(agent: &Arc<Agent>, query: &str) -> Response<Body> {
    let mut workload = None;
    let mut seconds = TRACE_DEFAULT_SECONDS;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "workload" => workload = Some(v.into_owned()),
            "seconds" => match v.parse::<u64>() {
                Ok(n) if (1..=TRACE_MAX_SECONDS).contains(&n) => seconds = n,
                _ => {
                    return respond(
                        StatusCode::BAD_REQUEST,
                        "text/plain",
                        format!("seconds={v}: expected 1 to {TRACE_MAX_SECONDS}\n"),
                    );
                }
            },
            other => {
                return respond(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    format!("unknown parameter {other:?}\n"),
                );
            }
        }
    }
    let Some(workload) = workload else {
        return respond(
            StatusCode::BAD_REQUEST,
            "text/plain",
            "workload=<namespace/name or pod IP> is required\n",
        );
    };
    let mut session = match agent.start_trace(&workload).await {
        Ok(s) => s,
        Err(e) => return respond(StatusCode::NOT_FOUND, "text/plain", format!("{e}\n")),
    };
    let (lines, body) = tokio::sync::mpsc::channel::<Bytes>(256);
    let agent = agent.clone();
    tokio::spawn(async move {
        let line = |value: serde_json::Value| {
            let mut text = value.to_string();
            text.push('\n');
            Bytes::from(text)
        };
        let started = line(serde_json::json!({
            "tracing": session.workload,
            "workloadId": session.workload_id,
            "addresses": session.ips,
            "seconds": seconds,
        }));
        let deadline = tokio::time::sleep(std::time::Duration::from_secs(seconds));
        tokio::pin!(deadline);
        if lines.send(started).await.is_ok() {
            loop {
                let next = tokio::select! {
                    _ = &mut deadline => break,
                    _ = lines.closed() => break,
                    _ = agent.drain.cancelled() => break,
                    v = session.verdicts.recv() => v,
                };
                let out = match next {
                    Ok(v) if session.concerns(&v) => {
                        let mut value = serde_json::to_value(&v).expect("a verdict serializes");
                        value["time"] =
                            humantime::format_rfc3339_millis(std::time::SystemTime::now())
                                .to_string()
                                .into();
                        value["workload"] = session.workload.clone().into();
                        line(value)
                    }
                    Ok(_) => continue,
                    // Said, not hidden: the watcher fell behind the kernel.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        line(serde_json::json!({ "missed": n }))
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                };
                if lines.send(out).await.is_err() {
                    break;
                }
            }
        }
        agent.stop_trace(&session).await;
    });
    let stream = futures::stream::unfold(body, |mut body| async move {
        let frame = body.recv().await?;
        Some((Ok::<_, Infallible>(Frame::data(frame)), body))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/x-ndjson")
        .body(BodyExt::boxed_unsync(StreamBody::new(stream)))
        .expect("static response parts are valid")
}
