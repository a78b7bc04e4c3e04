//! The outbound path: accept a captured connection on the in-pod listener, learn
//! where it was going and who sent it from the kernel, connect upstream from
//! inside the pod, and relay bytes with half-close and reset propagation.
//!
//! The routing decision ([`decide`]) is a pure function, kept apart from the I/O.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh_common::{ConnKey, OrigDst};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::connections::{ConnectionGuard, Peers};
use crate::node::capture::orig_dst_addr;
use crate::proxy::l7::pod::PodL7;
use crate::proxy::pod::{
    Transport, accept_until_cancelled, connect, relay_to, reset, spawn_bounded, transport,
};
use crate::proxy::same_node;

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
    ctx: Arc<PodL7>,
    cancel: CancellationToken,
    drain: Duration,
) {
    accept_until_cancelled(&listener, &cancel, &ctx.pod, "outbound", |stream, peer| {
        handle(stream, peer, family, ctx.clone())
    })
    .await;
    if ctx.pod.drain.is_cancelled() {
        // Handed over: the successor accepts from this same socket.
        return;
    }
    let deadline = tokio::time::Instant::now() + drain;
    let mut handler = |stream, peer| handle(stream, peer, family, ctx.clone());
    while let Ok(Ok((stream, peer))) = tokio::time::timeout_at(deadline, listener.accept()).await {
        spawn_bounded(&ctx.pod, "outbound", stream, peer, &mut handler);
    }
}

async fn handle(client: TcpStream, peer: SocketAddr, family: u16, ctx: Arc<PodL7>) {
    let key = ConnKey {
        netns_cookie: ctx.pod.netns.cookie,
        port: peer.port(),
        family,
        _pad: 0,
    };
    let orig = ctx.pod.capture.take_orig_dst(&key);
    let source = ctx.pod.meta.read().expect("workload meta lock").clone();
    let route = match decide(orig.as_ref(), ctx.pod.cgroup_id) {
        Ok(route) => route,
        Err(refusal) => {
            ctx.pod.metrics.orig_dst_missing.inc();
            tracing::warn!(workload = %source.key(), client = %peer, %refusal, "closing captured connection");
            reset(client);
            return;
        }
    };
    if let Some(target) = ctx.l7.catalog.get().resolve(route.destination) {
        crate::proxy::l7::proxy::serve(client, peer, route.destination, target, ctx, source).await;
        return;
    }
    let destination_workload = ctx.pod.directory.lookup(route.destination.ip());
    let transport = transport(destination_workload.as_deref(), ctx.pod.identity.is_some());
    let served_here = ctx
        .local
        .enabled()
        .then(|| ctx.local.lookup(route.destination.ip()))
        .flatten();
    if same_node::eligible(ctx.local.enabled(), &transport, served_here.is_some())
        && let Some(dest) = served_here
    {
        same_node::serve(
            client,
            peer,
            route.destination,
            source,
            &ctx.pod,
            dest,
            &ctx.local,
        )
        .await;
        return;
    }
    let mut peers = Peers::outbound(source.clone(), destination_workload);
    peers.mutual_tls = matches!(transport, Transport::Tunnel { .. });
    let mut guard = ConnectionGuard::open(
        &ctx.pod.connections,
        &ctx.pod.metrics,
        peers,
        peer,
        route.destination,
    );
    let _ = client.set_nodelay(true);
    let upstream = match connect(&ctx.pod, &source, route.destination, transport, None).await {
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
