//! The mesh CA service in tests: `mesh-agent ca serve` against the API server
//! double, and what a node's agent needs to use it (the mesh root and a token
//! bound to an agent pod on that node).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;

use crate::apiserver::{ApiServer, IssuedToken, pod_uid};
use crate::{Node, Process, Tools, admin_get, free_port, metric_sum};

/// The name the CA service's certificate carries and agents verify.
pub const SERVER_NAME: &str = "nodemesh-ca.nodemesh-system.svc";
/// Namespace and service account of node agents.
pub const AGENT_NAMESPACE: &str = "nodemesh-system";
/// See [`AGENT_NAMESPACE`].
pub const AGENT_SERVICE_ACCOUNT: &str = "nodemesh-agent";

/// A running `mesh-agent ca serve`; killed on drop.
pub struct CaServer {
    process: Option<Process>,
    /// Certificate API (gRPC over TLS).
    pub addr: SocketAddr,
    /// `/healthz/ready` and `/metrics`.
    pub admin: SocketAddr,
    /// Its stderr (appended across restarts).
    pub log_path: PathBuf,
    /// The `cacerts` directory it signs with.
    pub ca_dir: PathBuf,
    args: Vec<String>,
    kubeconfig: PathBuf,
    agent: PathBuf,
    _dir: tempfile::TempDir,
}

impl CaServer {
    /// Starts a CA service signing with `ca_dir`, reviewing tokens and
    /// listing pods through `api`, and waits until it is ready.
    pub fn start(
        tools: &Tools,
        api: &ApiServer,
        ca_dir: &Path,
        args: &[&str],
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut server = CaServer {
            process: None,
            addr: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
            admin: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
            log_path: dir.path().join("ca.log"),
            ca_dir: ca_dir.to_path_buf(),
            args: args.iter().map(|a| a.to_string()).collect(),
            kubeconfig: api.kubeconfig()?,
            agent: tools.agent.clone(),
            _dir: dir,
        };
        server.restart()?;
        Ok(server)
    }

    /// Starts it again on the same ports after [`CaServer::kill`].
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let mut cmd = Command::new(&self.agent);
        cmd.args(["ca", "serve", "--ca-dir"])
            .arg(&self.ca_dir)
            .arg("--listen")
            .arg(self.addr.to_string())
            .arg("--admin-addr")
            .arg(self.admin.to_string())
            .arg("--server-name")
            .arg(SERVER_NAME)
            .arg("--node-agent")
            .arg(format!("{AGENT_NAMESPACE}/{AGENT_SERVICE_ACCOUNT}"))
            .args(&self.args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("NODEMESH_LOG", "info")
            .stderr(log);
        let mut process = Process::spawn(&mut cmd, "mesh-agent ca serve")?;
        let started = Instant::now();
        loop {
            if let Some(status) = process.exited() {
                bail!("CA service exited ({status})\n{}", self.log());
            }
            if self
                .get("/healthz/ready")
                .is_ok_and(|b| b.starts_with("ready"))
            {
                break;
            }
            if started.elapsed() > Duration::from_secs(15) {
                bail!("CA service not ready within 15s\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.process = Some(process);
        Ok(())
    }

    /// Kills it (SIGKILL), as a node failure or an OOM kill would.
    pub fn kill(&mut self) {
        self.process.take();
    }

    /// GETs an admin path.
    pub fn get(&self, path: &str) -> anyhow::Result<String> {
        admin_get(self.admin, path)
    }

    /// The sum of a metric's series with these labels.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
        Ok(metric_sum(&self.get("/metrics")?, name, labels))
    }

    /// Answers with `result` so far (`signed`, `permission_denied`, …).
    pub fn answered(&self, result: &str) -> f64 {
        self.metric("nodemesh_ca_requests_total", &[("result", result)])
            .unwrap_or(-1.0)
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// `https://<addr>`, for `--ca-address`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }
}

/// What an agent on one node needs to use the CA service: the mesh root and a
/// token bound to that node's agent pod (which this creates in the API).
pub struct AgentCredentials {
    /// The mesh root file (`--ca-root`): copied from the CA, no key with it.
    pub root: PathBuf,
    /// The token file (`--ca-token-file`).
    pub token: PathBuf,
    /// The agent pod's name.
    pub pod: String,
    /// The token itself.
    pub token_text: String,
    address: String,
    _dir: tempfile::TempDir,
}

impl AgentCredentials {
    /// Registers an agent pod on `node` and issues its token (audience `istio-ca`).
    pub fn for_node(api: &ApiServer, ca: &CaServer, node: &Node) -> anyhow::Result<Self> {
        Self::for_node_name(api, ca, &node.name())
    }

    /// [`AgentCredentials::for_node`] for a node known by name only.
    pub fn for_node_name(api: &ApiServer, ca: &CaServer, node: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let pod = format!("nodemesh-agent-{node}");
        let uid = pod_uid();
        api.apply(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod, "namespace": AGENT_NAMESPACE, "uid": uid},
            "spec": {"nodeName": node, "serviceAccountName": AGENT_SERVICE_ACCOUNT,
                     "containers": [{"name": "agent", "image": "nodemesh/agent"}]},
            "status": {"phase": "Running"},
        }))?;
        let token = api.issue_token(IssuedToken {
            service_account: (AGENT_NAMESPACE.into(), AGENT_SERVICE_ACCOUNT.into()),
            pod: Some((pod.clone(), uid)),
            audiences: vec!["istio-ca".into()],
            expires: Instant::now() + Duration::from_secs(3600),
        });
        let root = dir.path().join("root-cert.pem");
        std::fs::copy(ca.ca_dir.join("root-cert.pem"), &root).context("copying the mesh root")?;
        let token_path = dir.path().join("istio-token");
        std::fs::write(&token_path, &token)?;
        Ok(AgentCredentials {
            root,
            token: token_path,
            token_text: token,
            pod,
            address: ca.url(),
            _dir: dir,
        })
    }

    /// `mesh-agent run` flags that use the CA service.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--ca-address".into(),
            self.address.clone(),
            "--ca-server-name".into(),
            SERVER_NAME.into(),
            "--ca-root".into(),
            self.root.display().to_string(),
            "--ca-token-file".into(),
            self.token.display().to_string(),
        ]
    }
}
