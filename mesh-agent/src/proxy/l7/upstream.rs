//! Pooled HTTP connections from one workload to endpoints. Each enrolled workload
//! has its own clients, so connections are made from inside its pod (and, to
//! meshed endpoints, through the mTLS tunnel under its identity), and HTTP/1
//! keep-alive and HTTP/2 connections are reused across its requests.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http_body_util::combinators::BoxBody;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::proxy::pod::{ConnectFailure, PodContext, UpstreamIo, connect, transport};

/// Whether this agent serves the pod at an address (its own server side).
pub type ServedHere = Arc<dyn Fn(std::net::IpAddr) -> bool + Send + Sync>;

/// Errors carried in proxied bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type the proxy sends and returns.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// Idle upstream connections are closed after this.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle connections kept per endpoint and client workload: as many as a busy
/// client keeps in flight, so a steady load never re-dials. Through the tunnel they
/// are streams, not sockets; idle ones close after `IDLE_TIMEOUT`.
const MAX_IDLE_PER_ENDPOINT: usize = 256;

/// One workload's HTTP/1 and HTTP/2 clients.
pub struct Upstreams {
    /// HTTP/1.1 with keep-alive.
    pub http1: Client<InPodConnector, ProxyBody>,
    /// HTTP/2 with prior knowledge; one connection multiplexes requests.
    pub http2: Client<InPodConnector, ProxyBody>,
}

impl Upstreams {
    /// Clients that connect as the workload of `ctx`; streams to pods this
    /// agent serves (`served_here`) carry `parsed_by`, as their requests are
    /// served by this side.
    pub fn new(
        ctx: Arc<PodContext>,
        served_here: ServedHere,
        parsed_by: http::HeaderValue,
    ) -> Self {
        let connector = InPodConnector {
            ctx,
            served_here,
            parsed_by,
        };
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_idle_timeout(IDLE_TIMEOUT)
            .pool_max_idle_per_host(MAX_IDLE_PER_ENDPOINT)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            // The client's Host header is forwarded as sent.
            .set_host(false);
        let http1 = builder.build(connector.clone());
        builder
            .http2_only(true)
            .http2_initial_stream_window_size(4 << 20)
            .http2_initial_connection_window_size(16 << 20)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .http2_keep_alive_timeout(Duration::from_secs(20));
        let http2 = builder.build(connector);
        Upstreams { http1, http2 }
    }
}

/// Connects to an endpoint address as the workload: directly from its pod, or
/// through the tunnel when the endpoint is a meshed workload and mTLS is on.
#[derive(Clone)]
pub struct InPodConnector {
    ctx: Arc<PodContext>,
    served_here: ServedHere,
    parsed_by: http::HeaderValue,
}

impl tower_service::Service<Uri> for InPodConnector {
    type Response = TokioIo<UpstreamIo>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TokioIo<UpstreamIo>>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let ctx = self.ctx.clone();
        let served_here = self.served_here.clone();
        let parsed_by = self.parsed_by.clone();
        Box::pin(async move {
            let addr: SocketAddr = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or_else(|| io::Error::other(format!("{uri} is not an endpoint address")))?;
            let source = ctx.meta.read().expect("workload meta lock").clone();
            let destination = ctx.directory.lookup(addr.ip());
            let how = transport(destination.as_deref(), ctx.identity.is_some());
            let marker = served_here(addr.ip()).then_some(&parsed_by);
            connect(&ctx, &source, addr, how, marker)
                .await
                .map(TokioIo::new)
                .map_err(|e| match e {
                    ConnectFailure::Tcp(e) => e,
                    ConnectFailure::Tunnel(e) => io::Error::other(e),
                })
        })
    }
}
