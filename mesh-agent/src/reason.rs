//! Why traffic ends the way it does, as stable codes: what `debug explain`
//! predicts, and what the request log and `/connections?failed` record.

use serde::{Deserialize, Serialize};

use crate::state::policy::{Denial, DenialKind};

/// Why traffic ends the way it does: a stable code, also given by the
/// request log and `/connections` for traffic that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Reason {
    /// Every check passed.
    Allowed,
    /// The source is not enrolled in the mesh on this node: its connections
    /// are not redirected.
    NotCapturedUnmeshedSource,
    /// Loopback or unspecified destination: the pod talking to itself.
    NotCapturedLoopback,
    /// The destination port is in the source's `excludedPorts`.
    NotCapturedExcludedPort,
    /// The destination address is in the source's `excludedCidrs`.
    NotCapturedExcludedCidr,
    /// The destination is no Service and no known pod: sent on as it is.
    Passthrough,
    /// HTTPRoutes are attached and none matches (404, flag `NR`).
    NoRoute,
    /// The backend has no endpoint to send to (503, flag `UH`).
    NoHealthyEndpoint,
    /// A DENY policy matched (403, flag `RBAC`, or a reset for TCP).
    DeniedByPolicy,
    /// ALLOW policies select the destination and none matched.
    NoAllowPolicyMatched,
    /// Plaintext to a destination whose PeerAuthentication is STRICT.
    PlaintextRefusedStrict,
    /// The agent could not reach the destination (flag `UF`).
    UpstreamConnectFailed,
}

impl Reason {
    /// The reason a request-log line with Envoy `flags` ended so, when the
    /// flags tell (`-` is allowed; others are not the mesh's decision).
    pub fn from_response_flags(flags: &str) -> Option<Reason> {
        match flags {
            "-" => Some(Reason::Allowed),
            "NR" => Some(Reason::NoRoute),
            "UH" => Some(Reason::NoHealthyEndpoint),
            "RBAC" => Some(Reason::DeniedByPolicy),
            "UF" => Some(Reason::UpstreamConnectFailed),
            _ => None,
        }
    }

    /// The reason a denial gives.
    pub fn of_denial(denial: &Denial) -> Reason {
        match denial.kind {
            DenialKind::Policy => Reason::DeniedByPolicy,
            DenialKind::NoAllowMatch => Reason::NoAllowPolicyMatched,
            DenialKind::PlaintextStrict => Reason::PlaintextRefusedStrict,
        }
    }
}
