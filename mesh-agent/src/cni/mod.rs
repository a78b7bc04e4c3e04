//! The CNI plugin (`nodemesh-cni`) and what it says to the node agent. The
//! container runtime runs the plugin, chained after the pod network's own, while
//! it creates a pod's sandbox; the plugin asks the agent to enroll the pod and
//! returns only once the agent has, so no container of a meshed pod starts
//! before its traffic is captured.
//!
//! The plugin and the agent speak one JSON line each way over a node-local unix
//! socket: a [`Request`], then a [`Reply`].

pub mod install;
pub mod plugin;

use serde::{Deserialize, Serialize};

/// Where the agent listens for the plugin unless configured otherwise.
pub const DEFAULT_SOCKET: &str = "/var/run/nodemesh/cni.sock";

/// What the runtime asked of the plugin, for one pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Request {
    /// `ADD`, `DEL` or `CHECK`.
    pub command: Command,
    /// The sandbox's container ID, for logs.
    pub container_id: String,
    /// The pod's network namespace file (`CNI_NETNS`).
    pub netns: String,
    /// Pod namespace (`K8S_POD_NAMESPACE`).
    pub pod_namespace: String,
    /// Pod name (`K8S_POD_NAME`).
    pub pod_name: String,
    /// Pod UID (`K8S_POD_UID`); empty when the runtime did not pass it.
    pub pod_uid: String,
    /// The addresses the pod network gave the pod (the previous plugin's result).
    pub ips: Vec<std::net::IpAddr>,
    /// How long the plugin waits for the reply, so the agent gives up first.
    pub timeout_ms: u64,
}

/// The CNI commands the agent takes part in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Command {
    /// The sandbox is being created: enroll the pod if it is meshed.
    Add,
    /// The sandbox is being removed: unenroll the pod.
    Del,
    /// Is the pod as ADD left it?
    Check,
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "outcome")]
pub enum Reply {
    /// The pod is enrolled: its cgroup is in the kernel map and its listeners
    /// are bound.
    Enrolled,
    /// The pod is not in the mesh (its namespace is not opted in, or it opted
    /// out); nothing was done.
    NotMeshed {
        /// Why, for the runtime's log.
        reason: String,
    },
    /// DEL: the pod is no longer enrolled (or never was).
    Removed,
    /// The pod should be meshed and is not: the runtime must not start it.
    Failed {
        /// What went wrong.
        message: String,
    },
}
