//! Pods networked as a container runtime does it: Debian's CNI `bridge` plugin
//! with `host-local` IPAM on the node's bridge, then `nodemesh-cni`, run per the
//! CNI spec (`CNI_*` environment, the network config on stdin, the previous
//! plugin's result passed on as `prevResult`, DEL in reverse order).

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::{CgroupDir, KubeletLayout, Netns, Node, Pod, unique_name};

/// Where Debian's `containernetworking-plugins` puts the plugins.
pub const PLUGIN_DIR: &str = "/usr/lib/cni";

/// The pod network of one node: the CNI chain and its IPAM state.
pub struct CniNetwork {
    node_netns: String,
    node_index: u8,
    node_name: String,
    node_cgroup: PathBuf,
    nodemesh_cni: PathBuf,
    /// The agent's socket, in `nodemesh-cni`'s config.
    pub agent_socket: PathBuf,
    /// How long `nodemesh-cni` waits for the agent.
    pub timeout_seconds: u64,
    dir: tempfile::TempDir,
}

/// What running the chain for one command printed.
#[derive(Debug)]
pub struct ChainRun {
    /// Whether every plugin succeeded.
    pub ok: bool,
    /// The last plugin's stdout: the result, or the failing plugin's error JSON.
    pub stdout: String,
    /// Every plugin's stderr.
    pub stderr: String,
    /// How long the chain took.
    pub took: Duration,
    /// `nodemesh-cni`'s exit code (None if it did not run).
    pub nodemesh_exit: Option<i32>,
}

impl ChainRun {
    /// The result or error, parsed.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or(Value::Null)
    }
}

/// A pod's identity as the runtime passes it in `CNI_ARGS`.
pub struct PodArgs<'a> {
    /// Namespace.
    pub namespace: &'a str,
    /// Name.
    pub name: &'a str,
    /// UID.
    pub uid: &'a str,
}

impl CniNetwork {
    /// The chain for `node`, with `nodemesh-cni` at `nodemesh_cni` talking to the
    /// agent on `agent_socket`. Pods get 198.18.i.100-199 and fd00:198:18:i::100-1ff.
    pub fn new(node: &Node, nodemesh_cni: &Path, agent_socket: &Path) -> anyhow::Result<Self> {
        anyhow::ensure!(
            Path::new(PLUGIN_DIR).join("bridge").exists(),
            "{PLUGIN_DIR}/bridge is missing: `cargo xtask setup` installs containernetworking-plugins"
        );
        Ok(CniNetwork {
            node_netns: node.netns.name.clone(),
            node_index: node.index,
            node_name: node.name(),
            node_cgroup: node.cgroup.path.clone(),
            nodemesh_cni: nodemesh_cni.to_owned(),
            agent_socket: agent_socket.to_owned(),
            timeout_seconds: 20,
            dir: tempfile::tempdir()?,
        })
    }

    fn bridge_conf(&self) -> Value {
        let i = self.node_index;
        json!({
            "cniVersion": "1.0.0", "name": "podnet", "type": "bridge",
            "bridge": "br0", "isGateway": true, "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "dataDir": self.dir.path().join("ipam"),
                "ranges": [
                    [{"subnet": format!("198.18.{i}.0/24"), "rangeStart": format!("198.18.{i}.100"),
                      "rangeEnd": format!("198.18.{i}.199"), "gateway": format!("198.18.{i}.1")}],
                    [{"subnet": format!("fd00:198:18:{i}::/64"), "rangeStart": format!("fd00:198:18:{i}::100"),
                      "rangeEnd": format!("fd00:198:18:{i}::1ff"), "gateway": format!("fd00:198:18:{i}::1")}]
                ],
                "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]
            }
        })
    }

    fn nodemesh_conf(&self, prev: Option<&Value>) -> Value {
        let mut conf = json!({
            "cniVersion": "1.0.0", "name": "podnet", "type": "nodemesh-cni",
            "agentSocket": self.agent_socket, "timeoutSeconds": self.timeout_seconds,
        });
        if let Some(prev) = prev {
            conf["prevResult"] = prev.clone();
        }
        conf
    }

    /// Runs one plugin in the node's namespace, as the runtime would.
    fn plugin(
        &self,
        program: &Path,
        command: &str,
        netns: &Netns,
        container_id: &str,
        pod: &PodArgs<'_>,
        conf: &Value,
    ) -> anyhow::Result<(i32, String, String)> {
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID={}",
            pod.namespace, pod.name, pod.uid
        );
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.node_netns])
            .arg(program)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_NETNS", netns.path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", PLUGIN_DIR)
            .env("CNI_ARGS", args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", program.display()))?;
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(conf.to_string().as_bytes())?;
        let out = child.wait_with_output()?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// ADD: `bridge`, then `nodemesh-cni` with its result as `prevResult`.
    pub fn add(
        &self,
        netns: &Netns,
        container_id: &str,
        pod: &PodArgs<'_>,
    ) -> anyhow::Result<ChainRun> {
        let started = Instant::now();
        let bridge = Path::new(PLUGIN_DIR).join("bridge");
        let (code, stdout, stderr) = self.plugin(
            &bridge,
            "ADD",
            netns,
            container_id,
            pod,
            &self.bridge_conf(),
        )?;
        if code != 0 {
            bail!("bridge ADD failed ({code}): {stdout} {stderr}");
        }
        let prev: Value = serde_json::from_str(&stdout).context("bridge result")?;
        let (code, stdout, more) = self.plugin(
            &self.nodemesh_cni,
            "ADD",
            netns,
            container_id,
            pod,
            &self.nodemesh_conf(Some(&prev)),
        )?;
        Ok(ChainRun {
            ok: code == 0,
            stdout,
            stderr: stderr + &more,
            took: started.elapsed(),
            nodemesh_exit: Some(code),
        })
    }

    /// DEL: `nodemesh-cni`, then `bridge` (reverse order).
    pub fn del(
        &self,
        netns: &Netns,
        container_id: &str,
        pod: &PodArgs<'_>,
    ) -> anyhow::Result<ChainRun> {
        let started = Instant::now();
        let (code, stdout, stderr) = self.plugin(
            &self.nodemesh_cni,
            "DEL",
            netns,
            container_id,
            pod,
            &self.nodemesh_conf(None),
        )?;
        let bridge = Path::new(PLUGIN_DIR).join("bridge");
        let (bridge_code, bridge_out, more) = self.plugin(
            &bridge,
            "DEL",
            netns,
            container_id,
            pod,
            &self.bridge_conf(),
        )?;
        Ok(ChainRun {
            ok: code == 0 && bridge_code == 0,
            stdout: if code != 0 { stdout } else { bridge_out },
            stderr: stderr + &more,
            took: started.elapsed(),
            nodemesh_exit: Some(code),
        })
    }

    /// Creates a pod as kubelet and the runtime do: its cgroup where `layout`
    /// puts pod `uid`, a network namespace, then ADD through the chain. Returns
    /// the pod (addressed as the chain's result says, when it succeeded) and the run.
    pub fn add_pod(
        &self,
        name: &str,
        namespace: &str,
        uid: &str,
        layout: KubeletLayout,
    ) -> anyhow::Result<(Pod, ChainRun)> {
        let netns = Netns::create(name)?;
        let cgroup =
            CgroupDir::create(&self.node_cgroup, &layout.pod_cgroup(uid).to_string_lossy())?;
        let container_id = unique_name("sandbox");
        let run = self.add(
            &netns,
            &container_id,
            &PodArgs {
                namespace,
                name,
                uid,
            },
        )?;
        let (mut ip, mut ip6) = (Ipv4Addr::UNSPECIFIED, Ipv6Addr::UNSPECIFIED);
        if run.ok {
            set_addresses(&run.json(), &mut ip, &mut ip6);
        }
        Ok((
            Pod {
                name: name.to_owned(),
                namespace: namespace.to_owned(),
                node_name: self.node_name.clone(),
                uid: uid.to_owned(),
                sandbox: None,
                netns,
                cgroup,
                ip,
                ip6,
                sandbox_id: Some(container_id),
            },
            run,
        ))
    }

    /// DEL for `pod` through the chain.
    pub fn del_pod(&self, pod: &Pod) -> anyhow::Result<ChainRun> {
        self.del(
            &pod.netns,
            pod.sandbox_id.as_deref().unwrap_or("none"),
            &PodArgs {
                namespace: &pod.namespace,
                name: &pod.name,
                uid: &pod.uid,
            },
        )
    }

    /// ADD again for `pod`, as kubelet retries a sandbox.
    pub fn retry_add(&self, pod: &mut Pod) -> anyhow::Result<ChainRun> {
        let container_id = unique_name("sandbox");
        let run = self.add(
            &pod.netns,
            &container_id,
            &PodArgs {
                namespace: &pod.namespace,
                name: &pod.name,
                uid: &pod.uid,
            },
        )?;
        pod.sandbox_id = Some(container_id);
        set_addresses(&run.json(), &mut pod.ip, &mut pod.ip6);
        Ok(run)
    }
}

/// Takes a pod's addresses from a CNI result (`ips[].address`, in CIDR notation).
fn set_addresses(result: &Value, ip: &mut Ipv4Addr, ip6: &mut Ipv6Addr) {
    for entry in result["ips"].as_array().into_iter().flatten() {
        let cidr = entry["address"].as_str().unwrap_or_default();
        match cidr.split('/').next().unwrap_or_default().parse::<IpAddr>() {
            Ok(IpAddr::V4(v4)) => *ip = v4,
            Ok(IpAddr::V6(v6)) => *ip6 = v6,
            Err(_) => {}
        }
    }
}
