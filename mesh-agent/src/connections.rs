//! Live connection tracking. Every proxied connection owns a [`ConnectionGuard`]
//! that counts it open, exposes it in `/connections` while it lives, and on drop
//! records the close, its byte counts and one access-log line, whatever path
//! the connection took to end.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

use crate::metrics::{DestinationServiceLabels, Metrics, TcpLabels};
use crate::reason::Reason;
use crate::state::policy::{self, Decision, Policies};
use crate::state::service::Service;
use crate::state::workload::WorkloadMeta;
use tokio_util::sync::CancellationToken;

/// Who is on each end of a connection, as far as this agent can prove it.
#[derive(Debug, Clone)]
pub struct Peers {
    /// `source` when this agent serves the client, `destination` when it serves the server.
    pub reporter: &'static str,
    /// The client workload, when known.
    pub source: Option<Arc<WorkloadMeta>>,
    /// The client's SPIFFE ID: from its certificate under mTLS, else from config.
    pub source_principal: Option<String>,
    /// The server workload, when known.
    pub destination: Option<Arc<WorkloadMeta>>,
    /// Whether the hop between the agents is mutual TLS.
    pub mutual_tls: bool,
    /// The Service the client addressed, when it connected to a VIP.
    pub service: Option<Arc<Service>>,
}

impl Peers {
    /// A connection this agent carries for its local client `source`.
    pub fn outbound(source: Arc<WorkloadMeta>, destination: Option<Arc<WorkloadMeta>>) -> Self {
        Peers {
            reporter: "source",
            source_principal: Some(source.principal()),
            source: Some(source),
            destination,
            mutual_tls: false,
            service: None,
        }
    }

    /// The client's SPIFFE ID, or `unknown` (as Istio labels it).
    pub fn source_principal(&self) -> String {
        self.source_principal
            .clone()
            .unwrap_or_else(|| "unknown".to_owned())
    }
}

/// One live connection as shown by `/connections`.
pub struct ConnectionInfo {
    id: u64,
    peers: Peers,
    /// The client's address as the agent's listener sees it (loopback in the pod).
    pub client: SocketAddr,
    /// Where the application wanted to go, from the kernel.
    pub original_destination: SocketAddr,
    started: Instant,
    started_wall: SystemTime,
    /// Client to server bytes so far.
    pub bytes_received: Arc<AtomicU64>,
    /// Server to client bytes so far.
    pub bytes_sent: Arc<AtomicU64>,
    /// For inbound connections: what policy was checked, and how to close it if a
    /// later policy no longer allows it.
    authz: Mutex<Option<(policy::Connection, CancellationToken)>>,
    /// Set when a policy change closed the connection.
    revoked: std::sync::atomic::AtomicBool,
    /// Who moves the bytes, as a [`CarriedBy`] discriminant.
    carried_by: std::sync::atomic::AtomicU8,
    /// Whether the agent serves its requests (and so decides each under the
    /// policies in force); otherwise its bytes are carried unread.
    serves_requests: std::sync::atomic::AtomicBool,
}

/// Who moves a connection's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CarriedBy {
    /// The agent relays them (the default).
    Agent = 0,
    /// The kernel, both directions (same-node fast path).
    Kernel = 1,
    /// The kernel one way, the agent the other (one end half-closed before the join).
    KernelAndAgent = 2,
}

impl CarriedBy {
    fn name(v: u8) -> &'static str {
        match v {
            1 => "kernel",
            2 => "kernel+agent",
            _ => "agent",
        }
    }
}

/// Serializable snapshot of a [`ConnectionInfo`].
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionView {
    /// Agent-local connection id.
    pub id: u64,
    /// `source` (this agent serves the client) or `destination`.
    pub reporter: String,
    /// `mutual_tls` or `none`.
    pub security: String,
    /// `namespace/name` of the client workload, or `unknown`.
    pub source_workload: String,
    /// Client's SPIFFE identity.
    pub source_principal: String,
    /// The client's loopback address seen by the agent.
    pub client: String,
    /// The address the application connected to.
    pub original_destination: String,
    /// `namespace/name` of the destination workload, if known.
    pub destination_workload: Option<String>,
    /// Client to server bytes.
    pub bytes_received: u64,
    /// Server to client bytes.
    pub bytes_sent: u64,
    /// `kernel` when the sockets are joined in the kernel (bytes are counted
    /// when it closes), `agent` when the agent relays them, `kernel+agent`
    /// when each carries one direction.
    #[serde(default)]
    pub path: String,
    /// Seconds since accept.
    pub age_seconds: f64,
    /// Accept time, seconds since the Unix epoch.
    pub started_unix: f64,
    /// `-` while fine; otherwise why it failed (Istio's `response_flags`).
    #[serde(default)]
    pub response_flags: String,
    /// Why it failed, as `debug explain` says it, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
}

/// Failed connections kept for `/connections?failed`, most recent last.
const RECENT_FAILURES: usize = 128;

/// The agent's live connections, keyed by id.
#[derive(Default)]
pub struct ConnectionTable {
    next_id: AtomicU64,
    live: Mutex<BTreeMap<u64, Arc<ConnectionInfo>>>,
    /// The last [`RECENT_FAILURES`] connections that ended with a failure,
    /// so that one that failed at once can still be looked at.
    failed: Mutex<std::collections::VecDeque<ConnectionView>>,
}

impl ConnectionTable {
    /// Snapshot for `/connections`.
    pub fn snapshot(&self) -> Vec<ConnectionView> {
        let live = self.live.lock().expect("connection table lock");
        live.values().map(|c| c.view()).collect()
    }

    /// The most recent failed connections, oldest first, for `/connections?failed`.
    pub fn failed(&self) -> Vec<ConnectionView> {
        let failed = self.failed.lock().expect("failed connections lock");
        failed.iter().cloned().collect()
    }

    /// Number of live connections.
    pub fn len(&self) -> usize {
        self.live.lock().expect("connection table lock").len()
    }

    /// Re-checks every live inbound connection against `policies` and closes those no
    /// longer allowed. Returns how many were closed.
    pub fn revoke_disallowed(&self, policies: &Policies) -> usize {
        let live: Vec<Arc<ConnectionInfo>> = self
            .live
            .lock()
            .expect("connection table lock")
            .values()
            .cloned()
            .collect();
        let mut closed = 0;
        for info in live {
            let Some(destination) = info.peers.destination.as_deref() else {
                continue;
            };
            let authz = info.authz.lock().expect("authz lock");
            let Some((conn, cancel)) = authz.as_ref() else {
                continue;
            };
            // A connection carried unread cannot meet rules about HTTP; one
            // whose requests are served is decided again at each request.
            let decision = if info.serves_requests.load(Ordering::Relaxed) {
                policies.decide(destination, conn)
            } else {
                policies.decide_opaque(destination, conn)
            };
            if let Decision::Deny(why) = decision {
                tracing::info!(
                    id = info.id,
                    source = ?conn.source.as_ref().map(|s| s.to_string()),
                    destination = %info.original_destination,
                    reason = %why,
                    "closing a live connection the new policy no longer allows"
                );
                info.revoked.store(true, Ordering::Relaxed);
                cancel.cancel();
                closed += 1;
            }
        }
        closed
    }

    /// Whether no connection is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl ConnectionInfo {
    fn view(&self) -> ConnectionView {
        ConnectionView {
            id: self.id,
            reporter: self.peers.reporter.to_owned(),
            security: security(self.peers.mutual_tls).to_owned(),
            source_workload: self
                .peers
                .source
                .as_ref()
                .map(|w| w.key())
                .unwrap_or_else(|| "unknown".to_owned()),
            source_principal: self.peers.source_principal(),
            client: self.client.to_string(),
            original_destination: self.original_destination.to_string(),
            destination_workload: self.peers.destination.as_ref().map(|w| w.key()),
            bytes_received: self.bytes_received.load(Ordering::Relaxed),
            bytes_sent: self.bytes_sent.load(Ordering::Relaxed),
            path: CarriedBy::name(self.carried_by.load(Ordering::Relaxed)).to_owned(),
            age_seconds: self.started.elapsed().as_secs_f64(),
            started_unix: self
                .started_wall
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
            response_flags: "-".to_owned(),
            reason: None,
        }
    }
}

/// Byte counters for one direction: the live per-connection figure and the metric.
/// Owned, so a connection's I/O object can carry it into a spawned task.
pub struct ByteCounter {
    live: Arc<AtomicU64>,
    metric: Counter,
}

impl ByteCounter {
    /// Counts into `live` and `metric`.
    pub(crate) fn new(live: Arc<AtomicU64>, metric: Counter) -> Self {
        ByteCounter { live, metric }
    }

    /// Records `n` bytes carried.
    pub fn add(&self, n: usize) {
        self.live.fetch_add(n as u64, Ordering::Relaxed);
        self.metric.inc_by(n as u64);
    }
}

/// How a connection shows in Istio's TCP metrics. A connection whose requests
/// the agent serves is reported as requests only: counting it as TCP too would
/// count its bytes twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reporting {
    /// As a TCP connection (L4).
    Tcp,
    /// Not as TCP: its requests are reported instead.
    Requests,
    /// Not known yet (its protocol is being detected): [`ConnectionGuard::report`]
    /// decides; one that ends undecided was a TCP connection.
    Undecided,
}

/// Owned by a connection's task for its whole life; see the module doc.
pub struct ConnectionGuard {
    info: Arc<ConnectionInfo>,
    table: Arc<ConnectionTable>,
    metrics: Arc<Metrics>,
    labels: TcpLabels,
    reporting: Reporting,
    sent: Counter,
    received: Counter,
    outcome: &'static str,
    reason: Option<Reason>,
}

impl ConnectionGuard {
    /// Registers a new TCP connection and counts it opened.
    pub fn open(
        table: &Arc<ConnectionTable>,
        metrics: &Arc<Metrics>,
        peers: Peers,
        client: SocketAddr,
        original_destination: SocketAddr,
    ) -> Self {
        Self::open_reporting(
            table,
            metrics,
            peers,
            client,
            original_destination,
            Reporting::Tcp,
        )
    }

    /// Registers a new connection, reported in the TCP metrics as `reporting` says.
    pub fn open_reporting(
        table: &Arc<ConnectionTable>,
        metrics: &Arc<Metrics>,
        peers: Peers,
        client: SocketAddr,
        original_destination: SocketAddr,
        reporting: Reporting,
    ) -> Self {
        let labels = tcp_labels(metrics, &peers, original_destination);
        let info = Arc::new(ConnectionInfo {
            id: table.next_id.fetch_add(1, Ordering::Relaxed),
            peers,
            client,
            original_destination,
            started: Instant::now(),
            started_wall: SystemTime::now(),
            bytes_received: Arc::default(),
            bytes_sent: Arc::default(),
            authz: Mutex::new(None),
            revoked: std::sync::atomic::AtomicBool::new(false),
            carried_by: std::sync::atomic::AtomicU8::new(CarriedBy::Agent as u8),
            serves_requests: std::sync::atomic::AtomicBool::new(false),
        });
        table
            .live
            .lock()
            .expect("connection table lock")
            .insert(info.id, info.clone());
        metrics.open_connections.inc();
        let mut guard = ConnectionGuard {
            // Counters of no series until the connection is reported as TCP.
            sent: Counter::default(),
            received: Counter::default(),
            info,
            table: table.clone(),
            metrics: metrics.clone(),
            labels,
            reporting: Reporting::Undecided,
            outcome: "-",
            reason: None,
        };
        guard.report(reporting);
        guard
    }

    /// Decides how an undecided connection is reported; a decided one keeps its way.
    pub fn report(&mut self, reporting: Reporting) {
        if self.reporting != Reporting::Undecided {
            return;
        }
        self.reporting = reporting;
        if reporting == Reporting::Requests {
            self.info.serves_requests.store(true, Ordering::Relaxed);
        }
        if reporting == Reporting::Tcp {
            let m = &self.metrics;
            m.tcp_opened.get_or_create(&self.labels).inc();
            self.sent = m.tcp_sent_bytes.get_or_create_owned(&self.labels);
            self.received = m.tcp_received_bytes.get_or_create_owned(&self.labels);
        }
    }

    /// Records the policy attributes of an inbound connection; `cancel` fires if a
    /// later policy denies it.
    pub fn authorized(&self, conn: policy::Connection, cancel: CancellationToken) {
        *self.info.authz.lock().expect("authz lock") = Some((conn, cancel));
    }

    /// Records who moves the bytes (shown in `/connections` and the access log).
    pub fn carried_by(&self, by: CarriedBy) {
        self.info.carried_by.store(by as u8, Ordering::Relaxed);
    }

    /// Marks why the connection failed (an Istio `response_flags` value).
    pub fn fail(&mut self, response_flags: &'static str) {
        self.outcome = response_flags;
        self.reason = Reason::from_response_flags(response_flags);
    }

    /// Marks the connection denied by policy, with the reason `denial` gives.
    pub fn deny(&mut self, denial: &policy::Denial) {
        self.outcome = "DENY";
        self.reason = Some(Reason::of_denial(denial));
    }

    /// Counter for client-to-server bytes.
    pub fn received(&self) -> ByteCounter {
        ByteCounter::new(self.info.bytes_received.clone(), self.received.clone())
    }

    /// Counter for server-to-client bytes.
    pub fn sent(&self) -> ByteCounter {
        ByteCounter::new(self.info.bytes_sent.clone(), self.sent.clone())
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.table
            .live
            .lock()
            .expect("connection table lock")
            .remove(&self.info.id);
        self.metrics.open_connections.dec();
        if self.info.revoked.load(Ordering::Relaxed) {
            self.outcome = "DENY";
            self.reason = None;
        }
        self.report(Reporting::Tcp);
        if self.reporting == Reporting::Tcp {
            let closed = TcpLabels {
                response_flags: self.outcome,
                ..self.labels.clone()
            };
            self.metrics.tcp_closed.get_or_create(&closed).inc();
        }
        let mut view = self.info.view();
        if self.outcome != "-" {
            view.response_flags = self.outcome.to_owned();
            view.reason = self.reason;
            let mut failed = self.table.failed.lock().expect("failed connections lock");
            if failed.len() == RECENT_FAILURES {
                failed.pop_front();
            }
            failed.push_back(view.clone());
        }
        tracing::info!(
            target: "access",
            reporter = view.reporter,
            security = view.security,
            source_workload = %view.source_workload,
            source_principal = %view.source_principal,
            client = %view.client,
            original_destination = %view.original_destination,
            destination_workload = view.destination_workload.as_deref().unwrap_or("-"),
            bytes_sent = view.bytes_sent,
            bytes_received = view.bytes_received,
            path = view.path,
            duration_ms = (view.age_seconds * 1000.0) as u64,
            response_flags = self.outcome,
            reason = ?self.reason,
            "connection complete"
        );
    }
}

fn security(mutual_tls: bool) -> &'static str {
    if mutual_tls { "mutual_tls" } else { "none" }
}

/// Istio's label set for a connection.
fn tcp_labels(metrics: &Metrics, peers: &Peers, dst: SocketAddr) -> TcpLabels {
    TcpLabels {
        reporter: peers.reporter,
        source: metrics.source_labels(peers.source.as_deref(), peers.source_principal()),
        destination: metrics.destination_labels(peers.destination.as_deref()),
        service: match &peers.service {
            Some(service) => DestinationServiceLabels::of(service),
            None => DestinationServiceLabels::address(dst),
        },
        request_protocol: "tcp",
        response_flags: "-",
        connection_security_policy: security(peers.mutual_tls),
    }
}
