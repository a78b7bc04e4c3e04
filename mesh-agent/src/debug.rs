//! `mesh-agent debug <what>`: the admin endpoint's views as readable tables.

use std::fmt::Write as _;
use std::net::SocketAddr;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::Value;

use crate::connections::ConnectionView;

/// What `mesh-agent debug` can show.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum View {
    /// Configured workloads and their enrollment state.
    Workloads,
    /// In-pod listeners.
    Listeners,
    /// Attached eBPF programs.
    Programs,
    /// Capture maps and how full they are.
    Maps,
    /// Live connections.
    Connections,
    /// The last connections that failed, with why (`response_flags` and reason code).
    Failed,
    /// Workload certificates: identity, serial, expiry, state.
    Certificates,
    /// Tunnel connection pool: connections and streams per peer.
    Pool,
    /// Service ports: VIPs, protocol, load balancer and attached HTTPRoutes.
    Routes,
    /// Service endpoints with health, ejections, pending requests and latency.
    Endpoints,
    /// Raw Prometheus metrics.
    Metrics,
    /// The whole config dump as JSON.
    Config,
    /// Every decision for one request: `explain <source> <destination>`.
    Explain,
    /// The kernel's capture and steering verdicts for one workload, live:
    /// `trace <workload> [--seconds N]`.
    Trace,
}

/// Sends `GET path` to the admin endpoint; the body is read by the caller,
/// whole or as it streams.
async fn get(
    admin: SocketAddr,
    path: &str,
) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
    let stream = tokio::net::TcpStream::connect(admin)
        .await
        .with_context(|| {
            format!("connecting to the agent's admin endpoint at {admin} (is mesh-agent running?)")
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", admin.to_string())
        .body(Empty::<Bytes>::new())?;
    Ok(sender.send_request(req).await?)
}

/// GETs `path` from the admin endpoint.
pub async fn fetch(admin: SocketAddr, path: &str) -> anyhow::Result<String> {
    let resp = get(admin, path).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    let text = String::from_utf8_lossy(&body).into_owned();
    if !status.is_success() {
        bail!("{path}: HTTP {status}: {text}");
    }
    Ok(text)
}

/// Renders one view.
pub async fn render(admin: SocketAddr, view: View) -> anyhow::Result<String> {
    match view {
        View::Metrics => fetch(admin, "/metrics").await,
        View::Connections | View::Failed => {
            let path = match view {
                View::Failed => "/connections?failed",
                _ => "/connections",
            };
            let conns: Vec<ConnectionView> = serde_json::from_str(&fetch(admin, path).await?)?;
            let rows = conns
                .iter()
                .map(|c| {
                    let mut row = vec![
                        c.reporter.clone(),
                        c.security.clone(),
                        c.source_workload.clone(),
                        c.original_destination.clone(),
                        c.destination_workload.clone().unwrap_or_else(|| "-".into()),
                        c.bytes_received.to_string(),
                        c.bytes_sent.to_string(),
                        c.path.clone(),
                        format!("{:.1}s", c.age_seconds),
                    ];
                    if let View::Failed = view {
                        row.push(c.response_flags.clone());
                        row.push(
                            c.reason
                                .and_then(|r| serde_json::to_value(r).ok())
                                .map(|v| s(&v))
                                .unwrap_or_else(|| "-".into()),
                        );
                    }
                    row
                })
                .collect();
            let mut headers = vec![
                "REPORTER",
                "SECURITY",
                "SOURCE",
                "ORIGINAL DST",
                "DST WORKLOAD",
                "BYTES OUT",
                "BYTES IN",
                "CARRIED BY",
                "AGE",
            ];
            if let View::Failed = view {
                headers.extend(["FLAGS", "REASON"]);
            }
            Ok(table(&headers, rows))
        }
        View::Explain => bail!("explain needs a source and a destination"),
        View::Trace => bail!("trace needs a workload"),
        other => {
            let dump: Value = serde_json::from_str(&fetch(admin, "/config_dump").await?)?;
            Ok(render_dump(&dump, other))
        }
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn render_dump(dump: &Value, view: View) -> String {
    let list = |key: &str| dump[key].as_array().cloned().unwrap_or_default();
    match view {
        View::Workloads => table(
            &[
                "WORKLOAD",
                "STATE",
                "CGROUP ID",
                "NETNS COOKIE",
                "PRINCIPAL",
                "ERROR",
            ],
            list("workloads")
                .iter()
                .map(|w| {
                    vec![
                        s(&w["workload"]),
                        s(&w["state"]),
                        s(&w["cgroupId"]),
                        s(&w["netnsCookie"]),
                        s(&w["principal"]),
                        s(&w["error"]),
                    ]
                })
                .collect(),
        ),
        View::Listeners => table(
            &["WORKLOAD", "ADDRESS", "NETNS COOKIE"],
            list("listeners")
                .iter()
                .map(|l| vec![s(&l["workload"]), s(&l["address"]), s(&l["netnsCookie"])])
                .collect(),
        ),
        View::Programs => table(
            &["PROGRAM", "HOOK", "ID", "CGROUP"],
            list("programs")
                .iter()
                .map(|p| vec![s(&p["name"]), s(&p["hook"]), s(&p["id"]), s(&p["cgroup"])])
                .collect(),
        ),
        View::Maps => table(
            &["MAP", "ENTRIES", "CAPACITY"],
            list("maps")
                .iter()
                .map(|m| vec![s(&m["name"]), s(&m["entries"]), s(&m["capacity"])])
                .collect(),
        ),
        View::Certificates => table(
            &[
                "IDENTITY",
                "STATE",
                "SERIAL",
                "EXPIRES (UNIX)",
                "NEXT ATTEMPT",
                "FAILURES",
                "ERROR",
            ],
            list("certificates")
                .iter()
                .map(|c| {
                    vec![
                        s(&c["identity"]),
                        s(&c["state"]),
                        s(&c["serial"]),
                        s(&c["notAfterUnix"]),
                        format!("{:.0}s", c["nextAttemptInSeconds"].as_f64().unwrap_or(0.0)),
                        s(&c["failures"]),
                        s(&c["lastError"]),
                    ]
                })
                .collect(),
        ),
        View::Pool => table(
            &[
                "SOURCE WORKLOAD",
                "SOURCE",
                "DESTINATION",
                "PEER",
                "CONNECTIONS",
                "STREAMS",
            ],
            list("tunnelPool")
                .iter()
                .map(|p| {
                    vec![
                        s(&p["sourceWorkload"]),
                        s(&p["source"]),
                        s(&p["destination"]),
                        s(&p["address"]),
                        s(&p["connections"]),
                        s(&p["streams"]),
                    ]
                })
                .collect(),
        ),
        View::Routes => table(
            &["SERVICE", "PORT", "VIPS", "PROTOCOL", "BALANCER", "ROUTES"],
            list("services")
                .iter()
                .map(|v| {
                    let routes: Vec<String> = v["producerRoutes"]
                        .as_array()
                        .into_iter()
                        .chain(v["consumerRoutes"].as_array())
                        .flatten()
                        .map(s)
                        .collect();
                    vec![
                        s(&v["service"]),
                        format!("{}→{}", s(&v["port"]), s(&v["targetPort"])),
                        v["vips"]
                            .as_array()
                            .map(|a| a.iter().map(s).collect::<Vec<_>>().join(","))
                            .unwrap_or_default(),
                        s(&v["protocol"]),
                        s(&v["loadBalancer"]["loadBalancer"]),
                        if routes.is_empty() {
                            "-".into()
                        } else {
                            routes.join(",")
                        },
                    ]
                })
                .collect(),
        ),
        View::Endpoints => table(
            &[
                "SERVICE",
                "PORT",
                "ENDPOINT",
                "WORKLOAD",
                "HEALTH",
                "EJECTED FOR",
                "EJECTIONS",
                "PENDING",
                "EWMA",
            ],
            list("endpoints")
                .iter()
                .flat_map(|svc| {
                    svc["endpoints"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                        .into_iter()
                        .map(|e| {
                            vec![
                                s(&svc["service"]),
                                s(&svc["port"]),
                                s(&e["address"]),
                                s(&e["workload"]),
                                s(&e["health"]),
                                e["ejectedForSeconds"]
                                    .as_f64()
                                    .map(|t| format!("{t:.1}s"))
                                    .unwrap_or_else(|| "-".into()),
                                s(&e["ejections"]),
                                s(&e["pending"]),
                                format!("{:.2}ms", e["ewmaMs"].as_f64().unwrap_or(0.0)),
                            ]
                        })
                        .collect::<Vec<_>>()
                })
                .collect(),
        ),
        View::Config
        | View::Metrics
        | View::Connections
        | View::Failed
        | View::Explain
        | View::Trace => serde_json::to_string_pretty(dump).unwrap_or_default(),
    }
}

/// `trace`: switches the kernel's verdict reports on for `workload` and prints
/// each as a row as it happens, until `seconds` are up (or the agent drains).
pub async fn stream_trace(
    admin: SocketAddr,
    workload: &str,
    seconds: Option<u64>,
    out: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    let mut query = form_urlencoded::Serializer::new(String::new());
    query.append_pair("workload", workload);
    if let Some(n) = seconds {
        query.append_pair("seconds", &n.to_string());
    }
    let path = format!("/debug/trace?{}", query.finish());
    let resp = get(admin, &path).await?;
    let status = resp.status();
    let mut body = resp.into_body();
    if !status.is_success() {
        let text = body.collect().await?.to_bytes();
        bail!("{path}: HTTP {status}: {}", String::from_utf8_lossy(&text));
    }
    let mut pending = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let value: Value = serde_json::from_slice(&line)
                .with_context(|| format!("{path}: not a JSON line"))?;
            out.write_all(trace_line(&value).as_bytes())?;
            out.flush()?;
        }
    }
    Ok(())
}

/// Column widths of `trace`'s rows, which are printed as they arrive.
const TRACE_COLUMNS: [usize; 4] = [24, 8, 27, 40];

/// One `/debug/trace` line as `trace` prints it: the opening line becomes
/// the heading, each verdict a row.
pub fn trace_line(v: &Value) -> String {
    let row = |cells: [String; 5]| {
        let mut line = String::new();
        for (cell, width) in cells.iter().zip(TRACE_COLUMNS) {
            let _ = write!(line, "{cell:<width$}  ");
        }
        line.push_str(&cells[4]);
        line.push('\n');
        line
    };
    if v.get("tracing").is_some() {
        let addresses: Vec<String> = v["addresses"]
            .as_array()
            .map(|a| a.iter().map(s).collect())
            .unwrap_or_default();
        return format!(
            "tracing the kernel's verdicts for {} (workload id {}, {}) for {} s\n{}",
            s(&v["tracing"]),
            s(&v["workloadId"]),
            addresses.join(", "),
            s(&v["seconds"]),
            row(["TIME", "HOOK", "VERDICT", "SOURCE", "DESTINATION"].map(String::from)),
        );
    }
    if let Some(n) = v.get("missed") {
        return format!("(missed {} verdicts: this watcher fell behind)\n", s(n));
    }
    let source = if v["source"].is_null() {
        s(&v["workload"])
    } else {
        s(&v["source"])
    };
    row([
        s(&v["time"]),
        s(&v["hook"]),
        s(&v["verdict"]),
        source,
        s(&v["destination"]),
    ])
}

/// `explain` as tables: the verdict, each decision, the destination's
/// policies and the backend's endpoints.
pub async fn render_explain(
    admin: SocketAddr,
    query: &crate::explain::Query,
) -> anyhow::Result<String> {
    let path = format!("/debug/explain?{}", query.to_url_query());
    let e: Value = serde_json::from_str(&fetch(admin, &path).await?)?;
    Ok(render_explanation(&e))
}

/// The tables of one `/debug/explain` answer.
pub fn render_explanation(e: &Value) -> String {
    let rows = |key: &str| e[key].as_array().cloned().unwrap_or_default();
    let mut out = format!(
        "VERDICT  {}\nREASON   {}\nOUTCOME  {}\n\n",
        s(&e["verdict"]).to_uppercase(),
        s(&e["reason"]),
        s(&e["outcome"])
    );
    out.push_str(&table(
        &["STAGE", "DECISION", "WHY"],
        rows("steps")
            .iter()
            .map(|r| vec![s(&r["stage"]), s(&r["decision"]), s(&r["why"])])
            .collect(),
    ));
    let policies = rows("policies");
    if !policies.is_empty() {
        out.push('\n');
        out.push_str(&table(
            &["POLICY", "ACTION", "MATCHED"],
            policies
                .iter()
                .map(|r| vec![s(&r["policy"]), s(&r["action"]), s(&r["matched"])])
                .collect(),
        ));
    }
    let endpoints = rows("endpoints");
    if !endpoints.is_empty() {
        out.push('\n');
        out.push_str(&table(
            &[
                "ENDPOINT",
                "WORKLOAD",
                "HEALTH",
                "EWMA",
                "PENDING",
                "EJECTIONS",
            ],
            endpoints
                .iter()
                .map(|r| {
                    vec![
                        s(&r["address"]),
                        s(&r["workload"]),
                        s(&r["health"]),
                        format!("{:.2}ms", r["ewma_ms"].as_f64().unwrap_or(0.0)),
                        s(&r["pending"]),
                        s(&r["ejections"]),
                    ]
                })
                .collect(),
        ));
    }
    out
}

/// Left-aligned columns sized to their widest cell.
pub fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", text.join("  ").trim_end());
    };
    line(headers.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn table_aligns_columns() {
        let t = super::table(&["A", "BB"], vec![vec!["long".into(), "x".into()]]);
        assert_eq!(t, "A     BB\nlong  x\n");
    }

    /// The fenced block of `doc` that starts with `first`, without that line.
    fn block_after<'a>(doc: &'a str, first: &str) -> Vec<&'a str> {
        let start = doc
            .find(first)
            .unwrap_or_else(|| panic!("{first:?} not in the doc"));
        doc[start..]
            .lines()
            .skip(1)
            .take_while(|l| !l.starts_with("```"))
            .collect()
    }

    #[test]
    fn the_debugging_pages_trace_example_is_what_trace_prints() {
        let doc = include_str!("../../docs/debugging.md");
        let json = block_after(doc, "$ curl -sN 'http://127.0.0.1:15000/debug/trace?");
        let printed: String = json
            .iter()
            .map(|l| super::trace_line(&serde_json::from_str(l).expect("a JSON line")))
            .collect();
        let table = block_after(doc, "$ mesh-agent debug trace shop/web");
        let expected: String = table.iter().map(|l| format!("{l}\n")).collect();
        // Trailing spaces of padded cells are not kept in the page.
        let printed: String = printed
            .lines()
            .map(|l| format!("{}\n", l.trim_end()))
            .collect();
        assert_eq!(printed, expected);
    }

    #[test]
    fn trace_lines_render_as_heading_rows_and_gaps() {
        let line = |v: serde_json::Value| super::trace_line(&v);
        let heading = line(serde_json::json!({
            "tracing": "shop/web", "workloadId": 3, "addresses": ["10.0.0.2"], "seconds": 30
        }));
        let mut lines = heading.lines();
        assert_eq!(
            lines.next(),
            Some("tracing the kernel's verdicts for shop/web (workload id 3, 10.0.0.2) for 30 s")
        );
        let columns: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(
            columns,
            ["TIME", "HOOK", "VERDICT", "SOURCE", "DESTINATION"]
        );
        // A connect comes from the workload; an inbound verdict from an address.
        let connect = line(serde_json::json!({
            "time": "2026-12-03T07:00:00.000Z", "hook": "connect", "verdict": "captured",
            "workloadId": 3, "source": null, "destination": "10.0.1.2:80", "workload": "shop/web"
        }));
        assert_eq!(
            connect.split_whitespace().collect::<Vec<_>>(),
            [
                "2026-12-03T07:00:00.000Z",
                "connect",
                "captured",
                "shop/web",
                "10.0.1.2:80"
            ]
        );
        let inbound = line(serde_json::json!({
            "time": "t", "hook": "inbound", "verdict": "steered_inbound",
            "source": "10.0.0.9", "destination": "10.0.0.2:80", "workload": "shop/web"
        }));
        assert_eq!(inbound.split_whitespace().nth(3), Some("10.0.0.9"));
        assert_eq!(
            line(serde_json::json!({ "missed": 12 })),
            "(missed 12 verdicts: this watcher fell behind)\n"
        );
    }
}
