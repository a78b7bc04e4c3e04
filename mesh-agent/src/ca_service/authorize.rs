//! Who may have which certificate: a pure decision over what the API server's
//! TokenReview said about the caller, what the request asks for, and which pods
//! run where. A node agent may get an identity only for a pod on its own node,
//! so a compromised node can mint nothing beyond the identities it runs.

use std::fmt;
use std::str::FromStr;

use crate::identity::Identity;

/// A Kubernetes service account, `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceAccount {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl ServiceAccount {
    /// The service account `namespace/name`.
    pub fn new(namespace: &str, name: &str) -> Self {
        ServiceAccount {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }

    /// The service account of a token's username, `system:serviceaccount:<ns>:<name>`.
    pub fn from_username(username: &str) -> Option<Self> {
        let rest = username.strip_prefix("system:serviceaccount:")?;
        let (namespace, name) = rest.split_once(':')?;
        (!namespace.is_empty() && !name.is_empty() && !name.contains(':'))
            .then(|| ServiceAccount::new(namespace, name))
    }
}

impl fmt::Display for ServiceAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl FromStr for ServiceAccount {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(ServiceAccount::new(ns, name))
            }
            _ => Err(format!("{s:?} is not <namespace>/<service account>")),
        }
    }
}

/// Who may ask for what.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The only trust domain the CA signs for.
    pub trust_domain: String,
    /// Service accounts of node agents, which may ask on behalf of pods on their node.
    pub node_agents: Vec<ServiceAccount>,
}

/// The caller, as the TokenReview described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Whose token it is.
    pub service_account: ServiceAccount,
    /// The pod the token is bound to, if it is a bound (projected) token.
    pub pod: Option<BoundPod>,
}

/// The pod a bound token was issued for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundPod {
    /// Pod name (in the service account's namespace).
    pub name: String,
    /// Pod UID: a token of a deleted pod does not match its successor.
    pub uid: String,
}

/// What the CA knows of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    /// Its UID.
    pub uid: String,
    /// The node it is scheduled on, once scheduled.
    pub node: Option<String>,
    /// Its service account.
    pub service_account: String,
}

/// The pods the CA knows of.
pub trait Pods {
    /// A running (not finished) pod.
    fn get(&self, namespace: &str, name: &str) -> Option<PodFacts>;
    /// Whether a running pod on `node` has service account `sa`.
    fn runs_on(&self, node: &str, sa: &ServiceAccount) -> bool;
}

/// What one request asks for.
#[derive(Debug, Clone, Default)]
pub struct Asked<'a> {
    /// `metadata.ImpersonatedIdentity`, when a node agent asks for a pod.
    pub impersonated: Option<&'a str>,
    /// The CSR's URI SANs.
    pub csr_uris: Vec<String>,
    /// How many SANs of other kinds (DNS, IP, e-mail) the CSR has.
    pub csr_other_names: usize,
}

/// The answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Sign a certificate for this identity.
    Sign {
        /// Whose certificate.
        identity: Identity,
        /// The node it was asked for from, when a node agent asked.
        node: Option<String>,
    },
    /// Refuse.
    Deny(Denial),
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// The gRPC status to answer with.
    pub code: DenyCode,
    /// For the log line and the caller.
    pub reason: String,
    /// The caller's node, when known.
    pub node: Option<String>,
}

/// The kinds of refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyCode {
    /// The caller may not have this identity.
    PermissionDenied,
    /// The request is malformed.
    InvalidArgument,
}

fn deny(code: DenyCode, node: Option<&str>, reason: String) -> Decision {
    Decision::Deny(Denial {
        code,
        reason,
        node: node.map(str::to_owned),
    })
}

/// Decides one request.
pub fn decide(policy: &Policy, caller: &Caller, asked: &Asked<'_>, pods: &impl Pods) -> Decision {
    use DenyCode::*;
    let own = Identity::new(
        &policy.trust_domain,
        &caller.service_account.namespace,
        &caller.service_account.name,
    );
    let requested = match asked.impersonated {
        None => own.clone(),
        Some(uri) => match uri.parse::<Identity>() {
            Ok(id) => id,
            Err(e) => return deny(InvalidArgument, None, e.to_string()),
        },
    };
    if requested.trust_domain != policy.trust_domain {
        return deny(
            PermissionDenied,
            None,
            format!(
                "{requested} is outside trust domain {}",
                policy.trust_domain
            ),
        );
    }
    let wanted = requested.to_string();
    if asked.csr_uris != [wanted.clone()] || asked.csr_other_names != 0 {
        return deny(
            PermissionDenied,
            None,
            format!(
                "the CSR asks for {:?} (and {} other names), the request for {wanted}",
                asked.csr_uris, asked.csr_other_names
            ),
        );
    }
    // A workload asking for its own identity.
    if requested == own {
        return Decision::Sign {
            identity: requested,
            node: None,
        };
    }
    if !policy.node_agents.contains(&caller.service_account) {
        return deny(
            PermissionDenied,
            None,
            format!(
                "{} is not a node agent and may ask only for its own identity",
                caller.service_account
            ),
        );
    }
    let Some(bound) = &caller.pod else {
        return deny(
            PermissionDenied,
            None,
            "the node agent's token is not bound to a pod".into(),
        );
    };
    let agent_pod = match pods.get(&caller.service_account.namespace, &bound.name) {
        Some(pod) if pod.uid == bound.uid && pod.service_account == caller.service_account.name => {
            pod
        }
        Some(_) => {
            return deny(
                PermissionDenied,
                None,
                format!(
                    "the token's pod {}/{} is not the running pod of that name",
                    caller.service_account.namespace, bound.name
                ),
            );
        }
        None => {
            return deny(
                PermissionDenied,
                None,
                format!(
                    "the token's pod {}/{} is not running",
                    caller.service_account.namespace, bound.name
                ),
            );
        }
    };
    let Some(node) = agent_pod.node.as_deref() else {
        return deny(
            PermissionDenied,
            None,
            "the node agent's pod is not scheduled".into(),
        );
    };
    let sa = ServiceAccount::new(&requested.namespace, &requested.service_account);
    if !pods.runs_on(node, &sa) {
        return deny(
            PermissionDenied,
            Some(node),
            format!("no pod with service account {sa} runs on node {node}"),
        );
    }
    Decision::Sign {
        identity: requested,
        node: Some(node.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct FakePods(HashMap<(String, String), PodFacts>);

    impl Pods for FakePods {
        fn get(&self, namespace: &str, name: &str) -> Option<PodFacts> {
            self.0.get(&(namespace.into(), name.into())).cloned()
        }
        fn runs_on(&self, node: &str, sa: &ServiceAccount) -> bool {
            self.0.iter().any(|((ns, _), p)| {
                ns == &sa.namespace
                    && p.service_account == sa.name
                    && p.node.as_deref() == Some(node)
            })
        }
    }

    fn pod(
        ns: &str,
        name: &str,
        uid: &str,
        node: Option<&str>,
        sa: &str,
    ) -> ((String, String), PodFacts) {
        (
            (ns.into(), name.into()),
            PodFacts {
                uid: uid.into(),
                node: node.map(Into::into),
                service_account: sa.into(),
            },
        )
    }

    #[test]
    fn node_agents_get_only_identities_running_on_their_node() {
        let pods = FakePods(HashMap::from([
            pod(
                "nodemesh-system",
                "agent-a",
                "uid-a",
                Some("node-a"),
                "nodemesh-agent",
            ),
            pod(
                "nodemesh-system",
                "agent-b",
                "uid-b",
                Some("node-b"),
                "nodemesh-agent",
            ),
            pod(
                "nodemesh-system",
                "agent-u",
                "uid-u",
                None,
                "nodemesh-agent",
            ),
            pod("shop", "cart-1", "uid-c", Some("node-a"), "cart"),
            pod("payments", "ledger-1", "uid-l", Some("node-b"), "ledger"),
        ]));
        let policy = Policy {
            trust_domain: "cluster.local".into(),
            node_agents: vec![ServiceAccount::new("nodemesh-system", "nodemesh-agent")],
        };
        let agent = |pod: &str, uid: &str| Caller {
            service_account: ServiceAccount::new("nodemesh-system", "nodemesh-agent"),
            pod: Some(BoundPod {
                name: pod.into(),
                uid: uid.into(),
            }),
        };
        let cart = "spiffe://cluster.local/ns/shop/sa/cart";
        let ledger = "spiffe://cluster.local/ns/payments/sa/ledger";
        let asked = |impersonated: &'static str, san: &str| Asked {
            impersonated: Some(impersonated),
            csr_uris: vec![san.to_owned()],
            csr_other_names: 0,
        };
        use DenyCode::*;
        // (caller, request, expected: Ok(node) or Err((code, reason fragment)))
        /// Signed for this node, or refused with this code and reason.
        type Expected = Result<Option<&'static str>, (DenyCode, &'static str)>;
        let cases: Vec<(Caller, Asked, Expected)> = vec![
            (
                agent("agent-a", "uid-a"),
                asked(cart, cart),
                Ok(Some("node-a")),
            ),
            (
                agent("agent-b", "uid-b"),
                asked(ledger, ledger),
                Ok(Some("node-b")),
            ),
            // The other node's workload.
            (
                agent("agent-a", "uid-a"),
                asked(ledger, ledger),
                Err((PermissionDenied, "runs on node node-a")),
            ),
            // A token of a deleted agent pod whose name was reused.
            (
                agent("agent-a", "uid-old"),
                asked(cart, cart),
                Err((PermissionDenied, "not the running pod")),
            ),
            (
                agent("agent-gone", "uid-g"),
                asked(cart, cart),
                Err((PermissionDenied, "is not running")),
            ),
            (
                agent("agent-u", "uid-u"),
                asked(cart, cart),
                Err((PermissionDenied, "not scheduled")),
            ),
            // An unbound token of the agent's account.
            (
                Caller {
                    pod: None,
                    ..agent("agent-a", "uid-a")
                },
                asked(cart, cart),
                Err((PermissionDenied, "not bound to a pod")),
            ),
            // A workload's token, impersonating another.
            (
                Caller {
                    service_account: ServiceAccount::new("shop", "cart"),
                    pod: Some(BoundPod {
                        name: "cart-1".into(),
                        uid: "uid-c".into(),
                    }),
                },
                asked(ledger, ledger),
                Err((PermissionDenied, "not a node agent")),
            ),
            // The CSR asks for another name than the request.
            (
                agent("agent-a", "uid-a"),
                asked(cart, ledger),
                Err((PermissionDenied, "the CSR asks for")),
            ),
            (
                agent("agent-a", "uid-a"),
                asked(
                    "spiffe://other.domain/ns/shop/sa/cart",
                    "spiffe://other.domain/ns/shop/sa/cart",
                ),
                Err((PermissionDenied, "outside trust domain")),
            ),
            (
                agent("agent-a", "uid-a"),
                asked("not-a-spiffe-id", "not-a-spiffe-id"),
                Err((InvalidArgument, "not a SPIFFE workload identity")),
            ),
        ];
        for (i, (caller, asked, expected)) in cases.into_iter().enumerate() {
            let decision = decide(&policy, &caller, &asked, &pods);
            match (decision, expected) {
                (Decision::Sign { identity, node }, Ok(expected_node)) => {
                    assert_eq!(
                        identity.to_string(),
                        asked.impersonated.unwrap(),
                        "case {i}"
                    );
                    assert_eq!(node.as_deref(), expected_node, "case {i}");
                }
                (Decision::Deny(d), Err((code, fragment))) => {
                    assert_eq!(d.code, code, "case {i}: {}", d.reason);
                    assert!(d.reason.contains(fragment), "case {i}: {}", d.reason);
                }
                (got, want) => panic!("case {i}: got {got:?}, want {want:?}"),
            }
        }

        // A workload may have its own identity, and only with a CSR that says so.
        let workload = Caller {
            service_account: ServiceAccount::new("shop", "cart"),
            pod: None,
        };
        let own = Asked {
            impersonated: None,
            csr_uris: vec![cart.into()],
            csr_other_names: 0,
        };
        assert!(matches!(
            decide(&policy, &workload, &own, &pods),
            Decision::Sign { .. }
        ));
        let extra_dns = Asked {
            csr_other_names: 1,
            ..own
        };
        assert!(matches!(
            decide(&policy, &workload, &extra_dns, &pods),
            Decision::Deny(_)
        ));
    }

    #[test]
    fn usernames_and_flags_parse() {
        assert_eq!(
            ServiceAccount::from_username("system:serviceaccount:ns:sa"),
            Some(ServiceAccount::new("ns", "sa"))
        );
        for bad in [
            "system:serviceaccount:ns",
            "system:node:n1",
            "alice",
            "system:serviceaccount::sa",
        ] {
            assert_eq!(ServiceAccount::from_username(bad), None, "{bad}");
        }
        assert_eq!(
            "a/b".parse::<ServiceAccount>(),
            Ok(ServiceAccount::new("a", "b"))
        );
        assert!("a".parse::<ServiceAccount>().is_err());
        assert!("a/b/c".parse::<ServiceAccount>().is_err());
    }
}
