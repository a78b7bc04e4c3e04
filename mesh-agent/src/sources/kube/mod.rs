//! The Kubernetes source: kube-rs watchers on Pods, Namespaces, Services,
//! EndpointSlices and the policy and routing kinds, each feeding a [`store::KindStore`] of converted
//! model objects; one loop turns the stores into the model and hands it to the
//! reconciler. The watchers page the initial list, use bookmarks, resume from the
//! last resourceVersion after a cut, and relist only on `410 Gone`.

pub mod cni;
pub mod convert;
pub mod placement;
pub mod store;

use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use gateway_api::experimental::httproutes::HttpRoute as GatewayHttpRoute;
use gateway_api::experimental::xbackendtrafficpolicies::XBackendTrafficPolicy;
use k8s_openapi::api::core::v1::{Namespace, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice as KubeEndpointSlice;
use kube::api::{Api, DynamicObject};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

use crate::metrics::Metrics;
use crate::reconciler::Agent;
use crate::state::workload::{NetnsRef, Placement};
use crate::state::{Document, MeshConfig};
use convert::{PodLite, PodRecord};
use placement::Discovery;
use store::{Converted, KindStore, ObjectKey};

/// How the Kubernetes source reads the cluster.
#[derive(Debug, Clone)]
pub struct KubeSettings {
    /// This node's name: its meshed pods are enrolled, the rest only known.
    pub node_name: String,
    /// The SPIFFE trust domain of every identity.
    pub trust_domain: Arc<str>,
    /// The cgroup under which kubelet makes `kubepods` (the cgroup2 root on a node).
    pub cgroup_root: PathBuf,
    /// How long changes are gathered before they are applied together.
    pub debounce: Duration,
    /// Where to answer the CNI plugin, if it is installed.
    pub cni_socket: Option<PathBuf>,
}

/// Everything the watchers have seen, converted.
#[derive(Default)]
struct Stores {
    pods: KindStore<PodRecord>,
    namespaces: KindStore<bool>,
    documents: HashMap<&'static str, KindStore<Document>>,
}

impl Stores {
    fn synced(&self) -> bool {
        self.pods.synced && self.namespaces.synced && self.documents.values().all(|s| s.synced)
    }
}

/// The stores, and the signal that one of them changed.
struct Shared {
    stores: Mutex<Stores>,
    /// Pod sandboxes the CNI plugin announced.
    sandboxes: Mutex<cni::Sandboxes>,
    changed: Notify,
    /// Counts applies, so a CNI request can wait for the next one.
    applied: tokio::sync::watch::Sender<u64>,
    metrics: Arc<Metrics>,
}

impl cni::Source for Shared {
    fn verdict(&self, namespace: &str, name: &str) -> cni::Verdict {
        use convert::MESH_LABEL;
        let stores = self.stores.lock().expect("stores lock");
        if !stores.namespaces.synced {
            return cni::Verdict::Unknown("the agent has not listed the namespaces yet".into());
        }
        match stores.namespaces.get(namespace) {
            None => {
                return cni::Verdict::Unknown(format!(
                    "namespace {namespace} not seen from the API yet"
                ));
            }
            Some(false) => {
                return cni::Verdict::NotMeshed(format!(
                    "namespace {namespace} is not labelled {MESH_LABEL}=enabled"
                ));
            }
            Some(true) => {}
        }
        match stores.pods.get(&format!("{namespace}/{name}")) {
            None => cni::Verdict::Unknown("the pod has not been seen from the API yet".into()),
            Some(record) if record.opted_out => {
                cni::Verdict::NotMeshed(format!("the pod is labelled {MESH_LABEL}=disabled"))
            }
            Some(_) => cni::Verdict::Meshed,
        }
    }

    fn sandboxes(&self) -> &Mutex<cni::Sandboxes> {
        &self.sandboxes
    }

    fn changed(&self) {
        self.changed.notify_one();
    }

    fn applied(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied.subscribe()
    }
}

/// Runs the source until the process exits: watchers feed the stores, and every
/// change (gathered for `debounce`) is applied through the one reconciler.
pub async fn run(client: Client, settings: KubeSettings, agent: Arc<Agent>) -> anyhow::Result<()> {
    let shared = Arc::new(Shared {
        stores: Mutex::new(Stores::default()),
        sandboxes: Mutex::new(cni::Sandboxes::new()),
        changed: Notify::new(),
        applied: tokio::sync::watch::Sender::new(0),
        metrics: agent.metrics.clone(),
    });
    spawn_watchers(&client, &shared, &settings);
    if let Some(socket) = settings.cni_socket.clone() {
        let (shared, agent) = (shared.clone(), agent.clone());
        tokio::spawn(async move {
            if let Err(e) = cni::serve(&socket, shared, agent).await {
                // Without it, the plugin's ADDs fail and kubelet keeps retrying:
                // pods do not start, rather than start unmeshed.
                tracing::error!(socket = %socket.display(), error = %e, "CNI plugin socket failed; new pods cannot be enrolled through the CNI chain");
            }
        });
    }
    let mut placements: HashMap<String, Placement> = HashMap::new();
    let mut retry: Option<Duration> = None;
    loop {
        match retry {
            Some(delay) => {
                let _ = tokio::time::timeout(delay, shared.changed.notified()).await;
            }
            None => shared.changed.notified().await,
        }
        // Gather a burst of events (a relist, a rollout) into one apply.
        tokio::time::sleep(settings.debounce).await;
        let snapshot = {
            let stores = shared.stores.lock().expect("stores lock");
            if !stores.synced() {
                continue;
            }
            let mut sandboxes = shared.sandboxes.lock().expect("sandboxes lock");
            snapshot(&stores, &mut sandboxes, &settings, &mut placements)
        };
        let failed = agent.apply(snapshot.config, snapshot.rejected).await;
        shared.applied.send_modify(|n| *n += 1);
        // Pods whose sandbox is still starting, or that failed to enroll, are
        // retried with a growing delay until they are in.
        retry = if failed + snapshot.starting > 0 {
            Some(
                retry
                    .map_or(Duration::from_millis(100), |d| d * 2)
                    .min(Duration::from_secs(2)),
            )
        } else {
            None
        };
    }
}

/// The model built from the stores, and what kept it from being complete.
struct Snapshot {
    config: MeshConfig,
    rejected: Vec<String>,
    /// Meshed local pods not yet found on the node.
    starting: usize,
}

fn snapshot(
    stores: &Stores,
    sandboxes: &mut cni::Sandboxes,
    settings: &KubeSettings,
    placements: &mut HashMap<String, Placement>,
) -> Snapshot {
    let mut config = MeshConfig::default();
    let mut starting = 0;
    let mut present = HashSet::new();
    config.workloads.reserve(stores.pods.len());
    let meshed_namespaces: HashSet<&str> = stores
        .namespaces
        .good()
        .filter(|(_, meshed)| **meshed)
        .map(|(name, _)| &**name)
        .collect();
    for (_, record) in stores.pods.good() {
        let mut w = record.workload.clone();
        w.trust_domain = settings.trust_domain.clone();
        w.meshed = meshed_namespaces.contains(&*w.namespace) && !record.opted_out;
        let sandbox = record
            .uid
            .as_deref()
            .and_then(|uid| sandboxes.get(&w.key()).filter(|s| s.is_for(uid)));
        match sandbox {
            // The runtime removed the pod's sandbox: it is not enrolled again
            // until a new one is added, even while its processes linger.
            Some(cni::Sandbox::Deleted { .. }) => w.meshed = false,
            // The runtime's view comes first: the pod may have no process and no
            // address in the API yet.
            Some(cni::Sandbox::Added { netns, ips, .. }) if w.meshed => {
                if w.ips.is_empty() {
                    w.ips = ips.clone();
                }
                let uid = record.uid.as_deref().unwrap_or_default();
                let netns = NetnsRef::Path(netns.clone());
                // Found once per sandbox, as the pods found by discovery are:
                // not a walk of the cgroup tree on every apply.
                w.placement = match placements.get(uid).filter(|p| p.netns == netns) {
                    Some(p) => Some(Box::new(p.clone())),
                    None => match placement::discover(&settings.cgroup_root, uid) {
                        Discovery::Found(Placement { cgroup_path, .. })
                        | Discovery::Starting(cgroup_path) => {
                            let p = Placement { cgroup_path, netns };
                            placements.insert(uid.to_owned(), p.clone());
                            Some(Box::new(p))
                        }
                        Discovery::Missing => {
                            starting += 1;
                            None
                        }
                    },
                };
                if w.placement.is_some() {
                    present.insert(uid);
                }
                config.workloads.push(w);
                continue;
            }
            _ => {}
        }
        if w.ips.is_empty() {
            // A pod of this node that has no address yet and was not announced
            // by the CNI plugin: nothing can reach it, and nothing to enroll.
            continue;
        }
        if w.meshed
            && w.is_local_to(Some(&settings.node_name))
            && let Some(uid) = record.uid.as_deref()
        {
            present.insert(uid);
            w.placement = match placements.get(uid) {
                Some(p) => Some(Box::new(p.clone())),
                None => match placement::discover(&settings.cgroup_root, uid) {
                    Discovery::Found(p) => {
                        placements.insert(uid.to_owned(), p.clone());
                        Some(Box::new(p))
                    }
                    Discovery::Starting(_) | Discovery::Missing => {
                        starting += 1;
                        None
                    }
                },
            };
        }
        config.workloads.push(w);
    }
    placements.retain(|uid, _| present.contains(uid.as_str()));
    // Sandboxes of pods the API no longer has are forgotten (a pod announced
    // before the API showed it is kept until then).
    sandboxes.retain(|key, sandbox| match stores.pods.get(key.as_str()) {
        Some(record) => record.uid.as_deref().is_none_or(|uid| sandbox.is_for(uid)),
        None => matches!(sandbox, cni::Sandbox::Added { .. }),
    });
    let mut kinds: Vec<_> = stores.documents.iter().collect();
    kinds.sort_by_key(|(kind, _)| **kind);
    let mut rejected: Vec<String> = stores.pods.rejections().map(|e| e.to_string()).collect();
    for (_, store) in kinds {
        for (_, document) in store.good() {
            config.push(document.clone());
        }
        rejected.extend(store.rejections().map(|e| e.to_string()));
    }
    rejected.sort();
    Snapshot {
        config,
        rejected,
        starting,
    }
}

fn spawn_watchers(client: &Client, shared: &Arc<Shared>, settings: &KubeSettings) {
    let mut interner = convert::Interner::default();
    let node_name = settings.node_name.clone();
    tokio::spawn(watch(
        Api::<PodLite>::all(client.clone()),
        "Pod",
        shared.clone(),
        |s| &mut s.pods,
        move |pod: &PodLite| convert::pod_record(pod, &node_name, &mut interner),
    ));
    tokio::spawn(watch(
        Api::<Namespace>::all(client.clone()),
        "Namespace",
        shared.clone(),
        |s| &mut s.namespaces,
        |ns: &Namespace| Ok(Some(convert::namespace_meshed(ns))),
    ));
    spawn_document_watch(
        Api::<KubeService>::all(client.clone()),
        "Service",
        shared.clone(),
        |svc: &KubeService| convert::service(svc).transpose(),
    );
    spawn_document_watch(
        Api::<KubeEndpointSlice>::all(client.clone()),
        "EndpointSlice",
        shared.clone(),
        |slice: &KubeEndpointSlice| convert::endpoint_slice(slice).transpose(),
    );
    spawn_document_watch(
        Api::<GatewayHttpRoute>::all(client.clone()),
        "HTTPRoute",
        shared.clone(),
        |r: &GatewayHttpRoute| {
            typed_document(
                crate::state::route::GATEWAY_V1,
                "HTTPRoute",
                &r.metadata,
                &r.spec,
            )
        },
    );
    spawn_document_watch(
        Api::<XBackendTrafficPolicy>::all(client.clone()),
        "XBackendTrafficPolicy",
        shared.clone(),
        |p: &XBackendTrafficPolicy| {
            typed_document(
                crate::state::traffic::GATEWAY_X_V1ALPHA1,
                "XBackendTrafficPolicy",
                &p.metadata,
                &p.spec,
            )
        },
    );
    // Kinds without maintained Rust types are read as dynamic objects and
    // validated by the model's own parser, one object at a time, so one bad
    // object never stops the others of its kind.
    for (group, version, kind, plural) in [
        (
            "networking.istio.io",
            "v1",
            "DestinationRule",
            "destinationrules",
        ),
        (
            "security.istio.io",
            "v1",
            "PeerAuthentication",
            "peerauthentications",
        ),
        (
            "security.istio.io",
            "v1",
            "AuthorizationPolicy",
            "authorizationpolicies",
        ),
        (
            "nodemesh.io",
            "v1alpha1",
            "FaultInjection",
            "faultinjections",
        ),
        (
            "nodemesh.io",
            "v1alpha1",
            "LocalRateLimit",
            "localratelimits",
        ),
    ] {
        let resource =
            ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
        let api_version = resource.api_version.clone();
        spawn_document_watch(
            Api::<DynamicObject>::all_with(client.clone(), &resource),
            kind,
            shared.clone(),
            move |o: &DynamicObject| {
                let spec = o.data.get("spec").cloned().unwrap_or_default();
                convert::document(&api_version, kind, &o.metadata, spec).map(Some)
            },
        );
    }
}

/// A typed object's spec, validated as a model document.
fn typed_document<S: serde::Serialize>(
    api_version: &str,
    kind: &str,
    meta: &kube::api::ObjectMeta,
    spec: &S,
) -> Converted<Document> {
    let spec = serde_json::to_value(spec).map_err(|e| crate::state::ObjectError {
        subject: convert::subject(kind, meta),
        field: "spec".into(),
        message: e.to_string(),
    })?;
    convert::document(api_version, kind, meta, spec).map(Some)
}

/// Registers the store of a document kind, then feeds it from a watcher. The
/// store exists before the source first checks that every kind is synced, so no
/// kind can be applied before its first list.
fn spawn_document_watch<K>(
    api: Api<K>,
    kind: &'static str,
    shared: Arc<Shared>,
    convert: impl Fn(&K) -> Converted<Document> + Send + 'static,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    shared
        .stores
        .lock()
        .expect("stores lock")
        .documents
        .insert(kind, KindStore::default());
    tokio::spawn(watch(
        api,
        kind,
        shared,
        move |s: &mut Stores| s.documents.get_mut(kind).expect("registered at spawn"),
        convert,
    ));
}

/// Feeds one kind's store from a kube-rs watcher, forever: errors are retried
/// with kube-rs's default backoff, and the store keeps its state meanwhile.
async fn watch<K, T>(
    api: Api<K>,
    kind: &'static str,
    shared: Arc<Shared>,
    store: impl Fn(&mut Stores) -> &mut KindStore<T> + Send + 'static,
    mut convert: impl FnMut(&K) -> Converted<T> + Send + 'static,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    T: Clone + Send + 'static,
{
    let metrics = shared.metrics.clone();
    let mut events = std::pin::pin!(watcher(api, watcher::Config::default()).default_backoff());
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                metrics.watch_error(kind);
                let missing = matches!(&e, watcher::Error::InitialListFailed(kube::Error::Api(s)) if s.code == 404);
                if missing {
                    // The kind is not served (its CRD is not installed): there are
                    // none of its objects. Keep trying, in case it is installed later.
                    let mut stores = shared.stores.lock().expect("stores lock");
                    let s = store(&mut stores);
                    if !s.synced {
                        tracing::warn!(
                            kind,
                            "the API server does not serve this kind (CRD not installed?); treating it as empty"
                        );
                        s.synced = true;
                        drop(stores);
                        shared.changed.notify_one();
                    }
                } else {
                    tracing::warn!(kind, error = %e, "Kubernetes watch failed; retrying, the last state stays in force");
                }
                continue;
            }
        };
        let mut checked = |object: &K| {
            let converted = convert(object);
            if let Err(e) = &converted {
                tracing::error!(kind, object = %e.subject, field = %e.field, error = %e.message, "object rejected; the rest of the mesh state applies, and its last good version (if any) stays in force");
            }
            converted
        };
        let notify = {
            let mut stores = shared.stores.lock().expect("stores lock");
            let s = store(&mut stores);
            let notify = match &event {
                Event::Init => {
                    metrics.watch_event(kind, "init");
                    s.init();
                    false
                }
                Event::InitApply(object) => {
                    s.init_apply(key(object), checked(object));
                    false
                }
                Event::InitDone => {
                    metrics.watch_event(kind, "synced");
                    s.init_done();
                    true
                }
                Event::Apply(object) => {
                    metrics.watch_event(kind, "apply");
                    s.apply(key(object), checked(object));
                    true
                }
                Event::Delete(object) => {
                    metrics.watch_event(kind, "delete");
                    s.delete(&key(object));
                    true
                }
            };
            metrics.rejected_objects(kind, s.rejections().count());
            notify
        };
        if notify {
            shared.changed.notify_one();
        }
    }
}

fn key<K: Resource>(object: &K) -> ObjectKey {
    let meta = object.meta();
    let name = meta.name.as_deref().unwrap_or_default();
    match meta.namespace.as_deref() {
        Some(namespace) => format!("{namespace}/{name}").into(),
        None => name.into(),
    }
}
