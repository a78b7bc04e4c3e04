//! A Kubernetes API server double for tests: it speaks the list/watch protocol
//! that kube-rs uses, on loopback, over plain HTTP with a bearer token.
//!
//! - Objects are JSON with `metadata.resourceVersion` from one global counter, as
//!   etcd gives them.
//! - Lists are paginated with `limit`/`continue` and carry the list's resourceVersion.
//! - `?watch=1` streams one JSON event per line: ADDED, MODIFIED, DELETED, and
//!   BOOKMARK when `allowWatchBookmarks` is set; it replays what happened after the
//!   requested resourceVersion, or sends an ERROR event with a `410 Expired`
//!   Status when that version has been compacted away.
//! - `fieldSelector` (`spec.nodeName`, `metadata.name`, `metadata.namespace`) and
//!   equality-based `labelSelector` filter lists and watches.
//!
//! - `POST /apis/authentication.k8s.io/v1/tokenreviews` reviews service-account
//!   tokens the test issued ([`ApiServer::issue_token`]) as the real server
//!   does: bound to a pod, valid for some audiences, until an expiry.
//!
//! Tests create, change and delete objects, cut every watch, stop and restart the
//! server on the same port (keeping its objects, as etcd would), expire old
//! resourceVersions, and read how many lists and watches it served per resource.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

/// The token the double accepts; kubeconfigs it writes carry it.
pub const TOKEN: &str = "nodemesh-test-token";

/// A resource the double serves.
#[derive(Debug, Clone, Copy)]
struct Kind {
    api_version: &'static str,
    kind: &'static str,
    plural: &'static str,
    namespaced: bool,
}

/// Every kind the agent watches (and EndpointSlices, which clients may list).
const KINDS: &[Kind] = &[
    Kind {
        api_version: "v1",
        kind: "Pod",
        plural: "pods",
        namespaced: true,
    },
    Kind {
        api_version: "v1",
        kind: "Namespace",
        plural: "namespaces",
        namespaced: false,
    },
    Kind {
        api_version: "v1",
        kind: "Service",
        plural: "services",
        namespaced: true,
    },
    Kind {
        api_version: "discovery.k8s.io/v1",
        kind: "EndpointSlice",
        plural: "endpointslices",
        namespaced: true,
    },
    Kind {
        api_version: "gateway.networking.k8s.io/v1",
        kind: "HTTPRoute",
        plural: "httproutes",
        namespaced: true,
    },
    Kind {
        api_version: "gateway.networking.x-k8s.io/v1alpha1",
        kind: "XBackendTrafficPolicy",
        plural: "xbackendtrafficpolicies",
        namespaced: true,
    },
    Kind {
        api_version: "networking.istio.io/v1",
        kind: "DestinationRule",
        plural: "destinationrules",
        namespaced: true,
    },
    Kind {
        api_version: "security.istio.io/v1",
        kind: "PeerAuthentication",
        plural: "peerauthentications",
        namespaced: true,
    },
    Kind {
        api_version: "security.istio.io/v1",
        kind: "AuthorizationPolicy",
        plural: "authorizationpolicies",
        namespaced: true,
    },
    Kind {
        api_version: "nodemesh.io/v1alpha1",
        kind: "FaultInjection",
        plural: "faultinjections",
        namespaced: true,
    },
    Kind {
        api_version: "nodemesh.io/v1alpha1",
        kind: "LocalRateLimit",
        plural: "localratelimits",
        namespaced: true,
    },
];

/// A Namespace object, opted into the mesh (`nodemesh.io/mesh: enabled`) or not.
pub fn namespace(name: &str, meshed: bool) -> Value {
    let labels = if meshed {
        json!({"nodemesh.io/mesh": "enabled"})
    } else {
        json!({})
    };
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

/// A UUID-shaped pod UID, unique to this process and call.
pub fn pod_uid() -> String {
    let n = crate::unique_name("u").replace(|c: char| !c.is_ascii_digit(), "");
    format!(
        "6f1c2a3b-0d4e-4f50-9a6b-{:0>12}",
        &n[n.len().saturating_sub(12)..]
    )
}

/// The API group of a resource the double serves (`""` for the core group).
pub fn api_group(plural: &str) -> Option<&'static str> {
    KINDS.iter().find(|k| k.plural == plural).map(|k| {
        k.api_version
            .rsplit_once('/')
            .map_or("", |(group, _)| group)
    })
}

fn kind_of(api_version: &str, kind: &str) -> Option<&'static Kind> {
    KINDS
        .iter()
        .find(|k| k.api_version == api_version && k.kind == kind)
}

/// One change, as a watch reports it.
#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    plural: &'static str,
    event: &'static str,
    object: Arc<Value>,
}

/// Requests served per resource.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Served {
    /// List requests (each page counts).
    pub lists: u64,
    /// List requests that started a list (no `continue` token).
    pub list_starts: u64,
    /// Watch requests.
    pub watches: u64,
}

#[derive(Default)]
struct Store {
    /// By plural, then `namespace/name`.
    objects: HashMap<&'static str, BTreeMap<String, Arc<Value>>>,
    history: Vec<Change>,
    rv: u64,
    /// Watches from below this resourceVersion get 410 Gone.
    compacted: u64,
    served: HashMap<&'static str, Served>,
    next_uid: u64,
    /// Service-account tokens the test issued, by token.
    tokens: HashMap<String, IssuedToken>,
    /// TokenReviews answered.
    token_reviews: u64,
    /// How long a TokenReview takes (a loaded API server).
    review_delay: Duration,
}

/// A service-account token as the API server would have issued it.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    /// `namespace/name` of the service account.
    pub service_account: (String, String),
    /// The pod it is bound to (name, uid), for a projected token.
    pub pod: Option<(String, String)>,
    /// Audiences it is valid for.
    pub audiences: Vec<String>,
    /// When it stops being valid.
    pub expires: std::time::Instant,
}

struct Inner {
    store: Mutex<Store>,
    changes: broadcast::Sender<Change>,
    /// Bumped to end every open watch.
    cut: watch::Sender<u64>,
    bookmark_interval: Duration,
}

/// A running API server double; stopped on drop.
pub struct ApiServer {
    inner: Arc<Inner>,
    /// Where it listens (the same across restarts).
    pub addr: SocketAddr,
    runtime: tokio::runtime::Runtime,
    running: Option<watch::Sender<bool>>,
    dir: tempfile::TempDir,
}

impl ApiServer {
    /// Starts a double on a free loopback port.
    pub fn start() -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let (changes, _) = broadcast::channel(65536);
        let inner = Arc::new(Inner {
            store: Mutex::new(Store {
                rv: 1000,
                ..Store::default()
            }),
            changes,
            cut: watch::channel(0).0,
            bookmark_interval: Duration::from_millis(500),
        });
        // The first listener is kept, never reopened, so no other test can take
        // its port in between; a restart rebinds the same port.
        let listener = runtime.block_on(listen(SocketAddr::from(([127, 0, 0, 1], 0))))?;
        let addr = listener.local_addr()?;
        let mut server = ApiServer {
            inner,
            addr,
            runtime,
            running: None,
            dir: tempfile::tempdir()?,
        };
        server.serve_on(listener);
        Ok(server)
    }

    /// Starts serving again on the same port after [`ApiServer::stop`].
    pub fn resume(&mut self) -> anyhow::Result<()> {
        if self.running.is_some() {
            return Ok(());
        }
        let listener = self.runtime.block_on(listen(self.addr))?;
        self.serve_on(listener);
        Ok(())
    }

    fn serve_on(&mut self, listener: tokio::net::TcpListener) {
        let (running, stopped) = watch::channel(true);
        self.runtime
            .spawn(serve(listener, self.inner.clone(), stopped));
        self.running = Some(running);
    }

    /// Stops serving: the listener closes and every connection is dropped, as when
    /// an API server restarts. Objects and history are kept.
    pub fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            let _ = running.send(false);
        }
        // Let the tasks see it before the port is reused.
        std::thread::sleep(Duration::from_millis(100));
    }

    /// Ends every open watch (clients resume from their last resourceVersion).
    pub fn cut_watches(&self) {
        self.inner.cut.send_modify(|n| *n += 1);
    }

    /// Compacts history: every resourceVersion seen so far becomes too old to
    /// watch from, so clients get `410 Gone` and must relist. Open watches end.
    pub fn expire(&self) {
        let mut store = self.inner.store.lock().expect("store lock");
        // A write elsewhere in etcd moves the revision on.
        store.rv += 1;
        store.compacted = store.rv;
        store.history.clear();
        // Cut while holding the lock, so no open watch can still bookmark the new
        // revision and so skip the 410.
        self.cut_watches();
    }

    /// Requests served for a resource (by plural, e.g. `pods`).
    pub fn served(&self, plural: &str) -> Served {
        let store = self.inner.store.lock().expect("store lock");
        store.served.get(plural).copied().unwrap_or_default()
    }

    /// Requests served, for every resource.
    pub fn served_all(&self) -> BTreeMap<String, Served> {
        let store = self.inner.store.lock().expect("store lock");
        store
            .served
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect()
    }

    /// Creates or replaces an object (`apiVersion`, `kind`, `metadata.name`, and
    /// `metadata.namespace` for namespaced kinds); returns it as stored.
    pub fn apply(&self, mut object: Value) -> anyhow::Result<Value> {
        let api_version = object["apiVersion"].as_str().unwrap_or("").to_owned();
        let kind_name = object["kind"].as_str().unwrap_or("").to_owned();
        let kind = kind_of(&api_version, &kind_name)
            .ok_or_else(|| anyhow!("the double does not serve {api_version} {kind_name}"))?;
        let key = object_key(kind, &object)?;
        let mut store = self.inner.store.lock().expect("store lock");
        store.rv += 1;
        let rv = store.rv;
        let existing = store
            .objects
            .get(kind.plural)
            .and_then(|m| m.get(&key))
            .cloned();
        let meta = object["metadata"]
            .as_object_mut()
            .ok_or_else(|| anyhow!("metadata must be a mapping"))?;
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        let uid = match existing
            .as_ref()
            .and_then(|e| e["metadata"]["uid"].as_str())
        {
            Some(uid) => uid.to_owned(),
            None => match meta.get("uid").and_then(|u| u.as_str()) {
                Some(uid) => uid.to_owned(),
                None => {
                    store.next_uid += 1;
                    format!("00000000-0000-4000-8000-{:012}", store.next_uid)
                }
            },
        };
        let meta = object["metadata"].as_object_mut().expect("checked above");
        meta.insert("uid".into(), json!(uid));
        meta.entry("creationTimestamp")
            .or_insert(json!("2026-01-01T00:00:00Z"));
        let object = Arc::new(object);
        store
            .objects
            .entry(kind.plural)
            .or_default()
            .insert(key, object.clone());
        let change = Change {
            rv,
            plural: kind.plural,
            event: if existing.is_some() {
                "MODIFIED"
            } else {
                "ADDED"
            },
            object: object.clone(),
        };
        store.history.push(change.clone());
        drop(store);
        let _ = self.inner.changes.send(change);
        Ok((*object).clone())
    }

    /// Deletes an object; true if it existed.
    pub fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> bool {
        let Some(kind) = kind_of(api_version, kind) else {
            return false;
        };
        let key = if kind.namespaced {
            format!("{namespace}/{name}")
        } else {
            name.to_owned()
        };
        let mut store = self.inner.store.lock().expect("store lock");
        let Some(old) = store
            .objects
            .get_mut(kind.plural)
            .and_then(|m| m.remove(&key))
        else {
            return false;
        };
        store.rv += 1;
        let rv = store.rv;
        let mut object = (*old).clone();
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let change = Change {
            rv,
            plural: kind.plural,
            event: "DELETED",
            object: Arc::new(object),
        };
        store.history.push(change.clone());
        drop(store);
        let _ = self.inner.changes.send(change);
        true
    }

    /// Issues a token for `token` and returns it (a random string, as the server's are opaque to clients).
    pub fn issue_token(&self, token: IssuedToken) -> String {
        let text = format!("sa-token-{}", pod_uid());
        let mut store = self.inner.store.lock().expect("store lock");
        store.tokens.insert(text.clone(), token);
        text
    }

    /// Makes every TokenReview take `delay`, as on a loaded API server.
    pub fn set_review_delay(&self, delay: Duration) {
        self.inner.store.lock().expect("store lock").review_delay = delay;
    }

    /// TokenReviews answered so far.
    pub fn token_reviews(&self) -> u64 {
        self.inner.store.lock().expect("store lock").token_reviews
    }

    /// Writes a kubeconfig that points at this double, and returns its path.
    pub fn kubeconfig(&self) -> anyhow::Result<PathBuf> {
        let path = self.dir.path().join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster: {{server: \"http://{}\"}}\nusers:\n- name: agent\n  user: {{token: {TOKEN}}}\ncontexts:\n- name: double\n  context: {{cluster: double, user: agent}}\ncurrent-context: double\n",
            self.addr
        );
        std::fs::write(&path, text)?;
        Ok(path)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A loopback listener that may rebind a port just closed (SO_REUSEADDR).
async fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

fn object_key(kind: &Kind, object: &Value) -> anyhow::Result<String> {
    let name = object["metadata"]["name"]
        .as_str()
        .filter(|n| !n.is_empty())
        .context("metadata.name is required")?;
    if !kind.namespaced {
        return Ok(name.to_owned());
    }
    let namespace = object["metadata"]["namespace"]
        .as_str()
        .filter(|n| !n.is_empty())
        .context("metadata.namespace is required")?;
    Ok(format!("{namespace}/{name}"))
}

type Body = BoxBody<Bytes, Infallible>;

async fn serve(
    listener: tokio::net::TcpListener,
    inner: Arc<Inner>,
    mut running: watch::Receiver<bool>,
) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => continue,
            },
            _ = running.changed() => return,
        };
        let inner = inner.clone();
        let mut running = running.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let inner = inner.clone();
                async move {
                    if !authorized(&req) {
                        return Ok(respond(
                            StatusCode::UNAUTHORIZED,
                            status(401, "Unauthorized", "Unauthorized"),
                        ));
                    }
                    if req.method() == hyper::Method::POST
                        && req.uri().path() == "/apis/authentication.k8s.io/v1/tokenreviews"
                    {
                        return Ok::<_, Infallible>(token_review(&inner, req).await);
                    }
                    Ok::<_, Infallible>(handle(&inner, req))
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                // Dropping the connection is what a restart does to clients.
                _ = running.changed() => {}
            }
        });
    }
}

/// Answers a TokenReview as the API server does: authenticated with the user,
/// its pod binding and the requested audiences the token is valid for; or not,
/// with the reason.
async fn token_review(inner: &Arc<Inner>, req: Request<Incoming>) -> Response<Body> {
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return respond(
                StatusCode::BAD_REQUEST,
                status(400, "BadRequest", &e.to_string()),
            );
        }
    };
    let review: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return respond(
                StatusCode::BAD_REQUEST,
                status(400, "BadRequest", &e.to_string()),
            );
        }
    };
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let wanted: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let (issued, delay) = {
        let mut store = inner.store.lock().expect("store lock");
        store.token_reviews += 1;
        (store.tokens.get(token).cloned(), store.review_delay)
    };
    tokio::time::sleep(delay).await;
    let unauthenticated = |error: &str| json!({"authenticated": false, "user": {}, "error": error});
    let status_body = match issued {
        None => unauthenticated("invalid bearer token"),
        Some(t) if t.expires <= std::time::Instant::now() => {
            unauthenticated("invalid bearer token, token has expired")
        }
        Some(t) => {
            let valid: Vec<&String> = wanted.iter().filter(|a| t.audiences.contains(a)).collect();
            if !wanted.is_empty() && valid.is_empty() {
                unauthenticated("invalid bearer token, token audiences are invalid")
            } else {
                let mut extra = serde_json::Map::new();
                if let Some((name, uid)) = &t.pod {
                    extra.insert(
                        "authentication.kubernetes.io/pod-name".into(),
                        json!([name]),
                    );
                    extra.insert("authentication.kubernetes.io/pod-uid".into(), json!([uid]));
                }
                let (ns, sa) = &t.service_account;
                json!({
                    "authenticated": true,
                    "user": {
                        "username": format!("system:serviceaccount:{ns}:{sa}"),
                        "uid": format!("sa-uid-{ns}-{sa}"),
                        "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}"), "system:authenticated"],
                        "extra": extra,
                    },
                    "audiences": if wanted.is_empty() { json!(t.audiences) } else { json!(valid) },
                })
            }
        }
    };
    respond(
        StatusCode::CREATED,
        json!({
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": null},
            "spec": review["spec"],
            "status": status_body,
        }),
    )
}

/// Whether a request carries the double's bearer token.
fn authorized(req: &Request<Incoming>) -> bool {
    req.headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {TOKEN}"))
}

fn respond(status: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .expect("valid response")
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

/// Parses `/api/v1/<plural>` and `/apis/<group>/<version>/<plural>` (optionally
/// under `namespaces/<ns>/`).
fn route(path: &str) -> Option<(&'static Kind, Option<String>)> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (api_version, rest) = match parts.as_slice() {
        ["api", "v1", rest @ ..] => ("v1".to_owned(), rest),
        ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
        _ => return None,
    };
    let (namespace, plural) = match rest {
        [plural] => (None, *plural),
        ["namespaces", ns, plural] => (Some((*ns).to_owned()), *plural),
        _ => return None,
    };
    KINDS
        .iter()
        .find(|k| k.api_version == api_version && k.plural == plural)
        .map(|k| (k, namespace))
}

/// A parsed query: selectors and list/watch parameters.
#[derive(Default)]
struct Query {
    params: HashMap<String, String>,
}

impl Query {
    fn parse(query: Option<&str>) -> Self {
        let params = query
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (decode(k), decode(v))
            })
            .collect();
        Query { params }
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.params.get(key).map(String::as_str)
    }

    fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1"))
    }
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                Ok(v) => {
                    out.push(v);
                    i += 3;
                    continue;
                }
                Err(_) => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One requirement of a selector.
#[derive(Debug, Clone, PartialEq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
}

fn parse_selector(text: &str) -> Result<Vec<Requirement>, String> {
    text.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|part| {
            let part = part.trim();
            if let Some((k, v)) = part.split_once("!=") {
                Ok(Requirement::NotEquals(k.trim().into(), v.trim().into()))
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                Ok(Requirement::Equals(k.trim().into(), v.trim().into()))
            } else if let Some(k) = part.strip_prefix('!') {
                Ok(Requirement::NotExists(k.trim().into()))
            } else if part.contains(' ') || part.contains('(') {
                Err(format!(
                    "unsupported selector {part:?} (the double knows =, ==, != and existence)"
                ))
            } else {
                Ok(Requirement::Exists(part.into()))
            }
        })
        .collect()
}

fn matches(requirements: &[Requirement], get: impl Fn(&str) -> Option<String>) -> bool {
    requirements.iter().all(|r| match r {
        Requirement::Equals(k, v) => get(k).as_deref() == Some(v.as_str()),
        Requirement::NotEquals(k, v) => get(k).as_deref() != Some(v.as_str()),
        Requirement::Exists(k) => get(k).is_some(),
        Requirement::NotExists(k) => get(k).is_none(),
    })
}

/// The filters of one list or watch.
struct Filter {
    namespace: Option<String>,
    fields: Vec<Requirement>,
    labels: Vec<Requirement>,
}

impl Filter {
    fn from(namespace: Option<String>, query: &Query) -> Result<Self, String> {
        let fields = parse_selector(query.get("fieldSelector").unwrap_or(""))?;
        for r in &fields {
            let (Requirement::Equals(k, _) | Requirement::NotEquals(k, _)) = r else {
                return Err("field selectors take = or != only".into());
            };
            if !matches!(
                k.as_str(),
                "spec.nodeName" | "metadata.name" | "metadata.namespace"
            ) {
                return Err(format!("field label not supported: {k}"));
            }
        }
        Ok(Filter {
            namespace,
            fields,
            labels: parse_selector(query.get("labelSelector").unwrap_or(""))?,
        })
    }

    fn admits(&self, object: &Value) -> bool {
        if let Some(ns) = &self.namespace
            && object["metadata"]["namespace"].as_str() != Some(ns)
        {
            return false;
        }
        let field = |path: &str| -> Option<String> {
            let v = path.split('.').fold(object, |v, part| &v[part]);
            Some(v.as_str().unwrap_or("").to_owned())
        };
        let label = |key: &str| -> Option<String> {
            object["metadata"]["labels"][key]
                .as_str()
                .map(str::to_owned)
        };
        matches(&self.fields, field) && matches(&self.labels, label)
    }
}

fn handle(inner: &Arc<Inner>, req: Request<Incoming>) -> Response<Body> {
    if req.method() != hyper::Method::GET {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            status(
                405,
                "MethodNotAllowed",
                "the double serves list and watch only",
            ),
        );
    }
    let Some((kind, namespace)) = route(req.uri().path()) else {
        return respond(
            StatusCode::NOT_FOUND,
            status(
                404,
                "NotFound",
                &format!(
                    "the server could not find the requested resource {}",
                    req.uri().path()
                ),
            ),
        );
    };
    let query = Query::parse(req.uri().query());
    let filter = match Filter::from(namespace, &query) {
        Ok(f) => f,
        Err(message) => {
            return respond(StatusCode::BAD_REQUEST, status(400, "BadRequest", &message));
        }
    };
    if query.flag("watch") {
        watch_response(inner, kind, filter, &query)
    } else {
        list_response(inner, kind, &filter, &query)
    }
}

fn list_response(
    inner: &Arc<Inner>,
    kind: &'static Kind,
    filter: &Filter,
    query: &Query,
) -> Response<Body> {
    let limit = query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0);
    let mut store = inner.store.lock().expect("store lock");
    let served = store.served.entry(kind.plural).or_default();
    served.lists += 1;
    // A continue token is `<list resourceVersion>/<last key returned>`.
    let (list_rv, after) = match query.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => match token.split_once('/') {
            Some((rv, after)) => (
                rv.parse::<u64>().unwrap_or(0),
                Some(after.replace('|', "/")),
            ),
            None => {
                return respond(
                    StatusCode::BAD_REQUEST,
                    status(400, "BadRequest", "bad continue token"),
                );
            }
        },
        None => {
            served.list_starts += 1;
            (store.rv, None)
        }
    };
    if list_rv < store.compacted {
        return respond(
            StatusCode::GONE,
            status(
                410,
                "Expired",
                "The provided continue parameter is too old to display a consistent list result.",
            ),
        );
    }
    let empty = BTreeMap::new();
    let objects = store.objects.get(kind.plural).unwrap_or(&empty);
    let mut items = Vec::new();
    let mut next = None;
    let range = match &after {
        Some(after) => objects.range::<String, _>((
            std::ops::Bound::Excluded(after.clone()),
            std::ops::Bound::Unbounded,
        )),
        None => objects.range::<String, _>(..),
    };
    for (key, object) in range {
        let key: &String = key;
        if !filter.admits(object) {
            continue;
        }
        if limit.is_some_and(|l| items.len() == l) {
            let last = items.last().map(|(k, _): &(String, _)| k.replace('/', "|"));
            next = Some(format!("{list_rv}/{}", last.unwrap_or_default()));
            break;
        }
        items.push((key.clone(), object.clone()));
    }
    let mut metadata = json!({"resourceVersion": list_rv.to_string()});
    if let Some(token) = next {
        metadata["continue"] = json!(token);
    }
    let items: Vec<&Value> = items.iter().map(|(_, o)| o.as_ref()).collect();
    let list_api = kind.api_version;
    respond(
        StatusCode::OK,
        json!({"apiVersion": list_api, "kind": format!("{}List", kind.kind), "metadata": metadata, "items": items}),
    )
}

fn watch_response(
    inner: &Arc<Inner>,
    kind: &'static Kind,
    filter: Filter,
    query: &Query,
) -> Response<Body> {
    let bookmarks = query.flag("allowWatchBookmarks");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    // Subscribe before reading history, so no change falls between the two.
    let live = inner.changes.subscribe();
    let mut cut = inner.cut.subscribe();
    cut.mark_unchanged();
    let (replay, expired) = {
        let mut store = inner.store.lock().expect("store lock");
        store.served.entry(kind.plural).or_default().watches += 1;
        if from != 0 && from < store.compacted {
            (Vec::new(), true)
        } else if from == 0 {
            // "Any" version: start with the current objects as ADDED.
            let objects = store.objects.get(kind.plural).cloned().unwrap_or_default();
            let replay = objects
                .values()
                .map(|o| Change {
                    rv: store.rv,
                    plural: kind.plural,
                    event: "ADDED",
                    object: o.clone(),
                })
                .collect();
            (replay, false)
        } else {
            let replay = store
                .history
                .iter()
                .filter(|c| c.plural == kind.plural && c.rv > from)
                .cloned()
                .collect();
            (replay, false)
        }
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1024);
    let inner = inner.clone();
    tokio::spawn(async move {
        let line = |v: Value| Bytes::from(format!("{v}\n"));
        if expired {
            let _ = tx
                .send(line(json!({"type": "ERROR", "object": status(410, "Expired", &format!("too old resource version: {from}"))})))
                .await;
            return;
        }
        let mut last = from;
        for change in replay {
            if filter.admits(&change.object) {
                last = last.max(change.rv);
                if tx
                    .send(line(
                        json!({"type": change.event, "object": *change.object}),
                    ))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
        let mut live = live;
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(inner.bookmark_interval);
        tick.tick().await;
        loop {
            tokio::select! {
                // A cut is always seen before anything sent after it.
                biased;
                _ = cut.changed() => return,
                _ = &mut deadline => return,
                change = live.recv() => match change {
                    Ok(c) if c.plural == kind.plural && c.rv > last => {
                        last = c.rv;
                        if filter.admits(&c.object)
                            && tx.send(line(json!({"type": c.event, "object": *c.object}))).await.is_err()
                        {
                            return;
                        }
                    }
                    Ok(_) => {}
                    // Fell behind or shut down: end the watch; the client resumes.
                    Err(_) => return,
                },
                _ = tick.tick(), if bookmarks => {
                    let rv = {
                        let store = inner.store.lock().expect("store lock");
                        if cut.has_changed().unwrap_or(true) {
                            return;
                        }
                        store.rv
                    };
                    last = last.max(rv);
                    let bookmark = json!({"type": "BOOKMARK", "object": {
                        "apiVersion": kind.api_version, "kind": kind.kind,
                        "metadata": {"resourceVersion": rv.to_string()}}});
                    if tx.send(line(bookmark)).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|bytes| (Ok::<_, Infallible>(Frame::data(bytes)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors() {
        let pod = json!({"metadata": {"name": "a", "namespace": "shop", "labels": {"app": "web"}},
                         "spec": {"nodeName": "node-1"}});
        let q = |s: &str| Query::parse(Some(s));
        let f = Filter::from(
            None,
            &q("fieldSelector=spec.nodeName%3Dnode-1&labelSelector=app%3Dweb"),
        )
        .unwrap();
        assert!(f.admits(&pod));
        let f = Filter::from(None, &q("fieldSelector=spec.nodeName%3Dnode-2")).unwrap();
        assert!(!f.admits(&pod));
        let f = Filter::from(None, &q("labelSelector=app!%3Dweb")).unwrap();
        assert!(!f.admits(&pod));
        let f = Filter::from(Some("other".into()), &q("")).unwrap();
        assert!(!f.admits(&pod));
        assert!(Filter::from(None, &q("fieldSelector=status.phase%3DRunning")).is_err());
        assert!(Filter::from(None, &q("labelSelector=app+in+(a,b)")).is_err());
    }

    #[test]
    fn routes() {
        assert_eq!(route("/api/v1/pods").unwrap().0.kind, "Pod");
        assert_eq!(route("/api/v1/namespaces").unwrap().0.kind, "Namespace");
        let (k, ns) =
            route("/apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes").unwrap();
        assert_eq!((k.kind, ns.as_deref()), ("HTTPRoute", Some("shop")));
        assert!(route("/apis/unknown/v1/things").is_none());
    }
}
