//! The mesh never fails open: with the agent killed, a meshed pod's connections
//! are refused at once in both directions (the pinned programs keep deciding),
//! nothing leaves the pod in the clear, unmeshed pods are unaffected; a new
//! agent adopts the pinned state and serves again. `--on-agent-down open` and
//! `mesh-agent uninstall` are the deliberate ways out.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nodemesh_testkit::{
    Agent, MeshCa, Node, Pod, Process, Tools, assert_lossless, run, run_json, start_tcp_load,
    wait_until, yaml_docs,
};

const ECHO_PORT: u16 = 9000;
const RUN: Duration = Duration::from_secs(30);

/// Node 0: meshed client `a`, meshed server `s`, unmeshed client `u` and
/// unmeshed server `v`. Node 1: meshed server `b`. One CA, an agent per node.
struct Cluster {
    tools: Tools,
    near: Agent,
    far: Agent,
    a: Pod,
    s: Pod,
    u: Pod,
    v: Pod,
    b: Pod,
    config: String,
    args: Vec<String>,
    _servers: Vec<Process>,
    node0: Node,
    node1: Node,
    ca: MeshCa,
}

impl Cluster {
    fn new(extra_args: &[&str]) -> Self {
        Self::with(extra_args, "")
    }

    /// [`Cluster::new`] with `a_spec` appended to pod `a`'s Workload spec.
    fn with(extra_args: &[&str], a_spec: &str) -> Self {
        let tools = Tools::new(env!("CARGO_BIN_EXE_podtool")).unwrap();
        let ca = MeshCa::init(&tools).unwrap();
        let mut node0 = Node::with_index(0).unwrap();
        let mut node1 = Node::with_index(1).unwrap();
        node0.link(&node1).unwrap();
        let a = node0.add_pod("a", "shop").unwrap();
        let s = node0.add_pod("s", "shop").unwrap();
        let u = node0.add_pod("u", "legacy").unwrap();
        let v = node0.add_pod("v", "legacy").unwrap();
        let b = node1.add_pod("b", "backend").unwrap();
        let servers = [&s, &v, &b]
            .iter()
            .map(|p| {
                p.serve(
                    &tools,
                    &["echo", "--listen", &p.addr(ECHO_PORT).to_string()],
                )
                .unwrap()
            })
            .collect();
        // `u` and `v` are not in the mesh.
        let config = yaml_docs(&[
            a.workload_yaml_with(a_spec),
            s.workload_yaml(),
            b.workload_yaml(),
        ]);
        let mut args: Vec<String> = ca.args().iter().map(|s| s.to_string()).collect();
        args.extend(extra_args.iter().map(|s| s.to_string()));
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let near = Agent::start_with(&tools, &node0, &config, &argv).unwrap();
        let far = Agent::start_with(&tools, &node1, &config, &argv).unwrap();
        Cluster {
            tools,
            near,
            far,
            a,
            s,
            u,
            v,
            b,
            config,
            args,
            _servers: servers,
            node0,
            node1,
            ca,
        }
    }

    fn podtool(&self, pod: &Pod, args: &[&str]) -> serde_json::Value {
        let mut cmd = pod.command(&self.tools.podtool).unwrap();
        cmd.args(args);
        run_json(&mut cmd, RUN).unwrap()
    }

    fn probe(&self, from: &Pod, to: &Pod) -> (String, u64) {
        let report = self.podtool(
            from,
            &[
                "probe",
                "--to",
                &to.addr(ECHO_PORT).to_string(),
                "--timeout-ms",
                "5000",
            ],
        );
        (
            report["outcome"].as_str().unwrap().to_owned(),
            report["elapsed_ms"].as_u64().unwrap(),
        )
    }

    fn assert_served(&self, from: &Pod, to: &Pod) {
        let (outcome, _) = self.probe(from, to);
        assert_eq!(outcome, "data", "{} -> {}", from.name, to.name);
    }

    fn restart_near(&mut self) {
        let config = self.config.clone();
        self.restart_near_with(&config);
    }

    fn restart_near_with(&mut self, config: &str) {
        let argv: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.near = Agent::start_with(&self.tools, &self.node0, config, &argv).unwrap();
    }

    fn kill_near(&mut self) {
        let status = self
            .near
            .signal_and_wait(libc::SIGKILL, Duration::from_secs(5))
            .expect("agent killed");
        assert!(!status.success());
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- node 0 agent log ---\n{}", self.near.log());
            eprintln!("--- node 1 agent log ---\n{}", self.far.log());
        }
    }
}

/// Captures TCP leaving a pod (on its own interface) while alive.
struct PodCapture {
    process: Process,
    file: tempfile::NamedTempFile,
}

impl PodCapture {
    fn start(pod: &Pod) -> Self {
        let file = tempfile::NamedTempFile::new().unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &pod.netns.name, "tcpdump"])
            .args(["-i", "any", "-U", "-s", "0", "-w"])
            .arg(file.path())
            .args(["tcp", "and", "src", "host", &pod.ip.to_string()]);
        let process = Process::spawn(&mut cmd, "tcpdump").unwrap();
        std::thread::sleep(Duration::from_millis(700));
        PodCapture { process, file }
    }

    /// Packets captured (a pcap file is a 24-byte header, then 16 bytes per
    /// packet header plus the packet).
    fn finish(self) -> usize {
        std::thread::sleep(Duration::from_millis(300));
        run(Command::new("kill").args(["-INT", &self.process.pid().to_string()])).unwrap();
        let _ = self.process.wait(Duration::from_secs(5));
        let pcap = std::fs::read(self.file.path()).unwrap();
        let mut packets = 0;
        let mut at = 24;
        while at + 16 <= pcap.len() {
            let caplen = u32::from_le_bytes(pcap[at + 8..at + 12].try_into().unwrap()) as usize;
            at += 16 + caplen;
            packets += 1;
        }
        packets
    }
}

fn pins(node: &Node) -> usize {
    mesh_agent::node::pins::count_pins(&node.bpf_dir)
}

/// Acceptance 1: `kill -9` of the agent. A meshed pod's connections to a pod on
/// the same node and on another node are refused at once and no packet leaves
/// it; plaintext into a meshed pod is refused; unmeshed pods are unaffected. A
/// new agent adopts the pinned programs and maps and serves every pod again.
#[test]
fn a_killed_agent_fails_closed_and_its_successor_adopts_the_pins() {
    let mut mesh = Cluster::new(&[]);
    mesh.assert_served(&mesh.a, &mesh.s);
    mesh.assert_served(&mesh.a, &mesh.b);
    let pinned = pins(&mesh.node0);
    assert!(pinned >= 10, "only {pinned} pinned objects");

    mesh.kill_near();
    let capture = PodCapture::start(&mesh.a);
    for to in [&mesh.s, &mesh.b] {
        let (outcome, elapsed) = mesh.probe(&mesh.a, to);
        assert_eq!(
            outcome, "connect_error: PermissionDenied",
            "a -> {}",
            to.name
        );
        assert!(elapsed < 1000, "refusal took {elapsed} ms");
    }
    let left = capture.finish();
    assert_eq!(left, 0, "{left} packets left the meshed pod with no agent");
    // Plaintext into a meshed pod is reset; unmeshed pods talk as before.
    let (outcome, elapsed) = mesh.probe(&mesh.u, &mesh.s);
    assert_eq!(outcome, "connect_error: ConnectionRefused", "u -> s");
    assert!(elapsed < 1000, "refusal took {elapsed} ms");
    // The same capture sees an unmeshed pod's packets: the zero above is real.
    let control = PodCapture::start(&mesh.u);
    mesh.assert_served(&mesh.u, &mesh.v);
    assert!(control.finish() > 0, "the capture saw nothing at all");
    assert_eq!(pins(&mesh.node0), pinned, "pins changed with no agent");

    mesh.restart_near();
    mesh.near
        .log_line("adoption logged", |l| l.contains("startup=Adopted"));
    mesh.assert_served(&mesh.a, &mesh.s);
    mesh.assert_served(&mesh.a, &mesh.b);
    mesh.assert_served(&mesh.u, &mesh.v);
    assert_eq!(
        pins(&mesh.node0),
        pinned,
        "the successor pinned a second set"
    );
    // The kernel counted the refusals while no agent ran; the successor reports them.
    let decision = |d: &str| {
        mesh.near
            .metric("nodemesh_capture_decisions_total", &[("decision", d)])
            .unwrap()
    };
    assert_eq!(decision("agent_down_refused"), 2.0);
    assert_eq!(decision("inbound_agent_down_refused"), 1.0);
}

/// With `--on-agent-down open` a killed agent's pods go direct, as chosen, and
/// the agent said so when it started.
#[test]
fn on_agent_down_open_goes_direct_and_says_so() {
    let mut mesh = Cluster::new(&["--on-agent-down", "open"]);
    mesh.near.log_line("open mode warned", |l| {
        l.contains("WARN") && l.contains("--on-agent-down open")
    });
    mesh.assert_served(&mesh.a, &mesh.s);
    mesh.kill_near();
    mesh.assert_served(&mesh.a, &mesh.s);
    mesh.assert_served(&mesh.a, &mesh.b);
    mesh.assert_served(&mesh.u, &mesh.s);
    mesh.restart_near();
    let direct = mesh
        .near
        .metric(
            "nodemesh_capture_decisions_total",
            &[("decision", "agent_down_direct")],
        )
        .unwrap();
    assert_eq!(direct, 2.0);
}

/// `mesh-agent uninstall` removes the pins, so with no agent the pods talk
/// directly: taking the mesh off a node is a deliberate step.
#[test]
fn uninstall_removes_the_pins_and_capture_with_them() {
    let mut mesh = Cluster::new(&[]);
    mesh.kill_near();
    let (outcome, _) = mesh.probe(&mesh.a, &mesh.s);
    assert_eq!(outcome, "connect_error: PermissionDenied");
    let out = run(Command::new(&mesh.tools.agent)
        .arg("uninstall")
        .arg("--bpf-dir")
        .arg(&mesh.node0.bpf_dir))
    .unwrap();
    assert!(out.contains("removed"), "{out}");
    assert_eq!(pins(&mesh.node0), 0);
    assert!(!Path::new(&mesh.node0.bpf_dir).exists());
    mesh.assert_served(&mesh.a, &mesh.s);
    mesh.assert_served(&mesh.a, &mesh.b);
}

/// Crash recovery: a pod that left the mesh while no agent ran is no longer
/// refused once the successor starts: it sweeps the kernel entries, addresses
/// and links nothing it serves accounts for.
#[test]
fn a_successor_sweeps_state_left_for_pods_that_left_the_mesh() {
    let mut mesh = Cluster::new(&[]);
    let entries = |agent: &Agent| {
        (
            agent.map_entries("WORKLOADS").unwrap(),
            agent.map_entries("MESHED_ADDRS").unwrap(),
        )
    };
    assert_eq!(entries(&mesh.near), (2, 4));
    let pinned = pins(&mesh.node0);
    mesh.kill_near();
    let (outcome, _) = mesh.probe(&mesh.s, &mesh.v);
    assert_eq!(outcome, "connect_error: PermissionDenied");

    // `s` leaves the mesh while node 0 has no agent.
    let config = yaml_docs(&[mesh.a.workload_yaml(), mesh.b.workload_yaml()]);
    mesh.restart_near_with(&config);
    mesh.near.log_line("sweep logged", |l| {
        l.contains("removed kernel state left for pods no longer served")
            && l.contains("workloads=1")
            && l.contains("netns_links=1")
    });
    assert_eq!(entries(&mesh.near), (1, 2));
    assert_eq!(
        pins(&mesh.node0),
        pinned - 1,
        "s's sk_lookup link stayed pinned"
    );
    mesh.assert_served(&mesh.s, &mesh.v);
    mesh.assert_served(&mesh.u, &mesh.s);
    mesh.assert_served(&mesh.a, &mesh.b);
}

/// An agent of another build (another generation of pinned objects) takes over
/// the links in force atomically, once its own maps hold every pod, and removes
/// the other build's pins.
#[test]
fn a_successor_of_another_build_takes_over_the_links() {
    let mut mesh = Cluster::new(&[]);
    let pinned = pins(&mesh.node0);
    mesh.kill_near();
    // Pretend the pins came from another build: a different stamp directory.
    let generation = std::fs::read_dir(&mesh.node0.bpf_dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::rename(&generation, mesh.node0.bpf_dir.join("0000000000000000")).unwrap();
    let (outcome, _) = mesh.probe(&mesh.a, &mesh.s);
    assert_eq!(outcome, "connect_error: PermissionDenied");

    mesh.restart_near();
    mesh.near.log_line("takeover logged", |l| {
        l.contains("took over capture") && l.contains("links=3")
    });
    assert!(mesh.near.log().contains("startup=TakingOver"));
    assert!(!mesh.node0.bpf_dir.join("0000000000000000").exists());
    assert!(generation.exists());
    assert_eq!(pins(&mesh.node0), pinned);
    mesh.assert_served(&mesh.a, &mesh.s);
    mesh.assert_served(&mesh.a, &mesh.b);
    mesh.assert_served(&mesh.u, &mesh.v);
    // The taken-over links stay in force with this build's programs: a second
    // kill still fails closed.
    mesh.kill_near();
    let (outcome, _) = mesh.probe(&mesh.a, &mesh.s);
    assert_eq!(outcome, "connect_error: PermissionDenied");
}

/// Starts `podtool tcp-load` from `from` to `to`'s echo server; returns once it runs.
fn start_load(
    mesh: &Cluster,
    from: &Pod,
    to: &Pod,
    streams: u32,
    rate: u32,
    seconds: f64,
) -> Process {
    start_tcp_load(
        &mesh.tools,
        from,
        to.addr(ECHO_PORT),
        streams,
        rate,
        seconds,
    )
    .unwrap()
}

/// Acceptance 2: an upgrade under load, as a DaemonSet surge does it. On each
/// node in turn a second agent starts with the same flags while 100 long-lived
/// streams (bytes both ways, to a pod on the same node and one on the other)
/// and 300 new connections a second run through the mesh; then the old one gets
/// SIGTERM. Nothing is refused or fails, every stream completes byte-exact, and
/// each old agent exits once its last connection closes.
#[test]
fn an_upgrade_under_load_refuses_nothing_and_cuts_no_stream() {
    let mut mesh = Cluster::new(&[]);
    const SECONDS: f64 = 10.0;
    let loads = [
        start_load(&mesh, &mesh.a, &mesh.s, 50, 150, SECONDS),
        start_load(&mesh, &mesh.a, &mesh.b, 50, 150, SECONDS),
    ];
    let load_started = Instant::now();
    std::thread::sleep(Duration::from_secs(2));

    let argv: Vec<&str> = mesh.args.iter().map(String::as_str).collect();
    let upgrade = |old: &mut Agent, node: &Node| -> Agent {
        let successor = old.start_successor(&mesh.tools, node, &argv).unwrap();
        old.log_line("handover logged", |l| {
            l.contains("handed over to a successor")
        });
        successor.log_line("successor serving", |l| {
            l.contains("the previous agent stopped accepting")
        });
        old.signal(libc::SIGTERM);
        successor
    };
    let near = upgrade(&mut mesh.near, &mesh.node0);
    std::thread::sleep(Duration::from_secs(2));
    let far = upgrade(&mut mesh.far, &mesh.node1);
    for old in [&mut mesh.near, &mut mesh.far] {
        let status = old
            .wait_exit(Duration::from_secs(30))
            .expect("the old agent exits once its connections are done");
        let exited_after = load_started.elapsed();
        assert!(status.success(), "{status}");
        assert!(
            exited_after.as_secs_f64() >= SECONDS - 0.5,
            "an old agent exited after {exited_after:?}, before its streams ended"
        );
        assert!(old.log().contains("no connections left"));
    }

    // The successors serve now: a failure below prints their logs.
    drop(std::mem::replace(&mut mesh.near, near));
    drop(std::mem::replace(&mut mesh.far, far));
    for load in loads {
        let report = load.wait(RUN).unwrap().report().unwrap();
        assert_lossless(&report, 50);
    }
    // The successors carried new connections during the load, and serve on.
    for (agent, reporter, label) in [
        (&mesh.near, "source", "source_workload"),
        (&mesh.far, "destination", "destination_workload"),
    ] {
        let workload = if reporter == "source" { "a" } else { "b" };
        let carried = agent
            .metric(
                "istio_tcp_connections_opened_total",
                &[("reporter", reporter), (label, workload)],
            )
            .unwrap();
        assert!(
            carried > 100.0,
            "a successor carried only {carried} connections"
        );
    }
    mesh.assert_served(&mesh.a, &mesh.s);
    mesh.assert_served(&mesh.a, &mesh.b);
}

/// Holds `count` echo connections from `from` to `to` for `hold_ms`, in the
/// background; returns once the agent counts them open.
fn hold_connections(mesh: &Cluster, from: &Pod, to: &Pod, count: usize, hold_ms: u64) -> Process {
    let mut cmd = from.command(&mesh.tools.podtool).unwrap();
    cmd.args(["connect", "--to", &to.addr(ECHO_PORT).to_string()])
        .args([
            "--count",
            &count.to_string(),
            "--concurrency",
            &count.to_string(),
        ])
        .args(["--hold-ms", &hold_ms.to_string()]);
    let held = Process::spawn(&mut cmd, "podtool connect").unwrap();
    wait_until("connections held", Duration::from_secs(10), || {
        let open = mesh
            .near
            .connections()?
            .iter()
            .filter(|c| {
                c.reporter == "source" && c.source_workload.ends_with(&format!("/{}", from.name))
            })
            .count();
        Ok(open >= count)
    })
    .unwrap();
    held
}

/// Acceptance 4, per pod: `a` may hold 10 connections (`spec.maxConnections`).
/// With 10 open, its next one is reset at once and counted; `s` is served, and
/// `a` again once its connections close.
#[test]
fn a_pod_over_its_connection_limit_is_reset_at_once_and_others_are_served() {
    let mesh = Cluster::with(&[], "  maxConnections: 10\n");
    let held = hold_connections(&mesh, &mesh.a, &mesh.s, 10, 4000);
    let (outcome, elapsed) = mesh.probe(&mesh.a, &mesh.s);
    assert!(
        outcome.contains("Reset") || outcome == "eof",
        "over the limit: {outcome}"
    );
    assert!(elapsed < 1000, "refusal took {elapsed} ms");
    let refused = mesh
        .near
        .metric(
            "nodemesh_connections_refused_total",
            &[("reason", "workload_limit"), ("workload", "shop/a")],
        )
        .unwrap();
    assert_eq!(refused, 1.0);
    mesh.near.log_line("refusal logged", |l| {
        l.contains("over a limit") && l.contains("response_flags=\"UO\"") && l.contains("shop/a")
    });
    mesh.assert_served(&mesh.s, &mesh.b);
    let report = held.wait(RUN).unwrap().report().unwrap();
    assert_eq!(report["failed"], 0, "{report}");
    mesh.assert_served(&mesh.a, &mesh.s);
}

/// One echo connection from `a` to `s`, pinged every `interval_ms` for
/// `seconds`, in the background; returns once it is connected.
fn hold_echo(mesh: &Cluster, seconds: u32, interval_ms: u32) -> Process {
    let mut hold = mesh.a.command(&mesh.tools.podtool).unwrap();
    hold.args(["hold", "--to", &mesh.s.addr(ECHO_PORT).to_string()])
        .args(["--seconds", &seconds.to_string()])
        .args(["--interval-ms", &interval_ms.to_string()]);
    let mut held = Process::spawn(&mut hold, "podtool hold").unwrap();
    held.wait_line(Duration::from_secs(5)).unwrap();
    held
}

/// The lowest descriptor number the process does not use: with RLIMIT_NOFILE
/// set to it, the process's next descriptor cannot be made.
fn lowest_free_fd(pid: u32) -> u64 {
    let used: std::collections::HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    (0..).find(|fd| !used.contains(fd)).unwrap()
}

/// Sets the soft RLIMIT_NOFILE of `pid` (the hard one stays: raising it back
/// would need CAP_SYS_RESOURCE); returns the soft limit it had.
fn set_fd_limit(pid: u32, soft: u64) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let before = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        .unwrap();
    run(Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={soft}:")))
    .unwrap();
    before
}

/// Acceptance 4, descriptors: with RLIMIT_NOFILE lowered until the agent runs
/// out, a new connection fails at once (never waits in the backlog), the
/// established ones keep flowing, and once descriptors are back new
/// connections are served again.
#[test]
fn out_of_descriptors_the_agent_refuses_new_connections_and_keeps_the_established() {
    let mesh = Cluster::new(&[]);
    mesh.assert_served(&mesh.a, &mesh.s);
    let held = hold_echo(&mesh, 4, 100);
    let pid = mesh.near.pid();
    let normal = set_fd_limit(pid, lowest_free_fd(pid));
    for _ in 0..3 {
        let (outcome, elapsed) = mesh.probe(&mesh.a, &mesh.s);
        assert_ne!(outcome, "data", "served with no descriptor to spare");
        assert!(elapsed < 1000, "{outcome} took {elapsed} ms");
    }
    let report = held.wait(RUN).unwrap().report().unwrap();
    assert!(
        report["error"].is_null(),
        "the established connection broke: {report}"
    );
    assert!(report["pings"].as_u64().unwrap() > 10, "{report}");
    set_fd_limit(pid, normal);
    // Reading metrics needs a descriptor too: only now.
    let shed = mesh
        .near
        .metric(
            "nodemesh_connections_refused_total",
            &[("reason", "fd_exhausted"), ("workload", "shop/a")],
        )
        .unwrap();
    assert!(
        shed >= 1.0,
        "no connection was shed for want of descriptors"
    );
    mesh.assert_served(&mesh.a, &mesh.s);
    mesh.assert_served(&mesh.a, &mesh.b);
    assert!(mesh.near.get("/healthz/ready").is_ok());
}

/// Replaces files of a CA directory the way a Secret update does: every new
/// file written aside first, then all renamed into place at once.
fn replace_files(dir: &Path, files: &[(&str, String)]) {
    for (name, content) in files {
        std::fs::write(dir.join(format!(".{name}.new")), content).unwrap();
    }
    for (name, _) in files {
        std::fs::rename(dir.join(format!(".{name}.new")), dir.join(name)).unwrap();
    }
}

fn serials(agent: &Agent) -> Vec<String> {
    let mut serials: Vec<String> = agent.config_dump().unwrap()["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["serial"].as_str().map(str::to_owned))
        .collect();
    serials.sort();
    serials
}

/// Acceptance 5, rotation: the mesh root is rotated the way Istio's plug-in CA
/// is, under load: (1) the new root is added beside the old, (2) the signing
/// intermediate is replaced by one under the new root, and every workload
/// certificate is re-issued from it, (3) the old root is removed. No connection
/// fails at any step, and afterwards new handshakes chain to the new root only.
#[test]
fn a_root_rotation_with_overlap_loses_no_connection() {
    let mut mesh = Cluster::new(&[]);
    let next = MeshCa::init(&mesh.tools).unwrap();
    let read = |dir: &Path, name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
    let (old_root, new_root) = (
        read(&mesh.ca.dir, "root-cert.pem"),
        read(&next.dir, "root-cert.pem"),
    );
    let before = [serials(&mesh.near), serials(&mesh.far)];
    let loads = [
        start_load(&mesh, &mesh.a, &mesh.s, 20, 50, 8.0),
        start_load(&mesh, &mesh.a, &mesh.b, 20, 50, 8.0),
    ];
    let agents = [&mesh.near, &mesh.far];
    let reloaded = |what: &str, count: usize| {
        for agent in agents {
            wait_until(what, Duration::from_secs(10), || {
                Ok(agent.log().matches(what).count() >= count)
            })
            .unwrap();
        }
    };

    std::thread::sleep(Duration::from_secs(1));
    replace_files(
        &mesh.ca.dir,
        &[("root-cert.pem", format!("{old_root}{new_root}"))],
    );
    reloaded("trust bundle reloaded", 1);
    std::thread::sleep(Duration::from_secs(1));
    replace_files(
        &mesh.ca.dir,
        &[
            ("ca-cert.pem", read(&next.dir, "ca-cert.pem")),
            ("ca-key.pem", read(&next.dir, "ca-key.pem")),
            ("cert-chain.pem", read(&next.dir, "cert-chain.pem")),
        ],
    );
    reloaded("signing CA reloaded", 1);
    for (agent, before) in agents.iter().zip(&before) {
        wait_until("certificates re-issued", Duration::from_secs(10), || {
            let now = serials(agent);
            Ok(now.len() == before.len() && now.iter().all(|s| !before.contains(s)))
        })
        .unwrap();
    }
    std::thread::sleep(Duration::from_secs(1));
    replace_files(&mesh.ca.dir, &[("root-cert.pem", new_root)]);
    reloaded("trust bundle reloaded", 2);

    for load in loads {
        let report = load.wait(RUN).unwrap().report().unwrap();
        assert_lossless(&report, 20);
    }
    // A fresh agent on node 0 must handshake anew: node 1's re-issued
    // certificate and its new trust bundle (the new root only) take it.
    mesh.kill_near();
    mesh.restart_near();
    mesh.assert_served(&mesh.a, &mesh.b);
    for agent in [&mesh.near, &mesh.far] {
        assert!(
            !agent.log().contains("mesh CA files unusable"),
            "{}",
            agent.log()
        );
    }
}

/// Acceptance 5, CA gone: removing the CA files (a Secret deleted by mistake)
/// keeps traffic flowing on the certificates in use, with the error in
/// `/healthz/ready`'s body and `nodemesh_ca_healthy` at 0; restoring them clears it.
#[test]
fn removing_the_ca_files_keeps_traffic_flowing_and_says_so() {
    let mesh = Cluster::new(&[]);
    mesh.assert_served(&mesh.a, &mesh.b);
    let saved = tempfile::tempdir().unwrap();
    let names = [
        "ca-cert.pem",
        "ca-key.pem",
        "root-cert.pem",
        "cert-chain.pem",
    ];
    for name in names {
        std::fs::rename(mesh.ca.dir.join(name), saved.path().join(name)).unwrap();
    }
    for agent in [&mesh.near, &mesh.far] {
        wait_until("CA error reported", Duration::from_secs(10), || {
            Ok(agent.metric("nodemesh_ca_healthy", &[])? == 0.0)
        })
        .unwrap();
        let ready = agent.get("/healthz/ready").unwrap();
        assert!(ready.starts_with("ready"), "{ready}");
        assert!(
            ready.contains("warning: mesh CA") && ready.contains("root-cert.pem"),
            "{ready}"
        );
    }
    let load = start_load(&mesh, &mesh.a, &mesh.b, 5, 50, 2.0);
    assert_lossless(&load.wait(RUN).unwrap().report().unwrap(), 5);
    mesh.assert_served(&mesh.a, &mesh.s);

    for name in names {
        std::fs::rename(saved.path().join(name), mesh.ca.dir.join(name)).unwrap();
    }
    for agent in [&mesh.near, &mesh.far] {
        wait_until("CA usable again", Duration::from_secs(10), || {
            Ok(agent.metric("nodemesh_ca_healthy", &[])? == 1.0)
        })
        .unwrap();
        assert_eq!(agent.get("/healthz/ready").unwrap(), "ready\n");
    }
}

/// What must return to its baseline after agents come and go.
#[derive(Debug, PartialEq)]
struct Residue {
    pins: usize,
    workloads: u64,
    meshed_addrs: u64,
    inbound_listeners: u64,
    orig_dst: u64,
    pending: u64,
}

fn residue(mesh: &Cluster) -> Residue {
    let map = |name: &str| mesh.near.map_entries(name).unwrap();
    Residue {
        pins: pins(&mesh.node0),
        workloads: map("WORKLOADS"),
        meshed_addrs: map("MESHED_ADDRS"),
        inbound_listeners: map("INBOUND_LISTENERS"),
        orig_dst: map("ORIG_DST"),
        pending: map("PENDING"),
    }
}

/// Acceptance 3: 20 cycles of `kill -9` and restart under load. A client whose
/// connection died with an agent sees it end at once (never a hang); each
/// successor adopts the pinned state and serves every pod; afterwards pinned
/// objects, map entries and the agent's descriptors are back to their baseline
/// and the mesh is lossless again.
#[test]
fn twenty_crashes_under_load_leave_no_residue() {
    let mut mesh = Cluster::new(&[]);
    mesh.assert_served(&mesh.a, &mesh.s);
    mesh.assert_served(&mesh.a, &mesh.b);
    let baseline = residue(&mesh);
    let baseline_fds = mesh.near.fd_count().unwrap();
    assert_eq!((baseline.orig_dst, baseline.pending), (0, 0));

    // Short connections all along (some refused while no agent runs).
    let churn = start_load(&mesh, &mesh.a, &mesh.b, 0, 100, 20.0);
    for cycle in 0..20 {
        let held = hold_echo(&mesh, 30, 20);
        std::thread::sleep(Duration::from_millis(100));
        mesh.kill_near();
        let killed = Instant::now();
        let report = held.wait(RUN).unwrap().report().unwrap();
        let error = report["error"].as_str().unwrap_or_default().to_owned();
        assert!(
            !error.is_empty() && !error.contains("timed out"),
            "cycle {cycle}: the connection cut by the crash ended with {report}"
        );
        assert!(
            killed.elapsed() < Duration::from_secs(2),
            "cycle {cycle}: noticed after {:?}",
            killed.elapsed()
        );
        mesh.restart_near();
        mesh.assert_served(&mesh.a, &mesh.s);
    }
    churn.wait(RUN).unwrap();

    mesh.assert_served(&mesh.a, &mesh.b);
    mesh.assert_served(&mesh.u, &mesh.v);
    let lossless = start_load(&mesh, &mesh.a, &mesh.s, 10, 100, 2.0);
    assert_lossless(&lossless.wait(RUN).unwrap().report().unwrap(), 10);
    wait_until(
        "records of finished connections gone",
        Duration::from_secs(5),
        || Ok(residue(&mesh) == baseline),
    )
    .map_err(|e| format!("{e}: {:?} vs baseline {baseline:?}", residue(&mesh)))
    .unwrap();
    let fds = mesh.near.fd_count().unwrap();
    assert!(
        fds <= baseline_fds + 8,
        "the last agent holds {fds} descriptors; the first held {baseline_fds}"
    );
}

/// After a handoff, an old agent whose connections outlive `--drain-timeout`
/// exits at the timeout, saying so; its connection ends (never hangs), and the
/// successor serves new connections.
#[test]
fn a_retired_agent_exits_at_the_drain_timeout() {
    let mut mesh = Cluster::new(&["--drain-timeout", "2s"]);
    let held = hold_echo(&mesh, 30, 100);
    let argv: Vec<&str> = mesh.args.iter().map(String::as_str).collect();
    let successor = mesh
        .near
        .start_successor(&mesh.tools, &mesh.node0, &argv)
        .unwrap();
    mesh.near.log_line("handover logged", |l| {
        l.contains("handed over to a successor")
    });
    let handed_over = Instant::now();
    let status = mesh
        .near
        .wait_exit(Duration::from_secs(10))
        .expect("the old agent exits at the drain timeout");
    assert!(status.success(), "{status}");
    let waited = handed_over.elapsed();
    assert!(
        waited >= Duration::from_millis(1500),
        "exited after {waited:?}, before the drain timeout"
    );
    assert!(
        mesh.near.log().contains("drain timeout"),
        "{}",
        mesh.near.log()
    );
    let report = held.wait(RUN).unwrap().report().unwrap();
    let error = report["error"].as_str().unwrap_or_default();
    assert!(
        !error.is_empty() && !error.contains("timed out"),
        "{report}"
    );
    drop(std::mem::replace(&mut mesh.near, successor));
    mesh.assert_served(&mesh.a, &mesh.s);
}

/// Starts `mesh-agent debug trace <workload>` against `agent` and waits for
/// its two heading lines.
fn start_trace(mesh: &Cluster, agent: &Agent, workload: &str) -> Process {
    let mut trace = agent
        .debug_spawn(&mesh.tools, &["trace", workload, "--seconds", "120"])
        .unwrap();
    let heading = trace.wait_line(Duration::from_secs(10)).unwrap();
    assert!(heading.contains(workload), "{heading}");
    trace.wait_line(Duration::from_secs(5)).unwrap();
    trace
}

/// Waits (bounded) for a row with this verdict and destination; returns every row read.
fn wait_row(trace: &Process, verdict: &str, destination: &str) -> Vec<String> {
    let mut rows = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let found = |rows: &[String]| {
        rows.iter().any(|r| {
            let cells: Vec<&str> = r.split_whitespace().collect();
            cells.get(2) == Some(&verdict) && cells.get(4) == Some(&destination)
        })
    };
    while !found(&rows) && Instant::now() < deadline {
        rows.extend(trace.new_lines());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(found(&rows), "no {verdict} to {destination} in {rows:?}");
    rows
}

/// A kernel trace and agent generations: the programs a successor adopts
/// report to the pinned ring buffer it reads; a trace left on by a killed
/// agent is cleared by the next one (and what was written meanwhile is not
/// shown as new); a trace ends when its agent hands over.
#[test]
fn kernel_traces_across_agent_generations() {
    let mut mesh = Cluster::new(&[]);
    let to_s = mesh.s.addr(ECHO_PORT).to_string();
    let trace = start_trace(&mesh, &mesh.near, "shop/a");
    mesh.assert_served(&mesh.a, &mesh.s);
    wait_row(&trace, "captured", &to_s);

    // Killed while tracing: the bit stays in the pinned entry, and the kernel
    // reports the refusals to a buffer nobody reads.
    mesh.kill_near();
    assert_eq!(
        mesh.probe(&mesh.a, &mesh.s).0,
        "connect_error: PermissionDenied"
    );
    drop(trace);
    mesh.restart_near();
    mesh.near
        .log_line("adoption logged", |l| l.contains("startup=Adopted"));
    assert_eq!(mesh.near.kernel_traced("shop/a").unwrap(), Some(false));
    mesh.assert_served(&mesh.a, &mesh.s);

    // The adopted programs (loaded by the killed agent) report to the pinned
    // buffer this agent reads; the refusal from before is not among the rows.
    let trace = start_trace(&mesh, &mesh.near, "shop/a");
    mesh.assert_served(&mesh.a, &mesh.s);
    let rows = wait_row(&trace, "captured", &to_s);
    assert!(
        rows.iter().all(|r| !r.contains("agent_down_refused")),
        "{rows:?}"
    );
    assert!(
        mesh.near.log().contains("discarded kernel trace records"),
        "{}",
        mesh.near.log()
    );

    // An upgrade ends the trace: the old agent stops streaming as it drains,
    // and the successor enrolled the workload without the bit.
    let argv: Vec<&str> = mesh.args.iter().map(String::as_str).collect();
    let successor = mesh
        .near
        .start_successor(&mesh.tools, &mesh.node0, &argv)
        .unwrap();
    let ended = trace
        .wait(Duration::from_secs(15))
        .expect("the trace ends with its agent's handover");
    assert!(ended.status.success(), "{ended:?}");
    drop(std::mem::replace(&mut mesh.near, successor));
    assert_eq!(mesh.near.kernel_traced("shop/a").unwrap(), Some(false));
    let trace = start_trace(&mesh, &mesh.near, "shop/a");
    mesh.assert_served(&mesh.a, &mesh.s);
    wait_row(&trace, "captured", &to_s);
}
