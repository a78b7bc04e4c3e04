//! `cargo xtask demo`: builds a small local mesh of namespaced pods, sends traffic
//! through the agent, prints the debug views and metrics, and cleans up.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use nodemesh_testkit::{Agent, Node, Process, Tools, run, run_json, yaml_docs};

fn section(title: &str) {
    println!("\n=== {title} ===");
}

fn main() -> anyhow::Result<()> {
    let podtool = std::env::var_os("NODEMESH_PODTOOL_BIN")
        .map(PathBuf::from)
        .context("NODEMESH_PODTOOL_BIN is not set: run the demo with `cargo xtask demo`")?;
    let tools = Tools::new(podtool)?;

    section("building a node with two pods (network namespaces + cgroups)");
    let mut node = Node::new()?;
    let frontend = node.add_pod("frontend", "shop")?;
    let backend = node.add_pod("backend", "shop")?;
    println!(
        "node netns {}, cgroup {}",
        node.netns.name,
        node.cgroup.path.display()
    );
    println!(
        "pod shop/frontend {} (netns {})",
        frontend.ip, frontend.netns.name
    );
    println!(
        "pod shop/backend  {} (netns {})",
        backend.ip, backend.netns.name
    );
    let _http = backend.serve(
        &tools,
        &["http", "--listen", &backend.addr(8080).to_string()],
    )?;
    let _echo = backend.serve(
        &tools,
        &["echo", "--listen", &backend.addr(9000).to_string()],
    )?;

    section("starting mesh-agent with both pods enrolled");
    let agent = Agent::start(
        &tools,
        &node,
        &yaml_docs(&[frontend.workload_yaml(), backend.workload_yaml()]),
    )?;
    println!("agent ready, admin endpoint http://{}", agent.admin);

    section("frontend -> backend over HTTP, captured by the kernel and carried by the agent");
    for path in ["/", "/whoami"] {
        let mut curl = frontend.command(std::path::Path::new("/usr/bin/curl"))?;
        curl.args(["-sS", "--max-time", "5"])
            .arg(format!("http://{}{path}", backend.addr(8080)));
        println!("GET {path} -> {}", run(&mut curl)?.trim_end());
    }
    let mut stream = frontend.command(&tools.podtool)?;
    stream.args([
        "stream",
        "--to",
        &backend.addr(9000).to_string(),
        "--bytes",
        "16777216",
    ]);
    println!(
        "16 MiB each way through the agent: {}",
        run_json(&mut stream, Duration::from_secs(60))?
    );

    section("a process outside the mesh reaches the backend directly");
    let mut direct = node.command(&tools.podtool)?;
    direct.args(["connect", "--to", &backend.addr(9000).to_string()]);
    println!("{}", run_json(&mut direct, Duration::from_secs(10))?);

    let mut hold = frontend.command(&tools.podtool)?;
    hold.args([
        "hold",
        "--to",
        &backend.addr(9000).to_string(),
        "--seconds",
        "2",
    ]);
    let mut hold = Process::spawn(&mut hold, "hold")?;
    hold.wait_line(Duration::from_secs(5))?;
    for view in ["workloads", "listeners", "programs", "maps", "connections"] {
        section(&format!("mesh-agent debug {view}"));
        let out = Command::new(&tools.agent)
            .args(["debug", view, "--admin-addr", &agent.admin.to_string()])
            .output()?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    hold.wait(Duration::from_secs(10))?;

    section("metrics (Istio names)");
    for line in agent.metrics()?.lines() {
        if line.starts_with("istio_tcp")
            || line.starts_with("nodemesh_capture")
            || line.starts_with("nodemesh_bpf_map_entries")
        {
            println!("{line}");
        }
    }

    section("cleaning up");
    drop(agent);
    drop(frontend);
    drop(backend);
    drop(node);
    println!("namespaces, cgroups and processes removed");
    Ok(())
}
