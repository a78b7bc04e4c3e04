//! Spans of proxied requests, exported over OTLP to a collector.
//!
//! Each side that serves a request (the client's agent, the destination's
//! agent) records one span. The W3C `traceparent` header carries the link: a
//! side continues the trace it received and passes its own span on as the
//! parent, so the client side's span is the parent of the destination side's.
//!
//! The data path only ever hands a finished span to a bounded queue
//! ([`Tracer::finish`]); one task batches the queue and exports it. A full
//! queue or a failed export drops spans and counts them, and never slows a
//! request.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter, SpanLinks};
use rand::Rng;
use tokio::sync::mpsc;

use crate::metrics::Metrics;

/// The W3C trace context header.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Spans sent to the collector in one export, at most.
const MAX_BATCH: usize = 512;
/// How long a span may wait for others to share its export.
const BATCH_DELAY: Duration = Duration::from_millis(200);
/// An export that takes longer than this has failed; its spans are dropped.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// One `traceparent` value: which trace, which span sent it, and whether the
/// trace is sampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    /// The trace every span of the request shares.
    pub trace_id: [u8; 16],
    /// The span that sent the request on (the receiver's parent).
    pub span_id: [u8; 8],
    /// Whether spans of this trace are recorded (flag `01`).
    pub sampled: bool,
}

impl TraceContext {
    /// Reads a `traceparent` value the way the W3C spec asks: version `00`
    /// exactly as specified, later versions by their first four fields;
    /// all-zero ids, version `ff` and anything malformed are no context.
    pub fn parse(value: &[u8]) -> Option<Self> {
        let s = std::str::from_utf8(value).ok()?;
        let mut fields = s.splitn(5, '-');
        let (version, trace, span, flags) = (
            fields.next()?,
            fields.next()?,
            fields.next()?,
            fields.next()?,
        );
        let rest = fields.next();
        let lower_hex = |f: &str| f.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if version.len() != 2 || !lower_hex(version) || version == "ff" {
            return None;
        }
        // Version 00 has exactly four fields; a later version may add more.
        if version == "00" && rest.is_some() {
            return None;
        }
        if trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
            return None;
        }
        if !lower_hex(trace) || !lower_hex(span) || !lower_hex(flags) {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok()?;
        let span_id = u64::from_str_radix(span, 16).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        if trace_id == 0 || span_id == 0 {
            return None;
        }
        Some(TraceContext {
            trace_id: trace_id.to_be_bytes(),
            span_id: span_id.to_be_bytes(),
            sampled: flags & 1 == 1,
        })
    }

    /// The header value that passes this context on (always version `00`).
    pub fn header(&self) -> HeaderValue {
        let value = format!(
            "00-{:032x}-{:016x}-{}",
            u128::from_be_bytes(self.trace_id),
            u64::from_be_bytes(self.span_id),
            if self.sampled { "01" } else { "00" }
        );
        HeaderValue::from_str(&value).expect("hex is a valid header value")
    }
}

/// Which side of a request a span records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client's agent (`reporter="source"`): an OTLP client span.
    Source,
    /// The destination's agent (`reporter="destination"`): a server span.
    Destination,
}

/// A span in progress: started when the request arrived, exported when its
/// record ends.
#[derive(Debug, Clone)]
pub struct Span {
    /// This span's context, as passed on in `traceparent`.
    pub context: TraceContext,
    /// The span that sent the request, when it came with a trace context.
    pub parent: Option<[u8; 8]>,
    /// Which side records it.
    pub side: Side,
    /// When the request arrived.
    pub start: SystemTime,
}

/// How a side continues the trace a request arrived with (a pure decision).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Continuation {
    /// The trace the span joins.
    pub trace_id: [u8; 16],
    /// The span's parent, when the request carried one.
    pub parent: Option<[u8; 8]>,
    /// Whether this side records a span.
    pub sampled: bool,
}

/// Continues `incoming` when there is one, honouring its sampling decision (as
/// Istio's proxies do); otherwise starts a trace sampled with `roll`.
pub fn continue_trace(
    incoming: Option<TraceContext>,
    new_trace: [u8; 16],
    roll: impl FnOnce() -> bool,
) -> Continuation {
    match incoming {
        Some(tc) => Continuation {
            trace_id: tc.trace_id,
            parent: Some(tc.span_id),
            sampled: tc.sampled,
        },
        None => Continuation {
            trace_id: new_trace,
            parent: None,
            sampled: roll(),
        },
    }
}

/// What a finished span says about its request.
#[derive(Debug, Clone)]
pub struct SpanOutcome {
    /// `GET`, `POST`...
    pub method: String,
    /// The request's authority.
    pub authority: String,
    /// The request's path (without the query).
    pub path: String,
    /// The HTTP status returned (0 when there was none).
    pub response_code: u16,
    /// Envoy-style response flags, `-` when fine.
    pub response_flags: &'static str,
    /// `namespace/name` of the HTTPRoute, `default`, or `-` at the destination.
    pub route: String,
    /// The Service that served the request.
    pub destination_service: String,
    /// `namespace/name` of the workload that answered.
    pub destination_workload: String,
    /// `namespace/name` of the workload that asked.
    pub source_workload: String,
    /// The recording side's canonical service and namespace (Istio's span tags).
    pub canonical_service: String,
    /// The recording side's namespace.
    pub namespace: String,
    /// `http`, `grpc`.
    pub protocol: &'static str,
    /// Where the request went (`ip:port`), when it got that far.
    pub upstream: Option<String>,
}

/// Where spans go: `--otlp-endpoint` and the transport to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OtlpProtocol {
    /// OTLP/gRPC (a collector's port 4317).
    Grpc,
    /// OTLP/HTTP with protobuf bodies (port 4318, path `/v1/traces`).
    #[value(name = "http/protobuf")]
    HttpProtobuf,
}

/// Tracing flags.
#[derive(Debug, Clone)]
pub struct TraceSettings {
    /// The collector; no spans are recorded without one.
    pub endpoint: Option<String>,
    /// The transport to it.
    pub protocol: OtlpProtocol,
    /// Share of new traces recorded, 0.0 to 1.0 (a request that arrives with
    /// a trace context follows its sampled flag instead).
    pub sampling: f64,
    /// Finished spans waiting for export, at most; more are dropped and counted.
    pub queue: usize,
    /// The node, recorded on every span (`host.name`).
    pub node_name: Option<String>,
}

/// Starts spans and queues them for export. Cheap to clone; does nothing when
/// no collector is configured.
#[derive(Clone, Default)]
pub struct Tracer {
    inner: Option<Arc<TracerInner>>,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            Some(inner) => write!(f, "Tracer(sampling {})", inner.sampling),
            None => f.write_str("Tracer(off)"),
        }
    }
}

struct TracerInner {
    sampling: f64,
    queue: mpsc::Sender<(Span, SpanOutcome)>,
    metrics: Arc<Metrics>,
}

impl Tracer {
    /// A tracer that records nothing (no collector).
    pub fn disabled() -> Self {
        Tracer::default()
    }

    /// Connects to the collector in `settings` and starts the export task;
    /// disabled when no endpoint is set. Must run inside the tokio runtime.
    pub fn start(settings: &TraceSettings, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let Some(endpoint) = settings.endpoint.as_deref() else {
            return Ok(Tracer::disabled());
        };
        if !(0.0..=1.0).contains(&settings.sampling) {
            anyhow::bail!(
                "--trace-sampling must be between 0 and 100 (percent), got {}",
                settings.sampling * 100.0
            );
        }
        // Both reasons are exported from the start, so a dashboard sees 0.
        metrics.spans_dropped("queue_full", 0);
        metrics.spans_dropped("export_failed", 0);
        let mut exporter = build_exporter(endpoint, settings.protocol)?;
        let mut resource = Resource::builder_empty().with_service_name("nodemesh-agent");
        if let Some(node) = &settings.node_name {
            resource = resource.with_attribute(KeyValue::new("host.name", node.clone()));
        }
        exporter.set_resource(&resource.build());
        let (tx, rx) = mpsc::channel(settings.queue.max(1));
        tokio::spawn(export_loop(exporter, rx, metrics.clone()));
        tracing::info!(endpoint, protocol = ?settings.protocol, sampling = settings.sampling, "exporting request spans over OTLP");
        Ok(Tracer {
            inner: Some(Arc::new(TracerInner {
                sampling: settings.sampling,
                queue: tx,
                metrics,
            })),
        })
    }

    /// Whether spans are recorded at all.
    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Starts `side`'s span for a request with `headers`, and points their
    /// `traceparent` at it for whoever the request goes to next. `None`, with
    /// the headers untouched, when tracing is off or the trace is not sampled.
    pub fn start_span(&self, side: Side, headers: &mut HeaderMap) -> Option<Span> {
        let inner = self.inner.as_ref()?;
        let incoming = headers
            .get(TRACEPARENT)
            .and_then(|v| TraceContext::parse(v.as_bytes()));
        let mut rng = rand::rng();
        let new_trace = rng.random::<u128>().max(1).to_be_bytes();
        let sampling = inner.sampling;
        let c = continue_trace(incoming, new_trace, || rng.random::<f64>() < sampling);
        let span = Span {
            context: TraceContext {
                trace_id: c.trace_id,
                span_id: rng.random::<u64>().max(1).to_be_bytes(),
                sampled: c.sampled,
            },
            parent: c.parent,
            side,
            start: SystemTime::now(),
        };
        // Unsampled traces pass on the decision, so later hops skip them too.
        headers.insert(TRACEPARENT, span.context.header());
        c.sampled.then_some(span)
    }

    /// A span of the other side of the same request, child of `parent`: the
    /// destination's span when this agent serves both ends.
    pub fn child(&self, parent: &Span, side: Side) -> Span {
        Span {
            context: TraceContext {
                span_id: rand::rng().random::<u64>().max(1).to_be_bytes(),
                ..parent.context
            },
            parent: Some(parent.context.span_id),
            side,
            start: parent.start,
        }
    }

    /// Queues a finished span for export; drops and counts it when the queue
    /// is full. Never waits.
    pub fn finish(&self, span: Span, outcome: SpanOutcome) {
        let Some(inner) = &self.inner else { return };
        if inner.queue.try_send((span, outcome)).is_err() {
            inner.metrics.spans_dropped("queue_full", 1);
        }
    }
}

/// The OTLP exporter for `endpoint`. For HTTP, an endpoint without a path
/// gets the traces path (`/v1/traces`), as `OTEL_EXPORTER_OTLP_ENDPOINT` does.
fn build_exporter(
    endpoint: &str,
    protocol: OtlpProtocol,
) -> anyhow::Result<opentelemetry_otlp::SpanExporter> {
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|e| anyhow::anyhow!("--otlp-endpoint {endpoint:?}: {e}"))?;
    if uri.scheme_str() != Some("http") && uri.scheme_str() != Some("https") {
        anyhow::bail!("--otlp-endpoint {endpoint:?}: must start with http:// or https://");
    }
    let exporter = match protocol {
        OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(EXPORT_TIMEOUT)
            .build()?,
        OtlpProtocol::HttpProtobuf => {
            let full = match uri.path() {
                "" | "/" => format!("{}/v1/traces", endpoint.trim_end_matches('/')),
                _ => endpoint.to_owned(),
            };
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(full)
                .with_timeout(EXPORT_TIMEOUT)
                .build()?
        }
    };
    Ok(exporter)
}

/// Exports the queue in batches until every [`Tracer`] is gone. A failed
/// export drops its spans (counted, logged once per outage): holding them
/// would only grow memory while the collector is down.
async fn export_loop(
    exporter: opentelemetry_otlp::SpanExporter,
    mut queue: mpsc::Receiver<(Span, SpanOutcome)>,
    metrics: Arc<Metrics>,
) {
    let scope = InstrumentationScope::builder("nodemesh")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build();
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut failing = false;
    loop {
        if queue.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        if batch.len() < MAX_BATCH {
            // Let the spans of the same moment join this export.
            tokio::time::sleep(BATCH_DELAY).await;
            while batch.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(span) => batch.push(span),
                    Err(_) => break,
                }
            }
        }
        let n = batch.len() as u64;
        let spans = batch
            .drain(..)
            .map(|(span, outcome)| span_data(span, outcome, &scope))
            .collect();
        match tokio::time::timeout(EXPORT_TIMEOUT, exporter.export(spans)).await {
            Ok(Ok(())) => {
                metrics.spans_exported(n);
                if failing {
                    tracing::info!("span export recovered");
                    failing = false;
                }
            }
            failed => {
                metrics.spans_dropped("export_failed", n);
                if !failing {
                    let why = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no answer within {EXPORT_TIMEOUT:?}"),
                    };
                    tracing::warn!(error = %why, "span export failed; spans are dropped and counted in nodemesh_spans_dropped_total until it recovers");
                    failing = true;
                }
            }
        }
    }
}

/// The OTLP form of a finished span, with the attributes Istio's proxies
/// record and their OpenTelemetry names.
fn span_data(span: Span, o: SpanOutcome, scope: &InstrumentationScope) -> SpanData {
    let (kind, error) = match span.side {
        Side::Source => (
            SpanKind::Client,
            o.response_code == 0 || o.response_code >= 400,
        ),
        Side::Destination => (
            SpanKind::Server,
            o.response_code == 0 || o.response_code >= 500,
        ),
    };
    let mut attributes = vec![
        KeyValue::new("http.request.method", o.method.clone()),
        KeyValue::new("http.method", o.method.clone()),
        KeyValue::new("http.url", format!("http://{}{}", o.authority, o.path)),
        KeyValue::new("url.path", o.path),
        KeyValue::new("http.response.status_code", i64::from(o.response_code)),
        KeyValue::new("http.status_code", i64::from(o.response_code)),
        KeyValue::new("http.route", o.route),
        KeyValue::new("http.protocol", o.protocol),
        KeyValue::new("response_flags", o.response_flags),
        KeyValue::new("destination_service", o.destination_service.clone()),
        KeyValue::new("destination_workload", o.destination_workload),
        KeyValue::new("source_workload", o.source_workload),
        KeyValue::new("istio.canonical_service", o.canonical_service),
        KeyValue::new("istio.namespace", o.namespace),
        KeyValue::new(
            "component",
            match span.side {
                Side::Source => "proxy:source",
                Side::Destination => "proxy:destination",
            },
        ),
    ];
    if let Some(upstream) = o.upstream {
        attributes.push(KeyValue::new("upstream_host", upstream));
    }
    let flags = if span.context.sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    SpanData {
        span_context: SpanContext::new(
            TraceId::from_bytes(span.context.trace_id),
            SpanId::from_bytes(span.context.span_id),
            flags,
            false,
            TraceState::default(),
        ),
        parent_span_id: span
            .parent
            .map(SpanId::from_bytes)
            .unwrap_or(SpanId::INVALID),
        parent_span_is_remote: span.parent.is_some(),
        span_kind: kind,
        name: Cow::Owned(format!("{} {}", o.method, o.destination_service)),
        start_time: span.start,
        end_time: SystemTime::now(),
        attributes,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: if error {
            Status::error(format!("response code {}", o.response_code))
        } else {
            Status::Unset
        },
        instrumentation_scope: scope.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GIVEN: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_is_read_as_the_w3c_spec_says() {
        let tc = TraceContext::parse(GIVEN.as_bytes()).unwrap();
        assert_eq!(tc.trace_id[0], 0x4b);
        assert_eq!(tc.span_id, 0x00f067aa0ba902b7u64.to_be_bytes());
        assert!(tc.sampled);
        assert_eq!(tc.header(), GIVEN);
        let table: &[(&str, bool)] = &[
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
                true,
            ),
            // A later version may carry more fields.
            (
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xyz",
                true,
            ),
            // Version 00 may not.
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xyz",
                false,
            ),
            (
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                false,
            ),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                false,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                false,
            ),
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                false,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
                false,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
                false,
            ),
            ("", false),
        ];
        for (value, valid) in table {
            assert_eq!(
                TraceContext::parse(value.as_bytes()).is_some(),
                *valid,
                "{value}"
            );
        }
        let unsampled = TraceContext::parse(table[0].0.as_bytes()).unwrap();
        assert!(!unsampled.sampled);
    }

    #[test]
    fn a_side_continues_the_trace_it_was_given_and_its_sampling() {
        let given = TraceContext::parse(GIVEN.as_bytes()).unwrap();
        let fresh = [7u8; 16];
        // (incoming, roll, expected parent, expected trace, expected sampled)
        let table = [
            (
                Some(given),
                false,
                Some(given.span_id),
                given.trace_id,
                true,
            ),
            (
                Some(TraceContext {
                    sampled: false,
                    ..given
                }),
                true,
                Some(given.span_id),
                given.trace_id,
                false,
            ),
            (None, true, None, fresh, true),
            (None, false, None, fresh, false),
        ];
        for (incoming, roll, parent, trace, sampled) in table {
            let c = continue_trace(incoming, fresh, || roll);
            assert_eq!(
                c,
                Continuation {
                    trace_id: trace,
                    parent,
                    sampled
                },
                "{incoming:?} roll={roll}"
            );
        }
    }

    #[tokio::test]
    async fn spans_chain_source_to_destination_through_the_header() {
        let metrics = Arc::new(Metrics::for_cluster("Kubernetes"));
        let (tx, mut rx) = mpsc::channel(1);
        let tracer = Tracer {
            inner: Some(Arc::new(TracerInner {
                sampling: 1.0,
                queue: tx,
                metrics: metrics.clone(),
            })),
        };
        let mut headers = HeaderMap::new();
        let client = tracer.start_span(Side::Source, &mut headers).unwrap();
        assert_eq!(client.parent, None);
        let sent = TraceContext::parse(headers[TRACEPARENT].as_bytes()).unwrap();
        assert_eq!(sent, client.context);
        let server = tracer.start_span(Side::Destination, &mut headers).unwrap();
        assert_eq!(server.parent, Some(client.context.span_id));
        assert_eq!(server.context.trace_id, client.context.trace_id);
        assert_ne!(server.context.span_id, client.context.span_id);
        let twin = tracer.child(&client, Side::Destination);
        assert_eq!(twin.parent, Some(client.context.span_id));

        // The queue holds one; the second is dropped and counted, never awaited.
        let outcome = SpanOutcome {
            method: "GET".into(),
            authority: "api".into(),
            path: "/".into(),
            response_code: 200,
            response_flags: "-",
            route: "default".into(),
            destination_service: "api.backend.svc.cluster.local".into(),
            destination_workload: "backend/api".into(),
            source_workload: "shop/web".into(),
            canonical_service: "web".into(),
            namespace: "shop".into(),
            protocol: "http",
            upstream: None,
        };
        tracer.finish(client, outcome.clone());
        tracer.finish(server, outcome);
        assert!(rx.try_recv().is_ok());
        let text = metrics.encode();
        assert!(
            text.contains("nodemesh_spans_dropped_total{reason=\"queue_full\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn an_unsampled_trace_passes_its_decision_on() {
        let (tx, _rx) = mpsc::channel(1);
        let tracer = Tracer {
            inner: Some(Arc::new(TracerInner {
                sampling: 0.0,
                queue: tx,
                metrics: Arc::new(Metrics::for_cluster("Kubernetes")),
            })),
        };
        let mut headers = HeaderMap::new();
        assert!(tracer.start_span(Side::Source, &mut headers).is_none());
        let sent = TraceContext::parse(headers[TRACEPARENT].as_bytes()).unwrap();
        assert!(!sent.sampled);
        // Off entirely: the headers are left alone.
        let mut untouched = HeaderMap::new();
        assert!(
            Tracer::disabled()
                .start_span(Side::Source, &mut untouched)
                .is_none()
        );
        assert!(untouched.is_empty());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5000))]
        #[test]
        fn any_traceparent_round_trips(trace in 1u128.., span in 1u64.., sampled: bool) {
            let tc = TraceContext { trace_id: trace.to_be_bytes(), span_id: span.to_be_bytes(), sampled };
            prop_assert_eq!(TraceContext::parse(tc.header().as_bytes()), Some(tc));
        }

        #[test]
        fn untrusted_traceparent_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = TraceContext::parse(&bytes);
        }
    }
}
