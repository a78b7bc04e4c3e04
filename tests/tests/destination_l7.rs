//! Destination-side L7 on two nodes: clients on node 0 (`web` and `other`,
//! namespace `shop`) reach pod `api` (namespace `backend`) on node 1 by its pod
//! IP or its Service, through the kernel capture and the mTLS tunnel. The far
//! agent parses the requests it receives, reports them with
//! `reporter="destination"`, and enforces L7 AuthorizationPolicies on each; real
//! curl, an HTTP/2 load client and a gRPC client are the clients, and a real
//! Prometheus reads the result with the queries of Istio's dashboards.

use std::path::Path;
use std::time::Duration;

use nodemesh_testkit::otlp::OtlpReceiver;
use nodemesh_testkit::prometheus::{Prometheus, promtool_problems};
use nodemesh_testkit::{
    Agent, MeshCa, Node, Pod, Process, Tools, metric_sum, run_json, wait_until, yaml_docs,
};
use serde_json::Value;

const WEB_PORT: u16 = 8080;
const GRPC_PORT: u16 = 9090;
const BANNER_PORT: u16 = 2525;
const ECHO_PORT: u16 = 9000;
const RUN: Duration = Duration::from_secs(60);

struct Mesh {
    tools: Tools,
    near: Agent,
    far: Agent,
    web: Pod,
    other: Pod,
    api: Pod,
    _servers: Vec<Process>,
    _nodes: (Node, Node),
    _ca: MeshCa,
}

impl Mesh {
    fn new(policies: &[&str]) -> Self {
        Self::with_agent_args(policies, [&[], &[]])
    }

    /// [`Mesh::new`] with extra `mesh-agent run` arguments for the near and the far agent.
    fn with_agent_args(policies: &[&str], extra: [&[&str]; 2]) -> Self {
        let tools = Tools::new(env!("CARGO_BIN_EXE_podtool")).unwrap();
        let ca = MeshCa::init(&tools).unwrap();
        let mut node0 = Node::with_index(0).unwrap();
        let mut node1 = Node::with_index(1).unwrap();
        node0.link(&node1).unwrap();
        let web = node0.add_pod("web", "shop").unwrap();
        let other = node0.add_pod("other", "shop").unwrap();
        let api = node1.add_pod("api", "backend").unwrap();
        let listen = |port| api.addr(port).to_string();
        let servers = vec![
            api.serve(
                &tools,
                &["web", "--name", "api", "--listen", &listen(WEB_PORT)],
            )
            .unwrap(),
            api.serve(&tools, &["grpc-server", "--listen", &listen(GRPC_PORT)])
                .unwrap(),
            api.serve(&tools, &["echo", "--listen", &listen(ECHO_PORT)])
                .unwrap(),
            api.serve(
                &tools,
                &[
                    "banner-server",
                    "--banner",
                    "220 api ready",
                    "--listen",
                    &listen(BANNER_PORT),
                ],
            )
            .unwrap(),
        ];
        let mut args = ca.args().to_vec();
        args.extend(["--request-log", "json"]);
        let (mut near_args, mut far_args) = (args.clone(), args);
        near_args.extend_from_slice(extra[0]);
        far_args.extend_from_slice(extra[1]);
        let mesh = Mesh {
            near: Agent::start_with(&tools, &node0, &yaml_docs(&[]), &near_args).unwrap(),
            far: Agent::start_with(&tools, &node1, &yaml_docs(&[]), &far_args).unwrap(),
            tools,
            web,
            other,
            api,
            _servers: servers,
            _nodes: (node0, node1),
            _ca: ca,
        };
        mesh.apply(policies);
        for agent in [&mesh.near, &mesh.far] {
            agent.wait_for_certificate().unwrap();
        }
        mesh
    }

    /// The three pods plus `policies`, on both agents.
    fn apply(&self, policies: &[&str]) {
        let mut docs = vec![
            self.web.workload_yaml(),
            self.other.workload_yaml(),
            self.api.workload_yaml(),
        ];
        docs.extend(policies.iter().map(|p| p.to_string()));
        for agent in [&self.near, &self.far] {
            agent.reconfigure(&yaml_docs(&docs)).unwrap();
        }
    }

    /// curl from `pod` to api's web server: (status, body).
    fn curl(&self, pod: &Pod, args: &[&str], path: &str) -> (u16, String) {
        self.curl_to(
            pod,
            args,
            &format!("http://{}{path}", self.api.addr(WEB_PORT)),
        )
    }

    /// curl from `pod` to `url`: (status, body).
    fn curl_to(&self, pod: &Pod, args: &[&str], url: &str) -> (u16, String) {
        let mut cmd = pod.command(Path::new("/usr/bin/curl")).unwrap();
        cmd.args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
            .args(args)
            .arg(url);
        let out = Process::spawn(&mut cmd, "curl").unwrap().wait(RUN).unwrap();
        let text = out.stdout.trim_end();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", text));
        (code.trim().parse().unwrap_or(0), body.trim_end().to_owned())
    }

    fn podtool(&self, pod: &Pod, args: &[&str]) -> Value {
        let mut cmd = pod.command(&self.tools.podtool).unwrap();
        cmd.args(args);
        run_json(&mut cmd, RUN).unwrap()
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- node 0 agent log ---\n{}", self.near.log());
            eprintln!("--- node 1 agent log ---\n{}", self.far.log());
        }
    }
}

/// The policies of `docs/l7/authorization.md`'s example, one document each:
/// `api-readers` (ALLOW GET /api/* from web-sa), `blocked` (DENY on a header),
/// `audited` (AUDIT /api/audited).
fn docs_example() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/l7/authorization.md");
    let text = std::fs::read_to_string(path).unwrap();
    let block = text
        .split("```yaml\n")
        .nth(1)
        .unwrap()
        .split("```")
        .next()
        .unwrap();
    block.split("---\n").map(str::to_owned).collect()
}

const ALLOW_POST_ONLY: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: api-readers, namespace: backend}\nspec:\n  selector: {matchLabels: {app: api}}\n  action: ALLOW\n  rules:\n  - to: [{operation: {methods: [POST]}}]\n";

/// Acceptance 2, with the docs' example: per-request ALLOW, DENY and AUDIT at
/// the destination, and a live change that applies to the next request of an
/// open connection.
#[test]
fn l7_policies_decide_each_request_at_the_destination() {
    let example = docs_example();
    let mesh = Mesh::new(&example.iter().map(String::as_str).collect::<Vec<_>>());
    let (web, other) = (&mesh.web, &mesh.other);

    assert_eq!(mesh.curl(web, &[], "/api/x"), (200, "api".to_owned()));
    for (pod, args, path, why) in [
        (
            web,
            &["-X", "POST"][..],
            "/api/x",
            "a method the rule does not name",
        ),
        (web, &[][..], "/admin", "a path the rule does not name"),
        (other, &[][..], "/api/x", "another service account"),
        (
            web,
            &["-H", "x-block: yes"][..],
            "/api/x",
            "a DENY on a header wins",
        ),
    ] {
        assert_eq!(
            mesh.curl(pod, args, path),
            (403, "RBAC: access denied".to_owned()),
            "{why}"
        );
    }
    // AUDIT allows, and says so.
    assert_eq!(mesh.curl(web, &[], "/api/audited"), (200, "api".to_owned()));
    let audit = mesh.far.log_line("audit line", |l| {
        l.contains("request matched an AUDIT policy") && l.contains("backend/audited")
    });
    assert!(audit.contains("/api/audited"), "{audit}");

    let metrics = mesh.far.metrics().unwrap();
    let denied = |policy| {
        metric_sum(
            &metrics,
            "nodemesh_requests_denied_total",
            &[("policy", policy)],
        )
    };
    assert_eq!(denied("none"), 3.0, "{metrics}");
    assert_eq!(denied("backend/blocked"), 1.0, "{metrics}");
    assert_eq!(
        metric_sum(
            &metrics,
            "nodemesh_requests_audited_total",
            &[("policy", "backend/audited")]
        ),
        1.0
    );
    let requests = |code| {
        metric_sum(
            &metrics,
            "istio_requests_total",
            &[
                ("reporter", "destination"),
                ("destination_workload", "api"),
                ("connection_security_policy", "mutual_tls"),
                ("response_code", code),
            ],
        )
    };
    assert_eq!((requests("200"), requests("403")), (2.0, 4.0), "{metrics}");
    assert_eq!(
        metric_sum(
            &metrics,
            "istio_requests_total",
            &[("response_code", "403"), ("response_flags", "RBAC")]
        ),
        4.0
    );

    // A live change applies to the next request on a connection already open:
    // one keep-alive client sends a GET every 100 ms while GET stops being allowed.
    let mut cmd = web.command(&mesh.tools.podtool).unwrap();
    cmd.args([
        "load",
        "--url",
        &format!("http://{}/api/x", mesh.api.addr(WEB_PORT)),
        "--count",
        "40",
        "--interval-ms",
        "100",
        "--timeline",
    ]);
    let load = Process::spawn(&mut cmd, "load").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    mesh.apply(&[ALLOW_POST_ONLY]);
    let report = load.wait(RUN).unwrap().report().unwrap();
    assert_eq!(report["client_connections"], 1, "{report}");
    let statuses: Vec<u64> = report["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e[1].as_u64().unwrap())
        .collect();
    let first_denied = statuses
        .iter()
        .position(|s| *s == 403)
        .expect("a 403 after the change");
    assert!(first_denied >= 5, "{statuses:?}");
    assert!(
        statuses[..first_denied].iter().all(|s| *s == 200)
            && statuses[first_denied..].iter().all(|s| *s == 403),
        "{statuses:?}"
    );
}

/// Acceptance 3: an L7 policy on a port whose server speaks first denies the
/// connection once detection gives up, and no later.
#[test]
fn an_l7_policy_denies_a_server_first_connection_after_detection() {
    let example = docs_example();
    assert!(example[0].contains("name: api-readers"), "{}", example[0]);
    let mesh = Mesh::new(&[&example[0]]);
    let to = mesh.api.addr(BANNER_PORT).to_string();
    let r = mesh.podtool(&mesh.web, &["banner-client", "--to", &to]);
    assert_eq!(r["banner"], "", "{r}");
    assert!(
        matches!(r["ended"].as_str(), Some("reset" | "closed")),
        "{r}"
    );
    let ended = r["ended_ms"].as_f64().unwrap();
    // The default detection timeout is 100 ms; anything near the client's own
    // 10 s timeout would be a stall.
    assert!(ended < 2000.0, "ended after {ended} ms");
    wait_until("denial counted", Duration::from_secs(10), || {
        Ok(mesh.far.metric(
            "istio_tcp_connections_closed_total",
            &[
                ("reporter", "destination"),
                ("destination_workload", "api"),
                ("response_flags", "DENY"),
            ],
        )? == 1.0)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.far.metrics().unwrap()));
    assert!(
        mesh.far
            .log_line("denial", |l| l
                .contains("inbound connection denied by policy"))
            .contains("rules about HTTP cannot match a connection that does not speak it")
    );
    // Without the policy the same client gets its banner.
    mesh.apply(&[]);
    let r = mesh.podtool(&mesh.web, &["banner-client", "--to", &to]);
    assert_eq!(r["banner"], "220 api ready", "{r}");
}

/// Acceptance 1: HTTP/1.1, h2 and gRPC to a pod IP are reported by the
/// destination with their codes; the client side, which does not parse pod-IP
/// traffic, reports TCP connections.
#[test]
fn pod_ip_http1_h2_and_grpc_are_reported_by_the_destination() {
    let mesh = Mesh::new(&[]);
    let url = |path: &str| format!("http://{}{path}", mesh.api.addr(WEB_PORT));
    let h1 = mesh.podtool(
        &mesh.web,
        &["load", "--url", &url("/status/201"), "--count", "7"],
    );
    assert_eq!(h1["by_status"]["201"], 7, "{h1}");
    let h2 = mesh.podtool(
        &mesh.web,
        &["load", "--url", &url("/status/404"), "--count", "5", "--h2"],
    );
    assert_eq!(h2["by_status"]["404"], 5, "{h2}");
    let grpc = mesh.podtool(
        &mesh.web,
        &["grpc-client", "--to", &mesh.api.addr(GRPC_PORT).to_string()],
    );
    assert_eq!(
        (
            grpc["unary"].as_str(),
            grpc["streamed"].as_u64(),
            grpc["fail_code"].as_u64()
        ),
        (Some("hello grpc"), Some(10), Some(14)),
        "{grpc}"
    );

    let metrics = mesh.far.metrics().unwrap();
    let at_destination = |protocol, code| {
        metric_sum(
            &metrics,
            "istio_requests_total",
            &[
                ("reporter", "destination"),
                ("source_workload", "web"),
                (
                    "source_principal",
                    "spiffe://cluster.local/ns/shop/sa/web-sa",
                ),
                ("source_canonical_service", "web"),
                ("source_cluster", "Kubernetes"),
                ("destination_workload", "api"),
                ("destination_canonical_service", "api"),
                ("destination_cluster", "Kubernetes"),
                ("connection_security_policy", "mutual_tls"),
                ("request_protocol", protocol),
                ("response_code", code),
            ],
        )
    };
    assert_eq!(at_destination("http", "201"), 7.0, "{metrics}");
    assert_eq!(at_destination("http", "404"), 5.0, "{metrics}");
    // The failing call ends with grpc-status 14; all calls answer HTTP 200.
    let grpc_calls = at_destination("grpc", "200");
    assert!(grpc_calls >= 3.0, "{metrics}");
    assert_eq!(
        metric_sum(
            &metrics,
            "istio_requests_total",
            &[("reporter", "destination"), ("grpc_response_status", "14")]
        ),
        1.0
    );
    // No destination-side TCP series for these connections.
    assert_eq!(
        metric_sum(
            &metrics,
            "istio_tcp_connections_opened_total",
            &[("reporter", "destination")]
        ),
        0.0,
        "{metrics}"
    );
    // The source side counts TCP connections, all over mutual TLS.
    let near = mesh.near.metrics().unwrap();
    let opened = |security| {
        metric_sum(
            &near,
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "source"),
                ("connection_security_policy", security),
            ],
        )
    };
    assert!(opened("mutual_tls") >= 3.0, "{near}");
    assert_eq!(opened("none"), 0.0, "{near}");
    // One request-log line per request at the destination.
    wait_until("request log", Duration::from_secs(5), || {
        Ok(mesh
            .far
            .stdout()
            .lines()
            .filter(|l| l.contains("\"reporter\":\"destination\"") && l.contains("/status/201"))
            .count()
            == 7)
    })
    .unwrap();
}

const API_SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: backend}\nspec:\n  clusterIP: 10.96.0.50\n  selector: {app: api}\n  ports: [{port: 80, targetPort: 8080}]\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: api-route, namespace: backend}\nspec:\n  parentRefs: [{kind: Service, name: api}]\n  rules:\n  - backendRefs: [{name: api, port: 80}]\n";

/// `(labels..., value)` of every series of `expr`, for messages and comparisons.
fn series(prometheus: &Prometheus, expr: &str, labels: &[&str]) -> Vec<(Vec<String>, f64)> {
    let mut out: Vec<(Vec<String>, f64)> = prometheus
        .query(expr)
        .unwrap()
        .into_iter()
        .map(|s| {
            (
                labels.iter().map(|l| s.label(l).to_owned()).collect(),
                s.value,
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn row(labels: &[&str], value: f64) -> (Vec<String>, f64) {
    (labels.iter().map(|l| l.to_string()).collect(), value)
}

/// Acceptance 6: a real Prometheus scrapes both agents; the queries of Istio's
/// dashboards and Kiali's graph return what was sent, once per reporter, and no
/// series calls mutual-TLS traffic plaintext. promtool accepts the exposition.
#[test]
fn prometheus_reads_what_was_sent_with_istios_queries() {
    let mesh = Mesh::new(&[API_SERVICE]);
    let prometheus = Prometheus::scraping(&[mesh.near.admin, mesh.far.admin]).unwrap();

    // Through the Service (both agents parse it), to the pod IP (only the
    // destination does), and a TCP stream (bytes only).
    let ok = mesh.podtool(
        &mesh.web,
        &[
            "load",
            "--url",
            "http://10.96.0.50/status/200",
            "--count",
            "30",
        ],
    );
    assert_eq!(ok["by_status"]["200"], 30, "{ok}");
    let failed = mesh.podtool(
        &mesh.web,
        &[
            "load",
            "--url",
            "http://10.96.0.50/status/503",
            "--count",
            "10",
        ],
    );
    assert_eq!(failed["by_status"]["503"], 10, "{failed}");
    let pod_url = format!("http://{}/status/201", mesh.api.addr(WEB_PORT));
    let direct = mesh.podtool(&mesh.web, &["load", "--url", &pod_url, "--count", "5"]);
    assert_eq!(direct["by_status"]["201"], 5, "{direct}");
    let echo = mesh.api.addr(ECHO_PORT).to_string();
    let streamed = mesh.podtool(&mesh.web, &["stream", "--to", &echo, "--bytes", "100000"]);
    assert_eq!(
        streamed["sent_sha256"], streamed["received_sha256"],
        "{streamed}"
    );

    // Requests by destination workload and response code, for each reporter.
    let by_code = |reporter: &str| {
        series(
            &prometheus,
            &format!(
                "sum by (destination_workload, response_code) (istio_requests_total{{reporter=\"{reporter}\"}})"
            ),
            &["destination_workload", "response_code"],
        )
    };
    wait_until(
        "Prometheus has scraped the traffic",
        Duration::from_secs(30),
        || {
            Ok(by_code("destination")
                == vec![
                    row(&["api", "200"], 30.0),
                    row(&["api", "201"], 5.0),
                    row(&["api", "503"], 10.0),
                ]
                && by_code("source")
                    == vec![row(&["api", "200"], 30.0), row(&["api", "503"], 10.0)])
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}: destination {:?}, source {:?}; targets {:?}",
            by_code("destination"),
            by_code("source"),
            prometheus.targets()
        )
    });
    assert_eq!(
        by_code("source"),
        vec![row(&["api", "200"], 30.0), row(&["api", "503"], 10.0)]
    );
    assert!(
        prometheus
            .targets()
            .unwrap()
            .iter()
            .all(|(health, _)| health == "up")
    );

    // p99 by destination workload, from the duration histogram (over all
    // requests: the dashboards' rate() needs traffic across two scrapes).
    let p99 = series(
        &prometheus,
        "histogram_quantile(0.99, sum by (le, destination_workload) (istio_request_duration_milliseconds_bucket{reporter=\"destination\"}))",
        &["destination_workload"],
    );
    assert_eq!(p99.len(), 1, "{p99:?}");
    assert!(
        p99[0].0 == ["api"] && p99[0].1.is_finite() && p99[0].1 > 0.0,
        "{p99:?}"
    );

    // TCP bytes by source and destination workload: exactly the stream's, as
    // the destination parsed the HTTP connections and reports them as requests.
    for metric in [
        "istio_tcp_received_bytes_total",
        "istio_tcp_sent_bytes_total",
    ] {
        assert_eq!(
            series(
                &prometheus,
                &format!(
                    "sum by (source_workload, destination_workload) ({metric}{{reporter=\"destination\"}})"
                ),
                &["source_workload", "destination_workload"],
            ),
            vec![row(&["web", "api"], 100_000.0)],
            "{metric}"
        );
    }
    // Connections by security policy and reporter: all mutual TLS.
    let policies = series(
        &prometheus,
        "sum by (connection_security_policy, reporter) (istio_tcp_connections_opened_total)",
        &["connection_security_policy", "reporter"],
    );
    assert!(
        policies.iter().all(|(l, _)| l[0] == "mutual_tls"),
        "{policies:?}"
    );
    assert!(
        policies.iter().any(|(l, _)| l[1] == "destination"),
        "{policies:?}"
    );
    // No series at all says the traffic was plaintext.
    assert!(
        prometheus
            .query("{connection_security_policy=\"none\"}")
            .unwrap()
            .is_empty()
    );
    // Kiali's app graph: requests by canonical service, both reporters.
    assert_eq!(
        series(
            &prometheus,
            "sum by (source_canonical_service, destination_canonical_service, destination_cluster) (istio_requests_total)",
            &[
                "source_canonical_service",
                "destination_canonical_service",
                "destination_cluster"
            ],
        ),
        vec![row(&["web", "api", "Kubernetes"], 85.0)]
    );
    // Metadata is filed under the names Istio's dashboards use.
    assert_eq!(
        prometheus
            .metadata_type("istio_requests_total")
            .unwrap()
            .as_deref(),
        Some("counter")
    );

    // promtool accepts the exposition, Istio's own metric names aside.
    for agent in [&mesh.near, &mesh.far] {
        let problems: Vec<String> = promtool_problems(&agent.metrics().unwrap())
            .unwrap()
            .into_iter()
            .filter(|p| !p.starts_with("istio_"))
            .collect();
        assert!(problems.is_empty(), "{problems:#?}");
    }
}

/// Acceptance 4: with an OTLP collector, a request through a Service to
/// another node is one trace of two spans: the client side's (a client span,
/// exported over gRPC) is the parent of the destination's (a server span,
/// exported over HTTP/protobuf), and the application sees the destination's
/// span as its parent. Both carry the route and the response code. With the
/// collector gone, requests still succeed and the lost spans are counted.
#[test]
fn a_request_across_nodes_is_one_trace_of_a_parent_and_a_child_span() {
    let receiver = OtlpReceiver::start().unwrap();
    let grpc = format!("http://{}", receiver.grpc);
    let http = format!("http://{}", receiver.http);
    let mesh = Mesh::with_agent_args(
        &[API_SERVICE],
        [
            &["--otlp-endpoint", &grpc, "--trace-sampling", "100"],
            &[
                "--otlp-endpoint",
                &http,
                "--otlp-protocol",
                "http/protobuf",
                "--trace-sampling",
                "100",
            ],
        ],
    );
    let (code, body) = mesh.curl_to(&mesh.web, &[], "http://10.96.0.50/headers");
    assert_eq!(code, 200, "{body}");
    let seen_by_app: Value = serde_json::from_str(&body).unwrap();
    let spans = receiver
        .wait_for("both spans", Duration::from_secs(20), |s| s.len() >= 2)
        .unwrap();
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let client = spans.iter().find(|s| s.kind == 3).expect("a client span");
    let server = spans.iter().find(|s| s.kind == 2).expect("a server span");
    assert_eq!(client.transport, "grpc");
    assert_eq!(server.transport, "http");
    assert_eq!(client.trace_id, server.trace_id, "{spans:#?}");
    assert_eq!(
        client.parent_span_id, "",
        "the client span starts the trace"
    );
    assert_eq!(server.parent_span_id, client.span_id, "{spans:#?}");
    assert_eq!(
        seen_by_app["traceparent"],
        format!("00-{}-{}-01", server.trace_id, server.span_id),
        "the application's parent is the destination's span"
    );
    for span in [client, server] {
        assert_eq!(span.service, "nodemesh-agent");
        assert_eq!(span.attr("http.response.status_code"), "200", "{span:#?}");
        assert_eq!(span.attr("http.request.method"), "GET");
        assert_eq!(span.attr("url.path"), "/headers");
        assert_eq!(
            span.attr("destination_service"),
            "api.backend.svc.cluster.local"
        );
    }
    assert_eq!(client.attr("http.route"), "backend/api-route");
    assert_eq!(client.attr("istio.canonical_service"), "web");
    assert_eq!(server.attr("istio.canonical_service"), "api");
    assert_eq!(server.attr("source_workload"), "shop/web");

    // A trace the client started continues: its span is the parent.
    let given = "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let (code, _) = mesh.curl_to(&mesh.web, &["-H", given], "http://10.96.0.50/status/503");
    assert_eq!(code, 503);
    let spans = receiver
        .wait_for("the continued trace", Duration::from_secs(20), |s| {
            s.iter()
                .filter(|s| s.trace_id == "0af7651916cd43dd8448eb211c80319c")
                .count()
                == 2
        })
        .unwrap();
    let continued: Vec<_> = spans
        .iter()
        .filter(|s| s.trace_id == "0af7651916cd43dd8448eb211c80319c")
        .collect();
    let client = continued.iter().find(|s| s.kind == 3).unwrap();
    let server = continued.iter().find(|s| s.kind == 2).unwrap();
    assert_eq!(client.parent_span_id, "b7ad6b7169203331");
    assert_eq!(server.parent_span_id, client.span_id);
    assert_eq!(client.attr("http.response.status_code"), "503");
    let exported = |agent: &Agent| {
        metric_sum(
            &agent.metrics().unwrap(),
            "nodemesh_spans_exported_total",
            &[],
        )
    };
    wait_until("exports counted", Duration::from_secs(10), || {
        Ok(exported(&mesh.near) == 2.0 && exported(&mesh.far) == 2.0)
    })
    .unwrap();

    // The collector goes away: traffic is unaffected, the spans are counted as dropped.
    drop(receiver);
    let load = mesh.podtool(
        &mesh.web,
        &[
            "load",
            "--url",
            "http://10.96.0.50/status/200",
            "--count",
            "50",
        ],
    );
    assert_eq!(load["by_status"]["200"], 50, "{load}");
    let dropped = |agent: &Agent| {
        metric_sum(
            &agent.metrics().unwrap(),
            "nodemesh_spans_dropped_total",
            &[("reason", "export_failed")],
        )
    };
    wait_until("dropped spans counted", Duration::from_secs(30), || {
        Ok(dropped(&mesh.near) == 50.0 && dropped(&mesh.far) == 50.0)
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}: near dropped {}, far dropped {}",
            dropped(&mesh.near),
            dropped(&mesh.far)
        )
    });
    assert!(mesh.near.log().contains("span export failed"));
}

/// The explain test's mesh: `web` may not reach port 9000 through the mesh
/// (`excludedPorts`), `other` is left out of the mesh, api's route matches
/// `/api` only, and policies allow GET /api/* from web-sa on 8080, anyone on
/// 9000, and deny `x-block: yes` on 8080.
const EXPLAIN_POLICIES: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-readers, namespace: backend}
spec:
  selector: {matchLabels: {app: api}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/web-sa]}}]
    to: [{operation: {ports: [\"8080\"], methods: [GET], paths: [/api/*]}}]
  - to: [{operation: {ports: [\"9000\"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: blocked, namespace: backend}
spec:
  selector: {matchLabels: {app: api}}
  action: DENY
  rules:
  - to: [{operation: {ports: [\"8080\"]}}]
    when:
    - key: request.headers[x-block]
      values: [\"yes\"]
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: backend}
spec:
  clusterIP: 10.96.0.50
  selector: {app: api}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api-route, namespace: backend}
spec:
  parentRefs: [{kind: Service, name: api}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: api, port: 80}]
";

/// Acceptance 5 (explain): `mesh-agent debug explain` gives the verdict and
/// reason for an allowed request, one denied by a named policy, an unmatched
/// route, an excluded port, a source outside the mesh and a STRICT destination
/// receiving plaintext, and real traffic then gets exactly that.
#[test]
fn explain_says_what_real_requests_then_get() {
    let mesh = Mesh::new(&[]);
    let configure = |extra: &[&str]| {
        let mut docs = vec![
            mesh.web
                .workload_yaml_with(&format!("  excludedPorts: [{ECHO_PORT}]\n")),
            mesh.api.workload_yaml(),
            EXPLAIN_POLICIES.to_owned(),
        ];
        docs.extend(extra.iter().map(|d| d.to_string()));
        for agent in [&mesh.near, &mesh.far] {
            agent.reconfigure(&yaml_docs(&docs)).unwrap();
        }
    };
    configure(&[]);
    let explain = |source: &str, destination: &str, args: &[&str]| -> (Value, String) {
        let mut query = vec![
            ("source", source.to_owned()),
            ("destination", destination.to_owned()),
        ];
        let mut i = 0;
        while i < args.len() {
            let key = args[i].trim_start_matches("--");
            if key == "tcp" {
                query.push((key, "true".into()));
                i += 1;
                continue;
            }
            query.push((key, args[i + 1].replace('=', ":")));
            i += 2;
        }
        let qs: Vec<String> = query
            .iter()
            .map(|(k, v)| {
                format!(
                    "{k}={}",
                    v.replace('/', "%2F")
                        .replace(' ', "%20")
                        .replace(':', "%3A")
                )
            })
            .collect();
        let json: Value = serde_json::from_str(
            &nodemesh_testkit::admin_get(
                mesh.near.admin,
                &format!("/debug/explain?{}", qs.join("&")),
            )
            .unwrap(),
        )
        .unwrap();
        let mut cli = vec!["explain", source, destination];
        cli.extend_from_slice(args);
        let table = mesh.near.debug(&mesh.tools, &cli).unwrap();
        (json, table)
    };
    let verdict = |e: &Value| {
        (
            e["verdict"].as_str().unwrap().to_owned(),
            e["reason"].as_str().unwrap().to_owned(),
        )
    };
    let web = "shop/web";
    let service = "api.backend.svc.cluster.local:80";
    let echo = mesh.api.addr(ECHO_PORT).to_string();
    let outsider = mesh.other.addr(0).ip().to_string();

    // Allowed: the table names each decision.
    let (e, table) = explain(web, service, &["--path", "/api/x"]);
    assert_eq!(verdict(&e), ("allow".into(), "ALLOWED".into()), "{table}");
    for expected in [
        "VERDICT  ALLOW",
        "REASON   ALLOWED",
        "captured",
        "backend/api-route rule 0",
        "HBONE",
        "spiffe://cluster.local/ns/shop/sa/web-sa",
        "PERMISSIVE",
        "backend/api-readers",
        "backend/blocked",
        "ENDPOINT",
        &mesh.api.addr(WEB_PORT).to_string(),
    ] {
        assert!(
            table.contains(expected),
            "{expected:?} missing from\n{table}"
        );
    }
    assert_eq!(
        mesh.curl_to(&mesh.web, &[], "http://10.96.0.50/api/x").0,
        200
    );

    // Denied by a named policy; the request log gives the same reason.
    let (e, table) = explain(
        web,
        service,
        &["--path", "/api/x", "--header", "x-block=yes"],
    );
    assert_eq!(
        verdict(&e),
        ("deny".into(), "DENIED_BY_POLICY".into()),
        "{table}"
    );
    let blocked = e["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["policy"] == "backend/blocked")
        .unwrap();
    assert_eq!(blocked["matched"], "yes");
    assert_eq!(
        mesh.curl_to(
            &mesh.web,
            &["-H", "x-block: yes"],
            "http://10.96.0.50/api/x"
        ),
        (403, "RBAC: access denied".into())
    );
    wait_until(
        "the denied request's log line",
        Duration::from_secs(5),
        || {
            Ok(mesh.far.stdout().lines().any(|l| {
                l.contains("\"response_flags\":\"RBAC\"")
                    && l.contains("\"reason\":\"DENIED_BY_POLICY\"")
            }))
        },
    )
    .unwrap();

    // No route matches.
    let (e, table) = explain(web, service, &["--path", "/nothing"]);
    assert_eq!(verdict(&e), ("deny".into(), "NO_ROUTE".into()), "{table}");
    assert_eq!(
        mesh.curl_to(&mesh.web, &[], "http://10.96.0.50/nothing").0,
        404
    );

    // An excluded port: not captured, so it arrives as plaintext, and is allowed on 9000.
    let (e, table) = explain(web, &echo, &["--tcp"]);
    assert_eq!(
        verdict(&e),
        ("bypass".into(), "NOT_CAPTURED_EXCLUDED_PORT".into()),
        "{table}"
    );
    assert!(table.contains("spec.excludedPorts"), "{table}");
    let streamed = mesh.podtool(&mesh.web, &["stream", "--to", &echo, "--bytes", "10000"]);
    assert_eq!(
        streamed["sent_sha256"], streamed["received_sha256"],
        "{streamed}"
    );

    // A source outside the mesh, by its IP.
    let (e, table) = explain(&outsider, &echo, &["--tcp"]);
    assert_eq!(
        verdict(&e),
        ("bypass".into(), "NOT_CAPTURED_UNMESHED_SOURCE".into()),
        "{table}"
    );
    let streamed = mesh.podtool(&mesh.other, &["stream", "--to", &echo, "--bytes", "10000"]);
    assert_eq!(
        streamed["sent_sha256"], streamed["received_sha256"],
        "{streamed}"
    );

    // The destination turns STRICT: the same plaintext is refused.
    configure(&[
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: backend}\nspec:\n  mtls: {mode: STRICT}\n",
    ]);
    let (e, table) = explain(&outsider, &echo, &["--tcp"]);
    assert_eq!(
        verdict(&e),
        ("deny".into(), "PLAINTEXT_REFUSED_STRICT".into()),
        "{table}"
    );
    assert_eq!(e["outcome"], "connection reset");
    let probe = mesh.podtool(&mesh.other, &["probe", "--to", &echo]);
    assert_ne!(probe["outcome"], "data", "STRICT served plaintext: {probe}");
    // The destination's agent keeps the refused connection, with the same reason.
    let refused = |failed: &Value| {
        failed.as_array().unwrap().iter().any(|c| {
            c["reason"] == "PLAINTEXT_REFUSED_STRICT"
                && c["responseFlags"] == "DENY"
                && c["originalDestination"] == echo.as_str()
        })
    };
    wait_until("the refusal is listed", Duration::from_secs(5), || {
        let failed: Value = serde_json::from_str(&nodemesh_testkit::admin_get(
            mesh.far.admin,
            "/connections?failed",
        )?)?;
        Ok(refused(&failed))
    })
    .unwrap();
    let table = mesh.far.debug(&mesh.tools, &["failed"]).unwrap();
    assert!(
        table.contains("REASON") && table.contains("PLAINTEXT_REFUSED_STRICT"),
        "{table}"
    );
    // Meshed traffic is still allowed, over mTLS.
    let (e, _) = explain(web, service, &["--path", "/api/x"]);
    assert_eq!(verdict(&e).1, "ALLOWED");
    assert_eq!(
        mesh.curl_to(&mesh.web, &[], "http://10.96.0.50/api/x").0,
        200
    );

    // What cannot be resolved is a clear error, not a guess.
    let err = nodemesh_testkit::admin_get(
        mesh.near.admin,
        "/debug/explain?source=shop%2Fnobody&destination=10.96.0.50%3A80",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("unknown source workload"), "{err}");
}

/// Reads `trace`'s rows (after its two heading lines) until `done` holds for
/// them or 15 s pass; returns the rows split into columns.
fn trace_rows(trace: &Process, done: impl Fn(&[Vec<String>]) -> bool) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !done(&rows) && std::time::Instant::now() < deadline {
        for line in trace.new_lines() {
            rows.push(line.split_whitespace().map(str::to_owned).collect());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    rows
}

/// Whether `rows` has one with this hook, verdict, source and destination.
fn has_row(rows: &[Vec<String>], hook: &str, verdict: &str, source: &str, dst: &str) -> bool {
    rows.iter()
        .any(|r| r.len() == 5 && r[1] == hook && r[2] == verdict && r[3] == source && r[4] == dst)
}

/// `mesh-agent debug trace` shows the kernel's own verdicts on one workload's
/// live connections, as the eBPF programs report them through aya-log: web's
/// connects on node 0 (captured, excluded port, excluded CIDR, loopback) and
/// api's steered inbound on node 1, while `other` connects at the same time
/// and shows up nowhere. Ending the watch switches the reports off.
#[test]
fn debug_trace_shows_the_kernels_verdicts_for_one_workload() {
    let mesh = Mesh::new(&[]);
    let docs = [
        mesh.web.workload_yaml_with(&format!(
            "  excludedPorts: [{ECHO_PORT}]\n  excludedCidrs: [\"{}/32\"]\n",
            mesh.other.ip
        )),
        mesh.other.workload_yaml(),
        mesh.api.workload_yaml(),
    ];
    for agent in [&mesh.near, &mesh.far] {
        agent.reconfigure(&yaml_docs(&docs)).unwrap();
    }
    // Not the excluded port: the kernel checks ports before CIDRs.
    let other_echo = mesh.other.addr(ECHO_PORT + 1).to_string();
    let _servers = [
        mesh.other
            .serve(&mesh.tools, &["echo", "--listen", &other_echo])
            .unwrap(),
        mesh.web
            .serve(&mesh.tools, &["echo", "--listen", "127.0.0.1:7000"])
            .unwrap(),
    ];

    let mut near = mesh
        .near
        .debug_spawn(&mesh.tools, &["trace", "shop/web", "--seconds", "120"])
        .unwrap();
    let heading = near.wait_line(Duration::from_secs(10)).unwrap();
    // The kernel's own entries say who is traced.
    let kernel_traced = |agent: &Agent, workload: &str| agent.kernel_traced(workload).unwrap();
    assert_eq!(kernel_traced(&mesh.near, "shop/web"), Some(true));
    assert_eq!(kernel_traced(&mesh.near, "shop/other"), Some(false));
    assert!(
        heading.starts_with("tracing the kernel's verdicts for shop/web")
            && heading.contains(&mesh.web.ip.to_string()),
        "{heading}"
    );
    let columns = near.wait_line(Duration::from_secs(5)).unwrap();
    assert_eq!(
        columns.split_whitespace().collect::<Vec<_>>(),
        ["TIME", "HOOK", "VERDICT", "SOURCE", "DESTINATION"]
    );
    // The far side by the pod's IP, as an operator holding an address would.
    let mut far = mesh
        .far
        .debug_spawn(
            &mesh.tools,
            &["trace", &mesh.api.ip.to_string(), "--seconds", "120"],
        )
        .unwrap();
    let heading = far.wait_line(Duration::from_secs(10)).unwrap();
    assert!(heading.contains("for backend/api"), "{heading}");
    far.wait_line(Duration::from_secs(5)).unwrap();

    // web: captured, excluded port (which then arrives at api as plaintext,
    // steered), excluded CIDR, loopback.
    let api_web = mesh.api.addr(WEB_PORT).to_string();
    let api_echo = mesh.api.addr(ECHO_PORT).to_string();
    assert_eq!(mesh.curl(&mesh.web, &[], "/").0, 200);
    for to in [&api_echo, &other_echo] {
        let streamed = mesh.podtool(&mesh.web, &["stream", "--to", to, "--bytes", "10000"]);
        assert_eq!(
            streamed["sent_sha256"], streamed["received_sha256"],
            "{streamed}"
        );
    }
    let looped = mesh.podtool(
        &mesh.web,
        &["connect", "--to", "127.0.0.1:7000", "--count", "1"],
    );
    assert_eq!(looped["ok"], 1, "{looped}");
    // other, traced by nobody, at the same time.
    assert_eq!(mesh.curl(&mesh.other, &[], "/").0, 200);
    let streamed = mesh.podtool(
        &mesh.other,
        &["stream", "--to", &api_echo, "--bytes", "10000"],
    );
    assert_eq!(streamed["sent_sha256"], streamed["received_sha256"]);

    let web = "shop/web";
    let expected = [
        ("connect", "captured", web, api_web.as_str()),
        ("connect", "excluded_port", web, api_echo.as_str()),
        ("connect", "excluded_cidr", web, other_echo.as_str()),
        ("connect", "loopback", web, "127.0.0.1:7000"),
    ];
    let rows = trace_rows(&near, |rows| {
        expected
            .iter()
            .all(|(h, v, s, d)| has_row(rows, h, v, s, d))
    });
    for (h, v, s, d) in expected {
        assert!(
            has_row(&rows, h, v, s, d),
            "no {h} {v} {s} -> {d} in\n{rows:?}"
        );
    }
    // Every row is web's own connect: not other's, and not the steering of
    // web's excluded connection into other's address.
    assert!(
        rows.iter().all(|r| r[1] == "connect" && r[3] == web),
        "{rows:?}"
    );
    assert_eq!(
        rows.len(),
        expected.len(),
        "one verdict per connect: {rows:?}"
    );
    // The kernel counted exactly the records it wrote, and the agent read them all.
    let records = |agent: &Agent| {
        (
            agent
                .metric(
                    "nodemesh_capture_decisions_total",
                    &[("decision", "traced")],
                )
                .unwrap(),
            agent
                .metric(
                    "nodemesh_kernel_trace_records_total",
                    &[("outcome", "read")],
                )
                .unwrap(),
        )
    };
    assert_eq!(records(&mesh.near), (4.0, 4.0));

    // api: only the plaintext that arrived outside the tunnel is steered;
    // both clients' tunnelled connections are not sk_lookup's to decide.
    let web_ip = mesh.web.ip.to_string();
    let rows = trace_rows(&far, |rows| {
        has_row(rows, "inbound", "steered_inbound", &web_ip, &api_echo)
    });
    assert_eq!(
        rows,
        [vec![
            rows.first().map(|r| r[0].clone()).unwrap_or_default(),
            "inbound".into(),
            "steered_inbound".into(),
            web_ip,
            api_echo.clone(),
        ]],
        "exactly web's plaintext is steered"
    );
    assert_eq!(records(&mesh.far), (1.0, 1.0));

    // The watcher going away switches the kernel's reports off.
    drop(near);
    wait_until("the trace is switched off", Duration::from_secs(10), || {
        Ok(mesh.near.log().contains("kernel verdict trace stopped"))
    })
    .unwrap();
    assert_eq!(kernel_traced(&mesh.near, "shop/web"), Some(false));
    assert_eq!(kernel_traced(&mesh.far, "backend/api"), Some(true));

    // What cannot be traced is a clear error.
    let err = nodemesh_testkit::admin_get(mesh.near.admin, "/debug/trace?workload=shop%2Fnobody")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no workload \"shop/nobody\" is enrolled"),
        "{err}"
    );
    let err = nodemesh_testkit::admin_get(
        mesh.near.admin,
        "/debug/trace?workload=shop%2Fweb&seconds=0",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("seconds=0"), "{err}");
}
