//! Server side of the tunnel: the in-pod listener on port 15008.
//!
//! Each accepted connection must complete a TLS 1.3 handshake with a client
//! certificate that chains to the trust bundle and carries a SPIFFE ID. Then each
//! HTTP/2 CONNECT stream names a destination on this pod, which the agent dials
//! from inside the pod and relays to. Anything else (garbage, plain HTTP, TLS
//! without a certificate, a foreign CA) is refused at the handshake, logged and
//! counted, and never reaches the application.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::connections::{ConnectionGuard, Reporting};
use crate::drain::serve_until_drained;
use crate::identity::{Identity, identity_of};
use crate::proxy::inbound::{Admitted, Carried, InboundContext, Opaque, Refusal, admit};
use crate::proxy::pod::accept_until_cancelled;
use crate::proxy::relay::relay_tunnel;
use crate::proxy::tunnel::read_ahead::ReadAhead;

/// Bound on the TLS handshake of an inbound tunnel connection (slowloris guard).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams one client connection may have open at once.
const MAX_STREAMS: u32 = 100;

/// Accepts tunnel connections until `cancel`.
pub async fn serve(listener: TcpListener, ctx: Arc<InboundContext>, cancel: CancellationToken) {
    accept_until_cancelled(
        &listener,
        &cancel,
        &ctx.workload,
        "tunnel",
        |stream, peer| handle_connection(stream, peer, ctx.clone()),
    )
    .await;
}

async fn handle_connection(stream: TcpStream, peer: SocketAddr, ctx: Arc<InboundContext>) {
    let workload = ctx.workload.meta.read().expect("meta lock").key();
    let refuse = |reason: &'static str, detail: String| {
        tracing::warn!(%workload, %peer, reason, error = %detail, "tunnel connection refused");
        ctx.workload.metrics.tunnel_refused("inbound", reason);
    };
    let config = match ctx.tls_config() {
        Ok(c) => c,
        Err(e) => return refuse("tls_config", e.to_string()),
    };
    let _ = stream.set_nodelay(true);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(ReadAhead::new(stream)))
        .await
    {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return refuse("handshake", e.to_string()),
        Err(_) => return refuse("handshake_timeout", format!("{HANDSHAKE_TIMEOUT:?}")),
    };
    let source = match tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(identity_of)
    {
        Some(Ok(id)) => id,
        Some(Err(e)) => return refuse("peer_identity", e.to_string()),
        None => return refuse("peer_identity", "no client certificate".into()),
    };
    ctx.workload.metrics.tunnel_established("inbound");
    let service = hyper::service::service_fn({
        let ctx = ctx.clone();
        let source = source.clone();
        move |req| handle_stream(req, peer, source.clone(), ctx.clone())
    });
    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .max_concurrent_streams(MAX_STREAMS)
        .initial_stream_window_size(super::STREAM_WINDOW)
        .initial_connection_window_size(super::CONNECTION_WINDOW)
        .max_frame_size(super::MAX_FRAME)
        .serve_connection(TokioIo::new(tls), service);
    // On handover a GOAWAY sends the peer's new streams to the successor.
    let served = serve_until_drained(connection, &ctx.workload.drain).await;
    if let Err(e) = served {
        tracing::debug!(%workload, %peer, error = %e, "tunnel connection ended with error");
    }
}

/// Why a tunnel stream's request names no destination this pod serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetError {
    /// Not a CONNECT.
    NotConnect,
    /// The authority is not an `ip:port`.
    BadAuthority,
    /// An address of another pod (or none of this one's).
    NotThisPod(SocketAddr),
}

impl TargetError {
    /// The HTTP status the stream is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            TargetError::NotConnect => StatusCode::METHOD_NOT_ALLOWED,
            TargetError::BadAuthority | TargetError::NotThisPod(_) => StatusCode::BAD_REQUEST,
        }
    }
}

/// The destination of an HBONE stream: a CONNECT whose authority is
/// `ip:port` with the ip one of this pod's. Peers' bytes decide it, so it is
/// property-tested.
pub fn connect_target(
    method: &Method,
    uri: &hyper::Uri,
    pod_ips: &[std::net::IpAddr],
) -> Result<SocketAddr, TargetError> {
    if method != Method::CONNECT {
        return Err(TargetError::NotConnect);
    }
    let destination = uri
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
        .ok_or(TargetError::BadAuthority)?;
    if !pod_ips.contains(&destination.ip()) {
        return Err(TargetError::NotThisPod(destination));
    }
    Ok(destination)
}

fn status(code: StatusCode) -> Response<Empty<Bytes>> {
    let mut response = Response::new(Empty::new());
    *response.status_mut() = code;
    response
}

async fn handle_stream(
    mut req: Request<hyper::body::Incoming>,
    peer: SocketAddr,
    source: Identity,
    ctx: Arc<InboundContext>,
) -> Result<Response<Empty<Bytes>>, Infallible> {
    let destination = match connect_target(req.method(), req.uri(), &ctx.ips) {
        Ok(d) => d,
        Err(TargetError::NotThisPod(destination)) => {
            tracing::warn!(%peer, %destination, "CONNECT to an address that is not this pod's; refused");
            return Ok(status(StatusCode::BAD_REQUEST));
        }
        Err(e) => return Ok(status(e.status())),
    };
    // The client pod, when known and when its configured identity is the proven one.
    let source_workload = ctx
        .workload
        .directory
        .lookup(peer.ip())
        .filter(|m| m.identity() == source);
    // This agent's own client side already served the stream's requests
    // (authorized and reported them for this destination too).
    let parsed_here = req
        .headers()
        .get(super::PARSED_BY_HEADER)
        .is_some_and(|v| same_secret(v.as_bytes(), ctx.l7.parsed_by.as_bytes()));
    let admitted = match admit(&ctx, source_workload, Some(source), peer, destination).await {
        Ok(admitted) => admitted,
        Err(Refusal::Denied) => return Ok(status(StatusCode::FORBIDDEN)),
        Err(Refusal::Undeliverable) => return Ok(status(StatusCode::SERVICE_UNAVAILABLE)),
    };
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                let tunnel = TokioIo::new(upgraded);
                if parsed_here {
                    carry_parsed(tunnel, admitted, destination).await;
                } else {
                    carry(tunnel, admitted, peer, destination, &ctx).await;
                }
            }
            Err(e) => {
                let mut guard = admitted.guard;
                guard.fail("UF");
                tracing::debug!(%destination, error = %e, "CONNECT stream never opened");
            }
        }
    });
    Ok(status(StatusCode::OK))
}

/// Whether `a` is `b`, in time that does not depend on where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Carries a stream whose requests this agent's client side served: byte for
/// byte, reported as requests (they were), never parsed a second time.
async fn carry_parsed(
    tunnel: TokioIo<hyper::upgrade::Upgraded>,
    admitted: Admitted,
    destination: SocketAddr,
) {
    let Admitted {
        mut guard,
        cancel,
        app,
        ..
    } = admitted;
    guard.report(Reporting::Requests);
    relay_until_revoked(app, tunnel, &guard, &cancel, destination).await;
}

/// Relays a stream and its application socket until both ends close, or a
/// policy change revokes the connection (`cancel`): then the application side
/// is reset, and dropping the stream resets the tunnel side.
async fn relay_until_revoked(
    app: TcpStream,
    tunnel: TokioIo<hyper::upgrade::Upgraded>,
    guard: &ConnectionGuard,
    cancel: &CancellationToken,
    destination: SocketAddr,
) {
    tokio::select! {
        result = relay_tunnel(&app, tunnel, guard.sent(), guard.received()) => {
            if let Err(e) = result {
                tracing::debug!(%destination, error = %e, "tunnel stream ended with error");
            }
        }
        _ = cancel.cancelled() => {
            let _ = app.set_zero_linger();
        }
    }
}

/// Carries one opened stream to the application: its requests served one by
/// one when it speaks HTTP, else its bytes relayed.
async fn carry(
    tunnel: TokioIo<hyper::upgrade::Upgraded>,
    admitted: Admitted,
    peer: SocketAddr,
    destination: SocketAddr,
    ctx: &InboundContext,
) {
    // A refused stream is dropped, which resets the tunnel side.
    if let Carried::Relay(Opaque {
        client,
        guard,
        cancel,
        app,
    }) = admitted.carry(tunnel, ctx, peer, destination).await
    {
        relay_until_revoked(app, client, &guard, &cancel, destination).await;
    }
}
