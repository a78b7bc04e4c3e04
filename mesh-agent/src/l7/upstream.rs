//! Pooled HTTP connections from one workload to endpoints. Each enrolled workload
//! has its own clients, so connections are made from inside its pod (and, to
//! meshed endpoints, through the mTLS tunnel under its identity), and HTTP/1
//! keep-alive and HTTP/2 connections are reused across its requests.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Weak;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http_body_util::combinators::BoxBody;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::connections::ConnectionGuard;
use crate::outbound::{OutboundContext, Transport, connect_in_pod, open_tunnel, transport};
use crate::relay::{relay, relay_tunnel};
use crate::tunnel::TunnelError;
use crate::tunnel::pool::StreamLease;
use crate::workload::WorkloadMeta;

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
    /// Clients that connect as the workload of `ctx`.
    pub fn new(ctx: Weak<OutboundContext>) -> Self {
        let connector = InPodConnector { ctx };
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
    ctx: Weak<OutboundContext>,
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
        Box::pin(async move {
            let ctx = ctx
                .upgrade()
                .ok_or_else(|| io::Error::other("workload was unenrolled"))?;
            let addr: SocketAddr = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or_else(|| io::Error::other(format!("{uri} is not an endpoint address")))?;
            let source = ctx.meta.read().expect("workload meta lock").clone();
            let destination = ctx.directory.lookup(addr.ip());
            let how = transport(destination.as_deref(), ctx.identity.is_some());
            connect(&ctx, &source, addr, how)
                .await
                .map(TokioIo::new)
                .map_err(|e| match e {
                    ConnectFailure::Tcp(e) => e,
                    ConnectFailure::Tunnel(e) => io::Error::other(e),
                })
        })
    }
}

/// Why an upstream connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectFailure {
    /// Plain TCP connect failed.
    #[error("upstream connect failed: {0}")]
    Tcp(io::Error),
    /// The tunnel to the peer agent failed or was refused.
    #[error("tunnel to the destination failed: {0}")]
    Tunnel(TunnelError),
}

impl ConnectFailure {
    /// Istio `response_flags` for the failed connection.
    pub fn response_flags(&self) -> &'static str {
        match self {
            ConnectFailure::Tcp(_) => "CONNECT",
            ConnectFailure::Tunnel(e) => e.response_flags(),
        }
    }
}

/// Connects to `addr` as workload `source`, the way `how` says. A refused tunnel
/// is counted here, once, whoever asked for the connection.
pub async fn connect(
    ctx: &OutboundContext,
    source: &WorkloadMeta,
    addr: SocketAddr,
    how: Transport,
) -> Result<UpstreamIo, ConnectFailure> {
    match how {
        Transport::Direct => {
            let stream = connect_in_pod(ctx, addr)
                .await
                .map_err(ConnectFailure::Tcp)?;
            let _ = stream.set_nodelay(true);
            Ok(UpstreamIo::Tcp(stream))
        }
        Transport::Tunnel { peer_identity } => {
            let (stream, lease) = open_tunnel(ctx, source, peer_identity, addr)
                .await
                .map_err(|e| {
                    ctx.metrics.tunnel_refused("outbound", e.reason());
                    ConnectFailure::Tunnel(e)
                })?;
            Ok(UpstreamIo::Tunnel(Box::new(stream), lease))
        }
    }
}

/// Carries a client connection to `upstream` until both sides close, after
/// sending `prefix` (bytes already read from the client during detection).
pub async fn relay_to(
    client: &TcpStream,
    upstream: UpstreamIo,
    prefix: &[u8],
    guard: &ConnectionGuard,
) -> io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let received = guard.received();
    match upstream {
        UpstreamIo::Tcp(mut stream) => {
            if !prefix.is_empty() {
                stream.write_all(prefix).await?;
                received.add(prefix.len());
            }
            relay(client, &stream, received, guard.sent()).await
        }
        UpstreamIo::Tunnel(mut stream, _lease) => {
            if !prefix.is_empty() {
                stream.write_all(prefix).await?;
                received.add(prefix.len());
            }
            relay_tunnel(client, *stream, received, guard.sent()).await
        }
    }
}

/// An upstream byte stream: plain TCP, or a tunnel stream holding its pool lease.
pub enum UpstreamIo {
    /// Direct TCP from the pod.
    Tcp(TcpStream),
    /// A CONNECT stream in a pooled mTLS connection.
    Tunnel(Box<TokioIo<hyper::upgrade::Upgraded>>, StreamLease),
}

impl UpstreamIo {
    /// Whether the hop to the endpoint is mutual TLS.
    pub fn is_mutual_tls(&self) -> bool {
        matches!(self, UpstreamIo::Tunnel(..))
    }
}

/// Marks tunnelled connections, so responses can report `mutual_tls`.
#[derive(Clone, Copy, Debug)]
pub struct MutualTls(pub bool);

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        Connected::new().extra(MutualTls(self.is_mutual_tls()))
    }
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tunnel(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tunnel(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tunnel(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tunnel(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamIo::Tunnel(s, _) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Tcp(s) => s.is_write_vectored(),
            UpstreamIo::Tunnel(s, _) => s.is_write_vectored(),
        }
    }
}
