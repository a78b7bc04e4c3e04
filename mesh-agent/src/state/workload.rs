//! Workloads (pods): who they are and where they live on their node, the identity
//! the data path carries for each, and the node-wide directory that maps pod IPs
//! back to workloads for destination attribution.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use ipnet::IpNet;
use serde::Serialize;

/// A pod: who it is, and, on its own node, where its cgroup and network
/// namespace are. Every pod of the cluster is one in Kubernetes mode, so the
/// strings are shared (`Arc<str>`): copies of a workload into the model, its
/// identity and the directory cost a reference count each, and the namespaces,
/// service accounts and controller names of many pods are one allocation each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    /// Pod name.
    pub name: Arc<str>,
    /// Pod namespace.
    pub namespace: Arc<str>,
    /// Pod labels (for `app`/`version` metric labels and, later, policy selectors).
    pub labels: Labels,
    /// Kubernetes service account; part of the workload's identity.
    pub service_account: Arc<str>,
    /// The node the pod runs on. Absent: the node of whichever agent reads it.
    pub node_name: Option<Arc<str>>,
    /// Where the pod lives on its node; needed only by that node's agent, so
    /// boxed to keep the many remote pods small.
    pub placement: Option<Box<Placement>>,
    /// Pod IPs; connections to them from the pod itself are never captured.
    pub ips: Vec<IpAddr>,
    /// Destination ports this workload reaches directly, bypassing the agent.
    pub excluded_ports: Vec<u16>,
    /// Destination CIDRs this workload reaches directly, bypassing the agent.
    pub excluded_cidrs: Vec<IpNet>,
    /// Istio's workload name (the pod's controller, e.g. its Deployment), used in
    /// metric labels; the pod name when the pod has no controller.
    pub workload_name: Arc<str>,
    /// Whether the pod is in the mesh. Pods outside it are still known, so that
    /// Services can balance to them and metrics can name them, but they are never
    /// enrolled and are reached without the tunnel.
    pub meshed: bool,
    /// The SPIFFE trust domain of the workload's identity.
    pub trust_domain: Arc<str>,
    /// Most connections the agent holds for this pod at once (its own and to
    /// it); more are reset. `None`: only the agent-wide bound applies.
    pub max_connections: Option<std::num::NonZeroU32>,
}

/// A pod's labels, shared by every copy of the workload (its identity, the
/// directory, Service endpoints) instead of copied into each.
pub type Labels = Arc<BTreeMap<String, String>>;

/// The trust domain of identities unless `--trust-domain` says otherwise.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// A pod's cgroup and network namespace on its node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// The pod's cgroup v2 directory, absolute or relative to the cgroup2 mount.
    pub cgroup_path: PathBuf,
    /// The pod's network namespace.
    pub netns: NetnsRef,
}

impl Workload {
    /// Whether the agent of node `node` (None: a node-agnostic agent) serves this pod.
    pub fn is_local_to(&self, node: Option<&str>) -> bool {
        match (&self.node_name, node) {
            (None, _) => true,
            (Some(theirs), Some(ours)) => **theirs == *ours,
            (Some(_), None) => false,
        }
    }

    /// `namespace/name`, the workload's unique key on a node.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether `other` differs only in fields that can be updated in place
    /// (labels, identity, IPs, exclusions), keeping the listener and cgroup.
    pub fn same_placement(&self, other: &Workload) -> bool {
        self.placement == other.placement
    }
}

/// How to find a pod's network namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum NetnsRef {
    /// A bind-mounted namespace file, e.g. `/var/run/netns/cni-…`.
    Path(PathBuf),
    /// Any process in the pod: `/proc/<pid>/ns/net`.
    Pid(u32),
}

impl NetnsRef {
    /// The file to open to enter this namespace.
    pub fn file(&self) -> PathBuf {
        match self {
            NetnsRef::Path(p) => p.clone(),
            NetnsRef::Pid(pid) => PathBuf::from(format!("/proc/{pid}/ns/net")),
        }
    }
}

impl fmt::Display for NetnsRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetnsRef::Path(p) => write!(f, "{}", p.display()),
            NetnsRef::Pid(pid) => write!(f, "pid:{pid}"),
        }
    }
}

/// Identity and labels of one workload, shared by its connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadMeta {
    /// Pod name.
    pub name: Arc<str>,
    /// Pod namespace.
    pub namespace: Arc<str>,
    /// Kubernetes service account.
    pub service_account: Arc<str>,
    /// Pod labels, shared with the workload they came from.
    pub labels: crate::state::workload::Labels,
    /// Istio's workload name: the pod's controller (Deployment, CronJob, …) or the pod.
    pub workload_name: Arc<str>,
    /// Whether the pod is in the mesh, and so reachable only through the tunnel.
    pub meshed: bool,
    /// The SPIFFE trust domain of its identity.
    pub trust_domain: Arc<str>,
}

impl WorkloadMeta {
    /// Identity fields of a configured workload.
    pub fn from_config(w: &Workload) -> Self {
        WorkloadMeta {
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            service_account: w.service_account.clone(),
            labels: w.labels.clone(),
            workload_name: w.workload_name.clone(),
            meshed: w.meshed,
            trust_domain: w.trust_domain.clone(),
        }
    }

    /// Whether this is exactly the identity `w` would be given, so a rebuild can
    /// keep it instead of allocating the same again.
    pub fn describes(&self, w: &Workload) -> bool {
        self.name == w.name
            && self.namespace == w.namespace
            && self.service_account == w.service_account
            && self.workload_name == w.workload_name
            && self.meshed == w.meshed
            && self.trust_domain == w.trust_domain
            && self.labels == w.labels
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// SPIFFE identity: `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub fn principal(&self) -> String {
        self.identity().to_string()
    }

    /// The identity this workload's certificate carries.
    pub fn identity(&self) -> crate::identity::Identity {
        crate::identity::Identity::new(&self.trust_domain, &self.namespace, &self.service_account)
    }

    /// Istio's canonical `app` label lookup.
    pub fn app(&self) -> Option<String> {
        [
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ]
        .iter()
        .find_map(|k| self.labels.get(*k).cloned())
    }

    /// Istio's canonical service: the canonical-name labels, else the workload name.
    pub fn canonical_service(&self) -> String {
        self.app().unwrap_or_else(|| self.workload_name.to_string())
    }

    /// Istio's canonical revision: the canonical-revision labels, else `latest`.
    pub fn canonical_revision(&self) -> String {
        self.version().unwrap_or_else(|| "latest".to_owned())
    }

    /// Istio's canonical `version` label lookup.
    pub fn version(&self) -> Option<String> {
        [
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ]
        .iter()
        .find_map(|k| self.labels.get(*k).cloned())
    }
}

/// Pod IP to workload, rebuilt on every config apply.
#[derive(Default)]
pub struct Directory {
    by_ip: RwLock<HashMap<IpAddr, Arc<WorkloadMeta>>>,
}

impl Directory {
    /// The workload owning `ip`, if it is a configured pod IP.
    pub fn lookup(&self, ip: IpAddr) -> Option<Arc<WorkloadMeta>> {
        self.by_ip.read().expect("directory lock").get(&ip).cloned()
    }

    /// The pod `namespace/name` and one of its IPs, if known.
    pub fn find(&self, namespace: &str, name: &str) -> Option<(IpAddr, Arc<WorkloadMeta>)> {
        self.by_ip
            .read()
            .expect("directory lock")
            .iter()
            .find(|(_, m)| &*m.namespace == namespace && &*m.name == name)
            .map(|(ip, m)| (*ip, m.clone()))
    }

    /// The identity of `w` as the directory holds it now, or a new one: unchanged
    /// pods keep theirs across rebuilds, so a rebuild of 10,000 pods allocates
    /// only for those that changed.
    pub fn identity_for(&self, w: &Workload) -> Arc<WorkloadMeta> {
        let by_ip = self.by_ip.read().expect("directory lock");
        w.ips
            .first()
            .and_then(|ip| by_ip.get(ip))
            .filter(|meta| meta.describes(w))
            .cloned()
            .unwrap_or_else(|| Arc::new(WorkloadMeta::from_config(w)))
    }

    /// Replaces the whole directory.
    pub fn replace(&self, entries: HashMap<IpAddr, Arc<WorkloadMeta>>) {
        *self.by_ip.write().expect("directory lock") = entries;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, app: &str) -> Workload {
        Workload {
            name: name.into(),
            namespace: "shop".into(),
            labels: Arc::new([("app".to_owned(), app.to_owned())].into()),
            service_account: "default".into(),
            node_name: Some("far".into()),
            placement: None,
            ips: vec![first_ip()],
            excluded_ports: Vec::new(),
            excluded_cidrs: Vec::new(),
            workload_name: name.into(),
            meshed: true,
            trust_domain: DEFAULT_TRUST_DOMAIN.into(),
            max_connections: None,
        }
    }

    #[test]
    fn unchanged_pods_keep_their_identity_across_rebuilds() {
        let directory = Directory::default();
        let first = directory.identity_for(&pod("a", "web"));
        directory.replace([(first_ip(), first.clone())].into());
        assert!(Arc::ptr_eq(
            &first,
            &directory.identity_for(&pod("a", "web"))
        ));
        let relabelled = directory.identity_for(&pod("a", "api"));
        assert!(!Arc::ptr_eq(&first, &relabelled));
        assert_eq!(relabelled.app().as_deref(), Some("api"));
        let mut moved = pod("a", "web");
        moved.meshed = false;
        assert!(!directory.identity_for(&moved).meshed);
    }

    fn first_ip() -> IpAddr {
        "10.1.0.5".parse().unwrap()
    }
}
