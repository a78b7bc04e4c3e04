//! `podtool`: the programs the tests and the demo run inside pods. Every client
//! subcommand prints one JSON line describing what it saw, so tests assert on
//! facts (bytes, hashes, errors) rather than on exit codes alone.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use nodemesh_testkit::pattern;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[path = "podtool/l7.rs"]
mod l7;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    #[command(flatten)]
    L7(l7::Cmd),
    /// HTTP/1.1 server: `/bytes/N` returns N pattern bytes, `/whoami` the client address.
    Http {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// TCP sink: reads and discards everything (bulk throughput target).
    Sink {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// TCP echo server; half-closes after echoing everything.
    Echo {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Sends N pattern bytes through an echo server while reading them back; reports hashes.
    Stream {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        bytes: u64,
    },
    /// Opens `count` connections (`concurrency` at a time), each echoing one line.
    Connect {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: usize,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        /// Keep each connection open this long after its echo, so they overlap.
        #[arg(long, default_value_t = 0)]
        hold_ms: u64,
    },
    /// Holds one echo connection for `seconds`, pinging every `interval_ms`.
    Hold {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        seconds: f64,
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
    },
    /// UDP echo server.
    UdpEcho {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Sends one UDP datagram on a connected socket and waits for the echo.
    UdpPing {
        #[arg(long)]
        to: SocketAddr,
    },
    /// For `seconds`: holds `streams` echo streams with bytes flowing both ways
    /// and opens `rate` short echo connections per second; prints a `started`
    /// line, then reports every failure and whether each stream came back
    /// byte-exact (what an upgrade or a soak must not break).
    TcpLoad {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 0)]
        streams: usize,
        #[arg(long, default_value_t = 0)]
        rate: u32,
        #[arg(long)]
        seconds: f64,
        /// Bytes each stream sends (and expects back) per round.
        #[arg(long, default_value_t = 4096)]
        chunk: usize,
        /// Pause between a stream's rounds.
        #[arg(long, default_value_t = 50)]
        interval_ms: u64,
        /// Print a JSON progress line every second.
        #[arg(long)]
        progress: bool,
    },
    /// Connects, sends a line, and reports how the connection ended and how fast.
    Probe {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
}

// Two workers: servers use both cores as an application server would.
#[tokio::main(worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    // Load and soak runs hold thousands of sockets: use the hard limit.
    raise_fd_limit();
    match Cli::parse().command {
        Cmd::L7(cmd) => l7::run(cmd).await,
        Cmd::Http { listen } => http_server(listen).await,
        Cmd::Echo { listen } => echo_server(listen).await,
        Cmd::Sink { listen } => sink_server(listen).await,
        Cmd::Stream { to, bytes } => stream(to, bytes).await,
        Cmd::Connect {
            to,
            count,
            concurrency,
            hold_ms,
        } => connect_many(to, count, concurrency, Duration::from_millis(hold_ms)).await,
        Cmd::Hold {
            to,
            seconds,
            interval_ms,
        } => hold(to, seconds, interval_ms).await,
        Cmd::Probe { to, timeout_ms } => probe(to, timeout_ms).await,
        Cmd::TcpLoad {
            to,
            streams,
            rate,
            seconds,
            chunk,
            interval_ms,
            progress,
        } => {
            let shape = StreamShape {
                chunk,
                interval: Duration::from_millis(interval_ms),
            };
            load(
                to,
                streams,
                rate,
                Duration::from_secs_f64(seconds),
                shape,
                progress,
            )
            .await
        }
        Cmd::UdpEcho { listen } => udp_echo(listen).await,
        Cmd::UdpPing { to } => udp_ping(to).await,
    }
}

fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit on this process with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn report(value: serde_json::Value) {
    println!("{value}");
}

async fn http_server(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("listening {listen}");
    loop {
        let (stream, peer) = listener.accept().await?;
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| async move {
                let path = req.uri().path().to_owned();
                let body = if let Some(n) = path.strip_prefix("/bytes/") {
                    pattern(n.parse().unwrap_or(0), 0)
                } else if path == "/whoami" {
                    peer.to_string().into_bytes()
                } else {
                    b"hello from podtool\n".to_vec()
                };
                Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(body))))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn echo_server(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("listening {listen}");
    loop {
        let (mut stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let (mut r, mut w) = stream.split();
            if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                let _ = w.shutdown().await;
            }
        });
    }
}

async fn sink_server(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("listening {listen}");
    loop {
        let (mut stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let mut buf = vec![0u8; 256 * 1024];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        });
    }
}

async fn stream(to: SocketAddr, total: u64) -> anyhow::Result<()> {
    let started = Instant::now();
    let stream = TcpStream::connect(to).await?;
    let (mut r, mut w) = stream.into_split();
    let writer = tokio::spawn(async move {
        let mut hasher = Sha256::new();
        let mut sent = 0u64;
        const CHUNK: u64 = 64 * 1024;
        while sent < total {
            let n = CHUNK.min(total - sent);
            let chunk = pattern(n as usize, sent);
            hasher.update(&chunk);
            w.write_all(&chunk).await?;
            sent += n;
        }
        w.shutdown().await?;
        anyhow::Ok((sent, hex::encode(hasher.finalize())))
    });
    let mut hasher = Sha256::new();
    let mut received = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    let read_error = loop {
        match r.read(&mut buf).await {
            Ok(0) => break None,
            Ok(n) => {
                hasher.update(&buf[..n]);
                received += n as u64;
            }
            Err(e) => break Some(e.to_string()),
        }
    };
    let (sent, sent_sha) = writer.await??;
    report(json!({
        "sent": sent,
        "received": received,
        "sent_sha256": sent_sha,
        "received_sha256": hex::encode(hasher.finalize()),
        "error": read_error,
        "seconds": started.elapsed().as_secs_f64(),
    }));
    Ok(())
}

async fn echo_once(to: SocketAddr, hold: Duration) -> anyhow::Result<()> {
    let mut stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(to)).await??;
    stream.write_all(b"ping\n").await?;
    if !hold.is_zero() {
        let mut echoed = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut echoed)).await??;
        anyhow::ensure!(&echoed == b"ping\n", "bad echo {echoed:?}");
        tokio::time::sleep(hold).await;
        stream.shutdown().await?;
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await??;
        anyhow::ensure!(rest.is_empty(), "unexpected bytes after the echo");
        return Ok(());
    }
    stream.shutdown().await?;
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut reply)).await??;
    anyhow::ensure!(reply == b"ping\n", "bad echo {reply:?}");
    Ok(())
}

async fn connect_many(
    to: SocketAddr,
    count: usize,
    concurrency: usize,
    hold: Duration,
) -> anyhow::Result<()> {
    let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut tasks = Vec::with_capacity(count);
    for _ in 0..count {
        let permit = semaphore.clone().acquire_owned().await?;
        tasks.push(tokio::spawn(async move {
            let result = echo_once(to, hold).await;
            drop(permit);
            result
        }));
    }
    let (mut ok, mut errors) = (0usize, Vec::new());
    for t in tasks {
        match t.await? {
            Ok(()) => ok += 1,
            Err(e) => errors.push(e.to_string()),
        }
    }
    errors.truncate(5);
    report(json!({"ok": ok, "failed": count - ok, "errors": errors}));
    Ok(())
}

async fn hold(to: SocketAddr, seconds: f64, interval_ms: u64) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(to).await?;
    let local = stream.local_addr()?;
    println!("{}", json!({"connected": true, "local": local.to_string()}));
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut pings = 0u64;
    let mut error = None;
    let mut buf = [0u8; 16];
    while Instant::now() < deadline {
        let line = format!("{:015}\n", pings);
        if let Err(e) = stream.write_all(line.as_bytes()).await {
            error = Some(format!("write: {e}"));
            break;
        }
        match tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut buf)).await {
            Ok(Ok(_)) if buf[..] == *line.as_bytes() => pings += 1,
            Ok(Ok(_)) => {
                error = Some("echo mismatch".into());
                break;
            }
            Ok(Err(e)) => {
                error = Some(format!("read: {e}"));
                break;
            }
            Err(_) => {
                error = Some("echo timed out".into());
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(interval_ms)).await;
    }
    report(json!({"pings": pings, "error": error}));
    Ok(())
}

/// How a long-lived stream of `tcp-load` talks.
#[derive(Clone, Copy)]
struct StreamShape {
    chunk: usize,
    interval: Duration,
}

/// Running totals of `tcp-load`, for its progress lines and report.
#[derive(Default)]
struct LoadCounts {
    connections_ok: AtomicUsize,
    connections_failed: AtomicUsize,
    streams_open: AtomicUsize,
    streams_failed: AtomicUsize,
}

/// One long-lived stream: `chunk` bytes each way every `interval` until
/// `until`, then a half-close; returns the bytes echoed once every one came
/// back in order.
async fn load_stream(
    to: SocketAddr,
    until: Instant,
    shape: StreamShape,
    counts: Arc<LoadCounts>,
) -> anyhow::Result<u64> {
    let mut stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(to)).await??;
    counts.streams_open.fetch_add(1, Ordering::Relaxed);
    let _open = Decrement(&counts.streams_open);
    let mut offset = 0u64;
    let mut echoed = vec![0u8; shape.chunk];
    while Instant::now() < until {
        let chunk = pattern(shape.chunk, offset);
        stream.write_all(&chunk).await?;
        tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut echoed)).await??;
        anyhow::ensure!(echoed == chunk, "echo differs at byte {offset}");
        offset += shape.chunk as u64;
        tokio::time::sleep(shape.interval).await;
    }
    stream.shutdown().await?;
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await??;
    anyhow::ensure!(rest.is_empty(), "{} bytes after the half-close", rest.len());
    Ok(offset)
}

/// Decrements a gauge when dropped.
struct Decrement<'a>(&'a AtomicUsize);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One short connection: connect, one line each way, close.
async fn load_connection(to: SocketAddr) -> anyhow::Result<()> {
    let mut stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(to)).await??;
    stream.write_all(b"ping\n").await?;
    let mut echoed = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut echoed)).await??;
    anyhow::ensure!(&echoed == b"ping\n", "bad echo {echoed:?}");
    Ok(())
}

async fn load(
    to: SocketAddr,
    streams: usize,
    rate: u32,
    duration: Duration,
    shape: StreamShape,
    progress: bool,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let until = started + duration;
    let counts = Arc::new(LoadCounts::default());
    let long: Vec<_> = (0..streams)
        .map(|_| {
            let counts = counts.clone();
            tokio::spawn(async move {
                let result = load_stream(to, until, shape, counts.clone()).await;
                if result.is_err() {
                    counts.streams_failed.fetch_add(1, Ordering::Relaxed);
                }
                result
            })
        })
        .collect();
    println!("{}", json!({"started": true}));
    let reporter = progress.then(|| {
        let counts = counts.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                println!(
                    "{}",
                    json!({
                        "t": started.elapsed().as_secs_f64(),
                        "connections_ok": counts.connections_ok.load(Ordering::Relaxed),
                        "connections_failed": counts.connections_failed.load(Ordering::Relaxed),
                        "streams_open": counts.streams_open.load(Ordering::Relaxed),
                        "streams_failed": counts.streams_failed.load(Ordering::Relaxed),
                    })
                );
            }
        })
    });
    let mut short = Vec::new();
    if rate > 0 {
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        while Instant::now() < until {
            tick.tick().await;
            let counts = counts.clone();
            short.push(tokio::spawn(async move {
                let result = load_connection(to).await;
                let counter = if result.is_ok() {
                    &counts.connections_ok
                } else {
                    &counts.connections_failed
                };
                counter.fetch_add(1, Ordering::Relaxed);
                result
            }));
        }
    }
    let mut errors = Vec::new();
    let (mut connections_ok, mut streams_ok, mut stream_bytes) = (0usize, 0usize, 0u64);
    let connections = short.len();
    for t in short {
        match t.await? {
            Ok(()) => connections_ok += 1,
            Err(e) => errors.push(format!("connection: {e}")),
        }
    }
    for t in long {
        match t.await? {
            Ok(bytes) => {
                streams_ok += 1;
                stream_bytes += bytes;
            }
            Err(e) => errors.push(format!("stream: {e}")),
        }
    }
    if let Some(r) = reporter {
        r.abort();
    }
    errors.truncate(10);
    report(json!({
        "connections": connections,
        "connections_failed": connections - connections_ok,
        "streams": streams,
        "streams_failed": streams - streams_ok,
        "stream_bytes": stream_bytes,
        "errors": errors,
    }));
    Ok(())
}

async fn probe(to: SocketAddr, timeout_ms: u64) -> anyhow::Result<()> {
    let started = Instant::now();
    let outcome = tokio::time::timeout(Duration::from_millis(timeout_ms), async {
        let mut stream = match TcpStream::connect(to).await {
            Ok(s) => s,
            Err(e) => return format!("connect_error: {:?}", e.kind()),
        };
        if let Err(e) = stream.write_all(b"hello\n").await {
            return format!("write_error: {:?}", e.kind());
        }
        let mut buf = [0u8; 64];
        match stream.read(&mut buf).await {
            Ok(0) => "eof".to_owned(),
            Ok(_) => "data".to_owned(),
            Err(e) => format!("read_error: {:?}", e.kind()),
        }
    })
    .await
    .unwrap_or_else(|_| "timeout".to_owned());
    report(json!({"outcome": outcome, "elapsed_ms": started.elapsed().as_millis() as u64}));
    Ok(())
}

async fn udp_echo(listen: SocketAddr) -> anyhow::Result<()> {
    let socket = tokio::net::UdpSocket::bind(listen).await?;
    println!("listening {listen}");
    let mut buf = [0u8; 2048];
    loop {
        let (n, peer) = socket.recv_from(&mut buf).await?;
        socket.send_to(&buf[..n], peer).await?;
    }
}

async fn udp_ping(to: SocketAddr) -> anyhow::Result<()> {
    let local: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse()?;
    let socket = tokio::net::UdpSocket::bind(local).await?;
    // connect() on a UDP socket runs the cgroup connect hooks too: they must leave it alone.
    socket.connect(to).await?;
    socket.send(b"ping").await?;
    let mut buf = [0u8; 16];
    let echoed = tokio::time::timeout(Duration::from_secs(3), socket.recv(&mut buf))
        .await
        .map(|r| r.map(|n| buf[..n] == *b"ping"));
    report(json!({"echoed": matches!(echoed, Ok(Ok(true)))}));
    Ok(())
}
