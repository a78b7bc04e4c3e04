//! HTTP, gRPC, WebSocket and odd-protocol programs for the L7 tests. Servers say
//! who they are in `x-served-by`; clients print one JSON line of what they saw.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes};
use clap::Subcommand;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::Rng;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// The L7 subcommands.
#[derive(Subcommand)]
pub enum Cmd {
    /// HTTP/1.1 and HTTP/2 (prior knowledge) server. Paths: `/status/N`, `/delay/MS`,
    /// `/headers` (request headers as JSON), `/echo` (the body), `/ws` (WebSocket
    /// echo); anything else answers the server name.
    Web {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        name: String,
        /// Answer this share of requests (0-100) with `fail_status`.
        #[arg(long, default_value_t = 0)]
        fail_percent: u32,
        #[arg(long, default_value_t = 503)]
        fail_status: u16,
        /// Delay every answer by this much.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        /// Print one JSON line per request (method and path), e.g. to see mirrored copies.
        #[arg(long)]
        log: bool,
    },
    /// Sends `count` GETs (`concurrency` at a time, keep-alive) and reports status
    /// and server counts, latency percentiles and, with `--timeline`, every response.
    Load {
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 1)]
        count: usize,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        /// `name:value`, repeatable.
        #[arg(long)]
        header: Vec<String>,
        /// HTTP/2 with prior knowledge.
        #[arg(long)]
        h2: bool,
        #[arg(long)]
        timeline: bool,
        /// Pause between requests of one worker.
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
    },
    /// Server that speaks first: writes `banner` on accept, then echoes lines.
    BannerServer {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        banner: String,
    },
    /// Connects and waits for the banner without sending; reports it and how long it
    /// took, or how (`closed`, `reset`) and when the connection ended without one.
    BannerClient {
        #[arg(long)]
        to: SocketAddr,
    },
    /// Sends a request line, then one header byte every `interval_ms`; reports when
    /// and how the connection ended.
    Slowloris {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 500)]
        interval_ms: u64,
        #[arg(long, default_value_t = 30)]
        max_seconds: u64,
    },
    /// Sends raw bytes (`\r\n` escapes allowed) and reports the response's first line.
    Raw {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        data: String,
    },
    /// WebSocket client: sends `messages` text messages and checks each echo.
    WsClient {
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 10)]
        messages: usize,
    },
    /// gRPC server (service `nodemesh.test.Echo`: Unary, Stream, Fail).
    GrpcServer {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// gRPC client: one unary call, one bidirectional stream of `messages`, one failing call.
    GrpcClient {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 10)]
        messages: usize,
    },
}

/// Runs one L7 subcommand.
pub async fn run(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Web {
            listen,
            name,
            fail_percent,
            fail_status,
            delay_ms,
            log,
        } => {
            web(
                listen,
                Arc::new(WebConfig {
                    name,
                    fail_percent,
                    fail_status,
                    delay: Duration::from_millis(delay_ms),
                    log,
                }),
            )
            .await
        }
        Cmd::Load {
            url,
            count,
            concurrency,
            header,
            h2,
            timeline,
            interval_ms,
        } => {
            load(
                url,
                count,
                concurrency,
                header,
                h2,
                timeline,
                Duration::from_millis(interval_ms),
            )
            .await
        }
        Cmd::BannerServer { listen, banner } => banner_server(listen, banner).await,
        Cmd::BannerClient { to } => banner_client(to).await,
        Cmd::Slowloris {
            to,
            interval_ms,
            max_seconds,
        } => slowloris(to, interval_ms, max_seconds).await,
        Cmd::Raw { to, data } => raw(to, &data).await,
        Cmd::WsClient { url, messages } => ws_client(&url, messages).await,
        Cmd::GrpcServer { listen } => grpc_server(listen).await,
        Cmd::GrpcClient { to, messages } => grpc_client(to, messages).await,
    }
}

struct WebConfig {
    name: String,
    fail_percent: u32,
    fail_status: u16,
    delay: Duration,
    log: bool,
}

type WebBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<WebBody> {
    let mut resp = Response::new(Full::new(body.into()).map_err(|e| match e {}).boxed());
    *resp.status_mut() = status;
    resp
}

async fn web(listen: SocketAddr, config: Arc<WebConfig>) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("listening {listen}");
    let mut connections = 0u64;
    loop {
        let (stream, _) = listener.accept().await?;
        let config = config.clone();
        connections += 1;
        let connection = connections;
        tokio::spawn(async move {
            let service = service_fn(move |req| web_request(req, config.clone(), connection));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn web_request(
    mut req: Request<Incoming>,
    config: Arc<WebConfig>,
    connection: u64,
) -> Result<Response<WebBody>, Infallible> {
    let path = req.uri().path().to_owned();
    if config.log {
        println!("{}", json!({"method": req.method().as_str(), "path": path}));
    }
    if !config.delay.is_zero() {
        tokio::time::sleep(config.delay).await;
    }
    let mut resp = if path == "/ws" {
        websocket_echo(&mut req)
    } else if path == "/headers" {
        let headers: BTreeMap<String, String> = req
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
            .collect();
        text(StatusCode::OK, json!(headers).to_string())
    } else if config.fail_percent > 0 && rand::rng().random_range(0..100) < config.fail_percent {
        text(
            StatusCode::from_u16(config.fail_status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            "injected failure\n",
        )
    } else if let Some(code) = path.strip_prefix("/status/") {
        let status = code
            .parse()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::BAD_REQUEST);
        text(status, format!("{}\n", config.name))
    } else if let Some(ms) = path.strip_prefix("/delay/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
        text(StatusCode::OK, format!("{}\n", config.name))
    } else if path == "/echo" {
        match req.into_body().collect().await {
            Ok(body) => text(StatusCode::OK, body.to_bytes()),
            Err(_) => text(StatusCode::BAD_REQUEST, "bad body\n"),
        }
    } else {
        text(StatusCode::OK, format!("{}\n", config.name))
    };
    if let Ok(v) = config.name.parse() {
        resp.headers_mut().insert("x-served-by", v);
    }
    // Which of this server's connections carried the request: clients count them
    // to see whether connections are reused.
    resp.headers_mut().insert("x-connection", connection.into());
    Ok(resp)
}

/// Answers a WebSocket handshake and echoes messages on the upgraded connection.
fn websocket_echo(req: &mut Request<Incoming>) -> Response<WebBody> {
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        return text(StatusCode::BAD_REQUEST, "not a WebSocket handshake\n");
    };
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            None,
        )
        .await;
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_close() {
                break;
            }
            if ws.send(msg).await.is_err() {
                break;
            }
        }
    });
    let mut resp = text(StatusCode::SWITCHING_PROTOCOLS, Bytes::new());
    let h = resp.headers_mut();
    h.insert("connection", "upgrade".parse().expect("static"));
    h.insert("upgrade", "websocket".parse().expect("static"));
    h.insert(
        "sec-websocket-accept",
        derive_accept_key(key.as_bytes()).parse().expect("base64"),
    );
    resp
}

#[allow(clippy::too_many_arguments)]
async fn load(
    url: String,
    count: usize,
    concurrency: usize,
    headers: Vec<String>,
    h2: bool,
    timeline: bool,
    interval: Duration,
) -> anyhow::Result<()> {
    let uri: hyper::Uri = url.parse()?;
    let authority = uri
        .authority()
        .ok_or_else(|| anyhow::anyhow!("{url}: no host"))?
        .clone();
    let addr = SocketAddr::new(authority.host().parse()?, uri.port_u16().unwrap_or(80));
    let mut parsed = Vec::new();
    for h in &headers {
        let (k, v) = h
            .split_once(':')
            .ok_or_else(|| anyhow::anyhow!("header {h:?} is not name:value"))?;
        parsed.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    let parsed = Arc::new(parsed);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Connections this client opened: one per worker unless the server closed one.
    let dials = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (uri, parsed, next, authority, dials) = (
            uri.clone(),
            parsed.clone(),
            next.clone(),
            authority.clone(),
            dials.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut results = Vec::new();
            let mut sender: Option<Sender> = None;
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < count {
                if sender.as_ref().is_none_or(|s| s.is_closed()) {
                    dials.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    sender = connect_sender(addr, h2).await.ok();
                }
                let t0 = Instant::now();
                let outcome = match &mut sender {
                    None => Err("connect failed".to_owned()),
                    Some(s) => {
                        let mut req = Request::get(uri.clone());
                        if !h2 {
                            req = req.header("host", authority.as_str());
                        }
                        for (k, v) in parsed.iter() {
                            req = req.header(k.as_str(), v.as_str());
                        }
                        let req = req
                            .body(http_body_util::Empty::<Bytes>::new())
                            .expect("request");
                        s.send(req).await
                    }
                };
                let ms = t0.elapsed().as_secs_f64() * 1000.0;
                let at = started.elapsed().as_secs_f64() * 1000.0;
                if outcome.is_err() {
                    sender = None;
                }
                results.push((at, ms, outcome));
                if !interval.is_zero() {
                    tokio::time::sleep(interval).await;
                }
            }
            results
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await?);
    }
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    let mut by_server: BTreeMap<String, usize> = BTreeMap::new();
    let mut errors = Vec::new();
    let mut lat: Vec<f64> = Vec::new();
    let mut events = Vec::new();
    let mut connections = std::collections::BTreeSet::new();
    for (at, ms, outcome) in &all {
        match outcome {
            Ok((status, server, connection)) => {
                connections.insert((server.clone(), connection.clone()));
                *by_status.entry(status.to_string()).or_default() += 1;
                *by_server.entry(server.clone()).or_default() += 1;
                lat.push(*ms);
                if timeline {
                    events.push(json!([at, status, server]));
                }
            }
            Err(e) => {
                *by_status.entry("error".into()).or_default() += 1;
                if errors.len() < 5 {
                    errors.push(e.clone());
                }
                if timeline {
                    events.push(json!([at, 0, "error"]));
                }
            }
        }
    }
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    println!(
        "{}",
        json!({
            "count": all.len(),
            "by_status": by_status,
            "by_server": by_server,
            "server_connections": connections.len(),
            "client_connections": dials.load(std::sync::atomic::Ordering::Relaxed),
            "errors": errors,
            "p50_ms": pct(0.5),
            "p99_ms": pct(0.99),
            "max_ms": lat.last().copied().unwrap_or(0.0),
            "timeline": events,
        })
    );
    Ok(())
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<http_body_util::Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<http_body_util::Empty<Bytes>>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }

    /// Sends one request and reads the whole response: (status, x-served-by).
    async fn send(
        &mut self,
        req: Request<http_body_util::Empty<Bytes>>,
    ) -> Result<(u16, String, String), String> {
        let resp = match self {
            Sender::H1(s) => {
                s.ready().await.map_err(|e| e.to_string())?;
                s.send_request(req).await
            }
            Sender::H2(s) => {
                s.ready().await.map_err(|e| e.to_string())?;
                s.send_request(req).await
            }
        }
        .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned()
        };
        let (server, connection) = (header("x-served-by"), header("x-connection"));
        resp.into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        Ok((status, server, connection))
    }
}

async fn connect_sender(addr: SocketAddr, h2: bool) -> anyhow::Result<Sender> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let io = TokioIo::new(stream);
    if h2 {
        let (s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        Ok(Sender::H2(s))
    } else {
        let (s, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn.with_upgrades());
        Ok(Sender::H1(s))
    }
}

async fn banner_server(listen: SocketAddr, banner: String) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("listening {listen}");
    loop {
        let (mut stream, _) = listener.accept().await?;
        let banner = banner.clone();
        tokio::spawn(async move {
            if stream
                .write_all(format!("{banner}\r\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
            let (r, mut w) = stream.split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if w.write_all(format!("{line}\r\n").as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}

async fn banner_client(to: SocketAddr) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let stream = TcpStream::connect(to).await?;
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    // A connection ended before any banner is reported, not an error: a
    // refusal is what some callers expect.
    let banner = match tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await? {
        Ok(Some(line)) => line,
        end => {
            let ended = match end {
                Ok(_) => "closed",
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => "reset",
                Err(_) => "error",
            };
            let ended_ms = t0.elapsed().as_secs_f64() * 1000.0;
            println!(
                "{}",
                json!({"banner": "", "ended": ended, "ended_ms": ended_ms})
            );
            return Ok(());
        }
    };
    let banner_ms = t0.elapsed().as_secs_f64() * 1000.0;
    w.write_all(b"ping\r\n").await?;
    let echo = tokio::time::timeout(Duration::from_secs(5), lines.next_line())
        .await??
        .unwrap_or_default();
    println!(
        "{}",
        json!({"banner": banner, "banner_ms": banner_ms, "echo": echo})
    );
    Ok(())
}

async fn slowloris(to: SocketAddr, interval_ms: u64, max_seconds: u64) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let mut stream = TcpStream::connect(to).await?;
    stream
        .write_all(b"GET /slow HTTP/1.1\r\nHost: slow\r\nX-Slow: ")
        .await?;
    let mut response = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = t0 + Duration::from_secs(max_seconds);
    let how = loop {
        if Instant::now() > deadline {
            break "still open";
        }
        match tokio::time::timeout(Duration::from_millis(interval_ms), stream.read(&mut buf)).await
        {
            Ok(Ok(0)) => break "closed",
            Ok(Ok(n)) => response.extend_from_slice(&buf[..n]),
            Ok(Err(_)) => break "reset",
            Err(_) => {
                if stream.write_all(b"a").await.is_err() {
                    break "reset";
                }
            }
        }
    };
    let first = String::from_utf8_lossy(&response)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned();
    println!(
        "{}",
        json!({"ended": how, "after_ms": t0.elapsed().as_secs_f64() * 1000.0, "response": first})
    );
    Ok(())
}

async fn raw(to: SocketAddr, data: &str) -> anyhow::Result<()> {
    let bytes = data.replace("\\r", "\r").replace("\\n", "\n");
    let mut stream = TcpStream::connect(to).await?;
    stream.write_all(bytes.as_bytes()).await?;
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response)).await;
    let first = String::from_utf8_lossy(&response)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned();
    println!("{}", json!({"response": first, "bytes": response.len()}));
    Ok(())
}

async fn ws_client(url: &str, messages: usize) -> anyhow::Result<()> {
    let (mut ws, resp) = tokio_tungstenite::connect_async(url).await?;
    let status = resp.status().as_u16();
    let mut echoed = 0;
    for i in 0..messages {
        let msg = format!("message {i}");
        ws.send(Message::text(msg.clone())).await?;
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await? {
            Some(Ok(Message::Text(t))) if t.as_str() == msg => echoed += 1,
            other => anyhow::bail!("bad echo for {msg:?}: {other:?}"),
        }
    }
    ws.close(None).await?;
    println!("{}", json!({"status": status, "echoed": echoed}));
    Ok(())
}

/// gRPC messages as raw bytes: the tests need the framing, not protobuf.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

struct UnaryEcho;

impl tonic::server::UnaryService<Vec<u8>> for UnaryEcho {
    type Response = Vec<u8>;
    type Future = std::future::Ready<Result<tonic::Response<Vec<u8>>, Status>>;

    fn call(&mut self, req: tonic::Request<Vec<u8>>) -> Self::Future {
        std::future::ready(Ok(tonic::Response::new(req.into_inner())))
    }
}

struct Failing;

impl tonic::server::UnaryService<Vec<u8>> for Failing {
    type Response = Vec<u8>;
    type Future = std::future::Ready<Result<tonic::Response<Vec<u8>>, Status>>;

    fn call(&mut self, _: tonic::Request<Vec<u8>>) -> Self::Future {
        std::future::ready(Err(Status::unavailable("told to fail")))
    }
}

struct StreamEcho;

type EchoStream = Pin<Box<dyn futures_util::Stream<Item = Result<Vec<u8>, Status>> + Send>>;

impl tonic::server::StreamingService<Vec<u8>> for StreamEcho {
    type Response = Vec<u8>;
    type ResponseStream = EchoStream;
    type Future = std::future::Ready<Result<tonic::Response<EchoStream>, Status>>;

    fn call(&mut self, req: tonic::Request<tonic::Streaming<Vec<u8>>>) -> Self::Future {
        std::future::ready(Ok(tonic::Response::new(Box::pin(req.into_inner()))))
    }
}

async fn grpc_server(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("listening {listen}");
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let service = service_fn(|req: Request<Incoming>| async move {
                let mut grpc = tonic::server::Grpc::new(RawCodec);
                let resp = match req.uri().path() {
                    "/nodemesh.test.Echo/Unary" => grpc.unary(UnaryEcho, req).await,
                    "/nodemesh.test.Echo/Stream" => grpc.streaming(StreamEcho, req).await,
                    "/nodemesh.test.Echo/Fail" => grpc.unary(Failing, req).await,
                    other => Status::unimplemented(other.to_owned()).into_http(),
                };
                Ok::<_, Infallible>(resp)
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn grpc_client(to: SocketAddr, messages: usize) -> anyhow::Result<()> {
    use tonic::codegen::http::uri::PathAndQuery;
    let channel = tonic::transport::Channel::from_shared(format!("http://{to}"))?
        .connect()
        .await?;
    let mut grpc = tonic::client::Grpc::new(channel);

    grpc.ready().await?;
    let unary = grpc
        .unary(
            tonic::Request::new(b"hello grpc".to_vec()),
            PathAndQuery::from_static("/nodemesh.test.Echo/Unary"),
            RawCodec,
        )
        .await?
        .into_inner();

    grpc.ready().await?;
    let outbound = futures_util::stream::iter(
        (0..messages).map(|i| format!("stream message {i}").into_bytes()),
    );
    let mut inbound = grpc
        .streaming(
            tonic::Request::new(outbound),
            PathAndQuery::from_static("/nodemesh.test.Echo/Stream"),
            RawCodec,
        )
        .await?
        .into_inner();
    let mut streamed = 0;
    while let Some(m) = inbound.message().await? {
        anyhow::ensure!(
            m == format!("stream message {streamed}").into_bytes(),
            "stream message {streamed} corrupted"
        );
        streamed += 1;
    }

    grpc.ready().await?;
    let failed = grpc
        .unary::<Vec<u8>, Vec<u8>, _>(
            tonic::Request::new(Vec::new()),
            PathAndQuery::from_static("/nodemesh.test.Echo/Fail"),
            RawCodec,
        )
        .await
        .err()
        .map(|s| s.code() as i32);
    println!(
        "{}",
        json!({
            "unary": String::from_utf8_lossy(&unary),
            "streamed": streamed,
            "fail_code": failed,
        })
    );
    Ok(())
}
