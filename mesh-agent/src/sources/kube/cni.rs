//! The agent's side of the CNI plugin: a node-local unix socket on which the
//! plugin announces a pod's sandbox (ADD) or its removal (DEL) and waits for
//! the outcome. ADD answers once the pod is enrolled, or at once when it is not
//! meshed; the sandbox's network namespace and addresses come from the runtime,
//! so a pod is enrolled before any of its containers runs, before kubelet has
//! written its address to the API.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::cni::{Command, Reply, Request};
use crate::reconciler::{Agent, EnrollmentState};

/// What the runtime said of a pod's sandbox, by `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sandbox {
    /// ADD: the sandbox's network namespace and addresses.
    Added {
        /// The pod UID the runtime gave (empty if none).
        uid: Box<str>,
        /// The sandbox's network namespace file.
        netns: PathBuf,
        /// Its addresses, from the pod network's plugin.
        ips: Vec<IpAddr>,
    },
    /// DEL: the sandbox is gone; the pod stays unenrolled until a new ADD (or
    /// until the pod is deleted from the API, when the record is dropped).
    Deleted {
        /// The pod UID the runtime gave (empty if none).
        uid: Box<str>,
    },
}

impl Sandbox {
    /// Whether this is about the pod with UID `uid` (an empty UID matches any).
    pub fn is_for(&self, uid: &str) -> bool {
        let own = match self {
            Sandbox::Added { uid, .. } | Sandbox::Deleted { uid } => uid,
        };
        own.is_empty() || **own == *uid
    }
}

/// The sandboxes the runtime announced.
pub type Sandboxes = HashMap<String, Sandbox>;

/// Whether a pod should be meshed, by what the watches have seen so far.
pub enum Verdict {
    /// Its namespace is opted in and it did not opt out.
    Meshed,
    /// Not in the mesh, and why.
    NotMeshed(String),
    /// Not known yet (the namespace or the pod not seen from the API): wait.
    Unknown(String),
}

/// What the CNI server needs of the Kubernetes source, which owns the watches
/// and the applies (so the server depends on this, not on the source's insides).
pub trait Source: Send + Sync + 'static {
    /// Whether pod `namespace/name` should be meshed.
    fn verdict(&self, namespace: &str, name: &str) -> Verdict;
    /// The announced sandboxes, which the next apply takes into account.
    fn sandboxes(&self) -> &std::sync::Mutex<Sandboxes>;
    /// Asks for an apply soon.
    fn changed(&self);
    /// Counts applies; a request waits on it for the next one.
    fn applied(&self) -> tokio::sync::watch::Receiver<u64>;
}

/// Answers the plugin on `socket` until the process exits.
pub async fn serve(
    socket: &Path,
    shared: Arc<impl Source>,
    agent: Arc<Agent>,
) -> anyhow::Result<()> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A socket file left by an earlier agent would make bind fail.
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)?;
    // Only root (the runtime) may announce pods.
    std::fs::set_permissions(socket, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    tracing::info!(socket = %socket.display(), "listening for the CNI plugin");
    loop {
        let (stream, _) = listener.accept().await?;
        let (shared, agent) = (shared.clone(), agent.clone());
        tokio::spawn(async move {
            if let Err(e) = answer(stream, &*shared, &agent).await {
                tracing::warn!(error = %e, "CNI plugin request failed");
            }
        });
    }
}

async fn answer(stream: UnixStream, shared: &impl Source, agent: &Agent) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    let request: Request = serde_json::from_str(&line)?;
    let started = Instant::now();
    let reply = match request.command {
        Command::Add => add(shared, agent, &request).await,
        Command::Del => del(shared, agent, &request).await,
        Command::Check => check(shared, agent, &request).await,
    };
    let outcome = match &reply {
        Reply::Enrolled => "enrolled",
        Reply::NotMeshed { .. } => "not_meshed",
        Reply::Removed => "removed",
        Reply::Failed { .. } => "failed",
    };
    agent
        .metrics
        .cni_request(command_name(request.command), outcome);
    tracing::info!(
        command = command_name(request.command),
        pod = %format!("{}/{}", request.pod_namespace, request.pod_name),
        container = %request.container_id,
        outcome,
        took_ms = started.elapsed().as_millis() as u64,
        reply = ?reply,
        "CNI plugin answered"
    );
    let mut out = serde_json::to_string(&reply)?;
    out.push('\n');
    write.write_all(out.as_bytes()).await?;
    Ok(())
}

fn command_name(c: Command) -> &'static str {
    match c {
        Command::Add => "ADD",
        Command::Del => "DEL",
        Command::Check => "CHECK",
    }
}

fn key(request: &Request) -> String {
    format!("{}/{}", request.pod_namespace, request.pod_name)
}

/// How long the agent may take: a little less than the plugin waits, so the
/// plugin gets a reply that says why instead of a timeout.
fn deadline(request: &Request) -> Instant {
    let wait = Duration::from_millis(request.timeout_ms).saturating_sub(Duration::from_millis(500));
    Instant::now() + wait.max(Duration::from_millis(100))
}

async fn add(shared: &impl Source, agent: &Agent, request: &Request) -> Reply {
    let key = key(request);
    let netns = PathBuf::from(&request.netns);
    shared.sandboxes().lock().expect("sandboxes lock").insert(
        key.clone(),
        Sandbox::Added {
            uid: request.pod_uid.as_str().into(),
            netns: netns.clone(),
            ips: request.ips.clone(),
        },
    );
    shared.changed();
    let deadline = deadline(request);
    let mut applied = shared.applied();
    let mut waiting_for;
    loop {
        match shared.verdict(&request.pod_namespace, &request.pod_name) {
            Verdict::NotMeshed(reason) => {
                shared
                    .sandboxes()
                    .lock()
                    .expect("sandboxes lock")
                    .remove(&key);
                return Reply::NotMeshed { reason };
            }
            Verdict::Unknown(why) => waiting_for = why,
            Verdict::Meshed => match agent.enrollment(&key, Some(&netns)).await {
                EnrollmentState::Enrolled => return Reply::Enrolled,
                EnrollmentState::Failed(error) => waiting_for = error,
                EnrollmentState::Absent => waiting_for = "not enrolled yet".into(),
            },
        }
        let now = Instant::now();
        if now >= deadline {
            return Reply::Failed {
                message: format!("not enrolled in time: {waiting_for}"),
            };
        }
        // An apply, or a change the watches made without one (a namespace
        // label seen), may settle it.
        let _ = tokio::time::timeout(
            (deadline - now).min(Duration::from_millis(100)),
            applied.changed(),
        )
        .await;
    }
}

async fn del(shared: &impl Source, agent: &Agent, request: &Request) -> Reply {
    let key = key(request);
    shared.sandboxes().lock().expect("sandboxes lock").insert(
        key.clone(),
        Sandbox::Deleted {
            uid: request.pod_uid.as_str().into(),
        },
    );
    shared.changed();
    let deadline = deadline(request).min(Instant::now() + Duration::from_secs(10));
    let mut applied = shared.applied();
    loop {
        if agent.enrollment(&key, None).await != EnrollmentState::Enrolled {
            return Reply::Removed;
        }
        let now = Instant::now();
        if now >= deadline {
            return Reply::Failed {
                message: "still enrolled; the agent keeps trying to unenroll it".into(),
            };
        }
        let _ = tokio::time::timeout(deadline - now, applied.changed()).await;
    }
}

async fn check(shared: &impl Source, agent: &Agent, request: &Request) -> Reply {
    match shared.verdict(&request.pod_namespace, &request.pod_name) {
        Verdict::NotMeshed(reason) => Reply::NotMeshed { reason },
        Verdict::Unknown(why) => Reply::Failed { message: why },
        Verdict::Meshed => {
            match agent
                .enrollment(&key(request), Some(Path::new(&request.netns)))
                .await
            {
                EnrollmentState::Enrolled => Reply::Enrolled,
                EnrollmentState::Failed(error) => Reply::Failed { message: error },
                EnrollmentState::Absent => Reply::Failed {
                    message: "the pod is meshed but not enrolled".into(),
                },
            }
        }
    }
}
