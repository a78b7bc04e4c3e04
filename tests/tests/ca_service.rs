//! End-to-end tests of the mesh CA service (`mesh-agent ca serve`): agents in
//! Kubernetes mode get their workloads' certificates from it over Istio's
//! certificate API, authenticated by TokenReview against the API server
//! double, and only for pods on their own node. The signing key stays with the
//! service.

use std::path::Path;
use std::time::{Duration, Instant};

use mesh_agent::identity::istio_ca::{
    IstioCertificateRequest, impersonation_metadata,
    istio_certificate_service_client::IstioCertificateServiceClient,
};
use nodemesh_testkit::apiserver::{ApiServer, IssuedToken, namespace, pod_uid as uid};
use nodemesh_testkit::ca::{AgentCredentials, CaServer, SERVER_NAME};
use nodemesh_testkit::{
    Agent, KubeletLayout, MeshCa, Node, Pod, Process, Tools, assert_lossless, run_json,
    start_tcp_load, wait_until,
};
use serde_json::json;

const ECHO_PORT: u16 = 9000;
const RUN: Duration = Duration::from_secs(90);

/// Two linked nodes, a meshed pod on each (an echo server on both), a CA
/// service, and an agent per node that gets its certificates from the service.
struct Mesh {
    tools: Tools,
    api: ApiServer,
    ca_files: MeshCa,
    ca: CaServer,
    a: Pod,
    b: Pod,
    near: Agent,
    far: Agent,
    creds: [AgentCredentials; 2],
    _echo: [Process; 2],
    node0: Node,
    node1: Node,
}

impl Mesh {
    /// `agent_args` go to both agents (e.g. a short `--cert-lifetime`).
    fn new(agent_args: &[&str]) -> Self {
        let tools = Tools::new(env!("CARGO_BIN_EXE_podtool")).unwrap();
        let ca_files = MeshCa::init(&tools).unwrap();
        let api = ApiServer::start().unwrap();
        let ca = CaServer::start(&tools, &api, &ca_files.dir, &[]).unwrap();
        Self::with(tools, api, ca_files, ca, agent_args, |ca| ca.url())
    }

    /// Like [`Mesh::new`] with the CA service already running, and agents
    /// dialling `address(ca)` (a balancer in front, say).
    fn with(
        tools: Tools,
        api: ApiServer,
        ca_files: MeshCa,
        ca: CaServer,
        agent_args: &[&str],
        address: impl Fn(&CaServer) -> String,
    ) -> Self {
        let mut node0 = Node::with_index(0).unwrap();
        let mut node1 = Node::with_index(1).unwrap();
        node0.link(&node1).unwrap();
        let a = node0
            .add_kube_pod("a", "shop", &uid(), KubeletLayout::SystemdGuaranteed)
            .unwrap();
        let b = node1
            .add_kube_pod("b", "shop", &uid(), KubeletLayout::CgroupfsBurstable)
            .unwrap();
        let echo = [&a, &b].map(|pod| {
            pod.serve(
                &tools,
                &["echo", "--listen", &pod.addr(ECHO_PORT).to_string()],
            )
            .unwrap()
        });
        api.apply(namespace("shop", true)).unwrap();
        for pod in [&a, &b] {
            api.apply(pod.kube_object(None, json!({"app": pod.name})))
                .unwrap();
        }
        let creds = [&node0, &node1].map(|n| AgentCredentials::for_node(&api, &ca, n).unwrap());
        let start = |node: &Node, creds: &AgentCredentials| {
            let mut args = creds.args();
            args[1] = address(&ca);
            args.extend(agent_args.iter().map(|a| a.to_string()));
            let argv: Vec<&str> = args.iter().map(String::as_str).collect();
            Agent::start_kube(&tools, node, &api, &argv)
                .unwrap_or_else(|e| panic!("{e}\nCA log:\n{}", ca.log()))
        };
        let near = start(&node0, &creds[0]);
        let far = start(&node1, &creds[1]);
        let mesh = Mesh {
            tools,
            api,
            ca_files,
            ca,
            a,
            b,
            near,
            far,
            creds,
            _echo: echo,
            node0,
            node1,
        };
        for (agent, pod) in [(&mesh.near, &mesh.a), (&mesh.far, &mesh.b)] {
            wait_until("certificate issued", Duration::from_secs(15), || {
                Ok(certificates(agent).iter().any(|(id, serial, state)| {
                    id.ends_with(&format!("/sa/{}-sa", pod.name))
                        && serial.is_some()
                        && state == "available"
                }))
            })
            .unwrap_or_else(|e| panic!("{e}\nagent:\n{}\nCA:\n{}", agent.log(), mesh.ca.log()));
        }
        mesh
    }

    /// A 200 kB echo stream from `from` to `to` comes back byte-exact.
    fn assert_served(&self, from: &Pod, to: &Pod) {
        let mut cmd = from.command(&self.tools.podtool).unwrap();
        cmd.args([
            "stream",
            "--to",
            &to.addr(ECHO_PORT).to_string(),
            "--bytes",
            "200000",
        ]);
        let report = run_json(&mut cmd, RUN).unwrap();
        assert_eq!(report["received"], 200_000, "{report}\n{}", self.near.log());
        assert_eq!(report["sent_sha256"], report["received_sha256"], "{report}");
    }
}

/// `(identity, serial, state)` of every certificate an agent holds.
fn certificates(agent: &Agent) -> Vec<(String, Option<String>, String)> {
    agent.config_dump().unwrap()["certificates"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|c| {
            (
                c["identity"].as_str().unwrap_or_default().to_owned(),
                c["serial"].as_str().map(str::to_owned),
                c["state"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn serials(agent: &Agent) -> Vec<String> {
    let mut serials: Vec<String> = certificates(agent)
        .into_iter()
        .filter_map(|(_, serial, _)| serial)
        .collect();
    serials.sort();
    serials
}

/// Files the agent process can be seen to read: those named on its command
/// line and those it holds open.
fn files_of(pid: u32) -> Vec<std::path::PathBuf> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let mut files: Vec<std::path::PathBuf> = cmdline
        .split(|b| *b == 0)
        .map(|a| std::path::PathBuf::from(String::from_utf8_lossy(a).into_owned()))
        .filter(|p| p.is_absolute() && p.is_file())
        .collect();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        if let Ok(target) = std::fs::read_link(fd.path())
            && target.is_file()
        {
            files.push(target);
        }
    }
    files
}

/// Acceptance 1: two nodes whose agents get certificates from the CA service
/// carry mTLS traffic, each certificate was signed by the service for the
/// agent's own node, and no file the agents read or hold holds a private key.
#[test]
fn agents_use_the_ca_service_and_no_agent_file_holds_a_signing_key() {
    let mesh = Mesh::new(&[]);
    mesh.assert_served(&mesh.a, &mesh.b);
    mesh.assert_served(&mesh.b, &mesh.a);
    let principal = |pod: &str| format!("spiffe://cluster.local/ns/shop/sa/{pod}-sa");
    wait_until("mutual TLS reported", Duration::from_secs(10), || {
        Ok(mesh.near.metric(
            "istio_tcp_connections_closed_total",
            &[
                ("reporter", "source"),
                ("connection_security_policy", "mutual_tls"),
                ("destination_principal", &principal("b")),
            ],
        )? >= 1.0)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.near.metrics().unwrap()));
    assert!(mesh.ca.answered("signed") >= 2.0, "{}", mesh.ca.log());
    let log = mesh.ca.log();
    for (pod, node) in [("a", &mesh.node0), ("b", &mesh.node1)] {
        assert!(
            log.lines().any(|l| l.contains("certificate signed")
                && l.contains(&principal(pod))
                && l.contains(&format!("node={}", node.name()))),
            "no signature of {pod} for {}:\n{log}",
            node.name()
        );
    }
    for agent in [&mesh.near, &mesh.far] {
        let files = files_of(agent.pid());
        assert!(!files.is_empty());
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            assert!(
                !text.contains("PRIVATE KEY"),
                "{} holds a private key",
                file.display()
            );
            assert!(
                !file.starts_with(&mesh.ca_files.dir),
                "the agent reads the CA directory: {}",
                file.display()
            );
        }
    }
}

/// A gRPC client of the CA service, as any caller would be.
fn client(
    ca: &CaServer,
    root: &Path,
) -> (
    tokio::runtime::Runtime,
    IstioCertificateServiceClient<tonic::transport::Channel>,
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pem = std::fs::read(root).unwrap();
    let channel = rt.block_on(async {
        tonic::transport::Endpoint::from_shared(ca.url())
            .unwrap()
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(pem))
                    .domain_name(SERVER_NAME),
            )
            .unwrap()
            .connect()
            .await
            .unwrap()
    });
    (rt, IstioCertificateServiceClient::new(channel))
}

fn csr_for(san: &str) -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(san.try_into().unwrap())];
    params.serialize_request(&key).unwrap().pem().unwrap()
}

/// Acceptance 2: a node agent asking for an identity with no pod on its node,
/// a token of another service account, an expired token, a token for another
/// audience, no token, and a CSR whose name differs from the requested
/// identity: each is refused with PERMISSION_DENIED or UNAUTHENTICATED, logged
/// with caller, node and identity, counted, and nothing is signed.
#[test]
fn the_ca_refuses_what_a_node_may_not_have() {
    let tools = Tools::new(env!("CARGO_BIN_EXE_podtool")).unwrap();
    let ca_files = MeshCa::init(&tools).unwrap();
    let api = ApiServer::start().unwrap();
    let ca = CaServer::start(&tools, &api, &ca_files.dir, &[]).unwrap();
    let node_a = format!("node-a-{}", std::process::id());
    let agent = AgentCredentials::for_node_name(&api, &ca, &node_a).unwrap();
    let workload_pod = |ns: &str, name: &str, node: &str, uid: &str| {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "uid": uid},
            "spec": {"nodeName": node, "serviceAccountName": name, "containers": [{"name": "app", "image": "app"}]},
            "status": {"phase": "Running"},
        })
    };
    let cart_uid = uid();
    api.apply(workload_pod("shop", "cart", &node_a, &cart_uid))
        .unwrap();
    api.apply(workload_pod("payments", "ledger", "node-b", &uid()))
        .unwrap();
    let cart = "spiffe://cluster.local/ns/shop/sa/cart";
    let ledger = "spiffe://cluster.local/ns/payments/sa/ledger";
    let token = |sa: (&str, &str), pod: Option<(&str, &str)>, audience: &str, ttl: Duration| {
        api.issue_token(IssuedToken {
            service_account: (sa.0.into(), sa.1.into()),
            pod: pod.map(|(n, u)| (n.into(), u.into())),
            audiences: vec![audience.into()],
            expires: Instant::now() + ttl,
        })
    };
    let agent_sa = ("nodemesh-system", "nodemesh-agent");
    let hour = Duration::from_secs(3600);
    let expired = token(agent_sa, None, "istio-ca", Duration::ZERO);
    let wrong_audience = token(agent_sa, None, "https://kubernetes.default.svc", hour);
    let workload = token(
        ("shop", "cart"),
        Some(("cart", &cart_uid)),
        "istio-ca",
        hour,
    );
    let (rt, mut grpc) = client(&ca, &agent.root);
    let mut ask = |token: Option<&str>, identity: &str, san: &str| {
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr: csr_for(san),
            validity_duration: 3600,
            metadata: Some(impersonation_metadata(identity)),
        });
        if let Some(token) = token {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        rt.block_on(grpc.create_certificate(request))
    };

    // Allowed: the agent of node A asks for a pod on node A.
    let signed = ask(Some(&agent.token_text), cart, cart)
        .unwrap()
        .into_inner();
    assert_eq!(signed.cert_chain.len(), 3, "leaf, intermediate, root");
    assert!(signed.cert_chain[2].contains("BEGIN CERTIFICATE"));
    assert_eq!(ca.answered("signed"), 1.0);

    use tonic::Code::{PermissionDenied, Unauthenticated};
    let cases: [(&str, Option<&str>, &str, &str, tonic::Code); 6] = [
        (
            "no pod on its node",
            Some(&agent.token_text),
            ledger,
            ledger,
            PermissionDenied,
        ),
        (
            "another service account",
            Some(&workload),
            ledger,
            ledger,
            PermissionDenied,
        ),
        ("expired token", Some(&expired), cart, cart, Unauthenticated),
        (
            "wrong audience",
            Some(&wrong_audience),
            cart,
            cart,
            Unauthenticated,
        ),
        ("no token", None, cart, cart, Unauthenticated),
        (
            "CSR for another name",
            Some(&agent.token_text),
            cart,
            ledger,
            PermissionDenied,
        ),
    ];
    for (what, token, identity, san, code) in cases {
        let status = ask(token, identity, san).expect_err(what);
        assert_eq!(status.code(), code, "{what}: {status:?}");
    }
    assert_eq!(ca.answered("signed"), 1.0, "nothing more was signed");
    assert_eq!(ca.answered("permission_denied"), 3.0);
    assert_eq!(ca.answered("unauthenticated"), 3.0);
    let log = ca.log();
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("certificate request refused"))
        .collect();
    assert_eq!(refusals.len(), 6, "{log}");
    assert!(
        refusals
            .iter()
            .any(|l| l.contains("caller=nodemesh-system/nodemesh-agent")
                && l.contains(&format!("node={node_a}"))
                && l.contains(&format!("identity={ledger}"))),
        "the refusal names caller, node and identity:\n{log}"
    );
    assert!(
        refusals.iter().any(|l| l.contains("token has expired")),
        "{log}"
    );
}

/// Acceptance 3: the CA service down for longer than a renewal interval:
/// traffic continues on the current certificates, the agents say so in
/// `/healthz/ready` and `nodemesh_ca_healthy`, and renew once it is back.
#[test]
fn traffic_continues_while_the_ca_is_down_and_certificates_renew_when_it_returns() {
    // Renewal every 20 s; the service is down for 24 s.
    let mut mesh = Mesh::new(&["--cert-lifetime", "40s"]);
    let before = [serials(&mesh.near), serials(&mesh.far)];
    mesh.ca.kill();
    let down = Instant::now();
    let load = start_tcp_load(&mesh.tools, &mesh.a, mesh.b.addr(ECHO_PORT), 4, 20, 22.0).unwrap();
    for agent in [&mesh.near, &mesh.far] {
        wait_until("CA outage reported", Duration::from_secs(25), || {
            Ok(agent.metric("nodemesh_ca_healthy", &[])? == 0.0)
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
        let ready = agent.get("/healthz/ready").unwrap();
        assert!(ready.starts_with("ready"), "{ready}");
        assert!(ready.contains("CA service unreachable"), "{ready}");
        assert!(
            agent
                .metric("nodemesh_certificate_rotation_failures_total", &[])
                .unwrap()
                >= 1.0,
            "{}",
            agent.metrics().unwrap()
        );
    }
    let report = load.wait(RUN).unwrap().report().unwrap();
    assert_lossless(&report, 4);
    std::thread::sleep(Duration::from_secs(24).saturating_sub(down.elapsed()));
    mesh.ca.restart().unwrap();
    for (agent, before) in [&mesh.near, &mesh.far].into_iter().zip(&before) {
        wait_until("renewed after the outage", Duration::from_secs(15), || {
            let now = serials(agent);
            Ok(now.len() == before.len() && now.iter().all(|s| !before.contains(s)))
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
        wait_until("CA healthy again", Duration::from_secs(5), || {
            Ok(agent.metric("nodemesh_ca_healthy", &[])? == 1.0)
        })
        .unwrap();
        assert_eq!(agent.get("/healthz/ready").unwrap(), "ready\n");
    }
    mesh.assert_served(&mesh.a, &mesh.b);
}

/// HAProxy in TCP mode in front of the CA replicas, as a Service is: a replica
/// that refuses connections is skipped.
fn balancer(backends: &[&CaServer]) -> (Process, std::net::SocketAddr, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let port = nodemesh_testkit::free_port().unwrap();
    let servers: String = backends
        .iter()
        .enumerate()
        .map(|(i, b)| format!("    server ca{i} {}\n", b.addr))
        .collect();
    let config = format!(
        "global\n    maxconn 1000\ndefaults\n    mode tcp\n    timeout connect 1s\n    timeout client 60s\n    timeout server 60s\n    retries 3\n    option redispatch 1\nfrontend ca\n    bind 127.0.0.1:{port}\n    default_backend replicas\nbackend replicas\n    balance roundrobin\n{servers}"
    );
    let path = dir.path().join("haproxy.cfg");
    std::fs::write(&path, config).unwrap();
    let mut cmd = std::process::Command::new("haproxy");
    cmd.arg("-db").arg("-f").arg(&path);
    let process = Process::spawn(&mut cmd, "haproxy").unwrap();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    wait_until("haproxy listening", Duration::from_secs(5), || {
        Ok(std::net::TcpStream::connect(addr).is_ok())
    })
    .unwrap();
    (process, addr, dir)
}

/// Acceptance 4: two CA replicas behind a balancer; the one serving the
/// agents is killed while their renewals are in flight (a trust-bundle update
/// asks for every certificate again, and each TokenReview takes 500 ms): every
/// certificate is renewed, by the other replica, with no failed renewal.
#[test]
fn killing_a_ca_replica_during_renewal_loses_no_renewal() {
    let tools = Tools::new(env!("CARGO_BIN_EXE_podtool")).unwrap();
    let ca_files = MeshCa::init(&tools).unwrap();
    let api = ApiServer::start().unwrap();
    let ca = CaServer::start(&tools, &api, &ca_files.dir, &[]).unwrap();
    let mut second = CaServer::start(&tools, &api, &ca_files.dir, &[]).unwrap();
    let (_haproxy, front, _cfg) = balancer(&[&ca, &second]);
    let mut mesh = Mesh::with(tools, api, ca_files, ca, &[], |_| {
        format!("https://{front}")
    });
    let agents = [&mesh.near, &mesh.far];
    let before = agents.map(serials);
    mesh.api.set_review_delay(Duration::from_millis(500));
    // A trust-bundle update (the same root, rewritten) renews every certificate.
    for creds in &mesh.creds {
        let root = std::fs::read_to_string(&creds.root).unwrap();
        std::fs::write(&creds.root, format!("{root}\n")).unwrap();
    }
    for agent in agents {
        wait_until("trust bundle reloaded", Duration::from_secs(5), || {
            Ok(agent.log().contains("trust bundle reloaded"))
        })
        .unwrap();
    }
    // Both replicas may hold an agent's connection: kill the one with requests in
    // flight, mid-review (or both in turn, if both do).
    std::thread::sleep(Duration::from_millis(150));
    let reviews_before = mesh.api.token_reviews();
    mesh.ca.kill();
    for (agent, before) in agents.into_iter().zip(&before) {
        wait_until("renewed", Duration::from_secs(15), || {
            let now = serials(agent);
            Ok(now.len() == before.len() && now.iter().all(|s| !before.contains(s)))
        })
        .unwrap_or_else(|e| panic!("{e}\n{}\nsecond CA:\n{}", agent.log(), second.log()));
        assert_eq!(
            agent
                .metric("nodemesh_certificate_rotation_failures_total", &[])
                .unwrap(),
            0.0,
            "a renewal failed:\n{}",
            agent.log()
        );
    }
    assert!(
        mesh.near
            .log()
            .contains("retrying at once on a new connection")
            || mesh
                .far
                .log()
                .contains("retrying at once on a new connection"),
        "the killed replica had no request in flight:\nnear:\n{}\nfar:\n{}",
        mesh.near.log(),
        mesh.far.log()
    );
    assert!(mesh.api.token_reviews() > reviews_before);
    assert!(second.answered("signed") >= 1.0, "{}", second.log());
    mesh.assert_served(&mesh.a, &mesh.b);
    second.kill();
}

/// Acceptance 5: the mesh root rotated through the CA service under load, the
/// way Istio's plug-in CA is: (1) the new root is added beside the old in the
/// agents' root file, (2) the service's signing CA is replaced by one under the
/// new root and the agents renew from it at half-life, (3) the old root is
/// removed. No connection fails at any step.
#[test]
fn a_root_rotation_through_the_ca_service_loses_no_connection() {
    let mesh = Mesh::new(&["--cert-lifetime", "20s"]);
    // Longer than the three steps take (each renewal round is 10 s).
    const LOAD_SECONDS: f64 = 40.0;
    let started = Instant::now();
    let next = MeshCa::init(&mesh.tools).unwrap();
    let read = |dir: &Path, name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
    let (old_root, new_root) = (
        read(&mesh.ca_files.dir, "root-cert.pem"),
        read(&next.dir, "root-cert.pem"),
    );
    let loads = [
        start_tcp_load(
            &mesh.tools,
            &mesh.a,
            mesh.b.addr(ECHO_PORT),
            10,
            40,
            LOAD_SECONDS,
        )
        .unwrap(),
        start_tcp_load(
            &mesh.tools,
            &mesh.b,
            mesh.a.addr(ECHO_PORT),
            10,
            40,
            LOAD_SECONDS,
        )
        .unwrap(),
    ];
    let agents = [&mesh.near, &mesh.far];
    let bundle_reloads = |count: usize| {
        for agent in agents {
            wait_until("trust bundle reloaded", Duration::from_secs(10), || {
                Ok(agent.log().matches("trust bundle reloaded").count() >= count)
            })
            .unwrap();
        }
    };
    let set_roots = |pem: &str| {
        for creds in &mesh.creds {
            let tmp = creds.root.with_extension("new");
            std::fs::write(&tmp, pem).unwrap();
            std::fs::rename(&tmp, &creds.root).unwrap();
        }
    };
    std::thread::sleep(Duration::from_secs(1));
    // (1) Both roots, on the service and on every node.
    let both = format!("{old_root}{new_root}");
    std::fs::write(mesh.ca_files.dir.join("root-cert.pem"), &both).unwrap();
    set_roots(&both);
    bundle_reloads(1);
    // (2) The service signs under the new root; agents renew at half-life.
    let before = agents.map(serials);
    for name in ["ca-cert.pem", "ca-key.pem", "cert-chain.pem"] {
        let tmp = mesh.ca_files.dir.join(format!(".{name}.new"));
        std::fs::write(&tmp, read(&next.dir, name)).unwrap();
        std::fs::rename(&tmp, mesh.ca_files.dir.join(name)).unwrap();
    }
    wait_until("service reloaded", Duration::from_secs(10), || {
        Ok(mesh.ca.log().contains("signing CA reloaded"))
    })
    .unwrap();
    let reloaded_at = Instant::now();
    for (agent, before) in agents.into_iter().zip(&before) {
        wait_until("renewed under the new CA", Duration::from_secs(20), || {
            let now = serials(agent);
            Ok(now.len() == before.len() && now.iter().all(|s| !before.contains(s)))
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
    }
    // Renewals already in flight at the reload came from the old CA: wait
    // for one more round after it.
    let after_reload = agents.map(serials);
    for (agent, seen) in agents.into_iter().zip(&after_reload) {
        wait_until(
            "a renewal after the reload",
            Duration::from_secs(20),
            || {
                let now = serials(agent);
                Ok(reloaded_at.elapsed() > Duration::from_secs(1)
                    && now.iter().all(|s| !seen.contains(s)))
            },
        )
        .unwrap();
    }
    // (3) The old root goes.
    std::fs::write(mesh.ca_files.dir.join("root-cert.pem"), &new_root).unwrap();
    set_roots(&new_root);
    bundle_reloads(2);
    assert!(
        started.elapsed() < Duration::from_secs_f64(LOAD_SECONDS - 2.0),
        "the last step came after the load ended"
    );
    for load in loads {
        let report = load.wait(RUN).unwrap().report().unwrap();
        assert_lossless(&report, 10);
    }
    mesh.assert_served(&mesh.a, &mesh.b);
    mesh.assert_served(&mesh.b, &mesh.a);
    for agent in agents {
        assert_eq!(
            agent
                .metric("nodemesh_certificate_rotation_failures_total", &[])
                .unwrap(),
            0.0,
            "{}",
            agent.log()
        );
    }
}
