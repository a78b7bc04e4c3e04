//! Zero-loss upgrade: a new agent takes over its running predecessor's listening
//! sockets (in-pod outbound, inbound and tunnel listeners, the admin endpoint)
//! over a node-local unix socket with `SCM_RIGHTS`, so the kernel's accept
//! queues always have an owner and no connect is refused during a rollout.
//!
//! The exchange, on a `SOCK_SEQPACKET` socket (one message, one set of fds):
//!
//! 1. successor → `Hello`; the predecessor stops applying config (its kernel
//!    writes would race the successor's) and sends every listener it holds,
//!    in `Listeners` batches, the last one marked.
//! 2. The successor enrolls its pods with those sockets (both processes accept
//!    from the same queues meanwhile) and, once serving, sends `Serving`.
//! 3. The predecessor stops accepting. Its joined same-node connections (the
//!    kernel carries their bytes, so the agent holds no state for them but two
//!    sockets) cross over in `Joined` batches, two fds each, and the successor
//!    watches them from then on: they outlive the drain timeout. Then the
//!    predecessor answers `Draining`, lets its other established connections
//!    finish (or `--drain-timeout` pass) and exits.
//!
//! If the successor goes away before `Serving`, the predecessor resumes as if
//! nothing happened: a failed upgrade leaves the old agent in charge.

use std::collections::HashMap;
use std::io;
use std::io::{IoSlice, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::socket::{
    self, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
    UnixAddr,
};
use serde::{Deserialize, Serialize};

/// Where agents on a node meet for a handoff.
pub const DEFAULT_SOCKET: &str = "/var/run/nodemesh/handoff.sock";
/// File descriptors per message, below the kernel's `SCM_MAX_FD` (253).
const FDS_PER_MESSAGE: usize = 200;
/// Joined connections per message: two fds each.
const JOINED_PER_MESSAGE: usize = FDS_PER_MESSAGE / 2;
/// Largest message: 200 listener keys or 100 joined records in JSON fit with
/// room to spare.
const MAX_MESSAGE: usize = 64 * 1024;
/// How long either side waits for the other's next message.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);

/// Identifies one listening socket across processes: the network namespace it
/// lives in (by cookie, unique per boot; 0 for the agent's own) and its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ListenerKey {
    /// `SO_NETNS_COOKIE` of the pod's network namespace; 0 for the node's.
    pub netns_cookie: u64,
    /// The bound address.
    pub addr: SocketAddr,
}

/// A joined same-node connection as it crosses to a successor: enough for the
/// successor to check the two sockets are the ones joined, to authorize the
/// connection again under its own policy, and to count its bytes from here on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinedRecord {
    /// `SO_COOKIE` of the socket facing the client.
    pub client_cookie: u64,
    /// `SO_COOKIE` of the socket facing the server.
    pub server_cookie: u64,
    /// The client's address as the agent's listener saw it.
    pub peer: SocketAddr,
    /// The original destination (the server pod's address and port).
    pub destination: SocketAddr,
    /// The client pod's address, as the destination's policies see it.
    pub source_ip: IpAddr,
    /// Kernel byte counts at the handover, client to server and back: the
    /// successor reports only what moves after.
    pub moved_to_server: u64,
    /// See `moved_to_server`.
    pub moved_to_client: u64,
}

/// A joined connection in transit: its record and its two sockets.
#[derive(Debug)]
pub struct HandedOverJoined {
    /// What the connection is.
    pub record: JoinedRecord,
    /// The socket facing the client.
    pub client: OwnedFd,
    /// The socket facing the server.
    pub server: OwnedFd,
}

/// One message of the exchange.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
enum Message {
    /// The successor asks for the listeners; `adopts_joined` says it can take
    /// joined connections (a successor without it never gets any).
    Hello {
        version: String,
        #[serde(default)]
        adopts_joined: bool,
    },
    /// A batch of listeners; their fds ride along in the same order.
    Listeners { keys: Vec<ListenerKey>, last: bool },
    /// The successor serves every pod: the predecessor stops accepting.
    Serving,
    /// A batch of joined connections; client and server fds ride along, in pairs.
    Joined {
        records: Vec<JoinedRecord>,
        last: bool,
    },
    /// The predecessor no longer accepts; it drains and exits.
    Draining,
}

/// Why a handoff failed.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// A socket call failed.
    #[error("handoff socket {path}: {source}")]
    Io {
        /// The handoff socket.
        path: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// The other side broke the protocol.
    #[error("handoff socket {path}: unexpected message {got}")]
    Protocol {
        /// The handoff socket.
        path: PathBuf,
        /// What arrived instead.
        got: String,
    },
}

fn seqpacket() -> io::Result<OwnedFd> {
    Ok(socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

fn set_timeouts(fd: &OwnedFd) -> io::Result<()> {
    let tv = nix::sys::time::TimeVal::new(EXCHANGE_TIMEOUT.as_secs() as i64, 0);
    socket::setsockopt(fd, socket::sockopt::ReceiveTimeout, &tv)?;
    socket::setsockopt(fd, socket::sockopt::SendTimeout, &tv)?;
    Ok(())
}

fn send(fd: &OwnedFd, message: &Message, fds: &[RawFd]) -> io::Result<()> {
    let bytes = serde_json::to_vec(message).map_err(io::Error::other)?;
    let iov = [IoSlice::new(&bytes)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    socket::sendmsg::<()>(fd.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)?;
    Ok(())
}

fn recv(fd: &OwnedFd) -> io::Result<(Message, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut cmsg = nix::cmsg_space!([RawFd; FDS_PER_MESSAGE]);
    let (len, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = socket::recvmsg::<()>(
            fd.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let mut fds = Vec::new();
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(received) = c {
                // SAFETY: the kernel just installed these fds in this process for us.
                fds.extend(
                    received
                        .into_iter()
                        .map(|f| unsafe { OwnedFd::from_raw_fd(f) }),
                );
            }
        }
        (msg.bytes, fds)
    };
    if len == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the other agent closed the handoff socket",
        ));
    }
    let message = serde_json::from_slice(&buf[..len]).map_err(io::Error::other)?;
    Ok((message, fds))
}

/// Listening sockets received from a predecessor, each taken by the enrollment
/// (or the admin endpoint) that would otherwise bind the same address.
#[derive(Debug, Default)]
pub struct Inherited {
    sockets: Mutex<HashMap<ListenerKey, OwnedFd>>,
}

impl Inherited {
    /// The inherited listener bound to `addr` in the namespace `netns_cookie`, if any.
    pub fn take(&self, netns_cookie: u64, addr: SocketAddr) -> Option<std::net::TcpListener> {
        let fd = self
            .sockets
            .lock()
            .expect("inherited lock")
            .remove(&ListenerKey { netns_cookie, addr })?;
        let listener = std::net::TcpListener::from(fd);
        // Tokio needs it non-blocking; the flag lives on the shared file description.
        listener.set_nonblocking(true).ok()?;
        Some(listener)
    }

    /// How many were not taken (pods that left the mesh during the upgrade).
    pub fn len(&self) -> usize {
        self.sockets.lock().expect("inherited lock").len()
    }

    /// Whether every inherited socket was taken.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes this process's copy of every socket not taken.
    pub fn release(&self) -> usize {
        let mut sockets = self.sockets.lock().expect("inherited lock");
        let n = sockets.len();
        sockets.clear();
        n
    }
}

/// A running predecessor that has handed over its listeners and waits for
/// [`Predecessor::serving`].
pub struct Predecessor {
    socket: OwnedFd,
    path: PathBuf,
}

/// Asks the agent listening on `path` for its listeners. `Ok(None)` when no
/// agent listens there (first start, or the predecessor died: nothing to hand over).
pub fn request(path: &Path) -> Result<Option<(Predecessor, Inherited)>, HandoffError> {
    let io_err = |source| HandoffError::Io {
        path: path.to_owned(),
        source,
    };
    let socket = seqpacket().map_err(io_err)?;
    let addr = UnixAddr::new(path).map_err(|e| io_err(e.into()))?;
    match socket::connect(socket.as_raw_fd(), &addr) {
        Ok(()) => {}
        Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ECONNREFUSED) => return Ok(None),
        Err(e) => return Err(io_err(e.into())),
    }
    set_timeouts(&socket).map_err(io_err)?;
    send(
        &socket,
        &Message::Hello {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            adopts_joined: true,
        },
        &[],
    )
    .map_err(io_err)?;
    let inherited = Inherited::default();
    loop {
        let (message, fds) = recv(&socket).map_err(io_err)?;
        let Message::Listeners { keys, last } = message else {
            return Err(HandoffError::Protocol {
                path: path.to_owned(),
                got: format!("{message:?}"),
            });
        };
        if keys.len() != fds.len() {
            return Err(HandoffError::Protocol {
                path: path.to_owned(),
                got: format!("{} listener keys with {} fds", keys.len(), fds.len()),
            });
        }
        inherited
            .sockets
            .lock()
            .expect("inherited lock")
            .extend(keys.into_iter().zip(fds));
        if last {
            break;
        }
    }
    Ok(Some((
        Predecessor {
            socket,
            path: path.to_owned(),
        },
        inherited,
    )))
}

impl Predecessor {
    /// Tells the predecessor this agent serves every pod, and waits until it has
    /// stopped accepting; returns the joined connections it handed over, which
    /// this agent must now watch (nobody else does).
    pub fn serving(self) -> Result<Vec<HandedOverJoined>, HandoffError> {
        let io_err = |source| HandoffError::Io {
            path: self.path.clone(),
            source,
        };
        let protocol = |got: String| HandoffError::Protocol {
            path: self.path.clone(),
            got,
        };
        send(&self.socket, &Message::Serving, &[]).map_err(io_err)?;
        let mut joined = Vec::new();
        loop {
            match recv(&self.socket).map_err(io_err)? {
                (Message::Draining, _) => return Ok(joined),
                (Message::Joined { records, last }, fds) => {
                    if fds.len() != 2 * records.len() {
                        return Err(protocol(format!(
                            "{} joined connections with {} fds",
                            records.len(),
                            fds.len()
                        )));
                    }
                    let mut fds = fds.into_iter();
                    for record in records {
                        let (Some(client), Some(server)) = (fds.next(), fds.next()) else {
                            unreachable!("two fds per record, checked above");
                        };
                        joined.push(HandedOverJoined {
                            record,
                            client,
                            server,
                        });
                    }
                    // `last` only marks the end of the batches; Draining ends the exchange.
                    let _ = last;
                }
                (other, _) => return Err(protocol(format!("{other:?}"))),
            }
        }
    }
}

/// What the serving agent does when a successor arrives.
pub trait Handover: Send + Sync {
    /// Stops applying config and returns a duplicate of every listening socket.
    fn offer(&self) -> Vec<(ListenerKey, OwnedFd)>;
    /// The successor went away before serving: apply config again.
    fn resume(&self);
    /// The successor serves: stop accepting and start draining.
    fn retire(&self);
    /// Stops watching every joined connection that can cross over and returns
    /// them; the kernel keeps carrying their bytes meanwhile.
    fn hand_over_joined(&self) -> Vec<HandedOverJoined> {
        Vec::new()
    }
    /// Watches joined connections again: the ones a successor could not take.
    fn adopt_joined(&self, joined: Vec<HandedOverJoined>) {
        drop(joined);
    }
    /// An exchange with a successor ended (either way): an agent that retired
    /// in it may exit now, and not before, or joined connections in transit
    /// would close with it.
    fn exchange_ended(&self) {}
}

/// The serving side: listens on `path` (replacing a stale socket file) for one
/// successor at a time, on a thread of its own (the exchange is a few blocking
/// calls). Returns once a successor has taken over.
pub fn listen(path: &Path) -> Result<OwnedFd, HandoffError> {
    let io_err = |source| HandoffError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err)?;
    }
    let socket = seqpacket().map_err(io_err)?;
    // A predecessor that handed over has stopped listening here; its file is replaced.
    let _ = std::fs::remove_file(path);
    let addr = UnixAddr::new(path).map_err(|e| io_err(e.into()))?;
    socket::bind(socket.as_raw_fd(), &addr).map_err(|e| io_err(e.into()))?;
    socket::listen(&socket, socket::Backlog::new(4).expect("small backlog"))
        .map_err(|e| io_err(e.into()))?;
    Ok(socket)
}

/// Serves successors on `listener` until one has taken over (then returns).
pub fn serve(listener: OwnedFd, path: PathBuf, handover: &dyn Handover) {
    loop {
        let conn = match socket::accept(listener.as_raw_fd()) {
            // SAFETY: accept returned a new fd owned by nobody else.
            Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "handoff socket accept failed; upgrades will not hand over");
                return;
            }
        };
        match hand_over(&conn, handover) {
            Ok(listeners) => {
                tracing::info!(
                    listeners,
                    "handed over to a successor; draining established connections"
                );
                handover.exchange_ended();
                return;
            }
            Err(e) => {
                handover.resume();
                tracing::warn!(error = %e, "handoff to a successor failed; this agent keeps serving");
                handover.exchange_ended();
            }
        }
    }
}

fn hand_over(conn: &OwnedFd, handover: &dyn Handover) -> io::Result<usize> {
    set_timeouts(conn)?;
    let adopts_joined = match recv(conn)? {
        (
            Message::Hello {
                version,
                adopts_joined,
            },
            _,
        ) => {
            tracing::info!(successor_version = %version, "a successor asks for the listeners; config changes wait for it");
            adopts_joined
        }
        (other, _) => {
            return Err(io::Error::other(format!("expected Hello, got {other:?}")));
        }
    };
    let offered = handover.offer();
    let total = offered.len();
    let mut batches = offered.chunks(FDS_PER_MESSAGE).peekable();
    if batches.peek().is_none() {
        send(
            conn,
            &Message::Listeners {
                keys: Vec::new(),
                last: true,
            },
            &[],
        )?;
    }
    while let Some(batch) = batches.next() {
        let keys = batch.iter().map(|(k, _)| *k).collect();
        let fds: Vec<RawFd> = batch.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
        let last = batches.peek().is_none();
        send(conn, &Message::Listeners { keys, last }, &fds)?;
    }
    drop(offered);
    match recv(conn)? {
        (Message::Serving, _) => {}
        (other, _) => {
            return Err(io::Error::other(format!("expected Serving, got {other:?}")));
        }
    }
    handover.retire();
    if adopts_joined {
        let joined = handover.hand_over_joined();
        if !joined.is_empty() {
            let count = joined.len();
            if let Err(e) = send_joined(conn, &joined) {
                // The successor may or may not hold them now; this agent keeps
                // watching its copies, so none is left unwatched.
                tracing::error!(count, error = %e, "handing joined connections to the successor failed; this agent keeps them");
                handover.adopt_joined(joined);
                return Err(e);
            }
            tracing::info!(
                count,
                "handed joined same-node connections to the successor"
            );
        }
    }
    send(conn, &Message::Draining, &[])?;
    Ok(total)
}

fn send_joined(conn: &OwnedFd, joined: &[HandedOverJoined]) -> io::Result<()> {
    let mut batches = joined.chunks(JOINED_PER_MESSAGE).peekable();
    while let Some(batch) = batches.next() {
        let records = batch.iter().map(|j| j.record.clone()).collect();
        let fds: Vec<RawFd> = batch
            .iter()
            .flat_map(|j| [j.client.as_raw_fd(), j.server.as_raw_fd()])
            .collect();
        let last = batches.peek().is_none();
        send(conn, &Message::Joined { records, last }, &fds)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Fake {
        listeners: Vec<std::net::TcpListener>,
        resumed: AtomicUsize,
        retired: AtomicUsize,
        joined: Mutex<Vec<HandedOverJoined>>,
    }

    impl Fake {
        fn new(listeners: Vec<std::net::TcpListener>) -> Self {
            Fake {
                listeners,
                resumed: AtomicUsize::new(0),
                retired: AtomicUsize::new(0),
                joined: Mutex::default(),
            }
        }
    }

    impl Handover for Fake {
        fn offer(&self) -> Vec<(ListenerKey, OwnedFd)> {
            self.listeners
                .iter()
                .map(|l| {
                    (
                        ListenerKey {
                            netns_cookie: 7,
                            addr: l.local_addr().unwrap(),
                        },
                        OwnedFd::from(l.try_clone().unwrap()),
                    )
                })
                .collect()
        }
        fn resume(&self) {
            self.resumed.fetch_add(1, Ordering::SeqCst);
        }
        fn retire(&self) {
            self.retired.fetch_add(1, Ordering::SeqCst);
        }
        fn hand_over_joined(&self) -> Vec<HandedOverJoined> {
            std::mem::take(&mut *self.joined.lock().unwrap())
        }
    }

    fn record(i: u64) -> JoinedRecord {
        JoinedRecord {
            client_cookie: 2 * i,
            server_cookie: 2 * i + 1,
            peer: "127.0.0.1:40000".parse().unwrap(),
            destination: "10.0.0.2:80".parse().unwrap(),
            source_ip: "10.0.0.1".parse().unwrap(),
            moved_to_server: i,
            moved_to_client: 0,
        }
    }

    /// More joined connections than fit one message cross over after Serving,
    /// each record with its own two sockets, still connected to their peers.
    #[test]
    fn joined_connections_cross_over_with_their_sockets() {
        use std::io::{Read, Write};
        use std::os::unix::net::UnixStream;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("handoff.sock");
        let fake = std::sync::Arc::new(Fake::new(Vec::new()));
        let mut kept = Vec::new();
        for i in 0..150 {
            let (client, client_peer) = UnixStream::pair().unwrap();
            let (server, server_peer) = UnixStream::pair().unwrap();
            kept.push((client_peer, server_peer));
            fake.joined.lock().unwrap().push(HandedOverJoined {
                record: record(i),
                client: client.into(),
                server: server.into(),
            });
        }
        let listener = listen(&path).unwrap();
        let server = {
            let fake = fake.clone();
            let path = path.clone();
            std::thread::spawn(move || serve(listener, path, fake.as_ref()))
        };
        let (predecessor, _) = request(&path).unwrap().unwrap();
        let joined = predecessor.serving().unwrap();
        server.join().unwrap();
        assert_eq!(joined.len(), 150);
        for (i, (handed, (client_peer, server_peer))) in
            joined.into_iter().zip(&mut kept).enumerate()
        {
            assert_eq!(handed.record, record(i as u64));
            client_peer.write_all(b"c").unwrap();
            server_peer.write_all(b"s").unwrap();
            let mut byte = [0u8; 1];
            UnixStream::from(handed.client)
                .read_exact(&mut byte)
                .unwrap();
            assert_eq!(&byte, b"c");
            UnixStream::from(handed.server)
                .read_exact(&mut byte)
                .unwrap();
            assert_eq!(&byte, b"s");
        }
    }

    /// More listeners than fit one message cross over, each still the same
    /// socket (a connect to it is accepted through the inherited copy).
    #[test]
    fn listeners_cross_over_in_batches_and_stay_the_same_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("handoff.sock");
        let fake = std::sync::Arc::new(Fake::new(
            (0..250)
                .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
                .collect(),
        ));
        let listener = listen(&path).unwrap();
        let server = {
            let fake = fake.clone();
            let path = path.clone();
            std::thread::spawn(move || serve(listener, path, fake.as_ref()))
        };
        let (predecessor, inherited) = request(&path).unwrap().expect("a predecessor");
        assert_eq!(inherited.len(), 250);
        let addr = fake.listeners[249].local_addr().unwrap();
        let taken = inherited.take(7, addr).expect("inherited");
        let _client = std::net::TcpStream::connect(addr).unwrap();
        taken.set_nonblocking(false).unwrap();
        taken.accept().unwrap();
        assert!(inherited.take(8, addr).is_none());
        predecessor.serving().unwrap();
        server.join().unwrap();
        assert_eq!(fake.retired.load(Ordering::SeqCst), 1);
        assert_eq!(fake.resumed.load(Ordering::SeqCst), 0);
        assert_eq!(inherited.release(), 249);
    }

    /// A successor that leaves before serving leaves the predecessor in charge,
    /// ready for the next one.
    #[test]
    fn a_successor_that_goes_away_leaves_the_predecessor_serving() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("handoff.sock");
        let fake = std::sync::Arc::new(Fake::new(vec![
            std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
        ]));
        let listener = listen(&path).unwrap();
        let server = {
            let fake = fake.clone();
            let path = path.clone();
            std::thread::spawn(move || serve(listener, path, fake.as_ref()))
        };
        let (first, _) = request(&path).unwrap().unwrap();
        drop(first);
        let (second, inherited) = request(&path).unwrap().unwrap();
        assert_eq!(inherited.len(), 1);
        second.serving().unwrap();
        server.join().unwrap();
        assert_eq!(fake.resumed.load(Ordering::SeqCst), 1);
        assert_eq!(fake.retired.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn nobody_listening_is_no_predecessor() {
        let dir = tempfile::tempdir().unwrap();
        assert!(request(&dir.path().join("absent.sock")).unwrap().is_none());
        // A stale file from a dead agent: connect is refused.
        let stale = dir.path().join("stale.sock");
        drop(listen(&stale).unwrap());
        assert!(request(&stale).unwrap().is_none());
    }
}
