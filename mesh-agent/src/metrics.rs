//! Prometheus metrics. Connection metrics use Istio's standard names and labels so
//! existing Kiali and Grafana dashboards work unchanged; agent health metrics are
//! prefixed `nodemesh_`.

use std::net::SocketAddr;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::node::capture::{Capture, MapOccupancy};
use crate::state::service::Service;
use crate::state::workload::WorkloadMeta;

/// The client half of Istio's label set, one definition so TCP and HTTP series
/// describe a client the same way.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// Client workload name.
    pub source_workload: String,
    /// Client workload namespace.
    pub source_workload_namespace: String,
    /// Client SPIFFE identity.
    pub source_principal: String,
    /// Client `app` label.
    pub source_app: String,
    /// Client `version` label.
    pub source_version: String,
    /// Client canonical service (Istio's canonical-name rules).
    pub source_canonical_service: String,
    /// Client canonical revision (Istio's canonical-revision rules).
    pub source_canonical_revision: String,
    /// Client cluster (`--cluster-id`), `unknown` for a client the agent does not know.
    pub source_cluster: String,
}

impl SourceLabels {
    /// Labels for a client the agent may not know (`unknown` fills the gaps, as in
    /// Istio); a known client is in `cluster`.
    pub fn of(workload: Option<&WorkloadMeta>, principal: String, cluster: &str) -> Self {
        let [name, namespace, app, version, service, revision] = workload_labels(workload);
        SourceLabels {
            source_workload: name,
            source_workload_namespace: namespace,
            source_principal: principal,
            source_app: app,
            source_version: version,
            source_canonical_service: service,
            source_canonical_revision: revision,
            source_cluster: cluster_of(workload, cluster),
        }
    }
}

/// The server half of Istio's label set, one definition so TCP and HTTP series
/// describe a server the same way.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestinationLabels {
    /// Server workload name.
    pub destination_workload: String,
    /// Server workload namespace.
    pub destination_workload_namespace: String,
    /// Server SPIFFE identity.
    pub destination_principal: String,
    /// Server `app` label.
    pub destination_app: String,
    /// Server `version` label.
    pub destination_version: String,
    /// Server canonical service (Istio's canonical-name rules).
    pub destination_canonical_service: String,
    /// Server canonical revision (Istio's canonical-revision rules).
    pub destination_canonical_revision: String,
    /// Server cluster (`--cluster-id`), `unknown` for a server the agent does not know.
    pub destination_cluster: String,
}

impl DestinationLabels {
    /// Labels for a server the agent may not know (`unknown` fills the gaps, as in
    /// Istio); a known server is in `cluster`.
    pub fn of(workload: Option<&WorkloadMeta>, cluster: &str) -> Self {
        let [name, namespace, app, version, service, revision] = workload_labels(workload);
        DestinationLabels {
            destination_workload: name,
            destination_workload_namespace: namespace,
            destination_principal: workload.map(|w| w.principal()).unwrap_or_else(unknown),
            destination_app: app,
            destination_version: version,
            destination_canonical_service: service,
            destination_canonical_revision: revision,
            destination_cluster: cluster_of(workload, cluster),
        }
    }
}

/// The cluster of a workload: every workload the agent knows is in its own
/// cluster (one mesh per cluster); one it does not know is `unknown`, as in Istio.
fn cluster_of(workload: Option<&WorkloadMeta>, cluster: &str) -> String {
    match workload {
        Some(_) => cluster.to_owned(),
        None => unknown(),
    }
}

/// Workload name (Istio's: the controller), namespace, `app`, `version`, canonical
/// service and revision of a workload, `unknown` where not known: the values both
/// sides of Istio's label set describe a workload with.
fn workload_labels(workload: Option<&WorkloadMeta>) -> [String; 6] {
    match workload {
        Some(w) => [
            w.workload_name.to_string(),
            w.namespace.to_string(),
            w.app().unwrap_or_else(unknown),
            w.version().unwrap_or_else(unknown),
            w.canonical_service(),
            w.canonical_revision(),
        ],
        None => std::array::from_fn(|_| unknown()),
    }
}

/// The Service a client addressed, one definition so TCP and HTTP series of a
/// Service join on the same labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestinationServiceLabels {
    /// The Service FQDN, or the original destination `ip:port` when no Service owns it.
    pub destination_service: String,
    /// Service short name, when known.
    pub destination_service_name: String,
    /// Service namespace, when known.
    pub destination_service_namespace: String,
}

impl DestinationServiceLabels {
    /// Labels for a connection or request to a Service.
    pub fn of(service: &Service) -> Self {
        DestinationServiceLabels {
            destination_service: service.fqdn(),
            destination_service_name: service.name.clone(),
            destination_service_namespace: service.namespace.clone(),
        }
    }

    /// Labels for traffic to an address no Service owns, keyed by the address as Istio does.
    pub fn address(dst: SocketAddr) -> Self {
        DestinationServiceLabels {
            destination_service: dst.to_string(),
            destination_service_name: unknown(),
            destination_service_namespace: unknown(),
        }
    }
}

fn unknown() -> String {
    "unknown".to_owned()
}

/// Istio's TCP metric labels, so dashboards built for Istio work unchanged; what the
/// agent cannot know is emitted as `unknown`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    /// `source` (this agent serves the client side) or `destination`.
    pub reporter: &'static str,
    /// Who connected.
    #[prometheus(flatten)]
    pub source: SourceLabels,
    /// Who was connected to, when the destination IP is a known workload.
    #[prometheus(flatten)]
    pub destination: DestinationLabels,
    /// What the client addressed.
    #[prometheus(flatten)]
    pub service: DestinationServiceLabels,
    /// Always `tcp`: per-request traffic is counted with [`HttpLabels`].
    pub request_protocol: &'static str,
    /// `-` when fine, otherwise why the connection failed (e.g. `CONNECT`).
    pub response_flags: &'static str,
    /// `mutual_tls` or `none`.
    pub connection_security_policy: &'static str,
}

/// Istio's HTTP metric labels, plus `route` (the HTTPRoute that served the request).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// Always `source`: requests are routed by the client's agent.
    pub reporter: &'static str,
    /// Who sent the request.
    #[prometheus(flatten)]
    pub source: SourceLabels,
    /// The workload that answered, or `unknown` when none did.
    #[prometheus(flatten)]
    pub destination: DestinationLabels,
    /// The Service that served the request (the backend, after routing).
    #[prometheus(flatten)]
    pub service: DestinationServiceLabels,
    /// `http`, `http2`... `grpc` for gRPC.
    pub request_protocol: &'static str,
    /// HTTP status returned to the client.
    pub response_code: u16,
    /// gRPC status for gRPC requests, else empty.
    pub grpc_response_status: String,
    /// `-`, or Envoy-style flags: `NR` no route, `UH` no healthy endpoint, `UF`
    /// connect failure, `UT` timeout, `UO` overflow, `RL` rate limited, `FI` fault injected.
    pub response_flags: &'static str,
    /// `mutual_tls` or `none` for the hop to the endpoint.
    pub connection_security_policy: &'static str,
    /// `namespace/name` of the HTTPRoute, or `default` when the Service has none.
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    destination_service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabels {
    destination_service: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolLabels {
    reporter: &'static str,
    protocol: &'static str,
}

/// Istio's duration buckets, in milliseconds.
const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS_MS)
}

fn size_histogram() -> Histogram {
    // 1 B to 100 MB, decades.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        1.0, 10.0, 9,
    ))
}

/// A histogram family with a fixed bucket layout.
pub type HistogramFamily = Family<HttpLabels, Histogram, fn() -> Histogram>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabels {
    policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    direction: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    reason: &'static str,
    workload: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentityLabels {
    identity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CniLabels {
    command: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WatchEventLabels {
    kind: &'static str,
    event: &'static str,
}

/// All metrics the agent exports, registered once at start.
pub struct Metrics {
    registry: Registry,
    /// `istio_tcp_connections_opened_total`.
    pub tcp_opened: Family<TcpLabels, Counter>,
    /// `istio_tcp_connections_closed_total`.
    pub tcp_closed: Family<TcpLabels, Counter>,
    /// `istio_tcp_sent_bytes_total`: server to client.
    pub tcp_sent_bytes: Family<TcpLabels, Counter>,
    /// `istio_tcp_received_bytes_total`: client to server.
    pub tcp_received_bytes: Family<TcpLabels, Counter>,
    /// Connections the agent is carrying now.
    pub open_connections: Gauge,
    /// Workloads whose connects are being captured.
    pub enrolled_workloads: Gauge,
    /// 1 while the mesh CA files were usable at the last (re)load, else 0.
    pub ca_healthy: Gauge,
    /// Workloads in the config the agent could not enroll.
    pub failed_workloads: Gauge,
    /// Accepted connections with no kernel record of their destination (closed).
    pub orig_dst_missing: Counter,
    /// Same-node connections whose bytes the kernel carries (joined sockets).
    pub spliced_connections: Counter,
    /// Same-node connections that could not be joined and were relayed in user space.
    pub splice_fallbacks: Counter,
    config_reloads: Family<ResultLabels, Counter>,
    map_entries: Family<MapLabels, Gauge>,
    map_capacity: Family<MapLabels, Gauge>,
    capture_decisions: Family<DecisionLabels, Counter>,
    kernel_trace_records: Family<OutcomeLabels, Counter>,
    cert_expiry: Family<IdentityLabels, Gauge>,
    cert_failures: Family<IdentityLabels, Counter>,
    tunnel_refusals: Family<RefusalLabels, Counter>,
    connection_refusals: Family<LimitLabels, Counter>,
    tunnel_connections: Family<DirectionLabels, Counter>,
    /// Tunnel connections open in the client pool.
    pub tunnel_pool_connections: Gauge,
    /// `istio_requests_total`.
    pub requests: Family<HttpLabels, Counter>,
    /// `istio_request_duration_milliseconds`.
    pub request_duration: HistogramFamily,
    /// `istio_request_bytes`: request body sizes.
    pub request_bytes: HistogramFamily,
    /// `istio_response_bytes`: response body sizes.
    pub response_bytes: HistogramFamily,
    retries: Family<RetryLabels, Counter>,
    requests_denied: Family<PolicyLabels, Counter>,
    requests_audited: Family<PolicyLabels, Counter>,
    spans_exported: Counter,
    spans_dropped: Family<DropLabels, Counter>,
    ejections: Family<ServiceLabels, Counter>,
    detections: Family<ProtocolLabels, Counter>,
    rejected_objects: Family<KindLabels, Gauge>,
    watch_events: Family<WatchEventLabels, Counter>,
    watch_errors: Family<KindLabels, Counter>,
    cni_requests: Family<CniLabels, Counter>,
    /// Last kernel counter values, so Prometheus counters advance by the delta.
    last_decisions: Mutex<[u64; mesh_common::stat::COUNT as usize]>,
    last_trace_records: Mutex<[u64; 3]>,
    /// The cluster this agent's workloads are in (`source_/destination_cluster`).
    cluster_id: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The cluster name Istio uses when none is configured.
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";

impl Metrics {
    /// Registers every metric, for workloads in Istio's default cluster.
    pub fn new() -> Self {
        Self::for_cluster(DEFAULT_CLUSTER_ID)
    }

    /// Registers every metric, for workloads in cluster `cluster_id`.
    pub fn for_cluster(cluster_id: &str) -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
            tcp_sent_bytes: Family::default(),
            tcp_received_bytes: Family::default(),
            open_connections: Gauge::default(),
            enrolled_workloads: Gauge::default(),
            ca_healthy: Gauge::default(),
            failed_workloads: Gauge::default(),
            orig_dst_missing: Counter::default(),
            spliced_connections: Counter::default(),
            splice_fallbacks: Counter::default(),
            config_reloads: Family::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            capture_decisions: Family::default(),
            cert_expiry: Family::default(),
            cert_failures: Family::default(),
            tunnel_refusals: Family::default(),
            connection_refusals: Family::default(),
            tunnel_connections: Family::default(),
            tunnel_pool_connections: Gauge::default(),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(duration_histogram),
            request_bytes: Family::new_with_constructor(size_histogram),
            response_bytes: Family::new_with_constructor(size_histogram),
            retries: Family::default(),
            requests_denied: Family::default(),
            requests_audited: Family::default(),
            spans_exported: Counter::default(),
            spans_dropped: Family::default(),
            ejections: Family::default(),
            detections: Family::default(),
            rejected_objects: Family::default(),
            watch_events: Family::default(),
            cni_requests: Family::default(),
            watch_errors: Family::default(),
            last_decisions: Mutex::new([0; mesh_common::stat::COUNT as usize]),
            last_trace_records: Mutex::new([0; 3]),
            kernel_trace_records: Family::default(),
            cluster_id: cluster_id.to_owned(),
            registry: Registry::default(),
        };
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            m.tcp_opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            m.tcp_closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent to the client (response direction) on TCP connections",
            m.tcp_sent_bytes.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the client (request direction) on TCP connections",
            m.tcp_received_bytes.clone(),
        );
        registry.register(
            "nodemesh_open_connections",
            "Connections the agent is carrying now",
            m.open_connections.clone(),
        );
        registry.register(
            "nodemesh_enrolled_workloads",
            "Workloads whose connections are captured",
            m.enrolled_workloads.clone(),
        );
        registry.register(
            "nodemesh_failed_workloads",
            "Workloads in the config that could not be enrolled",
            m.failed_workloads.clone(),
        );
        registry.register(
            "nodemesh_orig_dst_missing",
            "Captured connections closed because the kernel had no record of their destination",
            m.orig_dst_missing.clone(),
        );
        registry.register(
            "nodemesh_spliced_connections",
            "Same-node connections joined in the kernel (no user-space copy, no TLS)",
            m.spliced_connections.clone(),
        );
        registry.register(
            "nodemesh_splice_fallbacks",
            "Same-node connections that could not be joined in the kernel and were relayed by the agent",
            m.splice_fallbacks.clone(),
        );
        registry.register(
            "nodemesh_config_reloads",
            "Config loads by result",
            m.config_reloads.clone(),
        );
        registry.register(
            "nodemesh_bpf_map_entries",
            "Entries in each capture map",
            m.map_entries.clone(),
        );
        registry.register(
            "nodemesh_bpf_map_capacity",
            "max_entries of each capture map",
            m.map_capacity.clone(),
        );
        registry.register(
            "nodemesh_capture_decisions",
            "Decisions of the connect hooks for enrolled workloads",
            m.capture_decisions.clone(),
        );
        registry.register(
            "nodemesh_kernel_trace_records",
            "aya-log records of traced workloads read from the kernel (debug trace), by outcome",
            m.kernel_trace_records.clone(),
        );
        registry.register(
            "nodemesh_certificate_expiry_timestamp_seconds",
            "Expiry of the workload certificate being served, per identity",
            m.cert_expiry.clone(),
        );
        registry.register(
            "nodemesh_certificate_rotation_failures",
            "Failed certificate requests, per identity",
            m.cert_failures.clone(),
        );
        registry.register(
            "nodemesh_ca_healthy",
            "1 while the mesh CA files were usable at the last (re)load; 0 while the agent serves on with what it loaded before",
            m.ca_healthy.clone(),
        );
        registry.register(
            "nodemesh_connections_refused",
            "New connections reset at once because of a limit: agent_limit (--max-connections), workload_limit (the pod's own), fd_exhausted",
            m.connection_refusals.clone(),
        );
        registry.register(
            "nodemesh_tunnel_refusals",
            "Tunnel connections or streams refused, by direction and reason",
            m.tunnel_refusals.clone(),
        );
        registry.register(
            "nodemesh_tunnel_connections",
            "mTLS tunnel connections established (outbound: dialled by the pool; inbound: accepted)",
            m.tunnel_connections.clone(),
        );
        registry.register(
            "nodemesh_tunnel_pool_connections",
            "mTLS tunnel connections open in the client pool",
            m.tunnel_pool_connections.clone(),
        );
        registry.register(
            "istio_requests",
            "Requests routed, by source, destination, route and response",
            m.requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Time from request to the end of the response, in milliseconds",
            m.request_duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request body sizes",
            m.request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response body sizes",
            m.response_bytes.clone(),
        );
        registry.register(
            "nodemesh_http_retries",
            "Retries by result: granted, or refused because the retry budget was spent",
            m.retries.clone(),
        );
        registry.register(
            "nodemesh_requests_denied",
            "Requests denied (403) by an AuthorizationPolicy at the destination, per policy (namespace/name; none: no ALLOW policy matched)",
            m.requests_denied.clone(),
        );
        registry.register(
            "nodemesh_requests_audited",
            "Requests that matched an AUDIT AuthorizationPolicy, per policy",
            m.requests_audited.clone(),
        );
        registry.register(
            "nodemesh_spans_exported",
            "Request spans the OTLP collector accepted",
            m.spans_exported.clone(),
        );
        registry.register(
            "nodemesh_spans_dropped",
            "Request spans not exported, by reason (queue_full: the export queue was full; export_failed: the collector refused or did not answer)",
            m.spans_dropped.clone(),
        );
        registry.register(
            "nodemesh_endpoint_ejections",
            "Endpoints ejected by outlier detection",
            m.ejections.clone(),
        );
        registry.register(
            "nodemesh_protocol_detections",
            "Connections whose protocol was detected or declared, by side (source: to Service ports; destination: every admitted connection, unless this agent's client side already served its requests)",
            m.detections.clone(),
        );
        registry.register(
            "nodemesh_rejected_objects",
            "Objects from the Kubernetes API left out of the mesh state because they are invalid, per kind (their last good version, if any, stays in force)",
            m.rejected_objects.clone(),
        );
        registry.register(
            "nodemesh_cni_requests",
            "Requests from the CNI plugin, per command (ADD, DEL, CHECK) and outcome (enrolled, not_meshed, removed, failed)",
            m.cni_requests.clone(),
        );
        registry.register(
            "nodemesh_kube_watch_events",
            "Events received from Kubernetes API watches, per kind and event",
            m.watch_events.clone(),
        );
        registry.register(
            "nodemesh_kube_watch_errors",
            "Failed Kubernetes API list or watch requests, per kind (each is retried with backoff)",
            m.watch_errors.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The cluster of the workloads this agent reports on.
    pub fn cluster(&self) -> &str {
        &self.cluster_id
    }

    /// Labels of a client, in this agent's cluster when known.
    pub fn source_labels(
        &self,
        workload: Option<&WorkloadMeta>,
        principal: String,
    ) -> SourceLabels {
        SourceLabels::of(workload, principal, &self.cluster_id)
    }

    /// Labels of a server, in this agent's cluster when known.
    pub fn destination_labels(&self, workload: Option<&WorkloadMeta>) -> DestinationLabels {
        DestinationLabels::of(workload, &self.cluster_id)
    }

    /// Counts a retry decision for `service`.
    pub fn retry(&self, service: &str, granted: bool) {
        let result = if granted {
            "granted"
        } else {
            "budget_exhausted"
        };
        self.retries
            .get_or_create(&RetryLabels {
                destination_service: service.to_owned(),
                result,
            })
            .inc();
    }

    /// Counts `n` spans the collector accepted.
    pub fn spans_exported(&self, n: u64) {
        self.spans_exported.inc_by(n);
    }

    /// Counts `n` spans dropped for `reason` (`queue_full`, `export_failed`).
    pub fn spans_dropped(&self, reason: &'static str, n: u64) {
        self.spans_dropped
            .get_or_create(&DropLabels { reason })
            .inc_by(n);
    }

    /// Counts a request denied by `policy` (`None`: no ALLOW policy matched).
    pub fn request_denied(&self, policy: Option<&str>) {
        self.requests_denied
            .get_or_create(&PolicyLabels {
                policy: policy.unwrap_or("none").to_owned(),
            })
            .inc();
    }

    /// Counts a request that matched the AUDIT policy `policy`.
    pub fn request_audited(&self, policy: &str) {
        self.requests_audited
            .get_or_create(&PolicyLabels {
                policy: policy.to_owned(),
            })
            .inc();
    }

    /// Counts an outlier ejection.
    pub fn ejected(&self, service: &str) {
        self.ejections
            .get_or_create(&ServiceLabels {
                destination_service: service.to_owned(),
            })
            .inc();
    }

    /// Counts a connection's protocol, as the client side (`source`) or the
    /// destination side found or was told it.
    pub fn detected(&self, reporter: &'static str, protocol: &'static str) {
        self.detections
            .get_or_create(&ProtocolLabels { reporter, protocol })
            .inc();
    }

    /// Counts a new connection reset because of a limit (`reason`) for `workload`.
    pub fn connection_refused(&self, reason: &'static str, workload: &str) {
        self.connection_refusals
            .get_or_create(&LimitLabels {
                reason,
                workload: workload.to_owned(),
            })
            .inc();
    }

    /// Counts a refused tunnel (`inbound`: at our listener, `outbound`: by or toward a peer).
    pub fn tunnel_refused(&self, direction: &'static str, reason: &'static str) {
        self.tunnel_refusals
            .get_or_create(&RefusalLabels { direction, reason })
            .inc();
    }

    /// Counts an established tunnel connection.
    pub fn tunnel_established(&self, direction: &'static str) {
        self.tunnel_connections
            .get_or_create(&DirectionLabels { direction })
            .inc();
    }

    /// Records a newly served certificate's expiry.
    pub fn certificate_issued(&self, identity: &str, not_after_unix: u64) {
        self.cert_expiry
            .get_or_create(&IdentityLabels {
                identity: identity.to_owned(),
            })
            .set(not_after_unix as i64);
    }

    /// Counts a failed certificate request.
    pub fn certificate_failed(&self, identity: &str) {
        self.cert_failures
            .get_or_create(&IdentityLabels {
                identity: identity.to_owned(),
            })
            .inc();
    }

    /// Failed certificate requests so far for `identity`.
    pub fn certificate_failures(&self, identity: &str) -> u64 {
        self.cert_failures
            .get_or_create(&IdentityLabels {
                identity: identity.to_owned(),
            })
            .get()
    }

    /// Drops the expiry series of an identity no longer on this node.
    pub fn forget_certificate(&self, identity: &str) {
        self.cert_expiry.remove(&IdentityLabels {
            identity: identity.to_owned(),
        });
    }

    /// Counts one config load attempt.
    pub fn config_reload(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.config_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// Sets how many objects of `kind` are rejected now.
    pub fn rejected_objects(&self, kind: &'static str, count: usize) {
        self.rejected_objects
            .get_or_create(&KindLabels { kind })
            .set(count as i64);
    }

    /// Counts one watch event (`init`, `apply`, `delete`, `synced`) of `kind`.
    pub fn watch_event(&self, kind: &'static str, event: &'static str) {
        self.watch_events
            .get_or_create(&WatchEventLabels { kind, event })
            .inc();
    }

    /// Counts a CNI plugin request and how it was answered.
    pub fn cni_request(&self, command: &'static str, outcome: &'static str) {
        self.cni_requests
            .get_or_create(&CniLabels { command, outcome })
            .inc();
    }

    /// Counts a failed list or watch of `kind`.
    pub fn watch_error(&self, kind: &'static str) {
        self.watch_errors.get_or_create(&KindLabels { kind }).inc();
    }

    /// Pulls kernel-side numbers (map sizes, decision counters) just before a scrape.
    pub fn refresh_from_kernel(&self, capture: &Capture) -> Vec<MapOccupancy> {
        let occupancy = capture.occupancy();
        for m in &occupancy {
            let labels = MapLabels { map: m.name };
            self.map_entries
                .get_or_create(&labels)
                .set(m.entries as i64);
            self.map_capacity
                .get_or_create(&labels)
                .set(m.capacity as i64);
        }
        let now = capture.stats();
        let mut last = self.last_decisions.lock().expect("decisions lock");
        for (i, name) in mesh_common::stat::NAMES.iter().enumerate() {
            let delta = now[i].saturating_sub(last[i]);
            self.capture_decisions
                .get_or_create(&DecisionLabels { decision: name })
                .inc_by(delta);
            last[i] = now[i];
        }
        let records = capture.trace.records();
        let mut last = self.last_trace_records.lock().expect("trace records lock");
        for (i, outcome) in crate::node::trace::RECORD_OUTCOMES.iter().enumerate() {
            self.kernel_trace_records
                .get_or_create(&OutcomeLabels { outcome })
                .inc_by(records[i].saturating_sub(last[i]));
            last[i] = records[i];
        }
        occupancy
    }

    /// OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// The exposition in `format`.
    pub fn encode_as(&self, format: Format) -> String {
        match format {
            Format::OpenMetrics => self.encode(),
            Format::Text004 => openmetrics_to_text004(&self.encode()),
        }
    }
}

/// The exposition formats `/metrics` can answer in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0.0: counters' metadata is named without `_total`.
    OpenMetrics,
    /// Prometheus text 0.0.4, what Envoy and Istio's proxies serve: counters'
    /// metadata is named like their samples (`istio_requests_total`).
    Text004,
}

impl Format {
    /// The `Content-Type` of a response in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Text004 => "text/plain; version=0.0.4; charset=utf-8",
        }
    }

    /// The format for a scraper's `Accept` header: text 0.0.4 whenever the
    /// scraper accepts it (at any `q`), as Envoy and Istio's proxies serve, so
    /// Prometheus files counters' metadata under the names Istio's dashboards
    /// use (`istio_requests_total`); OpenMetrics only to a scraper that takes
    /// nothing else. No header, or `*/*`, gets 0.0.4.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let Some(accept) = accept.filter(|a| !a.trim().is_empty()) else {
            return Format::Text004;
        };
        let mut openmetrics = false;
        for range in accept.split(',') {
            let mut params = range.split(';').map(str::trim);
            let media = params.next().unwrap_or("").to_ascii_lowercase();
            let q = params
                .find_map(|p| p.strip_prefix("q="))
                .and_then(|q| q.parse::<f32>().ok())
                .unwrap_or(1.0);
            if q <= 0.0 {
                continue;
            }
            match media.as_str() {
                "text/plain" | "text/*" | "*/*" => return Format::Text004,
                "application/openmetrics-text" => openmetrics = true,
                _ => {}
            }
        }
        if openmetrics {
            Format::OpenMetrics
        } else {
            Format::Text004
        }
    }
}

/// Rewrites OpenMetrics text as Prometheus text 0.0.4: a counter family's
/// `HELP`/`TYPE` lines take the `_total` name of its samples, `UNIT` lines and
/// the `# EOF` terminator go (0.0.4 has neither). The samples are the same in
/// both formats for the types the agent exports (counters, gauges, histograms).
pub fn openmetrics_to_text004(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 64 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(name) {
                    out.push_str("_total");
                }
                if !tail.is_empty() {
                    out.push(' ');
                    out.push_str(tail);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The label names of the first sample of `family`, in exposition order.
    fn label_names<'a>(text: &'a str, family: &str) -> Vec<&'a str> {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{family}{{")))
            .unwrap_or_else(|| panic!("no {family} sample in\n{text}"));
        let inner = &line[line.find('{').unwrap() + 1..line.rfind('}').unwrap()];
        inner
            .split("\",")
            .map(|pair| pair.split('=').next().unwrap())
            .collect()
    }

    // Istio's standard labels: dashboards and alerts written for Istio select on them.
    const ISTIO_COMMON: [&str; 20] = [
        "reporter",
        "source_workload",
        "source_workload_namespace",
        "source_principal",
        "source_app",
        "source_version",
        "source_canonical_service",
        "source_canonical_revision",
        "source_cluster",
        "destination_workload",
        "destination_workload_namespace",
        "destination_principal",
        "destination_app",
        "destination_version",
        "destination_canonical_service",
        "destination_canonical_revision",
        "destination_cluster",
        "destination_service",
        "destination_service_name",
        "destination_service_namespace",
    ];

    #[test]
    fn tcp_and_http_series_carry_istio_standard_labels() {
        let metrics = Metrics::new();
        let source = metrics.source_labels(None, "unknown".into());
        let destination = metrics.destination_labels(None);
        let service = DestinationServiceLabels::address("10.0.0.1:80".parse().unwrap());
        metrics
            .tcp_opened
            .get_or_create(&TcpLabels {
                reporter: "source",
                source: source.clone(),
                destination: destination.clone(),
                service: service.clone(),
                request_protocol: "tcp",
                response_flags: "-",
                connection_security_policy: "none",
            })
            .inc();
        metrics
            .requests
            .get_or_create(&HttpLabels {
                reporter: "source",
                source,
                destination,
                service,
                request_protocol: "http",
                response_code: 200,
                grpc_response_status: String::new(),
                response_flags: "-",
                connection_security_policy: "none",
                route: "default".into(),
            })
            .inc();
        let text = metrics.encode();
        let tcp = [
            &ISTIO_COMMON[..],
            &[
                "request_protocol",
                "response_flags",
                "connection_security_policy",
            ],
        ]
        .concat();
        assert_eq!(
            label_names(&text, "istio_tcp_connections_opened_total"),
            tcp
        );
        let http = [
            &ISTIO_COMMON[..],
            &[
                "request_protocol",
                "response_code",
                "grpc_response_status",
                "response_flags",
                "connection_security_policy",
                "route",
            ],
        ]
        .concat();
        assert_eq!(label_names(&text, "istio_requests_total"), http);
    }

    #[test]
    fn known_workloads_are_in_the_agents_cluster() {
        let metrics = Metrics::for_cluster("east");
        let w = WorkloadMeta {
            name: "web-0".into(),
            namespace: "shop".into(),
            service_account: "web".into(),
            labels: Default::default(),
            workload_name: "web".into(),
            meshed: true,
            trust_domain: "cluster.local".into(),
        };
        assert_eq!(
            metrics
                .source_labels(Some(&w), w.principal())
                .source_cluster,
            "east"
        );
        assert_eq!(
            metrics.destination_labels(Some(&w)).destination_cluster,
            "east"
        );
        assert_eq!(
            metrics.destination_labels(None).destination_cluster,
            "unknown"
        );
    }

    #[test]
    fn accept_headers_choose_the_format() {
        let prometheus_2 = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        let cases = [
            (None, Format::Text004),
            (Some("*/*"), Format::Text004),
            (Some("text/plain;version=0.0.4"), Format::Text004),
            (Some(prometheus_2), Format::Text004),
            (
                Some("application/openmetrics-text;version=1.0.0,text/plain;q=0"),
                Format::OpenMetrics,
            ),
            (
                Some("Application/OpenMetrics-Text; version=1.0.0"),
                Format::OpenMetrics,
            ),
            (Some("application/json"), Format::Text004),
        ];
        for (accept, expected) in cases {
            assert_eq!(Format::negotiate(accept), expected, "{accept:?}");
        }
    }

    #[test]
    fn text_004_names_counter_metadata_like_its_samples() {
        let metrics = Metrics::new();
        metrics.orig_dst_missing.inc();
        metrics.open_connections.set(3);
        let text = metrics.encode_as(Format::Text004);
        assert!(
            text.contains("# TYPE nodemesh_orig_dst_missing_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP nodemesh_orig_dst_missing_total Captured"),
            "{text}"
        );
        assert!(
            text.contains("\nnodemesh_orig_dst_missing_total 1\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE nodemesh_open_connections gauge\n"),
            "{text}"
        );
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
        // The OpenMetrics form is unchanged.
        let om = metrics.encode_as(Format::OpenMetrics);
        assert!(
            om.contains("# TYPE nodemesh_orig_dst_missing counter\n") && om.ends_with("# EOF\n")
        );
    }
}
