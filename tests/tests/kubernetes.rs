//! End-to-end tests of Kubernetes mode: agents run with `--kubernetes` against
//! the API server double and no config file. Pods are kubelet-shaped (a pod
//! cgroup named from the UID, a sandbox process holding the netns), so the agent
//! finds them on the node the way it does on a real one.

use std::path::Path;
use std::time::{Duration, Instant};

use nodemesh_testkit::apiserver::{ApiServer, Served, namespace, pod_uid as uid};
use nodemesh_testkit::{
    Agent, KubeletLayout, MeshCa, Node, Pod, Process, Tools, run_json, wait_until,
};
use serde_json::{Value, json};

const WEB_PORT: u16 = 8080;
const ECHO_PORT: u16 = 9000;
const RUN: Duration = Duration::from_secs(60);
/// How quickly a change made through the API must be in force.
const PROMPT: Duration = Duration::from_secs(1);
/// Kinds the agent watches: Pods, Namespaces, Services, EndpointSlices and the
/// seven routing and policy kinds.
const WATCHED_KINDS: usize = 11;

/// The workload states in `/config_dump`, by pod name.
fn states(agent: &Agent) -> anyhow::Result<Vec<(String, String)>> {
    let dump = agent.config_dump()?;
    Ok(dump["workloads"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| {
            (
                w["workload"].as_str().unwrap_or("").to_owned(),
                w["state"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect())
}

fn enrolled(agent: &Agent, pod: &Pod) -> anyhow::Result<bool> {
    let key = format!("{}/{}", pod.namespace, pod.name);
    Ok(states(agent)?
        .iter()
        .any(|(w, s)| *w == key && s == "enrolled"))
}

/// Waits until `check` holds and returns how long that took; fails past `limit`.
fn within(what: &str, limit: Duration, check: impl FnMut() -> anyhow::Result<bool>) -> Duration {
    let started = Instant::now();
    wait_until(what, limit, check).unwrap();
    started.elapsed()
}

fn principal(ns: &str, sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
}

/// One node with an agent in Kubernetes mode, a client and a server pod in the
/// meshed namespace `shop`, and the server's web and echo servers.
struct KubeNode {
    tools: Tools,
    api: ApiServer,
    agent: Agent,
    client: Pod,
    server: Pod,
    _servers: Vec<Process>,
    node: Node,
    _ca: MeshCa,
}

impl KubeNode {
    fn new() -> Self {
        let tools = Tools::new(env!("CARGO_BIN_EXE_podtool")).unwrap();
        let ca = MeshCa::init(&tools).unwrap();
        let api = ApiServer::start().unwrap();
        let mut node = Node::new().unwrap();
        let client = node
            .add_kube_pod("client", "shop", &uid(), KubeletLayout::SystemdBurstable)
            .unwrap();
        let server = node
            .add_kube_pod("server", "shop", &uid(), KubeletLayout::CgroupfsBestEffort)
            .unwrap();
        let servers = vec![
            server
                .serve(
                    &tools,
                    &[
                        "web",
                        "--name",
                        "server",
                        "--listen",
                        &server.addr(WEB_PORT).to_string(),
                    ],
                )
                .unwrap(),
            server
                .serve(
                    &tools,
                    &["echo", "--listen", &server.addr(ECHO_PORT).to_string()],
                )
                .unwrap(),
        ];
        api.apply(namespace("shop", true)).unwrap();
        api.apply(client.kube_object(Some("frontend"), json!({"app": "frontend"})))
            .unwrap();
        api.apply(server.kube_object(Some("backend"), json!({"app": "backend"})))
            .unwrap();
        let agent = Agent::start_kube(&tools, &node, &api, &ca.args()).unwrap();
        let mesh = KubeNode {
            tools,
            api,
            agent,
            client,
            server,
            _servers: servers,
            node,
            _ca: ca,
        };
        for pod in [&mesh.client, &mesh.server] {
            wait_until("pod enrolled", Duration::from_secs(10), || {
                enrolled(&mesh.agent, pod)
            })
            .unwrap();
        }
        mesh
    }

    fn podtool(&self, pod: &Pod, args: &[&str]) -> Value {
        let mut cmd = pod.command(&self.tools.podtool).unwrap();
        cmd.args(args);
        run_json(&mut cmd, RUN).unwrap()
    }

    fn probe(&self, to: &str) -> String {
        let report = self.podtool(&self.client, &["probe", "--to", to, "--timeout-ms", "3000"]);
        report["outcome"].as_str().unwrap_or("").to_owned()
    }

    fn curl(&self, url: &str) -> u16 {
        let mut cmd = self.client.command(Path::new("/usr/bin/curl")).unwrap();
        cmd.args([
            "-s",
            "-o",
            "/dev/null",
            "--max-time",
            "5",
            "-w",
            "%{http_code}",
            url,
        ]);
        let out = Process::spawn(&mut cmd, "curl").unwrap().wait(RUN).unwrap();
        out.stdout.trim().parse().unwrap_or(0)
    }
}

impl Drop for KubeNode {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- agent log ---\n{}", self.agent.log());
            eprintln!("--- API requests ---\n{:?}", self.api.served_all());
        }
    }
}

/// Acceptance 1: with only `--kubernetes` on two nodes, pods of a labeled
/// namespace talk over mTLS, and the metrics name the Deployment, namespace,
/// service-account principal and canonical labels, by Istio's rules.
#[test]
fn two_nodes_mesh_a_labeled_namespace_over_mtls_from_the_api_alone() {
    let tools = Tools::new(env!("CARGO_BIN_EXE_podtool")).unwrap();
    let ca = MeshCa::init(&tools).unwrap();
    let api = ApiServer::start().unwrap();
    let mut node0 = Node::with_index(0).unwrap();
    let mut node1 = Node::with_index(1).unwrap();
    node0.link(&node1).unwrap();
    let client = node0
        .add_kube_pod("web", "shop", &uid(), KubeletLayout::SystemdGuaranteed)
        .unwrap();
    let server = node1
        .add_kube_pod("db", "shop", &uid(), KubeletLayout::CgroupfsBurstable)
        .unwrap();
    let _echo = server
        .serve(
            &tools,
            &["echo", "--listen", &server.addr(ECHO_PORT).to_string()],
        )
        .unwrap();
    api.apply(namespace("shop", true)).unwrap();
    api.apply(client.kube_object(
        Some("storefront"),
        json!({"app": "storefront", "version": "v2"}),
    ))
    .unwrap();
    api.apply(server.kube_object(
        Some("orders-db"),
        json!({"app.kubernetes.io/name": "orders", "service.istio.io/canonical-revision": "r7"}),
    ))
    .unwrap();
    let near = Agent::start_kube(&tools, &node0, &api, &ca.args()).unwrap();
    let far = Agent::start_kube(&tools, &node1, &api, &ca.args()).unwrap();
    let dump_logs = |e: &dyn std::fmt::Display| {
        panic!(
            "{e}\n--- node 0 ---\n{}\n--- node 1 ---\n{}",
            near.log(),
            far.log()
        )
    };
    for (agent, pod) in [(&near, &client), (&far, &server)] {
        wait_until("enrolled from the API", Duration::from_secs(10), || {
            enrolled(agent, pod)
        })
        .unwrap_or_else(|e| dump_logs(&e));
    }
    // Each agent enrolls only its own node's pod.
    assert!(!enrolled(&near, &server).unwrap());
    assert!(!enrolled(&far, &client).unwrap());

    let mut cmd = client.command(&tools.podtool).unwrap();
    cmd.args([
        "stream",
        "--to",
        &server.addr(ECHO_PORT).to_string(),
        "--bytes",
        "2000000",
    ]);
    let streamed = run_json(&mut cmd, RUN).unwrap();
    assert_eq!(
        streamed["sent_sha256"], streamed["received_sha256"],
        "{streamed}"
    );
    assert_eq!(streamed["received"], 2_000_000, "{streamed}");

    let labels = [
        ("connection_security_policy", "mutual_tls"),
        ("source_workload", "storefront"),
        ("source_workload_namespace", "shop"),
        ("source_principal", &principal("shop", "web-sa")),
        ("source_canonical_service", "storefront"),
        ("source_canonical_revision", "v2"),
        ("destination_workload", "orders-db"),
        ("destination_workload_namespace", "shop"),
        ("destination_principal", &principal("shop", "db-sa")),
        ("destination_canonical_service", "orders"),
        ("destination_canonical_revision", "r7"),
    ];
    for (agent, reporter) in [(&near, "source"), (&far, "destination")] {
        let mut wanted = labels.to_vec();
        wanted.push(("reporter", reporter));
        wait_until(
            &format!("{reporter} metrics"),
            Duration::from_secs(10),
            || Ok(agent.metric("istio_tcp_connections_closed_total", &wanted)? == 1.0),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.metrics().unwrap()));
    }
    // Paginated initial lists and watches, per kind, for each agent.
    let pods = api.served("pods");
    assert_eq!(pods.list_starts, 2, "{:?}", api.served_all());
    assert!(pods.watches >= 2, "{pods:?}");
}

/// Acceptance 2: creating, changing and deleting a Pod, Service, HTTPRoute and
/// AuthorizationPolicy through the API takes effect within a second; a deleted
/// pod is unenrolled and its map entries and listeners are freed.
#[test]
fn api_changes_take_effect_within_a_second() {
    let mut mesh = KubeNode::new();
    let echo = mesh.server.addr(ECHO_PORT).to_string();
    let baseline_entries = mesh.agent.map_entries("WORKLOADS").unwrap();

    // Pod: created, then enrolled.
    let late = mesh
        .node
        .add_kube_pod("late", "shop", &uid(), KubeletLayout::SystemdBestEffort)
        .unwrap();
    mesh.api
        .apply(late.kube_object(Some("late"), json!({"app": "late"})))
        .unwrap();
    let took = within("new pod enrolled", PROMPT, || enrolled(&mesh.agent, &late));
    eprintln!("pod created -> enrolled in {took:?}");
    assert_eq!(
        mesh.agent.map_entries("WORKLOADS").unwrap(),
        baseline_entries + 1
    );

    // Service: created, then its VIP is balanced to the server.
    let vip = "10.96.7.10";
    let service = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "backend", "namespace": "shop"},
        "spec": {"type": "ClusterIP", "clusterIP": vip, "clusterIPs": [vip], "selector": {"app": "backend"},
                 "ports": [{"name": "http", "port": 80, "targetPort": WEB_PORT, "protocol": "TCP"}]}});
    mesh.api.apply(service.clone()).unwrap();
    let url = format!("http://{vip}/");
    within(
        "the Service answers",
        PROMPT + Duration::from_secs(5),
        || Ok(mesh.curl(&url) == 200),
    );

    // HTTPRoute: attaching one that matches only /v2 makes / a 404 NR; changing
    // it to match / brings 200 back; deleting it too.
    let route = |path: &str| {
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "backend-route", "namespace": "shop"},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "backend", "port": 80}],
                     "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": path}}],
                                "backendRefs": [{"name": "backend", "port": 80}]}]}})
    };
    mesh.api.apply(route("/v2")).unwrap();
    let took = within("route applied", PROMPT, || Ok(mesh.curl(&url) == 404));
    eprintln!("route created -> in force in {took:?}");
    mesh.api.apply(route("/")).unwrap();
    within("route changed", PROMPT, || Ok(mesh.curl(&url) == 200));
    mesh.api.apply(route("/v2")).unwrap();
    within("route changed back", PROMPT, || Ok(mesh.curl(&url) == 404));
    assert!(mesh.api.delete(
        "gateway.networking.k8s.io/v1",
        "HTTPRoute",
        "shop",
        "backend-route"
    ));
    within("route deleted", PROMPT, || Ok(mesh.curl(&url) == 200));

    // AuthorizationPolicy: a DENY for the echo port refuses the client; deleting
    // it lets the client back in.
    assert_eq!(mesh.probe(&echo), "data");
    let deny = json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-echo", "namespace": "shop"},
        "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"ports": [ECHO_PORT.to_string()]}}]}]}});
    mesh.api.apply(deny).unwrap();
    let took = within("deny in force", PROMPT, || Ok(mesh.probe(&echo) != "data"));
    eprintln!("policy created -> in force in {took:?}");
    assert!(mesh.api.delete(
        "security.istio.io/v1",
        "AuthorizationPolicy",
        "shop",
        "deny-echo"
    ));
    within("deny lifted", PROMPT, || Ok(mesh.probe(&echo) == "data"));

    // Service deleted: its VIP is no longer balanced.
    assert!(mesh.api.delete("v1", "Service", "shop", "backend"));
    within("Service gone from the catalog", PROMPT, || {
        Ok(mesh.agent.config_dump()?["services"]
            .as_array()
            .is_some_and(|s| s.is_empty()))
    });

    // Pod deleted: unenrolled, its kernel entries and in-pod listeners freed.
    let late_key = format!("shop/{}", late.name);
    let listeners_of = |key: &str| -> usize {
        mesh.agent.config_dump().unwrap()["listeners"]
            .as_array()
            .map_or(0, |l| l.iter().filter(|x| x["workload"] == key).count())
    };
    assert!(listeners_of(&late_key) >= 2);
    assert!(mesh.api.delete("v1", "Pod", "shop", &late.name));
    within("pod unenrolled", PROMPT, || {
        Ok(!states(&mesh.agent)?.iter().any(|(w, _)| *w == late_key))
    });
    assert_eq!(
        mesh.agent.map_entries("WORKLOADS").unwrap(),
        baseline_entries
    );
    assert_eq!(listeners_of(&late_key), 0);
    // The listener sockets are gone from the pod's namespace.
    wait_until("in-pod listeners closed", Duration::from_secs(5), || {
        let out = nodemesh_testkit::run(std::process::Command::new("ip").args([
            "netns",
            "exec",
            &late.netns.name,
            "ss",
            "-Htln",
        ]))?;
        Ok(out.trim().is_empty())
    })
    .unwrap();
}

fn lists_since(
    api: &ApiServer,
    before: &std::collections::BTreeMap<String, Served>,
) -> Vec<(String, u64)> {
    api.served_all()
        .into_iter()
        .map(|(kind, now)| {
            let then = before.get(&kind).copied().unwrap_or_default();
            (kind, now.list_starts - then.list_starts)
        })
        .collect()
}

/// Acceptance 3: watches cut, the API server restarted, and history expired
/// (410 Gone): the agent re-syncs and applies what changed meanwhile, keeps
/// serving its last state, drops no connection, stays ready, and lists each
/// kind at most once per disconnect (and only after the 410).
#[test]
fn cut_watches_restarts_and_410_resync_without_dropping_anything() {
    let mut mesh = KubeNode::new();
    let echo = mesh.server.addr(ECHO_PORT).to_string();
    let mut hold = mesh.client.command(&mesh.tools.podtool).unwrap();
    hold.args([
        "hold",
        "--to",
        &echo,
        "--seconds",
        "25",
        "--interval-ms",
        "100",
    ]);
    let hold = Process::spawn(&mut hold, "hold").unwrap();
    let ready = |agent: &Agent| agent.get("/healthz/ready").is_ok();
    let generation = |agent: &Agent| agent.generation().unwrap();
    let vip_count = |mesh: &KubeNode| {
        mesh.agent.config_dump().unwrap()["services"]
            .as_array()
            .map_or(0, |s| s.len())
    };
    let add_service = |mesh: &KubeNode, n: u8| {
        let vip = format!("10.96.8.{n}");
        mesh.api
            .apply(json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": format!("svc-{n}"), "namespace": "shop"},
                "spec": {"clusterIP": vip, "selector": {"app": "backend"},
                         "ports": [{"port": 80, "targetPort": WEB_PORT}]}}))
            .unwrap();
    };

    // 1. Every watch cut: the agent resumes from its resourceVersions, no list.
    let before = mesh.api.served_all();
    mesh.api.cut_watches();
    std::thread::sleep(Duration::from_millis(300));
    add_service(&mesh, 1);
    wait_until("change after a cut applied", Duration::from_secs(5), || {
        Ok(vip_count(&mesh) == 1)
    })
    .unwrap();
    let lists = lists_since(&mesh.api, &before);
    assert!(
        lists.iter().all(|(_, n)| *n == 0),
        "relisted after a cut: {lists:?}"
    );

    // 2. The API server restarts; a change made while it is down is seen after.
    let before = mesh.api.served_all();
    let gen_before = generation(&mesh.agent);
    mesh.api.stop();
    std::thread::sleep(Duration::from_secs(2));
    assert!(ready(&mesh.agent), "not ready while the API server is down");
    assert_eq!(
        mesh.probe(&echo),
        "data",
        "not serving while the API server is down"
    );
    assert_eq!(
        generation(&mesh.agent),
        gen_before,
        "re-applied with no change"
    );
    add_service(&mesh, 2);
    mesh.api.resume().unwrap();
    wait_until(
        "change during the outage applied",
        Duration::from_secs(15),
        || Ok(vip_count(&mesh) == 2),
    )
    .unwrap();
    let lists = lists_since(&mesh.api, &before);
    assert!(
        lists.iter().all(|(_, n)| *n <= 1),
        "relist storm after a restart: {lists:?}"
    );

    // 3. History expires: exactly one list per kind, then watching again.
    let before = mesh.api.served_all();
    mesh.api.expire();
    add_service(&mesh, 3);
    wait_until("change after 410 applied", Duration::from_secs(15), || {
        Ok(vip_count(&mesh) == 3)
    })
    .unwrap();
    // Each watcher relists after its own backoff.
    wait_until("every kind relisted", Duration::from_secs(20), || {
        let lists = lists_since(&mesh.api, &before);
        Ok(lists.len() == WATCHED_KINDS && lists.iter().all(|(_, n)| *n >= 1))
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", lists_since(&mesh.api, &before)));
    std::thread::sleep(Duration::from_secs(1));
    let lists = lists_since(&mesh.api, &before);
    assert!(
        lists.iter().all(|(_, n)| *n == 1),
        "not one list per kind after 410: {lists:?}"
    );
    assert!(ready(&mesh.agent));

    // The long-lived connection never noticed.
    let report = hold.wait(RUN).unwrap().report().unwrap();
    assert!(report["error"].is_null(), "connection broke: {report}");
    assert!(report["pings"].as_u64().unwrap() > 100, "{report}");
}

/// Acceptance 4: pods of unlabeled namespaces, opted-out pods and host-network
/// pods are never enrolled; pods already running when the agent starts are found
/// by cgroup discovery for both kubelet drivers and all QoS classes, and a pod
/// whose sandbox starts after the API says it runs is enrolled once it starts.
#[test]
fn enrollment_follows_opt_in_and_finds_running_pods_in_every_kubelet_layout() {
    let tools = Tools::new(env!("CARGO_BIN_EXE_podtool")).unwrap();
    let ca = MeshCa::init(&tools).unwrap();
    let api = ApiServer::start().unwrap();
    let mut node = Node::new().unwrap();
    api.apply(namespace("shop", true)).unwrap();
    api.apply(namespace("plain", false)).unwrap();
    let mut meshed = Vec::new();
    for (i, layout) in KubeletLayout::ALL.iter().enumerate() {
        let pod = node
            .add_kube_pod(&format!("p{i}"), "shop", &uid(), *layout)
            .unwrap();
        api.apply(pod.kube_object(None, json!({"app": format!("p{i}")})))
            .unwrap();
        meshed.push(pod);
    }
    let plain = node
        .add_kube_pod("plain", "plain", &uid(), KubeletLayout::SystemdBurstable)
        .unwrap();
    api.apply(plain.kube_object(None, json!({}))).unwrap();
    let out = node
        .add_kube_pod("optout", "shop", &uid(), KubeletLayout::SystemdBurstable)
        .unwrap();
    api.apply(out.kube_object(None, json!({"nodemesh.io/mesh": "disabled"})))
        .unwrap();
    let host = node
        .add_kube_pod("hostnet", "shop", &uid(), KubeletLayout::CgroupfsBurstable)
        .unwrap();
    let mut host_object = host.kube_object(None, json!({}));
    host_object["spec"]["hostNetwork"] = json!(true);
    api.apply(host_object).unwrap();
    // The API says this pod runs, but its sandbox has not started yet.
    let slow_uid = uid();
    let mut slow = node
        .add_pod_at(
            "slow",
            "shop",
            &KubeletLayout::SystemdBestEffort.pod_cgroup(&slow_uid),
        )
        .unwrap();
    slow.uid = slow_uid;
    api.apply(slow.kube_object(None, json!({}))).unwrap();

    let agent = Agent::start_kube(&tools, &node, &api, &ca.args()).unwrap();
    for pod in &meshed {
        wait_until("running pod discovered", Duration::from_secs(10), || {
            enrolled(&agent, pod)
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
    }
    std::thread::sleep(Duration::from_millis(500));
    let states = states(&agent).unwrap();
    for pod in [&plain, &out, &host] {
        let key = format!("{}/{}", pod.namespace, pod.name);
        assert!(
            !states.iter().any(|(w, _)| *w == key),
            "{key} should not be enrolled: {states:?}"
        );
    }
    assert!(!enrolled(&agent, &slow).unwrap());
    // Not meshed, so its traffic is not captured.
    let mut cmd = plain.command(&tools.podtool).unwrap();
    let echo = meshed[0]
        .serve(
            &tools,
            &["echo", "--listen", &meshed[0].addr(ECHO_PORT).to_string()],
        )
        .unwrap();
    cmd.args(["probe", "--to", &meshed[0].addr(ECHO_PORT).to_string()]);
    run_json(&mut cmd, RUN).unwrap();
    assert!(
        !agent
            .connections()
            .unwrap()
            .iter()
            .any(|c| c.source_workload == "plain/plain"),
    );
    drop(echo);

    slow.start_sandbox().unwrap();
    wait_until(
        "pod enrolled once its sandbox runs",
        Duration::from_secs(5),
        || enrolled(&agent, &slow),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
}

/// Acceptance 5: a malformed object is rejected with its kind, name and field in
/// the log and a metric, while every other object still applies; a bad update of
/// a good object keeps the last good version in force.
#[test]
fn a_malformed_object_is_rejected_alone() {
    let mesh = KubeNode::new();
    let echo = mesh.server.addr(ECHO_PORT).to_string();
    let vip = "10.96.9.10";
    mesh.api
        .apply(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "backend", "namespace": "shop"},
            "spec": {"clusterIP": vip, "selector": {"app": "backend"},
                     "ports": [{"port": 80, "targetPort": WEB_PORT}]}}))
        .unwrap();
    let route = |name: &str, pattern: &str| {
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "backend", "port": 80}],
                     "rules": [{"matches": [{"path": {"type": "RegularExpression", "value": pattern}}],
                                "backendRefs": [{"name": "backend", "port": 80}]}]}})
    };
    mesh.api.apply(route("bad-route", "/(unclosed")).unwrap();
    mesh.api
        .apply(json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny-echo", "namespace": "shop"},
            "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"ports": [ECHO_PORT.to_string()]}}]}]}}))
        .unwrap();
    wait_until("rejection counted", Duration::from_secs(5), || {
        Ok(mesh
            .agent
            .metric("nodemesh_rejected_objects", &[("kind", "HTTPRoute")])?
            == 1.0)
    })
    .unwrap();
    // The policy sent with it applies.
    wait_until("policy in force", Duration::from_secs(5), || {
        Ok(mesh.probe(&echo) != "data")
    })
    .unwrap();
    let line = mesh
        .agent
        .log_line("rejection logged", |l| l.contains("object rejected"));
    assert!(line.contains("HTTPRoute shop/bad-route"), "{line}");
    assert!(line.contains("spec.rules[0].matches[0].path"), "{line}");
    let rejected = mesh.agent.config_dump().unwrap()["config"]["rejectedObjects"].clone();
    assert!(
        rejected.to_string().contains("HTTPRoute shop/bad-route"),
        "{rejected}"
    );
    // With no valid route attached, the Service answers every path.
    let url = format!("http://{vip}/anything");
    wait_until("service serves", Duration::from_secs(5), || {
        Ok(mesh.curl(&url) == 200)
    })
    .unwrap();

    // A good route, then a bad update of it: the good version stays in force.
    mesh.api.apply(route("good-route", "^/v[0-9]+$")).unwrap();
    wait_until("good route in force", Duration::from_secs(5), || {
        Ok(mesh.curl(&url) == 404)
    })
    .unwrap();
    mesh.api.apply(route("good-route", "^/v[0-9+$")).unwrap();
    wait_until("second rejection counted", Duration::from_secs(5), || {
        Ok(mesh
            .agent
            .metric("nodemesh_rejected_objects", &[("kind", "HTTPRoute")])?
            == 2.0)
    })
    .unwrap();
    assert_eq!(
        mesh.curl(&url),
        404,
        "the last good route is no longer in force"
    );
    assert_eq!(mesh.curl(&format!("http://{vip}/v1")), 200);
}

fn endpoint_slice(name: &str, service: &str, ip: &str, port: u16, ready: bool) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": service,
                                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": ready, "serving": ready, "terminating": false}}]})
}

/// EndpointSlices: a Service without a selector reaches an address no pod has
/// (directly, as that server is outside the mesh), a named target port is
/// resolved by its slice and reached over mTLS, and an endpoint that turns
/// unready stops getting requests, all within a second of the change.
#[test]
fn endpoint_slices_give_services_their_endpoints_and_readiness() {
    let mut mesh = KubeNode::new();
    // A server the API does not know: a VM or database outside the cluster.
    let outside = mesh
        .node
        .add_kube_pod(
            "outside",
            "legacy",
            &uid(),
            KubeletLayout::CgroupfsBestEffort,
        )
        .unwrap();
    let _outside_web = outside
        .serve(
            &mesh.tools,
            &[
                "web",
                "--name",
                "outside",
                "--listen",
                &outside.addr(WEB_PORT).to_string(),
            ],
        )
        .unwrap();
    let request_metric = |service: &str, workload: &str| {
        mesh.agent
            .metric(
                "istio_requests_total",
                &[
                    ("reporter", "source"),
                    ("destination_service_name", service),
                    ("destination_workload", workload),
                    ("response_code", "200"),
                ],
            )
            .unwrap_or(0.0)
    };

    // A Service without a selector: its slice is its only source of endpoints.
    mesh.api
        .apply(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "legacy", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.8.10", "ports": [{"name": "http", "port": 80, "targetPort": WEB_PORT}]}}))
        .unwrap();
    let legacy = "http://10.96.8.10/";
    within(
        "selector-less Service in the catalog",
        Duration::from_secs(15),
        || Ok(mesh.curl(legacy) == 503),
    );
    mesh.api
        .apply(endpoint_slice(
            "legacy-1",
            "legacy",
            &outside.ip.to_string(),
            WEB_PORT,
            true,
        ))
        .unwrap();
    let took = within("slice endpoints in force", PROMPT, || {
        Ok(mesh.curl(legacy) == 200)
    });
    eprintln!("EndpointSlice created -> in force in {took:?}");
    assert!(request_metric("legacy", "unknown") >= 1.0);

    // A named target port: the selector alone cannot resolve it, the slice does.
    mesh.api
        .apply(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "named", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.8.11", "selector": {"app": "backend"},
                     "ports": [{"name": "http", "port": 80, "targetPort": "web"}]}}))
        .unwrap();
    let named = "http://10.96.8.11/";
    within(
        "named-port Service in the catalog",
        Duration::from_secs(15),
        || Ok(mesh.curl(named) == 503),
    );
    let server_ip = mesh.server.ip.to_string();
    mesh.api
        .apply(endpoint_slice(
            "named-1", "named", &server_ip, WEB_PORT, true,
        ))
        .unwrap();
    within(
        "named port resolved",
        PROMPT,
        || Ok(mesh.curl(named) == 200),
    );
    let mtls = mesh
        .agent
        .metric(
            "istio_requests_total",
            &[
                ("reporter", "source"),
                ("destination_service_name", "named"),
                ("destination_workload", "backend"),
                ("connection_security_policy", "mutual_tls"),
            ],
        )
        .unwrap();
    assert!(mtls >= 1.0, "{}", mesh.agent.metrics().unwrap());

    // Readiness: the endpoint turns unready, then ready again.
    mesh.api
        .apply(endpoint_slice(
            "named-1", "named", &server_ip, WEB_PORT, false,
        ))
        .unwrap();
    let took = within("unready endpoint dropped", PROMPT, || {
        Ok(mesh.curl(named) == 503)
    });
    eprintln!("endpoint unready -> out of rotation in {took:?}");
    mesh.api
        .apply(endpoint_slice(
            "named-1", "named", &server_ip, WEB_PORT, true,
        ))
        .unwrap();
    within(
        "ready endpoint back",
        PROMPT,
        || Ok(mesh.curl(named) == 200),
    );
    let dump = mesh.agent.config_dump().unwrap();
    let view = dump["services"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["service"] == "shop/named")
        .cloned()
        .unwrap_or_else(|| panic!("no shop/named in {}", dump["services"]));
    assert_eq!(view["targetPort"], "web", "{view}");
}
