//! Test harness: nodes and pods built from real network namespaces, veth pairs,
//! a bridge and cgroup v2 directories, with real processes inside them.
//!
//! Every resource has a unique name and is removed on drop, so a failed
//! assertion never leaves namespaces, links, cgroups or processes behind.
//! Pod addresses come from 198.18.0.0/15 (reserved for benchmarking) and live
//! only inside namespaces the harness created.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use mesh_agent::connections::ConnectionView;
use mesh_agent::node::cgroup::Cgroup2;

pub mod apiserver;
pub mod ca;
pub mod cni;
pub mod otlp;
pub mod prometheus;
pub mod soak;

/// Deterministic bytes by absolute stream position, so any chunking of a
/// stream can be checked against `pattern(total, 0)`.
pub fn pattern(len: usize, offset: u64) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let p = offset + i;
            (p.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8 ^ (p as u8)
        })
        .collect()
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call, short enough for any kernel object.
pub fn unique_name(role: &str) -> String {
    format!(
        "nm{}-{}-{role}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command to completion, failing with its stderr if it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `check` until it returns true, at most for `timeout`.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    while Instant::now() < deadline {
        match check() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_error = Some(e),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(anyhow!(
        "timed out after {timeout:?} waiting for {what} (last error: {last_error:?})"
    ))
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    /// Name under /var/run/netns.
    pub name: String,
}

impl Netns {
    /// Creates a namespace with loopback up.
    pub fn create(role: &str) -> anyhow::Result<Self> {
        let name = unique_name(role);
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The bind-mounted namespace file.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// Runs `ip -n <ns> ARGS`.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// A cgroup v2 directory; on drop every process in it is killed and it is removed.
pub struct CgroupDir {
    /// Absolute path.
    pub path: PathBuf,
}

impl CgroupDir {
    /// Creates `parent/name` (and missing parents).
    pub fn create(parent: &Path, name: &str) -> anyhow::Result<Self> {
        let path = parent.join(name);
        std::fs::create_dir_all(&path)
            .with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(CgroupDir { path })
    }

    /// PIDs in this cgroup (not descendants).
    pub fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    fn kill_tree(path: &Path) {
        if std::fs::write(path.join("cgroup.kill"), "1").is_err() {
            // Kernels before 5.14: kill what is listed.
            if let Ok(procs) = std::fs::read_to_string(path.join("cgroup.procs")) {
                for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }

    fn remove_tree(path: &Path) {
        if let Ok(entries) = std::fs::read_dir(path) {
            for e in entries.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    Self::remove_tree(&e.path());
                }
            }
        }
        // Killed processes leave the cgroup asynchronously.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(path).is_err() && Instant::now() < deadline && path.exists() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for CgroupDir {
    fn drop(&mut self) {
        Self::kill_tree(&self.path);
        Self::remove_tree(&self.path);
    }
}

/// A child process, killed on drop. Its stdout is read on a thread as it is
/// written, so the child never blocks on (or dies of) a full or closed pipe.
pub struct Process {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    /// What it is, for error messages.
    pub name: String,
}

/// How a [`Process`] ended.
#[derive(Debug)]
pub struct Finished {
    /// Exit status.
    pub status: std::process::ExitStatus,
    /// Everything it printed on stdout that was not consumed by `wait_line`.
    pub stdout: String,
}

impl Finished {
    /// The last stdout line parsed as JSON (podtool's report).
    pub fn report(&self) -> anyhow::Result<serde_json::Value> {
        let last = self.stdout.lines().last().unwrap_or("");
        serde_json::from_str(last)
            .with_context(|| format!("exit {} printing {:?}", self.status, self.stdout))
    }
}

impl Process {
    /// Spawns `cmd` with stdout captured line by line.
    pub fn spawn(cmd: &mut Command, name: &str) -> anyhow::Result<Self> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {name}: {cmd:?}"))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Process {
            child,
            lines,
            name: name.to_owned(),
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, if it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for exit, at most `timeout` (then kills it and fails).
    pub fn wait(mut self, timeout: Duration) -> anyhow::Result<Finished> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("{} did not finish within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stdout = String::new();
        // The reader thread ends at EOF, which follows exit promptly.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            stdout.push_str(&line);
            stdout.push('\n');
        }
        Ok(Finished { status, stdout })
    }

    /// The stdout lines printed since the last call, without waiting.
    pub fn new_lines(&self) -> Vec<String> {
        self.lines.try_iter().collect()
    }

    /// Waits for the next stdout line (e.g. "listening …"), at most `timeout`.
    pub fn wait_line(&mut self, timeout: Duration) -> anyhow::Result<String> {
        self.lines
            .recv_timeout(timeout)
            .map_err(|_| anyhow!("{} printed nothing within {timeout:?}", self.name))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a command to completion within `timeout` and parses its last stdout line as JSON.
pub fn run_json(cmd: &mut Command, timeout: Duration) -> anyhow::Result<serde_json::Value> {
    let name = format!("{:?}", cmd.get_program());
    Process::spawn(cmd, &name)?.wait(timeout)?.report()
}

/// Builds a command that runs inside a pod: in its cgroup first (so its sockets
/// belong to the pod, as a socket keeps the cgroup it was created in), then in
/// its network namespace.
fn command_in(program: &Path, netns: &Path, cgroup: Option<&Path>) -> anyhow::Result<Command> {
    let ns = File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    let procs = match cgroup {
        Some(cg) => Some(
            OpenOptions::new()
                .write(true)
                .open(cg.join("cgroup.procs"))
                .with_context(|| format!("opening {}/cgroup.procs", cg.display()))?,
        ),
        None => None,
    };
    let mut cmd = Command::new(program);
    // SAFETY: only async-signal-safe syscalls (write, setns) on fds opened above.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(procs) = &procs {
                // "0" moves the writing process itself.
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// The binaries the harness runs.
#[derive(Debug, Clone)]
pub struct Tools {
    /// `mesh-agent`.
    pub agent: PathBuf,
    /// `podtool`.
    pub podtool: PathBuf,
    /// `nodemesh-cni`, built beside the agent.
    pub cni_plugin: PathBuf,
}

/// A mesh CA made by `mesh-agent ca init` in a temporary directory, removed on drop.
pub struct MeshCa {
    /// The directory to pass as `--ca-dir`.
    pub dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl MeshCa {
    /// Runs `mesh-agent ca init`.
    pub fn init(tools: &Tools) -> anyhow::Result<Self> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().join("cacerts");
        run(Command::new(&tools.agent)
            .args(["ca", "init", "--dir"])
            .arg(&dir))?;
        Ok(MeshCa { dir, _tmp: tmp })
    }

    /// `--ca-dir <dir>` for [`Agent::start_with`].
    pub fn args(&self) -> [&str; 2] {
        ["--ca-dir", self.dir.to_str().expect("utf-8 temp path")]
    }
}

impl Tools {
    /// The agent from `NODEMESH_AGENT_BIN` (set by `cargo xtask test`) or the workspace's
    /// release build, and the given podtool.
    pub fn new(podtool: impl Into<PathBuf>) -> anyhow::Result<Self> {
        let agent = match std::env::var_os("NODEMESH_AGENT_BIN") {
            Some(p) => PathBuf::from(p),
            None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/mesh-agent"),
        };
        ensure!(
            agent.exists(),
            "{} not found: run the suite with `cargo xtask test`, which builds the agent",
            agent.display()
        );
        Ok(Tools {
            cni_plugin: agent.with_file_name("nodemesh-cni"),
            agent,
            podtool: podtool.into(),
        })
    }
}

/// A node: a network namespace with a bridge joining its pods, and a cgroup
/// under which its pods' cgroups live (the agent attaches its programs there).
/// Node `i` owns 198.18.i.0/24 and fd00:198:18:i::/64.
pub struct Node {
    /// The node's namespace; holds the bridge at 198.18.i.1/24.
    pub netns: Netns,
    /// Parent cgroup of this node's pods.
    pub cgroup: CgroupDir,
    /// The bridge address, reachable from every pod.
    pub bridge_ip: Ipv4Addr,
    /// Where cgroup2 is mounted on this host.
    pub cgroup2: Cgroup2,
    /// Which 198.18.i.0/24 this node owns.
    pub index: u8,
    /// Where this node's agents pin their kernel state (a bpffs directory of its
    /// own, removed with the node).
    pub bpf_dir: PathBuf,
    /// Where this node's agents meet to hand over listeners on an upgrade.
    pub handoff_socket: PathBuf,
    next_host: u8,
}

impl Drop for Node {
    fn drop(&mut self) {
        // Pins first: links pinned on the node's cgroup would keep it alive.
        let _ = std::fs::remove_dir_all(&self.bpf_dir);
        let _ = std::fs::remove_file(&self.handoff_socket);
    }
}

impl Node {
    /// Creates an empty node 0.
    pub fn new() -> anyhow::Result<Self> {
        Self::with_index(0)
    }

    /// Creates an empty node owning 198.18.`index`.0/24.
    pub fn with_index(index: u8) -> anyhow::Result<Self> {
        let cgroup2 = Cgroup2::detect()?;
        let netns = Netns::create("node")?;
        let cgroup = CgroupDir::create(&cgroup2.mount.join("nodemesh-tests"), &netns.name)?;
        let bridge_ip = Ipv4Addr::new(198, 18, index, 1);
        // A bridge without an address of its own takes the lowest of its ports'
        // MACs, so enrolling a pod could change the pods' gateway MAC and black-hole
        // their traffic until their neighbour entries expire (seconds).
        let bridge_mac = format!("02:00:c6:12:{index:02x}:01");
        netns.ip(&[
            "link",
            "add",
            "br0",
            "address",
            &bridge_mac,
            "type",
            "bridge",
        ])?;
        netns.ip(&["addr", "add", &format!("{bridge_ip}/24"), "dev", "br0"])?;
        netns.ip(&["link", "set", "br0", "up"])?;
        let gateway6 = node_gateway6(index);
        netns.ip(&[
            "addr",
            "add",
            &format!("{gateway6}/64"),
            "dev",
            "br0",
            "nodad",
        ])?;
        let bpf_dir = PathBuf::from("/sys/fs/bpf/nodemesh-tests").join(&netns.name);
        let handoff_socket =
            std::env::temp_dir().join(format!("nodemesh-handoff-{}.sock", netns.name));
        Ok(Node {
            netns,
            cgroup,
            bridge_ip,
            cgroup2,
            index,
            bpf_dir,
            handoff_socket,
            next_host: 2,
        })
    }

    /// Joins two nodes with a point-to-point link and routes each one's pod subnet
    /// through it, as two hosts on one network would be.
    pub fn link(&self, other: &Node) -> anyhow::Result<()> {
        let (here, there) = (format!("to{}", other.index), format!("to{}", self.index));
        self.netns.ip(&[
            "link",
            "add",
            &here,
            "type",
            "veth",
            "peer",
            "name",
            &there,
            "netns",
            &other.netns.name,
        ])?;
        for (node, dev, peer) in [(self, &here, other), (other, &there, self)] {
            let addr = format!("198.19.0.{}/24", node.index + 1);
            node.netns.ip(&["addr", "add", &addr, "dev", dev])?;
            node.netns.ip(&["link", "set", dev, "up"])?;
            let via = format!("198.19.0.{}", peer.index + 1);
            node.netns.ip(&[
                "route",
                "add",
                &format!("198.18.{}.0/24", peer.index),
                "via",
                &via,
            ])?;
            let via6 = format!("fd00:198:19::{}", peer.index + 1);
            node.netns.ip(&[
                "addr",
                "add",
                &format!("fd00:198:19::{}/64", node.index + 1),
                "dev",
                dev,
                "nodad",
            ])?;
            node.netns.ip(&[
                "route",
                "add",
                &format!("fd00:198:18:{}::/64", peer.index),
                "via",
                &via6,
            ])?;
            let mut forward = node.command(Path::new("/bin/sh"))?;
            forward.args([
                "-c",
                "echo 1 > /proc/sys/net/ipv4/ip_forward && echo 1 > /proc/sys/net/ipv6/conf/all/forwarding",
            ]);
            run(&mut forward)?;
        }
        Ok(())
    }

    /// The bridge's IPv6 address, the pods' IPv6 default gateway.
    pub fn gateway6(&self) -> Ipv6Addr {
        node_gateway6(self.index)
    }

    /// Adds a pod on the bridge with the next free address.
    pub fn add_pod(&mut self, name: &str, namespace: &str) -> anyhow::Result<Pod> {
        self.add_pod_at(name, namespace, Path::new(name))
    }

    /// Adds a pod as kubelet would make it: its cgroup where `layout` puts pod
    /// `uid`, and a sandbox process (`sleep`) in a container cgroup below it that
    /// holds the pod's network namespace.
    pub fn add_kube_pod(
        &mut self,
        name: &str,
        namespace: &str,
        uid: &str,
        layout: KubeletLayout,
    ) -> anyhow::Result<Pod> {
        let mut pod = self.add_pod_at(name, namespace, &layout.pod_cgroup(uid))?;
        pod.uid = uid.to_owned();
        pod.start_sandbox()?;
        Ok(pod)
    }

    /// Adds a pod whose cgroup is `cgroup` below the node's.
    pub fn add_pod_at(
        &mut self,
        name: &str,
        namespace: &str,
        cgroup: &Path,
    ) -> anyhow::Result<Pod> {
        let host = self.next_host;
        self.next_host += 1;
        let ip = Ipv4Addr::new(198, 18, self.index, host);
        let ip6 = Ipv6Addr::new(
            0xfd00,
            0x198,
            0x18,
            self.index.into(),
            0,
            0,
            0,
            u16::from(host),
        );
        let netns = Netns::create(name)?;
        let cgroup = CgroupDir::create(&self.cgroup.path, &cgroup.to_string_lossy())?;
        let veth = format!("veth{host}");
        self.netns.ip(&[
            "link",
            "add",
            &veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &netns.name,
        ])?;
        self.netns
            .ip(&["link", "set", &veth, "master", "br0", "up"])?;
        netns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        // nodad: usable at once instead of after duplicate address detection.
        netns.ip(&["addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        netns.ip(&[
            "route",
            "add",
            "default",
            "via",
            &self.bridge_ip.to_string(),
        ])?;
        netns.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &self.gateway6().to_string(),
        ])?;
        Ok(Pod {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            node_name: self.name(),
            uid: format!("uid-{}", unique_name(name)),
            sandbox: None,
            sandbox_id: None,
            netns,
            cgroup,
            ip,
            ip6,
        })
    }

    /// The node's name, as its agent's `--node-name` and its pods' `spec.nodeName`.
    pub fn name(&self) -> String {
        format!("node-{}", self.index)
    }

    /// A command in the node's namespace but outside any pod cgroup: a non-meshed process.
    pub fn command(&self, program: &Path) -> anyhow::Result<Command> {
        command_in(program, &self.netns.path(), None)
    }
}

fn node_gateway6(index: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x198, 0x18, index.into(), 0, 0, 0, 1)
}

/// Where kubelet puts a pod's cgroup: the cgroup driver and the pod's QoS class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KubeletLayout {
    /// systemd driver, Guaranteed.
    SystemdGuaranteed,
    /// systemd driver, Burstable.
    SystemdBurstable,
    /// systemd driver, BestEffort.
    SystemdBestEffort,
    /// cgroupfs driver, Guaranteed.
    CgroupfsGuaranteed,
    /// cgroupfs driver, Burstable.
    CgroupfsBurstable,
    /// cgroupfs driver, BestEffort.
    CgroupfsBestEffort,
}

impl KubeletLayout {
    /// All six layouts.
    pub const ALL: [KubeletLayout; 6] = [
        KubeletLayout::SystemdGuaranteed,
        KubeletLayout::SystemdBurstable,
        KubeletLayout::SystemdBestEffort,
        KubeletLayout::CgroupfsGuaranteed,
        KubeletLayout::CgroupfsBurstable,
        KubeletLayout::CgroupfsBestEffort,
    ];

    /// The pod cgroup of pod `uid`, relative to kubelet's cgroup root (as kubelet
    /// names it: the systemd driver escapes the UID's dashes as underscores).
    pub fn pod_cgroup(self, uid: &str) -> PathBuf {
        let u = uid.replace('-', "_");
        PathBuf::from(match self {
            KubeletLayout::SystemdGuaranteed => format!("kubepods.slice/kubepods-pod{u}.slice"),
            KubeletLayout::SystemdBurstable => {
                format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice")
            }
            KubeletLayout::SystemdBestEffort => {
                format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice")
            }
            KubeletLayout::CgroupfsGuaranteed => format!("kubepods/pod{uid}"),
            KubeletLayout::CgroupfsBurstable => format!("kubepods/burstable/pod{uid}"),
            KubeletLayout::CgroupfsBestEffort => format!("kubepods/besteffort/pod{uid}"),
        })
    }
}

/// A pod: a network namespace on the node's bridge plus a cgroup.
pub struct Pod {
    /// The pod UID (Kubernetes mode finds the pod cgroup by it).
    pub uid: String,
    /// The sandbox process holding the pod's netns, for kubelet-shaped pods.
    pub sandbox: Option<Process>,
    /// The sandbox's container ID, for pods networked through the CNI chain.
    pub sandbox_id: Option<String>,
    /// Pod name.
    pub name: String,
    /// The node it runs on, as its agent's `--node-name`.
    pub node_name: String,
    /// Kubernetes namespace it claims.
    pub namespace: String,
    /// Its network namespace.
    pub netns: Netns,
    /// Its cgroup.
    pub cgroup: CgroupDir,
    /// Its IPv4 address on the bridge.
    pub ip: Ipv4Addr,
    /// Its IPv6 (ULA) address on the bridge.
    pub ip6: Ipv6Addr,
}

impl Pod {
    /// Starts the sandbox ("pause") process in a container cgroup of this pod.
    pub fn start_sandbox(&mut self) -> anyhow::Result<()> {
        let scope = self.cgroup.path.join("cri-containerd-sandbox.scope");
        std::fs::create_dir_all(&scope)?;
        let mut cmd = command_in(Path::new("/bin/sleep"), &self.netns.path(), Some(&scope))?;
        cmd.arg("infinity");
        self.sandbox = Some(Process::spawn(
            &mut cmd,
            &format!("sandbox of {}", self.name),
        )?);
        Ok(())
    }

    /// This pod as a Kubernetes Pod object, owned by a ReplicaSet of Deployment
    /// `deployment` (when given), with service account `<name>-sa`, running on its node.
    pub fn kube_object(
        &self,
        deployment: Option<&str>,
        labels: serde_json::Value,
    ) -> serde_json::Value {
        let mut labels = labels;
        let mut meta = serde_json::json!({
            "name": self.name, "namespace": self.namespace, "uid": self.uid,
        });
        if let Some(deployment) = deployment {
            labels["pod-template-hash"] = "5d8f7c9b4".into();
            meta["ownerReferences"] = serde_json::json!([{
                "apiVersion": "apps/v1", "kind": "ReplicaSet",
                "name": format!("{deployment}-5d8f7c9b4"), "uid": "rs-uid", "controller": true,
            }]);
        }
        meta["labels"] = labels;
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": meta,
            "spec": {
                "nodeName": self.node_name,
                "serviceAccountName": format!("{}-sa", self.name),
                "containers": [{"name": "app", "image": "registry.example/app:1"}],
            },
            "status": {
                "phase": "Running",
                "podIP": self.ip.to_string(),
                "podIPs": [{"ip": self.ip.to_string()}, {"ip": self.ip6.to_string()}],
            },
        })
    }

    /// A command that runs inside this pod (cgroup and network namespace).
    pub fn command(&self, program: &Path) -> anyhow::Result<Command> {
        command_in(program, &self.netns.path(), Some(&self.cgroup.path))
    }

    /// Sets a network sysctl inside this pod's namespace (e.g. `net/ipv4/tcp_tw_reuse`).
    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        let mut cmd = command_in(Path::new("/bin/sh"), &self.netns.path(), None)?;
        cmd.args(["-c", &format!("echo {value} > /proc/sys/{key}")]);
        run(&mut cmd).map(|_| ())
    }

    /// An IPv4 address of this pod.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip, port))
    }

    /// An IPv6 address of this pod.
    pub fn addr6(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip6, port))
    }

    /// This pod as a Workload document.
    pub fn workload_yaml(&self) -> String {
        self.workload_yaml_with("")
    }

    /// This pod as a Workload document with extra `spec` lines (indented two spaces).
    pub fn workload_yaml_with(&self, extra_spec: &str) -> String {
        self.workload_document(&format!("app: {}", self.name), extra_spec)
    }

    /// This pod as a Workload document with `labels`, a YAML flow-mapping body
    /// such as `app: web, version: v1` (Service selectors pick pods by them).
    pub fn workload_yaml_labeled(&self, labels: &str) -> String {
        self.workload_document(labels, "")
    }

    fn workload_document(&self, labels: &str, extra_spec: &str) -> String {
        format!(
            "apiVersion: nodemesh.io/v1alpha1\nkind: Workload\nmetadata:\n  name: {}\n  namespace: {}\n  labels: {{{}}}\nspec:\n  serviceAccount: {}-sa\n  nodeName: {}\n  cgroupPath: {}\n  netns: {{path: {}}}\n  ips: [{}, \"{}\"]\n{}",
            self.name,
            self.namespace,
            labels,
            self.name,
            self.node_name,
            self.cgroup.path.display(),
            self.netns.path().display(),
            self.ip,
            self.ip6,
            extra_spec
        )
    }

    /// Starts a `podtool` server subcommand in this pod and waits until it listens.
    pub fn serve(&self, tools: &Tools, args: &[&str]) -> anyhow::Result<Process> {
        let mut cmd = self.command(&tools.podtool)?;
        cmd.args(args);
        let mut p = Process::spawn(
            &mut cmd,
            &format!("podtool {} in {}", args.join(" "), self.name),
        )?;
        let line = p.wait_line(Duration::from_secs(10))?;
        ensure!(line.starts_with("listening"), "{} said {line:?}", p.name);
        Ok(p)
    }
}

/// Starts `podtool tcp-load` in `from` against `to`: `streams` long-lived
/// echo streams and `rate` new connections a second for `seconds`. Returns
/// once it has started; its report is the last line when it ends.
pub fn start_tcp_load(
    tools: &Tools,
    from: &Pod,
    to: SocketAddr,
    streams: u32,
    rate: u32,
    seconds: f64,
) -> anyhow::Result<Process> {
    let mut cmd = from.command(&tools.podtool)?;
    cmd.args(["tcp-load", "--to", &to.to_string()])
        .args(["--streams", &streams.to_string()])
        .args(["--rate", &rate.to_string()])
        .args(["--seconds", &seconds.to_string()]);
    let mut load = Process::spawn(&mut cmd, "podtool tcp-load")?;
    let line = load.wait_line(Duration::from_secs(10))?;
    ensure!(line.contains("started"), "tcp-load did not start: {line}");
    Ok(load)
}

/// Asserts a `tcp-load` report lost nothing: no connection failed, every one
/// of `streams` streams completed byte-exact, and connections were made.
pub fn assert_lossless(report: &serde_json::Value, streams: u64) {
    assert_eq!(report["connections_failed"], 0, "{report}");
    assert_eq!(report["streams_failed"], 0, "{report}");
    assert_eq!(report["streams"], streams, "{report}");
    assert!(report["connections"].as_u64().unwrap_or(0) > 0, "{report}");
}

/// Joins documents into one YAML stream.
pub fn yaml_docs(docs: &[String]) -> String {
    docs.join("---\n")
}

/// A running `mesh-agent` serving one node, with its config file and log.
pub struct Agent {
    process: Process,
    stdout: std::sync::Mutex<String>,
    /// Admin endpoint.
    pub admin: SocketAddr,
    /// The config file it watches.
    pub config_path: PathBuf,
    /// Its stderr.
    pub log_path: PathBuf,
    _dir: tempfile::TempDir,
}

/// GETs a path of an admin endpoint (the agent's or the CA service's), within 5 s.
pub fn admin_get(admin: SocketAddr, path: &str) -> anyhow::Result<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(5),
            mesh_agent::debug::fetch(admin, path),
        )
        .await
        .map_err(|_| anyhow!("GET {path} timed out"))?
    })
}

/// A loopback port free at the moment.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Agent {
    /// Starts an agent attached to `node`'s cgroup and waits until it is ready.
    pub fn start(tools: &Tools, node: &Node, config: &str) -> anyhow::Result<Self> {
        Self::start_with(tools, node, config, &[])
    }

    /// [`Agent::start`] with extra `mesh-agent run` arguments.
    pub fn start_with(
        tools: &Tools,
        node: &Node,
        config: &str,
        args: &[&str],
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let config_path = dir.path().join("mesh.yaml");
        std::fs::write(&config_path, config)?;
        let mut cmd = Command::new(&tools.agent);
        cmd.arg("run").arg("--config").arg(&config_path);
        Self::spawn(cmd, dir, node, args, None)
    }

    /// Starts a second agent for `node` with this one's config and admin address
    /// plus `args` (the same flags, as a DaemonSet surge rollout does), while
    /// this one runs: it takes over this one's listeners. Returns once it
    /// answers on the shared admin address; this one may still be handing over.
    pub fn start_successor(
        &self,
        tools: &Tools,
        node: &Node,
        args: &[&str],
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let config_path = dir.path().join("mesh.yaml");
        std::fs::copy(&self.config_path, &config_path)?;
        let mut cmd = Command::new(&tools.agent);
        cmd.arg("run").arg("--config").arg(&config_path);
        Self::spawn(cmd, dir, node, args, Some(self.admin))
    }

    /// Starts an agent in Kubernetes mode against `api` (no config file) and waits
    /// until it is ready: every kind listed and applied.
    pub fn start_kube(
        tools: &Tools,
        node: &Node,
        api: &apiserver::ApiServer,
        args: &[&str],
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut cmd = Command::new(&tools.agent);
        cmd.arg("run")
            .arg("--kubernetes")
            .env("KUBECONFIG", api.kubeconfig()?);
        Self::spawn(cmd, dir, node, args, None)
    }

    fn spawn(
        mut cmd: Command,
        dir: tempfile::TempDir,
        node: &Node,
        args: &[&str],
        admin: Option<SocketAddr>,
    ) -> anyhow::Result<Self> {
        let config_path = dir.path().join("mesh.yaml");
        let log_path = dir.path().join("agent.log");
        let log = File::create(&log_path)?;
        let admin = match admin {
            Some(a) => a,
            None => SocketAddr::from(([127, 0, 0, 1], free_port()?)),
        };
        cmd.arg("--admin-addr")
            .arg(admin.to_string())
            .arg("--attach-cgroup")
            .arg(&node.cgroup.path)
            .arg("--bpf-dir")
            .arg(&node.bpf_dir)
            .arg("--handoff-socket")
            .arg(&node.handoff_socket)
            .arg("--node-name")
            .arg(node.name())
            .args(args)
            .env("NODEMESH_LOG", "info")
            .stderr(log);
        let process = Process::spawn(&mut cmd, "mesh-agent")?;
        let mut agent = Agent {
            process,
            stdout: std::sync::Mutex::default(),
            admin,
            config_path,
            log_path,
            _dir: dir,
        };
        let mut died = None;
        wait_until("agent readiness", Duration::from_secs(15), || {
            died = agent.process.exited();
            Ok(died.is_some() || agent.get("/healthz/ready").is_ok())
        })
        .map_err(|e| anyhow!("{e}\nagent log:\n{}", agent.log()))?;
        if let Some(status) = died {
            bail!(
                "agent exited ({status}) before becoming ready\nagent log:\n{}",
                agent.log()
            );
        }
        Ok(agent)
    }

    /// Replaces the config file atomically (write then rename), as a ConfigMap update does.
    pub fn write_config(&self, config: &str) -> anyhow::Result<()> {
        let tmp = self.config_path.with_extension("tmp");
        let mut f = File::create(&tmp)?;
        f.write_all(config.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.config_path)?;
        Ok(())
    }

    /// GETs an admin path.
    pub fn get(&self, path: &str) -> anyhow::Result<String> {
        admin_get(self.admin, path)
    }

    /// What `mesh-agent debug <args>` prints about this agent (tables), run
    /// as an operator would, with the binary in `tools`.
    pub fn debug(&self, tools: &Tools, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = Command::new(&tools.agent);
        cmd.arg("debug")
            .args(args)
            .args(["--admin-addr", &self.admin.to_string()]);
        run(&mut cmd)
    }

    /// Starts `mesh-agent debug <args>` against this agent in the background,
    /// for views that stream (`trace`); its stdout arrives line by line.
    pub fn debug_spawn(&self, tools: &Tools, args: &[&str]) -> anyhow::Result<Process> {
        let mut cmd = Command::new(&tools.agent);
        cmd.arg("debug")
            .args(args)
            .args(["--admin-addr", &self.admin.to_string()]);
        Process::spawn(&mut cmd, "mesh-agent debug")
    }

    /// Whether the kernel reports `workload`'s verdicts now (`kernelTraced`
    /// in `/config_dump`, read from its kernel entry); `None` when not enrolled.
    pub fn kernel_traced(&self, workload: &str) -> anyhow::Result<Option<bool>> {
        let dump = self.config_dump()?;
        Ok(dump["workloads"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|w| w["workload"] == workload)
            .and_then(|w| w["kernelTraced"].as_bool()))
    }

    /// `/metrics`.
    pub fn metrics(&self) -> anyhow::Result<String> {
        self.get("/metrics")
    }

    /// Sum of the samples of `name` whose labels include all of `labels`.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
        Ok(metric_sum(&self.metrics()?, name, labels))
    }

    /// `/config_dump`.
    pub fn config_dump(&self) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.get("/config_dump")?)?)
    }

    /// Waits until the agent holds at least one available certificate.
    pub fn wait_for_certificate(&self) -> anyhow::Result<()> {
        wait_until("a certificate", Duration::from_secs(10), || {
            let dump = self.config_dump()?;
            Ok(dump["certificates"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["state"] == "available")))
        })
    }

    /// `/connections`.
    pub fn connections(&self) -> anyhow::Result<Vec<ConnectionView>> {
        Ok(serde_json::from_str(&self.get("/connections")?)?)
    }

    /// Entries of one capture map, from `/config_dump`.
    pub fn map_entries(&self, map: &str) -> anyhow::Result<u64> {
        let dump = self.config_dump()?;
        dump["maps"]
            .as_array()
            .and_then(|maps| maps.iter().find(|m| m["name"] == map))
            .and_then(|m| m["entries"].as_u64())
            .ok_or_else(|| anyhow!("map {map} not in config dump"))
    }

    /// The config generation applied so far.
    pub fn generation(&self) -> anyhow::Result<u64> {
        self.config_dump()?["config"]["generation"]
            .as_u64()
            .ok_or_else(|| anyhow!("no generation in config dump"))
    }

    /// Writes a config and waits until the agent has applied it.
    pub fn reconfigure(&self, config: &str) -> anyhow::Result<()> {
        let before = self.generation()?;
        self.write_config(config)?;
        wait_until("config applied", Duration::from_secs(10), || {
            Ok(self.generation()? > before)
        })
    }

    /// Everything the agent has printed on stdout (its request log) so far.
    pub fn stdout(&self) -> String {
        let mut seen = self.stdout.lock().expect("stdout lock");
        for line in self.process.new_lines() {
            seen.push_str(&line);
            seen.push('\n');
        }
        seen.clone()
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Resident memory in KiB, from /proc.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        proc_status_kib(self.pid(), "VmRSS")
    }

    /// Open file descriptors, from /proc.
    pub fn fd_count(&self) -> anyhow::Result<usize> {
        Ok(std::fs::read_dir(format!("/proc/{}/fd", self.process.pid()))?.count())
    }

    /// Sends `signal` and waits up to `timeout` for the agent to exit; its exit
    /// status, or `None` if it still runs.
    pub fn signal_and_wait(
        &mut self,
        signal: i32,
        timeout: Duration,
    ) -> Option<std::process::ExitStatus> {
        self.signal(signal);
        self.wait_exit(timeout)
    }

    /// Waits up to `timeout` for the agent to exit; its exit status, or `None`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.process.exited() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends the agent a signal (e.g. `libc::SIGHUP`).
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.process.pid() as i32, signal) };
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The first log line `matches` accepts, waiting up to 5 s for it: the agent
    /// writes its log from a thread of its own, so a line can land just after
    /// the metric or state that reports the same event. Panics with the log.
    pub fn log_line(&self, what: &str, matches: impl Fn(&str) -> bool) -> String {
        let mut found = None;
        let waited = wait_until(what, Duration::from_secs(5), || {
            found = self.log().lines().find(|l| matches(l)).map(str::to_owned);
            Ok(found.is_some())
        });
        match (waited, found) {
            (Ok(()), Some(line)) => line,
            _ => panic!("no log line: {what}\n{}", self.log()),
        }
    }
}

/// A `/proc/PID/status` field in KiB (`VmRSS`, `VmHWM`, …).
pub fn proc_status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow!("no {field} for pid {pid}"))
}

/// User + system CPU seconds a process has used, from `/proc/PID/stat`.
pub fn proc_cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 / hz)
}

/// Context switches of every thread of a process so far, voluntary (it slept,
/// waiting) and not (it was preempted): a measure of wake-ups.
pub fn proc_context_switches(pid: u32) -> anyhow::Result<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        // A thread may end while it is read.
        let Ok(status) = std::fs::read_to_string(task?.path().join("status")) else {
            continue;
        };
        total += status
            .lines()
            .filter(|l| {
                l.starts_with("voluntary_ctxt_switches")
                    || l.starts_with("nonvoluntary_ctxt_switches")
            })
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum::<u64>();
    }
    Ok(total)
}

/// Sum of the samples of `name` in a Prometheus text whose labels include all of `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")));
            all.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_position_based() {
        let whole = pattern(1000, 0);
        let mut parts = pattern(300, 0);
        parts.extend(pattern(700, 300));
        assert_eq!(whole, parts);
        assert_ne!(pattern(16, 0), pattern(16, 1));
    }

    #[test]
    fn metric_sum_filters_by_labels() {
        let text =
            "# HELP x y\nfoo_total{a=\"1\",b=\"2\"} 3\nfoo_total{a=\"1\",b=\"3\"} 4\nfoo_bar 9\n";
        assert_eq!(metric_sum(text, "foo_total", &[("a", "1")]), 7.0);
        assert_eq!(metric_sum(text, "foo_total", &[("b", "3")]), 4.0);
        assert_eq!(metric_sum(text, "foo_bar", &[]), 9.0);
        assert_eq!(metric_sum(text, "nope", &[]), 0.0);
    }
}
