//! Destination-side L7 on two nodes: clients on node 0 (`web` and `other`,
//! namespace `shop`) reach pod `api` (namespace `backend`) on node 1 by its pod
//! IP, through the kernel capture and the mTLS tunnel. The far agent parses the
//! requests it receives, reports them with `reporter="destination"`, and
//! enforces L7 AuthorizationPolicies on each; real curl, an HTTP/2 load client
//! and a gRPC client are the clients.

use std::path::Path;
use std::time::Duration;

use nodemesh_testkit::{
    Agent, MeshCa, Node, Pod, Process, Tools, metric_sum, run_json, wait_until, yaml_docs,
};
use serde_json::Value;

const WEB_PORT: u16 = 8080;
const GRPC_PORT: u16 = 9090;
const BANNER_PORT: u16 = 2525;
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
        let mesh = Mesh {
            near: Agent::start_with(&tools, &node0, &yaml_docs(&[]), &args).unwrap(),
            far: Agent::start_with(&tools, &node1, &yaml_docs(&[]), &args).unwrap(),
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
        let mut cmd = pod.command(Path::new("/usr/bin/curl")).unwrap();
        cmd.args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
            .args(args)
            .arg(format!("http://{}{path}", self.api.addr(WEB_PORT)));
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

const ALLOW_GET_API_FROM_WEB: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: api-readers, namespace: backend}\nspec:\n  selector: {matchLabels: {app: api}}\n  action: ALLOW\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/shop/sa/web-sa]}}]\n    to: [{operation: {methods: [GET], paths: ['/api/*']}}]\n";

const DENY_BLOCKED: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: blocked, namespace: backend}\nspec:\n  action: DENY\n  rules:\n  - when: [{key: 'request.headers[x-block]', values: ['yes']}]\n";

const AUDIT_API: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: audited, namespace: backend}\nspec:\n  action: AUDIT\n  rules:\n  - to: [{operation: {paths: [/api/audited]}}]\n";

const ALLOW_POST_ONLY: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: api-readers, namespace: backend}\nspec:\n  selector: {matchLabels: {app: api}}\n  action: ALLOW\n  rules:\n  - to: [{operation: {methods: [POST]}}]\n";

/// Acceptance 2: per-request ALLOW, DENY and AUDIT at the destination, and a
/// live change that applies to the next request of an open connection.
#[test]
fn l7_policies_decide_each_request_at_the_destination() {
    let mesh = Mesh::new(&[ALLOW_GET_API_FROM_WEB, DENY_BLOCKED, AUDIT_API]);
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
    let mesh = Mesh::new(&[ALLOW_GET_API_FROM_WEB]);
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
