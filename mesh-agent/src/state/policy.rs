//! Peer authentication and L4 authorization, in the shape of Istio's
//! `security.istio.io/v1` `PeerAuthentication` and `AuthorizationPolicy`, so
//! existing L4 policies load unchanged.
//!
//! Both decisions are pure functions of the policies, the workload and the
//! connection's attributes, kept apart from the I/O that enforces them.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::identity::Identity;
use crate::state::workload::WorkloadMeta;

/// Policies here apply to every workload in the mesh (Istio's root namespace).
pub const ROOT_NAMESPACE: &str = "istio-system";

/// Which workloads a policy applies to, within its namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadSelector {
    /// Labels a workload must all carry.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

impl WorkloadSelector {
    fn selects(&self, w: &WorkloadMeta) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| w.labels.get(k) == Some(v))
    }
}

/// Whether plaintext from outside the mesh is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Inherit from the enclosing scope.
    Unset,
    /// Only mutual TLS through the tunnel.
    Strict,
    /// Plaintext is served too, and labelled as such.
    Permissive,
    /// Treated like `PERMISSIVE`: the agent never needs mTLS on inbound then.
    Disable,
}

/// A `PeerAuthentication` document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerAuthentication {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`; [`ROOT_NAMESPACE`] makes it mesh-wide.
    pub namespace: String,
    /// `spec.selector`; none: the whole namespace.
    pub selector: Option<WorkloadSelector>,
    /// `spec.mtls.mode`.
    pub mode: MtlsMode,
}

/// Raw `spec` of a PeerAuthentication, parsed strictly.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawPeerAuthenticationSpec {
    #[serde(default)]
    selector: Option<WorkloadSelector>,
    #[serde(default)]
    mtls: Option<RawMtls>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMtls {
    #[serde(default = "unset")]
    mode: MtlsMode,
}

fn unset() -> MtlsMode {
    MtlsMode::Unset
}

impl PeerAuthentication {
    pub(crate) fn from_raw(
        name: String,
        namespace: String,
        raw: RawPeerAuthenticationSpec,
    ) -> Self {
        PeerAuthentication {
            name,
            namespace,
            selector: raw.selector,
            mode: raw.mtls.map(|m| m.mode).unwrap_or(MtlsMode::Unset),
        }
    }
}

/// The effective inbound mode of `w`: the most specific policy that sets a mode
/// wins (workload selector, then namespace, then mesh-wide); default PERMISSIVE.
pub fn effective_mtls_mode(w: &WorkloadMeta, policies: &[PeerAuthentication]) -> MtlsMode {
    let set = |p: &&PeerAuthentication| p.mode != MtlsMode::Unset;
    let workload = policies.iter().filter(set).find(|p| {
        *p.namespace == *w.namespace && p.selector.as_ref().is_some_and(|s| s.selects(w))
    });
    let namespace = || {
        policies
            .iter()
            .filter(set)
            .find(|p| *p.namespace == *w.namespace && p.selector.is_none())
    };
    let mesh = || {
        policies
            .iter()
            .filter(set)
            .find(|p| p.namespace == ROOT_NAMESPACE && p.selector.is_none())
    };
    match workload.or_else(namespace).or_else(mesh).map(|p| p.mode) {
        Some(MtlsMode::Strict) => MtlsMode::Strict,
        _ => MtlsMode::Permissive,
    }
}

/// `ALLOW` or `DENY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    /// Traffic matching a rule is allowed; once any ALLOW policy selects a
    /// workload, traffic matching none is denied.
    Allow,
    /// Traffic matching a rule is denied, whatever else allows it.
    Deny,
}

/// An `AuthorizationPolicy` document (its L4 subset).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuthorizationPolicy {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`; [`ROOT_NAMESPACE`] makes it mesh-wide.
    pub namespace: String,
    /// `spec.selector`; none: the whole namespace.
    pub selector: Option<WorkloadSelector>,
    /// `spec.action`.
    pub action: Action,
    /// `spec.rules`; an ALLOW policy without rules allows nothing.
    pub rules: Vec<Rule>,
}

/// One rule: all present parts must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Any of these sources.
    #[serde(default)]
    pub from: Vec<From>,
    /// Any of these operations.
    #[serde(default)]
    pub to: Vec<To>,
}

/// `rules[].from[]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct From {
    /// The source.
    pub source: Source,
}

/// `rules[].to[]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct To {
    /// The operation.
    pub operation: Operation,
}

/// Who the peer is. Principals and namespaces come only from an mTLS certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Source {
    /// Peer identities, Istio style without `spiffe://` (`cluster.local/ns/a/sa/b`);
    /// `*` wildcards as prefix or suffix.
    #[serde(default)]
    pub principals: Vec<String>,
    /// Identities that must not match.
    #[serde(default)]
    pub not_principals: Vec<String>,
    /// Peer namespaces (from the identity).
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Namespaces that must not match.
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    /// Peer source addresses.
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    /// Source addresses that must not match.
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
}

/// What is being reached. Only ports exist at L4.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Operation {
    /// Destination ports (strings, as in Istio).
    #[serde(default)]
    pub ports: Vec<String>,
    /// Ports that must not match.
    #[serde(default)]
    pub not_ports: Vec<String>,
}

/// Raw `spec` of an AuthorizationPolicy, parsed strictly.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAuthorizationPolicySpec {
    #[serde(default)]
    selector: Option<WorkloadSelector>,
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    rules: Option<Vec<Rule>>,
}

impl AuthorizationPolicy {
    /// Checks the raw document; errors are `(field, message)`.
    pub(crate) fn from_raw(
        name: String,
        namespace: String,
        raw: RawAuthorizationPolicySpec,
    ) -> Result<Self, (String, String)> {
        let action = match raw.action.as_deref().unwrap_or("ALLOW") {
            "ALLOW" => Action::Allow,
            "DENY" => Action::Deny,
            other => {
                return Err((
                    "spec.action".into(),
                    format!("{other:?} is not supported (ALLOW or DENY)"),
                ));
            }
        };
        let rules = raw.rules.unwrap_or_default();
        for (i, rule) in rules.iter().enumerate() {
            for (j, from) in rule.from.iter().enumerate() {
                let s = &from.source;
                for (k, block) in s.ip_blocks.iter().chain(&s.not_ip_blocks).enumerate() {
                    if parse_block(block).is_none() {
                        return Err((
                            format!("spec.rules[{i}].from[{j}].source.ipBlocks[{k}]"),
                            format!("{block:?} is not an IP address or CIDR"),
                        ));
                    }
                }
            }
            for (j, to) in rule.to.iter().enumerate() {
                let o = &to.operation;
                for port in o.ports.iter().chain(&o.not_ports) {
                    if port.parse::<u16>().is_err() {
                        return Err((
                            format!("spec.rules[{i}].to[{j}].operation.ports"),
                            format!("{port:?} is not a port number"),
                        ));
                    }
                }
            }
        }
        Ok(AuthorizationPolicy {
            name,
            namespace,
            selector: raw.selector,
            action,
            rules,
        })
    }

    fn applies_to(&self, w: &WorkloadMeta) -> bool {
        let in_scope = *self.namespace == *w.namespace || self.namespace == ROOT_NAMESPACE;
        in_scope && self.selector.as_ref().is_none_or(|s| s.selects(w))
    }

    fn matches(&self, c: &Connection) -> bool {
        self.rules.iter().any(|r| r.matches(c))
    }
}

/// What is known of an inbound connection when it is authorized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    /// The peer's proven identity; `None` for plaintext.
    pub source: Option<Identity>,
    /// The peer's address.
    pub source_ip: IpAddr,
    /// The destination port on the workload.
    pub destination_port: u16,
}

impl Rule {
    fn matches(&self, c: &Connection) -> bool {
        (self.from.is_empty() || self.from.iter().any(|f| f.source.matches(c)))
            && (self.to.is_empty() || self.to.iter().any(|t| t.operation.matches(c)))
    }
}

impl Source {
    fn matches(&self, c: &Connection) -> bool {
        // Istio writes principals without the scheme.
        let principal = c
            .source
            .as_ref()
            .map(|id| id.to_string().trim_start_matches("spiffe://").to_owned());
        let namespace = c.source.as_ref().map(|id| id.namespace.clone());
        let any = |patterns: &[String], value: &Option<String>| {
            value
                .as_deref()
                .is_some_and(|v| patterns.iter().any(|p| glob(p, v)))
        };
        let in_blocks = |blocks: &[String]| {
            blocks
                .iter()
                .filter_map(|b| parse_block(b))
                .any(|net| net.contains(&c.source_ip))
        };
        (self.principals.is_empty() || any(&self.principals, &principal))
            && !any(&self.not_principals, &principal)
            && (self.namespaces.is_empty() || any(&self.namespaces, &namespace))
            && !any(&self.not_namespaces, &namespace)
            && (self.ip_blocks.is_empty() || in_blocks(&self.ip_blocks))
            && !in_blocks(&self.not_ip_blocks)
    }
}

impl Operation {
    fn matches(&self, c: &Connection) -> bool {
        let port = c.destination_port.to_string();
        (self.ports.is_empty() || self.ports.contains(&port)) && !self.not_ports.contains(&port)
    }
}

fn glob(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        true
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        value.ends_with(suffix)
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        value.starts_with(prefix)
    } else {
        pattern == value
    }
}

fn parse_block(block: &str) -> Option<IpNet> {
    block
        .parse::<IpNet>()
        .ok()
        .or_else(|| block.parse::<IpAddr>().ok().map(IpNet::from))
}

/// The authorization decision for one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Let it through.
    Allow,
    /// Refuse it, naming the policy that decided (`namespace/name`) or why none allowed it.
    Deny(String),
}

/// Istio's order: any matching DENY denies; with no ALLOW policy for the workload
/// everything else is allowed; otherwise a matching ALLOW is needed.
pub fn authorize(w: &WorkloadMeta, policies: &[AuthorizationPolicy], c: &Connection) -> Decision {
    let applicable: Vec<&AuthorizationPolicy> =
        policies.iter().filter(|p| p.applies_to(w)).collect();
    if let Some(p) = applicable
        .iter()
        .find(|p| p.action == Action::Deny && p.matches(c))
    {
        return Decision::Deny(format!("denied by {}/{}", p.namespace, p.name));
    }
    let allows: Vec<&&AuthorizationPolicy> = applicable
        .iter()
        .filter(|p| p.action == Action::Allow)
        .collect();
    if allows.is_empty() || allows.iter().any(|p| p.matches(c)) {
        Decision::Allow
    } else {
        Decision::Deny("no ALLOW policy matched".into())
    }
}

/// The policies in force, swapped whole on every config apply.
#[derive(Debug, Default)]
pub struct PolicyStore {
    current: std::sync::RwLock<std::sync::Arc<Policies>>,
}

/// One generation of policies.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Policies {
    /// `PeerAuthentication` documents.
    pub peer_authentications: Vec<PeerAuthentication>,
    /// `AuthorizationPolicy` documents.
    pub authorization_policies: Vec<AuthorizationPolicy>,
}

impl PolicyStore {
    /// The policies in force now.
    pub fn get(&self) -> std::sync::Arc<Policies> {
        self.current.read().expect("policy lock").clone()
    }

    /// Replaces the policies; returns whether anything changed.
    pub fn replace(&self, policies: Policies) -> bool {
        let mut current = self.current.write().expect("policy lock");
        if **current == policies {
            return false;
        }
        *current = std::sync::Arc::new(policies);
        true
    }
}

impl Policies {
    /// Whether an inbound connection to `w` may continue under these policies.
    pub fn decide(&self, w: &WorkloadMeta, c: &Connection) -> Decision {
        if c.source.is_none()
            && effective_mtls_mode(w, &self.peer_authentications) == MtlsMode::Strict
        {
            return Decision::Deny("plaintext refused: PeerAuthentication mode is STRICT".into());
        }
        authorize(w, &self.authorization_policies, c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(ns: &str, app: &str) -> WorkloadMeta {
        WorkloadMeta {
            name: format!("{app}-0").into(),
            namespace: ns.into(),
            service_account: app.into(),
            labels: std::sync::Arc::new([("app".to_owned(), app.to_owned())].into()),
            workload_name: app.into(),
            meshed: true,
            trust_domain: "cluster.local".into(),
        }
    }

    fn peer(ns: &str, sa: &str, ip: &str, port: u16) -> Connection {
        Connection {
            source: Some(Identity::new("cluster.local", ns, sa)),
            source_ip: ip.parse().unwrap(),
            destination_port: port,
        }
    }

    fn plaintext(ip: &str, port: u16) -> Connection {
        Connection {
            source: None,
            source_ip: ip.parse().unwrap(),
            destination_port: port,
        }
    }

    fn policy(
        ns: &str,
        action: Action,
        app: Option<&str>,
        rules: Vec<Rule>,
    ) -> AuthorizationPolicy {
        AuthorizationPolicy {
            name: "p".into(),
            namespace: ns.into(),
            selector: app.map(|a| WorkloadSelector {
                match_labels: [("app".to_owned(), a.to_owned())].into(),
            }),
            action,
            rules,
        }
    }

    fn from(source: Source) -> Rule {
        Rule {
            from: vec![From { source }],
            to: vec![],
        }
    }

    #[test]
    fn authorization_follows_istio_order() {
        let api = workload("backend", "api");
        let from_shop = from(Source {
            namespaces: vec!["shop".into()],
            ..Source::default()
        });
        let allow_shop = policy(
            "backend",
            Action::Allow,
            Some("api"),
            vec![from_shop.clone()],
        );
        let deny_port_9 = policy(
            "backend",
            Action::Deny,
            None,
            vec![Rule {
                from: vec![],
                to: vec![To {
                    operation: Operation {
                        ports: vec!["9".into()],
                        ..Operation::default()
                    },
                }],
            }],
        );
        let deny_block = policy(
            ROOT_NAMESPACE,
            Action::Deny,
            None,
            vec![from(Source {
                ip_blocks: vec!["10.9.0.0/16".into()],
                ..Source::default()
            })],
        );
        let allow_principal = policy(
            "backend",
            Action::Allow,
            None,
            vec![from(Source {
                principals: vec!["cluster.local/ns/ops/sa/*".into()],
                ..Source::default()
            })],
        );
        let deny_all_allow = policy("backend", Action::Allow, None, vec![]);
        let other_ns = policy("frontend", Action::Allow, None, vec![]);
        let allow = Decision::Allow;
        let deny = |why: &str| Decision::Deny(why.into());
        let none = "no ALLOW policy matched";
        let cases: Vec<(&str, Vec<AuthorizationPolicy>, Connection, Decision)> = vec![
            (
                "no policy allows",
                vec![],
                peer("x", "y", "10.0.0.1", 80),
                allow.clone(),
            ),
            (
                "other namespace's policy is ignored",
                vec![other_ns],
                peer("x", "y", "10.0.0.1", 80),
                allow.clone(),
            ),
            (
                "allow by namespace",
                vec![allow_shop.clone()],
                peer("shop", "cart", "10.0.0.1", 80),
                allow.clone(),
            ),
            (
                "others are denied once an ALLOW exists",
                vec![allow_shop.clone()],
                peer("web", "ui", "10.0.0.1", 80),
                deny(none),
            ),
            (
                "plaintext has no namespace",
                vec![allow_shop.clone()],
                plaintext("10.0.0.1", 80),
                deny(none),
            ),
            (
                "deny wins over allow",
                vec![allow_shop.clone(), deny_port_9.clone()],
                peer("shop", "cart", "10.0.0.1", 9),
                deny("denied by backend/p"),
            ),
            (
                "deny does not match other ports",
                vec![allow_shop.clone(), deny_port_9],
                peer("shop", "cart", "10.0.0.1", 80),
                allow.clone(),
            ),
            (
                "mesh-wide deny by ip block",
                vec![deny_block.clone()],
                plaintext("10.9.3.4", 80),
                deny("denied by istio-system/p"),
            ),
            (
                "ip block miss",
                vec![deny_block],
                plaintext("10.8.3.4", 80),
                allow.clone(),
            ),
            (
                "principal wildcard",
                vec![allow_principal.clone()],
                peer("ops", "anything", "10.0.0.1", 80),
                allow.clone(),
            ),
            (
                "principal wildcard miss",
                vec![allow_principal],
                peer("dev", "anything", "10.0.0.1", 80),
                deny(none),
            ),
            (
                "ALLOW without rules allows nothing",
                vec![deny_all_allow],
                peer("shop", "cart", "10.0.0.1", 80),
                deny(none),
            ),
        ];
        for (name, policies, conn, expected) in cases {
            assert_eq!(authorize(&api, &policies, &conn), expected, "{name}");
        }
    }

    #[test]
    fn peer_authentication_most_specific_wins() {
        let w = workload("backend", "api");
        let pa = |ns: &str, app: Option<&str>, mode| PeerAuthentication {
            name: "pa".into(),
            namespace: ns.into(),
            selector: app.map(|a| WorkloadSelector {
                match_labels: [("app".to_owned(), a.to_owned())].into(),
            }),
            mode,
        };
        use MtlsMode::*;
        let cases = vec![
            ("default", vec![], Permissive),
            (
                "mesh strict",
                vec![pa(ROOT_NAMESPACE, None, Strict)],
                Strict,
            ),
            (
                "namespace beats mesh",
                vec![
                    pa(ROOT_NAMESPACE, None, Strict),
                    pa("backend", None, Permissive),
                ],
                Permissive,
            ),
            (
                "workload beats namespace",
                vec![
                    pa("backend", None, Permissive),
                    pa("backend", Some("api"), Strict),
                ],
                Strict,
            ),
            (
                "unset inherits",
                vec![
                    pa("backend", Some("api"), Unset),
                    pa("backend", None, Strict),
                ],
                Strict,
            ),
            (
                "other selector ignored",
                vec![pa("backend", Some("web"), Strict)],
                Permissive,
            ),
            (
                "other namespace ignored",
                vec![pa("shop", None, Strict)],
                Permissive,
            ),
        ];
        for (name, policies, expected) in cases {
            assert_eq!(effective_mtls_mode(&w, &policies), expected, "{name}");
        }
    }
}
