//! The outbound path: accept a captured connection on the in-pod listener, learn
//! where it was going and who sent it from the kernel, connect upstream from
//! inside the pod, and relay bytes with half-close and reset propagation.
//!
//! The routing decision ([`decide`]) is a pure function, kept apart from the I/O.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use mesh_common::{ConnKey, OrigDst};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::agent::IdentityState;
use crate::capture::{Capture, orig_dst_addr};
use crate::connections::{ConnectionGuard, ConnectionTable, Peers};
use crate::identity::Identity;
use crate::l7::upstream::{connect, relay_to};
use crate::metrics::Metrics;
use crate::netns::NetnsHandle;
use crate::tunnel::pool::{PoolKey, StreamLease, TunnelPool};
use crate::tunnel::{self, HBONE_PORT, TunnelError};
use crate::workload::{Directory, WorkloadMeta};
use hyper_util::rt::TokioIo;

/// Everything an in-pod listener needs to serve its workload's connections.
pub struct OutboundContext {
    /// The workload's identity; swapped in place when its labels change.
    pub meta: RwLock<Arc<WorkloadMeta>>,
    /// The pod cgroup the kernel matched for this workload.
    pub cgroup_id: u64,
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
    /// Services and routes.
    pub l7: Arc<crate::l7::L7>,
    /// This workload's pooled HTTP connections to endpoints.
    pub upstreams: crate::l7::upstream::Upstreams,
}

/// Where a captured connection goes, decided from kernel facts only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The application's original destination.
    pub destination: SocketAddr,
}

/// Why a captured connection cannot be forwarded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No kernel record: the connection reached the listener without being captured.
    #[error("no original destination recorded for this connection")]
    NoRecord,
    /// The record belongs to another workload's cgroup than this listener serves.
    #[error("recorded for cgroup {recorded}, but this listener serves cgroup {listener}")]
    WrongWorkload {
        /// cgroup id in the kernel record.
        recorded: u64,
        /// cgroup id of the listener's workload.
        listener: u64,
    },
    /// The destination is unusable (unspecified address or port 0).
    #[error("original destination {0} is not routable")]
    Unroutable(SocketAddr),
}

/// Decides where a captured connection goes.
pub fn decide(orig: Option<&OrigDst>, listener_cgroup: u64) -> Result<Route, Refusal> {
    let orig = orig.ok_or(Refusal::NoRecord)?;
    if orig.cgroup_id != listener_cgroup {
        return Err(Refusal::WrongWorkload {
            recorded: orig.cgroup_id,
            listener: listener_cgroup,
        });
    }
    let destination = orig_dst_addr(orig);
    if destination.port() == 0 || destination.ip().is_unspecified() {
        return Err(Refusal::Unroutable(destination));
    }
    Ok(Route { destination })
}

/// Serves one in-pod listener until `cancel`, then keeps accepting for `drain`
/// so connections captured just before unenrollment are still carried.
pub async fn serve(
    listener: TcpListener,
    family: u16,
    ctx: Arc<OutboundContext>,
    cancel: CancellationToken,
    drain: Duration,
) {
    accept_until_cancelled(&listener, &cancel, "outbound", |stream, peer| {
        tokio::spawn(handle(stream, peer, family, ctx.clone()));
    })
    .await;
    let deadline = tokio::time::Instant::now() + drain;
    while let Ok(Ok((stream, peer))) = tokio::time::timeout_at(deadline, listener.accept()).await {
        tokio::spawn(handle(stream, peer, family, ctx.clone()));
    }
}

/// Hands each accepted connection to `on_accept` until `cancel`. Every in-pod
/// listener (outbound, inbound, tunnel) accepts this way.
pub async fn accept_until_cancelled(
    listener: &TcpListener,
    cancel: &CancellationToken,
    listener_kind: &'static str,
    mut on_accept: impl FnMut(TcpStream, SocketAddr),
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => on_accept(stream, peer),
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning; the backlog holds.
                    tracing::warn!(listener = listener_kind, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

async fn handle(client: TcpStream, peer: SocketAddr, family: u16, ctx: Arc<OutboundContext>) {
    let key = ConnKey {
        netns_cookie: ctx.netns.cookie,
        port: peer.port(),
        family,
        _pad: 0,
    };
    let orig = ctx.capture.take_orig_dst(&key);
    let source = ctx.meta.read().expect("workload meta lock").clone();
    let route = match decide(orig.as_ref(), ctx.cgroup_id) {
        Ok(route) => route,
        Err(refusal) => {
            ctx.metrics.orig_dst_missing.inc();
            tracing::warn!(workload = %source.key(), client = %peer, %refusal, "closing captured connection");
            reset(client);
            return;
        }
    };
    if let Some(target) = ctx.l7.catalog.get().resolve(route.destination) {
        crate::l7::proxy::serve(client, peer, route.destination, target, ctx, source).await;
        return;
    }
    let destination_workload = ctx.directory.lookup(route.destination.ip());
    let transport = transport(destination_workload.as_deref(), ctx.identity.is_some());
    let mut peers = Peers::outbound(source.clone(), destination_workload);
    peers.mutual_tls = matches!(transport, Transport::Tunnel { .. });
    let mut guard = ConnectionGuard::open(
        &ctx.connections,
        &ctx.metrics,
        peers,
        peer,
        route.destination,
    );
    let _ = client.set_nodelay(true);
    let upstream = match connect(&ctx, &source, route.destination, transport).await {
        Ok(upstream) => upstream,
        Err(e) => {
            guard.fail(e.response_flags());
            tracing::warn!(
                workload = %source.key(),
                destination = %route.destination,
                error = %e,
                "resetting client"
            );
            reset(client);
            return;
        }
    };
    if let Err(e) = relay_to(&client, upstream, &[], &guard).await {
        tracing::debug!(destination = %route.destination, error = %e, "connection ended with error");
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
    ctx: &OutboundContext,
    source: &WorkloadMeta,
    peer_identity: Identity,
    destination: SocketAddr,
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
            || async move {
                let stream = connect_in_pod(ctx, address).await?;
                metrics.tunnel_established("outbound");
                Ok(stream)
            },
            || {
                tunnel::client_config(&cert, peer_identity, &trust).map_err(|e| TunnelError::Tls {
                    addr: address,
                    source: io::Error::other(e),
                })
            },
        )
        .await
}

/// A TCP connection to `destination` made from inside the workload's pod: it leaves
/// with the pod's address and routes. The socket belongs to the agent's process, so
/// its cgroup is not enrolled and the kernel never captures it again.
pub async fn connect_in_pod(
    ctx: &OutboundContext,
    destination: SocketAddr,
) -> io::Result<TcpStream> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_common::{FAMILY_V4, FAMILY_V6, v4_mapped};

    fn orig(addr: [u8; 16], family: u16, port: u16, cgroup_id: u64) -> OrigDst {
        OrigDst {
            addr,
            port,
            family,
            workload_id: 1,
            cgroup_id,
        }
    }

    #[test]
    fn decisions() {
        let v6: [u8; 16] = "fd00::5".parse::<std::net::Ipv6Addr>().unwrap().octets();
        let cases: Vec<(&str, Option<OrigDst>, Result<Route, Refusal>)> = vec![
            (
                "ipv4 destination",
                Some(orig(v4_mapped([198, 18, 0, 3]), FAMILY_V4, 80, 9)),
                Ok(Route {
                    destination: "198.18.0.3:80".parse().unwrap(),
                }),
            ),
            (
                "ipv6 destination",
                Some(orig(v6, FAMILY_V6, 443, 9)),
                Ok(Route {
                    destination: "[fd00::5]:443".parse().unwrap(),
                }),
            ),
            ("no kernel record", None, Err(Refusal::NoRecord)),
            (
                "record from another cgroup",
                Some(orig(v4_mapped([198, 18, 0, 3]), FAMILY_V4, 80, 8)),
                Err(Refusal::WrongWorkload {
                    recorded: 8,
                    listener: 9,
                }),
            ),
            (
                "port zero",
                Some(orig(v4_mapped([198, 18, 0, 3]), FAMILY_V4, 0, 9)),
                Err(Refusal::Unroutable("198.18.0.3:0".parse().unwrap())),
            ),
        ];
        for (name, record, expected) in cases {
            assert_eq!(decide(record.as_ref(), 9), expected, "{name}");
        }
    }
}
