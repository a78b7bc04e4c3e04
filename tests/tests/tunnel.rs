//! End-to-end tests of the agent-to-agent mTLS tunnel: two nodes (network
//! namespaces joined by a routed veth link), an agent on each, one mesh CA.

use std::path::Path;
use std::time::Duration;

use nodemesh_testkit::{
    Agent, MeshCa, Node, Pod, Process, Tools, pattern, run_json, wait_until, yaml_docs,
};

const HTTP_PORT: u16 = 8080;
const ECHO_PORT: u16 = 9000;
const RUN: Duration = Duration::from_secs(60);
/// Sent in a request header: if it crosses the node link in the clear, a capture sees it.
const MARKER: &str = "nodemesh-plaintext-marker-7f3a9c";

/// Client pod `a` (ns shop) on node 0, server pod `b` (ns backend) on node 1
/// with HTTP and echo servers. Both agents know both pods and share a CA.
struct TwoNodes {
    tools: Tools,
    near: Agent,
    far: Agent,
    a: Pod,
    b: Pod,
    /// A second client on node 0, in namespace `other`.
    c: Pod,
    _servers: Vec<Process>,
    node0: Node,
    node1: Node,
    _ca: MeshCa,
}

impl TwoNodes {
    fn new() -> Self {
        Self::with_args(&[])
    }

    /// Both agents get `args` besides the CA.
    fn with_args(args: &[&str]) -> Self {
        let tools = Tools::new(env!("CARGO_BIN_EXE_podtool")).unwrap();
        let ca = MeshCa::init(&tools).unwrap();
        let mut node0 = Node::with_index(0).unwrap();
        let mut node1 = Node::with_index(1).unwrap();
        node0.link(&node1).unwrap();
        let a = node0.add_pod("a", "shop").unwrap();
        let c = node0.add_pod("c", "other").unwrap();
        let b = node1.add_pod("b", "backend").unwrap();
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
        ];
        let config = yaml_docs(&[a.workload_yaml(), b.workload_yaml(), c.workload_yaml()]);
        let mut agent_args = ca.args().to_vec();
        agent_args.extend(args);
        let near = Agent::start_with(&tools, &node0, &config, &agent_args).unwrap();
        let far = Agent::start_with(&tools, &node1, &config, &agent_args).unwrap();
        TwoNodes {
            tools,
            near,
            far,
            a,
            b,
            c,
            _servers: servers,
            node0,
            node1,
            _ca: ca,
        }
    }

    fn podtool(&self, pod: &Pod, args: &[&str]) -> serde_json::Value {
        let mut cmd = pod.command(&self.tools.podtool).unwrap();
        cmd.args(args);
        run_json(&mut cmd, RUN).unwrap()
    }

    /// Applies the pods plus `extra` documents on both agents.
    fn apply(&self, extra: &[&str]) {
        let mut docs = vec![
            self.a.workload_yaml(),
            self.b.workload_yaml(),
            self.c.workload_yaml(),
        ];
        docs.extend(extra.iter().map(|d| d.to_string()));
        for agent in [&self.near, &self.far] {
            agent.reconfigure(&yaml_docs(&docs)).unwrap();
        }
    }

    /// A process on node 1 outside every pod: a client that is not in the mesh.
    fn outsider(&self, args: &[&str]) -> serde_json::Value {
        let mut cmd = self.node1.command(&self.tools.podtool).unwrap();
        cmd.args(args);
        run_json(&mut cmd, RUN).unwrap()
    }

    /// `openssl s_client` from node 0, outside every pod, to b's tunnel port,
    /// presenting `cert_and_key` if given; returns when the server has answered.
    fn tls_client(&self, cert_and_key: Option<(&Path, &Path)>) -> nodemesh_testkit::Finished {
        let mut cmd = self.node0.command(Path::new("/usr/bin/openssl")).unwrap();
        cmd.args(["s_client", "-connect", &format!("{}:15008", self.b.ip)])
            .args(["-tls1_3", "-alpn", "h2"])
            .stdin(std::process::Stdio::null());
        if let Some((cert, key)) = cert_and_key {
            cmd.arg("-cert").arg(cert).arg("-key").arg(key);
        }
        Process::spawn(&mut cmd, "openssl s_client")
            .unwrap()
            .wait(RUN)
            .unwrap()
    }

    fn wait_ready_certs(&self) {
        for agent in [&self.near, &self.far] {
            agent.wait_for_certificate().unwrap();
        }
    }
}

impl Drop for TwoNodes {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- node 0 agent log ---\n{}", self.near.log());
            eprintln!("--- node 1 agent log ---\n{}", self.far.log());
        }
    }
}

/// Captures TCP on node 0's side of the node link while alive.
struct LinkCapture {
    process: Process,
    file: tempfile::NamedTempFile,
}

impl LinkCapture {
    fn start(node: &Node) -> Self {
        let file = tempfile::NamedTempFile::new().unwrap();
        let mut cmd = node.command(Path::new("/usr/bin/tcpdump")).unwrap();
        cmd.args(["-i", "to1", "-U", "-s", "0", "-w"])
            .arg(file.path())
            .arg("tcp");
        let process = Process::spawn(&mut cmd, "tcpdump").unwrap();
        // tcpdump reports on stderr; give it a moment to open the interface.
        std::thread::sleep(Duration::from_millis(700));
        LinkCapture { process, file }
    }

    fn finish(self) -> Vec<u8> {
        std::thread::sleep(Duration::from_millis(300));
        nodemesh_testkit::run(
            std::process::Command::new("kill").args(["-INT", &self.process.pid().to_string()]),
        )
        .unwrap();
        let _ = self.process.wait(Duration::from_secs(5));
        std::fs::read(self.file.path()).unwrap()
    }
}

/// A podtool `stream` report whose bytes came back unchanged.
fn assert_intact(streamed: &serde_json::Value) {
    assert_eq!(
        streamed["sent_sha256"], streamed["received_sha256"],
        "{streamed}"
    );
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn principal(ns: &str, sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
}

/// Acceptance 1 and 2: cross-node HTTP and raw TCP through the tunnel are byte-exact;
/// the link carries a TLS 1.3 handshake and never the plaintext; both agents report
/// `mutual_tls` with the right principals, from each side.
#[test]
fn cross_node_traffic_is_mutual_tls_and_byte_exact() {
    let mesh = TwoNodes::new();
    mesh.wait_ready_certs();
    let capture = LinkCapture::start(&mesh.node0);

    let out = tempfile::NamedTempFile::new().unwrap();
    let mut curl = mesh.a.command(Path::new("/usr/bin/curl")).unwrap();
    curl.args(["-sS", "--max-time", "20", "-H"])
        .arg(format!("x-marker: {MARKER}"))
        .arg("-o")
        .arg(out.path())
        .arg(format!("http://{}/bytes/100000", mesh.b.addr(HTTP_PORT)));
    let finished = Process::spawn(&mut curl, "curl")
        .unwrap()
        .wait(RUN)
        .unwrap();
    assert!(finished.status.success(), "curl: {}", finished.stdout);
    assert!(
        std::fs::read(out.path()).unwrap() == pattern(100_000, 0),
        "HTTP body corrupted"
    );

    let echo = mesh.b.addr(ECHO_PORT).to_string();
    let streamed = mesh.podtool(&mesh.a, &["stream", "--to", &echo, "--bytes", "8000000"]);
    assert_intact(&streamed);
    assert_eq!(streamed["received"], 8_000_000, "{streamed}");

    let pcap = capture.finish();
    assert!(
        pcap.len() > 10_000,
        "capture is empty: {} bytes",
        pcap.len()
    );
    // ServerHello's supported_versions extension selecting TLS 1.3 (0x0304).
    assert!(
        contains(&pcap, &[0x00, 0x2b, 0x00, 0x02, 0x03, 0x04]),
        "no TLS 1.3 ServerHello on the link"
    );
    assert!(
        !contains(&pcap, MARKER.as_bytes()),
        "plaintext marker seen on the link"
    );
    assert!(
        !contains(&pcap, b"HTTP/1.1"),
        "plaintext HTTP seen on the link"
    );

    let (a_id, b_id) = (principal("shop", "a-sa"), principal("backend", "b-sa"));
    // The source side carries both connections unread (pod IPs); the
    // destination side parses the HTTP one and reports its request instead.
    for (agent, reporter, tcp) in [(&mesh.near, "source", 2.0), (&mesh.far, "destination", 1.0)] {
        wait_until(
            &format!("{reporter} metrics"),
            Duration::from_secs(10),
            || {
                Ok(agent.metric(
                    "istio_tcp_connections_closed_total",
                    &[
                        ("reporter", reporter),
                        ("connection_security_policy", "mutual_tls"),
                        ("source_principal", &a_id),
                        ("destination_principal", &b_id),
                        ("source_workload", "a"),
                        ("destination_workload", "b"),
                        ("response_flags", "-"),
                    ],
                )? == tcp)
            },
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.metrics().unwrap()));
        let received = agent
            .metric(
                "istio_tcp_received_bytes_total",
                &[
                    ("reporter", reporter),
                    ("connection_security_policy", "mutual_tls"),
                ],
            )
            .unwrap();
        assert!(received >= 8_000_000.0, "{reporter} received {received}");
    }
    let requests = mesh
        .far
        .metric(
            "istio_requests_total",
            &[
                ("reporter", "destination"),
                ("connection_security_policy", "mutual_tls"),
                ("source_principal", &a_id),
                ("destination_workload", "b"),
                ("destination_service", &mesh.b.addr(HTTP_PORT).to_string()),
                ("request_protocol", "http"),
                ("response_code", "200"),
            ],
        )
        .unwrap();
    assert_eq!(requests, 1.0, "{}", mesh.far.metrics().unwrap());
    // One tunnel connection carried both streams.
    let pool = &mesh.near.config_dump().unwrap()["tunnelPool"];
    assert_eq!(pool[0]["connections"], 1, "{pool}");

    // The same state as tables.
    let debug = |view: &str| mesh.near.debug(&mesh.tools, &[view]).unwrap();
    let certs = debug("certificates");
    assert!(
        certs
            .lines()
            .any(|l| l.contains(&a_id) && l.contains("available")),
        "{certs}"
    );
    let pool = debug("pool");
    assert!(
        pool.lines()
            .any(|l| l.contains(&b_id) && l.contains("198.18.1.2:15008")),
        "{pool}"
    );
}

/// Acceptance 3 (identity mismatch): when the client side expects another identity
/// for the destination than the server proves, the connection is refused quickly,
/// with a log line and `response_flags="UF"`, and nothing reaches the server.
#[test]
fn a_server_proving_another_identity_is_refused() {
    let mesh = TwoNodes::new();
    mesh.wait_ready_certs();
    // Node 0 now believes b runs as `payments`; b's agent still proves `b-sa`.
    let impostor = mesh
        .b
        .workload_yaml()
        .replace("serviceAccount: b-sa", "serviceAccount: payments");
    assert_ne!(impostor, mesh.b.workload_yaml());
    mesh.near
        .reconfigure(&yaml_docs(&[mesh.a.workload_yaml(), impostor]))
        .unwrap();
    let probe = mesh.podtool(
        &mesh.a,
        &["probe", "--to", &mesh.b.addr(ECHO_PORT).to_string()],
    );
    assert_ne!(probe["outcome"], "data", "{probe}");
    assert!(probe["elapsed_ms"].as_f64().unwrap() < 2000.0, "{probe}");
    wait_until("refusal metric", Duration::from_secs(5), || {
        Ok(mesh.near.metric(
            "istio_tcp_connections_closed_total",
            &[
                ("response_flags", "UF"),
                ("destination_principal", &principal("backend", "payments")),
            ],
        )? == 1.0)
    })
    .unwrap();
    mesh.near.log_line("the peer's identity named", |l| {
        l.contains(
            "peer certificate rejected: peer is spiffe://cluster.local/ns/backend/sa/b-sa, expected spiffe://cluster.local/ns/backend/sa/payments",
        )
    });
    assert_eq!(
        mesh.far
            .metric("istio_tcp_connections_opened_total", &[])
            .unwrap(),
        0.0,
        "nothing may reach the server side"
    );
}

/// Acceptance 3 (foreign CA) and 8: a peer from another CA, garbage, plain HTTP and a
/// TLS client without a certificate are each refused at 15008, and the agent keeps
/// serving meshed traffic.
#[test]
fn strangers_at_the_tunnel_port_are_refused() {
    let mesh = TwoNodes::new();
    mesh.wait_ready_certs();
    let tunnel = format!("{}:15008", mesh.b.ip);
    let outsider = |program: &str| mesh.node0.command(Path::new(program)).unwrap();

    // Garbage bytes.
    let mut garbage = outsider("/bin/bash");
    garbage.args([
        "-c",
        &format!(
            "exec 3<>/dev/tcp/{}/15008; printf 'GARBAGE\\r\\n\\r\\n' >&3; timeout 5 cat <&3 >/dev/null; true",
            mesh.b.ip
        ),
    ]);
    let _ = Process::spawn(&mut garbage, "garbage")
        .unwrap()
        .wait(RUN)
        .unwrap();
    // Plain HTTP.
    let mut http = outsider("/usr/bin/curl");
    http.args(["-sS", "--max-time", "5", &format!("http://{tunnel}/")]);
    let finished = Process::spawn(&mut http, "plain http")
        .unwrap()
        .wait(RUN)
        .unwrap();
    assert!(!finished.status.success(), "plain HTTP was served");
    // TLS without a client certificate.
    let finished = mesh.tls_client(None);
    let out = finished.stdout.clone();
    assert!(
        !out.contains("Verify return code: 0")
            || !out.contains("ALPN protocol: h2")
            || !finished.status.success(),
        "a certificate-less TLS client completed a usable session: {out}"
    );
    // A workload certificate from another CA.
    let stranger_ca = MeshCa::init(&mesh.tools).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("c.pem");
    let key = dir.path().join("k.pem");
    let mut issue = std::process::Command::new("/usr/bin/openssl");
    issue
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/O=stranger",
        ])
        .args([
            "-addext",
            "subjectAltName=URI:spiffe://cluster.local/ns/shop/sa/a-sa",
        ])
        .arg("-CA")
        .arg(stranger_ca.dir.join("ca-cert.pem"))
        .arg("-CAkey")
        .arg(stranger_ca.dir.join("ca-key.pem"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert);
    nodemesh_testkit::run(&mut issue).unwrap();
    mesh.tls_client(Some((&cert, &key)));

    wait_until("four refusals", Duration::from_secs(10), || {
        Ok(mesh.far.metric(
            "nodemesh_tunnel_refusals_total",
            &[("direction", "inbound")],
        )? >= 4.0)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.far.metrics().unwrap()));
    mesh.far.log_line("refusal logged", |l| {
        l.contains("tunnel connection refused")
    });
    assert_eq!(
        mesh.far
            .metric("istio_tcp_connections_opened_total", &[])
            .unwrap(),
        0.0,
        "a stranger reached the application"
    );

    // Meshed traffic still flows.
    let echo = mesh.b.addr(ECHO_PORT).to_string();
    let streamed = mesh.podtool(&mesh.a, &["stream", "--to", &echo, "--bytes", "100000"]);
    assert_intact(&streamed);
}

const STRICT_BACKEND: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: backend}
spec:
  mtls: {mode: STRICT}
";

/// Acceptance 4: inbound plaintext from outside the mesh is steered to the agent
/// by `sk_lookup`. PERMISSIVE serves it, counted as `none`; STRICT refuses it,
/// while meshed clients keep working over mTLS.
#[test]
fn inbound_plaintext_is_permissive_by_default_and_refused_when_strict() {
    let mesh = TwoNodes::new();
    mesh.wait_ready_certs();
    let echo = mesh.b.addr(ECHO_PORT).to_string();
    let plain = || {
        mesh.far.metric(
            "istio_tcp_connections_closed_total",
            &[
                ("reporter", "destination"),
                ("connection_security_policy", "none"),
                ("destination_workload", "b"),
                ("source_principal", "unknown"),
            ],
        )
    };

    let streamed = mesh.outsider(&["stream", "--to", &echo, "--bytes", "100000"]);
    assert_intact(&streamed);
    wait_until("plaintext counted", Duration::from_secs(5), || {
        Ok(plain()? == 1.0)
    })
    .unwrap();

    mesh.apply(&[STRICT_BACKEND]);
    let probe = mesh.outsider(&["probe", "--to", &echo]);
    assert_ne!(probe["outcome"], "data", "STRICT served plaintext: {probe}");
    assert!(probe["elapsed_ms"].as_f64().unwrap() < 2000.0, "{probe}");
    wait_until("refusal counted", Duration::from_secs(5), || {
        Ok(mesh.far.metric(
            "istio_tcp_connections_closed_total",
            &[
                ("connection_security_policy", "none"),
                ("response_flags", "DENY"),
            ],
        )? == 1.0)
    })
    .unwrap();
    // The log has its own writer thread: the line may follow the counter.
    wait_until("refusal logged", Duration::from_secs(5), || {
        Ok(mesh.far.log().contains("PeerAuthentication mode is STRICT"))
    })
    .unwrap();

    // The meshed client is unaffected.
    let streamed = mesh.podtool(&mesh.a, &["stream", "--to", &echo, "--bytes", "100000"]);
    assert_intact(&streamed);
}

/// Acceptance 5: an ALLOW policy for namespace `shop` admits `a` and denies `c`
/// (namespace `other`); adding a DENY live closes `a`'s long-lived connection.
#[test]
fn authorization_allows_by_namespace_and_live_deny_closes_connections() {
    let mesh = TwoNodes::new();
    mesh.wait_ready_certs();
    let echo = mesh.b.addr(ECHO_PORT).to_string();
    let allow_shop = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-shop, namespace: backend}
spec:
  action: ALLOW
  rules:
  - from:
    - source: {namespaces: [shop]}
";
    mesh.apply(&[allow_shop]);

    let streamed = mesh.podtool(&mesh.a, &["stream", "--to", &echo, "--bytes", "100000"]);
    assert_intact(&streamed);
    let probe = mesh.podtool(&mesh.c, &["probe", "--to", &echo]);
    assert_ne!(probe["outcome"], "data", "c was let through: {probe}");
    let c_principal = principal("other", "c-sa");
    wait_until("denials counted", Duration::from_secs(5), || {
        let far = mesh.far.metric(
            "istio_tcp_connections_closed_total",
            &[
                ("response_flags", "DENY"),
                ("source_principal", &c_principal),
                ("reporter", "destination"),
            ],
        )?;
        let near = mesh.near.metric(
            "istio_tcp_connections_closed_total",
            &[
                ("response_flags", "DENY"),
                ("source_principal", &c_principal),
                ("reporter", "source"),
            ],
        )?;
        Ok(far == 1.0 && near == 1.0)
    })
    .unwrap();

    // A long-lived connection from a, then a DENY for it, applied live.
    let mut hold = mesh.a.command(&mesh.tools.podtool).unwrap();
    hold.args([
        "hold",
        "--to",
        &echo,
        "--seconds",
        "30",
        "--interval-ms",
        "100",
    ]);
    let hold = Process::spawn(&mut hold, "hold").unwrap();
    wait_until("a's connection is open", Duration::from_secs(10), || {
        Ok(mesh
            .far
            .connections()?
            .iter()
            .any(|c| c.source_workload == "shop/a"))
    })
    .unwrap();
    let started = std::time::Instant::now();
    let deny_shop = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-shop-echo, namespace: backend}
spec:
  action: DENY
  rules:
  - from:
    - source: {namespaces: [shop]}
    to:
    - operation: {ports: [\"9000\"]}
";
    mesh.apply(&[allow_shop, deny_shop]);
    let report = hold.wait(RUN).unwrap().report().unwrap();
    assert!(
        !report["error"].is_null(),
        "the connection survived the DENY: {report}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "closed only after {:?}",
        started.elapsed()
    );
    wait_until("revocation counted", Duration::from_secs(5), || {
        Ok(mesh.far.metric(
            "istio_tcp_connections_closed_total",
            &[
                ("response_flags", "DENY"),
                ("source_principal", &principal("shop", "a-sa")),
            ],
        )? == 1.0)
    })
    .unwrap();
    mesh.far.log_line("revocation logged", |l| {
        l.contains("closing a live connection the new policy no longer allows")
    });
}

fn serial(agent: &Agent, identity: &str) -> Option<String> {
    agent.config_dump().ok()?["certificates"]
        .as_array()?
        .iter()
        .find(|c| c["identity"] == identity)?["serial"]
        .as_str()
        .map(str::to_owned)
}

/// Acceptance 6: both sides' certificates rotate (20 s lifetime, renewed every
/// 10 s) during a 60 s echo stream over the tunnel; the stream never breaks and
/// the new serials show in `/config_dump`.
#[test]
fn certificates_rotate_under_a_long_transfer() {
    let mesh = TwoNodes::with_args(&["--cert-lifetime", "20s"]);
    mesh.wait_ready_certs();
    let (a_id, b_id) = (principal("shop", "a-sa"), principal("backend", "b-sa"));
    let first = (
        serial(&mesh.near, &a_id).unwrap(),
        serial(&mesh.far, &b_id).unwrap(),
    );
    let echo = mesh.b.addr(ECHO_PORT).to_string();
    let mut hold = mesh.a.command(&mesh.tools.podtool).unwrap();
    hold.args([
        "hold",
        "--to",
        &echo,
        "--seconds",
        "60",
        "--interval-ms",
        "20",
    ]);
    let report = run_json(&mut hold, Duration::from_secs(120)).unwrap();
    assert!(report["error"].is_null(), "the transfer broke: {report}");
    assert!(report["pings"].as_u64().unwrap() > 1000, "{report}");
    let last = (
        serial(&mesh.near, &a_id).unwrap(),
        serial(&mesh.far, &b_id).unwrap(),
    );
    assert_ne!(first.0, last.0, "a's certificate never rotated");
    assert_ne!(first.1, last.1, "b's certificate never rotated");
    let log = mesh.near.log();
    let a_issued = log
        .lines()
        .filter(|l| l.contains("issued workload certificate") && l.contains(&a_id))
        .count();
    assert!(
        a_issued >= 5,
        "a's certificate was issued {a_issued} times in 60 s"
    );
}

/// Acceptance 7: 500 overlapping streams between two nodes all complete over a
/// few tunnel connections: 100 streams fill one, and a burst dials only as many
/// connections as it fills (5 here), however high the per-key bound.
#[test]
fn many_concurrent_streams_share_few_tunnel_connections() {
    let mesh = TwoNodes::new();
    mesh.wait_ready_certs();
    let echo = mesh.b.addr(ECHO_PORT).to_string();
    let out = mesh.podtool(
        &mesh.a,
        &[
            "connect",
            "--to",
            &echo,
            "--count",
            "500",
            "--concurrency",
            "500",
            "--hold-ms",
            "1500",
        ],
    );
    assert_eq!(out["ok"], 500, "{out}");
    let dialled = mesh
        .near
        .metric(
            "nodemesh_tunnel_connections_total",
            &[("direction", "outbound")],
        )
        .unwrap();
    let accepted = mesh
        .far
        .metric(
            "nodemesh_tunnel_connections_total",
            &[("direction", "inbound")],
        )
        .unwrap();
    eprintln!("500 concurrent streams used {dialled} tunnel connections ({accepted} accepted)");
    assert!(
        (1.0..=8.0).contains(&dialled),
        "{dialled} tunnel connections"
    );
    assert_eq!(dialled, accepted);
    assert_eq!(
        mesh.far
            .metric(
                "istio_tcp_connections_opened_total",
                &[("reporter", "destination")]
            )
            .unwrap(),
        500.0
    );
}

/// Acceptance 3 (expired): a client certificate from the mesh's own CA, for a
/// real identity, but expired, is refused at 15008 with a log line naming expiry.
#[test]
fn an_expired_peer_certificate_is_refused() {
    let mesh = TwoNodes::new();
    mesh.wait_ready_certs();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    {
        let ca_dir = &mesh._ca.dir;
        let ca_key =
            rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("ca-key.pem")).unwrap())
                .unwrap();
        let issuer = rcgen::Issuer::from_ca_cert_pem(
            &std::fs::read_to_string(ca_dir.join("ca-cert.pem")).unwrap(),
            ca_key,
        )
        .unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            principal("shop", "a-sa").try_into().unwrap(),
        )];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        ];
        let now = std::time::SystemTime::now();
        params.not_before = (now - Duration::from_secs(7200)).into();
        params.not_after = (now - Duration::from_secs(3600)).into();
        let leaf = params.signed_by(&leaf_key, &issuer).unwrap();
        let chain = format!(
            "{}{}",
            leaf.pem(),
            std::fs::read_to_string(ca_dir.join("ca-cert.pem")).unwrap()
        );
        std::fs::write(&cert, chain).unwrap();
        std::fs::write(&key, leaf_key.serialize_pem()).unwrap();
    }
    let refusals = || {
        mesh.far
            .metric(
                "nodemesh_tunnel_refusals_total",
                &[("direction", "inbound")],
            )
            .unwrap()
    };
    let before = refusals();
    mesh.tls_client(Some((&cert, &key)));
    wait_until("the refusal", Duration::from_secs(10), || {
        Ok(refusals() > before)
    })
    .unwrap();
    mesh.far.log_line("the expiry named", |l| {
        l.contains("tunnel connection refused") && l.to_lowercase().contains("expired")
    });
    assert_eq!(
        mesh.far
            .metric("istio_tcp_connections_opened_total", &[])
            .unwrap(),
        0.0
    );
}
