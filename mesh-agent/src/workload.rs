//! What the agent knows about a workload's identity, and the node-wide
//! directory that maps pod IPs back to workloads for destination attribution.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use crate::config::Workload;

/// Identity and labels of one workload, shared by its connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadMeta {
    /// Pod name.
    pub name: String,
    /// Pod namespace.
    pub namespace: String,
    /// Kubernetes service account.
    pub service_account: String,
    /// Pod labels, shared with the workload they came from.
    pub labels: crate::config::Labels,
    /// Istio's workload name: the pod's controller (Deployment, CronJob, …) or the pod.
    pub workload_name: String,
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
        self.app().unwrap_or_else(|| self.workload_name.clone())
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

    /// Replaces the whole directory.
    pub fn replace(&self, entries: HashMap<IpAddr, Arc<WorkloadMeta>>) {
        *self.by_ip.write().expect("directory lock") = entries;
    }
}
