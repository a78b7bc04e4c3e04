//! The nodemesh node agent: one per node, replacing every sidecar on it.
//!
//! Data path: the kernel (`capture`) redirects an enrolled pod's connects to an
//! in-pod listener (`netns`, `outbound`), which learns the original destination
//! and source workload from kernel maps and relays to it. `agent` reconciles the
//! config into that state; `metrics`, `connections` and `admin` make it visible.

pub mod admin;
pub mod agent;
pub mod capture;
pub mod cgroup;
pub mod config;
pub mod connections;
pub mod debug;
pub mod identity;
pub mod inbound;
pub mod l7;
pub mod metrics;
pub mod netns;
pub mod outbound;
pub mod policy;
pub mod relay;
pub mod service;
pub mod sources;
pub mod tunnel;
pub mod workload;
