//! `cargo xtask demo`: nodemesh as a Kubernetes user gets it, on one machine.
//! An agent runs in Kubernetes mode against the API server double; pods are
//! created the way kubelet and a container runtime make them (a kubelet-shaped
//! cgroup, then the CNI chain: `bridge` + `host-local`, then `nodemesh-cni`);
//! mTLS is on. It shows an HTTPRoute splitting a Service, an AuthorizationPolicy
//! denying a connection, the debug tables and the metrics, and cleans up.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, ensure};
use nodemesh_testkit::apiserver::ApiServer;
use nodemesh_testkit::cni::CniNetwork;
use nodemesh_testkit::{
    Agent, KubeletLayout, MeshCa, Node, Pod, Process, Tools, run, run_json, wait_until,
};
use serde_json::{Value, json};

fn section(title: &str) {
    println!("\n=== {title} ===");
}

fn pod_object(name: &str, node: &Node, uid: &str, labels: &Value, ips: Option<&Pod>) -> Value {
    let status = match ips {
        None => json!({"phase": "Pending"}),
        Some(p) => json!({"phase": "Running", "podIP": p.ip.to_string(),
                          "podIPs": [{"ip": p.ip.to_string()}, {"ip": p.ip6.to_string()}]}),
    };
    // A Deployment's pod: its ReplicaSet owns it and its labels carry the hash,
    // from which Istio's rules name the workload after the Deployment.
    let mut labels = labels.clone();
    labels["pod-template-hash"] = "6b7f9c8d5".into();
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "uid": uid, "labels": labels,
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                         "name": format!("{}-6b7f9c8d5", labels["app"].as_str().unwrap_or(name)),
                         "uid": "rs", "controller": true}]},
        "spec": {"nodeName": node.name(), "serviceAccountName": labels["app"],
                 "containers": [{"name": "app", "image": "registry.example/app:1"}]},
        "status": status})
}

fn main() -> anyhow::Result<()> {
    let podtool = std::env::var_os("NODEMESH_PODTOOL_BIN")
        .map(PathBuf::from)
        .context("NODEMESH_PODTOOL_BIN is not set: run the demo with `cargo xtask demo`")?;
    let tools = Tools::new(podtool)?;

    section("a cluster: the API server double, a node, a mesh CA");
    let api = ApiServer::start()?;
    let ca = MeshCa::init(&tools)?;
    let node = Node::new()?;
    api.apply(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "shop", "labels": {"nodemesh.io/mesh": "enabled"}}}))?;
    println!("namespace shop labelled nodemesh.io/mesh=enabled");
    println!(
        "node {} (netns {}, cgroup {})",
        node.name(),
        node.netns.name,
        node.cgroup.path.display()
    );

    section("mesh-agent run --kubernetes (no config file), answering the CNI plugin");
    let sockets = tempfile::tempdir()?;
    let socket = sockets.path().join("cni.sock");
    let mut args = ca.args().to_vec();
    args.extend(["--cni-socket", socket.to_str().context("utf-8 path")?]);
    let agent = Agent::start_kube(&tools, &node, &api, &args)?;
    wait_until("agent ready", Duration::from_secs(20), || {
        Ok(agent.get("/healthz/ready").is_ok())
    })?;
    println!("agent ready, admin endpoint http://{}", agent.admin);

    section(
        "pods created as kubelet does: cgroup, then CNI ADD (bridge, host-local, nodemesh-cni)",
    );
    let cni = CniNetwork::new(&node, &tools.cni_plugin, &socket)?;
    let mut pods: BTreeMap<&str, Pod> = BTreeMap::new();
    let mut servers: Vec<Process> = Vec::new();
    for (name, labels, layout) in [
        (
            "frontend-0",
            json!({"app": "frontend"}),
            KubeletLayout::SystemdBurstable,
        ),
        (
            "web-v1-0",
            json!({"app": "web", "version": "v1"}),
            KubeletLayout::CgroupfsBestEffort,
        ),
        (
            "web-v2-0",
            json!({"app": "web", "version": "v2"}),
            KubeletLayout::SystemdGuaranteed,
        ),
    ] {
        let uid = format!("0d3f5a7c-1e2b-4c6d-9f80-{:012}", pods.len() + 1);
        api.apply(pod_object(name, &node, &uid, &labels, None))?;
        let (pod, run) = cni.add_pod(name, "shop", &uid, layout)?;
        ensure!(run.ok, "CNI ADD of {name} failed: {}", run.stdout);
        println!(
            "{name:<11} {:<15} ADD returned in {:>5.1?}, enrolled before its first instruction",
            pod.ip.to_string(),
            run.took
        );
        if name.starts_with("web") {
            let version = labels["version"].as_str().unwrap_or_default();
            servers.push(pod.serve(
                &tools,
                &[
                    "web",
                    "--name",
                    &format!("web-{version}"),
                    "--listen",
                    &pod.addr(8080).to_string(),
                ],
            )?);
            servers.push(pod.serve(&tools, &["echo", "--listen", &pod.addr(9000).to_string()])?);
        }
        api.apply(pod_object(name, &node, &uid, &labels, Some(&pod)))?;
        pods.insert(name, pod);
    }
    let frontend = &pods["frontend-0"];
    let web_v1 = &pods["web-v1-0"];

    section("a Service and an HTTPRoute sending 80 % to v1 and 20 % to v2");
    let service = |name: &str, vip: &str, selector: Value| {
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"clusterIP": vip, "selector": selector,
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080, "appProtocol": "http"}]}})
    };
    api.apply(service("web", "10.96.0.10", json!({"app": "web"})))?;
    api.apply(service(
        "web-v1",
        "10.96.0.11",
        json!({"app": "web", "version": "v1"}),
    ))?;
    api.apply(service(
        "web-v2",
        "10.96.0.12",
        json!({"app": "web", "version": "v2"}),
    ))?;
    api.apply(
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "web-split", "namespace": "shop"},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
                 "rules": [{"backendRefs": [{"name": "web-v1", "port": 80, "weight": 80},
                                            {"name": "web-v2", "port": 80, "weight": 20}]}]}}),
    )?;
    let curl_many = |n: usize| -> anyhow::Result<BTreeMap<String, usize>> {
        let mut sh = frontend.command(Path::new("/bin/sh"))?;
        sh.args([
            "-c",
            &format!("for i in $(seq {n}); do curl -s --max-time 5 http://10.96.0.10/; done"),
        ]);
        let mut seen = BTreeMap::new();
        for line in run(&mut sh)?.lines() {
            *seen.entry(line.trim().to_owned()).or_insert(0) += 1;
        }
        Ok(seen)
    };
    wait_until("the route is in force", Duration::from_secs(10), || {
        Ok(curl_many(1)?.keys().all(|k| k.starts_with("web-v")))
    })?;
    println!(
        "100 × curl http://10.96.0.10/ from frontend-0: {:?}",
        curl_many(100)?
    );

    section("an AuthorizationPolicy denying frontend the echo port of the web pods");
    let echo = web_v1.addr(9000).to_string();
    let probe = |to: &str| -> anyhow::Result<String> {
        let mut cmd = frontend.command(&tools.podtool)?;
        cmd.args(["probe", "--to", to, "--timeout-ms", "3000"]);
        Ok(run_json(&mut cmd, Duration::from_secs(10))?["outcome"]
            .as_str()
            .unwrap_or("")
            .to_owned())
    };
    println!("before: frontend-0 -> {echo}: {}", probe(&echo)?);
    api.apply(json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "no-echo-for-frontend", "namespace": "shop"},
        "spec": {"selector": {"matchLabels": {"app": "web"}}, "action": "DENY",
                 "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/frontend"]}}],
                            "to": [{"operation": {"ports": ["9000"]}}]}]}}))?;
    wait_until("the policy is in force", Duration::from_secs(10), || {
        Ok(probe(&echo)? != "data")
    })?;
    println!("after:  frontend-0 -> {echo}: {} (denied)", probe(&echo)?);
    println!(
        "HTTP to the same pod still works: {}",
        curl_many(1)?.keys().cloned().collect::<Vec<_>>().join(",")
    );

    let mut hold = frontend.command(&tools.podtool)?;
    hold.args([
        "hold",
        "--to",
        &web_v1.addr(8080).to_string(),
        "--seconds",
        "2",
    ]);
    let mut hold = Process::spawn(&mut hold, "hold")?;
    hold.wait_line(Duration::from_secs(5))?;
    for view in [
        "workloads",
        "certificates",
        "routes",
        "endpoints",
        "connections",
    ] {
        section(&format!("mesh-agent debug {view}"));
        let out = Command::new(&tools.agent)
            .args(["debug", view, "--admin-addr", &agent.admin.to_string()])
            .output()?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    hold.wait(Duration::from_secs(10))?;

    section("metrics (Istio names): mutual_tls between the pods; the denial is a tunnel refusal");
    for line in agent.metrics()?.lines() {
        let wanted = line.starts_with("istio_requests_total")
            && line.contains("reporter=\"source\"")
            || line.starts_with("istio_tcp_connections_opened_total")
                && line.contains("reporter=\"destination\"")
            || line.starts_with("nodemesh_tunnel_refusals")
            || line.starts_with("nodemesh_cni_requests_total");
        if wanted {
            println!("{line}");
        }
    }

    section("cleaning up");
    for pod in pods.values() {
        let run = cni.del_pod(pod)?;
        ensure!(run.ok, "CNI DEL of {} failed: {}", pod.name, run.stdout);
    }
    println!("CNI DEL for each pod: unenrolled");
    drop(servers);
    drop(agent);
    drop(pods);
    drop(node);
    println!("namespaces, cgroups and processes removed");
    Ok(())
}
