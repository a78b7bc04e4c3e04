//! `nodemesh-bench` (run by `cargo xtask bench`): measures each path a request
//! can take, in one run on one machine, so results are compared as ratios:
//!
//! - direct pod to pod (same node and across two nodes): the baseline;
//! - through the mesh, same node and cross node;
//! - through a sidecar-style HAProxy pair doing mutual TLS.
//!
//! Nothing here asserts a timing; it reports.

mod report;
mod sidecar;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use nodemesh_testkit::{
    Agent, MeshCa, Node, Pod, Process, Tools, proc_context_switches, proc_cpu_seconds,
    proc_status_kib, run_json, yaml_docs,
};
use serde::Serialize;
use serde_json::Value;

const HTTP_PORT: u16 = 8080;
const SINK_PORT: u16 = 9100;
/// The Service VIP of the L7 path.
const L7_VIP: &str = "10.96.0.80";
const WORKLOADS_FOR_MEMORY: usize = 100;

#[derive(Parser)]
struct Cli {
    /// Shorter runs and fewer rates (under two minutes), for comparisons on a PR.
    #[arg(long)]
    quick: bool,
    /// Where results go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Run only the paths whose name contains this text (repeatable), e.g. for
    /// profiling one path. Partial runs do not replace `latest.*`.
    #[arg(long)]
    only: Vec<String>,
    /// Also record where the proxies spend their CPU (`perf record -g`) during the
    /// first constant-rate run, the one-stream bulk run and the new-connection
    /// run of each proxied path, and write each profile's top symbols to this
    /// directory.
    #[arg(long)]
    profile: Option<PathBuf>,
}

/// How long each measurement runs.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// Constant request rates measured (requests/s).
    pub rates: Vec<u64>,
    /// Seconds at each rate, after one second of warm-up.
    pub rate_seconds: f64,
    /// Seconds of closed-loop maximum load.
    pub max_seconds: f64,
    /// Seconds per bulk-throughput run.
    pub bulk_seconds: f64,
    /// Seconds of connection churn.
    pub connect_seconds: f64,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Plan {
                rates: vec![1000],
                rate_seconds: 3.0,
                max_seconds: 2.0,
                bulk_seconds: 2.0,
                connect_seconds: 2.0,
            }
        } else {
            Plan {
                rates: vec![1000, 5000],
                rate_seconds: 10.0,
                max_seconds: 5.0,
                bulk_seconds: 5.0,
                connect_seconds: 5.0,
            }
        }
    }
}

/// One constant-rate run.
#[derive(Debug, Clone, Serialize)]
pub struct RateResult {
    /// The loadgen report (latency percentiles in µs, achieved rate, errors).
    pub load: Value,
    /// CPU the proxies of this path used (both agents, or both sidecars), in vCPU.
    pub proxy_vcpu: f64,
    /// The same per 1,000 requests/s.
    pub proxy_vcpu_per_1000_rps: f64,
    /// The proxies' context switches (all threads) per request: their wake-ups.
    pub proxy_context_switches_per_request: f64,
    /// The proxies' system calls per request (`perf stat`'s count of
    /// `raw_syscalls:sys_enter`); absent without perf.
    pub proxy_syscalls_per_request: Option<f64>,
}

/// Everything measured on one path.
#[derive(Debug, Clone, Serialize)]
pub struct PathResult {
    /// Human name.
    pub name: String,
    /// The direct path this one is compared against.
    pub baseline: Option<String>,
    /// One entry per rate in the plan.
    pub rates: Vec<RateResult>,
    /// Closed-loop maximum with 64 connections.
    pub max: Value,
    /// Bulk TCP, one stream.
    pub bulk_1: Value,
    /// Bulk TCP, eight streams.
    pub bulk_8: Value,
    /// New connections per second.
    pub connect: Value,
}

struct Bench {
    tools: Tools,
    loadgen: PathBuf,
    plan: Plan,
    profile: Option<PathBuf>,
}

/// Where the load goes and who carries it.
struct Target {
    http: SocketAddr,
    sink: SocketAddr,
    proxies: Vec<u32>,
}

fn env_path(var: &str) -> anyhow::Result<PathBuf> {
    std::env::var_os(var)
        .map(PathBuf::from)
        .with_context(|| format!("{var} is not set: run the benchmark with `cargo xtask bench`"))
}

/// `perf stat` counting the proxies' system calls while a phase runs.
struct SyscallCount(std::process::Child);

impl SyscallCount {
    /// Starts counting; `None` (said once on stderr) where perf cannot.
    fn start(pids: &[u32]) -> Option<Self> {
        if pids.is_empty() {
            return None;
        }
        let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
        let child = std::process::Command::new("perf")
            .args(["stat", "-e", "raw_syscalls:sys_enter", "-x", ",", "-p"])
            .arg(pids.join(","))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .inspect_err(|e| eprintln!("bench: no system-call counts: perf: {e}"))
            .ok()?;
        // perf attaches before the phase starts.
        std::thread::sleep(Duration::from_millis(300));
        Some(SyscallCount(child))
    }

    /// Stops counting and returns the count.
    fn finish(self) -> Option<u64> {
        // SAFETY: kill(2) on our own child's pid; SIGINT makes perf print and exit.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let out = self.0.wait_with_output().ok()?;
        let text = String::from_utf8_lossy(&out.stderr);
        let count = text
            .lines()
            .find(|l| l.contains("raw_syscalls:sys_enter"))
            .and_then(|l| l.split(',').next()?.trim().parse().ok());
        if count.is_none() {
            eprintln!("bench: perf stat gave no count: {text}");
        }
        count
    }
}

/// `perf record` of the proxies while a phase runs, reported as the symbols
/// that take the most CPU (self time), so a change can be aimed at a cost.
struct CpuProfile {
    child: std::process::Child,
    data: PathBuf,
    report: PathBuf,
}

impl CpuProfile {
    /// Starts sampling `pids` if `dir` is set; `None` (said on stderr) where perf cannot.
    fn start(dir: Option<&std::path::Path>, pids: &[u32], name: &str) -> Option<Self> {
        let dir = dir?;
        if pids.is_empty() {
            return None;
        }
        std::fs::create_dir_all(dir).ok()?;
        let stem: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let data = dir.join(format!("{stem}.perf.data"));
        let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
        let child = std::process::Command::new("perf")
            .args(["record", "-F", "997", "-g", "-q", "-o"])
            .arg(&data)
            .arg("-p")
            .arg(pids.join(","))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .inspect_err(|e| eprintln!("bench: no profile: perf: {e}"))
            .ok()?;
        std::thread::sleep(Duration::from_millis(300));
        Some(CpuProfile {
            child,
            data,
            report: dir.join(format!("{stem}.txt")),
        })
    }

    /// Stops sampling and writes the report next to the data.
    fn finish(mut self) {
        // SAFETY: kill(2) on our own child's pid; SIGINT makes perf write and exit.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        let report = std::process::Command::new("perf")
            .args([
                "report",
                "--stdio",
                "--no-children",
                "--percent-limit",
                "0.7",
            ])
            .args(["--sort", "dso,symbol", "-g", "none", "-i"])
            .arg(&self.data)
            .output();
        match report {
            Ok(out) => {
                let _ = std::fs::write(&self.report, &out.stdout);
                eprintln!("bench: profile in {}", self.report.display());
            }
            Err(e) => eprintln!("bench: perf report: {e}"),
        }
    }
}

/// A per-process counter summed over the proxies (0 for one that is gone).
fn sum_of(pids: &[u32], counter: fn(u32) -> anyhow::Result<u64>) -> u64 {
    pids.iter().map(|p| counter(*p).unwrap_or(0)).sum()
}

fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter()
        .map(|p| proc_cpu_seconds(*p).unwrap_or(0.0))
        .sum()
}

impl Bench {
    fn loadgen(&self, client: &Pod, args: &[String]) -> anyhow::Result<Value> {
        let mut cmd = client.command(&self.loadgen)?;
        cmd.args(args);
        run_json(&mut cmd, Duration::from_secs(120))
    }

    fn measure(
        &self,
        name: &str,
        baseline: Option<&str>,
        client: &Pod,
        target: &Target,
    ) -> anyhow::Result<PathResult> {
        eprintln!("bench: {name}");
        let s = |v: f64| v.to_string();
        let mut rates = Vec::new();
        for (i, rps) in self.plan.rates.iter().enumerate() {
            let profile = (i == 0)
                .then(|| {
                    CpuProfile::start(
                        self.profile.as_deref(),
                        &target.proxies,
                        &format!("{name} {rps} rps"),
                    )
                })
                .flatten();
            let cpu_before = cpu_of(&target.proxies);
            let switches_before = sum_of(&target.proxies, proc_context_switches);
            let syscalls = SyscallCount::start(&target.proxies);
            let started = Instant::now();
            let load = self.loadgen(
                client,
                &[
                    "rate".into(),
                    "--to".into(),
                    target.http.to_string(),
                    "--rps".into(),
                    rps.to_string(),
                    "--seconds".into(),
                    s(self.plan.rate_seconds),
                ],
            )?;
            let wall = started.elapsed().as_secs_f64();
            if let Some(profile) = profile {
                profile.finish();
            }
            let proxy_vcpu = (cpu_of(&target.proxies) - cpu_before) / wall;
            let requests =
                (load["achieved_rps"].as_f64().unwrap_or(0.0) * self.plan.rate_seconds).max(1.0);
            let per_request =
                |after: u64, before: u64| after.saturating_sub(before) as f64 / requests;
            rates.push(RateResult {
                proxy_vcpu,
                proxy_vcpu_per_1000_rps: proxy_vcpu / (*rps as f64 / 1000.0),
                proxy_context_switches_per_request: per_request(
                    sum_of(&target.proxies, proc_context_switches),
                    switches_before,
                ),
                proxy_syscalls_per_request: syscalls
                    .and_then(SyscallCount::finish)
                    .map(|n| n as f64 / requests),
                load,
            });
        }
        let max = self.loadgen(
            client,
            &[
                "max".into(),
                "--to".into(),
                target.http.to_string(),
                "--seconds".into(),
                s(self.plan.max_seconds),
            ],
        )?;
        // The proxies' CPU over the run gives their cost per unit of throughput.
        let bulk = |streams: usize| -> anyhow::Result<Value> {
            let profile = (streams == 1)
                .then(|| {
                    CpuProfile::start(
                        self.profile.as_deref(),
                        &target.proxies,
                        &format!("{name} bulk 1 stream"),
                    )
                })
                .flatten();
            let syscalls = SyscallCount::start(&target.proxies);
            let cpu_before = cpu_of(&target.proxies);
            let started = Instant::now();
            let mut result = self.loadgen(
                client,
                &[
                    "bulk".into(),
                    "--to".into(),
                    target.sink.to_string(),
                    "--streams".into(),
                    streams.to_string(),
                    "--seconds".into(),
                    s(self.plan.bulk_seconds),
                ],
            )?;
            if let Some(profile) = profile {
                profile.finish();
            }
            if !target.proxies.is_empty() {
                let vcpu = (cpu_of(&target.proxies) - cpu_before) / started.elapsed().as_secs_f64();
                result["proxy_vcpu"] = vcpu.into();
                if let Some(gbit) = result["gbit_per_s"].as_f64().filter(|g| *g > 0.0) {
                    result["proxy_vcpu_per_gbit_per_s"] = (vcpu / gbit).into();
                }
                // System calls per MiB carried: what batching of reads and writes saves.
                let mib = result["bytes"].as_f64().unwrap_or(0.0) / (1024.0 * 1024.0);
                if let Some(count) = syscalls
                    .and_then(SyscallCount::finish)
                    .filter(|_| mib > 0.0)
                {
                    result["proxy_syscalls_per_mib"] = (count as f64 / mib).into();
                }
            }
            Ok(result)
        };
        let (bulk_1, bulk_8) = (bulk(1)?, bulk(8)?);
        let profile = CpuProfile::start(
            self.profile.as_deref(),
            &target.proxies,
            &format!("{name} new connections"),
        );
        let connect = self.loadgen(
            client,
            &[
                "connect".into(),
                "--to".into(),
                target.http.to_string(),
                "--seconds".into(),
                s(self.plan.connect_seconds),
            ],
        )?;
        if let Some(profile) = profile {
            profile.finish();
        }
        Ok(PathResult {
            name: name.to_owned(),
            baseline: baseline.map(str::to_owned),
            rates,
            max,
            bulk_1,
            bulk_8,
            connect,
        })
    }
}

/// Agent memory figures, KiB.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Memory {
    /// Node agent RSS with the benchmark's own workloads enrolled, before any load.
    pub idle_kib: u64,
    /// How many workloads that was (the server and one client pod per path).
    pub idle_workloads: usize,
    /// Peak RSS (VmHWM) after all mesh load.
    pub peak_under_load_kib: u64,
    /// RSS with this many more workloads enrolled, idle.
    pub with_workloads_kib: u64,
    /// How many workloads that was.
    pub workloads: usize,
    /// RSS per enrolled idle workload: the growth from `idle_kib` to
    /// `with_workloads_kib`, per added workload, in bytes.
    pub per_idle_workload_bytes: u64,
    /// RSS of both agents per idle connection held open through the tunnel to
    /// the other node (client side and server side together), in bytes.
    pub per_idle_connection_bytes: u64,
}

/// What the kernel's outbound capture hook costs per connect, from the
/// kernel's own BPF run-time statistics, with the client workload untraced
/// and traced by `mesh-agent debug trace` (its verdicts then go out through
/// aya-log): what the trace switch costs when off, and when on.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HookCost {
    /// Average run time of `capture_connect4` per call, untraced, ns.
    pub connect4_ns_untraced: f64,
    /// Calls measured untraced.
    pub connect4_runs_untraced: u64,
    /// New connections per second through the mesh, untraced.
    pub connections_per_s_untraced: f64,
    /// Average run time of `capture_connect4` per call, traced, ns.
    pub connect4_ns_traced: Option<f64>,
    /// Calls measured traced.
    pub connect4_runs_traced: Option<u64>,
    /// New connections per second through the mesh, traced.
    pub connections_per_s_traced: Option<f64>,
    /// Verdict rows `debug trace` printed during the traced run.
    pub traced_rows: Option<usize>,
}

/// `capture_connect4`'s cumulative (run time, run count) from the kernel.
fn connect4_stats(program_id: u32) -> anyhow::Result<(Duration, u64)> {
    let info = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == program_id)
        .with_context(|| format!("program {program_id} is not loaded"))?;
    Ok((info.run_time(), info.run_count()))
}

/// Measures [`HookCost`] with connection churn from `client` (a meshed pod
/// named `bench/<client>` in the config) to `to`.
fn hook_cost(
    bench: &Bench,
    agent: &Agent,
    client: &Pod,
    to: SocketAddr,
) -> anyhow::Result<HookCost> {
    // Counting run time costs a clock read per program run: only while this
    // fd is open, so no other figure pays for it.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map_err(|e| anyhow::anyhow!("enabling BPF run-time statistics: {e}"))?;
    let dump = agent.config_dump()?;
    let program_id = dump["programs"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "capture_connect4"))
        .and_then(|p| p["id"].as_u64())
        .context("capture_connect4 missing from /config_dump")? as u32;
    let churn = || -> anyhow::Result<(f64, u64, f64)> {
        let (time_before, runs_before) = connect4_stats(program_id)?;
        let connect = bench.loadgen(
            client,
            &[
                "connect".into(),
                "--to".into(),
                to.to_string(),
                "--seconds".into(),
                bench.plan.connect_seconds.to_string(),
            ],
        )?;
        let (time_after, runs_after) = connect4_stats(program_id)?;
        let runs = runs_after.saturating_sub(runs_before);
        let ns = time_after.saturating_sub(time_before).as_nanos() as f64 / runs.max(1) as f64;
        Ok((
            ns,
            runs,
            connect["connections_per_s"].as_f64().unwrap_or(0.0),
        ))
    };
    let (ns, runs, rate) = churn()?;
    let mut cost = HookCost {
        connect4_ns_untraced: ns,
        connect4_runs_untraced: runs,
        connections_per_s_untraced: rate,
        ..HookCost::default()
    };
    // A failure here (an agent without `debug trace`) costs the traced half only.
    let traced = || -> anyhow::Result<(f64, u64, f64, usize)> {
        let workload = format!("bench/{}", client.name);
        let mut trace =
            agent.debug_spawn(&bench.tools, &["trace", &workload, "--seconds", "600"])?;
        trace.wait_line(Duration::from_secs(10))?;
        trace.wait_line(Duration::from_secs(5))?;
        let (ns, runs, rate) = churn()?;
        std::thread::sleep(Duration::from_millis(500));
        Ok((ns, runs, rate, trace.new_lines().len()))
    };
    match traced() {
        Ok((ns, runs, rate, rows)) => {
            cost.connect4_ns_traced = Some(ns);
            cost.connect4_runs_traced = Some(runs);
            cost.connections_per_s_traced = Some(rate);
            cost.traced_rows = Some(rows);
        }
        Err(e) => eprintln!("bench: no traced connect figure: {e:#}"),
    }
    Ok(cost)
}

/// Idle connections held open for the per-connection memory figure.
const IDLE_CONNECTIONS: usize = 1000;
const ECHO_PORT: u16 = 9000;

/// Both agents' RSS growth per idle connection: `IDLE_CONNECTIONS` echo
/// connections from `client` to `far` (through the tunnel), held open.
fn idle_connection_bytes(
    bench: &Bench,
    client: &Pod,
    far: &Pod,
    near_agent: &Agent,
    far_agent: &Agent,
) -> anyhow::Result<u64> {
    let rss = || -> anyhow::Result<u64> { Ok(near_agent.rss_kib()? + far_agent.rss_kib()?) };
    let _echo = far.serve(
        &bench.tools,
        &["echo", "--listen", &far.addr(ECHO_PORT).to_string()],
    )?;
    let before = rss()?;
    let mut cmd = client.command(&bench.tools.podtool)?;
    let count = IDLE_CONNECTIONS.to_string();
    cmd.args(["connect", "--to", &far.addr(ECHO_PORT).to_string()])
        .args([
            "--count",
            &count,
            "--concurrency",
            &count,
            "--hold-ms",
            "8000",
        ]);
    let held = Process::spawn(&mut cmd, "idle connections")?;
    let mut open = (0, 0);
    let waited =
        nodemesh_testkit::wait_until("idle connections open", Duration::from_secs(30), || {
            open = (
                near_agent.connections()?.len(),
                far_agent.connections()?.len(),
            );
            Ok(open.0 >= IDLE_CONNECTIONS && open.1 >= IDLE_CONNECTIONS)
        });
    if let Err(e) = waited {
        anyhow::bail!(
            "{e}: {open:?} open (near, far); loader said {:?}; the agents' last warnings:\n{}",
            held.wait(Duration::from_secs(30)).map(|f| f.stdout),
            last_warnings(&[near_agent, far_agent])
        );
    }
    let during = rss()?;
    held.wait(Duration::from_secs(60))?;
    Ok(during.saturating_sub(before) * 1024 / IDLE_CONNECTIONS as u64)
}

/// The last few warning and error lines of each agent's log, so a failed
/// measurement says why without a rerun.
fn last_warnings(agents: &[&Agent]) -> String {
    const LINES: usize = 5;
    let mut out = String::new();
    for agent in agents {
        let log = agent.log();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .collect();
        for line in &lines[lines.len().saturating_sub(LINES)..] {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let bench = Bench {
        tools: Tools::new(env_path("NODEMESH_PODTOOL_BIN")?)?,
        loadgen: env_path("NODEMESH_LOADGEN_BIN")?,
        plan: Plan::new(cli.quick),
        profile: cli.profile.clone(),
    };
    let started = Instant::now();

    let mut local = Node::with_index(0)?;
    let mut remote = Node::with_index(1)?;
    local.link(&remote)?;
    let server = local.add_pod("server", "bench")?;
    let far = remote.add_pod("far-server", "bench")?;
    // Whichever side closes first holds TIME_WAIT; servers get the same setting as clients.
    for pod in [&server, &far] {
        pod.sysctl("net/ipv4/tcp_tw_reuse", "1")?;
    }
    let mut servers: Vec<Process> = Vec::new();
    for pod in [&server, &far] {
        servers.push(pod.serve(
            &bench.tools,
            &["http", "--listen", &pod.addr(HTTP_PORT).to_string()],
        )?);
        servers.push(pod.serve(
            &bench.tools,
            &["sink", "--listen", &pod.addr(SINK_PORT).to_string()],
        )?);
    }
    // A fresh client pod per path, so no path inherits another's TIME_WAIT sockets.
    // tcp_tw_reuse=1 keeps the connection-rate test measuring the path rather than
    // ephemeral-port exhaustion, which caps direct and meshed clients alike at
    // ~1,000 connections/s to one destination once TIME_WAIT fills the port range.
    let mut client = |name: &str| -> anyhow::Result<Pod> {
        let pod = local.add_pod(name, "bench")?;
        pod.sysctl("net/ipv4/tcp_tw_reuse", "1")?;
        Ok(pod)
    };
    let direct_same = client("direct-same")?;
    let direct_cross = client("direct-cross")?;
    let mesh_same = client("mesh-same")?;
    let mesh_cross = client("mesh-cross")?;
    let mesh_l7 = client("mesh-l7")?;
    let mesh_fast = client("mesh-fast")?;
    let mesh_hook = client("mesh-hook")?;
    let sidecar_client = client("sidecar")?;
    let to = |pod: &Pod, proxies: &[u32]| Target {
        http: pod.addr(HTTP_PORT),
        sink: pod.addr(SINK_PORT),
        proxies: proxies.to_vec(),
    };
    const DIRECT_SAME: &str = "direct, same node";
    const DIRECT_CROSS: &str = "direct, cross node";
    const SIDECAR: &str = "sidecar pair (HAProxy, mTLS), same node";
    let selected = |name: &str| cli.only.is_empty() || cli.only.iter().any(|o| name.contains(o));

    // Baselines first, with no agent running: once the server pod is meshed, the
    // agent steers every inbound connection from outside the mesh to itself.
    let mut paths = Vec::new();
    for (name, client, target) in [
        (DIRECT_SAME, &direct_same, to(&server, &[])),
        (DIRECT_CROSS, &direct_cross, to(&far, &[])),
    ] {
        if selected(name) {
            paths.push(bench.measure(name, None, client, &target)?);
        }
    }
    let mut sidecar_result = None;
    if selected(SIDECAR) {
        let pair = sidecar::SidecarPair::start(&sidecar_client, &server, HTTP_PORT, SINK_PORT)?;
        let target = Target {
            http: SocketAddr::from(([127, 0, 0, 1], sidecar::HTTP_PORT)),
            sink: SocketAddr::from(([127, 0, 0, 1], sidecar::BULK_PORT)),
            proxies: pair.pids().to_vec(),
        };
        sidecar_result =
            Some(bench.measure(SIDECAR, Some(DIRECT_SAME), &sidecar_client, &target)?);
    }

    // The mesh: both agents share a CA and the whole config (each enrolls only its
    // node's pods), so meshed traffic takes the full path of the day: capture,
    // mTLS tunnel to the destination pod's port 15008, delivery in the pod.
    let ca = MeshCa::init(&bench.tools)?;
    let local_config = vec![
        server.workload_yaml(),
        mesh_same.workload_yaml(),
        mesh_cross.workload_yaml(),
        mesh_l7.workload_yaml(),
        mesh_fast.workload_yaml(),
        mesh_hook.workload_yaml(),
    ];
    let mut all = local_config.clone();
    all.push(far.workload_yaml());
    // The L7 path: the same server behind a Service VIP, routed per request by an
    // HTTPRoute (keep-alive upstream connections over the tunnel); bulk on an
    // opaque port of the same Service.
    all.push(format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: server, namespace: bench}}\nspec:\n  clusterIP: {L7_VIP}\n  selector: {{app: server}}\n  ports:\n  - {{port: 80, targetPort: {HTTP_PORT}}}\n  - {{port: {SINK_PORT}, appProtocol: tcp}}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: server, namespace: bench}}\nspec:\n  parentRefs: [{{kind: Service, name: server}}]\n  rules:\n  - backendRefs: [{{name: server, port: 80}}]\n"
    ));
    let agent = Agent::start_with(&bench.tools, &local, &yaml_docs(&all), &ca.args())?;
    let remote_agent = Agent::start_with(&bench.tools, &remote, &yaml_docs(&all), &ca.args())?;
    let agents = vec![agent.pid(), remote_agent.pid()];
    std::thread::sleep(Duration::from_secs(1));
    let memory_idle = agent.rss_kib()?;
    for (name, baseline, client, target) in [
        (
            "mesh (mTLS), same node",
            DIRECT_SAME,
            &mesh_same,
            to(&server, &agents),
        ),
        (
            "mesh (mTLS), cross node",
            DIRECT_CROSS,
            &mesh_cross,
            to(&far, &agents),
        ),
        (
            "mesh L7 via Service (mTLS), same node",
            DIRECT_SAME,
            &mesh_l7,
            Target {
                http: SocketAddr::new(L7_VIP.parse().expect("VIP"), 80),
                sink: SocketAddr::new(L7_VIP.parse().expect("VIP"), SINK_PORT),
                proxies: agents.clone(),
            },
        ),
    ] {
        if selected(name) {
            paths.push(bench.measure(name, Some(baseline), client, &target)?);
        }
    }
    let peak = proc_status_kib(agent.pid(), "VmHWM")?;
    paths.extend(sidecar_result);

    // Its own client pod, so the churn of the paths above left it no TIME_WAIT.
    const HOOK_COST: &str = "kernel connect hook, untraced and traced";
    let hook = if selected(HOOK_COST) {
        eprintln!("bench: {HOOK_COST}");
        hook_cost(&bench, &agent, &mesh_hook, server.addr(HTTP_PORT))
            .inspect_err(|e| eprintln!("bench: no kernel hook figure: {e:#}"))
            .ok()
    } else {
        None
    };

    eprintln!("bench: enrolling {WORKLOADS_FOR_MEMORY} more workloads for the memory figure");
    let mut extra = Vec::new();
    for i in 0..WORKLOADS_FOR_MEMORY {
        extra.push(local.add_pod(&format!("idle-{i}"), "bench")?);
    }
    let mut docs = all.clone();
    docs.extend(extra.iter().map(Pod::workload_yaml));
    agent.reconfigure(&yaml_docs(&docs))?;
    std::thread::sleep(Duration::from_secs(1));
    let with_workloads_kib = agent.rss_kib()?;
    // A failure here costs one figure, not the run's.
    let per_idle_connection_bytes =
        idle_connection_bytes(&bench, &mesh_cross, &far, &agent, &remote_agent)
            .inspect_err(|e| eprintln!("bench: no per-connection memory figure: {e:#}"))
            .unwrap_or(0);
    let memory = Memory {
        idle_kib: memory_idle,
        idle_workloads: local_config.len(),
        peak_under_load_kib: peak,
        with_workloads_kib,
        workloads: local_config.len() + WORKLOADS_FOR_MEMORY,
        per_idle_workload_bytes: with_workloads_kib.saturating_sub(memory_idle) * 1024
            / WORKLOADS_FOR_MEMORY as u64,
        per_idle_connection_bytes,
    };

    // The experimental same-node fast path (sockets joined in the kernel) is a
    // node-wide agent setting: a second agent with it on replaces the first
    // (adopting its pinned programs) for one more path.
    const FAST_PATH: &str = "mesh (mTLS), same node, kernel fast path";
    if selected(FAST_PATH) {
        drop(agent);
        let mut args = ca.args().to_vec();
        args.push("--same-node-fast-path=true");
        let agent = Agent::start_with(&bench.tools, &local, &yaml_docs(&all), &args)?;
        std::thread::sleep(Duration::from_secs(1));
        let target = to(&server, &[agent.pid(), remote_agent.pid()]);
        paths.push(bench.measure(FAST_PATH, Some(DIRECT_SAME), &mesh_fast, &target)?);
    }

    let results = report::Results::new(
        bench.plan.clone(),
        cli.quick,
        paths,
        memory,
        hook,
        started.elapsed(),
    );
    let written = results.write(&cli.out, cli.only.is_empty())?;
    println!("{}", results.markdown());
    for path in written {
        println!("wrote {}", path.display());
    }
    Ok(())
}
