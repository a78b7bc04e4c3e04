//! The I/O of L7: a captured connection to a Service VIP is detected, then either
//! balanced per connection (opaque) or served by hyper and routed per request.
//! Every request owns a [`RequestRecord`] that records Istio's request metrics
//! and the request log line when the response body ends or is dropped.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rand::Rng;
use tokio::net::TcpStream;

use crate::connections::{ConnectionGuard, Peers, Reporting};
use crate::drain::serve_until_drained;
use crate::metrics::{DestinationServiceLabels, HttpLabels};
use crate::proxy::l7::balance::{NoEndpoint, Outcome};
use crate::proxy::l7::budget::backoff;
use crate::proxy::l7::catalog::{Catalog, ServicePortState};
use crate::proxy::l7::destination;
use crate::proxy::l7::detect::{Detected, sniff};
use crate::proxy::l7::forward::{
    finish_response, http1_server, http2_server, is_upgrade, request_host, strip_hop_by_hop,
};
use crate::proxy::l7::pod::PodL7;
use crate::proxy::l7::record::{
    MeteredIo, ObservedBody, RequestRecord, full, local, request_protocol,
};
use crate::proxy::l7::upstream::ProxyBody;
use crate::proxy::pod::{MutualTls, connect, ip_toward, relay_to};
use crate::proxy::pod::{reset, transport};
use crate::state::policy::{self, Decision};
use crate::state::route::{self, Filter, RequestFacts, Selection, rewrite_path};
use crate::state::service::Endpoint;
use crate::state::service::PortProtocol;
use crate::state::workload::WorkloadMeta;
use crate::traces::{Side, TRACEPARENT};

/// Request bodies up to this size are buffered so a retry or mirror can resend them.
const REPLAY_LIMIT: u64 = 64 * 1024;
/// Connect failures are retried this often even without a retry policy: the
/// request never reached a server, so resending it is always safe.
const CONNECT_RETRIES: u32 = 2;

/// Serves one captured connection to a Service VIP.
pub async fn serve(
    client: TcpStream,
    peer: SocketAddr,
    vip: SocketAddr,
    target: Arc<ServicePortState>,
    ctx: Arc<PodL7>,
    source: Arc<WorkloadMeta>,
) {
    let _ = client.set_nodelay(true);
    let settings = &ctx.l7.settings;
    let declared = match target.protocol {
        PortProtocol::Detect if settings.opaque_ports.contains(&vip.port()) => PortProtocol::Opaque,
        p => p,
    };
    let (protocol, prefix) = match declared {
        PortProtocol::Http1 => (Detected::Http1, Vec::new()),
        PortProtocol::Http2 => (Detected::Http2, Vec::new()),
        PortProtocol::Opaque => (Detected::Opaque, Vec::new()),
        PortProtocol::Detect => match sniff(&client, settings.detect_timeout).await {
            Ok(found) => found,
            Err(e) => {
                tracing::debug!(client = %peer, error = %e, "client went away during detection");
                return;
            }
        },
    };
    ctx.pod.metrics.detected("source", protocol.name());
    let peers = Peers {
        service: Some(target.service.clone()),
        ..Peers::outbound(source.clone(), None)
    };
    match protocol {
        Detected::Opaque => serve_opaque(client, peer, vip, target, ctx, peers, prefix).await,
        _ => serve_http(client, peer, vip, ctx, peers, prefix, protocol).await,
    }
}

/// Balances a TCP connection: one endpoint per connection, trying others when a
/// connect fails.
async fn serve_opaque(
    client: TcpStream,
    peer: SocketAddr,
    vip: SocketAddr,
    target: Arc<ServicePortState>,
    ctx: Arc<PodL7>,
    mut peers: Peers,
    prefix: Vec<u8>,
) {
    let source = peers.source.clone().expect("outbound peers have a source");
    let mut avoid = None;
    let mut last_error = String::from("no endpoints");
    for _ in 0..=CONNECT_RETRIES {
        let pick = match target
            .balancer
            .pick(Instant::now(), avoid.as_ref(), &mut rand::rng())
        {
            Ok(pick) => pick,
            Err(e) => {
                last_error = e.to_string();
                break;
            }
        };
        let endpoint = pick.endpoint().clone();
        let how = transport(endpoint.workload.as_deref(), ctx.pod.identity.is_some());
        match connect(&ctx.pod, &source, endpoint.addr, how, None).await {
            Ok(upstream) => {
                target
                    .balancer
                    .record(&pick, Outcome::Success, Instant::now());
                peers.mutual_tls = upstream.is_mutual_tls();
                peers.destination = endpoint.workload.clone();
                let guard =
                    ConnectionGuard::open(&ctx.pod.connections, &ctx.pod.metrics, peers, peer, vip);
                if let Err(e) = relay_to(&client, upstream, &prefix, &guard).await {
                    tracing::debug!(service = %target.service.key(), error = %e, "connection ended with error");
                }
                drop(pick);
                return;
            }
            Err(e) => {
                if target
                    .balancer
                    .record(&pick, Outcome::Failure, Instant::now())
                {
                    ctx.pod.metrics.ejected(&target.service.fqdn());
                }
                tracing::warn!(service = %target.service.key(), endpoint = %endpoint.addr, error = %e, "endpoint connect failed; trying another");
                last_error = format!("{}: {e}", endpoint.addr);
                avoid = Some(endpoint);
            }
        }
    }
    let mut guard = ConnectionGuard::open(&ctx.pod.connections, &ctx.pod.metrics, peers, peer, vip);
    guard.fail("UF");
    tracing::warn!(service = %target.service.key(), error = %last_error, "no endpoint accepted the connection; resetting client");
    reset(client);
}

/// What every request on one client connection shares.
struct ConnCtx {
    ctx: Arc<PodL7>,
    source: Arc<WorkloadMeta>,
    principal: String,
    vip: SocketAddr,
    client: SocketAddr,
    protocol: Detected,
}

async fn serve_http(
    client: TcpStream,
    peer: SocketAddr,
    vip: SocketAddr,
    ctx: Arc<PodL7>,
    peers: Peers,
    prefix: Vec<u8>,
    protocol: Detected,
) {
    let source = peers.source.clone().expect("outbound peers have a source");
    // Its requests are reported, each with its own endpoint and security.
    let guard = ConnectionGuard::open_reporting(
        &ctx.pod.connections,
        &ctx.pod.metrics,
        peers,
        peer,
        vip,
        Reporting::Requests,
    );
    let io = TokioIo::new(MeteredIo {
        prefix: Bytes::from(prefix),
        stream: client,
        received: guard.received(),
        sent: guard.sent(),
    });
    let settings = ctx.l7.settings.clone();
    let conn = Arc::new(ConnCtx {
        principal: source.principal(),
        source,
        ctx,
        vip,
        client: peer,
        protocol,
    });
    let drain = conn.ctx.pod.drain.clone();
    let service = service_fn(move |req| handle(req, conn.clone()));
    // On handover the client is told to reconnect (GOAWAY, or `Connection:
    // close` after the response in flight); the successor accepts it.
    let result = match protocol {
        Detected::Http2 => {
            let connection = http2_server(&settings).serve_connection(io, service);
            serve_until_drained(connection, &drain).await
        }
        _ => {
            let connection = http1_server(&settings)
                .serve_connection(io, service)
                .with_upgrades();
            serve_until_drained(connection, &drain).await
        }
    };
    if let Err(e) = result {
        tracing::debug!(client = %peer, error = %e, "HTTP connection ended with error");
    }
    drop(guard);
}

async fn handle(
    req: Request<Incoming>,
    conn: Arc<ConnCtx>,
) -> Result<Response<ProxyBody>, Infallible> {
    let catalog = conn.ctx.l7.catalog.get();
    let metrics = &conn.ctx.pod.metrics;
    let labels = HttpLabels {
        reporter: "source",
        source: metrics.source_labels(Some(&conn.source), conn.principal.clone()),
        destination: metrics.destination_labels(None),
        service: DestinationServiceLabels::address(conn.vip),
        request_protocol: request_protocol(req.headers()),
        response_code: 0,
        grpc_response_status: String::new(),
        // Until a response exists, a dropped record means the client went away.
        response_flags: "DC",
        connection_security_policy: "none",
        route: "default".into(),
    };
    let log = conn.ctx.l7.request_log.clone();
    let mut record = RequestRecord::new(metrics.clone(), labels, log, &req, conn.client);
    let Some(target) = catalog.resolve(conn.vip) else {
        return Ok(record.reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "NR",
            format!("{} is no longer a Service address", conn.vip),
        ));
    };
    record.labels_mut().service = DestinationServiceLabels::of(&target.service);
    let response = route_request(req, &conn, &catalog, &target, &mut record).await;
    Ok(record.respond(response))
}

fn roll(percent: u32) -> bool {
    percent > 0 && rand::rng().random_range(0..100) < percent
}

/// Routes one request and carries it out; returns the response and its flags.
async fn route_request(
    mut req: Request<Incoming>,
    conn: &ConnCtx,
    catalog: &Catalog,
    target: &Arc<ServicePortState>,
    record: &mut RequestRecord,
) -> (Response<ProxyBody>, &'static str) {
    let upgrade = is_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let facts = RequestFacts {
        method: &parts.method,
        path: parts.uri.path(),
        query: parts.uri.query(),
        headers: &parts.headers,
    };
    let selection = route::select(target.routes_for(&conn.source.namespace), &facts);
    let (route, rule) = match selection {
        Selection::NoMatch => {
            return local(
                StatusCode::NOT_FOUND,
                "NR",
                format!("no HTTPRoute rule of {} matches", target.service.key()),
            );
        }
        Selection::NoRoutes => (None, None),
        Selection::Rule { route, rule, .. } => (Some(route), Some(rule)),
    };
    let prefix = rule
        .and_then(|r| route::matched_prefix(r, &facts))
        .map(str::to_owned);
    record.labels_mut().route = route.map(|r| r.key()).unwrap_or_else(|| "default".into());
    let mut response_edits = Vec::new();
    let mut mirror = None;
    if let (Some(route), Some(rule)) = (route, rule) {
        for filter in &rule.filters {
            match filter {
                Filter::ExtensionRef { kind, name } if kind == "FaultInjection" => {
                    let Some(fault) = catalog.fault(&route.namespace, name) else {
                        return local(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "-",
                            format!(
                                "route {} names a missing FaultInjection {name}",
                                route.key()
                            ),
                        );
                    };
                    if let Some((percent, delay)) = fault.delay
                        && roll(percent)
                    {
                        tokio::time::sleep(delay).await;
                    }
                    if let Some((percent, status)) = fault.abort
                        && roll(percent)
                    {
                        let status =
                            StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                        return local(status, "FI", "fault injected".into());
                    }
                }
                Filter::ExtensionRef { name, .. } => {
                    let Some(limiter) = catalog.rate_limit(&route.namespace, name) else {
                        return local(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "-",
                            format!(
                                "route {} names a missing LocalRateLimit {name}",
                                route.key()
                            ),
                        );
                    };
                    if !limiter.admit(&target.service.fqdn(), &conn.principal, Instant::now()) {
                        return local(
                            StatusCode::TOO_MANY_REQUESTS,
                            "RL",
                            format!("local rate limit {name} exceeded"),
                        );
                    }
                }
                Filter::RequestRedirect(r) => {
                    return (redirect(r, &parts, prefix.as_deref()), "-");
                }
                Filter::RequestHeaderModifier(m) => m.apply(&mut parts.headers),
                Filter::ResponseHeaderModifier(m) => response_edits.push(m),
                Filter::UrlRewrite(rw) => {
                    if let Some(host) = &rw.hostname
                        && let Ok(v) = HeaderValue::from_str(host)
                    {
                        parts.headers.insert(header::HOST, v);
                    }
                    if let Some(modifier) = &rw.path {
                        let path = rewrite_path(modifier, prefix.as_deref(), parts.uri.path());
                        let pq = match parts.uri.query() {
                            Some(q) => format!("{path}?{q}"),
                            None => path,
                        };
                        if let Ok(uri) = pq.parse::<Uri>() {
                            parts.uri = uri;
                        }
                    }
                }
                Filter::RequestMirror(m) => mirror = Some(m),
            }
        }
    }
    // The backend Service: a weighted choice among the rule's, or the Service itself.
    let backend = match rule {
        None => target.clone(),
        Some(rule) => {
            let total: u64 = rule.backends.iter().map(|b| b.weight as u64).sum();
            if total == 0 {
                return local(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "-",
                    "every backendRef of the rule has weight 0".into(),
                );
            }
            let mut point = rand::rng().random_range(0..total);
            let chosen = rule
                .backends
                .iter()
                .find(|b| {
                    let hit = point < b.weight as u64;
                    point = point.saturating_sub(b.weight as u64);
                    hit
                })
                .expect("point is below the total weight");
            match catalog.backend(
                &chosen.namespace,
                &chosen.name,
                chosen.port.unwrap_or(target.port.port),
            ) {
                Some(b) => b,
                None => {
                    return local(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "-",
                        format!(
                            "backendRef {}/{} is not a known Service port",
                            chosen.namespace, chosen.name
                        ),
                    );
                }
            }
        }
    };
    record.labels_mut().service = DestinationServiceLabels::of(&backend.service);

    let tracer = &conn.ctx.l7.tracer;
    if !tracer.enabled() {
        ensure_traceparent(&mut parts.headers);
    }
    record.start_span(
        tracer,
        Side::Source,
        &parts.method,
        &parts.uri,
        &mut parts.headers,
    );
    strip_hop_by_hop(&mut parts.headers, upgrade.is_some());

    // Buffer small bodies so they can be resent; stream everything else once.
    let replayable = upgrade.is_none()
        && (body.is_end_stream() || body.size_hint().exact().is_some_and(|n| n <= REPLAY_LIMIT));
    let counted = ObservedBody {
        inner: body,
        observer: record.request_body_counter(),
    };
    let (buffered, mut streaming) = if replayable {
        match Limited::new(counted, REPLAY_LIMIT as usize).collect().await {
            Ok(collected) => (Some(collected.to_bytes()), None),
            Err(e) => {
                return local(
                    StatusCode::BAD_REQUEST,
                    "DC",
                    format!("reading the request body failed: {e}"),
                );
            }
        }
    } else {
        (None, Some(counted.boxed()))
    };

    if let Some(m) = mirror
        && roll(m.percent)
    {
        match (
            &buffered,
            catalog.backend(
                &m.backend.namespace,
                &m.backend.name,
                m.backend.port.unwrap_or(target.port.port),
            ),
        ) {
            (Some(body), Some(mirror_backend)) => {
                send_mirror(conn, &parts, body.clone(), mirror_backend);
            }
            (None, _) => tracing::debug!("request body too large or streaming; not mirrored"),
            (_, None) => {
                tracing::warn!(backend = %m.backend.name, "mirror backend is not a known Service port")
            }
        }
    }

    let retry = rule.and_then(|r| r.retry.clone());
    let timeouts = rule.map(|r| r.timeouts.clone()).unwrap_or_default();
    let attempts = async {
        backend.budget.deposit(Instant::now());
        let mut avoid = None;
        let mut retries = 0u32;
        loop {
            let pick = match backend
                .balancer
                .pick(Instant::now(), avoid.as_ref(), &mut rand::rng())
            {
                Ok(p) => p,
                Err(NoEndpoint::Empty) => {
                    return local(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "UH",
                        format!(
                            "no endpoints for {}:{}",
                            backend.service.key(),
                            backend.port.port
                        ),
                    );
                }
                Err(NoEndpoint::Overflow) => {
                    return local(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "UO",
                        format!(
                            "every endpoint of {} has its maximum of pending requests",
                            backend.service.key()
                        ),
                    );
                }
            };
            record.set_upstream(pick.endpoint().workload.as_deref(), pick.endpoint().addr);
            if let Some(denied) = serve_for_destination(conn, record, pick.endpoint(), &parts) {
                return denied;
            }
            let body = match (&buffered, streaming.take()) {
                (Some(b), _) => full(b.clone()),
                (None, Some(s)) => s,
                (None, None) => {
                    unreachable!("a streamed body is sent once; no retry without a buffer")
                }
            };
            let mut upstream_req = Request::from_parts(parts.clone(), body);
            // Same node: the destination's span (the twin) is the app's parent.
            if let Some(traceparent) = record.twin_traceparent() {
                upstream_req.headers_mut().insert(TRACEPARENT, traceparent);
            }
            *upstream_req.uri_mut() = endpoint_uri(pick.endpoint().addr, &parts.uri);
            *upstream_req.version_mut() = http::Version::HTTP_11;
            let client = match conn.protocol {
                Detected::Http2 => &conn.ctx.upstreams.http2,
                _ => &conn.ctx.upstreams.http1,
            };
            if matches!(conn.protocol, Detected::Http2) {
                *upstream_req.version_mut() = http::Version::HTTP_2;
            }
            let sent = client.request(upstream_req);
            let result = match timeouts.backend_request {
                Some(limit) => tokio::time::timeout(limit, sent).await.map_err(|_| ()),
                None => Ok(sent.await),
            };
            let now = Instant::now();
            let (failure, retryable, outcome) = match result {
                Ok(Ok(resp)) => {
                    let status = resp.status().as_u16();
                    let failed = resp.status().is_server_error();
                    let retryable = retry.as_ref().is_some_and(|r| r.codes.contains(&status));
                    (failed, retryable, Ok(resp))
                }
                Ok(Err(e)) => {
                    let connect = e.is_connect();
                    let flags = if connect { "UF" } else { "UC" };
                    let why = format!(
                        "upstream {} {}: {}",
                        pick.endpoint().addr,
                        if connect {
                            "connect error"
                        } else {
                            "reset before response"
                        },
                        error_chain(&e)
                    );
                    (
                        true,
                        connect || retry.is_some(),
                        Err((StatusCode::SERVICE_UNAVAILABLE, flags, why)),
                    )
                }
                Err(()) => (
                    true,
                    retry.as_ref().is_some_and(|r| r.codes.contains(&504)),
                    Err((
                        StatusCode::GATEWAY_TIMEOUT,
                        "UT",
                        format!(
                            "upstream {} did not answer within timeouts.backendRequest",
                            pick.endpoint().addr
                        ),
                    )),
                ),
            };
            let outcome_kind = if failure {
                Outcome::Failure
            } else {
                Outcome::Success
            };
            if backend.balancer.record(&pick, outcome_kind, now) {
                conn.ctx.pod.metrics.ejected(&backend.service.fqdn());
                tracing::warn!(service = %backend.service.key(), endpoint = %pick.endpoint().addr, "endpoint ejected by outlier detection");
            }
            let limit = retry
                .as_ref()
                .map(|r| r.attempts)
                .unwrap_or(CONNECT_RETRIES);
            if retryable && buffered.is_some() && retries < limit {
                let granted = backend.budget.try_withdraw(now);
                conn.ctx.pod.metrics.retry(&backend.service.fqdn(), granted);
                if granted {
                    retries += 1;
                    avoid = Some(pick.endpoint().clone());
                    drop(pick);
                    if let Some(base) = retry.as_ref().and_then(|r| r.backoff) {
                        let jitter: f64 = rand::rng().random();
                        tokio::time::sleep(backoff(base, retries, jitter)).await;
                    }
                    continue;
                }
            }
            return match outcome {
                Ok(resp) => {
                    record.labels_mut().connection_security_policy =
                        if resp.extensions().get::<MutualTls>().is_some_and(|m| m.0) {
                            "mutual_tls"
                        } else {
                            "none"
                        };
                    (finish_response(resp, upgrade, &response_edits), "-")
                }
                Err((status, flags, why)) => local(status, flags, why),
            };
        }
    };
    match timeouts.request {
        Some(limit) => match tokio::time::timeout(limit, attempts).await {
            Ok(r) => r,
            Err(_) => local(
                StatusCode::GATEWAY_TIMEOUT,
                "UT",
                format!("no response within timeouts.request ({limit:?})"),
            ),
        },
        None => attempts.await,
    }
}

/// For an endpoint this agent also serves (same node), does what its server
/// side would do with the request, so that it is parsed once: authorizes it
/// against the destination's policies and reports it for the destination too.
/// The stream to it then carries this agent's marker, and the server side
/// passes its bytes on unread. Returns the 403 when the policies deny it.
fn serve_for_destination(
    conn: &ConnCtx,
    record: &mut RequestRecord,
    endpoint: &Endpoint,
    parts: &http::request::Parts,
) -> Option<(Response<ProxyBody>, &'static str)> {
    let served_here = conn
        .ctx
        .pod
        .identity
        .is_some()
        .then(|| conn.ctx.local.lookup(endpoint.addr.ip()))
        .flatten();
    let Some(dest) = served_here else {
        record.clear_twin();
        return None;
    };
    let workload = dest.workload.meta.read().expect("meta lock").clone();
    let source_ip = ip_toward(&conn.ctx.pod.ips, endpoint.addr).unwrap_or(endpoint.addr.ip());
    let attrs = policy::Connection {
        source: Some(conn.source.identity()),
        source_ip,
        destination_ip: endpoint.addr.ip(),
        destination_port: endpoint.addr.port(),
    };
    let service = dest.l7.catalog.get().serving(endpoint.addr);
    let peers = Peers {
        reporter: "destination",
        source: Some(conn.source.clone()),
        source_principal: Some(conn.principal.clone()),
        destination: Some(workload.clone()),
        mutual_tls: true,
        service: service.as_ref().map(|s| s.service.clone()),
    };
    let metrics = &conn.ctx.pod.metrics;
    let mut labels = destination::request_labels(
        metrics,
        &peers,
        service.as_ref().map(|s| &*s.service),
        endpoint.addr,
    );
    labels.request_protocol = record.labels().request_protocol;
    record.set_twin(labels);
    let decision = destination::authorize_request(
        &dest.policies,
        metrics,
        &workload,
        &attrs,
        &parts.method,
        &parts.uri,
        &parts.headers,
    );
    matches!(decision, Decision::Deny(_)).then(destination::rbac_denied)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// `http://endpoint/path?query`: the client pools by endpoint.
fn endpoint_uri(addr: SocketAddr, original: &Uri) -> Uri {
    let pq = original.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    format!("http://{addr}{pq}")
        .parse()
        .expect("socket address and path form a URI")
}

fn redirect(
    r: &route::Redirect,
    parts: &http::request::Parts,
    prefix: Option<&str>,
) -> Response<ProxyBody> {
    let host_header = request_host(&parts.headers, &parts.uri);
    let host_only = host_header
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(host_header);
    let host = r.hostname.as_deref().unwrap_or(host_only);
    let scheme = r.scheme.as_deref().unwrap_or("http");
    let port = match r.port {
        Some(p) => format!(":{p}"),
        None => String::new(),
    };
    let path = match &r.path {
        Some(m) => rewrite_path(m, prefix, parts.uri.path()),
        None => parts.uri.path().to_owned(),
    };
    let query = parts
        .uri
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let location = format!("{scheme}://{host}{port}{path}{query}");
    let mut resp = Response::new(full(Bytes::new()));
    *resp.status_mut() = StatusCode::from_u16(r.status_code).unwrap_or(StatusCode::FOUND);
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// W3C trace context when spans are not recorded: kept as sent (with B3
/// headers), created when absent.
fn ensure_traceparent(headers: &mut HeaderMap) {
    if headers.contains_key("traceparent") {
        return;
    }
    let mut rng = rand::rng();
    let trace: u128 = rng.random::<u128>().max(1);
    let span: u64 = rng.random::<u64>().max(1);
    let value = format!("00-{trace:032x}-{span:016x}-01");
    headers.insert(
        HeaderName::from_static("traceparent"),
        HeaderValue::from_str(&value).expect("hex is a valid header value"),
    );
}

fn send_mirror(
    conn: &ConnCtx,
    parts: &http::request::Parts,
    body: Bytes,
    backend: Arc<ServicePortState>,
) {
    let Ok(pick) = backend
        .balancer
        .pick(Instant::now(), None, &mut rand::rng())
    else {
        return;
    };
    let mut req = Request::from_parts(parts.clone(), full(body));
    *req.uri_mut() = endpoint_uri(pick.endpoint().addr, &parts.uri);
    let client = match conn.protocol {
        Detected::Http2 => {
            *req.version_mut() = http::Version::HTTP_2;
            conn.ctx.upstreams.http2.clone()
        }
        _ => conn.ctx.upstreams.http1.clone(),
    };
    tokio::spawn(async move {
        let sent = tokio::time::timeout(Duration::from_secs(10), client.request(req)).await;
        if let Ok(Ok(resp)) = sent {
            let _ = resp.into_body().collect().await;
        }
        drop(pick);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_created_only_when_absent() {
        let mut h = HeaderMap::new();
        ensure_traceparent(&mut h);
        let v = h.get("traceparent").unwrap().to_str().unwrap().to_owned();
        let parts: Vec<&str> = v.split('-').collect();
        assert_eq!(
            (parts[0], parts[1].len(), parts[2].len(), parts[3]),
            ("00", 32, 16, "01")
        );
        let given = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        h.insert("traceparent", given.parse().unwrap());
        ensure_traceparent(&mut h);
        assert_eq!(h.get("traceparent").unwrap(), given);
    }
}
