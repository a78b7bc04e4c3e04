//! The agent's desired state: one typed model ([`MeshConfig`]) that every source
//! produces, and the validation of Kubernetes-shaped objects (`apiVersion`,
//! `kind`, `metadata`, `spec`) into it, strict so that a typo is an error naming
//! the object and field instead of a silently ignored setting.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub mod policy;
pub mod route;
pub mod service;
pub mod traffic;
pub mod workload;

use crate::state::policy::{AuthorizationPolicy, PeerAuthentication};
use crate::state::route::{GATEWAY_V1, HttpRoute};
use crate::state::service::{DISCOVERY_V1, EndpointSlice, Service};
use crate::state::traffic::{
    BackendTrafficPolicy, DestinationRule, FaultInjection, GATEWAY_X_V1ALPHA1, ISTIO_NETWORKING,
    LocalRateLimit,
};
use crate::state::workload::{DEFAULT_TRUST_DOMAIN, NetnsRef, Placement, Workload};

/// The API group/version of nodemesh's own kinds.
pub const API_VERSION: &str = "nodemesh.io/v1alpha1";

/// Why a config file was rejected; always names the document and field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("reading {path}: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// One document is malformed or fails validation.
    #[error("document {index} ({subject}): {field}: {message}")]
    Invalid {
        /// 1-based position of the document in the file.
        index: usize,
        /// `Kind namespace/name`, or what is known of it.
        subject: String,
        /// Dotted path of the offending field.
        field: String,
        /// What is wrong with it.
        message: String,
    },
}

/// Everything the agent should be doing, as last loaded from the config file.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct MeshConfig {
    /// Workloads on this node to enroll in the mesh.
    pub workloads: Vec<Workload>,
    /// `PeerAuthentication` documents.
    pub peer_authentications: Vec<PeerAuthentication>,
    /// `AuthorizationPolicy` documents.
    pub authorization_policies: Vec<AuthorizationPolicy>,
    /// `Service` documents: VIPs the agent balances.
    pub services: Vec<Service>,
    /// `EndpointSlice` documents: the endpoints of the Services they name.
    pub endpoint_slices: Vec<EndpointSlice>,
    /// `HTTPRoute` documents attached to Services.
    pub http_routes: Vec<HttpRoute>,
    /// `DestinationRule` documents: per-Service load balancing and outlier detection.
    pub destination_rules: Vec<DestinationRule>,
    /// `XBackendTrafficPolicy` documents: per-Service retry budgets.
    pub backend_traffic_policies: Vec<BackendTrafficPolicy>,
    /// `FaultInjection` filter documents.
    pub fault_injections: Vec<FaultInjection>,
    /// `LocalRateLimit` filter documents.
    pub local_rate_limits: Vec<LocalRateLimit>,
}

impl MeshConfig {
    /// Places every workload in `trust_domain` (the `--trust-domain` flag): the
    /// file describes pods, the agent's settings say which mesh they belong to.
    pub fn with_trust_domain(mut self, trust_domain: &Arc<str>) -> Self {
        for w in &mut self.workloads {
            w.trust_domain = trust_domain.clone();
        }
        self
    }
}

/// Istio's security API versions, accepted as-is.
const ISTIO_SECURITY: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];

/// One parsed document: an object of any kind the agent reads, validated.
#[derive(Debug, Clone, PartialEq)]
pub enum Document {
    Workload(Workload),
    PeerAuthentication(PeerAuthentication),
    AuthorizationPolicy(AuthorizationPolicy),
    Service(Service),
    EndpointSlice(EndpointSlice),
    HttpRoute(HttpRoute),
    DestinationRule(DestinationRule),
    BackendTrafficPolicy(BackendTrafficPolicy),
    FaultInjection(FaultInjection),
    LocalRateLimit(LocalRateLimit),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetadata {
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawWorkloadSpec {
    #[serde(default)]
    service_account: Option<String>,
    #[serde(default)]
    node_name: Option<String>,
    #[serde(default)]
    cgroup_path: Option<PathBuf>,
    #[serde(default)]
    netns: Option<RawNetns>,
    #[serde(default)]
    ips: Vec<IpAddr>,
    #[serde(default)]
    excluded_ports: Vec<u16>,
    #[serde(default)]
    excluded_cidrs: Vec<String>,
    #[serde(default)]
    max_connections: Option<std::num::NonZeroU32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetns {
    path: Option<PathBuf>,
    pid: Option<u32>,
}

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<MeshConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text)
}

/// Parses and validates config text holding any number of `---`-separated documents.
pub fn parse(text: &str) -> Result<MeshConfig, ConfigError> {
    let mut config = MeshConfig::default();
    for (i, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        let value =
            serde_yaml_ng::Value::deserialize(document).map_err(|e| ConfigError::Invalid {
                index,
                subject: "unparsed".into(),
                field: "(document)".into(),
                message: e.to_string(),
            })?;
        if value.is_null() {
            continue; // an empty document, e.g. a trailing `---`
        }
        config.push(parse_document(index, value)?);
    }
    validate_unique(&config)?;
    Ok(config)
}

impl MeshConfig {
    /// Adds one validated object to the state.
    pub fn push(&mut self, document: Document) {
        match document {
            Document::Workload(w) => self.workloads.push(w),
            Document::PeerAuthentication(p) => self.peer_authentications.push(p),
            Document::AuthorizationPolicy(p) => self.authorization_policies.push(p),
            Document::Service(x) => self.services.push(x),
            Document::EndpointSlice(x) => self.endpoint_slices.push(x),
            Document::HttpRoute(x) => self.http_routes.push(x),
            Document::DestinationRule(x) => self.destination_rules.push(x),
            Document::BackendTrafficPolicy(x) => self.backend_traffic_policies.push(x),
            Document::FaultInjection(x) => self.fault_injections.push(x),
            Document::LocalRateLimit(x) => self.local_rate_limits.push(x),
        }
    }
}

/// Why one object was rejected: what it is and which field is at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{subject}: {field}: {message}")]
pub struct ObjectError {
    /// `Kind namespace/name`.
    pub subject: String,
    /// Dotted path of the offending field.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

/// Validates one Kubernetes-shaped object (`apiVersion`, `kind`, `metadata`,
/// `spec`) by the same rules as a document of the config file, so both sources
/// accept and reject exactly the same objects.
pub fn parse_object(value: serde_yaml_ng::Value) -> Result<Document, ObjectError> {
    match parse_document(0, value) {
        Ok(document) => Ok(document),
        Err(ConfigError::Invalid {
            subject,
            field,
            message,
            ..
        }) => Err(ObjectError {
            subject,
            field,
            message,
        }),
        Err(e @ ConfigError::Read { .. }) => Err(ObjectError {
            subject: "object".into(),
            field: "(object)".into(),
            message: e.to_string(),
        }),
    }
}

fn str_field<'a>(value: &'a serde_yaml_ng::Value, key: &str) -> Option<&'a str> {
    value.get(key).and_then(|v| v.as_str())
}

fn parse_document(index: usize, value: serde_yaml_ng::Value) -> Result<Document, ConfigError> {
    let kind = str_field(&value, "kind").unwrap_or("").to_owned();
    let invalid = |subject: &str, field: &str, message: String| ConfigError::Invalid {
        index,
        subject: subject.to_owned(),
        field: field.to_owned(),
        message,
    };
    let unnamed = if kind.is_empty() {
        "unknown kind".to_owned()
    } else {
        kind.clone()
    };
    if !value.is_mapping() {
        return Err(invalid(
            &unnamed,
            "(document)",
            "expected a mapping with apiVersion, kind, metadata and spec".into(),
        ));
    }
    if kind.is_empty() {
        return Err(invalid(&unnamed, "kind", "missing".into()));
    }
    let api_version = str_field(&value, "apiVersion").unwrap_or("").to_owned();
    let expected: &[&str] = match kind.as_str() {
        "PeerAuthentication" | "AuthorizationPolicy" => &ISTIO_SECURITY,
        "Service" => &["v1"],
        "EndpointSlice" => &[DISCOVERY_V1],
        "HTTPRoute" => &[GATEWAY_V1, "gateway.networking.k8s.io/v1beta1"],
        "DestinationRule" => &ISTIO_NETWORKING,
        "XBackendTrafficPolicy" => &[GATEWAY_X_V1ALPHA1],
        _ => &[API_VERSION],
    };
    if !expected.contains(&api_version.as_str()) {
        return Err(invalid(
            &unnamed,
            "apiVersion",
            format!("expected {}, got {api_version:?}", expected.join(" or ")),
        ));
    }
    // An EndpointSlice's fields sit beside its metadata; every other kind has a spec.
    let body: &[&str] = if kind == "EndpointSlice" {
        &["addressType", "endpoints", "ports"]
    } else {
        &["spec"]
    };
    if let Some(extra) = value
        .as_mapping()
        .into_iter()
        .flat_map(|m| m.keys())
        .filter_map(|k| k.as_str())
        .find(|k| !matches!(*k, "apiVersion" | "kind" | "metadata") && !body.contains(k))
    {
        return Err(invalid(&unnamed, extra, "unknown top-level field".into()));
    }
    let meta: RawMetadata =
        serde_yaml_ng::from_value(value.get("metadata").cloned().unwrap_or_default())
            .map_err(|e| invalid(&unnamed, "metadata", e.to_string()))?;
    let name = meta.name.unwrap_or_default();
    let namespace = meta.namespace.unwrap_or_else(|| "default".to_owned());
    let subject = format!("{kind} {namespace}/{name}");
    if !is_dns_name(&name) {
        return Err(invalid(
            &subject,
            "metadata.name",
            format!("{name:?} is not a DNS-1123 name"),
        ));
    }
    if !is_dns_name(&namespace) {
        return Err(invalid(
            &subject,
            "metadata.namespace",
            format!("{namespace:?} is not a DNS-1123 name"),
        ));
    }

    // A validation error's field, placed in this document.
    let placed = |(field, message): (String, String)| invalid(&subject, &field, message);
    match kind.as_str() {
        "Workload" => {
            let spec: RawWorkloadSpec = spec_of(&value, &subject, &invalid)?;
            build_workload(name, namespace, meta.labels, spec)
                .map(Document::Workload)
                .map_err(placed)
        }
        "PeerAuthentication" => {
            let spec = serde_yaml_ng::from_value(value.get("spec").cloned().unwrap_or_default())
                .map_err(|e| invalid(&subject, "spec", e.to_string()))?;
            Ok(Document::PeerAuthentication(PeerAuthentication::from_raw(
                name, namespace, spec,
            )))
        }
        "AuthorizationPolicy" => {
            let spec = serde_yaml_ng::from_value(value.get("spec").cloned().unwrap_or_default())
                .map_err(|e| {
                    invalid(
                        &subject,
                        "spec",
                        format!("{e} (only L4 fields are supported: principals, namespaces, ipBlocks, ports)"),
                    )
                })?;
            AuthorizationPolicy::from_raw(name, namespace, spec)
                .map(Document::AuthorizationPolicy)
                .map_err(placed)
        }
        "Service" => Service::from_raw(
            name,
            namespace,
            &meta.annotations,
            spec_of(&value, &subject, &invalid)?,
        )
        .map(Document::Service)
        .map_err(placed),
        "EndpointSlice" => {
            let mut fields = value.clone();
            if let Some(m) = fields.as_mapping_mut() {
                for k in ["apiVersion", "kind", "metadata"] {
                    m.remove(k);
                }
            }
            let raw = serde_yaml_ng::from_value(fields)
                .map_err(|e| invalid(&subject, "(object)", e.to_string()))?;
            EndpointSlice::from_raw(name, namespace, &meta.labels, raw)
                .map(Document::EndpointSlice)
                .map_err(placed)
        }
        "HTTPRoute" => HttpRoute::from_raw(name, namespace, spec_of(&value, &subject, &invalid)?)
            .map(Document::HttpRoute)
            .map_err(placed),
        "DestinationRule" => {
            DestinationRule::from_raw(name, namespace, spec_of(&value, &subject, &invalid)?)
                .map(Document::DestinationRule)
                .map_err(placed)
        }
        "XBackendTrafficPolicy" => {
            BackendTrafficPolicy::from_raw(name, namespace, spec_of(&value, &subject, &invalid)?)
                .map(Document::BackendTrafficPolicy)
                .map_err(placed)
        }
        "FaultInjection" => {
            FaultInjection::from_raw(name, namespace, spec_of(&value, &subject, &invalid)?)
                .map(Document::FaultInjection)
                .map_err(placed)
        }
        "LocalRateLimit" => {
            LocalRateLimit::from_raw(name, namespace, spec_of(&value, &subject, &invalid)?)
                .map(Document::LocalRateLimit)
                .map_err(placed)
        }
        other => Err(invalid(
            &subject,
            "kind",
            format!(
                "unsupported kind {other:?} (supported: {})",
                KINDS.join(", ")
            ),
        )),
    }
}

/// Every kind the agent reads.
const KINDS: [&str; 10] = [
    "Workload",
    "PeerAuthentication",
    "AuthorizationPolicy",
    "Service",
    "EndpointSlice",
    "HTTPRoute",
    "DestinationRule",
    "XBackendTrafficPolicy",
    "FaultInjection",
    "LocalRateLimit",
];

/// Deserializes a document's required `spec`.
fn spec_of<T: serde::de::DeserializeOwned>(
    value: &serde_yaml_ng::Value,
    subject: &str,
    invalid: &dyn Fn(&str, &str, String) -> ConfigError,
) -> Result<T, ConfigError> {
    let spec = value
        .get("spec")
        .cloned()
        .ok_or_else(|| invalid(subject, "spec", "missing".into()))?;
    serde_yaml_ng::from_value(spec).map_err(|e| invalid(subject, "spec", e.to_string()))
}

fn build_workload(
    name: String,
    namespace: String,
    labels: BTreeMap<String, String>,
    spec: RawWorkloadSpec,
) -> Result<Workload, (String, String)> {
    let netns = match spec.netns.map(|n| (n.path, n.pid)) {
        None => None,
        Some((Some(path), None)) => Some(NetnsRef::Path(path)),
        Some((None, Some(pid))) if pid > 0 => Some(NetnsRef::Pid(pid)),
        Some(_) => {
            return Err((
                "spec.netns".into(),
                "set exactly one of `path` or `pid` (a positive pid)".into(),
            ));
        }
    };
    if spec
        .cgroup_path
        .as_ref()
        .is_some_and(|p| p.as_os_str().is_empty())
    {
        return Err(("spec.cgroupPath".into(), "must not be empty".into()));
    }
    if let Some(node) = &spec.node_name
        && !is_dns_name(node)
    {
        return Err((
            "spec.nodeName".into(),
            format!("{node:?} is not a DNS-1123 name"),
        ));
    }
    // A pod on a named node may be described without its placement, for the other
    // nodes' agents; a pod with no node is local to every agent and needs both.
    let placement = match (spec.cgroup_path, netns) {
        (Some(cgroup_path), Some(netns)) => Some(Placement { cgroup_path, netns }),
        (None, None) if spec.node_name.is_some() => None,
        (None, _) => {
            return Err((
                "spec.cgroupPath".into(),
                "missing (required unless spec.nodeName is set)".into(),
            ));
        }
        (Some(_), None) => {
            return Err((
                "spec.netns".into(),
                "missing (required with spec.cgroupPath)".into(),
            ));
        }
    };
    if let Some(i) = spec.excluded_ports.iter().position(|p| *p == 0) {
        return Err((
            format!("spec.excludedPorts[{i}]"),
            "port 0 is not a destination port".into(),
        ));
    }
    let mut excluded_cidrs = Vec::with_capacity(spec.excluded_cidrs.len());
    for (i, cidr) in spec.excluded_cidrs.iter().enumerate() {
        let net = cidr
            .parse::<IpNet>()
            .or_else(|_| cidr.parse::<IpAddr>().map(IpNet::from))
            .map_err(|e| (format!("spec.excludedCidrs[{i}]"), format!("{cidr:?}: {e}")))?;
        excluded_cidrs.push(net.trunc());
    }
    let service_account = spec.service_account.unwrap_or_else(|| "default".to_owned());
    if !is_dns_name(&service_account) {
        return Err((
            "spec.serviceAccount".into(),
            format!("{service_account:?} is not a DNS-1123 name"),
        ));
    }
    let name: Arc<str> = Arc::from(name);
    Ok(Workload {
        workload_name: name.clone(),
        meshed: true,
        trust_domain: Arc::from(DEFAULT_TRUST_DOMAIN),
        max_connections: spec.max_connections,
        name,
        namespace: Arc::from(namespace),
        labels: Arc::new(labels),
        service_account: Arc::from(service_account),
        node_name: spec.node_name.map(Arc::from),
        placement: placement.map(Box::new),
        ips: spec.ips,
        excluded_ports: spec.excluded_ports,
        excluded_cidrs,
    })
}

fn validate_unique(config: &MeshConfig) -> Result<(), ConfigError> {
    let mut keys = HashSet::new();
    let mut cgroups = HashSet::new();
    let mut netns = HashSet::new();
    for (i, w) in config.workloads.iter().enumerate() {
        let dup = |field: &str, what: String| ConfigError::Invalid {
            index: i + 1,
            subject: format!("Workload {}", w.key()),
            field: field.to_owned(),
            message: format!("{what} is already used by another Workload"),
        };
        if !keys.insert(w.key()) {
            return Err(dup("metadata.name", w.key()));
        }
        let Some(p) = &w.placement else { continue };
        if !cgroups.insert(p.cgroup_path.clone()) {
            return Err(dup("spec.cgroupPath", p.cgroup_path.display().to_string()));
        }
        if !netns.insert(p.netns.clone()) {
            return Err(dup("spec.netns", p.netns.to_string()));
        }
    }
    Ok(())
}

/// Kubernetes object names: lowercase alphanumerics, '-' and '.', at most 253 chars.
fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata:
  name: client
  namespace: shop
  labels: {app: client}
spec:
  serviceAccount: client-sa
  cgroupPath: kubepods/pod-client
  netns: {path: /var/run/netns/client}
  ips: [10.0.0.2]
  excludedPorts: [22]
  excludedCidrs: [169.254.0.0/16, 10.9.9.9]
---
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {name: server}
spec:
  cgroupPath: /sys/fs/cgroup/server
  netns: {pid: 42}
"#;

    #[test]
    fn parses_workloads_with_defaults() {
        let config = parse(GOOD).unwrap();
        assert_eq!(config.workloads.len(), 2);
        let client = &config.workloads[0];
        assert_eq!(client.key(), "shop/client");
        assert_eq!(&*client.service_account, "client-sa");
        assert_eq!(client.excluded_cidrs[1].to_string(), "10.9.9.9/32");
        let server = &config.workloads[1];
        assert_eq!(&*server.namespace, "default");
        assert_eq!(&*server.service_account, "default");
        assert_eq!(server.placement.as_ref().unwrap().netns, NetnsRef::Pid(42));
    }

    #[test]
    fn empty_file_is_an_empty_mesh() {
        assert_eq!(parse("").unwrap(), MeshConfig::default());
        assert_eq!(parse("---\n").unwrap(), MeshConfig::default());
    }

    /// Each bad input must name the document number and the field at fault.
    #[test]
    fn pods_on_other_nodes_need_no_placement() {
        let text = "apiVersion: nodemesh.io/v1alpha1\nkind: Workload\nmetadata: {name: far}\nspec: {nodeName: node-b, ips: [10.1.0.5]}\n";
        let w = &parse(text).unwrap().workloads[0];
        assert_eq!(w.placement, None);
        assert!(w.is_local_to(Some("node-b")));
        assert!(!w.is_local_to(Some("node-a")));
        assert!(!w.is_local_to(None));
    }

    #[test]
    fn errors_name_document_and_field() {
        let base = "apiVersion: nodemesh.io/v1alpha1\nkind: Workload\nmetadata: {name: a}\n";
        let cases: &[(&str, &str)] = &[
            (
                "kind: Workload\nmetadata: {name: a}\nspec: {}\n",
                "document 1 (Workload): apiVersion",
            ),
            (
                "apiVersion: nodemesh.io/v1alpha1\nkind: Gadget\nmetadata: {name: a}\n",
                "kind: unsupported kind \"Gadget\"",
            ),
            (
                &format!(
                    "{base}spec: {{cgroupPath: x, netns: {{path: /n}}, excludedPorts: [0]}}\n"
                ),
                "spec.excludedPorts[0]",
            ),
            (
                &format!(
                    "{base}spec: {{cgroupPath: x, netns: {{path: /n}}, excludedPorts: [70000]}}\n"
                ),
                "(Workload default/a): spec:",
            ),
            (
                &format!("{base}spec: {{cgroupPath: x, netns: {{path: /n, pid: 3}}}}\n"),
                "spec.netns",
            ),
            (
                &format!(
                    "{base}spec: {{cgroupPath: x, netns: {{path: /n}}, excludedCidrs: [10.0.0.0/33]}}\n"
                ),
                "spec.excludedCidrs[0]",
            ),
            (
                &format!("{base}spec: {{cgroupPath: x, netns: {{path: /n}}, cgroupPth: y}}\n"),
                "unknown field `cgroupPth`",
            ),
            (
                &format!("{base}spec: {{netns: {{path: /n}}}}\n"),
                "spec.cgroupPath: missing (required unless spec.nodeName is set)",
            ),
            (
                &format!("{base}spec: {{cgroupPath: x}}\n"),
                "spec.netns: missing",
            ),
            (
                &format!("{base}spec: {{nodeName: Node_1}}\n"),
                "spec.nodeName",
            ),
            (
                "apiVersion: nodemesh.io/v1alpha1\nkind: Workload\nmetadata: {name: Bad_Name}\nspec: {}\n",
                "metadata.name",
            ),
            ("[1, 2", "document 1 (unparsed)"),
        ];
        for (text, expected) in cases {
            let err = parse(text).expect_err(text).to_string();
            assert!(
                err.contains(expected),
                "for {text:?}: {err:?} should contain {expected:?}"
            );
        }
    }

    #[test]
    fn duplicates_are_rejected_with_second_document_index() {
        let one = "apiVersion: nodemesh.io/v1alpha1\nkind: Workload\nmetadata: {name: a}\nspec: {cgroupPath: x, netns: {path: /n1}}\n";
        let two = "apiVersion: nodemesh.io/v1alpha1\nkind: Workload\nmetadata: {name: b}\nspec: {cgroupPath: x, netns: {path: /n2}}\n";
        let err = parse(&format!("{one}---\n{two}")).unwrap_err().to_string();
        assert!(
            err.starts_with("document 2 (Workload default/b): spec.cgroupPath"),
            "{err}"
        );
    }
}
