//! One enrolled pod as the data path sees it ([`PodContext`]), and how a
//! connection reaches its destination on the pod's behalf: a socket made inside
//! the pod's network namespace, or a stream in the mTLS tunnel under its
//! identity ([`connect`]), then relayed byte for byte ([`relay_to`]).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::connections::{ConnectionGuard, ConnectionTable};
use crate::identity::Identity;
use crate::identity::node::IdentityState;
use crate::metrics::Metrics;
use crate::node::capture::Capture;
use crate::node::netns::NetnsHandle;
use crate::proxy::limits::{Limits, PodLimit};
use crate::proxy::relay::{relay, relay_tunnel};
use crate::proxy::tunnel::pool::{PoolKey, StreamLease, TunnelPool};
use crate::proxy::tunnel::{self, HBONE_PORT, TunnelError};
use crate::state::workload::{Directory, WorkloadMeta};

/// What the data path knows of one enrolled pod, shared by its listeners and
/// connections: who it is, and how to make sockets and tunnels as it.
pub struct PodContext {
    /// The workload's identity; swapped in place when its labels change.
    pub meta: RwLock<Arc<WorkloadMeta>>,
    /// The pod cgroup the kernel matched for this workload.
    pub cgroup_id: u64,
    /// The pod's addresses: what destinations' policies see as its source.
    pub ips: Vec<IpAddr>,
    /// Creates upstream sockets inside the pod.
    pub netns: Arc<NetnsHandle>,
    /// Kernel maps holding original destinations.
    pub capture: Arc<Capture>,
    /// Where connections are counted.
    pub metrics: Arc<Metrics>,
    /// Where live connections are listed.
    pub connections: Arc<ConnectionTable>,
    /// Pod IP to workload, for destination attribution.
    pub directory: Arc<Directory>,
    /// Upper bound on an upstream connect before the client is reset.
    pub connect_timeout: Duration,
    /// Certificates and trust; `None` when the agent runs without mTLS.
    pub identity: Option<Arc<IdentityState>>,
    /// The node's tunnel connections.
    pub pool: Arc<TunnelPool>,
    /// Fires when the agent hands over to a successor: server connections
    /// finish gracefully ([`crate::drain`]).
    pub drain: CancellationToken,
    /// The agent-wide connection bound.
    pub limits: Arc<Limits>,
    /// This pod's connection bound and count.
    pub limit: Arc<PodLimit>,
}

/// Which of a pod's addresses (`ips`) a connection from it to `destination`
/// leaves from, the one of the same family: what the destination's policies
/// see as its source.
pub fn ip_toward(ips: &[IpAddr], destination: SocketAddr) -> Option<IpAddr> {
    ips.iter()
        .copied()
        .find(|ip| ip.is_ipv4() == destination.is_ipv4())
}

/// Runs `handler` for each accepted connection, in a task of its own that
/// holds the connection's claim on the bounds, until `cancel`. Every in-pod
/// listener (outbound, inbound, tunnel) accepts this way, so every one is
/// bounded. Out of descriptors, waiting connections are shed (reset) rather
/// than left in the backlog.
pub async fn accept_until_cancelled<F>(
    listener: &TcpListener,
    cancel: &CancellationToken,
    pod: &PodContext,
    listener_kind: &'static str,
    mut handler: impl FnMut(TcpStream, SocketAddr) -> F,
) where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => spawn_bounded(pod, listener_kind, stream, peer, &mut handler),
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    let workload = pod.meta.read().expect("meta lock").key();
                    if !pod.limits.shed_one(listener, &workload, listener_kind) {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                Err(e) => {
                    // Back off instead of spinning; the backlog holds.
                    tracing::warn!(listener = listener_kind, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Spawns `handler` for an accepted connection within the agent's and the
/// pod's bounds, or resets the connection at once when over one.
pub fn spawn_bounded<F>(
    pod: &PodContext,
    listener_kind: &'static str,
    stream: TcpStream,
    peer: SocketAddr,
    handler: &mut impl FnMut(TcpStream, SocketAddr) -> F,
) where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    match pod.limits.admit(&pod.limit) {
        Ok(permit) => {
            let handled = handler(stream, peer);
            tokio::spawn(async move {
                let _permit = permit;
                handled.await;
            });
        }
        Err(why) => {
            let workload = pod.meta.read().expect("meta lock").key();
            pod.limits.refuse(stream, why, &workload, listener_kind);
        }
    }
}

/// Closes with RST so the client sees a failure at once, never a hang or a clean EOF.
pub(crate) fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// How a routed connection reaches its destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// Plain TCP from the source pod: the destination is not a meshed workload, or
    /// the agent has no CA.
    Direct,
    /// mTLS HBONE tunnel to the destination pod's port 15008, which must prove `peer_identity`.
    Tunnel {
        /// The destination workload's identity.
        peer_identity: Identity,
    },
}

/// Meshed destinations get the tunnel whenever the agent can mint identities;
/// known pods outside the mesh have no tunnel listener and are reached directly.
pub fn transport(destination: Option<&WorkloadMeta>, mtls_enabled: bool) -> Transport {
    match destination {
        Some(w) if mtls_enabled && w.meshed => Transport::Tunnel {
            peer_identity: w.identity(),
        },
        _ => Transport::Direct,
    }
}

pub(crate) async fn open_tunnel(
    ctx: &PodContext,
    source: &WorkloadMeta,
    peer_identity: Identity,
    destination: SocketAddr,
    parsed_by: Option<&hyper::header::HeaderValue>,
) -> Result<(TokioIo<hyper::upgrade::Upgraded>, StreamLease), TunnelError> {
    let identity = ctx.identity.as_ref().expect("tunnel chosen only with a CA");
    let source_identity = source.identity();
    let cert = identity.certs.certificate(&source_identity).await?;
    let trust = identity.trust();
    let key = PoolKey {
        source_workload: source.key(),
        source: source_identity,
        destination: peer_identity.clone(),
        address: SocketAddr::new(destination.ip(), HBONE_PORT),
    };
    let address = key.address;
    let metrics = ctx.metrics.clone();
    ctx.pool
        .connect(
            &key,
            destination,
            parsed_by,
            || {
                let metrics = metrics.clone();
                async move {
                    let stream = connect_in_pod(ctx, address).await?;
                    metrics.tunnel_established("outbound");
                    Ok(stream)
                }
            },
            || {
                tunnel::client_config(&cert, peer_identity.clone(), &trust).map_err(|e| {
                    TunnelError::Tls {
                        addr: address,
                        source: io::Error::other(e),
                    }
                })
            },
        )
        .await
}

/// A TCP connection to `destination` made from inside the workload's pod: it leaves
/// with the pod's address and routes. The socket belongs to the agent's process, so
/// its cgroup is not enrolled and the kernel never captures it again.
pub async fn connect_in_pod(ctx: &PodContext, destination: SocketAddr) -> io::Result<TcpStream> {
    let domain = match destination.ip() {
        IpAddr::V4(_) => socket2::Domain::IPV4,
        IpAddr::V6(_) => socket2::Domain::IPV6,
    };
    let socket = ctx.netns.tcp_socket(domain).await?;
    let socket = TcpSocket::from_std_stream(socket);
    match tokio::time::timeout(ctx.connect_timeout, socket.connect(destination)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {:?}", ctx.connect_timeout),
        )),
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
/// is counted here, once, whoever asked for the connection. `parsed_by`, this
/// agent's own marker, tells its server side that the stream's requests were
/// already served (a same-node endpoint of the client side's L7).
pub async fn connect(
    ctx: &PodContext,
    source: &WorkloadMeta,
    addr: SocketAddr,
    how: Transport,
    parsed_by: Option<&hyper::header::HeaderValue>,
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
            let (stream, lease) = open_tunnel(ctx, source, peer_identity, addr, parsed_by)
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
