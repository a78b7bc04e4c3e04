//! Property tests of everything that reads untrusted bytes: protocol detection,
//! the HTTP/1 and HTTP/2 front ends, the HBONE CONNECT target, the config
//! parser and the authorization policy matcher. Each runs thousands of
//! generated and mutated inputs (the count is in its `ProptestConfig`) and
//! must find no panic, no hang (every input is bounded in time) and no answer
//! that breaks the rule the code promises. cargo-fuzz would need a nightly
//! toolchain; these run in `cargo xtask test`.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Method, Response};
use hyper_util::rt::TokioIo;
use mesh_agent::proxy::l7::L7Settings;
use mesh_agent::proxy::l7::detect::{Detected, H2_PREFACE, classify};
use mesh_agent::proxy::l7::forward::{http1_server, http2_server};
use mesh_agent::proxy::tunnel::server::{TargetError, connect_target};
use mesh_agent::state::policy::{Action, Connection, Decision, authorize};
use mesh_agent::state::workload::WorkloadMeta;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `n` cases; a failure is reported with its minimal input, which then
/// becomes a fixed test here (no regression file to keep beside the source).
fn cases(n: u32) -> ProptestConfig {
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Upper bound on any one input's handling: past it, the input hung.
const HANG: Duration = Duration::from_secs(5);

/// Runs `f` on a thread of its own and fails the case if it takes longer than
/// [`HANG`] (a hang, not a slow run: normal inputs take microseconds).
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(HANG)
        .unwrap_or_else(|_| panic!("{what} did not finish within {HANG:?}"))
}

/// One edit of a seed input.
#[derive(Debug, Clone)]
enum Edit {
    Flip(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Truncate(usize),
    Duplicate(usize, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Edit::Flip(p, b)),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(p, b)| Edit::Insert(p, b)),
        (any::<usize>(), 1usize..32).prop_map(|(p, n)| Edit::Delete(p, n)),
        any::<usize>().prop_map(Edit::Truncate),
        (any::<usize>(), 1usize..64).prop_map(|(p, n)| Edit::Duplicate(p, n)),
    ]
}

/// `seed` with `edits` applied: inputs close to valid ones, where parsers' edge
/// cases live, rather than noise they reject at the first byte.
fn mutate(seed: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut out = seed.to_vec();
    for e in edits {
        let at = |p: usize| {
            if out.is_empty() {
                0
            } else {
                p % (out.len() + 1)
            }
        };
        match e {
            Edit::Flip(p, b) if !out.is_empty() => {
                let i = p % out.len();
                out[i] ^= b | 1;
            }
            Edit::Flip(..) => {}
            Edit::Insert(p, bytes) => {
                let i = at(*p);
                out.splice(i..i, bytes.iter().copied());
            }
            Edit::Delete(p, n) => {
                let i = at(*p);
                let end = (i + n).min(out.len());
                out.drain(i..end);
            }
            Edit::Truncate(p) => {
                let i = at(*p);
                out.truncate(i);
            }
            Edit::Duplicate(p, n) => {
                let i = at(*p);
                let end = (i + n).min(out.len());
                let copy = out[i..end].to_vec();
                out.splice(i..i, copy);
            }
        }
    }
    out
}

fn mutated(seeds: &'static [&'static [u8]]) -> impl Strategy<Value = Vec<u8>> {
    (0..seeds.len(), prop::collection::vec(edit(), 0..6))
        .prop_map(move |(i, edits)| mutate(seeds[i], &edits))
}

// ---------------------------------------------------------------- detection

const DETECTION_SEEDS: &[&[u8]] = &[
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /x HTTP/1.1\r\ncontent-length: 3\r\n\r\nabc",
    H2_PREFACE,
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    b"SSH-2.0-OpenSSH_9.6\r\n",
    b"*1\r\n$4\r\nPING\r\n",
];

proptest! {
    #![proptest_config(cases(50_000))]

    /// Detection is total and stable: once it decides, more bytes never change
    /// the decision, and it asks for more only while the bytes are a prefix of
    /// something it recognises (so it never waits on a byte it will not use).
    #[test]
    fn protocol_detection_decides_once_and_for_good(
        first in prop_oneof![mutated(DETECTION_SEEDS), prop::collection::vec(any::<u8>(), 0..40)],
        more in prop::collection::vec(any::<u8>(), 0..40),
    ) {
        let decided = classify(&first);
        let mut longer = first.clone();
        longer.extend_from_slice(&more);
        match decided {
            Some(d) => prop_assert_eq!(classify(&longer), Some(d)),
            None => prop_assert!(
                first.is_empty()
                    || H2_PREFACE.starts_with(&first)
                    || [&b"GET "[..], b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"OPTIONS ", b"TRACE ", b"PATCH "]
                        .iter()
                        .any(|m| m.starts_with(&first)),
                "waits for more after {:?}", String::from_utf8_lossy(&first)
            ),
        }
        if longer.starts_with(H2_PREFACE) {
            prop_assert_eq!(classify(&longer), Some(Detected::Http2));
        }
    }
}

// ------------------------------------------------------- HTTP front ends

fn settings() -> L7Settings {
    L7Settings {
        header_timeout: Duration::from_millis(500),
        max_header_bytes: 16 * 1024,
        ..L7Settings::default()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn ok(
    _: hyper::Request<hyper::body::Incoming>,
) -> Result<Response<Empty<Bytes>>, Infallible> {
    Ok(Response::new(Empty::new()))
}

/// Serves `input` on the HTTP/`version` front end; returns the bytes it
/// answered. With `then_eof` the client closes after writing and everything
/// answered is read; without, the first answer is awaited. Bounded by [`HANG`].
fn serve(version: u8, input: Vec<u8>, then_eof: bool) -> usize {
    within("serving one connection", move || {
        runtime().block_on(async move {
            let (mut client, server) = tokio::io::duplex(64 * 1024);
            let settings = settings();
            let served = tokio::spawn(async move {
                let io = TokioIo::new(server);
                let service = hyper::service::service_fn(ok);
                if version == 1 {
                    let _ = http1_server(&settings)
                        .serve_connection(io, service)
                        .with_upgrades()
                        .await;
                } else {
                    let _ = http2_server(&settings).serve_connection(io, service).await;
                }
            });
            let _ = client.write_all(&input).await;
            let answered = if then_eof {
                let _ = client.shutdown().await;
                let mut answer = Vec::new();
                let _ = client.read_to_end(&mut answer).await;
                answer.len()
            } else {
                let mut first = vec![0u8; 4096];
                client.read(&mut first).await.unwrap_or(0)
            };
            drop(client);
            served.await.expect("the front end panicked");
            answered
        })
    })
}

const HTTP1_SEEDS: &[&[u8]] = &[
    b"GET / HTTP/1.1\r\nHost: web\r\n\r\n",
    b"POST /orders HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /up HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"GET /a HTTP/1.1\r\nHost: web\r\n\r\nGET /b HTTP/1.1\r\nHost: web\r\n\r\n",
    b"HEAD / HTTP/1.0\r\n\r\n",
];

/// A client preface, then frames: SETTINGS, a HEADERS frame with an HPACK
/// block (`:method GET`, `:path /`, `:scheme http`, `:authority web`), DATA,
/// WINDOW_UPDATE, PING, RST_STREAM, GOAWAY.
const H2_FRAMES: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\
\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00\x64\
\x00\x00\x08\x01\x05\x00\x00\x00\x01\x82\x84\x86\x41\x03\x77\x65\x62\
\x00\x00\x03\x00\x01\x00\x00\x00\x01abc\
\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x10\x00\
\x00\x00\x08\x06\x00\x00\x00\x00\x00\x01\x02\x03\x04\x05\x06\x07\x08\
\x00\x00\x04\x03\x00\x00\x00\x00\x01\x00\x00\x00\x08\
\x00\x00\x08\x07\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00";

const H2_SEEDS: &[&[u8]] = &[H2_FRAMES];

proptest! {
    #![proptest_config(cases(10_000))]

    /// The HTTP/1 front end answers or closes on any bytes, ends when the
    /// client does, and never panics; a well-formed request gets an answer.
    #[test]
    fn the_http1_front_end_ends_on_any_bytes(
        input in prop_oneof![mutated(HTTP1_SEEDS), prop::collection::vec(any::<u8>(), 0..256)],
    ) {
        serve(1, input, true);
    }
}

proptest! {
    #![proptest_config(cases(5_000))]

    /// The HTTP/2 front end ends on any frames after the preface and never panics.
    #[test]
    fn the_http2_front_end_ends_on_any_frames(
        input in prop_oneof![
            mutated(H2_SEEDS),
            prop::collection::vec(any::<u8>(), 0..256).prop_map(|tail| [H2_PREFACE, &tail].concat()),
        ],
    ) {
        serve(2, input, true);
    }
}

/// The unmutated seeds are answered: the properties above would also pass on
/// a front end that closed every connection unanswered.
#[test]
fn valid_requests_are_answered() {
    for seed in HTTP1_SEEDS {
        let answered = serve(1, seed.to_vec(), false);
        assert!(answered > 0, "{}", String::from_utf8_lossy(seed));
    }
    assert!(serve(2, H2_FRAMES.to_vec(), false) > 0);
}

// ------------------------------------------------------------ HBONE CONNECT

fn pod_ips() -> Vec<IpAddr> {
    vec!["10.1.0.7".parse().unwrap(), "fd00::7".parse().unwrap()]
}

fn authority() -> impl Strategy<Value = String> {
    prop_oneof![
        (
            prop::sample::select(vec![
                "10.1.0.7",
                "[fd00::7]",
                "10.1.0.8",
                "[fd00::8]",
                "0.0.0.0"
            ]),
            any::<u16>()
        )
            .prop_map(|(ip, port)| format!("{ip}:{port}")),
        "[a-z0-9.:\\[\\]%@-]{0,40}",
        prop::collection::vec(any::<u8>(), 0..40)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ]
}

proptest! {
    #![proptest_config(cases(20_000))]

    /// A tunnel stream reaches this pod only with CONNECT to `ip:port` where ip
    /// is one of the pod's own, whatever a peer puts in method and authority.
    #[test]
    fn a_connect_target_is_only_ever_one_of_this_pods_addresses(
        method in prop::sample::select(vec!["CONNECT", "GET", "POST", "connect", "PRI"]),
        authority in authority(),
    ) {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let Ok(uri) = authority.parse::<hyper::Uri>() else {
            return Ok(());
        };
        match connect_target(&method, &uri, &pod_ips()) {
            Ok(target) => {
                prop_assert_eq!(&method, &Method::CONNECT);
                prop_assert!(pod_ips().contains(&target.ip()));
                prop_assert_eq!(Some(target), authority.parse::<SocketAddr>().ok());
            }
            Err(TargetError::NotConnect) => prop_assert_ne!(method, Method::CONNECT),
            Err(TargetError::NotThisPod(addr)) => prop_assert!(!pod_ips().contains(&addr.ip())),
            Err(TargetError::BadAuthority) => {}
        }
    }
}

// ------------------------------------------------------------- config parser

const CONFIG_SEED: &str = r#"apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {name: web-1, namespace: shop, labels: {app: web, version: v1}}
spec:
  serviceAccount: web
  cgroupPath: /kubepods/pod1
  netns: {path: /run/netns/web-1}
  ips: [10.1.0.7, "fd00::7"]
  excludedPorts: [22]
  excludedCidrs: [169.254.0.0/16]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080, appProtocol: http}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: split, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: x-canary, value: "1"}]}]
      backendRefs: [{name: web, port: 80, weight: 80}, {name: web-v2, port: 80, weight: 20}]
      timeouts: {request: 2s}
      retry: {attempts: 3, codes: [503]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-shop, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
    - from: [{source: {principals: ["cluster.local/ns/shop/sa/*"], ipBlocks: [10.0.0.0/8]}}]
      to: [{operation: {ports: ["8080"], notPorts: ["9090"]}}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: shop}
spec: {mtls: {mode: STRICT}}
"#;

proptest! {
    #![proptest_config(cases(10_000))]

    /// The config parser accepts or rejects any edit of a valid file with an
    /// error naming a document, and never panics or hangs.
    #[test]
    fn the_config_parser_survives_any_edit_of_a_valid_file(
        edits in prop::collection::vec(edit(), 1..8),
    ) {
        let text = String::from_utf8_lossy(&mutate(CONFIG_SEED.as_bytes(), &edits)).into_owned();
        let result = within("parsing a config", move || mesh_agent::state::parse(&text).map(|_| ()));
        if let Err(e) = result {
            prop_assert!(!e.to_string().is_empty());
        }
    }
}

/// Regression cases found or feared: YAML alias bombs ("billion laughs") and
/// deep nesting are refused quickly instead of expanded or recursed into.
#[test]
fn yaml_bombs_and_deep_nesting_are_refused() {
    let names = ["a", "b", "c", "d", "e", "f", "g", "h", "i"];
    let mut bomb = String::from("a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for pair in names.windows(2) {
        let (prev, next) = (pair[0], pair[1]);
        let refs = vec![format!("*{prev}"); 9].join(", ");
        bomb.push_str(&format!("{next}: &{next} [{refs}]\n"));
    }
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    for text in [bomb, deep] {
        let result = within("parsing a hostile config", move || {
            mesh_agent::state::parse(&text).map(|_| ())
        });
        assert!(result.is_err());
    }
}

// ------------------------------------------------------------- policy matcher

fn principal() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "cluster.local/ns/shop/sa/web",
        "cluster.local/ns/shop/sa/*",
        "*/ns/backend/sa/db",
        "*",
        "cluster.local/ns/other/sa/x",
    ])
    .prop_map(str::to_owned)
}

fn block() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "10.0.0.0/8",
        "10.1.0.7",
        "192.168.0.0/16",
        "fd00::/8",
        "not-an-ip",
    ])
    .prop_map(str::to_owned)
}

fn port() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["8080", "9090", "80", "0", "http"]).prop_map(str::to_owned)
}

/// One AuthorizationPolicy document, every field drawn from a small pool so
/// that matches and misses both happen often.
fn policy_doc(index: usize) -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec!["shop", "backend"]),
        prop::option::of(prop::sample::select(vec!["web", "db"])),
        prop::sample::select(vec!["ALLOW", "DENY", "AUDIT"]),
        prop::collection::vec(
            (
                prop::collection::vec(principal(), 0..3),
                prop::collection::vec(prop::sample::select(vec!["shop", "backend", "other"]), 0..2),
                prop::collection::vec(block(), 0..2),
                prop::collection::vec(port(), 0..2),
                prop::collection::vec(port(), 0..2),
                prop::collection::vec(prop::sample::select(vec!["GET", "POST"]), 0..2),
                prop::collection::vec(prop::sample::select(vec!["/api/*", "/admin", "*.json"]), 0..2),
            ),
            0..3,
        ),
    )
        .prop_map(move |(ns, app, action, rules)| {
            let selector = app.map(|a| format!("  selector: {{matchLabels: {{app: {a}}}}}\n")).unwrap_or_default();
            let rules: Vec<String> = rules
                .into_iter()
                .map(|(principals, namespaces, blocks, ports, not_ports, methods, paths)| {
                    format!(
                        "    - from: [{{source: {{principals: {principals:?}, namespaces: {namespaces:?}, ipBlocks: {blocks:?}}}}}]\n      to: [{{operation: {{ports: {ports:?}, notPorts: {not_ports:?}, methods: {methods:?}, notPaths: {paths:?}}}}}]\n"
                    )
                })
                .collect();
            format!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p{index}, namespace: {ns}}}\nspec:\n{selector}  action: {action}\n  rules:\n{}",
                if rules.is_empty() { "    []\n".to_owned() } else { rules.concat() }
            )
        })
}

fn connection() -> impl Strategy<Value = Connection> {
    (
        prop::option::of(prop::sample::select(vec![
            ("shop", "web"),
            ("backend", "db"),
            ("other", "x"),
        ])),
        prop::sample::select(vec![
            "10.1.0.7",
            "10.200.0.1",
            "192.168.3.4",
            "fd00::9",
            "2001:db8::1",
        ]),
        prop::sample::select(vec![8080u16, 9090, 80, 443]),
    )
        .prop_map(|(source, ip, port)| Connection {
            source: source
                .map(|(ns, sa)| mesh_agent::identity::Identity::new("cluster.local", ns, sa)),
            source_ip: ip.parse().unwrap(),
            destination_ip: "10.1.0.5".parse().unwrap(),
            destination_port: port,
        })
}

fn workload() -> impl Strategy<Value = WorkloadMeta> {
    (
        prop::sample::select(vec!["shop", "backend"]),
        prop::sample::select(vec!["web", "db"]),
    )
        .prop_map(|(ns, app)| WorkloadMeta {
            name: Arc::from(format!("{app}-1")),
            namespace: Arc::from(ns),
            service_account: Arc::from(app),
            labels: Arc::new([("app".to_owned(), app.to_owned())].into()),
            workload_name: Arc::from(app),
            meshed: true,
            trust_domain: Arc::from("cluster.local"),
        })
}

proptest! {
    #![proptest_config(cases(20_000))]

    /// Istio's order holds for any policies: the decision does not depend on
    /// their order; dropping every DENY never turns an allow into a deny; and a
    /// DENY for the workload's namespace that matches everything denies all.
    #[test]
    fn authorization_follows_istio_order_for_any_policies(
        docs in prop::collection::vec((0usize..1000).prop_flat_map(policy_doc), 0..5),
        w in workload(),
        c in connection(),
    ) {
        // Documents the parser rejects (an invalid ipBlock, say) never reach the matcher.
        let Ok(config) = mesh_agent::state::parse(&docs.join("---\n")) else {
            return Ok(());
        };
        let policies = config.authorization_policies;
        let decision = authorize(&w, &policies, &c);
        let mut reversed = policies.clone();
        reversed.reverse();
        prop_assert_eq!(
            matches!(authorize(&w, &reversed, &c), Decision::Allow),
            matches!(decision, Decision::Allow)
        );
        let without_deny: Vec<_> = policies
            .iter()
            .filter(|p| p.action != Action::Deny)
            .cloned()
            .collect();
        if decision == Decision::Allow {
            prop_assert_eq!(authorize(&w, &without_deny, &c), Decision::Allow);
        }
        let deny_all = mesh_agent::state::parse(&format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: deny-all, namespace: {}}}\nspec:\n  action: DENY\n  rules: [{{}}]\n",
            w.namespace
        ))
        .unwrap()
        .authorization_policies;
        let mut with_deny_all = policies.clone();
        with_deny_all.extend(deny_all);
        // Denied outright, or (where rules about HTTP apply) request by request.
        prop_assert!(matches!(
            authorize(&w, &with_deny_all, &c),
            Decision::Deny(_) | Decision::PerRequest
        ));
        let all = mesh_agent::state::policy::Policies {
            authorization_policies: with_deny_all,
            ..Default::default()
        };
        let headers = http::HeaderMap::new();
        let request = mesh_agent::state::policy::Request { method: "GET", path: "/", host: "h", headers: &headers };
        prop_assert!(matches!(all.decide_request(&w, &c, &request), Decision::Deny(_)));
        prop_assert!(matches!(all.decide_opaque(&w, &c), Decision::Deny(_)));
    }

    /// A connection's decision never contradicts its requests': a connection
    /// allowed or denied outright has every request decided the same way, and
    /// one left to its requests is never decided per request when it is not
    /// HTTP (it is then allowed or denied whole).
    #[test]
    fn connection_and_request_decisions_agree(
        docs in prop::collection::vec((0usize..1000).prop_flat_map(policy_doc), 0..5),
        w in workload(),
        c in connection(),
        method in prop::sample::select(vec!["GET", "POST", "DELETE"]),
        path in prop::sample::select(vec!["/api/x", "/admin", "/a.json", "/"]),
    ) {
        let Ok(config) = mesh_agent::state::parse(&docs.join("---\n")) else {
            return Ok(());
        };
        let policies = mesh_agent::state::policy::Policies {
            authorization_policies: config.authorization_policies,
            ..Default::default()
        };
        let headers = http::HeaderMap::new();
        let request = mesh_agent::state::policy::Request { method, path, host: "api", headers: &headers };
        let per_connection = policies.decide(&w, &c);
        let per_request = policies.decide_request(&w, &c, &request);
        prop_assert!(per_request != Decision::PerRequest);
        prop_assert!(policies.decide_opaque(&w, &c) != Decision::PerRequest);
        match per_connection {
            Decision::Allow => prop_assert_eq!(per_request, Decision::Allow),
            Decision::Deny(_) => prop_assert!(matches!(per_request, Decision::Deny(_))),
            Decision::PerRequest => {}
        }
    }
}
