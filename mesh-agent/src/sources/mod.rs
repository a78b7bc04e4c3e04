//! Where the desired state comes from. Each source turns its input into the one
//! typed model ([`crate::state::MeshConfig`]) and hands it to the one reconciler
//! ([`crate::reconciler::Agent::apply`]); no source touches the data path itself.
//!
//! - [`file`]: a Kubernetes-shaped YAML file (VMs, development, tests).
//! - [`kube`]: the Kubernetes API, through kube-rs watchers.

pub mod file;
pub mod kube;
