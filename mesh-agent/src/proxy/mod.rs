//! The data path: connections captured from pods (outbound), connections to pods
//! (inbound, plaintext or through the tunnel), the HBONE tunnel itself, byte
//! relaying, the same-node fast path in the kernel, and request-level (L7) handling for Service VIPs. It reads the views
//! the reconciler publishes and never changes desired state.

pub mod inbound;
pub mod l7;
pub mod limits;
pub mod outbound;
pub mod pod;
pub mod relay;
pub mod same_node;
pub mod tunnel;
