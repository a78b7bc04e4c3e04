//! The same-node fast path. When a captured connection's destination is a
//! meshed pod this agent also serves, and nothing needs its bytes (no L7), the
//! agent admits it exactly as the destination's tunnel listener would (the
//! source identity is the one the kernel proved, then PeerAuthentication and
//! AuthorizationPolicy of the destination), dials the application from inside
//! the destination pod, and joins its two sockets in the kernel
//! ([`crate::node::splice`]). The bytes then never reach user space and are
//! never encrypted: they do not leave the node.
//!
//! The agent keeps one small task per joined connection that wakes only for
//! the ends of the connection: a half-close is passed on once every byte before
//! it has been queued on the other socket, a reset resets the other side, and a
//! policy change that revokes the connection resets both. If the sockets cannot
//! be joined (a full map, say), the connection is relayed in user space instead.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::connections::{CarriedBy, ConnectionGuard, Peers};
use crate::node::splice::{Joined, kick};
use crate::proxy::inbound::{InboundContext, Refusal, admit};
use crate::proxy::pod::{PodContext, Transport, reset};
use crate::proxy::relay::{relay, shutdown_write, write_all};
use crate::state::workload::WorkloadMeta;

/// The meshed pods this agent serves, by address, for finding a connection's
/// destination on this node; and whether the fast path is on.
pub struct LocalDestinations {
    enabled: bool,
    by_ip: RwLock<HashMap<IpAddr, Weak<InboundContext>>>,
}

/// A pod's entries in [`LocalDestinations`]; removed on drop.
pub struct LocalRegistration {
    registry: Arc<LocalDestinations>,
    ips: Vec<IpAddr>,
    ctx: Weak<InboundContext>,
}

impl LocalDestinations {
    /// An empty registry; `enabled` is the agent's `--same-node-fast-path`.
    pub fn new(enabled: bool) -> Self {
        LocalDestinations {
            enabled,
            by_ip: RwLock::default(),
        }
    }

    /// Whether joined connections are made at all.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Records that `ctx` serves `ips` on this node until the registration drops.
    pub fn register(
        self: &Arc<Self>,
        ips: &[IpAddr],
        ctx: &Arc<InboundContext>,
    ) -> LocalRegistration {
        let weak = Arc::downgrade(ctx);
        let mut by_ip = self.by_ip.write().expect("local destinations lock");
        for ip in ips {
            by_ip.insert(*ip, weak.clone());
        }
        LocalRegistration {
            registry: self.clone(),
            ips: ips.to_vec(),
            ctx: weak,
        }
    }

    /// The destination pod served here at `ip`, if any.
    pub fn lookup(&self, ip: IpAddr) -> Option<Arc<InboundContext>> {
        self.by_ip
            .read()
            .expect("local destinations lock")
            .get(&ip)
            .and_then(Weak::upgrade)
    }
}

impl Drop for LocalRegistration {
    fn drop(&mut self) {
        let mut by_ip = self
            .registry
            .by_ip
            .write()
            .expect("local destinations lock");
        for ip in &self.ips {
            // A newer enrollment of the same address keeps its entry.
            if by_ip.get(ip).is_some_and(|w| w.ptr_eq(&self.ctx)) {
                by_ip.remove(ip);
            }
        }
    }
}

/// Whether a captured connection takes the fast path: it is on, the
/// connection would otherwise take the tunnel (a meshed destination, with mTLS),
/// and that destination is a pod this agent serves. L7 connections never get
/// here (they are decided before).
pub fn eligible(enabled: bool, transport: &Transport, destination_served_here: bool) -> bool {
    enabled && matches!(transport, Transport::Tunnel { .. }) && destination_served_here
}

/// The client's address as the destination's policies see it: the source
/// pod's address of the destination's family (the listener saw loopback).
fn source_address(
    source_ips: &[IpAddr],
    destination: SocketAddr,
    client: SocketAddr,
) -> SocketAddr {
    let ip = source_ips
        .iter()
        .find(|ip| ip.is_ipv4() == destination.is_ipv4())
        .copied()
        .unwrap_or(client.ip());
    SocketAddr::new(ip, client.port())
}

/// Carries one captured connection to `dest`, a pod on this node (see the module doc).
pub async fn serve(
    client: TcpStream,
    peer: SocketAddr,
    destination: SocketAddr,
    source: Arc<WorkloadMeta>,
    ctx: &PodContext,
    dest: Arc<InboundContext>,
) {
    let dest_meta = dest.workload.meta.read().expect("meta lock").clone();
    let mut peers = Peers::outbound(source.clone(), Some(dest_meta));
    // The kernel proved both identities and the bytes stay in it: as strong as
    // the tunnel, and reported the same way.
    peers.mutual_tls = true;
    let mut guard = ConnectionGuard::open(&ctx.connections, &ctx.metrics, peers, peer, destination);
    let _ = client.set_nodelay(true);
    let from = source_address(&ctx.ips, destination, peer);
    let (dest_guard, cancel, app) = match admit(
        &dest,
        Some(source.clone()),
        Some(source.identity()),
        from,
        destination,
    )
    .await
    {
        Ok(admitted) => admitted,
        Err(refusal) => {
            guard.fail(match refusal {
                Refusal::Denied => "DENY",
                Refusal::Undeliverable => "UF",
            });
            reset(client);
            return;
        }
    };
    let _ = app.set_nodelay(true);
    let joined = match ctx.capture.splice.join(&client, &app) {
        Ok(joined) => joined,
        Err(e) => {
            tracing::warn!(%destination, error = %e, "joining in the kernel failed; relaying in user space");
            ctx.metrics.splice_fallbacks.inc();
            tokio::select! {
                result = relay(&client, &app, guard.received(), guard.sent()) => {
                    if let Err(e) = result {
                        tracing::debug!(%destination, error = %e, "connection ended with error");
                    }
                }
                _ = cancel.cancelled() => {
                    reset(client);
                    let _ = app.set_zero_linger();
                }
            }
            return;
        }
    };
    for refusal in &joined.refusals {
        if refusal.client_already_closing() {
            // One end sent and half-closed at once (`echo x | nc`): its
            // socket is past ESTABLISHED; the agent relays that direction.
            tracing::debug!(%destination, error = %refusal, "one direction not joined; the agent relays it");
        } else {
            tracing::warn!(%destination, error = %refusal, "one direction not joined; the agent relays it");
        }
    }
    let path = match (joined.to_server_spliced, joined.to_client_spliced) {
        (true, true) => {
            ctx.metrics.spliced_connections.inc();
            CarriedBy::Kernel
        }
        (false, false) => {
            ctx.metrics.splice_fallbacks.inc();
            CarriedBy::Agent
        }
        _ => {
            ctx.metrics.splice_fallbacks.inc();
            CarriedBy::KernelAndAgent
        }
    };
    guard.carried_by(path);
    dest_guard.carried_by(path);
    let outcome = carry(&client, &app, &joined, &cancel).await;
    let moved = joined.bytes();
    if outcome.relayed_to_server + outcome.relayed_to_client > 0 {
        tracing::debug!(
            %destination,
            relayed_to_server = outcome.relayed_to_server,
            relayed_to_client = outcome.relayed_to_client,
            "the agent relayed part of a joined connection"
        );
    }
    let (to_server, to_client) = (
        moved.to_server + outcome.relayed_to_server,
        moved.to_client + outcome.relayed_to_client,
    );
    guard.received().add(to_server as usize);
    guard.sent().add(to_client as usize);
    dest_guard.received().add(to_server as usize);
    dest_guard.sent().add(to_client as usize);
    if let Some(e) = outcome.error {
        tracing::debug!(%destination, error = %e, "joined connection ended with error");
    }
    drop(joined);
}

/// How a joined connection ended, and bytes the agent carried itself (only
/// when the kernel could not hand a segment to the other socket).
#[derive(Default)]
struct Carried {
    relayed_to_server: u64,
    relayed_to_client: u64,
    error: Option<io::Error>,
}

/// Watches the two joined sockets until both directions have ended.
async fn carry(
    client: &TcpStream,
    app: &TcpStream,
    joined: &Joined,
    cancel: &CancellationToken,
) -> Carried {
    use std::os::fd::AsFd;
    let mut out = Carried::default();
    // Bytes that arrived before the join are forwarded now, in order.
    let _ = kick(client.as_fd());
    let _ = kick(app.as_fd());
    let (mut client_open, mut app_open) = (true, true);
    let mut buf = Vec::new();
    while client_open || app_open {
        let step = tokio::select! {
            _ = cancel.cancelled() => Err(io::Error::other("revoked by a policy change")),
            r = client.readable(), if client_open => {
                ended(r, client, app, &mut buf, &mut out.relayed_to_server, Direction::ToServer).await
            }
            r = app.readable(), if app_open => {
                ended(r, app, client, &mut buf, &mut out.relayed_to_client, Direction::ToClient).await
            }
        };
        // A direction that ended: which socket to half-close, having queued how much.
        let ended = match step {
            Ok(None) => continue,
            Ok(Some(Direction::ToServer)) => {
                client_open = false;
                (
                    app,
                    joined.bytes().to_server + out.relayed_to_server,
                    "client's",
                    "server",
                )
            }
            Ok(Some(Direction::ToClient)) => {
                app_open = false;
                (
                    client,
                    joined.bytes().to_client + out.relayed_to_client,
                    "server's",
                    "client",
                )
            }
            Err(e) => {
                out.error = Some(e);
                break;
            }
        };
        let (to, expected, whose, receiver) = ended;
        if let Err(e) = half_close(to, expected, cancel).await {
            let context = format!("passing the {whose} half-close to the {receiver}: {e}");
            out.error = Some(io::Error::new(e.kind(), context));
            break;
        }
    }
    if out.error.is_some() {
        let _ = client.set_zero_linger();
        let _ = app.set_zero_linger();
    }
    out
}

enum Direction {
    ToServer,
    ToClient,
}

/// After a wake-up on `from`: the direction that ended, if it did.
async fn ended(
    ready: io::Result<()>,
    from: &TcpStream,
    to: &TcpStream,
    buf: &mut Vec<u8>,
    relayed: &mut u64,
    direction: Direction,
) -> io::Result<Option<Direction>> {
    let side = match direction {
        Direction::ToServer => "client",
        Direction::ToClient => "server",
    };
    let context = |e: io::Error| io::Error::new(e.kind(), format!("{side} side: {e}"));
    ready.map_err(context)?;
    let eof = on_readable(from, to, buf, relayed).await.map_err(context)?;
    Ok(eof.then_some(direction))
}

/// A joined socket woke its task: the peer closed (`Ok(true)`), reset (`Err`),
/// or the kernel left bytes for the agent, which relays them (`Ok(false)`).
async fn on_readable(
    from: &TcpStream,
    to: &TcpStream,
    buf: &mut Vec<u8>,
    relayed: &mut u64,
) -> io::Result<bool> {
    loop {
        buf.clear();
        buf.reserve(16 * 1024);
        match from.try_read_buf(buf) {
            Ok(0) => return Ok(true),
            Ok(n) => {
                write_all(to, &buf[..n]).await?;
                *relayed += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                buf.clear();
                buf.shrink_to_fit();
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Bytes `socket` has taken to send so far: transmitted once, plus not yet
/// sent. Read in one `TCP_INFO` call, under the socket's lock, so consistent.
fn queued_for_send(socket: &TcpStream) -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    // SAFETY: tcp_info is plain data; the kernel fills at most `len` bytes.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid fd and an out-buffer of the advertised size.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info.tcpi_bytes_sent - info.tcpi_bytes_retrans + u64::from(info.tcpi_notsent_bytes))
}

/// Passes a half-close on to `to` once it has queued every byte that came
/// before it (`expected`): the kernel forwards a joined socket's bytes from a
/// work queue, so the end of the stream can be seen before its last bytes
/// have been handed over.
async fn half_close(to: &TcpStream, expected: u64, cancel: &CancellationToken) -> io::Result<()> {
    let mut wait = Duration::from_micros(200);
    loop {
        if queued_for_send(to)? >= expected {
            break;
        }
        if let Some(e) = to.take_error()? {
            return Err(e);
        }
        tokio::select! {
            _ = cancel.cancelled() => return Err(io::Error::other("revoked by a policy change")),
            _ = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(Duration::from_millis(50));
    }
    shutdown_write(to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    #[test]
    fn eligibility() {
        let tunnel = Transport::Tunnel {
            peer_identity: Identity::new("cluster.local", "ns", "sa"),
        };
        let cases = [
            ("local meshed destination", true, &tunnel, true, true),
            ("fast path off", false, &tunnel, true, false),
            ("destination on another node", true, &tunnel, false, false),
            (
                "plain TCP destination",
                true,
                &Transport::Direct,
                true,
                false,
            ),
        ];
        for (name, enabled, transport, here, expected) in cases {
            assert_eq!(eligible(enabled, transport, here), expected, "{name}");
        }
    }

    #[test]
    fn policies_see_the_source_pod_address() {
        let client: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let v4: SocketAddr = "10.0.0.9:80".parse().unwrap();
        let v6: SocketAddr = "[fd00::9]:80".parse().unwrap();
        let ips: Vec<IpAddr> = vec!["fd00::5".parse().unwrap(), "10.0.0.5".parse().unwrap()];
        assert_eq!(
            source_address(&ips, v4, client),
            "10.0.0.5:40000".parse().unwrap()
        );
        assert_eq!(
            source_address(&ips, v6, client),
            "[fd00::5]:40000".parse().unwrap()
        );
        assert_eq!(source_address(&[], v4, client), client);
    }
}
