//! End-to-end tests of outbound capture on real network namespaces and cgroups,
//! through the kernel hooks and a real `mesh-agent` process.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use nodemesh_testkit::{
    Agent, Node, Pod, Process, Tools, pattern, run_json, wait_until, yaml_docs,
};

const HTTP_PORT: u16 = 8080;
const ECHO_PORT: u16 = 9000;
const RUN: Duration = Duration::from_secs(60);

/// A node with client pods `a` (ns shop) and `c` (ns shop), server pod `b`
/// (ns backend) running an HTTP server and IPv4 and IPv6 echo servers, and an
/// agent meshing all three.
struct Mesh {
    tools: Tools,
    agent: Agent,
    _servers: Vec<Process>,
    a: Pod,
    b: Pod,
    c: Pod,
    node: Node,
}

impl Mesh {
    fn new() -> Self {
        let tools = Tools::new(env!("CARGO_BIN_EXE_podtool")).unwrap();
        let mut node = Node::new().unwrap();
        let a = node.add_pod("a", "shop").unwrap();
        let b = node.add_pod("b", "backend").unwrap();
        let c = node.add_pod("c", "shop").unwrap();
        let servers = vec![
            b.serve(
                &tools,
                &["http", "--listen", &b.addr(HTTP_PORT).to_string()],
            )
            .unwrap(),
            b.serve(
                &tools,
                &["echo", "--listen", &b.addr(ECHO_PORT).to_string()],
            )
            .unwrap(),
            b.serve(
                &tools,
                &["echo", "--listen", &b.addr6(ECHO_PORT).to_string()],
            )
            .unwrap(),
        ];
        let config = yaml_docs(&[a.workload_yaml(), b.workload_yaml(), c.workload_yaml()]);
        let agent = Agent::start(&tools, &node, &config).unwrap();
        Mesh {
            tools,
            agent,
            _servers: servers,
            a,
            b,
            c,
            node,
        }
    }

    fn podtool(&self, pod: &Pod, args: &[&str]) -> serde_json::Value {
        let mut cmd = pod.command(&self.tools.podtool).unwrap();
        cmd.args(args);
        run_json(&mut cmd, RUN).unwrap()
    }

    /// `count` echo round trips from `pod` to b's echo server, `concurrency` at a
    /// time; panics unless every one succeeded.
    fn echo_many(&self, pod: &Pod, count: usize, concurrency: usize) {
        let (count_arg, concurrency_arg) = (count.to_string(), concurrency.to_string());
        let echo = self.b.addr(ECHO_PORT).to_string();
        let out = self.podtool(
            pod,
            &[
                "connect",
                "--to",
                &echo,
                "--count",
                &count_arg,
                "--concurrency",
                &concurrency_arg,
            ],
        );
        assert_eq!(out["ok"], count, "echo from {} failed: {out}", pod.name);
    }

    /// One echo round trip from `pod` to b's echo server.
    fn echo_from(&self, pod: &Pod) {
        self.echo_many(pod, 1, 1);
    }

    /// `istio_tcp_connections_opened_total` summed over series matching `labels`.
    fn opened(&self, labels: &[(&str, &str)]) -> f64 {
        self.agent
            .metric("istio_tcp_connections_opened_total", labels)
            .unwrap()
    }

    fn opened_from(&self, workload: &str) -> f64 {
        self.opened(&[("source_workload", workload)])
    }

    fn captured(&self) -> f64 {
        self.agent
            .metric(
                "nodemesh_capture_decisions_total",
                &[("decision", "captured")],
            )
            .unwrap()
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- agent log ---\n{}--- end of agent log ---",
                self.agent.log()
            );
        }
    }
}

fn curl(pod: &Pod, url: &str, out: &std::path::Path) -> nodemesh_testkit::Finished {
    let mut cmd = pod.command(std::path::Path::new("/usr/bin/curl")).unwrap();
    cmd.args(["-sS", "--max-time", "20", "-o"])
        .arg(out)
        .arg(url);
    Process::spawn(&mut cmd, "curl").unwrap().wait(RUN).unwrap()
}

/// Acceptance 1: HTTP from pod A to pod B through the agent is byte-exact and
/// attributed to A, with B's address as the original destination.
#[test]
fn http_through_agent_is_byte_exact_and_attributed() {
    let mesh = Mesh::new();
    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("body");
    let size = 3 * 1024 * 1024 + 17;
    let url = format!("http://{}/bytes/{size}", mesh.b.addr(HTTP_PORT));
    let out = curl(&mesh.a, &url, &body);
    assert!(out.status.success(), "curl failed: {out:?}");
    assert!(
        std::fs::read(&body).unwrap() == pattern(size, 0),
        "response body differs"
    );

    let destination = mesh.b.addr(HTTP_PORT).to_string();
    let labels = [
        ("reporter", "source"),
        ("source_workload", "a"),
        ("source_workload_namespace", "shop"),
        ("source_principal", "spiffe://cluster.local/ns/shop/sa/a-sa"),
        ("destination_service", destination.as_str()),
        ("destination_workload", "b"),
        ("destination_workload_namespace", "backend"),
        ("request_protocol", "tcp"),
    ];
    wait_until(
        "connection closed in metrics",
        Duration::from_secs(5),
        || {
            Ok(mesh
                .agent
                .metric("istio_tcp_connections_closed_total", &labels)?
                == 1.0)
        },
    )
    .unwrap();
    assert_eq!(
        mesh.agent
            .metric("istio_tcp_connections_opened_total", &labels)
            .unwrap(),
        1.0
    );
    assert!(
        mesh.agent
            .metric("istio_tcp_sent_bytes_total", &labels)
            .unwrap()
            >= size as f64
    );
    assert!(
        mesh.agent
            .metric("istio_tcp_received_bytes_total", &labels)
            .unwrap()
            > 0.0
    );

    // While a connection is open, /connections shows who opened it and where it goes.
    let echo = mesh.b.addr(ECHO_PORT).to_string();
    let mut hold = mesh.a.command(&mesh.tools.podtool).unwrap();
    hold.args(["hold", "--to", &echo, "--seconds", "3"]);
    let mut hold = Process::spawn(&mut hold, "hold").unwrap();
    hold.wait_line(Duration::from_secs(10)).unwrap();
    // The client's connect completes in the kernel before the agent accepts it.
    let mut live = Vec::new();
    wait_until("connection listed", Duration::from_secs(5), || {
        live = mesh.agent.connections()?;
        Ok(live.iter().any(|c| c.original_destination == echo))
    })
    .unwrap_or_else(|e| panic!("{e}: no live connection to {echo} in {live:?}"));
    let conn = live
        .iter()
        .find(|c| c.original_destination == echo)
        .unwrap();
    assert_eq!(conn.source_workload, "shop/a");
    assert_eq!(conn.destination_workload.as_deref(), Some("backend/b"));
    let report = hold.wait(RUN).unwrap().report().unwrap();
    assert!(
        report["error"].is_null(),
        "held connection failed: {report}"
    );
}

/// Acceptance 2: a process outside every meshed workload reaches B directly;
/// the agent sees nothing.
#[test]
fn unmeshed_process_goes_direct() {
    let mesh = Mesh::new();
    let mut cmd = mesh.node.command(&mesh.tools.podtool).unwrap();
    cmd.args([
        "connect",
        "--to",
        &mesh.b.addr(ECHO_PORT).to_string(),
        "--count",
        "5",
    ]);
    let out = run_json(&mut cmd, RUN).unwrap();
    assert_eq!(out["ok"], 5, "{out}");
    assert_eq!(mesh.captured(), 0.0);
    assert_eq!(mesh.opened(&[]), 0.0);
    assert!(mesh.agent.connections().unwrap().is_empty());
}

/// Acceptance 3: the agent's own upstream connection (made inside pod A's
/// namespace) is not captured again: one client connection is one capture and
/// one proxied connection, and the server sees A's pod IP.
#[test]
fn agent_upstream_is_not_recaptured() {
    let mesh = Mesh::new();
    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("whoami");
    let out = curl(
        &mesh.a,
        &format!("http://{}/whoami", mesh.b.addr(HTTP_PORT)),
        &body,
    );
    assert!(out.status.success(), "curl failed: {out:?}");
    let seen: SocketAddr = std::fs::read_to_string(&body).unwrap().parse().unwrap();
    assert_eq!(
        seen.ip(),
        std::net::IpAddr::V4(mesh.a.ip),
        "server saw {seen}"
    );
    assert_eq!(mesh.captured(), 1.0);
    assert_eq!(mesh.opened(&[]), 1.0);
}

/// Acceptance 4: 256 MiB each way through the agent, checksums equal.
#[test]
fn bulk_transfer_256_mib_each_way() {
    let mesh = Mesh::new();
    let total: u64 = 256 * 1024 * 1024;
    let out = mesh.podtool(
        &mesh.a,
        &[
            "stream",
            "--to",
            &mesh.b.addr(ECHO_PORT).to_string(),
            "--bytes",
            &total.to_string(),
        ],
    );
    assert!(out["error"].is_null(), "{out}");
    assert_eq!(out["sent"], total, "{out}");
    assert_eq!(out["received"], total, "{out}");
    assert_eq!(out["sent_sha256"], out["received_sha256"], "{out}");
    let labels = [("source_workload", "a")];
    wait_until("bytes counted", Duration::from_secs(5), || {
        Ok(mesh
            .agent
            .metric("istio_tcp_received_bytes_total", &labels)?
            == total as f64
            && mesh.agent.metric("istio_tcp_sent_bytes_total", &labels)? == total as f64)
    })
    .unwrap();
    eprintln!("256 MiB each way through the agent in {}s", out["seconds"]);
}

/// Acceptance 5: a closed destination port shows up at the client as a failure
/// in under a second, and is counted with response_flags=CONNECT.
#[test]
fn closed_destination_port_fails_fast() {
    let mesh = Mesh::new();
    let closed = mesh.b.addr(9999).to_string();
    let out = mesh.podtool(&mesh.a, &["probe", "--to", &closed, "--timeout-ms", "5000"]);
    let outcome = out["outcome"].as_str().unwrap();
    assert!(
        outcome.contains("ConnectionReset")
            || outcome.contains("ConnectionRefused")
            || outcome == "eof",
        "client saw {out}"
    );
    assert!(out["elapsed_ms"].as_u64().unwrap() < 1000, "{out}");
    wait_until("failure counted", Duration::from_secs(5), || {
        Ok(mesh.agent.metric(
            "istio_tcp_connections_closed_total",
            &[
                ("response_flags", "CONNECT"),
                ("destination_service", closed.as_str()),
            ],
        )? == 1.0)
    })
    .unwrap();
    assert_eq!(mesh.captured(), 1.0, "the failed connection was captured");
}

/// Acceptance 6: 2,000 sequential and 200 concurrent connections leave no residue:
/// capture maps back to their starting size, fds and RSS back within a margin.
#[test]
fn connection_churn_leaves_no_residue() {
    let mesh = Mesh::new();
    let start_pending = mesh.agent.map_entries("PENDING").unwrap();
    let start_orig = mesh.agent.map_entries("ORIG_DST").unwrap();
    // Warm up so thread pools and allocator arenas exist before the baseline.
    mesh.echo_many(&mesh.a, 200, 200);
    let idle = || {
        wait_until("no open connections", Duration::from_secs(10), || {
            Ok(mesh.agent.metric("nodemesh_open_connections", &[])? == 0.0)
        })
    };
    idle().unwrap();
    let base_fds = mesh.agent.fd_count().unwrap();
    let base_rss = mesh.agent.rss_kib().unwrap();

    mesh.echo_many(&mesh.a, 2000, 1);
    mesh.echo_many(&mesh.a, 200, 200);
    idle().unwrap();

    assert_eq!(mesh.captured(), 2400.0);
    assert_eq!(mesh.agent.map_entries("PENDING").unwrap(), start_pending);
    assert_eq!(mesh.agent.map_entries("ORIG_DST").unwrap(), start_orig);
    let fds = mesh.agent.fd_count().unwrap();
    let rss = mesh.agent.rss_kib().unwrap();
    eprintln!("agent fds {base_fds} -> {fds}, RSS {base_rss} KiB -> {rss} KiB");
    // The agent keeps up to 8 spare upstream sockets per pod and family, refilled
    // below 4, so its count moves by a few between two idle moments; a leak of
    // 2,400 connections would not.
    assert!(fds <= base_fds + 6, "fds grew from {base_fds} to {fds}");
    assert!(
        rss <= base_rss + 8 * 1024,
        "RSS grew from {base_rss} KiB to {rss} KiB"
    );
}

/// Acceptance 7: unenrolling A live makes its next connection go direct;
/// re-enrolling captures again; C's live connection survives both.
#[test]
fn live_unenroll_and_reenroll() {
    let mesh = Mesh::new();
    let echo = mesh.b.addr(ECHO_PORT).to_string();
    let mut hold = mesh.c.command(&mesh.tools.podtool).unwrap();
    hold.args([
        "hold",
        "--to",
        &echo,
        "--seconds",
        "4",
        "--interval-ms",
        "20",
    ]);
    let mut hold = Process::spawn(&mut hold, "hold from c").unwrap();
    hold.wait_line(Duration::from_secs(10)).unwrap();
    wait_until("C's connection listed", Duration::from_secs(5), || {
        Ok(mesh
            .agent
            .connections()?
            .iter()
            .any(|c| c.source_workload == "shop/c"))
    })
    .unwrap();

    mesh.echo_from(&mesh.a);
    assert_eq!(mesh.opened_from("a"), 1.0);

    let without_a = yaml_docs(&[mesh.b.workload_yaml(), mesh.c.workload_yaml()]);
    mesh.agent.reconfigure(&without_a).unwrap();
    mesh.echo_from(&mesh.a);
    assert_eq!(
        mesh.opened_from("a"),
        1.0,
        "unenrolled A was still captured"
    );

    let with_a = yaml_docs(&[
        mesh.a.workload_yaml(),
        mesh.b.workload_yaml(),
        mesh.c.workload_yaml(),
    ]);
    mesh.agent.reconfigure(&with_a).unwrap();
    mesh.echo_from(&mesh.a);
    assert_eq!(mesh.opened_from("a"), 2.0, "re-enrolled A was not captured");

    let report = hold.wait(RUN).unwrap().report().unwrap();
    assert!(report["error"].is_null(), "C's connection broke: {report}");
    assert!(report["pings"].as_u64().unwrap() > 20, "{report}");
    assert_eq!(mesh.opened_from("c"), 1.0);
}

/// Acceptance 8: an invalid reload is rejected with a message naming the
/// document and field; traffic keeps flowing on the old config.
#[test]
fn invalid_reload_keeps_last_good_config() {
    let mesh = Mesh::new();
    let bad = yaml_docs(&[
        mesh.b.workload_yaml(),
        mesh.a.workload_yaml_with("  excludedPorts: [0]\n"),
    ]);
    mesh.agent.write_config(&bad).unwrap();
    wait_until("rejection counted", Duration::from_secs(10), || {
        Ok(mesh
            .agent
            .metric("nodemesh_config_reloads_total", &[("result", "failure")])?
            >= 1.0)
    })
    .unwrap();
    let expected = "document 2 (Workload shop/a): spec.excludedPorts[0]";
    // The log is written by its own thread, so the line may land just after
    // the counter moves.
    wait_until("rejection logged", Duration::from_secs(5), || {
        Ok(mesh.agent.log().contains(expected))
    })
    .unwrap_or_else(|_| panic!("log lacks {expected:?}:\n{}", mesh.agent.log()));
    let dump = mesh.agent.config_dump().unwrap();
    assert!(
        dump["config"]["lastError"]
            .as_str()
            .unwrap()
            .contains(expected),
        "{dump}"
    );
    assert_eq!(dump["config"]["generation"], 1);

    mesh.echo_from(&mesh.a);
    mesh.echo_from(&mesh.c);
    assert_eq!(mesh.opened_from("a"), 1.0);
    assert_eq!(
        mesh.opened_from("c"),
        1.0,
        "C (dropped by the bad file) must still be captured"
    );
}

/// Per-workload excluded ports and CIDRs go direct; everything else is captured.
#[test]
fn excluded_ports_and_cidrs_go_direct() {
    let mesh = Mesh::new();
    let config = yaml_docs(&[
        mesh.a
            .workload_yaml_with(&format!("  excludedPorts: [{ECHO_PORT}]\n")),
        mesh.b.workload_yaml(),
        mesh.c
            .workload_yaml_with(&format!("  excludedCidrs: [\"{}/32\"]\n", mesh.b.ip)),
    ]);
    mesh.agent.reconfigure(&config).unwrap();
    mesh.echo_from(&mesh.a);
    mesh.echo_from(&mesh.c);
    assert_eq!(mesh.opened_from("a"), 0.0, "excluded port was captured");
    assert_eq!(mesh.opened_from("c"), 0.0, "excluded CIDR was captured");
    assert_eq!(
        mesh.agent
            .metric(
                "nodemesh_capture_decisions_total",
                &[("decision", "excluded")]
            )
            .unwrap(),
        2.0
    );
    // Not excluded: A's HTTP is still captured.
    let dir = tempfile::tempdir().unwrap();
    let out = curl(
        &mesh.a,
        &format!("http://{}/", mesh.b.addr(HTTP_PORT)),
        &dir.path().join("b"),
    );
    assert!(out.status.success());
    assert_eq!(mesh.opened_from("a"), 1.0);
}

/// A pod talking to itself over loopback is never captured.
#[test]
fn pod_loopback_is_not_captured() {
    let mesh = Mesh::new();
    let _local = mesh
        .a
        .serve(&mesh.tools, &["echo", "--listen", "127.0.0.1:7000"])
        .unwrap();
    let out = mesh.podtool(
        &mesh.a,
        &["connect", "--to", "127.0.0.1:7000", "--count", "3"],
    );
    assert_eq!(out["ok"], 3, "{out}");
    assert_eq!(mesh.captured(), 0.0);
}

/// Start-up problems are one clear sentence, not a panic.
#[test]
fn startup_errors_are_clear() {
    let tools = Tools::new(env!("CARGO_BIN_EXE_podtool")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.yaml");
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "apiVersion: nodemesh.io/v1alpha1\nkind: Workload\nmetadata: {name: x}\nspec: {netns: {pid: 1}}\n").unwrap();
    for (config, expected) in [
        (
            &missing,
            format!("initial config: reading {}", missing.display()),
        ),
        (
            &bad,
            "document 1 (Workload default/x): spec.cgroupPath: missing (required unless spec.nodeName is set)".to_owned(),
        ),
    ] {
        let mut cmd = Command::new(&tools.agent);
        cmd.args(["run", "--admin-addr", "127.0.0.1:0", "--config"])
            .arg(config);
        assert_fails_clearly(&mut cmd, &expected);
    }
}

fn assert_fails_clearly(cmd: &mut Command, expected: &str) {
    let started = Instant::now();
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{cmd:?} succeeded");
    assert!(
        stderr.contains(expected),
        "stderr {stderr:?} lacks {expected:?}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        stderr.trim().lines().count(),
        1,
        "want one clear line, got {stderr:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// Without CAP_BPF the agent names the missing capability instead of failing on EPERM.
#[test]
fn missing_capability_is_named() {
    let tools = Tools::new(env!("CARGO_BIN_EXE_podtool")).unwrap();
    let mut cmd = Command::new("setpriv");
    cmd.args(["--bounding-set", "-bpf", "--inh-caps", "-bpf", "--"])
        .arg(&tools.agent)
        .args([
            "run",
            "--config",
            "/dev/null",
            "--admin-addr",
            "127.0.0.1:0",
        ]);
    assert_fails_clearly(&mut cmd, "missing capabilities CAP_BPF");
}

/// With no cgroup2 mount (a private mount namespace with it unmounted) the agent says so.
#[test]
fn missing_cgroup2_mount_is_named() {
    let tools = Tools::new(env!("CARGO_BIN_EXE_podtool")).unwrap();
    let script = format!(
        "umount -a -t cgroup2 && exec {} run --config /dev/null --admin-addr 127.0.0.1:0",
        tools.agent.display()
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
    assert_fails_clearly(&mut cmd, "no cgroup2 filesystem is mounted");
}

/// SIGHUP re-applies the config file even when it did not change.
#[test]
fn sighup_reapplies_config() {
    let mesh = Mesh::new();
    let before = mesh.agent.generation().unwrap();
    mesh.agent.signal(libc::SIGHUP);
    wait_until("config re-applied", Duration::from_secs(5), || {
        Ok(mesh.agent.generation()? == before + 1)
    })
    .unwrap();
    mesh.echo_from(&mesh.a);
    assert_eq!(mesh.opened_from("a"), 1.0);
}

/// IPv6 connects (via the pod's `[::1]` listener) and IPv4-mapped IPv6 connects
/// (treated as IPv4) are captured with the right original destination.
#[test]
fn ipv6_and_v4_mapped_connects_are_captured() {
    let mesh = Mesh::new();
    let mapped = format!("[::ffff:{}]:{ECHO_PORT}", mesh.b.ip);
    let native = mesh.b.addr6(ECHO_PORT).to_string();
    for (target, expected_destination) in [
        (mapped.clone(), mesh.b.addr(ECHO_PORT).to_string()),
        (native.clone(), native.clone()),
    ] {
        let out = mesh.podtool(&mesh.a, &["connect", "--to", &target]);
        assert_eq!(out["ok"], 1, "{target}: {out}");
        let opened = mesh
            .agent
            .metric(
                "istio_tcp_connections_opened_total",
                &[
                    ("source_workload", "a"),
                    ("destination_service", expected_destination.as_str()),
                    ("destination_workload", "b"),
                ],
            )
            .unwrap();
        assert_eq!(
            opened, 1.0,
            "{target} not captured as {expected_destination}"
        );
    }
    assert_eq!(mesh.captured(), 2.0);
}

/// UDP from an enrolled pod, even on a connected socket, is never captured.
#[test]
fn udp_is_not_captured() {
    let mesh = Mesh::new();
    let _udp = mesh
        .b
        .serve(
            &mesh.tools,
            &["udp-echo", "--listen", &mesh.b.addr(ECHO_PORT).to_string()],
        )
        .unwrap();
    let out = mesh.podtool(
        &mesh.a,
        &["udp-ping", "--to", &mesh.b.addr(ECHO_PORT).to_string()],
    );
    assert_eq!(out["echoed"], true, "{out}");
    assert_eq!(mesh.captured(), 0.0);
    assert_eq!(mesh.opened(&[]), 0.0);
}

/// `mesh-agent debug <view>` prints readable tables of the running agent's state.
#[test]
fn debug_views_render_tables() {
    let mesh = Mesh::new();
    let debug = |view: &str| mesh.agent.debug(&mesh.tools, &[view]).unwrap();
    let workloads = debug("workloads");
    assert!(workloads.starts_with("WORKLOAD"), "{workloads}");
    for key in ["shop/a", "backend/b", "shop/c"] {
        let row = workloads
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("{key} missing: {workloads}"));
        assert!(row.contains("enrolled"), "{row}");
    }
    let programs = debug("programs");
    for hook in ["cgroup/connect4", "cgroup/connect6", "cgroup/sock_ops"] {
        assert!(programs.contains(hook), "{hook} missing: {programs}");
    }
    let maps = debug("maps");
    assert!(
        maps.lines()
            .any(|l| l.starts_with("WORKLOADS") && l.split_whitespace().nth(1) == Some("3")),
        "{maps}"
    );
    assert_eq!(
        debug("listeners")
            .lines()
            .filter(|l| l.contains("15001"))
            .count(),
        6
    );
}

/// A pod on another node is reached through the source node's agent, over the
/// link between the nodes, and attributed to the remote workload.
#[test]
fn cross_node_connection_is_captured_and_routed() {
    let mesh = Mesh::new();
    let mut remote_node = Node::with_index(1).unwrap();
    mesh.node.link(&remote_node).unwrap();
    let d = remote_node.add_pod("d", "backend").unwrap();
    let _echo = d
        .serve(
            &mesh.tools,
            &["echo", "--listen", &d.addr(ECHO_PORT).to_string()],
        )
        .unwrap();
    let _echo6 = d
        .serve(
            &mesh.tools,
            &["echo", "--listen", &d.addr6(ECHO_PORT).to_string()],
        )
        .unwrap();
    // The local agent knows the remote workload (later this comes from the API server).
    let config = yaml_docs(&[mesh.a.workload_yaml(), d.workload_yaml()]);
    mesh.agent.reconfigure(&config).unwrap();
    for target in [d.addr(ECHO_PORT), d.addr6(ECHO_PORT)] {
        let out = mesh.podtool(&mesh.a, &["connect", "--to", &target.to_string()]);
        assert_eq!(out["ok"], 1, "{target}: {out}");
        let destination = target.to_string();
        assert_eq!(
            mesh.opened(&[
                ("source_workload", "a"),
                ("destination_service", destination.as_str()),
                ("destination_workload", "d"),
            ]),
            1.0,
            "{target}"
        );
    }
}
