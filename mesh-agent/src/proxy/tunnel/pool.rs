//! Client side of the tunnel: pooled mTLS HTTP/2 connections, many CONNECT
//! streams each.
//!
//! Connections are keyed by (source workload, source identity, destination
//! identity, peer address): a connection proves one identity pair, and leaves
//! from its source pod's address. The pool is bounded per key. Once every
//! connection of a key carries its share of streams and the key has its maximum of
//! connections, new streams go to the least loaded one, where HTTP/2 flow control
//! queues them. Idle connections are closed.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use tokio::net::TcpStream;

use super::TunnelError;
use super::read_ahead::ReadAhead;
use crate::identity::Identity;

/// Bounds of the pool.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Most connections per key.
    pub max_connections_per_key: usize,
    /// Streams a connection takes before another connection is opened.
    pub streams_per_connection: usize,
    /// A connection with no stream for this long is closed.
    pub idle_timeout: Duration,
    /// Bound on TCP connect plus TLS handshake plus HTTP/2 setup.
    pub connect_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            // 12,800 concurrent streams between one pair of identities and
            // addresses before streams queue: long-lived connections by the
            // thousand (a connection pool's, a message bus's) must not wait.
            max_connections_per_key: 128,
            streams_per_connection: 100,
            idle_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// What a pooled connection proves and where it goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// `namespace/name` of the source workload (its pod is where the connection leaves from).
    pub source_workload: String,
    /// The identity presented.
    pub source: Identity,
    /// The identity required of the server.
    pub destination: Identity,
    /// The peer's tunnel address (`pod ip:15008`).
    pub address: SocketAddr,
}

struct Pooled {
    id: u64,
    sender: SendRequest<Empty<Bytes>>,
    streams: AtomicUsize,
    last_used: Mutex<Instant>,
}

enum Pick {
    Use(Arc<Pooled>),
    Dial,
    /// Wait for a connection being dialled, with a slot on it reserved.
    WaitReserved,
    Wait,
}

#[derive(Default)]
struct Entry {
    conns: Vec<Arc<Pooled>>,
    dialing: usize,
    /// Streams waiting for the connections being dialled: a burst dials only
    /// as many connections as it fills.
    reserved: usize,
}

/// The node's tunnel connections.
pub struct TunnelPool {
    settings: PoolSettings,
    entries: Mutex<HashMap<PoolKey, Entry>>,
    next_id: AtomicUsize,
    /// Wakes streams waiting for a connection of a key at its bound.
    dialled: tokio::sync::Notify,
}

/// A stream's claim on one of its key's counters (`dialing` or `reserved`),
/// given back on drop. A stream is cancelled mid-dial or mid-wait whenever its
/// client goes away first; a count kept after that would make the key wait for
/// ever for a dial that no longer exists, and every later stream of the key
/// above its first connection's share would hang.
struct Held<'a> {
    pool: &'a TunnelPool,
    key: &'a PoolKey,
    counter: fn(&mut Entry) -> &mut usize,
    /// Whether giving it back wakes the waiters: a dial ending changes what
    /// they may pick; a waiter leaving does not.
    wakes: bool,
}

impl<'a> Held<'a> {
    /// The dial slot `pick` took.
    fn dialing(pool: &'a TunnelPool, key: &'a PoolKey) -> Self {
        Held {
            pool,
            key,
            counter: |e| &mut e.dialing,
            wakes: true,
        }
    }

    /// The slot on a connection being dialled that `pick` reserved.
    fn reserved(pool: &'a TunnelPool, key: &'a PoolKey) -> Self {
        Held {
            pool,
            key,
            counter: |e| &mut e.reserved,
            wakes: false,
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Some(entry) = self
            .pool
            .entries
            .lock()
            .expect("pool lock")
            .get_mut(self.key)
        {
            let count = (self.counter)(entry);
            *count = count.saturating_sub(1);
        }
        if self.wakes {
            self.pool.dialled.notify_waiters();
        }
    }
}

/// One open CONNECT stream's claim on its connection; released on drop.
pub struct StreamLease {
    conn: Arc<Pooled>,
}

impl Drop for StreamLease {
    fn drop(&mut self) {
        self.conn.streams.fetch_sub(1, Ordering::Relaxed);
        *self.conn.last_used.lock().expect("pool lock") = Instant::now();
    }
}

/// One key of the pool in `/config_dump`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolView {
    /// Source workload.
    pub source_workload: String,
    /// Identity presented.
    pub source: String,
    /// Identity required of the peer.
    pub destination: String,
    /// Peer tunnel address.
    pub address: String,
    /// Open connections.
    pub connections: usize,
    /// Open streams over all of them.
    pub streams: usize,
}

impl TunnelPool {
    /// An empty pool; call [`TunnelPool::reap_idle`] periodically.
    pub fn new(settings: PoolSettings) -> Self {
        TunnelPool {
            settings,
            entries: Mutex::default(),
            next_id: AtomicUsize::new(1),
            dialled: tokio::sync::Notify::new(),
        }
    }

    /// Opens a CONNECT stream to `authority` over a pooled connection for `key`,
    /// dialling a new connection with `dial` and `tls` when the pool has room.
    /// A stream the peer never processed (its connection is going away: a GOAWAY
    /// from an agent handing over to a successor) is retried on another
    /// connection, so a peer's upgrade fails no new stream.
    pub async fn connect<D, F>(
        &self,
        key: &PoolKey,
        authority: SocketAddr,
        parsed_by: Option<&hyper::header::HeaderValue>,
        dial: D,
        tls: impl Fn() -> Result<rustls::ClientConfig, TunnelError>,
    ) -> Result<(TokioIo<hyper::upgrade::Upgraded>, StreamLease), TunnelError>
    where
        D: Fn() -> F,
        F: Future<Output = std::io::Result<TcpStream>>,
    {
        // Each failed attempt takes one connection going away out of the pool,
        // so after at most all of a key's connections a fresh one is dialled.
        let attempts = self.settings.max_connections_per_key + 2;
        let mut attempt = 1;
        loop {
            let conn = self.acquire(key, &dial, &tls).await?;
            let lease = StreamLease { conn: conn.clone() };
            let mut request = hyper::Request::builder()
                .method(hyper::Method::CONNECT)
                .uri(authority.to_string())
                .body(Empty::<Bytes>::new())
                .expect("CONNECT request from a socket address");
            if let Some(value) = parsed_by {
                request
                    .headers_mut()
                    .insert(super::PARSED_BY_HEADER, value.clone());
            }
            let mut sender = conn.sender.clone();
            let response = tokio::time::timeout(
                self.settings.connect_timeout * 2,
                sender.send_request(request),
            )
            .await
            .map_err(|_| TunnelError::Timeout("CONNECT response"))?;
            let response = match response {
                Ok(r) => r,
                // The request never reached the peer's application, so it is
                // safe to send again, elsewhere.
                Err(e) if never_processed(&e) && attempt < attempts => {
                    tracing::debug!(peer = %key.address, id = conn.id, error = %e, "tunnel connection going away; retrying the stream on another");
                    self.forget(key, conn.id);
                    attempt += 1;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if response.status() != hyper::StatusCode::OK {
                return Err(TunnelError::Refused {
                    authority: authority.to_string(),
                    status: response.status(),
                });
            }
            let upgraded = hyper::upgrade::on(response).await?;
            return Ok((TokioIo::new(upgraded), lease));
        }
    }

    /// A connection for one more stream of `key`: pooled, or dialled.
    async fn acquire<D, F>(
        &self,
        key: &PoolKey,
        dial: &D,
        tls: &impl Fn() -> Result<rustls::ClientConfig, TunnelError>,
    ) -> Result<Arc<Pooled>, TunnelError>
    where
        D: Fn() -> F,
        F: Future<Output = std::io::Result<TcpStream>>,
    {
        loop {
            // Registered before the pick, so a dial finishing in between still wakes us.
            let dialled = self.dialled.notified();
            match self.pick(key) {
                Pick::Use(conn) => return Ok(conn),
                Pick::Wait => dialled.await,
                Pick::WaitReserved => {
                    let _reserved = Held::reserved(self, key);
                    dialled.await;
                }
                Pick::Dial => {
                    let dialing = Held::dialing(self, key);
                    let made = tokio::time::timeout(
                        self.settings.connect_timeout,
                        self.dial(key, dial, tls),
                    )
                    .await
                    .unwrap_or(Err(TunnelError::Timeout("tunnel connection setup")));
                    let made = made.inspect(|conn| {
                        conn.streams.fetch_add(1, Ordering::Relaxed);
                        let mut entries = self.entries.lock().expect("pool lock");
                        entries
                            .entry(key.clone())
                            .or_default()
                            .conns
                            .push(conn.clone());
                    });
                    // Gives the dial slot back and wakes the waiters, who find
                    // the new connection already listed.
                    drop(dialing);
                    return made;
                }
            }
        }
    }

    /// Takes a connection out of the pool (its streams carry on; new ones go elsewhere).
    fn forget(&self, key: &PoolKey, id: u64) {
        if let Some(entry) = self.entries.lock().expect("pool lock").get_mut(key) {
            entry.conns.retain(|c| c.id != id);
        }
    }

    /// A live connection with room; else a slot on a connection being dialled;
    /// else a dial (already counted against the key's bound); else, at the
    /// bound, the least loaded connection (or a wait for the first one).
    fn pick(&self, key: &PoolKey) -> Pick {
        let mut entries = self.entries.lock().expect("pool lock");
        let entry = entries.entry(key.clone()).or_default();
        entry.conns.retain(|c| !c.sender.is_closed());
        let least = entry
            .conns
            .iter()
            .min_by_key(|c| c.streams.load(Ordering::Relaxed))
            .cloned();
        let has_room = least.as_ref().is_some_and(|c| {
            c.streams.load(Ordering::Relaxed) < self.settings.streams_per_connection
        });
        let may_dial = entry.conns.len() + entry.dialing < self.settings.max_connections_per_key;
        // Each connection being dialled carries its dialler's stream and has
        // room for this many more.
        let incoming = entry.dialing * (self.settings.streams_per_connection.saturating_sub(1));
        match least {
            Some(c) if has_room => {
                c.streams.fetch_add(1, Ordering::Relaxed);
                Pick::Use(c)
            }
            _ if entry.reserved < incoming => {
                entry.reserved += 1;
                Pick::WaitReserved
            }
            _ if may_dial => {
                entry.dialing += 1;
                Pick::Dial
            }
            // Connections being dialled will have room: wait for one rather than
            // queue on a full one (a long-lived stream queued there waits for ever).
            _ if entry.dialing > 0 => Pick::Wait,
            // At the bound: HTTP/2 flow control queues it on the least loaded.
            Some(c) => {
                c.streams.fetch_add(1, Ordering::Relaxed);
                Pick::Use(c)
            }
            None => Pick::Wait,
        }
    }

    async fn dial<D, F>(
        &self,
        key: &PoolKey,
        dial: &D,
        tls: &impl Fn() -> Result<rustls::ClientConfig, TunnelError>,
    ) -> Result<Arc<Pooled>, TunnelError>
    where
        D: Fn() -> F,
        F: Future<Output = std::io::Result<TcpStream>>,
    {
        let config = Arc::new(tls()?);
        let tcp = dial().await.map_err(|source| TunnelError::Connect {
            addr: key.address,
            source,
        })?;
        let _ = tcp.set_nodelay(true);
        let server_name = rustls::pki_types::ServerName::IpAddress(key.address.ip().into());
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(server_name, ReadAhead::new(tcp))
            .await
            .map_err(|source| TunnelError::Tls {
                addr: key.address,
                source,
            })?;
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(super::STREAM_WINDOW)
            .initial_connection_window_size(super::CONNECTION_WINDOW)
            .max_frame_size(super::MAX_FRAME)
            .handshake(TokioIo::new(tls))
            .await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) as u64;
        let peer = key.address;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "tunnel connection ended with error");
            }
        });
        tracing::debug!(%peer, id, source = %key.source, destination = %key.destination, "tunnel connection opened");
        Ok(Arc::new(Pooled {
            id,
            sender,
            streams: AtomicUsize::new(0),
            last_used: Mutex::new(Instant::now()),
        }))
    }

    /// Closes connections idle longer than the idle timeout, forgets closed ones, and
    /// returns how many stay open.
    pub fn reap_idle(&self) -> usize {
        let mut entries = self.entries.lock().expect("pool lock");
        for entry in entries.values_mut() {
            entry.conns.retain(|c| {
                let idle = c.streams.load(Ordering::Relaxed) == 0
                    && c.last_used.lock().expect("pool lock").elapsed()
                        >= self.settings.idle_timeout;
                if idle {
                    tracing::debug!(id = c.id, "closing idle tunnel connection");
                }
                !idle && !c.sender.is_closed()
            });
        }
        entries.retain(|_, e| !e.conns.is_empty() || e.dialing > 0);
        entries.values().map(|e| e.conns.len()).sum()
    }

    /// `/config_dump` view.
    pub fn views(&self) -> Vec<PoolView> {
        let entries = self.entries.lock().expect("pool lock");
        let mut views: Vec<PoolView> = entries
            .iter()
            .filter(|(_, e)| !e.conns.is_empty())
            .map(|(k, e)| PoolView {
                source_workload: k.source_workload.clone(),
                source: k.source.to_string(),
                destination: k.destination.to_string(),
                address: k.address.to_string(),
                connections: e.conns.iter().filter(|c| !c.sender.is_closed()).count(),
                streams: e
                    .conns
                    .iter()
                    .map(|c| c.streams.load(Ordering::Relaxed))
                    .sum(),
            })
            .collect();
        views.sort_by(|a, b| {
            (&a.source_workload, &a.address).cmp(&(&b.source_workload, &b.address))
        });
        views
    }
}

/// Whether a failed CONNECT was never processed by the peer: canceled before
/// it was sent, above the last stream a peer's GOAWAY accepted (it is handing
/// over to a successor, or shutting down), or refused with REFUSED_STREAM.
/// RFC 9113 §8.7 makes such a request safe to send again.
fn never_processed(e: &hyper::Error) -> bool {
    if e.is_canceled() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        if let Some(h2) = cause.downcast_ref::<h2::Error>() {
            return h2.is_remote()
                && (h2.is_go_away() || h2.reason() == Some(h2::Reason::REFUSED_STREAM));
        }
        source = cause.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> PoolKey {
        PoolKey {
            source_workload: "shop/a".into(),
            source: Identity::new("cluster.local", "shop", "a"),
            destination: Identity::new("cluster.local", "backend", "b"),
            address: "127.0.0.1:15008".parse().expect("address"),
        }
    }

    fn counts(pool: &TunnelPool, key: &PoolKey) -> (usize, usize) {
        let entries = pool.entries.lock().expect("pool lock");
        entries.get(key).map_or((0, 0), |e| (e.dialing, e.reserved))
    }

    /// Streams whose clients go away while their connection is being dialled
    /// (or while they wait for it) give their claims back: the next stream
    /// dials instead of waiting for a dial that no longer exists.
    #[tokio::test]
    async fn streams_cancelled_while_dialling_or_waiting_leave_no_claim() {
        let pool = TunnelPool::new(PoolSettings::default());
        let key = key();
        let tls = || {
            Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("TLS 1.3")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth())
        };
        // A dial that never finishes: the peer does not answer.
        let dial = || std::future::pending::<std::io::Result<TcpStream>>();
        let mut waiting = Vec::new();
        for _ in 0..3 {
            waiting.push(pool.acquire(&key, &dial, &tls));
        }
        let all = futures::future::join_all(waiting);
        // The clients give up while the first dials and the others wait on it.
        assert!(
            tokio::time::timeout(Duration::from_millis(200), all)
                .await
                .is_err()
        );
        assert_eq!(counts(&pool, &key), (0, 0));
        assert!(matches!(pool.pick(&key), Pick::Dial));
    }
}
