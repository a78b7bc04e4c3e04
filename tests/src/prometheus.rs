//! A real Prometheus (Debian's `prometheus`), started by a test with its own
//! config and storage, scraping agents' `/metrics` every second, and asked
//! with the HTTP API what Istio's dashboards and Kiali ask.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;

use crate::{Process, admin_get, free_port, wait_until};

const PROMETHEUS: &str = "/usr/bin/prometheus";

/// A running Prometheus; stopped, and its storage removed, on drop.
pub struct Prometheus {
    /// Where its HTTP API listens (loopback).
    pub addr: SocketAddr,
    _process: Process,
    _dir: tempfile::TempDir,
}

/// One series of a query result: its labels and value.
#[derive(Debug, Clone)]
pub struct Sample {
    /// The series' labels.
    pub labels: serde_json::Map<String, Value>,
    /// Its value (NaN when Prometheus says so).
    pub value: f64,
}

impl Sample {
    /// The value of label `name`, or "".
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).and_then(Value::as_str).unwrap_or("")
    }
}

impl Prometheus {
    /// Starts Prometheus scraping each of `targets` (agents' admin addresses)
    /// every second, and waits until it is ready.
    pub fn scraping(targets: &[SocketAddr]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n- job_name: nodemesh\n  static_configs:\n  - targets: [{}]\n",
            list.join(", ")
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config)?;
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let mut cmd = Command::new(PROMETHEUS);
        cmd.arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn");
        let process = Process::spawn(&mut cmd, "prometheus")
            .with_context(|| format!("starting {PROMETHEUS} (cargo xtask setup installs it)"))?;
        wait_until("prometheus ready", Duration::from_secs(30), || {
            Ok(admin_get(addr, "/-/ready").is_ok())
        })?;
        Ok(Prometheus {
            addr,
            _process: process,
            _dir: dir,
        })
    }

    /// An instant query: every series of the result.
    pub fn query(&self, expr: &str) -> anyhow::Result<Vec<Sample>> {
        let body = admin_get(self.addr, &format!("/api/v1/query?query={}", encode(expr)))?;
        let reply: Value = serde_json::from_str(&body)?;
        if reply["status"] != "success" {
            bail!("query {expr}: {reply}");
        }
        let result = reply["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        result
            .into_iter()
            .map(|series| {
                let value = series["value"][1]
                    .as_str()
                    .context("a sample value")?
                    .parse::<f64>()?;
                let labels = series["metric"].as_object().cloned().unwrap_or_default();
                Ok(Sample { labels, value })
            })
            .collect()
    }

    /// Every target's last scrape: (`health`, `lastError`).
    pub fn targets(&self) -> anyhow::Result<Vec<(String, String)>> {
        let reply: Value = serde_json::from_str(&admin_get(self.addr, "/api/v1/targets")?)?;
        Ok(reply["data"]["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|t| {
                (
                    t["health"].as_str().unwrap_or("").to_owned(),
                    t["lastError"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect())
    }

    /// The type Prometheus filed for metric `name` (from the scraped metadata).
    pub fn metadata_type(&self, name: &str) -> anyhow::Result<Option<String>> {
        let reply: Value = serde_json::from_str(&admin_get(
            self.addr,
            &format!("/api/v1/metadata?metric={}", encode(name)),
        )?)?;
        Ok(reply["data"][name][0]["type"].as_str().map(str::to_owned))
    }
}

/// `promtool check metrics` on `exposition`: the problems it reports, one per line.
pub fn promtool_problems(exposition: &str) -> anyhow::Result<Vec<String>> {
    use std::io::Write;
    let mut child = Command::new(Path::new("/usr/bin/promtool"))
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running promtool (cargo xtask setup installs it)")?;
    child
        .stdin
        .take()
        .context("promtool stdin")?
        .write_all(exposition.as_bytes())?;
    let out = child.wait_with_output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

/// Percent-encodes a query-string value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
