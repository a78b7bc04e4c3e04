//! Peer authentication and authorization, in the shape of Istio's
//! `security.istio.io/v1` `PeerAuthentication` and `AuthorizationPolicy`, so
//! existing policies load unchanged.
//!
//! Both decisions are pure functions of the policies, the workload and the
//! connection's (and, for rules about HTTP, the request's) attributes, kept
//! apart from the I/O that enforces them. A rule about HTTP cannot be decided
//! from a connection alone: such a connection is let through to be decided
//! request by request ([`Decision::PerRequest`]), and one that turns out not
//! to speak HTTP is decided as Istio does, failing closed ([`Policies::decide_opaque`]).

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

/// `ALLOW`, `DENY` or `AUDIT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    /// Traffic matching a rule is allowed; once any ALLOW policy selects a
    /// workload, traffic matching none is denied.
    Allow,
    /// Traffic matching a rule is denied, whatever else allows it.
    Deny,
    /// Traffic matching a rule is logged; the decision is left to the others.
    Audit,
}

/// An `AuthorizationPolicy` document (all but its JWT attributes).
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
    /// All of these conditions.
    #[serde(default)]
    pub when: Vec<Condition>,
}

/// `rules[].when[]`: one attribute (`key`) and the values it must (or must not) have.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Condition {
    /// `request.headers[<name>]`, `source.ip`, `remote.ip`, `source.namespace`,
    /// `source.principal`, `destination.ip` or `destination.port`.
    pub key: String,
    /// Any of these matches (Istio's exact, `prefix*`, `*suffix` and `*`).
    #[serde(default)]
    pub values: Vec<String>,
    /// None of these may match.
    #[serde(default)]
    pub not_values: Vec<String>,
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

/// What is being reached: a port, and for HTTP the host, method and path.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Operation {
    /// Request hosts (`Host` or `:authority`), matched without case.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Hosts that must not match.
    #[serde(default)]
    pub not_hosts: Vec<String>,
    /// Destination ports (strings, as in Istio).
    #[serde(default)]
    pub ports: Vec<String>,
    /// Ports that must not match.
    #[serde(default)]
    pub not_ports: Vec<String>,
    /// Request methods.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Methods that must not match.
    #[serde(default)]
    pub not_methods: Vec<String>,
    /// Request paths, without the query.
    #[serde(default)]
    pub paths: Vec<String>,
    /// Paths that must not match.
    #[serde(default)]
    pub not_paths: Vec<String>,
}

impl Operation {
    /// Whether any of its fields needs an HTTP request to be decided.
    fn is_http(&self) -> bool {
        [
            &self.hosts,
            &self.not_hosts,
            &self.methods,
            &self.not_methods,
            &self.paths,
            &self.not_paths,
        ]
        .iter()
        .any(|v| !v.is_empty())
    }
}

/// The `when` keys that need no JWT; `request.headers[...]` is the only one
/// about HTTP.
const CONDITION_KEYS: [&str; 6] = [
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
];

/// The header a `request.headers[<name>]` key names.
fn header_key(key: &str) -> Option<&str> {
    key.strip_prefix("request.headers[")
        .and_then(|k| k.strip_suffix(']'))
        .filter(|k| http::HeaderName::from_bytes(k.as_bytes()).is_ok())
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
            "AUDIT" => Action::Audit,
            other => {
                return Err((
                    "spec.action".into(),
                    format!("{other:?} is not supported (ALLOW, DENY or AUDIT)"),
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
            for (j, c) in rule.when.iter().enumerate() {
                let field = format!("spec.rules[{i}].when[{j}]");
                if header_key(&c.key).is_none() && !CONDITION_KEYS.contains(&c.key.as_str()) {
                    let why = if c.key.starts_with("request.auth.") {
                        "needs a JWT, which the mesh does not check".to_owned()
                    } else {
                        format!(
                            "is not supported (request.headers[<name>], {})",
                            CONDITION_KEYS.join(", ")
                        )
                    };
                    return Err((format!("{field}.key"), format!("{:?} {why}", c.key)));
                }
                if c.values.is_empty() && c.not_values.is_empty() {
                    return Err((field, "needs values or notValues".into()));
                }
                let ip_key = matches!(c.key.as_str(), "source.ip" | "remote.ip" | "destination.ip");
                for v in c.values.iter().chain(&c.not_values) {
                    if ip_key && parse_block(v).is_none() {
                        return Err((
                            format!("{field}.values"),
                            format!("{v:?} is not an IP address or CIDR"),
                        ));
                    }
                    if c.key == "destination.port" && v.parse::<u16>().is_err() {
                        return Err((
                            format!("{field}.values"),
                            format!("{v:?} is not a port number"),
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

    fn matches(&self, c: &Connection, r: Option<&Request<'_>>) -> Match {
        Match::any(self.rules.iter().map(|rule| rule.matches(c, r)))
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether any rule needs an HTTP request to be decided.
    pub fn is_http(&self) -> bool {
        self.rules.iter().any(|r| {
            r.to.iter().any(|t| t.operation.is_http())
                || r.when.iter().any(|c| header_key(&c.key).is_some())
        })
    }
}

/// What is known of an inbound connection when it is authorized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    /// The peer's proven identity; `None` for plaintext.
    pub source: Option<Identity>,
    /// The peer's address.
    pub source_ip: IpAddr,
    /// The destination address on the workload.
    pub destination_ip: IpAddr,
    /// The destination port on the workload.
    pub destination_port: u16,
}

/// What is known of one HTTP request when it is authorized.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// `GET`, `POST`...
    pub method: &'a str,
    /// The path, without the query.
    pub path: &'a str,
    /// `Host` or `:authority`.
    pub host: &'a str,
    /// The request headers.
    pub headers: &'a http::HeaderMap,
}

/// Whether a rule matches, when part of it may be about a request not yet seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Match {
    Yes,
    No,
    /// Only the request can tell.
    Unknown,
}

impl Match {
    fn of(b: bool) -> Self {
        if b { Match::Yes } else { Match::No }
    }

    /// Any of them: yes if one is, unknown if one might be.
    fn any(items: impl Iterator<Item = Match>) -> Self {
        let mut out = Match::No;
        for m in items {
            match m {
                Match::Yes => return Match::Yes,
                Match::Unknown => out = Match::Unknown,
                Match::No => {}
            }
        }
        out
    }

    /// All of them: no if one is not, unknown if one might not be.
    fn all(items: impl Iterator<Item = Match>) -> Self {
        let mut out = Match::Yes;
        for m in items {
            match m {
                Match::No => return Match::No,
                Match::Unknown => out = Match::Unknown,
                Match::Yes => {}
            }
        }
        out
    }
}

impl Rule {
    fn matches(&self, c: &Connection, r: Option<&Request<'_>>) -> Match {
        let from = if self.from.is_empty() {
            Match::Yes
        } else {
            Match::of(self.from.iter().any(|f| f.source.matches(c)))
        };
        let to = if self.to.is_empty() {
            Match::Yes
        } else {
            Match::any(self.to.iter().map(|t| t.operation.matches(c, r)))
        };
        let when = Match::all(self.when.iter().map(|w| w.matches(c, r)));
        Match::all([from, to, when].into_iter())
    }
}

/// Istio writes principals without the scheme.
fn principal_of(c: &Connection) -> Option<String> {
    c.source
        .as_ref()
        .map(|id| id.to_string().trim_start_matches("spiffe://").to_owned())
}

/// Whether `value` matches any of `patterns` (a missing value matches none).
fn any_glob(patterns: &[String], value: Option<&str>) -> bool {
    value.is_some_and(|v| patterns.iter().any(|p| glob(p, v)))
}

fn in_blocks(blocks: &[String], ip: IpAddr) -> bool {
    blocks
        .iter()
        .filter_map(|b| parse_block(b))
        .any(|net| net.contains(&ip))
}

/// `values` (any, when given) and `notValues` (none) of one attribute.
fn values_match(values: &[String], not_values: &[String], hit: impl Fn(&[String]) -> bool) -> bool {
    (values.is_empty() || hit(values)) && !hit(not_values)
}

impl Source {
    fn matches(&self, c: &Connection) -> bool {
        let principal = principal_of(c);
        let namespace = c.source.as_ref().map(|id| id.namespace.clone());
        values_match(&self.principals, &self.not_principals, |p| {
            any_glob(p, principal.as_deref())
        }) && values_match(&self.namespaces, &self.not_namespaces, |p| {
            any_glob(p, namespace.as_deref())
        }) && values_match(&self.ip_blocks, &self.not_ip_blocks, |b| {
            in_blocks(b, c.source_ip)
        })
    }
}

impl Operation {
    fn matches(&self, c: &Connection, r: Option<&Request<'_>>) -> Match {
        let port = c.destination_port.to_string();
        let ports = values_match(&self.ports, &self.not_ports, |p| p.contains(&port));
        if !ports {
            return Match::No;
        }
        if !self.is_http() {
            return Match::Yes;
        }
        let Some(r) = r else {
            return Match::Unknown;
        };
        let host = r.host.to_ascii_lowercase();
        // `hosts` match the authority as sent, and without its port.
        let bare = host
            .rsplit_once(':')
            .filter(|(_, p)| p.parse::<u16>().is_ok())
            .map_or(host.as_str(), |(h, _)| h);
        let host_hit = |patterns: &[String]| {
            patterns.iter().any(|p| {
                let p = p.to_ascii_lowercase();
                glob(&p, &host) || glob(&p, bare)
            })
        };
        Match::of(
            values_match(&self.hosts, &self.not_hosts, host_hit)
                && values_match(&self.methods, &self.not_methods, |m| {
                    m.iter().any(|m| m == r.method)
                })
                && values_match(&self.paths, &self.not_paths, |p| any_glob(p, Some(r.path))),
        )
    }
}

impl Condition {
    fn matches(&self, c: &Connection, r: Option<&Request<'_>>) -> Match {
        let (values, not) = (&self.values, &self.not_values);
        if let Some(name) = header_key(&self.key) {
            let Some(r) = r else {
                return Match::Unknown;
            };
            let header = r.headers.get(name).and_then(|v| v.to_str().ok());
            return Match::of(values_match(values, not, |p| any_glob(p, header)));
        }
        let hit = match self.key.as_str() {
            "source.ip" | "remote.ip" => values_match(values, not, |b| in_blocks(b, c.source_ip)),
            "destination.ip" => values_match(values, not, |b| in_blocks(b, c.destination_ip)),
            "destination.port" => {
                let port = c.destination_port.to_string();
                values_match(values, not, |p| p.contains(&port))
            }
            "source.principal" => {
                let principal = principal_of(c);
                values_match(values, not, |p| any_glob(p, principal.as_deref()))
            }
            "source.namespace" => {
                let namespace = c.source.as_ref().map(|id| id.namespace.as_str());
                values_match(values, not, |p| any_glob(p, namespace))
            }
            // Rejected when the policy is loaded.
            _ => false,
        };
        Match::of(hit)
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

/// The authorization decision for one connection or request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Let it through.
    Allow,
    /// Refuse it.
    Deny(Denial),
    /// Let the connection through, and decide each of its requests: a rule
    /// about HTTP may still allow or deny them.
    PerRequest,
}

/// Why traffic was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// The policy that decided (`namespace/name`); `None` when no ALLOW
    /// policy matched or peer authentication refused.
    pub policy: Option<String>,
    /// Which rule refused it.
    pub kind: DenialKind,
    /// Said in logs and by `debug explain`.
    pub reason: String,
}

/// Which rule refused traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenialKind {
    /// A DENY policy matched (named in [`Denial::policy`]).
    Policy,
    /// ALLOW policies select the workload and none matched.
    NoAllowMatch,
    /// Plaintext to a workload whose PeerAuthentication is STRICT.
    PlaintextStrict,
}

impl std::fmt::Display for Denial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

impl Decision {
    fn deny(policy: Option<String>, reason: String) -> Self {
        let kind = match policy {
            Some(_) => DenialKind::Policy,
            None => DenialKind::NoAllowMatch,
        };
        Decision::Deny(Denial {
            policy,
            kind,
            reason,
        })
    }
}

/// What a decision knows of the traffic.
#[derive(Debug, Clone, Copy)]
enum Facts<'a> {
    /// A new connection: rules about HTTP are left to its requests.
    Connection,
    /// A connection that does not speak HTTP: rules about HTTP can never be
    /// met, so an ALLOW rule with them allows nothing and a DENY rule with
    /// them denies (Istio's fail-closed reading).
    Opaque,
    /// One request.
    Request(&'a Request<'a>),
}

/// [`decide_rules`], except that where rules about HTTP apply, a connection
/// refused outright is still let through: each of its requests gets the 403
/// any other Istio proxy would answer, and one that is not HTTP is reset.
fn decide_with(
    w: &WorkloadMeta,
    policies: &[AuthorizationPolicy],
    c: &Connection,
    facts: Facts<'_>,
) -> Decision {
    match decide_rules(w, policies, c, facts) {
        Decision::Deny(_)
            if matches!(facts, Facts::Connection)
                && policies.iter().any(|p| p.applies_to(w) && p.is_http()) =>
        {
            Decision::PerRequest
        }
        decision => decision,
    }
}

/// Istio's order: any matching DENY denies; with no ALLOW policy for the workload
/// everything else is allowed; otherwise a matching ALLOW is needed.
fn decide_rules(
    w: &WorkloadMeta,
    policies: &[AuthorizationPolicy],
    c: &Connection,
    facts: Facts<'_>,
) -> Decision {
    let request = match facts {
        Facts::Request(r) => Some(r),
        _ => None,
    };
    let applicable: Vec<&AuthorizationPolicy> =
        policies.iter().filter(|p| p.applies_to(w)).collect();
    let mut pending = false;
    for p in applicable.iter().filter(|p| p.action == Action::Deny) {
        match (p.matches(c, request), facts) {
            (Match::Yes, _) | (Match::Unknown, Facts::Opaque) => {
                let reason = match facts {
                    Facts::Opaque if p.is_http() => format!(
                        "denied by {}, whose rules about HTTP a connection that does not speak it cannot meet",
                        p.key()
                    ),
                    _ => format!("denied by {}", p.key()),
                };
                return Decision::deny(Some(p.key()), reason);
            }
            (Match::Unknown, _) => pending = true,
            (Match::No, _) => {}
        }
    }
    let allows: Vec<&&AuthorizationPolicy> = applicable
        .iter()
        .filter(|p| p.action == Action::Allow)
        .collect();
    let allowed = if allows.is_empty() {
        Match::Yes
    } else {
        Match::any(allows.iter().map(|p| p.matches(c, request)))
    };
    match (allowed, facts) {
        (Match::Unknown, Facts::Opaque) => Decision::deny(
            None,
            "no ALLOW policy matched: their rules about HTTP cannot match a connection that does not speak it".into(),
        ),
        (Match::No, _) => Decision::deny(None, "no ALLOW policy matched".into()),
        (Match::Unknown, _) => Decision::PerRequest,
        (Match::Yes, _) if pending => Decision::PerRequest,
        (Match::Yes, _) => Decision::Allow,
    }
}

/// The decision for a new connection (see [`Decision`]).
pub fn authorize(w: &WorkloadMeta, policies: &[AuthorizationPolicy], c: &Connection) -> Decision {
    decide_with(w, policies, c, Facts::Connection)
}

/// The AUDIT policies a request (or, with `None`, a connection) matches.
pub fn audits<'p>(
    w: &WorkloadMeta,
    policies: &'p [AuthorizationPolicy],
    c: &Connection,
    r: Option<&Request<'_>>,
) -> Vec<&'p AuthorizationPolicy> {
    policies
        .iter()
        .filter(|p| p.action == Action::Audit && p.applies_to(w))
        .filter(|p| p.matches(c, r) == Match::Yes)
        .collect()
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

/// How one AuthorizationPolicy reads a connection or request: a row of
/// `debug explain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyVerdict {
    /// `namespace/name`.
    pub policy: String,
    /// Its action.
    pub action: Action,
    /// `yes`, `no`, or `unknown` (its rules are about requests not described).
    pub matched: &'static str,
}

impl Policies {
    /// Every AuthorizationPolicy that applies to `w`, in evaluation order
    /// (DENY, ALLOW, AUDIT), and whether it matches `c` and, if given, `r`.
    pub fn explain(
        &self,
        w: &WorkloadMeta,
        c: &Connection,
        r: Option<&Request<'_>>,
    ) -> Vec<PolicyVerdict> {
        let mut rows: Vec<PolicyVerdict> = self
            .authorization_policies
            .iter()
            .filter(|p| p.applies_to(w))
            .map(|p| PolicyVerdict {
                policy: p.key(),
                action: p.action,
                matched: match p.matches(c, r) {
                    Match::Yes => "yes",
                    Match::No => "no",
                    Match::Unknown => "unknown",
                },
            })
            .collect();
        let order = |a: Action| match a {
            Action::Deny => 0,
            Action::Allow => 1,
            Action::Audit => 2,
        };
        rows.sort_by_key(|row| order(row.action));
        rows
    }

    /// `w`'s PeerAuthentication mode in force (PERMISSIVE unless set).
    pub fn mtls_mode(&self, w: &WorkloadMeta) -> MtlsMode {
        effective_mtls_mode(w, &self.peer_authentications)
    }

    /// Whether an inbound connection to `w` may continue under these policies.
    pub fn decide(&self, w: &WorkloadMeta, c: &Connection) -> Decision {
        self.decide_facts(w, c, Facts::Connection)
    }

    /// The decision for a connection to `w` known not to speak HTTP.
    pub fn decide_opaque(&self, w: &WorkloadMeta, c: &Connection) -> Decision {
        self.decide_facts(w, c, Facts::Opaque)
    }

    /// The decision for one request on a connection to `w`.
    pub fn decide_request(&self, w: &WorkloadMeta, c: &Connection, r: &Request<'_>) -> Decision {
        self.decide_facts(w, c, Facts::Request(r))
    }

    fn decide_facts(&self, w: &WorkloadMeta, c: &Connection, facts: Facts<'_>) -> Decision {
        if c.source.is_none()
            && effective_mtls_mode(w, &self.peer_authentications) == MtlsMode::Strict
        {
            return Decision::Deny(Denial {
                policy: None,
                kind: DenialKind::PlaintextStrict,
                reason: "plaintext refused: PeerAuthentication mode is STRICT".into(),
            });
        }
        decide_with(w, &self.authorization_policies, c, facts)
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
            destination_ip: "10.1.0.5".parse().unwrap(),
            destination_port: port,
        }
    }

    fn plaintext(ip: &str, port: u16) -> Connection {
        Connection {
            source: None,
            source_ip: ip.parse().unwrap(),
            destination_ip: "10.1.0.5".parse().unwrap(),
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
            ..Rule::default()
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
                to: vec![To {
                    operation: Operation {
                        ports: vec!["9".into()],
                        ..Operation::default()
                    },
                }],
                ..Rule::default()
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
        let deny = |why: &str| {
            let policy = why.strip_prefix("denied by ").map(str::to_owned);
            let kind = match (&policy, why.starts_with("plaintext refused")) {
                (Some(_), _) => DenialKind::Policy,
                (None, true) => DenialKind::PlaintextStrict,
                (None, false) => DenialKind::NoAllowMatch,
            };
            Decision::Deny(Denial {
                policy,
                kind,
                reason: why.into(),
            })
        };
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

    /// Parses one AuthorizationPolicy the way the config loader does.
    fn parse(ns: &str, spec: &str) -> Result<AuthorizationPolicy, (String, String)> {
        let raw: RawAuthorizationPolicySpec = serde_yaml_ng::from_str(spec).expect("yaml");
        AuthorizationPolicy::from_raw("p".into(), ns.into(), raw)
    }

    #[test]
    fn http_rules_are_decided_per_request_and_fail_closed_without_http() {
        let api = workload("backend", "api");
        let allow_get_api = parse(
            "backend",
            "action: ALLOW\nrules:\n- from: [{source: {principals: [cluster.local/ns/shop/sa/web]}}]\n  to: [{operation: {methods: [GET], paths: [/api/*]}}]\n",
        )
        .unwrap();
        let deny_header = parse(
            "backend",
            "action: DENY\nrules:\n- when: [{key: 'request.headers[x-block]', values: ['yes']}]\n",
        )
        .unwrap();
        let deny_not_admin_host = parse(
            "backend",
            "action: DENY\nrules:\n- to: [{operation: {notHosts: ['api.backend*'], paths: [/admin]}}]\n",
        )
        .unwrap();
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut h = http::HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, v.parse().unwrap());
            }
            h
        };
        let web = peer("shop", "web", "10.0.0.1", 80);
        let other = peer("shop", "cart", "10.0.0.1", 80);
        let none = headers(&[]);
        let blocked = headers(&[("x-block", "yes")]);
        let req = |method, path, host, h| Request {
            method,
            path,
            host,
            headers: h,
        };
        let get_api = req("GET", "/api/x", "api:80", &none);
        let post_api = req("POST", "/api/x", "api:80", &none);
        let get_admin = req("GET", "/admin", "api:80", &none);
        let get_api_blocked = req("GET", "/api/x", "api:80", &blocked);
        let allow = Decision::Allow;
        fn denied(policy: Option<&'static str>) -> impl Fn(&Decision) -> bool {
            move |d| matches!(d, Decision::Deny(x) if x.policy.as_deref() == policy)
        }
        let ps = |v: &[&AuthorizationPolicy]| v.iter().map(|p| (*p).clone()).collect::<Vec<_>>();
        let both = ps(&[&allow_get_api, &deny_header]);

        // A new connection: the HTTP rules are left to its requests.
        assert_eq!(authorize(&api, &both, &web), Decision::PerRequest);
        // Another principal can never match the ALLOW rule, but is told so
        // request by request (403), as by any Istio proxy.
        assert_eq!(authorize(&api, &both, &other), Decision::PerRequest);
        // Without rules about HTTP, it is refused at once.
        let l4_only = parse(
            "backend",
            "rules:\n- from: [{source: {principals: [cluster.local/ns/shop/sa/web]}}]\n",
        )
        .unwrap();
        assert!(denied(None)(&authorize(&api, &[l4_only], &other)));
        // `None`: allowed; `Some(policy)`: denied by it (`None` inside: by no ALLOW matching).
        let cases: [(
            &str,
            &Connection,
            &Request<'_>,
            Option<Option<&'static str>>,
        ); 5] = [
            ("GET /api/x allowed", &web, &get_api, None),
            (
                "POST refused by the ALLOW's methods",
                &web,
                &post_api,
                Some(None),
            ),
            (
                "/admin refused by the ALLOW's paths",
                &web,
                &get_admin,
                Some(None),
            ),
            ("another principal refused", &other, &get_api, Some(None)),
            (
                "a DENY on a header wins",
                &web,
                &get_api_blocked,
                Some(Some("backend/p")),
            ),
        ];
        for (name, conn, request, expected) in cases {
            let d = decide_with(&api, &both, conn, Facts::Request(request));
            match expected {
                None => assert_eq!(d, allow, "{name}"),
                Some(policy) => assert!(denied(policy)(&d), "{name}: {d:?}"),
            }
        }
        // Not HTTP: the ALLOW cannot match, the DENY about headers denies.
        assert!(denied(None)(&decide_with(
            &api,
            &ps(&[&allow_get_api]),
            &web,
            Facts::Opaque
        )));
        assert!(denied(Some("backend/p"))(&decide_with(
            &api,
            &ps(&[&deny_header]),
            &web,
            Facts::Opaque
        )));
        // notHosts: hosts are matched without case and without their port.
        let d = ps(&[&deny_not_admin_host]);
        let admin_other_host = req("GET", "/admin", "Other:80", &none);
        let admin_api_host = req("GET", "/admin", "API.backend.svc:8080", &none);
        assert!(denied(Some("backend/p"))(&decide_with(
            &api,
            &d,
            &web,
            Facts::Request(&admin_other_host)
        )));
        assert_eq!(
            decide_with(&api, &d, &web, Facts::Request(&admin_api_host)),
            allow
        );
    }

    #[test]
    fn when_conditions_and_audit() {
        let api = workload("backend", "api");
        let cases = [
            ("key: source.namespace\n    values: [shop]", true),
            ("key: source.namespace\n    notValues: [shop]", false),
            (
                "key: source.principal\n    values: ['cluster.local/ns/shop/*']",
                true,
            ),
            ("key: source.ip\n    values: [10.0.0.0/8]", true),
            ("key: remote.ip\n    notValues: [10.0.0.1]", false),
            ("key: destination.port\n    values: ['80']", true),
            ("key: destination.ip\n    values: [10.1.0.5]", true),
        ];
        for (condition, matches) in cases {
            let p = parse(
                "backend",
                &format!("action: DENY\nrules:\n- when:\n  - {condition}\n"),
            )
            .unwrap();
            let d = authorize(&api, &[p], &peer("shop", "web", "10.0.0.1", 80));
            assert_eq!(
                matches!(d, Decision::Deny(_)),
                matches,
                "{condition}: {d:?}"
            );
        }
        let audit = parse(
            "backend",
            "action: AUDIT\nrules:\n- to: [{operation: {methods: [DELETE]}}]\n",
        )
        .unwrap();
        let headers = http::HeaderMap::new();
        let delete = Request {
            method: "DELETE",
            path: "/",
            host: "api",
            headers: &headers,
        };
        let conn = peer("shop", "web", "10.0.0.1", 80);
        let policies = [audit];
        // AUDIT never decides; it is only reported.
        assert_eq!(
            decide_with(&api, &policies, &conn, Facts::Request(&delete)),
            Decision::Allow
        );
        assert_eq!(audits(&api, &policies, &conn, Some(&delete)).len(), 1);
    }

    #[test]
    fn unsupported_or_malformed_rules_are_rejected_with_their_field() {
        let cases = [
            ("action: CUSTOM\n", "spec.action"),
            (
                "rules:\n- when: [{key: 'request.auth.claims[iss]', values: [x]}]\n",
                "spec.rules[0].when[0].key",
            ),
            (
                "rules:\n- when: [{key: connection.sni, values: [x]}]\n",
                "spec.rules[0].when[0].key",
            ),
            (
                "rules:\n- when: [{key: source.ip, values: [not-an-ip]}]\n",
                "spec.rules[0].when[0].values",
            ),
            (
                "rules:\n- when: [{key: destination.port, values: ['80x']}]\n",
                "spec.rules[0].when[0].values",
            ),
            (
                "rules:\n- when: [{key: source.namespace}]\n",
                "spec.rules[0].when[0]",
            ),
        ];
        for (spec, field) in cases {
            let err = parse("backend", spec).expect_err(spec);
            assert_eq!(err.0, field, "{spec}: {err:?}");
        }
    }

    #[test]
    fn the_docs_example_loads_as_documented() {
        let text = include_str!("../../../docs/l7/authorization.md");
        let block = text
            .split("```yaml\n")
            .nth(1)
            .and_then(|b| b.split("```").next())
            .expect("a yaml example");
        let policies: Vec<AuthorizationPolicy> = block
            .split("---\n")
            .map(|doc| {
                let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(doc).expect("yaml");
                let name = doc["metadata"]["name"].as_str().expect("a name");
                let namespace = doc["metadata"]["namespace"].as_str().expect("a namespace");
                let spec = serde_yaml_ng::from_value(doc["spec"].clone()).expect("a spec");
                AuthorizationPolicy::from_raw(name.into(), namespace.into(), spec)
                    .expect("the example loads")
            })
            .collect();
        let actions: Vec<(String, Action)> = policies.iter().map(|p| (p.key(), p.action)).collect();
        assert_eq!(
            actions,
            [
                ("backend/api-readers".to_owned(), Action::Allow),
                ("backend/blocked".to_owned(), Action::Deny),
                ("backend/audited".to_owned(), Action::Audit),
            ]
        );
        assert!(policies.iter().all(|p| p.is_http()));
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
