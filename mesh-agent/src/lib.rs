//! The nodemesh node agent: one per node, replacing every sidecar on it.
//!
//! The folders follow the way desired state flows, and imports point one way:
//!
//! - [`sources`]: where desired state comes from (a YAML file, the Kubernetes API);
//! - [`state`]: the one typed model both sources produce, and its validation;
//! - [`reconciler`]: turns each desired state into enrollments (kernel map
//!   entries, in-pod listeners) and the views the data path reads;
//! - [`proxy`]: the data path (outbound, inbound, the HBONE tunnel, L7);
//! - [`node`]: this host's kernel side (eBPF capture, cgroups, network namespaces);
//! - [`identity`]: workload certificates and trust;
//! - [`metrics`], [`connections`], [`admin`], [`debug`]: what operators see;
//! - [`handoff`], [`drain`]: upgrades that lose no connection;
//! - [`ca_service`]: the mesh CA service, a program of its own (`mesh-agent ca serve`).

pub mod admin;
pub mod allocator;
pub mod ca_service;
pub mod cni;
pub mod connections;
pub mod debug;
pub mod drain;
pub mod explain;
pub mod handoff;
pub mod identity;
pub mod metrics;
pub mod node;
pub mod proxy;
pub mod reason;
pub mod reconciler;
pub mod sources;
pub mod state;
pub mod traces;
