//! Kubernetes objects to the model: pure functions, so every rule is tested
//! without an API server. Objects are trimmed to the fields the agent uses as they
//! arrive; only the converted model objects are kept.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice as KubeEndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::state::workload::{Labels, Workload};
use crate::state::{self, Document, ObjectError};

/// Namespace label that puts a namespace's pods in the mesh.
pub const MESH_LABEL: &str = "nodemesh.io/mesh";
/// Pod annotation bounding the connections the agent holds for the pod.
pub const MAX_CONNECTIONS_ANNOTATION: &str = "nodemesh.io/max-connections";

/// A Pod trimmed to what the agent reads: a few hundred bytes of a 5-10 KB object.
/// Unknown fields are skipped while deserializing, so nothing else is ever held.
#[derive(Resource, Clone, Debug, Deserialize)]
#[resource(inherit = "Pod")]
pub struct PodLite {
    /// Name, namespace, uid, labels and owners.
    pub metadata: ObjectMeta,
    /// Node, service account and host networking.
    #[serde(default)]
    pub spec: PodLiteSpec,
    /// Phase and addresses.
    #[serde(default)]
    pub status: PodLiteStatus,
}

/// The `spec` fields of a Pod the agent reads.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodLiteSpec {
    /// The node the pod is scheduled on.
    #[serde(default)]
    pub node_name: Option<String>,
    /// The identity's service account.
    #[serde(default)]
    pub service_account_name: Option<String>,
    /// Host-network pods share the node's addresses and are never meshed.
    #[serde(default)]
    pub host_network: Option<bool>,
}

/// The `status` fields of a Pod the agent reads.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodLiteStatus {
    /// `Pending`, `Running`, `Succeeded`, `Failed`.
    #[serde(default)]
    pub phase: Option<String>,
    /// The pod's addresses (one per family).
    #[serde(default, rename = "podIPs")]
    pub pod_ips: Vec<PodIp>,
}

/// One entry of `status.podIPs`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct PodIp {
    /// The address.
    pub ip: String,
}

/// A pod as the Kubernetes source keeps it: the model's workload plus the facts
/// that decide, together with its namespace, whether it is meshed.
#[derive(Debug, Clone, PartialEq)]
pub struct PodRecord {
    /// The pod UID, which finds its cgroup; kept for this node's pods only.
    pub uid: Option<Box<str>>,
    /// The workload, not yet placed and with `meshed` still to be decided.
    pub workload: Workload,
    /// The pod label `nodemesh.io/mesh: disabled` opts it out.
    pub opted_out: bool,
}

/// Converts a Pod, seen from the agent of `local_node`. `None`: nothing to know
/// about it yet or any more (no address, finished, or on the host network, where
/// its address is the node's). Strings many pods share come from `interner`.
pub fn pod_record(
    pod: &PodLite,
    local_node: &str,
    interner: &mut Interner,
) -> Result<Option<PodRecord>, ObjectError> {
    let meta = &pod.metadata;
    let subject = subject("Pod", meta);
    if pod.spec.host_network == Some(true)
        || matches!(pod.status.phase.as_deref(), Some("Succeeded" | "Failed"))
        || meta.deletion_timestamp.is_some() && pod.status.pod_ips.is_empty()
    {
        return Ok(None);
    }
    let mut ips = Vec::with_capacity(pod.status.pod_ips.len());
    for (i, p) in pod.status.pod_ips.iter().enumerate() {
        let ip: IpAddr = p.ip.parse().map_err(|_| ObjectError {
            subject: subject.clone(),
            field: format!("status.podIPs[{i}].ip"),
            message: format!("{:?} is not an IP address", p.ip),
        })?;
        ips.push(ip);
    }
    let node_name = pod.spec.node_name.as_deref();
    let local = node_name == Some(local_node);
    // A pod of another node without an address can be neither reached nor
    // enrolled; one of this node may be announced by the CNI plugin first.
    if ips.is_empty() && !local {
        return Ok(None);
    }
    let name = meta.name.as_deref().unwrap_or_default();
    let labels: BTreeMap<String, String> = meta.labels.clone().unwrap_or_default();
    let opted_out = labels.get(MESH_LABEL).map(String::as_str) == Some("disabled");
    let owners = meta.owner_references.as_deref().unwrap_or_default();
    let workload_name = istio_workload_name(name, &labels, owners);
    Ok(Some(PodRecord {
        uid: meta.uid.as_deref().filter(|_| local).map(Box::from),
        workload: Workload {
            workload_name: if workload_name == name {
                Arc::from(name)
            } else {
                interner.string(&workload_name)
            },
            name: Arc::from(name),
            namespace: interner.string(meta.namespace.as_deref().unwrap_or("default")),
            service_account: interner.string(
                pod.spec
                    .service_account_name
                    .as_deref()
                    .unwrap_or("default"),
            ),
            node_name: node_name.map(|n| interner.string(n)),
            placement: None,
            ips,
            labels: interner.labels(Arc::new(labels)),
            excluded_ports: Vec::new(),
            excluded_cidrs: Vec::new(),
            meshed: false,
            trust_domain: Arc::from(crate::state::workload::DEFAULT_TRUST_DOMAIN),
            max_connections: max_connections(meta, &subject),
        },
        opted_out,
    }))
}

/// The pod's `nodemesh.io/max-connections`; a value that is not a positive
/// number is logged and ignored (the agent-wide bound still applies), so a typo
/// never takes a pod out of the mesh.
fn max_connections(meta: &ObjectMeta, subject: &str) -> Option<std::num::NonZeroU32> {
    let value = meta.annotations.as_ref()?.get(MAX_CONNECTIONS_ANNOTATION)?;
    match value.trim().parse() {
        Ok(n) => Some(n),
        Err(e) => {
            tracing::warn!(object = %subject, annotation = MAX_CONNECTIONS_ANNOTATION, value = %value, error = %e, "ignored: not a positive number");
            None
        }
    }
}

/// One shared copy of each distinct label set and string: the pods of a
/// Deployment carry identical labels, service account and controller name, and
/// a namespace or node names many pods, so 10,000 pods need far fewer copies.
#[derive(Default)]
pub struct Interner {
    labels: Pool<Labels>,
    strings: Pool<Arc<str>>,
}

impl Interner {
    /// The shared copy of `labels`.
    pub fn labels(&mut self, labels: Labels) -> Labels {
        self.labels.intern(labels)
    }

    /// The shared copy of `s`.
    pub fn string(&mut self, s: &str) -> Arc<str> {
        match self.strings.items.get(s) {
            Some(shared) => shared.clone(),
            None => self.strings.intern(Arc::from(s)),
        }
    }
}

/// Shared values, swept of those no pod uses any more as the pool grows.
struct Pool<T> {
    items: HashSet<T>,
    /// Size after the last sweep.
    swept: usize,
}

impl<T> Default for Pool<T> {
    fn default() -> Self {
        Pool {
            items: HashSet::new(),
            swept: 0,
        }
    }
}

/// A reference-counted value, whose count tells whether anyone but the pool uses it.
trait Shared: Clone + Eq + std::hash::Hash {
    fn users(&self) -> usize;
}

impl<T: ?Sized + Eq + std::hash::Hash> Shared for Arc<T> {
    fn users(&self) -> usize {
        Arc::strong_count(self)
    }
}

impl<T: Shared> Pool<T> {
    fn intern(&mut self, value: T) -> T {
        if let Some(shared) = self.items.get(&value) {
            return shared.clone();
        }
        if self.items.len() >= 2 * self.swept + 1024 {
            // Only the pool still holds these.
            self.items.retain(|v| v.users() > 1);
            self.swept = self.items.len();
        }
        self.items.insert(value.clone());
        value
    }
}

/// Istio's workload name: the pod's controller. A ReplicaSet with the pod's
/// `pod-template-hash` suffix trimmed is its Deployment; a Job named with a
/// CronJob's timestamp suffix is its CronJob; no owner gives the pod name.
pub fn istio_workload_name(
    pod_name: &str,
    labels: &BTreeMap<String, String>,
    owners: &[OwnerReference],
) -> String {
    let Some(owner) = owners
        .iter()
        .find(|o| o.controller == Some(true))
        .or(owners.first())
    else {
        return pod_name.to_owned();
    };
    let name = owner.name.as_str();
    match owner.kind.as_str() {
        "ReplicaSet" => labels
            .get("pod-template-hash")
            .and_then(|hash| name.strip_suffix(hash.as_str())?.strip_suffix('-'))
            .unwrap_or(name)
            .to_owned(),
        "Job" => match name.rsplit_once('-') {
            // CronJobs name their Jobs `<cronjob>-<scheduled time in minutes>`.
            Some((cronjob, stamp))
                if (8..=10).contains(&stamp.len()) && stamp.bytes().all(|b| b.is_ascii_digit()) =>
            {
                cronjob.to_owned()
            }
            _ => name.to_owned(),
        },
        _ => name.to_owned(),
    }
}

/// Whether a namespace opts its pods into the mesh.
pub fn namespace_meshed(ns: &Namespace) -> bool {
    ns.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MESH_LABEL))
        .is_some_and(|v| v == "enabled")
}

/// Converts a Service. `None`: nothing for the mesh to do with it (headless,
/// ExternalName, or no TCP port).
pub fn service(svc: &KubeService) -> Option<Result<Document, ObjectError>> {
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let cluster_ips: Vec<&String> = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .filter(|ip| ip.as_str() != "None" && !ip.is_empty())
        .collect();
    if cluster_ips.is_empty() {
        return None;
    }
    // The mesh carries TCP; UDP ports are left to the node's own Service routing.
    let ports: Vec<Value> = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .map(|p| {
            json!({
                "name": p.name,
                "port": p.port,
                "targetPort": p.target_port,
                "appProtocol": p.app_protocol,
            })
        })
        .collect();
    if ports.is_empty() {
        return None;
    }
    let mut ips = cluster_ips.into_iter().cloned().collect::<Vec<_>>();
    ips.dedup();
    let body = json!({
        "clusterIPs": ips,
        "ports": ports,
        "selector": spec.selector.clone().unwrap_or_default(),
    });
    Some(document("v1", "Service", &svc.metadata, body))
}

/// Converts an EndpointSlice, keeping each endpoint's first address and its
/// conditions only. `None`: nothing for the mesh to do with it (no Service named,
/// or FQDN addresses, which kube-proxy ignores too).
pub fn endpoint_slice(slice: &KubeEndpointSlice) -> Option<Result<Document, ObjectError>> {
    let labels = slice.metadata.labels.as_ref()?;
    labels.get(state::service::SERVICE_NAME_LABEL)?;
    if slice.address_type == "FQDN" {
        return None;
    }
    let endpoints: Vec<Value> = slice
        .endpoints
        .iter()
        .map(|e| {
            json!({
                "addresses": e.addresses.first().into_iter().collect::<Vec<_>>(),
                "conditions": e.conditions,
            })
        })
        .collect();
    let ports: Vec<Value> = slice
        .ports
        .iter()
        .flatten()
        .map(|p| json!({"name": p.name, "port": p.port, "protocol": p.protocol}))
        .collect();
    let mut fields = serde_json::Map::new();
    fields.insert("addressType".into(), json!(slice.address_type));
    fields.insert("endpoints".into(), Value::Array(endpoints));
    fields.insert("ports".into(), Value::Array(ports));
    // Only the Service's name is needed of the slice's labels.
    let mut meta = ObjectMeta {
        name: slice.metadata.name.clone(),
        namespace: slice.metadata.namespace.clone(),
        ..ObjectMeta::default()
    };
    meta.labels = Some(
        labels
            .iter()
            .filter(|(k, _)| *k == state::service::SERVICE_NAME_LABEL)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    );
    Some(object(
        state::service::DISCOVERY_V1,
        "EndpointSlice",
        &meta,
        fields,
    ))
}

/// Validates an object of any kind by the config file's rules: the document is
/// rebuilt from the fields the agent reads (name, namespace, labels, annotations
/// and spec), leaving out what the API server adds (uid, managedFields, status…).
pub fn document(
    api_version: &str,
    kind: &str,
    meta: &ObjectMeta,
    spec: Value,
) -> Result<Document, ObjectError> {
    let mut fields = serde_json::Map::new();
    fields.insert("spec".into(), spec);
    object(api_version, kind, meta, fields)
}

/// Validates an object whose body is `fields` (a kind's `spec`, or an
/// EndpointSlice's top-level fields) by the config file's rules.
fn object(
    api_version: &str,
    kind: &str,
    meta: &ObjectMeta,
    fields: serde_json::Map<String, Value>,
) -> Result<Document, ObjectError> {
    let mut metadata = serde_json::Map::new();
    metadata.insert("name".into(), json!(meta.name));
    metadata.insert("namespace".into(), json!(meta.namespace));
    if let Some(labels) = &meta.labels {
        metadata.insert("labels".into(), json!(labels));
    }
    if let Some(annotations) = &meta.annotations {
        metadata.insert("annotations".into(), json!(annotations));
    }
    let mut object = serde_json::Map::new();
    object.insert("apiVersion".into(), json!(api_version));
    object.insert("kind".into(), json!(kind));
    object.insert("metadata".into(), Value::Object(metadata));
    for (k, v) in fields {
        object.insert(k, strip_nulls(v));
    }
    let value = serde_yaml_ng::to_value(&object).map_err(|e| ObjectError {
        subject: subject(kind, meta),
        field: "(object)".into(),
        message: e.to_string(),
    })?;
    state::parse_object(value)
}

/// Drops `null` members: generated types serialize unset optional fields as null,
/// which the model's strict parser would take for a value.
fn strip_nulls(value: Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, strip_nulls(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(strip_nulls).collect()),
        other => other,
    }
}

/// `Kind namespace/name`, as rejections name an object.
pub fn subject(kind: &str, meta: &ObjectMeta) -> String {
    format!(
        "{kind} {}/{}",
        meta.namespace.as_deref().unwrap_or(""),
        meta.name.as_deref().unwrap_or("")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(kind: &str, name: &str) -> OwnerReference {
        OwnerReference {
            kind: kind.into(),
            name: name.into(),
            controller: Some(true),
            ..OwnerReference::default()
        }
    }

    #[test]
    fn equal_label_sets_and_strings_are_shared() {
        let mut interner = Interner::default();
        let set = || Labels::new([("app".to_owned(), "web".to_owned())].into());
        let a = interner.labels(set());
        let b = interner.labels(set());
        assert!(Arc::ptr_eq(&a, &b));
        let other = interner.labels(Labels::default());
        assert!(!Arc::ptr_eq(&a, &other));
        let shop = interner.string("shop");
        assert!(Arc::ptr_eq(&shop, &interner.string("shop")));
        assert!(!Arc::ptr_eq(&shop, &interner.string("web")));
    }

    #[test]
    fn workload_names_follow_istio() {
        let hash: BTreeMap<String, String> =
            [("pod-template-hash".to_owned(), "7d9f8b".to_owned())].into();
        let none = BTreeMap::new();
        type Case<'a> = (
            &'a str,
            &'a BTreeMap<String, String>,
            Vec<OwnerReference>,
            &'a str,
        );
        let cases: Vec<Case> = vec![
            ("bare pod", &none, vec![], "bare-pod"),
            (
                "deployment",
                &hash,
                vec![owner("ReplicaSet", "web-7d9f8b")],
                "web",
            ),
            (
                "replicaset without hash label",
                &none,
                vec![owner("ReplicaSet", "web-7d9f8b")],
                "web-7d9f8b",
            ),
            (
                "cronjob",
                &none,
                vec![owner("Job", "backup-28745160")],
                "backup",
            ),
            (
                "plain job",
                &none,
                vec![owner("Job", "migrate-1")],
                "migrate-1",
            ),
            ("statefulset", &none, vec![owner("StatefulSet", "db")], "db"),
        ];
        for (pod, labels, owners, expected) in cases {
            assert_eq!(
                istio_workload_name(&pod.replace(' ', "-"), labels, &owners),
                expected,
                "{pod}"
            );
        }
    }

    fn pod(json: Value) -> PodLite {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn pods_are_trimmed_and_filtered() {
        let full = pod(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-7d9f8b-x2x", "namespace": "shop", "uid": "u-1",
                "labels": {"app": "web", "pod-template-hash": "7d9f8b"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d9f8b", "uid": "r", "controller": true}],
                "managedFields": [{"manager": "kubelet"}]},
            "spec": {"nodeName": "node-1", "serviceAccountName": "web-sa", "containers": [{"name": "c", "image": "i"}]},
            "status": {"phase": "Running", "podIPs": [{"ip": "10.0.0.7"}, {"ip": "fd00::7"}]}
        }));
        let mut interner = Interner::default();
        let mut convert = |p: &PodLite| pod_record(p, "node-1", &mut interner);
        let record = convert(&full).unwrap().unwrap();
        assert_eq!(record.uid.as_deref(), Some("u-1"));
        assert_eq!(&*record.workload.workload_name, "web");
        assert_eq!(&*record.workload.service_account, "web-sa");
        assert_eq!(record.workload.ips.len(), 2);
        assert!(!record.opted_out);
        // A pod of another node: no UID kept, as no cgroup is looked for.
        let remote = pod_record(&full, "node-2", &mut Interner::default()).unwrap();
        assert_eq!(remote.unwrap().uid, None);

        let host = pod(
            json!({"metadata": {"name": "h"}, "spec": {"hostNetwork": true},
            "status": {"podIPs": [{"ip": "10.0.0.1"}]}}),
        );
        assert_eq!(convert(&host).unwrap(), None);
        let done = pod(
            json!({"metadata": {"name": "d"}, "status": {"phase": "Succeeded", "podIPs": [{"ip": "10.0.0.2"}]}}),
        );
        assert_eq!(convert(&done).unwrap(), None);
        let unscheduled = pod(json!({"metadata": {"name": "p"}, "status": {"phase": "Pending"}}));
        assert_eq!(convert(&unscheduled).unwrap(), None);
        let out = pod(
            json!({"metadata": {"name": "o", "labels": {"nodemesh.io/mesh": "disabled"}},
            "status": {"podIPs": [{"ip": "10.0.0.3"}]}}),
        );
        assert!(convert(&out).unwrap().unwrap().opted_out);
        let bad = pod(
            json!({"metadata": {"name": "b", "namespace": "shop"}, "status": {"podIPs": [{"ip": "ten"}]}}),
        );
        let err = convert(&bad).unwrap_err();
        assert_eq!(err.subject, "Pod shop/b");
        assert_eq!(err.field, "status.podIPs[0].ip");
    }

    #[test]
    fn the_connection_limit_annotation_is_read_and_a_bad_one_ignored() {
        let with = |value: &str| {
            let p = pod(json!({"metadata": {"name": "p", "namespace": "shop",
                "annotations": {MAX_CONNECTIONS_ANNOTATION: value}},
                "status": {"podIPs": [{"ip": "10.0.0.9"}]}}));
            pod_record(&p, "node-1", &mut Interner::default())
                .unwrap()
                .unwrap()
                .workload
                .max_connections
                .map(|n| n.get())
        };
        assert_eq!(with("250"), Some(250));
        // Never a reason to drop the pod from the mesh: the agent-wide bound applies.
        assert_eq!(with("0"), None);
        assert_eq!(with("lots"), None);
    }

    #[test]
    fn services_keep_their_tcp_ports() {
        let svc: KubeService = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop", "uid": "x", "resourceVersion": "9"},
            "spec": {"type": "NodePort", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                "internalTrafficPolicy": "Cluster", "selector": {"app": "web"},
                "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30080},
                          {"name": "dns", "port": 53, "protocol": "UDP"},
                          {"name": "named", "port": 81, "targetPort": "http"}]}
        }))
        .unwrap();
        let Some(Ok(Document::Service(s))) = service(&svc) else {
            panic!("not a service: {:?}", service(&svc))
        };
        assert_eq!(s.cluster_ips, vec!["10.96.0.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(s.ports.len(), 2, "the UDP port is left out");
        assert_eq!(
            s.ports[0].target_port,
            state::service::TargetPort::Number(8080)
        );
        assert_eq!(
            s.ports[1].target_port,
            state::service::TargetPort::Name("http".into())
        );
        let headless: KubeService = serde_json::from_value(json!({
            "metadata": {"name": "h"}, "spec": {"clusterIP": "None", "ports": [{"port": 80}]}
        }))
        .unwrap();
        assert!(service(&headless).is_none());
    }

    #[test]
    fn endpoint_slices_keep_first_addresses_and_conditions() {
        let slice = |address_type: &str, labels: Value| -> KubeEndpointSlice {
            serde_json::from_value(json!({
                "metadata": {"name": "web-x1", "namespace": "shop", "labels": labels,
                             "managedFields": [{"manager": "kube-controller-manager"}]},
                "addressType": address_type,
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": [
                    {"addresses": ["10.0.0.1", "10.0.0.9"], "conditions": {"ready": true},
                     "nodeName": "n1", "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "shop"}},
                    {"addresses": ["10.0.0.2"], "conditions": {"ready": false, "serving": true, "terminating": true}}
                ]
            }))
            .unwrap()
        };
        let named = json!({"kubernetes.io/service-name": "web", "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"});
        let Some(Ok(Document::EndpointSlice(s))) = endpoint_slice(&slice("IPv4", named.clone()))
        else {
            panic!("not a slice")
        };
        assert_eq!((s.namespace.as_str(), s.service.as_str()), ("shop", "web"));
        assert_eq!(s.ports[0].port, 8080);
        let kept: Vec<_> = s
            .endpoints
            .iter()
            .map(|e| (e.address.to_string(), e.ready, e.serving_terminating))
            .collect();
        assert_eq!(
            kept,
            vec![
                ("10.0.0.1".to_owned(), true, false),
                ("10.0.0.2".to_owned(), false, true)
            ]
        );
        assert!(endpoint_slice(&slice("FQDN", named)).is_none());
        assert!(endpoint_slice(&slice("IPv4", json!({"app": "web"}))).is_none());
    }

    #[test]
    fn objects_are_validated_like_file_documents() {
        let meta = ObjectMeta {
            name: Some("split".into()),
            namespace: Some("shop".into()),
            uid: Some("ignored".into()),
            resource_version: Some("42".into()),
            ..ObjectMeta::default()
        };
        let bad = json!({
            "parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
            "rules": [{"matches": [{"path": {"type": "RegularExpression", "value": "/(unclosed"}}],
                       "backendRefs": [{"name": "web", "port": 80}]}]
        });
        let err = document("gateway.networking.k8s.io/v1", "HTTPRoute", &meta, bad).unwrap_err();
        assert_eq!(err.subject, "HTTPRoute shop/split");
        assert!(err.field.contains("rules[0].matches[0].path"), "{err}");
        let good = json!({"action": "ALLOW", "rules": [{"from": [{"source": {"namespaces": ["shop"]}}]}], "selector": null});
        assert!(matches!(
            document("security.istio.io/v1", "AuthorizationPolicy", &meta, good),
            Ok(Document::AuthorizationPolicy(_))
        ));
    }
}
