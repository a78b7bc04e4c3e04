//! What every request the agent serves carries, on either side of the
//! connection: a [`RequestRecord`] that records Istio's request metrics and the
//! request-log line when the response ends, the body wrapper that measures
//! bodies on their way, and the client connection as hyper reads it.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::connections::ByteCounter;
use crate::metrics::{HttpLabels, Metrics};
use crate::proxy::l7::forward::request_host;
use crate::proxy::l7::upstream::{BoxError, ProxyBody};
use crate::state::workload::WorkloadMeta;
use crate::traces::{Side, Span, SpanOutcome, TRACEPARENT, Tracer};

/// `grpc` for a gRPC request (its content type), else `http`.
pub fn request_protocol(headers: &http::HeaderMap) -> &'static str {
    let grpc = headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if grpc { "grpc" } else { "http" }
}

/// A response the agent makes itself, with a body that says why.
pub fn local(
    status: StatusCode,
    flags: &'static str,
    why: String,
) -> (Response<ProxyBody>, &'static str) {
    let body = format!("{why} (response_flags {flags})\n");
    let mut resp = Response::new(full(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    (resp, flags)
}

/// A body of `bytes`, in the proxy's body type.
pub fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// Records one request on drop: Istio's request metrics and, if enabled, a JSON
/// request-log line. Lives in the response body, so streamed responses are
/// measured to their end.
pub struct RequestRecord {
    metrics: Arc<Metrics>,
    labels: HttpLabels,
    started: Instant,
    started_wall: SystemTime,
    request_bytes: Arc<AtomicU64>,
    response_bytes: u64,
    log: Option<(tracing_appender::non_blocking::NonBlocking, RequestLine)>,
    /// The same request as the destination reports it, when this agent
    /// serves both ends (same node): finished with this record's outcome.
    twin: Option<Box<RequestRecord>>,
    /// Records nothing when dropped (a twin whose request never got there).
    silent: bool,
    /// This side's span, when the request's trace is sampled.
    span: Option<TracedRequest>,
    /// The endpoint the request was sent to, once chosen.
    upstream: Option<SocketAddr>,
}

/// A sampled request's span and what its attributes need from the request.
struct TracedRequest {
    tracer: Tracer,
    span: Span,
    method: String,
    path: String,
    authority: String,
}

#[derive(Clone)]
struct RequestLine {
    method: String,
    path: String,
    authority: String,
    client: SocketAddr,
    upstream: Option<SocketAddr>,
    traceparent: Option<String>,
}

impl RequestRecord {
    /// Starts the record of `req`, received from `client`, reported with `labels`
    /// (their response fields are filled in as the response comes).
    pub fn new<B>(
        metrics: Arc<Metrics>,
        labels: HttpLabels,
        log: Option<tracing_appender::non_blocking::NonBlocking>,
        req: &Request<B>,
        client: SocketAddr,
    ) -> Self {
        let log = log.map(|w| {
            (
                w,
                RequestLine {
                    method: req.method().to_string(),
                    path: req.uri().path().to_owned(),
                    authority: request_host(req.headers(), req.uri()).to_owned(),
                    client,
                    upstream: None,
                    traceparent: req
                        .headers()
                        .get("traceparent")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned),
                },
            )
        });
        RequestRecord {
            metrics,
            labels,
            started: Instant::now(),
            started_wall: SystemTime::now(),
            request_bytes: Arc::default(),
            response_bytes: 0,
            log,
            twin: None,
            silent: false,
            span: None,
            upstream: None,
        }
    }

    /// Starts this side's span for the request (when `tracer` samples it) and
    /// points the request's `traceparent` at it, for the hop that follows.
    pub fn start_span(
        &mut self,
        tracer: &Tracer,
        side: Side,
        method: &http::Method,
        uri: &http::Uri,
        headers: &mut http::HeaderMap,
    ) {
        if let Some(span) = tracer.start_span(side, headers) {
            self.span = Some(TracedRequest {
                tracer: tracer.clone(),
                span,
                method: method.to_string(),
                path: uri.path().to_owned(),
                authority: request_host(headers, uri).to_owned(),
            });
        }
        self.set_traceparent(headers);
    }

    /// The `traceparent` to send the request on with, when it differs from
    /// the request's own: the twin's span, whose parent is this side's.
    pub fn twin_traceparent(&self) -> Option<HeaderValue> {
        let twin = self.twin.as_ref()?.span.as_ref()?;
        Some(twin.span.context.header())
    }

    /// Also reports the request with `labels` (`reporter="destination"`), for an
    /// endpoint this agent serves: its server side will not parse it again.
    pub fn set_twin(&mut self, labels: HttpLabels) {
        let span = self.span.as_ref().map(|s| TracedRequest {
            tracer: s.tracer.clone(),
            span: s.tracer.child(&s.span, Side::Destination),
            method: s.method.clone(),
            path: s.path.clone(),
            authority: s.authority.clone(),
        });
        self.twin = Some(Box::new(RequestRecord {
            metrics: self.metrics.clone(),
            labels,
            started: self.started,
            started_wall: self.started_wall,
            request_bytes: self.request_bytes.clone(),
            response_bytes: 0,
            log: self.log.clone(),
            twin: None,
            silent: false,
            span,
            upstream: None,
        }));
    }

    /// Drops the twin: the endpoint now chosen is served elsewhere.
    pub fn clear_twin(&mut self) {
        self.twin = None;
    }

    /// The labels so far.
    pub fn labels(&self) -> &HttpLabels {
        &self.labels
    }

    /// The labels so far, to be completed as the request is routed.
    pub fn labels_mut(&mut self) -> &mut HttpLabels {
        &mut self.labels
    }

    /// Counts the request body's bytes as it passes.
    pub fn request_body_counter(&self) -> Arc<AtomicU64> {
        self.request_bytes.clone()
    }

    /// Records the W3C trace context the request was sent on with.
    pub fn set_traceparent(&mut self, headers: &http::HeaderMap) {
        if let Some((_, line)) = &mut self.log {
            line.traceparent = headers
                .get(TRACEPARENT)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
        }
    }

    /// Records the endpoint chosen (its workload, when known, and address).
    pub fn set_upstream(&mut self, workload: Option<&WorkloadMeta>, addr: SocketAddr) {
        self.labels.destination = self.metrics.destination_labels(workload);
        self.upstream = Some(addr);
        if let Some((_, line)) = &mut self.log {
            line.upstream = Some(addr);
        }
    }

    /// Answers the request with a response the agent makes, and finishes the record.
    pub fn reply(
        self,
        status: StatusCode,
        flags: &'static str,
        why: String,
    ) -> Response<ProxyBody> {
        self.respond(local(status, flags, why))
    }

    /// Moves the record into the response body, which finishes it.
    pub fn respond(
        mut self,
        (resp, flags): (Response<ProxyBody>, &'static str),
    ) -> Response<ProxyBody> {
        self.labels.response_code = resp.status().as_u16();
        self.labels.response_flags = flags;
        if let Some(status) = resp
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
        {
            self.labels.grpc_response_status = status.to_owned();
        }
        let (parts, body) = resp.into_parts();
        Response::from_parts(
            parts,
            ObservedBody {
                inner: body,
                observer: Some(self),
            }
            .boxed(),
        )
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        if let Some(mut twin) = self.twin.take() {
            let (from, to) = (&self.labels, &mut twin.labels);
            match from.response_flags {
                // Never reached the destination: nothing to report there.
                "UF" => twin.silent = true,
                // The destination saw the client give up before its answer.
                "UT" | "DC" => {
                    to.response_code = 0;
                    to.response_flags = "DC";
                }
                _ => {
                    to.response_code = from.response_code;
                    to.response_flags = from.response_flags;
                    to.grpc_response_status = from.grpc_response_status.clone();
                }
            }
            twin.response_bytes = self.response_bytes;
            twin.upstream = self.upstream;
            if let (Some((_, line)), Some((_, twin_line))) = (&self.log, &mut twin.log) {
                twin_line.upstream = line.upstream;
                twin_line.traceparent = twin
                    .span
                    .as_ref()
                    .and_then(|s| s.span.context.header().to_str().ok().map(str::to_owned))
                    .or_else(|| line.traceparent.clone());
            }
        }
        if self.silent {
            return;
        }
        if let Some(traced) = self.span.take() {
            self.finish_span(traced);
        }
        let ms = self.started.elapsed().as_secs_f64() * 1000.0;
        let request_bytes = self.request_bytes.load(Ordering::Relaxed);
        let m = &self.metrics;
        m.requests.get_or_create(&self.labels).inc();
        m.request_duration.get_or_create(&self.labels).observe(ms);
        m.request_bytes
            .get_or_create(&self.labels)
            .observe(request_bytes as f64);
        m.response_bytes
            .get_or_create(&self.labels)
            .observe(self.response_bytes as f64);
        if let Some((mut writer, line)) = self.log.take() {
            let l = &self.labels;
            let entry = serde_json::json!({
                "reporter": l.reporter,
                "start_time": humantime::format_rfc3339_millis(self.started_wall).to_string(),
                "method": line.method,
                "path": line.path,
                "authority": line.authority,
                "protocol": l.request_protocol,
                "response_code": l.response_code,
                "grpc_status": l.grpc_response_status,
                "response_flags": l.response_flags,
                // The code `debug explain` gives, where the flags tell it.
                "reason": crate::explain::Reason::from_response_flags(l.response_flags),
                "duration_ms": ms,
                "bytes_received": request_bytes,
                "bytes_sent": self.response_bytes,
                "client": line.client.to_string(),
                "source_workload": format!("{}/{}", l.source.source_workload_namespace, l.source.source_workload),
                "source_principal": l.source.source_principal,
                "destination_service": l.service.destination_service,
                "destination_workload": format!("{}/{}", l.destination.destination_workload_namespace, l.destination.destination_workload),
                "upstream_host": line.upstream.map(|a| a.to_string()),
                "route": l.route,
                "traceparent": line.traceparent,
                "connection_security_policy": l.connection_security_policy,
            });
            use std::io::Write;
            let _ = writeln!(writer, "{entry}");
        }
    }
}

impl RequestRecord {
    /// Hands the finished span to the tracer's export queue.
    fn finish_span(&self, traced: TracedRequest) {
        let l = &self.labels;
        let (canonical_service, namespace) = match traced.span.side {
            Side::Source => (
                &l.source.source_canonical_service,
                &l.source.source_workload_namespace,
            ),
            Side::Destination => (
                &l.destination.destination_canonical_service,
                &l.destination.destination_workload_namespace,
            ),
        };
        let outcome = SpanOutcome {
            method: traced.method,
            authority: traced.authority,
            path: traced.path,
            response_code: l.response_code,
            response_flags: l.response_flags,
            route: l.route.clone(),
            destination_service: l.service.destination_service.clone(),
            destination_workload: format!(
                "{}/{}",
                l.destination.destination_workload_namespace, l.destination.destination_workload
            ),
            source_workload: format!(
                "{}/{}",
                l.source.source_workload_namespace, l.source.source_workload
            ),
            canonical_service: canonical_service.clone(),
            namespace: namespace.clone(),
            protocol: l.request_protocol,
            upstream: self.upstream.map(|a| a.to_string()),
        };
        traced.tracer.finish(traced.span, outcome);
    }
}

/// What a body wrapper does with the frames it passes on.
pub trait FrameObserver: Unpin {
    /// Sees each frame on its way.
    fn frame(&mut self, frame: &Frame<Bytes>);
    /// The body ended, with an error or not.
    fn end(&mut self, error: bool);
}

/// Request bodies: counts their bytes.
impl FrameObserver for Arc<AtomicU64> {
    fn frame(&mut self, frame: &Frame<Bytes>) {
        if let Some(data) = frame.data_ref() {
            self.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
    }

    fn end(&mut self, _: bool) {}
}

/// Response bodies: counts their bytes, reads the gRPC status from trailers, and
/// finishes the record at the end.
impl FrameObserver for Option<RequestRecord> {
    fn frame(&mut self, frame: &Frame<Bytes>) {
        let Some(record) = self else { return };
        if let Some(data) = frame.data_ref() {
            record.response_bytes += data.len() as u64;
        } else if let Some(status) = frame
            .trailers_ref()
            .and_then(|t| t.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
        {
            record.labels.grpc_response_status = status.to_owned();
        }
    }

    fn end(&mut self, error: bool) {
        if error && let Some(record) = self {
            record.labels.response_flags = "UC";
        }
        self.take();
    }
}

/// A body passed through unchanged under the eye of a [`FrameObserver`].
pub struct ObservedBody<B, O> {
    /// The body passed on.
    pub inner: B,
    /// What sees its frames.
    pub observer: O,
}

impl<B, O> Body for ObservedBody<B, O>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    O: FrameObserver,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.observer.frame(&frame);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.observer.end(true);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.observer.end(false);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The client connection as hyper sees it: bytes read during detection first,
/// and every byte counted into the connection's metrics.
pub struct MeteredIo<S> {
    /// Bytes read before hyper took the connection, replayed first.
    pub prefix: Bytes,
    /// The connection.
    pub stream: S,
    /// Counts bytes from the client.
    pub received: ByteCounter,
    /// Counts bytes to the client.
    pub sent: ByteCounter,
}

impl<S: AsyncRead + Unpin> AsyncRead for MeteredIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            this.received.add(n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            this.received.add(buf.filled().len() - before);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for MeteredIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.stream).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = polled {
            this.sent.add(n);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled {
            this.sent.add(n);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
