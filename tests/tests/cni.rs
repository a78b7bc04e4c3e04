//! End-to-end tests of the CNI chain: pods get their network from Debian's CNI
//! `bridge` and `host-local` plugins, then `nodemesh-cni` asks the agent (in
//! Kubernetes mode, against the API server double) to enroll them before their
//! containers start. The Pod objects exist in the API first, without an address,
//! as a scheduled pod's do when kubelet creates its sandbox.

use std::time::Duration;

use nodemesh_testkit::apiserver::{ApiServer, namespace, pod_uid as uid};
use nodemesh_testkit::cni::CniNetwork;
use nodemesh_testkit::{
    Agent, KubeletLayout, MeshCa, Node, Pod, Process, Tools, run_json, wait_until,
};
use serde_json::{Value, json};

const ECHO_PORT: u16 = 9000;
const RUN: Duration = Duration::from_secs(60);

/// A scheduled pod as the API has it before kubelet reports an address.
fn scheduled(name: &str, ns: &str, uid: &str, node: &Node, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": uid, "labels": labels},
        "spec": {"nodeName": node.name(), "serviceAccountName": format!("{name}-sa"),
                 "containers": [{"name": "app", "image": "registry.example/app:1"}]},
        "status": {"phase": "Pending"}})
}

/// The same pod once kubelet has written its addresses.
fn running(pod: &Pod, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod.name, "namespace": pod.namespace, "uid": pod.uid, "labels": labels},
        "spec": {"nodeName": pod.node_name, "serviceAccountName": format!("{}-sa", pod.name),
                 "containers": [{"name": "app", "image": "registry.example/app:1"}]},
        "status": {"phase": "Running", "podIP": pod.ip.to_string(),
                   "podIPs": [{"ip": pod.ip.to_string()}, {"ip": pod.ip6.to_string()}]}})
}

fn state_of(agent: &Agent, pod: &Pod) -> Option<String> {
    let key = format!("{}/{}", pod.namespace, pod.name);
    agent.config_dump().ok()?["workloads"]
        .as_array()?
        .iter()
        .find(|w| w["workload"] == key.as_str())
        .and_then(|w| w["state"].as_str().map(str::to_owned))
}

fn listeners_of(agent: &Agent, pod: &Pod) -> usize {
    let key = format!("{}/{}", pod.namespace, pod.name);
    agent.config_dump().unwrap()["listeners"]
        .as_array()
        .map_or(0, |l| {
            l.iter().filter(|x| x["workload"] == key.as_str()).count()
        })
}

fn principal(ns: &str, sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
}

/// One node whose agent answers the CNI plugin, with the API double, a meshed
/// namespace `shop` and an unlabeled one `plain`.
struct CniNode {
    tools: Tools,
    ca: MeshCa,
    api: ApiServer,
    node: Node,
    cni: CniNetwork,
    socket_dir: tempfile::TempDir,
    agent: Option<Agent>,
}

impl CniNode {
    fn new(start_agent: bool) -> Self {
        let tools = Tools::new(env!("CARGO_BIN_EXE_podtool")).unwrap();
        let ca = MeshCa::init(&tools).unwrap();
        let api = ApiServer::start().unwrap();
        api.apply(namespace("shop", true)).unwrap();
        api.apply(namespace("plain", false)).unwrap();
        let node = Node::new().unwrap();
        let socket_dir = tempfile::tempdir().unwrap();
        let cni = CniNetwork::new(
            &node,
            &tools.cni_plugin,
            &socket_dir.path().join("cni.sock"),
        )
        .unwrap();
        let mut n = CniNode {
            tools,
            ca,
            api,
            node,
            cni,
            socket_dir,
            agent: None,
        };
        if start_agent {
            n.start_agent();
        }
        n
    }

    fn start_agent(&mut self) {
        let socket = self.socket_dir.path().join("cni.sock");
        let mut args = self.ca.args().to_vec();
        args.extend(["--cni-socket", socket.to_str().unwrap()]);
        let agent = Agent::start_kube(&self.tools, &self.node, &self.api, &args).unwrap();
        wait_until("agent ready", Duration::from_secs(20), || {
            Ok(agent.get("/healthz/ready").is_ok())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
        self.agent = Some(agent);
    }

    fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("agent started")
    }

    /// What `from` saw connecting to `to`'s echo server: `data` when it answered.
    fn probe(&self, from: &Pod, to: &Pod) -> String {
        let mut cmd = from.command(&self.tools.podtool).unwrap();
        let to = to.addr(ECHO_PORT).to_string();
        cmd.args(["probe", "--to", &to, "--timeout-ms", "3000"]);
        let report = run_json(&mut cmd, RUN).unwrap();
        report["outcome"].as_str().unwrap_or("").to_owned()
    }
}

impl Drop for CniNode {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(agent) = &self.agent
        {
            eprintln!("--- agent log ---\n{}", agent.log());
        }
    }
}

/// Acceptance 1, 3 and 4: a pod's first instruction already runs captured and
/// its connection is carried over mTLS; DEL unenrolls it and frees its kernel
/// entries and listeners, and a second DEL succeeds; a pod outside the mesh
/// passes through ADD without waiting for an enrollment.
#[test]
fn add_enrolls_before_the_first_instruction_del_frees_and_unmeshed_pods_pass() {
    let mesh = CniNode::new(true);
    let agent = mesh.agent();
    let baseline = agent.map_entries("WORKLOADS").unwrap();

    // The server: scheduled, then its sandbox created through the chain.
    let server_uid = uid();
    let server_labels = json!({"app": "backend"});
    mesh.api
        .apply(scheduled(
            "server",
            "shop",
            &server_uid,
            &mesh.node,
            server_labels.clone(),
        ))
        .unwrap();
    let (server, run) = mesh
        .cni
        .add_pod(
            "server",
            "shop",
            &server_uid,
            KubeletLayout::SystemdBurstable,
        )
        .unwrap();
    assert!(run.ok, "server ADD failed: {run:?}");
    assert_eq!(
        state_of(agent, &server).as_deref(),
        Some("enrolled"),
        "{run:?}"
    );
    let mut echo = server.command(&mesh.tools.podtool).unwrap();
    echo.args(["echo", "--listen", &server.addr(ECHO_PORT).to_string()]);
    let _echo = Process::spawn(&mut echo, "echo server").unwrap();
    mesh.api.apply(running(&server, server_labels)).unwrap();

    // The client: its container connects as soon as ADD returns.
    let client_uid = uid();
    let client_labels = json!({"app": "frontend"});
    mesh.api
        .apply(scheduled(
            "client",
            "shop",
            &client_uid,
            &mesh.node,
            client_labels.clone(),
        ))
        .unwrap();
    let (client, run) = mesh
        .cni
        .add_pod(
            "client",
            "shop",
            &client_uid,
            KubeletLayout::CgroupfsBestEffort,
        )
        .unwrap();
    assert!(run.ok, "client ADD failed: {run:?}");
    eprintln!("ADD of a meshed pod took {:?}", run.took);
    let result = run.json();
    assert_eq!(result["cniVersion"], "1.0.0");
    assert!(
        result["ips"][0]["address"]
            .as_str()
            .is_some_and(|a| a.starts_with(&client.ip.to_string())),
        "the bridge plugin's result is passed through: {result}"
    );
    wait_until("echo server listening", Duration::from_secs(5), || {
        let out = nodemesh_testkit::run(std::process::Command::new("ip").args([
            "netns",
            "exec",
            &server.netns.name,
            "ss",
            "-Htln",
        ]))?;
        Ok(out.contains(&format!(":{ECHO_PORT}")))
    })
    .unwrap();
    assert_eq!(mesh.probe(&client, &server), "data");
    mesh.api.apply(running(&client, client_labels)).unwrap();
    let wanted = [
        ("reporter", "destination"),
        ("connection_security_policy", "mutual_tls"),
        ("source_principal", principal("shop", "client-sa").as_str()),
        (
            "destination_principal",
            principal("shop", "server-sa").as_str(),
        ),
    ]
    .map(|(k, v)| (k, v.to_owned()));
    let wanted: Vec<(&str, &str)> = wanted.iter().map(|(k, v)| (*k, v.as_str())).collect();
    wait_until("mTLS connection counted", Duration::from_secs(10), || {
        Ok(agent.metric("istio_tcp_connections_opened_total", &wanted)? >= 1.0)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.metrics().unwrap()));
    assert_eq!(
        agent
            .metric(
                "nodemesh_cni_requests_total",
                &[("command", "ADD"), ("outcome", "enrolled")]
            )
            .unwrap(),
        2.0
    );

    // DEL: unenrolled, kernel entries and listeners freed; again: still fine.
    assert_eq!(agent.map_entries("WORKLOADS").unwrap(), baseline + 2);
    assert!(listeners_of(agent, &client) >= 2);
    let run = mesh.cni.del_pod(&client).unwrap();
    assert!(run.ok, "DEL failed: {run:?}");
    assert_eq!(state_of(agent, &client), None, "still listed after DEL");
    assert_eq!(agent.map_entries("WORKLOADS").unwrap(), baseline + 1);
    assert_eq!(listeners_of(agent, &client), 0);
    let again = mesh.cni.del_pod(&client).unwrap();
    assert!(again.ok, "a second DEL failed: {again:?}");
    assert_eq!(again.nodemesh_exit, Some(0));

    // Outside the mesh: an unlabeled namespace, and a pod that opted out.
    for (ns, name, labels) in [
        ("plain", "outsider", json!({"app": "x"})),
        ("shop", "opted-out", json!({"nodemesh.io/mesh": "disabled"})),
    ] {
        let pod_uid = uid();
        mesh.api
            .apply(scheduled(name, ns, &pod_uid, &mesh.node, labels))
            .unwrap();
        let (pod, run) = mesh
            .cni
            .add_pod(name, ns, &pod_uid, KubeletLayout::SystemdBestEffort)
            .unwrap();
        assert!(run.ok, "{ns}/{name}: {run:?}");
        assert!(run.stderr.contains("not meshed"), "{run:?}");
        // Answered from the agent's view of the API, not after an enrollment
        // attempt (ADD waits up to 20 s for one).
        assert!(
            run.took < Duration::from_secs(5),
            "{ns}/{name} waited {:?}",
            run.took
        );
        assert_eq!(state_of(agent, &pod), None, "{ns}/{name} was enrolled");
    }
    assert_eq!(
        agent
            .metric(
                "nodemesh_cni_requests_total",
                &[("command", "ADD"), ("outcome", "not_meshed")]
            )
            .unwrap(),
        2.0
    );
}

/// Acceptance 2: with no agent, ADD fails with a CNI error (code 11, "try again
/// later") and a non-zero exit, so the runtime never starts the pod; the
/// runtime's cleanup DEL succeeds; once the agent runs, a retried ADD enrolls it.
#[test]
fn without_the_agent_add_fails_closed_and_a_retry_succeeds_once_it_runs() {
    let mut mesh = CniNode::new(false);
    let pod_uid = uid();
    mesh.api
        .apply(scheduled(
            "late",
            "shop",
            &pod_uid,
            &mesh.node,
            json!({"app": "late"}),
        ))
        .unwrap();
    let (mut pod, run) = mesh
        .cni
        .add_pod("late", "shop", &pod_uid, KubeletLayout::CgroupfsGuaranteed)
        .unwrap();
    assert!(!run.ok);
    assert_eq!(run.nodemesh_exit, Some(1), "{run:?}");
    let error = run.json();
    assert_eq!(error["code"], 11, "{run:?}");
    assert!(
        error["msg"].as_str().unwrap_or("").contains("unreachable"),
        "{error}"
    );
    assert!(
        error["details"]
            .as_str()
            .unwrap_or("")
            .contains("shop/late"),
        "{error}"
    );
    // The runtime tears the failed sandbox down; with the agent gone there is
    // nothing to undo, and DEL succeeds.
    let del = mesh.cni.del_pod(&pod).unwrap();
    assert!(del.ok, "{del:?}");

    mesh.start_agent();
    let mut server = mesh
        .node
        .add_kube_pod("server", "shop", &uid(), KubeletLayout::SystemdGuaranteed)
        .unwrap();
    let retry = mesh.cni.retry_add(&mut pod).unwrap();
    assert!(retry.ok, "retried ADD failed: {retry:?}");
    let agent = mesh.agent();
    assert_eq!(state_of(agent, &pod).as_deref(), Some("enrolled"));
    mesh.api
        .apply(running(&pod, json!({"app": "late"})))
        .unwrap();

    // Its connections are carried over mTLS, to a meshed server of the node.
    let mut echo = server.command(&mesh.tools.podtool).unwrap();
    echo.args(["echo", "--listen", &server.addr(ECHO_PORT).to_string()]);
    let _echo = Process::spawn(&mut echo, "echo server").unwrap();
    mesh.api
        .apply(server.kube_object(Some("backend"), json!({"app": "backend"})))
        .unwrap();
    wait_until("server enrolled", Duration::from_secs(10), || {
        Ok(state_of(agent, &server).as_deref() == Some("enrolled"))
    })
    .unwrap();
    assert_eq!(mesh.probe(&pod, &server), "data");
    let late = principal("shop", "late-sa");
    wait_until("mTLS connection counted", Duration::from_secs(10), || {
        Ok(agent.metric(
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "destination"),
                ("connection_security_policy", "mutual_tls"),
                ("source_principal", late.as_str()),
            ],
        )? >= 1.0)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.metrics().unwrap()));
    server.sandbox.take();
}
