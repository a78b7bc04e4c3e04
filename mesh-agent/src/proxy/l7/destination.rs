//! Destination-side L7: a connection admitted to a meshed pod (through the
//! tunnel, or permitted plaintext) is detected with the client side's rules;
//! HTTP/1.1, h2 and gRPC are served by hyper, each request reported with
//! `reporter="destination"` and forwarded to the application over the one
//! connection the agent made for it inside the pod. Anything else is carried
//! byte for byte by the caller. Each request is authorized first, against
//! the AuthorizationPolicies in force at that moment: a denied one gets
//! Istio's 403 `RBAC: access denied` and never reaches the application.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::connections::{ConnectionGuard, Peers, Reporting};
use crate::drain::serve_until_drained;
use crate::metrics::{DestinationServiceLabels, HttpLabels, Metrics};
use crate::proxy::l7::L7Settings;
use crate::proxy::l7::detect::{Detected, sniff_io};
use crate::proxy::l7::forward::request_host;
use crate::proxy::l7::forward::{
    finish_response, http1_server, http2_server, is_upgrade, strip_hop_by_hop,
};
use crate::proxy::l7::record::{
    MeteredIo, ObservedBody, RequestRecord, full, local, request_protocol,
};
use crate::proxy::l7::upstream::ProxyBody;
use crate::state::policy::{self, Decision, PolicyStore};
use crate::state::service::{PortProtocol, Service};
use crate::state::workload::WorkloadMeta;
use crate::traces::{Side, Tracer};

/// How the destination treats the bytes of a connection to `port`: as the
/// Service port that the endpoint serves declares (`service`: its protocol and
/// port), with the opaque ports never inspected, and detected when no Service
/// says. The same rules as the client side, so both sides agree.
pub fn inbound_protocol(
    settings: &L7Settings,
    service: Option<(PortProtocol, u16)>,
    port: u16,
) -> PortProtocol {
    let opaque = |p: u16| settings.opaque_ports.contains(&p);
    match service {
        Some((PortProtocol::Detect, service_port)) if opaque(service_port) || opaque(port) => {
            PortProtocol::Opaque
        }
        Some((declared, _)) => declared,
        None if opaque(port) => PortProtocol::Opaque,
        None => PortProtocol::Detect,
    }
}

/// What the client's first bytes say, under the port's `protocol`; returns
/// the bytes read, which the caller must pass on first.
pub async fn detect<C>(
    client: &mut C,
    protocol: PortProtocol,
    timeout: std::time::Duration,
    metrics: &Metrics,
) -> io::Result<(Detected, Vec<u8>)>
where
    C: AsyncRead + Unpin,
{
    let found = match protocol {
        PortProtocol::Http1 => Ok((Detected::Http1, Vec::new())),
        PortProtocol::Http2 => Ok((Detected::Http2, Vec::new())),
        PortProtocol::Opaque => Ok((Detected::Opaque, Vec::new())),
        PortProtocol::Detect => sniff_io(client, timeout).await,
    };
    if let Ok((detected, _)) = &found {
        metrics.detected("destination", detected.name());
    }
    found
}

/// The labels every request on one admitted connection starts from.
pub fn request_labels(
    metrics: &Metrics,
    peers: &Peers,
    service: Option<&Service>,
    destination: SocketAddr,
) -> HttpLabels {
    HttpLabels {
        reporter: "destination",
        source: metrics.source_labels(peers.source.as_deref(), peers.source_principal()),
        destination: metrics.destination_labels(peers.destination.as_deref()),
        service: match service {
            Some(s) => DestinationServiceLabels::of(s),
            None => DestinationServiceLabels::address(destination),
        },
        request_protocol: "http",
        response_code: 0,
        grpc_response_status: String::new(),
        // Until a response exists, a dropped record means the client went away.
        response_flags: "DC",
        connection_security_policy: if peers.mutual_tls {
            "mutual_tls"
        } else {
            "none"
        },
        // The destination does not route; the client side names the route.
        route: "-".into(),
    }
}

/// One HTTP connection served at the destination.
pub struct HttpConnection {
    /// Where requests are counted.
    pub metrics: Arc<Metrics>,
    /// Where request-log lines go, when enabled.
    pub request_log: Option<tracing_appender::non_blocking::NonBlocking>,
    /// What each request's labels start from ([`request_labels`]).
    pub labels: HttpLabels,
    /// The client's address, for the request log.
    pub client: SocketAddr,
    /// The policies in force, read again for every request, so a change
    /// applies to the next request on a connection already open.
    pub policies: Arc<PolicyStore>,
    /// The workload served.
    pub workload: Option<Arc<WorkloadMeta>>,
    /// What the connection's authorization saw.
    pub attrs: policy::Connection,
    /// Records each sampled request's destination span.
    pub tracer: Tracer,
}

/// The body Istio's proxies answer a request denied by policy with.
pub const RBAC_DENIED_BODY: &str = "RBAC: access denied";

/// The policies' decision for one request to `workload` on a connection
/// whose authorization saw `attrs`; AUDIT matches are logged and counted. The
/// destination side and, for an endpoint on its own node, the client side
/// (which then serves the request for both ends) decide the same way.
pub fn authorize_request(
    policies: &PolicyStore,
    metrics: &Metrics,
    workload: &WorkloadMeta,
    attrs: &policy::Connection,
    method: &http::Method,
    uri: &http::Uri,
    headers: &http::HeaderMap,
) -> Decision {
    let host = request_host(headers, uri);
    let facts = policy::Request {
        method: method.as_str(),
        path: uri.path(),
        host,
        headers,
    };
    let policies = policies.get();
    for audit in policy::audits(
        workload,
        &policies.authorization_policies,
        attrs,
        Some(&facts),
    ) {
        metrics.request_audited(&audit.key());
        tracing::info!(
            target: "audit",
            policy = %audit.key(),
            workload = %workload.key(),
            source = attrs.source.as_ref().map_or("plaintext".to_owned(), |s| s.to_string()),
            method = facts.method,
            path = facts.path,
            host = facts.host,
            "request matched an AUDIT policy"
        );
    }
    let decision = policies.decide_request(workload, attrs, &facts);
    if let Decision::Deny(why) = &decision {
        metrics.request_denied(why.policy.as_deref());
        tracing::info!(
            workload = %workload.key(),
            source = attrs.source.as_ref().map_or("plaintext".to_owned(), |s| s.to_string()),
            method = facts.method,
            path = facts.path,
            reason = %why,
            "request denied by policy"
        );
    }
    decision
}

/// Istio's answer to a request denied by policy, and its response flag.
pub fn rbac_denied() -> (Response<ProxyBody>, &'static str) {
    let mut resp = Response::new(full(Bytes::from_static(RBAC_DENIED_BODY.as_bytes())));
    *resp.status_mut() = StatusCode::FORBIDDEN;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    (resp, "RBAC")
}

/// The application end: one connection made inside the pod, carrying every
/// request of the client connection (HTTP/1 one at a time, h2 multiplexed).
enum AppConnection {
    Http1(tokio::sync::Mutex<hyper::client::conn::http1::SendRequest<ProxyBody>>),
    Http2(hyper::client::conn::http2::SendRequest<ProxyBody>),
}

impl AppConnection {
    async fn open(app: TcpStream, protocol: Detected) -> hyper::Result<Self> {
        let io = TokioIo::new(app);
        Ok(match protocol {
            Detected::Http2 => {
                let (sender, connection) =
                    hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                        .timer(TokioTimer::new())
                        .initial_stream_window_size(4 << 20)
                        .initial_connection_window_size(16 << 20)
                        .handshake(io)
                        .await?;
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "application h2 connection ended with error");
                    }
                });
                AppConnection::Http2(sender)
            }
            _ => {
                let (sender, connection) = hyper::client::conn::http1::Builder::new()
                    .handshake(io)
                    .await?;
                tokio::spawn(async move {
                    if let Err(e) = connection.with_upgrades().await {
                        tracing::debug!(error = %e, "application HTTP/1 connection ended with error");
                    }
                });
                AppConnection::Http1(tokio::sync::Mutex::new(sender))
            }
        })
    }

    async fn send(&self, req: Request<ProxyBody>) -> hyper::Result<Response<Incoming>> {
        match self {
            AppConnection::Http1(sender) => {
                let mut sender = sender.lock().await;
                sender.ready().await?;
                sender.send_request(req).await
            }
            AppConnection::Http2(sender) => {
                let mut sender = sender.clone();
                sender.ready().await?;
                sender.send_request(req).await
            }
        }
    }
}

/// Serves an HTTP client connection whose first bytes were `prefix`, against
/// the application connection `app`, until either ends, the connection is
/// revoked (`cancel`), or the agent hands over (`drain`: the client is told to
/// reconnect).
#[allow(clippy::too_many_arguments)]
pub async fn serve_http<C>(
    client: C,
    prefix: Vec<u8>,
    app: TcpStream,
    protocol: Detected,
    connection: HttpConnection,
    guard: &mut ConnectionGuard,
    settings: &L7Settings,
    cancel: &CancellationToken,
    drain: &CancellationToken,
) where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    guard.report(Reporting::Requests);
    let _ = app.set_nodelay(true);
    let app = match AppConnection::open(app, protocol).await {
        Ok(app) => Arc::new(app),
        Err(e) => {
            guard.fail("UF");
            tracing::debug!(client = %connection.client, error = %e, "application connection failed");
            return;
        }
    };
    let io = TokioIo::new(MeteredIo {
        prefix: Bytes::from(prefix),
        stream: client,
        received: guard.received(),
        sent: guard.sent(),
    });
    let connection = Arc::new(connection);
    let service = service_fn(move |req| handle(req, connection.clone(), app.clone()));
    let served = async {
        match protocol {
            Detected::Http2 => {
                let c = http2_server(settings).serve_connection(io, service);
                serve_until_drained(c, drain).await
            }
            _ => {
                let c = http1_server(settings)
                    .serve_connection(io, service)
                    .with_upgrades();
                serve_until_drained(c, drain).await
            }
        }
    };
    tokio::select! {
        result = served => if let Err(e) = result {
            tracing::debug!(error = %e, "inbound HTTP connection ended with error");
        },
        _ = cancel.cancelled() => {}
    }
}

async fn handle(
    mut req: Request<Incoming>,
    connection: Arc<HttpConnection>,
    app: Arc<AppConnection>,
) -> Result<Response<ProxyBody>, Infallible> {
    let mut labels = connection.labels.clone();
    labels.request_protocol = request_protocol(req.headers());
    let mut record = RequestRecord::new(
        connection.metrics.clone(),
        labels,
        connection.request_log.clone(),
        &req,
        connection.client,
    );
    let upgrade = is_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    record.start_span(
        &connection.tracer,
        Side::Destination,
        &parts.method,
        &parts.uri,
        &mut parts.headers,
    );
    if let Some(workload) = connection.workload.as_deref() {
        let decision = authorize_request(
            &connection.policies,
            &connection.metrics,
            workload,
            &connection.attrs,
            &parts.method,
            &parts.uri,
            &parts.headers,
        );
        if let Decision::Deny(_) = decision {
            return Ok(record.respond(rbac_denied()));
        }
    }
    strip_hop_by_hop(&mut parts.headers, upgrade.is_some());
    let body = ObservedBody {
        inner: body,
        observer: record.request_body_counter(),
    }
    .boxed();
    let response = match app.send(Request::from_parts(parts, body)).await {
        Ok(resp) => (finish_response(resp, upgrade, &[]), "-"),
        Err(e) => local(
            StatusCode::SERVICE_UNAVAILABLE,
            "UC",
            format!("the application closed the connection before responding: {e}"),
        ),
    };
    Ok(record.respond(response))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbound_protocol_follows_the_client_sides_rules() {
        let settings = L7Settings::default();
        use PortProtocol::*;
        let cases = [
            ("pod port, no Service", None, 8080, Detect),
            ("pod port on the opaque list", None, 6379, Opaque),
            ("Service port detected", Some((Detect, 80)), 8080, Detect),
            (
                "Service port opaque by number",
                Some((Detect, 5432)),
                8080,
                Opaque,
            ),
            (
                "target port opaque by number",
                Some((Detect, 80)),
                3306,
                Opaque,
            ),
            ("declared HTTP/1.1", Some((Http1, 80)), 8080, Http1),
            ("declared h2", Some((Http2, 80)), 8080, Http2),
            ("declared opaque", Some((Opaque, 80)), 8080, Opaque),
        ];
        for (name, service, port, expected) in cases {
            assert_eq!(
                inbound_protocol(&settings, service, port),
                expected,
                "{name}"
            );
        }
    }
}
