//! `loadgen`: the benchmark's load generator, run inside the client pod so its
//! connections take the same path an application's would. Prints one JSON
//! report, including its own CPU time, so it can be shown not to be the bottleneck.
//!
//! Open-loop mode sends at a constant rate and measures latency the way wrk2
//! does: when a request could not be sent on time because the connection was
//! still busy with an earlier one, its latency counts from the time it was
//! scheduled, not from when it was finally sent (coordinated omission).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Constant request rate over keep-alive connections (open loop).
    Rate {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value = "/bytes/1024")]
        path: String,
        #[arg(long)]
        rps: u64,
        #[arg(long)]
        seconds: f64,
        #[arg(long, default_value_t = 16)]
        connections: usize,
        #[arg(long, default_value_t = 1.0)]
        warmup_seconds: f64,
    },
    /// As many requests as the path carries, back to back on each connection (closed loop).
    Max {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value = "/bytes/1024")]
        path: String,
        #[arg(long, default_value_t = 64)]
        connections: usize,
        #[arg(long)]
        seconds: f64,
    },
    /// Bulk TCP: write as fast as possible to a sink on `streams` connections.
    Bulk {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1)]
        streams: usize,
        #[arg(long)]
        seconds: f64,
    },
    /// New connections: connect, one request, close, `concurrency` loops at once.
    Connect {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value = "/bytes/1024")]
        path: String,
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        #[arg(long)]
        seconds: f64,
    },
}

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let cpu_before = self_cpu_seconds();
    let mut report = runtime.block_on(async {
        match Cli::parse().mode {
            Mode::Rate {
                to,
                path,
                rps,
                seconds,
                connections,
                warmup_seconds,
            } => rate(to, path, rps, seconds, connections, warmup_seconds).await,
            Mode::Max {
                to,
                path,
                connections,
                seconds,
            } => max(to, path, connections, seconds).await,
            Mode::Bulk {
                to,
                streams,
                seconds,
            } => bulk(to, streams, seconds).await,
            Mode::Connect {
                to,
                path,
                concurrency,
                seconds,
            } => connect_rate(to, path, concurrency, seconds).await,
        }
    })?;
    report["loadgen_cpu_seconds"] = json!(self_cpu_seconds() - cpu_before);
    println!("{report}");
    Ok(())
}

/// User + system CPU of this process.
fn self_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn http_connection(to: SocketAddr) -> anyhow::Result<Sender> {
    let stream = TcpStream::connect(to).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// One GET on an open connection; the body is read to the end.
async fn get(sender: &mut Sender, to: SocketAddr, path: &str) -> anyhow::Result<()> {
    sender.ready().await?;
    let req = Request::get(path)
        .header("host", to.to_string())
        .body(Empty::new())?;
    let resp = sender.send_request(req).await?;
    anyhow::ensure!(resp.status().is_success(), "HTTP {}", resp.status());
    resp.into_body().collect().await?;
    Ok(())
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs to 60 s at 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

fn latency_report(h: &Histogram<u64>) -> serde_json::Value {
    json!({
        "count": h.len(),
        "p50_us": h.value_at_quantile(0.50),
        "p90_us": h.value_at_quantile(0.90),
        "p99_us": h.value_at_quantile(0.99),
        "p999_us": h.value_at_quantile(0.999),
        "max_us": h.max(),
        "mean_us": h.mean(),
    })
}

async fn rate(
    to: SocketAddr,
    path: String,
    rps: u64,
    seconds: f64,
    connections: usize,
    warmup: f64,
) -> anyhow::Result<serde_json::Value> {
    let interval = Duration::from_secs_f64(1.0 / rps as f64);
    let total = ((seconds + warmup) * rps as f64) as u64;
    let warmup_requests = (warmup * rps as f64) as u64;
    let start = Instant::now() + Duration::from_millis(100);
    let path = Arc::new(path);
    let mut tasks = Vec::new();
    for c in 0..connections {
        let mut sender = http_connection(to).await?;
        let path = path.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = new_histogram();
            let mut errors = 0u64;
            let mut last_done = start;
            let mut k = c as u64;
            while k < total {
                let scheduled = start + interval * k as u32;
                tokio::time::sleep_until(scheduled).await;
                // If the previous response on this connection came back after this
                // request was due, the request was held up by the system under test:
                // count from the schedule. Otherwise count from the actual send, so
                // timer granularity is not charged to the path being measured.
                let sent = Instant::now();
                let from = if last_done > scheduled {
                    scheduled
                } else {
                    sent
                };
                match get(&mut sender, to, &path).await {
                    Ok(()) => {
                        last_done = Instant::now();
                        if k >= warmup_requests {
                            let us = (last_done - from).as_micros() as u64;
                            h.record(us.max(1)).ok();
                        }
                    }
                    Err(_) => {
                        errors += 1;
                        last_done = Instant::now();
                        if let Ok(s) = http_connection(to).await {
                            sender = s;
                        }
                    }
                }
                k += connections as u64;
            }
            (h, errors)
        }));
    }
    let mut all = new_histogram();
    let mut errors = 0;
    for t in tasks {
        let (h, e) = t.await?;
        all.add(&h)?;
        errors += e;
    }
    let elapsed = seconds;
    let mut report = latency_report(&all);
    report["errors"] = json!(errors);
    report["target_rps"] = json!(rps);
    report["achieved_rps"] = json!(all.len() as f64 / elapsed);
    report["connections"] = json!(connections);
    Ok(report)
}

async fn max(
    to: SocketAddr,
    path: String,
    connections: usize,
    seconds: f64,
) -> anyhow::Result<serde_json::Value> {
    let stop = Arc::new(AtomicBool::new(false));
    let path = Arc::new(path);
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let mut sender = http_connection(to).await?;
        let (stop, path) = (stop.clone(), path.clone());
        tasks.push(tokio::spawn(async move {
            let mut h = new_histogram();
            let mut errors = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                match get(&mut sender, to, &path).await {
                    Ok(()) => {
                        h.record((sent.elapsed().as_micros() as u64).max(1)).ok();
                    }
                    Err(_) => {
                        errors += 1;
                        match http_connection(to).await {
                            Ok(s) => sender = s,
                            Err(_) => break,
                        }
                    }
                }
            }
            (h, errors)
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = new_histogram();
    let mut errors = 0;
    for t in tasks {
        let (h, e) = t.await?;
        all.add(&h)?;
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut report = latency_report(&all);
    report["errors"] = json!(errors);
    report["rps"] = json!(all.len() as f64 / elapsed);
    report["connections"] = json!(connections);
    Ok(report)
}

async fn bulk(to: SocketAddr, streams: usize, seconds: f64) -> anyhow::Result<serde_json::Value> {
    let sent = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for _ in 0..streams {
        let mut stream = TcpStream::connect(to).await?;
        let sent = sent.clone();
        tasks.push(tokio::spawn(async move {
            let chunk = vec![0x5au8; 256 * 1024];
            while Instant::now() < deadline {
                stream.write_all(&chunk).await?;
                sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
            stream.shutdown().await?;
            anyhow::Ok(())
        }));
    }
    let started = Instant::now();
    for t in tasks {
        t.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let bytes = sent.load(Ordering::Relaxed);
    Ok(json!({
        "streams": streams,
        "bytes": bytes,
        "gbit_per_s": bytes as f64 * 8.0 / elapsed / 1e9,
    }))
}

async fn connect_rate(
    to: SocketAddr,
    path: String,
    concurrency: usize,
    seconds: f64,
) -> anyhow::Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let path = Arc::new(path);
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let path = path.clone();
        tasks.push(tokio::spawn(async move {
            let (mut done, mut errors) = (0u64, 0u64);
            while Instant::now() < deadline {
                let result = async {
                    let mut sender = http_connection(to).await?;
                    get(&mut sender, to, &path).await
                }
                .await;
                match result {
                    Ok(()) => done += 1,
                    Err(_) => errors += 1,
                }
            }
            (done, errors)
        }));
    }
    let started = Instant::now();
    let (mut done, mut errors) = (0, 0);
    for t in tasks {
        let (d, e) = t.await?;
        done += d;
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok(json!({
        "concurrency": concurrency,
        "connections": done,
        "errors": errors,
        "connections_per_s": done as f64 / elapsed,
    }))
}
