//! The kernel side of the same-node fast path: joining the agent's two sockets
//! of an admitted connection so the `splice_joined` verdict (`sk_skb`) moves
//! their bytes inside the kernel, and reading how many it moved.
//!
//! The agent socket facing the client and the one facing the server are each
//! put in three maps, in an order that keeps every byte in sequence:
//! 1. `SPLICE_TARGETS`: both become valid redirect targets. This map has no
//!    program, so nothing they receive changes path yet.
//! 2. `JOINED_PEERS`: each names the other as where its bytes go.
//! 3. `SPLICED` (the verdict's map), server side first: from then on the
//!    verdict forwards whatever each receives, and bytes that arrived before
//!    (say, a request sent at once after `connect`) are still first in the
//!    socket's queue, so they are forwarded first when the socket is kicked
//!    ([`kick`]). A socket the kernel refuses here (one that has already
//!    half-closed) leaves its direction to the agent's relay; the other
//!    direction is still spliced.
//!
//! Closing a socket removes it from the socket maps; [`Joined`] removes the
//! `JOINED_PEERS` entries when dropped.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::{Arc, Mutex};

use aya::Ebpf;
use aya::maps::{HashMap, MapData, MapError, SockHash};
use mesh_common::JoinedPeer;

/// `SO_COOKIE` (asm-generic; not exported by libc): the socket's 64-bit kernel id.
const SO_COOKIE: libc::c_int = 57;

/// Why two sockets could not be joined; the connection stays in user space.
#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    /// A socket option call failed.
    #[error("reading a socket's cookie: {0}")]
    Cookie(io::Error),
    /// The kernel refused a map update (full map, or a socket it cannot take).
    #[error("adding to {map}: {}", std::error::Error::source(source).map_or_else(|| source.to_string(), |e| e.to_string()))]
    Map {
        /// The map's name.
        map: &'static str,
        /// What the kernel said.
        source: MapError,
    },
    /// Handed-over sockets whose peer entries do not name each other.
    #[error("sockets {client} and {server} are not a joined pair")]
    NotJoined {
        /// Cookie of the socket said to face the client.
        client: u64,
        /// Cookie of the socket said to face the server.
        server: u64,
    },
}

impl SpliceError {
    /// Whether the kernel refused a socket for its state: one end had already
    /// closed or half-closed (a sockmap takes only established sockets).
    pub fn client_already_closing(&self) -> bool {
        matches!(
            self,
            SpliceError::Map {
                source: MapError::SyscallError(e),
                ..
            } if e.io_error.raw_os_error() == Some(libc::EOPNOTSUPP)
        )
    }
}

/// The three maps of the fast path, from the loaded object.
pub struct Splice {
    targets: Mutex<SockHash<MapData, u64>>,
    spliced: Mutex<SockHash<MapData, u64>>,
    peers: Mutex<HashMap<MapData, u64, JoinedPeer>>,
}

/// Two sockets joined in the kernel; dropping it ends the join (see the module doc).
pub struct Joined {
    splice: Arc<Splice>,
    /// The kernel carries client-to-server bytes (else the agent relays them).
    pub to_server_spliced: bool,
    /// The kernel carries server-to-client bytes (else the agent relays them).
    pub to_client_spliced: bool,
    /// Why a direction is not carried by the kernel.
    pub refusals: Vec<SpliceError>,
    /// Cookie of the socket facing the client.
    pub client: u64,
    /// Cookie of the socket facing the server.
    pub server: u64,
    /// Whether dropping it removes the peer entries: not once handed to a
    /// successor agent, which then owns them.
    owns_entries: bool,
}

/// Bytes the kernel moved for one joined connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SplicedBytes {
    /// Client to server.
    pub to_server: u64,
    /// Server to client.
    pub to_client: u64,
}

/// How full the fast path's maps are, for `/config_dump` and the churn tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SpliceOccupancy {
    /// Entries in `SPLICE_TARGETS`.
    pub targets: u64,
    /// Entries in `SPLICED`.
    pub spliced: u64,
    /// Entries in `JOINED_PEERS`.
    pub peers: u64,
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, SpliceError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(SpliceError::Map {
        map: name,
        source: MapError::InvalidName {
            name: name.to_owned(),
        },
    })?;
    T::try_from(map).map_err(|source| SpliceError::Map { map: name, source })
}

/// The socket's cookie, the key the kernel program sees for it.
pub fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid fd and an out-buffer of the advertised size.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes the kernel look at a joined socket's receive queue now: setting
/// `SO_RCVLOWAT` runs the socket's data-ready hook when bytes wait, which is the
/// verdict once joined. Bytes that arrived just before the join are forwarded
/// at once instead of waiting for more to arrive.
pub fn kick(fd: BorrowedFd<'_>) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: a valid fd and an int option value.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Splice {
    /// Takes the fast path's maps out of the loaded object.
    pub fn from_object(ebpf: &mut Ebpf) -> Result<Self, SpliceError> {
        Ok(Splice {
            targets: Mutex::new(take(ebpf, "SPLICE_TARGETS")?),
            spliced: Mutex::new(take(ebpf, "SPLICED")?),
            peers: Mutex::new(take(ebpf, "JOINED_PEERS")?),
        })
    }

    /// The map the verdict program attaches to.
    pub fn with_spliced_map<R>(&self, f: impl FnOnce(&SockHash<MapData, u64>) -> R) -> R {
        f(&self.spliced.lock().expect("splice map lock"))
    }

    /// Joins `client` and `server` (see the module doc for the order). On error
    /// nothing the kernel could act on is left behind and no byte has moved:
    /// the caller relays in user space instead. A direction the kernel would not
    /// take is reported in the result, for the agent to relay.
    pub fn join(
        self: &Arc<Self>,
        client: impl AsFd,
        server: impl AsFd,
    ) -> Result<Joined, SpliceError> {
        let (client, server) = (client.as_fd(), server.as_fd());
        let c = socket_cookie(client).map_err(SpliceError::Cookie)?;
        let s = socket_cookie(server).map_err(SpliceError::Cookie)?;
        // From here, dropping `joined` removes the peer entries.
        let joined = Joined {
            splice: self.clone(),
            client: c,
            server: s,
            to_server_spliced: false,
            to_client_spliced: false,
            refusals: Vec::new(),
            owns_entries: true,
        };
        {
            let mut targets = self.targets.lock().expect("splice map lock");
            let added = targets
                .insert(c, client.as_raw_fd(), 0)
                .and_then(|()| targets.insert(s, server.as_raw_fd(), 0));
            if let Err(source) = added {
                let _ = targets.remove(&c);
                return Err(SpliceError::Map {
                    map: "SPLICE_TARGETS",
                    source,
                });
            }
        }
        {
            let mut peers = self.peers.lock().expect("splice map lock");
            let entry = |peer_cookie| JoinedPeer {
                peer_cookie,
                bytes: 0,
            };
            peers
                .insert(c, entry(s), 0)
                .and_then(|()| peers.insert(s, entry(c), 0))
                .map_err(|source| {
                    self.leave_targets(c, s);
                    SpliceError::Map {
                        map: "JOINED_PEERS",
                        source,
                    }
                })?;
        }
        let mut spliced = self.spliced.lock().expect("splice map lock");
        // Each direction is carried by the kernel once its receiving socket is
        // in SPLICED, and by the agent otherwise; the two never mix within a
        // direction, so a refusal here (a socket that already half-closed is
        // past ESTABLISHED, which a sockmap refuses) leaves that direction to
        // the agent and keeps every byte in order. Server side first: its
        // bytes can go to the client socket at once.
        let server_result = spliced.insert(s, server.as_raw_fd(), 0);
        let client_result = spliced.insert(c, client.as_raw_fd(), 0);
        drop(spliced);
        let mut joined = joined;
        joined.to_client_spliced = server_result.is_ok();
        joined.to_server_spliced = client_result.is_ok();
        joined.refusals = [server_result.err(), client_result.err()]
            .into_iter()
            .flatten()
            .map(|source| SpliceError::Map {
                map: "SPLICED",
                source,
            })
            .collect();
        Ok(joined)
    }

    /// Takes over a join another agent made (its sockets were handed over):
    /// the peer entries must name each other, else the two sockets are not the
    /// joined pair the record claims.
    pub fn adopt(self: &Arc<Self>, client: u64, server: u64) -> Result<Joined, SpliceError> {
        let peers = self.peers.lock().expect("splice map lock");
        let peer_of = |cookie: u64| peers.get(&cookie, 0).ok().map(|p| p.peer_cookie);
        if peer_of(client) != Some(server) || peer_of(server) != Some(client) {
            return Err(SpliceError::NotJoined { client, server });
        }
        Ok(Joined {
            splice: self.clone(),
            client,
            server,
            to_server_spliced: true,
            to_client_spliced: true,
            refusals: Vec::new(),
            owns_entries: true,
        })
    }

    fn leave_targets(&self, c: u64, s: u64) {
        let mut targets = self.targets.lock().expect("splice map lock");
        let _ = targets.remove(&c);
        let _ = targets.remove(&s);
    }

    fn bytes(&self, cookie: u64) -> u64 {
        self.peers
            .lock()
            .expect("splice map lock")
            .get(&cookie, 0)
            .map(|p| p.bytes)
            .unwrap_or(0)
    }

    /// Entries in each map now.
    pub fn occupancy(&self) -> SpliceOccupancy {
        SpliceOccupancy {
            targets: self.targets.lock().expect("splice map lock").keys().count() as u64,
            spliced: self.spliced.lock().expect("splice map lock").keys().count() as u64,
            peers: self.peers.lock().expect("splice map lock").keys().count() as u64,
        }
    }

    /// Removes `JOINED_PEERS` entries whose socket is no longer joined (left by
    /// an agent that died holding them); returns how many.
    pub fn sweep(&self) -> usize {
        let live: std::collections::HashSet<u64> = self
            .spliced
            .lock()
            .expect("splice map lock")
            .keys()
            .filter_map(Result::ok)
            .collect();
        let mut peers = self.peers.lock().expect("splice map lock");
        let stale: Vec<u64> = peers
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !live.contains(k))
            .collect();
        for k in &stale {
            let _ = peers.remove(k);
        }
        stale.len()
    }
}

impl Joined {
    /// What the kernel has moved so far.
    pub fn bytes(&self) -> SplicedBytes {
        SplicedBytes {
            to_server: self.splice.bytes(self.client),
            to_client: self.splice.bytes(self.server),
        }
    }
}

impl Joined {
    /// Leaves the peer entries in place on drop: a successor agent owns them now.
    pub fn hand_over(mut self) {
        self.owns_entries = false;
    }
}

impl Drop for Joined {
    fn drop(&mut self) {
        if !self.owns_entries {
            return;
        }
        let mut peers = self.splice.peers.lock().expect("splice map lock");
        let _ = peers.remove(&self.client);
        let _ = peers.remove(&self.server);
    }
}
