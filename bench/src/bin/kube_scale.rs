//! `kube-scale` (run by `cargo xtask scale`): the Kubernetes source at cluster
//! scale. The API server double holds N pods on other nodes, M Services and
//! their EndpointSlices (kept up to date as the EndpointSlice controller would);
//! an agent in Kubernetes mode lists and watches them. Reports how much the
//! agent's memory grows per pod, and how long a change to one pod takes to be
//! applied. Nothing here asserts a number; it reports.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use nodemesh_testkit::apiserver::ApiServer;
use nodemesh_testkit::{Agent, Node, Tools, wait_until};
use serde_json::{Value, json};

#[derive(Parser)]
struct Cli {
    /// Pods on other nodes.
    #[arg(long, default_value_t = 10_000)]
    pods: u32,
    /// Services, each selecting pods/services of the pods.
    #[arg(long, default_value_t = 1_000)]
    services: u32,
    /// Single-pod changes to time.
    #[arg(long, default_value_t = 10)]
    changes: u32,
    /// Where the report goes.
    #[arg(long, default_value = "bench/results/kube-scale.md")]
    out: PathBuf,
}

/// A pod of Deployment `app-<service>` on a remote node. Its addresses are only
/// data in the API: no traffic is ever sent to them.
fn pod_ip(i: u32) -> String {
    format!("100.64.{}.{}", i / 250, i % 250 + 1)
}

fn pod(i: u32, service: u32) -> Value {
    let ip = pod_ip(i);
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("app-{service}-5d8f7c9b4-{i:05}"), "namespace": "scale",
            "uid": format!("7a1e0000-0000-4000-8000-{i:012}"),
            "labels": {"app": format!("app-{service}"), "version": "v1", "pod-template-hash": "5d8f7c9b4"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("app-{service}-5d8f7c9b4"),
                                 "uid": "rs", "controller": true}],
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-01-01T00:00:00Z"}},
        "spec": {"nodeName": format!("remote-{}", i % 500), "serviceAccountName": format!("app-{service}"),
                 "containers": [{"name": "app", "image": "registry.example/app:1.2.3",
                                 "ports": [{"containerPort": 8080}],
                                 "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                   "conditions": [{"type": "Ready", "status": "True"}]}})
}

fn service(s: u32) -> Value {
    let vip = format!("100.100.{}.{}", s / 250, s % 250 + 1);
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("app-{s}"), "namespace": "scale"},
        "spec": {"type": "ClusterIP", "clusterIP": vip, "clusterIPs": [vip],
                 "selector": {"app": format!("app-{s}")},
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}})
}

/// The EndpointSlice of Service `s`, listing pods `members` (each slice holds at
/// most 100 endpoints in Kubernetes; a Service here has about 10).
fn slice(s: u32, members: &[u32]) -> Value {
    let endpoints: Vec<Value> = members
        .iter()
        .map(|i| {
            json!({"addresses": [pod_ip(*i)],
                   "conditions": {"ready": true, "serving": true, "terminating": false},
                   "nodeName": format!("remote-{}", i % 500),
                   "targetRef": {"kind": "Pod", "namespace": "scale", "name": format!("app-{s}-5d8f7c9b4-{i:05}")}})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("app-{s}-x7k2p"), "namespace": "scale",
                     "labels": {"kubernetes.io/service-name": format!("app-{s}"),
                                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints})
}

fn applies(agent: &Agent) -> anyhow::Result<f64> {
    agent.metric("nodemesh_config_reloads_total", &[("result", "success")])
}

/// Waits until the agent has applied everything and nothing more arrives.
fn settle(agent: &Agent, pods: u32, expected_pod_events: f64) -> anyhow::Result<()> {
    wait_until("every pod seen", Duration::from_secs(120), || {
        let seen = agent.metric(
            "nodemesh_kube_watch_events_total",
            &[("kind", "Pod"), ("event", "apply")],
        )?;
        Ok(seen >= expected_pod_events)
    })
    .with_context(|| format!("{pods} pods"))?;
    let mut last = applies(agent)?;
    wait_until("applies settle", Duration::from_secs(120), || {
        std::thread::sleep(Duration::from_millis(500));
        let now = applies(agent)?;
        let quiet = now == last;
        last = now;
        Ok(quiet)
    })
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let podtool = std::env::var("NODEMESH_PODTOOL_BIN").context("NODEMESH_PODTOOL_BIN")?;
    let tools = Tools::new(podtool)?;
    let api = ApiServer::start()?;
    api.apply(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "scale", "labels": {"nodemesh.io/mesh": "enabled"}}}))?;
    let node_a = Node::with_index(0)?;
    let node_b = Node::with_index(1)?;

    // Agent A starts on an empty cluster, then sees every object arrive by watch.
    let a = Agent::start_kube(&tools, &node_a, &api, &[])?;
    std::thread::sleep(Duration::from_secs(1));
    let a_empty = a.rss_kib()?;
    let started = Instant::now();
    for s in 0..cli.services {
        api.apply(service(s))?;
    }
    let mut members: Vec<Vec<u32>> = vec![Vec::new(); cli.services as usize];
    for i in 0..cli.pods {
        api.apply(pod(i, i % cli.services))?;
        members[(i % cli.services) as usize].push(i);
    }
    for (s, m) in members.iter().enumerate() {
        api.apply(slice(s as u32, m))?;
    }
    let populate = started.elapsed();
    settle(&a, cli.pods, f64::from(cli.pods))?;
    let a_full = a.rss_kib()?;
    let a_applies = applies(&a)?;

    // Agent B starts on the full cluster: paginated initial lists.
    let started = Instant::now();
    let b = Agent::start_kube(&tools, &node_b, &api, &[])?;
    let b_ready = started.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let b_full = b.rss_kib()?;
    let pod_lists = api.served("pods");

    // One pod changes Service (its labels, then both Services' slices, as the
    // EndpointSlice controller follows): time until the agent has applied it.
    let mut latencies = Vec::new();
    for n in 0..cli.changes {
        let i = n * 7 % cli.pods;
        let target = (i + 1 + n) % cli.services;
        let from = members
            .iter()
            .position(|m| m.contains(&i))
            .expect("every pod is in a slice");
        members[from].retain(|p| *p != i);
        members[target as usize].push(i);
        let before = applies(&a)?;
        let t0 = Instant::now();
        api.apply(pod(i, target))?;
        api.apply(slice(from as u32, &members[from]))?;
        api.apply(slice(target, &members[target as usize]))?;
        wait_until("one pod's change applied", Duration::from_secs(30), || {
            Ok(applies(&a)? > before)
        })?;
        latencies.push(t0.elapsed());
        std::thread::sleep(Duration::from_millis(200));
    }
    // The last change is in the agent's view: the pod is an endpoint of its new Service.
    let last = cli.changes - 1;
    let moved = last * 7 % cli.pods;
    let target = (moved + 1 + last) % cli.services;
    let dump = a.config_dump()?;
    let ip = format!("{}:8080", pod_ip(moved));
    let in_view = dump["endpoints"].as_array().is_some_and(|ports| {
        ports.iter().any(|p| {
            p["service"].as_str() == Some(format!("scale/app-{target}").as_str())
                && p.to_string().contains(&ip)
        })
    });
    if !in_view {
        let path = cli.out.with_extension("dump.json");
        std::fs::write(&path, dump.to_string())?;
        eprintln!(
            "pod {ip} not found behind app-{target}; config dump in {}",
            path.display()
        );
    }
    latencies.sort();
    let median = latencies[latencies.len() / 2];
    let max = *latencies.last().expect("at least one change");

    let per_pod = |full: u64| (full.saturating_sub(a_empty)) as f64 * 1024.0 / f64::from(cli.pods);
    let report = format!(
        "# Kubernetes source at scale\n\n\
         `cargo xtask scale` ({pods} pods on 500 other nodes, {services} Services with one \
         EndpointSlice each, one namespace; \
         API server double on loopback; {rev}).\n\n\
         | measure | value |\n| --- | ---: |\n\
         | agent RSS, empty cluster | {a_empty} KiB |\n\
         | agent RSS after watching every object arrive | {a_full} KiB |\n\
         | agent RSS after starting on the full cluster (paginated lists) | {b_full} KiB |\n\
         | RSS growth per pod, watched / listed | {wa:.0} B / {wb:.0} B |\n\
         | objects created through the API in | {populate:.1?} |\n\
         | applies while they arrived (debounced) | {a_applies} |\n\
         | ready after start on the full cluster | {b_ready:.1?} |\n\
         | pod list requests (pages of 500, both agents) | {lists} |\n\
         | one pod changed -> applied, median / max of {changes} | {median:.1?} / {max:.1?} |\n\
         | the last change is in the agent's endpoint view | {in_view} |\n",
        pods = cli.pods,
        services = cli.services,
        rev = git_rev(),
        wa = per_pod(a_full),
        wb = per_pod(b_full),
        lists = pod_lists.lists,
        changes = cli.changes,
    );
    print!("{report}");
    std::fs::write(&cli.out, &report).with_context(|| format!("writing {}", cli.out.display()))?;
    println!("\nwritten to {}", cli.out.display());
    Ok(())
}

fn git_rev() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}
