//! The soak: two nodes carrying many long-lived meshed connections and a
//! steady stream of short ones while pods enrol and leave, the config is
//! reloaded, node 0's agent is upgraded (a handoff) and node 1's is killed with
//! `kill -9` and restarted. It samples descriptors, map entries, memory and
//! errors every second, and fails on a leak (a count not back to its baseline
//! once the load ends) or a lost byte on a connection the kill did not cut.
//!
//! `cargo xtask soak --minutes N` runs it at full size; `tests/soak.rs` runs a
//! short one in `cargo xtask test`.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::{Agent, MeshCa, Node, Pod, Process, Tools, wait_until, yaml_docs};

const ECHO_PORT: u16 = 9000;

/// How big and how long.
#[derive(Debug, Clone)]
pub struct SoakSettings {
    /// How long the load runs.
    pub duration: Duration,
    /// Long-lived connections in all, half within node 0, half across nodes.
    pub connections: usize,
    /// New short connections per second.
    pub rate: u32,
}

/// One agent's state at one moment.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Seconds since the load started.
    pub t: f64,
    /// `node0` or `node1`.
    pub node: &'static str,
    /// Open descriptors of the node's serving agent.
    pub fds: usize,
    /// Its resident memory.
    pub rss_kib: u64,
    /// Connections it carries (`nodemesh_open_connections`).
    pub connections: f64,
    /// `WORKLOADS` entries.
    pub workloads: u64,
    /// `ORIG_DST` plus `PENDING` entries: records of connections not yet accepted.
    pub records: u64,
}

/// What the soak saw.
#[derive(Debug, Default)]
pub struct SoakReport {
    /// Every sample, both nodes.
    pub samples: Vec<Sample>,
    /// What happened when, in seconds since the load started.
    pub events: Vec<(f64, String)>,
    /// Progress of the two loads: (t, load, failed short connections, failed streams).
    pub errors: Vec<(f64, &'static str, u64, u64)>,
    /// Counts that did not return to their baseline.
    pub leaks: Vec<String>,
    /// Bytes or connections lost where nothing was cut.
    pub lost: Vec<String>,
    /// Node 0's memory per established connection at full load, in bytes.
    pub bytes_per_connection: f64,
    /// The final load reports.
    pub loads: Vec<(&'static str, serde_json::Value)>,
}

struct Cluster {
    tools: Tools,
    ca: MeshCa,
    node0: Node,
    node1: Node,
    a: Pod,
    s: Pod,
    b: Pod,
    churn: Pod,
}

impl Cluster {
    fn config(&self, with_churn: bool) -> String {
        let mut docs = vec![
            self.a.workload_yaml(),
            self.s.workload_yaml(),
            self.b.workload_yaml(),
        ];
        if with_churn {
            docs.push(self.churn.workload_yaml());
        }
        yaml_docs(&docs)
    }
}

fn sample(agent: &Agent, node: &'static str, t: f64) -> anyhow::Result<Sample> {
    let dump = agent.config_dump()?;
    let entries = |name: &str| {
        dump["maps"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["name"] == name))
            .and_then(|m| m["entries"].as_u64())
            .unwrap_or(0)
    };
    Ok(Sample {
        t,
        node,
        fds: agent.fd_count()?,
        rss_kib: agent.rss_kib()?,
        connections: agent.metric("nodemesh_open_connections", &[])?,
        workloads: entries("WORKLOADS"),
        records: entries("ORIG_DST") + entries("PENDING"),
    })
}

fn start_load(
    tools: &Tools,
    from: &Pod,
    to: &Pod,
    settings: &SoakSettings,
    streams: usize,
) -> anyhow::Result<Process> {
    let mut cmd = from.command(&tools.podtool)?;
    cmd.args(["tcp-load", "--to", &to.addr(ECHO_PORT).to_string()])
        .args(["--streams", &streams.to_string()])
        .args(["--rate", &(settings.rate / 2).to_string()])
        .args(["--seconds", &settings.duration.as_secs_f64().to_string()])
        // Idle-ish long connections: 1 KiB each way every 2 s.
        .args(["--chunk", "1024", "--interval-ms", "2000", "--progress"]);
    let mut load = Process::spawn(&mut cmd, "podtool tcp-load")?;
    let line = load.wait_line(Duration::from_secs(30))?;
    anyhow::ensure!(line.contains("started"), "tcp-load said {line:?}");
    Ok(load)
}

/// Runs the soak; the report says what leaked or was lost (empty: passed).
pub fn run(tools: Tools, settings: &SoakSettings) -> anyhow::Result<SoakReport> {
    let ca = MeshCa::init(&tools)?;
    let mut node0 = Node::with_index(0)?;
    let mut node1 = Node::with_index(1)?;
    node0.link(&node1)?;
    let mut cluster = Cluster {
        a: node0.add_pod("a", "shop")?,
        s: node0.add_pod("s", "shop")?,
        churn: node0.add_pod("churn", "shop")?,
        b: node1.add_pod("b", "backend")?,
        tools,
        ca,
        node0,
        node1,
    };
    let _servers = [&cluster.s, &cluster.b]
        .iter()
        .map(|p| {
            p.serve(
                &cluster.tools,
                &["echo", "--listen", &p.addr(ECHO_PORT).to_string()],
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let max = (settings.connections * 2 + 1000).to_string();
    // The upgraded agent keeps its long-lived connections until they end with
    // the load: its drain must outlast the run (a shorter one cuts them, as
    // documented, which is not what this measures).
    let drain = format!("{}s", settings.duration.as_secs() + 120);
    let mut args: Vec<String> = cluster.ca.args().iter().map(|s| s.to_string()).collect();
    args.extend([
        "--max-connections".to_owned(),
        max,
        "--drain-timeout".to_owned(),
        drain,
    ]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut near = Agent::start_with(
        &cluster.tools,
        &cluster.node0,
        &cluster.config(false),
        &argv,
    )?;
    let mut far = Agent::start_with(
        &cluster.tools,
        &cluster.node1,
        &cluster.config(false),
        &argv,
    )?;
    let mut retiring: Vec<Agent> = Vec::new();
    let result = soak(
        &mut cluster,
        settings,
        &argv,
        &mut near,
        &mut far,
        &mut retiring,
    );
    if result.as_ref().map_or(true, |r| !r.passed()) {
        for old in &retiring {
            eprintln!(
                "--- upgraded node 0 agent log (warnings) ---\n{}",
                warnings(&old.log())
            );
        }
        eprintln!(
            "--- node 0 agent log (warnings) ---\n{}",
            warnings(&near.log())
        );
        eprintln!("--- node 0 agent log (tail) ---\n{}", tail(&near.log()));
        eprintln!("--- node 1 agent log (tail) ---\n{}", tail(&far.log()));
    }
    result
}

fn warnings(log: &str) -> String {
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    lines[..lines.len().min(30)].join("\n")
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn soak(
    cluster: &mut Cluster,
    settings: &SoakSettings,
    argv: &[&str],
    near: &mut Agent,
    far: &mut Agent,
    retiring: &mut Vec<Agent>,
) -> anyhow::Result<SoakReport> {
    let mut report = SoakReport::default();
    // Warm both agents up (a tunnel each way, certificates), then take baselines.
    for to in [&cluster.s, &cluster.b] {
        let mut probe = cluster.a.command(&cluster.tools.podtool)?;
        probe.args(["probe", "--to", &to.addr(ECHO_PORT).to_string()]);
        crate::run_json(&mut probe, Duration::from_secs(10))?;
    }
    let base = [sample(near, "node0", 0.0)?, sample(far, "node1", 0.0)?];
    let pins = [
        mesh_agent::node::pins::count_pins(&cluster.node0.bpf_dir),
        mesh_agent::node::pins::count_pins(&cluster.node1.bpf_dir),
    ];

    let half = settings.connections / 2;
    let mut local = start_load(&cluster.tools, &cluster.a, &cluster.s, settings, half)?;
    let mut remote = start_load(&cluster.tools, &cluster.a, &cluster.b, settings, half)?;
    let started = Instant::now();
    let end = settings.duration;
    let upgrade_at = end.mul_f64(0.33);
    let kill_at = end.mul_f64(0.55);
    let measure_at = end.mul_f64(0.25);
    let (mut upgraded, mut killed, mut measured) = (false, false, false);
    let mut next_churn = Duration::from_secs(3);
    let mut churn_in = false;
    let mut next_sample = Duration::ZERO;
    while started.elapsed() < end {
        let t = started.elapsed();
        let secs = t.as_secs_f64();
        for (name, load) in [("local", &mut local), ("remote", &mut remote)] {
            for line in load.new_lines() {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                if v["t"].is_number() {
                    let failed = v["connections_failed"].as_u64().unwrap_or(0);
                    let streams = v["streams_failed"].as_u64().unwrap_or(0);
                    report.errors.push((secs, name, failed, streams));
                }
            }
        }
        if t >= next_sample {
            report.samples.push(sample(near, "node0", secs)?);
            report.samples.push(sample(far, "node1", secs)?);
            next_sample += Duration::from_secs(1);
        }
        if !measured && t >= measure_at {
            let now = sample(near, "node0", secs)?;
            let added = now.connections - base[0].connections;
            if added > 0.0 {
                report.bytes_per_connection =
                    (now.rss_kib.saturating_sub(base[0].rss_kib) * 1024) as f64 / added;
            }
            measured = true;
        }
        if t >= next_churn {
            churn_in = !churn_in;
            near.reconfigure(&cluster.config(churn_in))?;
            report.events.push((
                secs,
                format!("pod churn {}", if churn_in { "enrolled" } else { "left" }),
            ));
            next_churn += Duration::from_secs(3);
        }
        if !upgraded && t >= upgrade_at {
            let successor = near.start_successor(&cluster.tools, &cluster.node0, argv)?;
            near.log_line("handover", |l| l.contains("handed over to a successor"));
            near.signal(libc::SIGTERM);
            retiring.push(std::mem::replace(near, successor));
            report
                .events
                .push((secs, "node 0 agent upgraded (handoff)".into()));
            upgraded = true;
        }
        if !killed && t >= kill_at {
            far.signal_and_wait(libc::SIGKILL, Duration::from_secs(5))
                .context("killing node 1's agent")?;
            let config = cluster.config(false);
            *far = Agent::start_with(&cluster.tools, &cluster.node1, &config, argv)?;
            report
                .events
                .push((secs, "node 1 agent killed (-9) and restarted".into()));
            killed = true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    near.reconfigure(&cluster.config(false))?;
    let grace = Duration::from_secs(60);
    for (name, load) in [("local", local), ("remote", remote)] {
        let finished = load.wait(grace)?;
        report.loads.push((name, finished.report()?));
    }
    for old in retiring.iter_mut() {
        if old.wait_exit(grace).is_none() {
            report
                .leaks
                .push("the upgraded agent did not exit after its connections ended".into());
        }
    }

    // Nothing lost where nothing was cut: node 0's own traffic saw the upgrade only.
    let local_report = &report.loads[0].1;
    for field in ["connections_failed", "streams_failed"] {
        if local_report[field].as_u64() != Some(0) {
            report
                .lost
                .push(format!("within node 0: {field} = {}", local_report[field]));
        }
    }
    // Across nodes the kill cuts streams; each must have ended, never hung.
    let remote_report = &report.loads[1].1;
    if let Some(errors) = remote_report["errors"].as_array()
        && errors
            .iter()
            .any(|e| e.as_str().is_some_and(|e| e.contains("timed out")))
    {
        report.lost.push(format!(
            "across nodes, a cut connection hung: {remote_report}"
        ));
    }

    // Back to baseline once the load is gone.
    let settled = wait_until(
        "counts back to their baseline",
        Duration::from_secs(20),
        || {
            let now = [sample(near, "node0", 0.0)?, sample(far, "node1", 0.0)?];
            Ok(now.iter().zip(&base).all(|(n, b)| {
                n.records == 0
                    && n.workloads == b.workloads
                    && n.connections == 0.0
                    && n.fds <= b.fds + 8
            }))
        },
    );
    let now = [sample(near, "node0", 0.0)?, sample(far, "node1", 0.0)?];
    if settled.is_err() {
        for (n, b) in now.iter().zip(&base) {
            report.leaks.push(format!(
                "{}: fds {} (baseline {}), records {}, workloads {} (baseline {}), connections {}",
                n.node, n.fds, b.fds, n.records, n.workloads, b.workloads, n.connections
            ));
        }
    }
    let pins_now = [
        mesh_agent::node::pins::count_pins(&cluster.node0.bpf_dir),
        mesh_agent::node::pins::count_pins(&cluster.node1.bpf_dir),
    ];
    if pins_now != pins {
        report
            .leaks
            .push(format!("pinned objects {pins_now:?}, baseline {pins:?}"));
    }
    report.samples.extend(now);
    Ok(report)
}

/// One line of the plot: node, quantity, and how to read it from a sample.
type Series = (&'static str, &'static str, Box<dyn Fn(&Sample) -> f64>);

impl SoakReport {
    /// Whether nothing leaked and nothing was lost.
    pub fn passed(&self) -> bool {
        self.leaks.is_empty() && self.lost.is_empty()
    }

    /// The report as Markdown: summary, events, and a table every `every` seconds.
    pub fn markdown(&self, settings: &SoakSettings, every: f64) -> String {
        let mut md = String::new();
        let _ = writeln!(
            md,
            "# Soak: {} long-lived connections, {} new/s, {:.0} s\n",
            settings.connections,
            settings.rate,
            settings.duration.as_secs_f64()
        );
        let _ = writeln!(
            md,
            "Result: **{}**\n",
            if self.passed() { "passed" } else { "FAILED" }
        );
        for leak in &self.leaks {
            let _ = writeln!(md, "- leak: {leak}");
        }
        for lost in &self.lost {
            let _ = writeln!(md, "- lost: {lost}");
        }
        let _ = writeln!(
            md,
            "- node 0 agent memory per established connection: {:.0} bytes",
            self.bytes_per_connection
        );
        for (name, load) in &self.loads {
            let _ = writeln!(
                md,
                "- {name} load: {} short connections ({} failed), {} streams ({} failed), {} stream bytes echoed",
                load["connections"],
                load["connections_failed"],
                load["streams"],
                load["streams_failed"],
                load["stream_bytes"]
            );
            for e in load["errors"].as_array().into_iter().flatten().take(3) {
                let _ = writeln!(md, "  - {}", e.as_str().unwrap_or_default());
            }
        }
        let _ = writeln!(md, "\n| t (s) | event |\n| ---: | --- |");
        for (t, e) in &self.events {
            let _ = writeln!(md, "| {t:.1} | {e} |");
        }
        let _ = writeln!(
            md,
            "\n| t (s) | node | fds | RSS (MiB) | connections | WORKLOADS | pending records | failed short (local/remote) | failed streams (local/remote) |\n| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        let mut next = 0.0;
        for s in &self.samples {
            if s.t + 1e-9 < next && s.t != 0.0 {
                continue;
            }
            let errors = |load: &str| {
                self.errors
                    .iter()
                    .rfind(|(t, l, ..)| *l == load && *t <= s.t + 0.5)
                    .map(|(_, _, c, st)| (*c, *st))
                    .unwrap_or((0, 0))
            };
            let (lc, ls) = errors("local");
            let (rc, rs) = errors("remote");
            let _ = writeln!(
                md,
                "| {:.0} | {} | {} | {:.1} | {:.0} | {} | {} | {lc}/{rc} | {ls}/{rs} |",
                s.t,
                s.node,
                s.fds,
                s.rss_kib as f64 / 1024.0,
                s.connections,
                s.workloads,
                s.records
            );
            if s.node == "node1" {
                next = s.t + every;
            }
        }
        md
    }

    /// Descriptors and memory of both agents over time, as an SVG line plot.
    pub fn svg(&self) -> String {
        let series: [Series; 4] = [
            ("node0", "fds", Box::new(|s| s.fds as f64)),
            ("node1", "fds", Box::new(|s| s.fds as f64)),
            (
                "node0",
                "RSS KiB / 10",
                Box::new(|s| s.rss_kib as f64 / 10.0),
            ),
            (
                "node1",
                "RSS KiB / 10",
                Box::new(|s| s.rss_kib as f64 / 10.0),
            ),
        ];
        let colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"];
        let points: Vec<&Sample> = self.samples.iter().filter(|s| s.t > 0.0).collect();
        let t_max = points.iter().map(|s| s.t).fold(1.0, f64::max);
        let y_max = points
            .iter()
            .flat_map(|s| series.iter().map(move |(_, _, f)| f(s)))
            .fold(1.0, f64::max);
        let (w, h, pad) = (800.0, 400.0, 50.0);
        let mut svg = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{pad}\" y=\"20\">descriptors and memory of each node's serving agent over {t_max:.0} s (max {y_max:.0})</text>\n"
        );
        for (i, (node, what, f)) in series.iter().enumerate() {
            let line: Vec<String> = points
                .iter()
                .filter(|s| s.node == *node)
                .map(|s| {
                    let x = pad + (w - 2.0 * pad) * s.t / t_max;
                    let y = h - pad - (h - 2.0 * pad) * f(s) / y_max;
                    format!("{x:.1},{y:.1}")
                })
                .collect();
            let _ = writeln!(
                svg,
                "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\" points=\"{}\"/>\n<text x=\"{}\" y=\"{}\" fill=\"{}\">{node} {what}</text>",
                colours[i],
                line.join(" "),
                w - pad - 120.0,
                40 + 15 * i,
                colours[i]
            );
        }
        for (t, e) in &self.events {
            if e.starts_with("pod churn") {
                continue;
            }
            let x = pad + (w - 2.0 * pad) * t / t_max;
            let _ = writeln!(
                svg,
                "<line x1=\"{x:.1}\" y1=\"{pad}\" x2=\"{x:.1}\" y2=\"{}\" stroke=\"#888\" stroke-dasharray=\"4\"/>\n<text x=\"{:.1}\" y=\"{}\" fill=\"#444\">{e}</text>",
                h - pad,
                x + 3.0,
                h - pad - 5.0
            );
        }
        svg.push_str("</svg>\n");
        svg
    }

    /// Writes `soak.md` and `soak.svg` into `dir`.
    pub fn write(&self, settings: &SoakSettings, dir: &Path, every: f64) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("soak.md"), self.markdown(settings, every))?;
        std::fs::write(dir.join("soak.svg"), self.svg())?;
        Ok(())
    }
}
