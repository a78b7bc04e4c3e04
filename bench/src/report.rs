//! Benchmark output: JSON for machines, a markdown table for people, and a
//! latency plot, all stamped with the kernel, core count and git revision.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use plotters::prelude::*;
use serde::Serialize;
use serde_json::Value;

use crate::{HookCost, Memory, PathResult, Plan};

/// Where and when the numbers were taken.
#[derive(Debug, Serialize)]
pub struct Meta {
    /// `uname -r`.
    pub kernel: String,
    /// CPUs available to the run.
    pub cores: usize,
    /// `git describe --always --dirty`.
    pub git_revision: String,
    /// Seconds since the Unix epoch.
    pub unix_time: u64,
    /// The command that produced these numbers.
    pub command: String,
    /// Wall time of the whole run.
    pub seconds: f64,
}

/// Everything one run measured.
#[derive(Debug, Serialize)]
pub struct Results {
    /// Where and when.
    pub meta: Meta,
    /// Durations and rates.
    pub plan: Plan,
    /// One entry per path.
    pub paths: Vec<PathResult>,
    /// Agent memory.
    pub memory: Memory,
    /// The kernel connect hook's cost, untraced and traced.
    pub kernel_connect_hook: Option<HookCost>,
}

fn command_output(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

const PERCENTILES: [(&str, &str); 4] = [
    ("p50", "p50_us"),
    ("p90", "p90_us"),
    ("p99", "p99_us"),
    ("p99.9", "p999_us"),
];

fn num(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(f64::NAN)
}

impl Results {
    /// Stamps the measurements.
    pub fn new(
        plan: Plan,
        quick: bool,
        paths: Vec<PathResult>,
        memory: Memory,
        kernel_connect_hook: Option<HookCost>,
        took: Duration,
    ) -> Self {
        Results {
            meta: Meta {
                kernel: command_output("uname", &["-r"]),
                cores: std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(0),
                git_revision: command_output("git", &["describe", "--always", "--dirty"]),
                unix_time: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
                command: if quick {
                    "cargo xtask bench --quick"
                } else {
                    "cargo xtask bench"
                }
                .into(),
                seconds: took.as_secs_f64(),
            },
            plan,
            paths,
            memory,
            kernel_connect_hook,
        }
    }

    fn path(&self, name: &str) -> Option<&PathResult> {
        self.paths.iter().find(|p| p.name == name)
    }

    /// The markdown report.
    pub fn markdown(&self) -> String {
        let m = &self.meta;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Measured with `{}` at revision `{}` on Linux {} with {} cores ({:.0} s).\n",
            m.command, m.git_revision, m.kernel, m.cores, m.seconds
        );
        for (i, rps) in self.plan.rates.iter().enumerate() {
            let _ = writeln!(
                out,
                "**HTTP/1.1 keep-alive, 1 KiB responses, {rps} requests/s open loop** (latency in µs from the scheduled send time; \"added\" is over the direct path on the same topology):\n"
            );
            out.push_str("| path | p50 | p90 | p99 | p99.9 | added p50 | added p99 | errors | proxy vCPU per 1,000 rps | proxy context switches per request | proxy syscalls per request | loadgen CPU s |\n");
            out.push_str(
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
            );
            for p in &self.paths {
                let r = &p.rates[i];
                let base = p
                    .baseline
                    .as_deref()
                    .and_then(|b| self.path(b))
                    .map(|b| &b.rates[i].load);
                let added = |key: &str| match base {
                    Some(b) => format!("{:+.0}", num(&r.load, key) - num(b, key)),
                    None => "-".into(),
                };
                let proxied = |v: f64, digits: usize| {
                    if p.baseline.is_some() {
                        format!("{v:.digits$}")
                    } else {
                        "-".into()
                    }
                };
                let vcpu = proxied(r.proxy_vcpu_per_1000_rps, 3);
                let switches = proxied(r.proxy_context_switches_per_request, 1);
                let syscalls = match r.proxy_syscalls_per_request {
                    Some(n) => proxied(n, 1),
                    None => "-".into(),
                };
                let _ = writeln!(
                    out,
                    "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {} | {} | {} | {:.2} |",
                    p.name,
                    num(&r.load, "p50_us"),
                    num(&r.load, "p90_us"),
                    num(&r.load, "p99_us"),
                    num(&r.load, "p999_us"),
                    added("p50_us"),
                    added("p99_us"),
                    r.load["errors"],
                    vcpu,
                    switches,
                    syscalls,
                    num(&r.load, "loadgen_cpu_seconds"),
                );
            }
            out.push('\n');
        }
        out.push_str("**Capacity**:\n\n");
        out.push_str("| path | max requests/s (64 conns) | p99 at max (µs) | bulk Gbit/s, 1 stream | proxy vCPU per Gbit/s, 1 stream | proxy syscalls per MiB, 1 stream | bulk Gbit/s, 8 streams | new connections/s |\n");
        out.push_str("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
        for p in &self.paths {
            let per_gbit = match p.bulk_1["proxy_vcpu_per_gbit_per_s"].as_f64() {
                Some(v) => format!("{v:.3}"),
                None => "-".to_owned(),
            };
            let syscalls_per_mib = match p.bulk_1["proxy_syscalls_per_mib"].as_f64() {
                Some(v) => format!("{v:.0}"),
                None => "-".to_owned(),
            };
            let _ = writeln!(
                out,
                "| {} | {:.0} | {:.0} | {:.2} | {} | {} | {:.2} | {:.0} |",
                p.name,
                num(&p.max, "rps"),
                num(&p.max, "p99_us"),
                num(&p.bulk_1, "gbit_per_s"),
                per_gbit,
                syscalls_per_mib,
                num(&p.bulk_8, "gbit_per_s"),
                num(&p.connect, "connections_per_s"),
            );
        }
        let mem = &self.memory;
        let per_connection = match mem.per_idle_connection_bytes {
            0 => "per idle tunnelled connection not measured in this run".to_owned(),
            bytes => format!(
                "{:.1} KiB per idle tunnelled connection (both agents)",
                bytes as f64 / 1024.0
            ),
        };
        let _ = writeln!(
            out,
            "\n**Node agent memory (RSS)**: {:.1} MB idle with {} workloads, {:.1} MB peak under load, {:.1} MB idle with {} workloads after the load ({:.1} KiB per idle workload); {per_connection}.",
            mem.idle_kib as f64 / 1024.0,
            mem.idle_workloads,
            mem.peak_under_load_kib as f64 / 1024.0,
            mem.with_workloads_kib as f64 / 1024.0,
            mem.workloads,
            mem.per_idle_workload_bytes as f64 / 1024.0,
        );
        if let Some(h) = &self.kernel_connect_hook {
            let traced = match (h.connect4_ns_traced, h.connections_per_s_traced) {
                (Some(ns), Some(rate)) => format!(
                    "; with the client traced by `mesh-agent debug trace`, {ns:.0} ns ({} calls, {} rows printed) and {rate:.0} new connections/s",
                    h.connect4_runs_traced.unwrap_or(0),
                    h.traced_rows.unwrap_or(0),
                ),
                _ => "; traced not measured in this run".to_owned(),
            };
            let _ = writeln!(
                out,
                "\n**Kernel connect hook** (`capture_connect4`, the kernel's BPF run-time statistics, during connection churn through the mesh): {:.0} ns per connect untraced ({} calls, {:.0} new connections/s){traced}.",
                h.connect4_ns_untraced, h.connect4_runs_untraced, h.connections_per_s_untraced,
            );
        }
        out
    }

    /// Writes `<stamp>.json`, `<stamp>.md`, `latest.*` and the latency plot into `dir`.
    pub fn write(&self, dir: &Path, as_latest: bool) -> anyhow::Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir)?;
        // Partial (`--only`) runs are for local comparisons and stay out of git.
        let prefix = if as_latest { "" } else { "partial-" };
        let stamp = format!("{prefix}{}-{}", self.meta.unix_time, self.meta.git_revision);
        let json = serde_json::to_string_pretty(self)?;
        let md = self.markdown();
        let mut written = Vec::new();
        let names: &[&str] = if as_latest {
            &[stamp.as_str(), "latest"]
        } else {
            &[stamp.as_str()]
        };
        for name in names {
            let (j, m) = (
                dir.join(format!("{name}.json")),
                dir.join(format!("{name}.md")),
            );
            std::fs::write(&j, &json)?;
            std::fs::write(&m, &md)?;
            written.extend([j, m]);
        }
        if as_latest {
            let doc = Path::new(PERFORMANCE_DOC);
            if doc.exists() {
                let text = std::fs::read_to_string(doc)?;
                std::fs::write(doc, with_results(&text, &md)?)?;
                written.push(doc.to_path_buf());
            }
            let svg = dir.join("latest-latency.svg");
            self.plot(&svg)?;
            written.push(svg);
        }
        Ok(written)
    }

    /// Latency by percentile at the first rate, one line per path.
    fn plot(&self, file: &Path) -> anyhow::Result<()> {
        let rps = self.plan.rates.first().copied().unwrap_or(0);
        let series: Vec<(String, Vec<f64>)> = self
            .paths
            .iter()
            .map(|p| {
                let load = &p.rates[0].load;
                (
                    p.name.clone(),
                    PERCENTILES.iter().map(|(_, k)| num(load, k)).collect(),
                )
            })
            .collect();
        let top = series
            .iter()
            .flat_map(|(_, v)| v.iter().copied())
            .filter(|v| v.is_finite())
            .fold(1.0, f64::max)
            * 1.15;
        let root = SVGBackend::new(file, (900, 540)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!(
                    "Latency at {rps} requests/s, HTTP/1.1, 1 KiB ({})",
                    self.meta.git_revision
                ),
                ("sans-serif", 20),
            )
            .margin(20)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..3.0, 0f64..top)?;
        chart
            .configure_mesh()
            .x_labels(4)
            .x_label_formatter(&|x| {
                PERCENTILES
                    .get(x.round() as usize)
                    .map(|p| p.0.to_owned())
                    .unwrap_or_default()
            })
            .y_desc("latency (µs)")
            .draw()?;
        for (i, (name, values)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let points: Vec<(f64, f64)> = values
                .iter()
                .enumerate()
                .map(|(x, y)| (x as f64, *y))
                .collect();
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
                .label(name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart.draw_series(points.iter().map(|p| Circle::new(*p, 3, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    }
}

/// The page that keeps the latest table, so the docs always show a real run.
const PERFORMANCE_DOC: &str = "docs/performance.md";
const RESULTS_BEGIN: &str = "<!-- results:begin -->";
const RESULTS_END: &str = "<!-- results:end -->";

/// `doc` with the text between the results markers replaced by `results`.
fn with_results(doc: &str, results: &str) -> anyhow::Result<String> {
    let (Some(begin), Some(end)) = (doc.find(RESULTS_BEGIN), doc.find(RESULTS_END)) else {
        anyhow::bail!("{PERFORMANCE_DOC} lacks the {RESULTS_BEGIN} / {RESULTS_END} markers");
    };
    anyhow::ensure!(
        begin < end,
        "{PERFORMANCE_DOC}: results markers out of order"
    );
    Ok(format!(
        "{}{RESULTS_BEGIN}\n{}\n{}",
        &doc[..begin],
        results.trim_end(),
        &doc[end..]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_replace_only_the_marked_part() {
        let doc = format!("intro\n{RESULTS_BEGIN}\nold table\n{RESULTS_END}\nafter\n");
        let once = with_results(&doc, "new table\n").unwrap();
        assert_eq!(
            once,
            format!("intro\n{RESULTS_BEGIN}\nnew table\n{RESULTS_END}\nafter\n")
        );
        assert_eq!(
            with_results(&once, "new table").unwrap(),
            once,
            "idempotent"
        );
        assert!(with_results("no markers", "x").is_err());
    }
}
