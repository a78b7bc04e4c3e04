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
//!
//! A joined connection has no user-space state but its two sockets, so on an
//! upgrade it crosses to the successor agent with the listeners
//! ([`crate::handoff`]): the predecessor's task stops watching it, the sockets
//! travel as fds, and the successor checks they are the joined pair, authorizes
//! the connection again under its own policies and watches it from then on.
//! The kernel carries its bytes throughout, so it outlives the drain timeout.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::connections::{CarriedBy, ConnectionGuard, Peers, Reporting};
use crate::handoff::{HandedOverJoined, JoinedRecord};
use crate::node::splice::{Joined, SplicedBytes, kick, socket_cookie};
use crate::proxy::inbound::{Admitted, InboundContext, Refusal, admit, authorize};
use crate::proxy::pod::{PodContext, Transport, ip_toward, reset};
use crate::proxy::relay::{relay, shutdown_write, write_all};
use crate::state::workload::WorkloadMeta;

/// The meshed pods this agent serves, by address, for finding a connection's
/// destination on this node; and whether the fast path is on.
pub struct LocalDestinations {
    enabled: bool,
    by_ip: RwLock<HashMap<IpAddr, Weak<InboundContext>>>,
    /// Joined connections that can cross to a successor, by client cookie.
    handovers: Mutex<HashMap<u64, HandoverSlot>>,
}

/// How the agent asks a joined connection's task to hand it over, and gets it.
struct HandoverSlot {
    request: CancellationToken,
    reply: oneshot::Receiver<HandedOverJoined>,
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
            handovers: Mutex::default(),
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

    /// Stops watching every joined connection that can cross to a successor
    /// and returns them (those whose task does not answer within `wait` stay).
    pub async fn hand_over_joined(&self, wait: Duration) -> Vec<HandedOverJoined> {
        let slots: Vec<HandoverSlot> = self
            .handovers
            .lock()
            .expect("handover lock")
            .drain()
            .map(|(_, slot)| slot)
            .collect();
        for slot in &slots {
            slot.request.cancel();
        }
        let deadline = tokio::time::Instant::now() + wait;
        let mut out = Vec::with_capacity(slots.len());
        for slot in slots {
            // A connection that ended meanwhile drops its sender: nothing to hand over.
            if let Ok(Ok(joined)) = tokio::time::timeout_at(deadline, slot.reply).await {
                out.push(joined);
            }
        }
        out
    }

    fn offer_handover(&self, key: u64) -> (CancellationToken, oneshot::Sender<HandedOverJoined>) {
        let (tx, rx) = oneshot::channel();
        let request = CancellationToken::new();
        self.handovers.lock().expect("handover lock").insert(
            key,
            HandoverSlot {
                request: request.clone(),
                reply: rx,
            },
        );
        (request, tx)
    }

    fn withdraw_handover(&self, key: u64) {
        self.handovers.lock().expect("handover lock").remove(&key);
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
    let ip = ip_toward(source_ips, destination).unwrap_or(client.ip());
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
    local: &Arc<LocalDestinations>,
) {
    let dest_meta = dest.workload.meta.read().expect("meta lock").clone();
    let mut peers = Peers::outbound(source.clone(), Some(dest_meta));
    // The kernel proved both identities and the bytes stay in it: as strong as
    // the tunnel, and reported the same way.
    peers.mutual_tls = true;
    let mut guard = ConnectionGuard::open(&ctx.connections, &ctx.metrics, peers, peer, destination);
    let _ = client.set_nodelay(true);
    let from = source_address(&ctx.ips, destination, peer);
    let mut admitted = match admit(
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
    // Carried byte for byte: a TCP connection at both ends, which an
    // AuthorizationPolicy about HTTP refuses (the fast path reads no requests).
    admitted.guard.report(Reporting::Tcp);
    if admitted.refused_as_opaque(&dest) {
        guard.fail("DENY");
        let _ = admitted.app.set_zero_linger();
        reset(client);
        return;
    }
    let Admitted {
        guard: dest_guard,
        cancel,
        app,
        ..
    } = admitted;
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
    let watched = Watched {
        client,
        app,
        joined,
        guard,
        dest_guard,
        cancel,
        peer,
        destination,
        source_ip: from.ip(),
        counted_from: SplicedBytes::default(),
        adopted: false,
    };
    watch(watched, local).await;
}

/// A joined connection and everything the agent keeps for it.
struct Watched {
    client: TcpStream,
    app: TcpStream,
    joined: Joined,
    /// The source's and the destination's reports.
    guard: ConnectionGuard,
    dest_guard: ConnectionGuard,
    /// Fires when a policy change revokes the connection.
    cancel: CancellationToken,
    peer: SocketAddr,
    destination: SocketAddr,
    /// The client pod's address, as the destination's policies saw it.
    source_ip: IpAddr,
    /// Kernel byte counts before this agent watched it (a predecessor's share).
    counted_from: SplicedBytes,
    /// Handed over by a predecessor agent, not joined by this one.
    adopted: bool,
}

/// Watches a joined connection until it ends or crosses to a successor agent,
/// then reports its bytes.
async fn watch(w: Watched, local: &LocalDestinations) {
    let Watched {
        mut client,
        mut app,
        joined,
        guard,
        dest_guard,
        cancel,
        peer,
        destination,
        source_ip,
        counted_from,
        adopted,
    } = w;
    // Only a connection the kernel carries both ways can cross over: its
    // agent-side state is nothing but the two sockets.
    let whole = joined.to_server_spliced && joined.to_client_spliced;
    // Only a join this agent just made can have bytes waiting from before it;
    // a connection adopted from a predecessor was joined all along.
    let mut kick_first = !adopted;
    let (outcome, moved) = loop {
        let handover = whole.then(|| local.offer_handover(joined.client));
        let outcome = carry(
            &client,
            &app,
            &joined,
            &cancel,
            handover.as_ref().map(|(request, _)| request),
            std::mem::take(&mut kick_first),
        )
        .await;
        local.withdraw_handover(joined.client);
        let moved = joined.bytes();
        let Some((_, reply)) = handover.filter(|_| outcome.handed_over) else {
            break (outcome, moved);
        };
        if reply.is_closed() {
            // The handover gave up waiting for this one: keep watching.
            continue;
        }
        let record = JoinedRecord {
            client_cookie: joined.client,
            server_cookie: joined.server,
            peer,
            destination,
            source_ip,
            moved_to_server: moved.to_server,
            moved_to_client: moved.to_client,
        };
        let (client_fd, server_fd) = match (owned(client), owned(app)) {
            (Ok(c), Ok(s)) => (c, s),
            (c, s) => {
                // Sockets this agent can no longer hold are closed: both ends see it.
                tracing::error!(%destination, client = ?c.err(), server = ?s.err(), "a joined connection could not be handed over; closed");
                return;
            }
        };
        let handed = HandedOverJoined {
            record,
            client: client_fd,
            server: server_fd,
        };
        match reply.send(handed) {
            Ok(()) => {
                // The successor owns the peer entries and reports from here.
                account(&guard, &dest_guard, moved, counted_from, &outcome);
                joined.hand_over();
                return;
            }
            Err(handed) => match (reactor(handed.client), reactor(handed.server)) {
                // The handover gave up meanwhile: keep watching.
                (Ok(c), Ok(s)) => (client, app) = (c, s),
                (c, s) => {
                    tracing::error!(%destination, client = ?c.err(), server = ?s.err(), "a joined connection could not be watched again; closed");
                    return;
                }
            },
        }
    };
    account(&guard, &dest_guard, moved, counted_from, &outcome);
    if let Some(e) = outcome.error {
        tracing::debug!(%destination, error = %e, "joined connection ended with error");
    }
}

/// Adds the bytes moved while this agent watched to both reports.
fn account(
    guard: &ConnectionGuard,
    dest_guard: &ConnectionGuard,
    moved: SplicedBytes,
    counted_from: SplicedBytes,
    outcome: &Carried,
) {
    if outcome.relayed_to_server + outcome.relayed_to_client > 0 {
        tracing::debug!(
            relayed_to_server = outcome.relayed_to_server,
            relayed_to_client = outcome.relayed_to_client,
            "the agent relayed part of a joined connection"
        );
    }
    let to_server =
        moved.to_server.saturating_sub(counted_from.to_server) + outcome.relayed_to_server;
    let to_client =
        moved.to_client.saturating_sub(counted_from.to_client) + outcome.relayed_to_client;
    for g in [guard, dest_guard] {
        g.received().add(to_server as usize);
        g.sent().add(to_client as usize);
    }
}

/// A plain socket back in this runtime's reactor.
fn reactor(fd: OwnedFd) -> io::Result<TcpStream> {
    let socket = std::net::TcpStream::from(fd);
    socket.set_nonblocking(true)?;
    TcpStream::from_std(socket)
}

/// A tokio socket as a plain fd, out of this runtime's reactor.
fn owned(socket: TcpStream) -> io::Result<OwnedFd> {
    Ok(OwnedFd::from(socket.into_std()?))
}

/// Why a handed-over joined connection was not taken; it is then reset.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    /// The fds are not the sockets the record names.
    #[error("socket cookie {found} where the record says {expected}")]
    WrongSocket {
        /// The record's cookie.
        expected: u64,
        /// The fd's.
        found: u64,
    },
    /// A socket call failed.
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    /// The kernel's peer entries do not name the pair.
    #[error(transparent)]
    NotJoined(#[from] crate::node::splice::SpliceError),
    /// The source or destination pod is not (or no longer) served here.
    #[error("no pod served here at {0}")]
    UnknownPod(IpAddr),
    /// The destination's policies in force here refuse it.
    #[error("denied by the destination's policy")]
    Denied,
}

/// Takes over a joined connection a predecessor agent handed over (or one
/// this agent could not hand over): checks the two sockets are the joined pair
/// the record names, authorizes it under the policies in force here, and
/// watches it until it ends. One that fails a check is reset, never left
/// unwatched.
pub async fn adopt(local: Arc<LocalDestinations>, handed: HandedOverJoined) {
    let HandedOverJoined {
        record,
        client,
        server,
    } = handed;
    let destination = record.destination;
    let sockets = (|| -> Result<(TcpStream, TcpStream), AdoptError> {
        let mut pair = Vec::with_capacity(2);
        for (fd, expected) in [
            (client, record.client_cookie),
            (server, record.server_cookie),
        ] {
            let found = socket_cookie(fd.as_fd())?;
            if found != expected {
                return Err(AdoptError::WrongSocket { expected, found });
            }
            pair.push(reactor(fd)?);
        }
        let server = pair.pop().expect("two sockets");
        let client = pair.pop().expect("two sockets");
        Ok((client, server))
    })();
    let (client, app) = match sockets {
        Ok(pair) => pair,
        Err(e) => {
            tracing::error!(%destination, error = %e, "a handed-over joined connection is not what it claims; closed");
            return;
        }
    };
    match take_over(&local, &record) {
        Ok((joined, guard, dest_guard, cancel)) => {
            let watched = Watched {
                client,
                app,
                joined,
                guard,
                dest_guard,
                cancel,
                peer: record.peer,
                destination,
                source_ip: record.source_ip,
                counted_from: SplicedBytes {
                    to_server: record.moved_to_server,
                    to_client: record.moved_to_client,
                },
                adopted: true,
            };
            watch(watched, &local).await;
        }
        Err(e) => {
            tracing::warn!(%destination, source = %record.source_ip, error = %e, "a handed-over joined connection was not taken; reset");
            reset(client);
            let _ = app.set_zero_linger();
        }
    }
}

/// The checks and reports of [`adopt`].
fn take_over(
    local: &LocalDestinations,
    record: &JoinedRecord,
) -> Result<(Joined, ConnectionGuard, ConnectionGuard, CancellationToken), AdoptError> {
    let dest = local
        .lookup(record.destination.ip())
        .ok_or(AdoptError::UnknownPod(record.destination.ip()))?;
    let source = local
        .lookup(record.source_ip)
        .ok_or(AdoptError::UnknownPod(record.source_ip))?;
    let splice = &dest.workload.capture.splice;
    let joined = splice.adopt(record.client_cookie, record.server_cookie)?;
    let source_meta = source.workload.meta.read().expect("meta lock").clone();
    let dest_meta = dest.workload.meta.read().expect("meta lock").clone();
    let from = SocketAddr::new(record.source_ip, record.peer.port());
    let (dest_guard, cancel) = authorize(
        &dest,
        Some(source_meta.clone()),
        Some(source_meta.identity()),
        from,
        record.destination,
    )
    .map_err(|_: Refusal| AdoptError::Denied)?;
    let mut peers = Peers::outbound(source_meta, Some(dest_meta));
    peers.mutual_tls = true;
    let ctx = &source.workload;
    let guard = ConnectionGuard::open(
        &ctx.connections,
        &ctx.metrics,
        peers,
        record.peer,
        record.destination,
    );
    guard.carried_by(CarriedBy::Kernel);
    dest_guard.carried_by(CarriedBy::Kernel);
    Ok((joined, guard, dest_guard, cancel))
}

/// How a joined connection ended, and bytes the agent carried itself (only
/// when the kernel could not hand a segment to the other socket).
#[derive(Default)]
struct Carried {
    relayed_to_server: u64,
    relayed_to_client: u64,
    error: Option<io::Error>,
    /// Stopped watching, both directions open, for a successor agent to go on.
    handed_over: bool,
}

impl Carried {
    /// Every byte passed on in each direction: what the kernel moved (`kernel`,
    /// read from its map) plus what the agent relayed itself.
    fn forwarded(&self, kernel: SplicedBytes) -> SplicedBytes {
        SplicedBytes {
            to_server: kernel.to_server + self.relayed_to_server,
            to_client: kernel.to_client + self.relayed_to_client,
        }
    }
}

/// Watches the two joined sockets until both directions have ended, or until
/// `handover` asks for the connection while both are still open.
async fn carry(
    client: &TcpStream,
    app: &TcpStream,
    joined: &Joined,
    cancel: &CancellationToken,
    handover: Option<&CancellationToken>,
    kick_first: bool,
) -> Carried {
    let mut out = Carried::default();
    let handover_requested = async {
        match handover {
            Some(request) => request.cancelled().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(handover_requested);
    if kick_first {
        // Bytes that arrived before the join are forwarded now, in order.
        let _ = kick(client.as_fd());
        let _ = kick(app.as_fd());
    }
    let (mut client_open, mut app_open) = (true, true);
    let mut buf = Vec::new();
    let mut audit =
        tokio::time::interval_at(tokio::time::Instant::now() + AUDIT_EVERY, AUDIT_EVERY);
    audit.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut audited = SplicedBytes::default();
    while client_open || app_open {
        let step = tokio::select! {
            _ = cancel.cancelled() => Err(io::Error::other("revoked by a policy change")),
            _ = audit.tick() => {
                audit_forwarded(client, app, joined, &out, &mut audited).map(|()| None)
            }
            // Only whole: a half-closed direction's pending hand-off stays here.
            _ = &mut handover_requested, if client_open && app_open => {
                out.handed_over = true;
                return out;
            }
            r = client.readable(), if client_open => {
                ended(r, client, app, &mut buf, &mut out.relayed_to_server, Direction::ToServer).await
            }
            r = app.readable(), if app_open => {
                ended(r, app, client, &mut buf, &mut out.relayed_to_client, Direction::ToClient).await
            }
        };
        // A direction that ended: which socket to half-close, having queued
        // how much, checked against what TCP accepted on the other one.
        let ended = match step {
            Ok(None) => continue,
            Ok(Some(Direction::ToServer)) => {
                client_open = false;
                let forwarded = out.forwarded(joined.bytes()).to_server;
                check_forwarded(client, forwarded).map(|()| (app, forwarded, "client's", "server"))
            }
            Ok(Some(Direction::ToClient)) => {
                app_open = false;
                let forwarded = out.forwarded(joined.bytes()).to_client;
                check_forwarded(app, forwarded).map(|()| (client, forwarded, "server's", "client"))
            }
            Err(e) => Err(e),
        };
        let (to, expected, whose, receiver) = match ended {
            Ok(ended) => ended,
            Err(e) => {
                if e.kind() == io::ErrorKind::InvalidData {
                    tracing::error!(error = %e, "a joined connection's stream was corrupted in the kernel; both ends are reset");
                }
                out.error = Some(e);
                break;
            }
        };
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

/// The socket's `TCP_INFO`, read in one call under the socket's lock, so its
/// counters are consistent with each other.
fn tcp_info(socket: &TcpStream) -> io::Result<libc::tcp_info> {
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
    Ok(info)
}

/// Bytes `socket` has taken to send so far: transmitted once, plus not yet sent.
fn queued_for_send(socket: &TcpStream) -> io::Result<u64> {
    let info = tcp_info(socket)?;
    Ok(info.tcpi_bytes_sent - info.tcpi_bytes_retrans + u64::from(info.tcpi_notsent_bytes))
}

/// How often a joined connection that moved bytes is audited for bytes the
/// kernel forwarded twice (see [`check_forwarded`]): a stream carried for
/// hours is reset within this long of a repeated segment, not at its end.
const AUDIT_EVERY: Duration = Duration::from_secs(2);

/// The periodic [`check_forwarded`] of both directions, skipped while the
/// kernel has moved nothing since the last one (an idle connection costs one
/// map read per period).
fn audit_forwarded(
    client: &TcpStream,
    app: &TcpStream,
    joined: &Joined,
    carried: &Carried,
    audited: &mut SplicedBytes,
) -> io::Result<()> {
    // The kernel's count first, then TCP's: TCP's only grows meanwhile.
    let moved = joined.bytes();
    if moved == *audited {
        return Ok(());
    }
    *audited = moved;
    let forwarded = carried.forwarded(moved);
    check_forwarded(client, forwarded.to_server)?;
    check_forwarded(app, forwarded.to_client)
}

/// Checks that the bytes passed on from `from` (by the kernel and by the
/// agent) are no more than the bytes TCP accepted on it; once a direction has
/// ended they are exactly those. More means the kernel forwarded a segment
/// twice: a retransmitted segment that overlaps bytes already received is
/// queued whole, and the sockmap verdict's reader (`tcp_read_skb`) ignores
/// the overlap. The stream is then corrupt, and the caller resets both ends
/// rather than let the receiver see a clean end of a stream with bytes
/// repeated in it.
fn check_forwarded(from: &TcpStream, forwarded: u64) -> io::Result<()> {
    let received = tcp_info(from)?.tcpi_bytes_received;
    if forwarded > received {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the kernel forwarded {forwarded} bytes but TCP received {received}: a retransmitted segment overlapping delivered bytes was forwarded whole"
            ),
        ));
    }
    Ok(())
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

    /// The audit's comparison on a real socket pair: what TCP accepted passes,
    /// one byte more is a repeated segment.
    #[tokio::test]
    async fn forwarding_more_than_tcp_received_is_caught() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut sender = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut receiver, _) = listener.accept().await.unwrap();
        sender.write_all(&[7u8; 100_000]).await.unwrap();
        let mut got = vec![0u8; 100_000];
        receiver.read_exact(&mut got).await.unwrap();
        check_forwarded(&receiver, 0).unwrap();
        check_forwarded(&receiver, 100_000).unwrap();
        let e = check_forwarded(&receiver, 100_001).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        assert!(e.to_string().contains("100001"), "{e}");
    }

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
