//! One pod's outbound L7 state: what its outbound listener needs to serve
//! connections to Services, kept apart from the node-wide L7 state so that the
//! destination side (which the node-wide state also serves) never depends on it.

use std::sync::Arc;

use crate::proxy::l7::{L7, upstream};
use crate::proxy::pod::PodContext;
use crate::proxy::same_node::LocalDestinations;

/// What one pod's outbound listener needs: its context, the Services and
/// routes in force, its pooled HTTP connections to endpoints, and the pods
/// served on this node.
pub struct PodL7 {
    /// The pod.
    pub pod: Arc<PodContext>,
    /// Services, routes, settings.
    pub l7: Arc<L7>,
    /// This pod's pooled HTTP connections to endpoints.
    pub upstreams: upstream::Upstreams,
    /// Pods this agent serves: for the same-node fast path of L4 connections,
    /// and so that requests to them are served (authorized and reported for
    /// the destination too) without being parsed again.
    pub local: Arc<LocalDestinations>,
}
