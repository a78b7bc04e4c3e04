//! `mesh-agent`: the nodemesh node agent binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mesh_agent::identity::manager::CertPolicy;
use mesh_agent::identity::node::{IdentitySettings, IdentityState, IssuerSettings};
use mesh_agent::identity::remote::CaServiceSettings;
use mesh_agent::node::capture::{AgentDown, Capture, CaptureOptions, Startup};
use mesh_agent::node::cgroup;
use mesh_agent::reconciler::{Agent, Settings};
use mesh_agent::sources::file::{FileSource, settle, watch_dir};
use mesh_agent::sources::kube::{self as kube_source, KubeSettings};
use mesh_agent::{admin, debug, handoff};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(
    name = "mesh-agent",
    version,
    about = "nodemesh node agent: sidecarless service mesh"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Tokio worker threads. Two, as ztunnel uses, carry a node's traffic; each extra
    /// worker adds cross-thread wake-ups, which cost more than they give at low rates.
    #[arg(long, global = true, env = "NODEMESH_WORKER_THREADS", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256))]
    worker_threads: u16,
}

#[derive(Subcommand)]
enum Command {
    /// Load the eBPF programs and run the agent.
    Run(Box<RunArgs>),
    /// Manage the mesh CA files.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Install or remove the nodemesh-cni plugin on this node.
    #[command(subcommand)]
    Cni(CniCommand),
    /// Remove nodemesh's pinned programs and maps from this node: capture stops
    /// once no agent runs. Meshed pods then reach each other directly, without
    /// mTLS or policy; run it only to take the mesh off the node.
    Uninstall {
        /// The agents' --bpf-dir.
        #[arg(long, env = "NODEMESH_BPF_DIR", default_value = mesh_agent::node::pins::DEFAULT_ROOT)]
        bpf_dir: PathBuf,
    },
    /// Print the running agent's state as tables.
    Debug {
        /// What to show.
        #[arg(value_enum)]
        what: debug::View,
        /// For `explain`: the source (`namespace/name` or a pod IP) and the
        /// destination (`ip:port`, or a Service's `host:port`). For `trace`:
        /// the workload (`namespace/name` or a pod IP).
        targets: Vec<String>,
        /// For `trace`: how long to watch (default 30, at most 3600).
        #[arg(long)]
        seconds: Option<u64>,
        /// For `explain`: the request's path.
        #[arg(long)]
        path: Option<String>,
        /// For `explain`: the request's method.
        #[arg(long)]
        method: Option<String>,
        /// For `explain`: a request header, `name=value` (repeatable).
        #[arg(long = "header")]
        headers: Vec<String>,
        /// For `explain`: the client does not speak HTTP; decide the connection only.
        #[arg(long)]
        tcp: bool,
        /// The agent's admin endpoint.
        #[arg(long, env = "NODEMESH_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
        admin_addr: SocketAddr,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a root and an intermediate CA (Istio `cacerts` layout) for local and
    /// development use. Production meshes mount their own CA instead.
    Init {
        /// Directory to write ca-cert.pem, ca-key.pem, root-cert.pem, root-key.pem, cert-chain.pem.
        #[arg(long)]
        dir: PathBuf,
        /// The mesh's SPIFFE trust domain, named in the CA certificates.
        #[arg(long, default_value = mesh_agent::state::workload::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
    },
    /// Run the mesh CA service: the only holder of the signing key. Serves Istio's
    /// certificate API over TLS and signs a workload identity for a node agent
    /// only when a pod with it runs on that agent's node.
    Serve(Box<CaServeArgs>),
}

#[derive(clap::Args)]
struct CaServeArgs {
    /// Istio `cacerts` directory (ca-cert.pem, ca-key.pem, root-cert.pem,
    /// cert-chain.pem); reloaded when it changes.
    #[arg(long, env = "NODEMESH_CA_DIR")]
    ca_dir: PathBuf,
    /// Where Istio's certificate API is served (gRPC over TLS; istiod uses 15012).
    #[arg(long, env = "NODEMESH_CA_LISTEN", default_value = "0.0.0.0:15012")]
    listen: SocketAddr,
    /// Where /healthz/ready and /metrics are served.
    #[arg(long, env = "NODEMESH_CA_ADMIN_ADDR", default_value = "0.0.0.0:15014")]
    admin_addr: SocketAddr,
    /// DNS names of the service's TLS certificate (repeatable): the names agents dial.
    #[arg(
        long = "server-name",
        env = "NODEMESH_CA_SERVER_NAMES",
        value_delimiter = ',',
        default_value = "nodemesh-ca.nodemesh-system.svc"
    )]
    server_names: Vec<String>,
    /// Service accounts (`namespace/name`, repeatable) of node agents, which may
    /// ask for the identities of pods on their own node.
    #[arg(
        long = "node-agent",
        env = "NODEMESH_CA_NODE_AGENTS",
        value_delimiter = ',',
        default_value = "nodemesh-system/nodemesh-agent"
    )]
    node_agents: Vec<mesh_agent::ca_service::authorize::ServiceAccount>,
    /// The only SPIFFE trust domain signed for.
    #[arg(long, env = "NODEMESH_TRUST_DOMAIN", default_value = mesh_agent::state::workload::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Longest certificate lifetime granted (requests for more get this).
    #[arg(long, env = "NODEMESH_CA_MAX_LIFETIME", default_value = "24h", value_parser = humantime::parse_duration)]
    max_lifetime: Duration,
    /// Log format.
    #[arg(long, env = "NODEMESH_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

#[derive(Subcommand)]
enum CniCommand {
    /// Copy nodemesh-cni into the CNI binary directory and chain it into the pod
    /// network's config (the first file of the config directory), waiting for
    /// that config to appear. Run by the DaemonSet's init container.
    Install {
        /// The runtime's CNI binary directory, as mounted.
        #[arg(long, default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
        /// The runtime's CNI config directory, as mounted.
        #[arg(long, default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
        /// The agent's --cni-socket, as the node sees it.
        #[arg(long, default_value = mesh_agent::cni::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// How long ADD waits for the agent to enroll a pod.
        #[arg(long, default_value_t = 30)]
        timeout_seconds: u64,
        /// How long to wait for the pod network's config to appear.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        wait: Duration,
    },
    /// Remove the chained entry and the binary: a deliberate step, since while
    /// the entry is in place no meshed pod starts on a node without an agent.
    Uninstall {
        /// The runtime's CNI binary directory, as mounted.
        #[arg(long, default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
        /// The runtime's CNI config directory, as mounted.
        #[arg(long, default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
        /// Keep running afterwards (until stopped), so a DaemonSet's rollout
        /// status tells when every node is done.
        #[arg(long)]
        stay: bool,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Sign workload certificates on this node with the CA files in this
    /// directory (Istio `cacerts` layout: ca-cert.pem, ca-key.pem, root-cert.pem,
    /// cert-chain.pem): for VMs and development, as the signing key is then on
    /// the node. In a cluster use --ca-address. With neither, no mTLS.
    #[arg(long, env = "NODEMESH_CA_DIR", conflicts_with = "ca_address")]
    ca_dir: Option<PathBuf>,
    /// Get workload certificates from the mesh CA service, or istiod, at this
    /// `https://host:port` (Istio's certificate API); the node holds no signing key.
    #[arg(long, env = "NODEMESH_CA_ADDRESS", requires = "ca_root")]
    ca_address: Option<String>,
    /// The mesh root certificate(s), PEM: verify the CA service, and are the
    /// trust bundle peers must chain to. Reloaded when the file changes.
    #[arg(long, env = "NODEMESH_CA_ROOT")]
    ca_root: Option<PathBuf>,
    /// Name the CA service's certificate must carry (default: --ca-address's host).
    #[arg(long, env = "NODEMESH_CA_SERVER_NAME")]
    ca_server_name: Option<String>,
    /// This agent's service-account token for the CA service (audience
    /// `istio-ca`), re-read for every request.
    #[arg(
        long,
        env = "NODEMESH_CA_TOKEN_FILE",
        default_value = "/var/run/secrets/tokens/istio-token"
    )]
    ca_token_file: PathBuf,
    /// The cluster's name: sent to the CA as `ClusterID`, and the
    /// `source_cluster`/`destination_cluster` of every metric (istiod's default: Kubernetes).
    #[arg(long, env = "NODEMESH_CLUSTER_ID", default_value = "Kubernetes")]
    cluster_id: String,
    /// Lifetime of the workload certificates the agent mints; renewed at half of it.
    #[arg(long, env = "NODEMESH_CERT_LIFETIME", default_value = "24h", value_parser = humantime::parse_duration)]
    cert_lifetime: Duration,
    /// YAML file of Workload, Service, policy and route documents; reloaded on
    /// change and on SIGHUP. Required unless --kubernetes.
    #[arg(
        long,
        env = "NODEMESH_CONFIG",
        required_unless_present = "kubernetes",
        conflicts_with = "kubernetes"
    )]
    config: Option<PathBuf>,
    /// Take pods, Services, routes and policies from the Kubernetes API (in-cluster
    /// config, or KUBECONFIG) instead of a file. Needs --node-name.
    #[arg(long, env = "NODEMESH_KUBERNETES", requires = "node_name")]
    kubernetes: bool,
    /// The SPIFFE trust domain: identities are spiffe://<trust domain>/ns/<namespace>/sa/<service account>.
    #[arg(long, env = "NODEMESH_TRUST_DOMAIN", default_value = mesh_agent::state::workload::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// How long Kubernetes changes are gathered before they are applied together.
    #[arg(long, env = "NODEMESH_KUBE_DEBOUNCE", default_value = "20ms", value_parser = humantime::parse_duration)]
    kube_debounce: Duration,
    /// Answer the nodemesh-cni plugin on this unix socket (Kubernetes mode), so a
    /// meshed pod is enrolled before its containers start.
    #[arg(long, env = "NODEMESH_CNI_SOCKET", requires = "kubernetes")]
    cni_socket: Option<PathBuf>,
    /// Node-local debug endpoint (keep it on loopback).
    #[arg(long, env = "NODEMESH_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    /// Port of the outbound listener inside each pod.
    #[arg(long, env = "NODEMESH_OUTBOUND_PORT", default_value_t = 15001)]
    outbound_port: u16,
    /// bpffs directory where the programs' maps and links are pinned, so capture
    /// outlives the agent process (mounted at /sys/fs/bpf when the node has none).
    #[arg(long, env = "NODEMESH_BPF_DIR", default_value = mesh_agent::node::pins::DEFAULT_ROOT)]
    bpf_dir: PathBuf,
    /// What meshed pods' connections do while no agent serves them (crash, OOM
    /// kill, a stop without a successor): `closed` refuses them at once; `open`
    /// lets them go direct, unencrypted and without policy.
    #[arg(long, env = "NODEMESH_ON_AGENT_DOWN", default_value = "closed", value_parser = ["closed", "open"])]
    on_agent_down: String,
    /// Unix socket where a new agent takes over this one's listening sockets
    /// (an upgrade that refuses no connection); node-local.
    #[arg(long, env = "NODEMESH_HANDOFF_SOCKET", default_value = mesh_agent::handoff::DEFAULT_SOCKET)]
    handoff_socket: PathBuf,
    /// After handing over (or on SIGTERM), how long established connections may
    /// run before the agent exits anyway; keep it below the pod's
    /// terminationGracePeriodSeconds.
    #[arg(long, env = "NODEMESH_DRAIN_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// Most connections the agent holds at once (all pods, both directions);
    /// more are reset at once and counted. 0: derived from the file-descriptor
    /// limit (raised to its hard limit at start), two descriptors a connection.
    #[arg(long, env = "NODEMESH_MAX_CONNECTIONS", default_value_t = 0)]
    max_connections: usize,
    /// Experimental: join connections between two meshed pods on this node in
    /// the kernel (sockmap): admitted as usual, then carried with no copy
    /// through the agent and no TLS, as the bytes never leave the node. Off by
    /// default: the kernel gives such connections no flow control yet, and can
    /// forward a retransmitted segment twice (the agent detects it and resets
    /// the connection; see docs/architecture.md); off, they are tunnelled like
    /// cross-node traffic.
    #[arg(long, env = "NODEMESH_SAME_NODE_FAST_PATH", default_value_t = false, action = clap::ArgAction::Set)]
    same_node_fast_path: bool,
    /// Cgroup to attach the programs to; default: the cgroup2 root.
    #[arg(long, env = "NODEMESH_ATTACH_CGROUP")]
    attach_cgroup: Option<PathBuf>,
    /// Upper bound on an upstream connect before the client is reset.
    #[arg(long, env = "NODEMESH_CONNECT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    /// How long an unenrolled pod's listener still accepts already-captured connections.
    #[arg(long, env = "NODEMESH_DRAIN", default_value = "200ms", value_parser = humantime::parse_duration)]
    drain: Duration,
    /// This node's name (Kubernetes: the downward API's spec.nodeName). Workloads
    /// whose spec.nodeName differs are known for attribution but not enrolled.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Log format.
    #[arg(long, env = "NODEMESH_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// How long to wait for a client's first bytes on a Service port before treating
    /// the connection as opaque TCP (server-speaks-first protocols wait this long).
    #[arg(long, env = "NODEMESH_PROTOCOL_DETECTION_TIMEOUT", default_value = "100ms", value_parser = humantime::parse_duration)]
    protocol_detection_timeout: Duration,
    /// Service ports never inspected, on every Service (comma-separated).
    #[arg(long, env = "NODEMESH_OPAQUE_PORTS", default_value = "25,587,3306,4444,5432,6379,9300,11211", value_parser = parse_ports)]
    opaque_ports: PortList,
    /// Largest HTTP request header block accepted; HTTP/1 clients get 431 above it.
    #[arg(long, env = "NODEMESH_MAX_REQUEST_HEADER_BYTES", default_value_t = 65536, value_parser = clap::value_parser!(u32).range(8192..=16_777_216))]
    max_request_header_bytes: u32,
    /// Time an HTTP/1 client has to send its request headers (slowloris defence).
    #[arg(long, env = "NODEMESH_REQUEST_HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    request_header_timeout: Duration,
    /// Per-request log on stdout: `json` writes one JSON object per request.
    #[arg(long, env = "NODEMESH_REQUEST_LOG", default_value = "off", value_parser = ["off", "json"])]
    request_log: String,
    /// OTLP collector that receives a span per proxied request, e.g.
    /// `http://otel-collector:4317`; no spans are recorded without it.
    #[arg(long, env = "NODEMESH_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Transport to the collector: `grpc` or `http/protobuf` (an endpoint
    /// without a path then gets `/v1/traces`).
    #[arg(
        long,
        env = "NODEMESH_OTLP_PROTOCOL",
        value_enum,
        default_value = "grpc"
    )]
    otlp_protocol: mesh_agent::traces::OtlpProtocol,
    /// Percent of new traces recorded, 0 to 100 (Istio's `tracing.sampling`);
    /// a request that arrives with a `traceparent` follows its sampled flag.
    #[arg(long, env = "NODEMESH_TRACE_SAMPLING", default_value_t = 1.0)]
    trace_sampling: f64,
    /// Finished spans waiting for export, at most; more are dropped and
    /// counted in `nodemesh_spans_dropped_total`, never waited for.
    #[arg(long, env = "NODEMESH_TRACE_QUEUE", default_value_t = 2048)]
    trace_queue: usize,
}

/// A parsed `--opaque-ports` list.
#[derive(Clone, Debug)]
struct PortList(Vec<u16>);

fn parse_ports(s: &str) -> Result<PortList, String> {
    mesh_agent::state::service::parse_port_list(s).map(PortList)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    mesh_agent::allocator::tune(cli.worker_threads.into());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.worker_threads.into())
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run(*args).await,
            Command::Ca(CaCommand::Init { dir, trust_domain }) => {
                for path in mesh_agent::identity::ca::init(&dir, &trust_domain)? {
                    println!("wrote {}", path.display());
                }
                Ok(())
            }
            Command::Ca(CaCommand::Serve(args)) => {
                let _log_writer = init_logging(&args.log_format);
                mesh_agent::ca_service::run(mesh_agent::ca_service::Settings {
                    ca_dir: args.ca_dir,
                    listen: args.listen,
                    admin: args.admin_addr,
                    server_names: args.server_names,
                    policy: mesh_agent::ca_service::authorize::Policy {
                        trust_domain: args.trust_domain,
                        node_agents: args.node_agents,
                    },
                    max_lifetime: args.max_lifetime,
                })
                .await
            }
            Command::Cni(command) => cni(command).await,
            Command::Uninstall { bpf_dir } => {
                let removed = mesh_agent::node::capture::uninstall(&bpf_dir)?;
                println!(
                    "removed {removed} pinned objects under {}; capture stops once no agent runs",
                    bpf_dir.display()
                );
                Ok(())
            }
            Command::Debug {
                what: debug::View::Explain,
                targets,
                path,
                method,
                headers,
                tcp,
                admin_addr,
                ..
            } => {
                let [source, destination] = <[String; 2]>::try_from(targets).map_err(|_| {
                    anyhow::anyhow!("usage: mesh-agent debug explain <source> <destination>")
                })?;
                let headers = headers
                    .iter()
                    .map(|h| {
                        h.split_once('=')
                            .or_else(|| h.split_once(':'))
                            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                            .ok_or_else(|| anyhow::anyhow!("--header {h:?}: expected name=value"))
                    })
                    .collect::<anyhow::Result<_>>()?;
                let query = mesh_agent::explain::Query {
                    source,
                    destination,
                    method,
                    path,
                    headers,
                    tcp,
                };
                print!("{}", debug::render_explain(admin_addr, &query).await?);
                Ok(())
            }
            Command::Debug {
                what: debug::View::Trace,
                targets,
                seconds,
                admin_addr,
                ..
            } => {
                let [workload] = <[String; 1]>::try_from(targets)
                    .map_err(|_| anyhow::anyhow!("usage: mesh-agent debug trace <workload>"))?;
                debug::stream_trace(admin_addr, &workload, seconds, &mut std::io::stdout()).await
            }
            Command::Debug {
                what,
                targets,
                admin_addr,
                ..
            } => {
                if !targets.is_empty() {
                    anyhow::bail!("only `debug explain` and `debug trace` take targets");
                }
                print!("{}", debug::render(admin_addr, what).await?);
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-agent: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn cni(command: CniCommand) -> anyhow::Result<()> {
    use mesh_agent::cni::install;
    match command {
        CniCommand::Install {
            bin_dir,
            conf_dir,
            socket,
            timeout_seconds,
            wait,
        } => {
            let binary = std::env::current_exe()?.with_file_name(install::PLUGIN);
            let entry = install::entry(&socket, timeout_seconds);
            let deadline = std::time::Instant::now() + wait;
            loop {
                if let Some(report) = install::install(&binary, &bin_dir, &conf_dir, &entry)? {
                    println!(
                        "installed {} and chained it into {}",
                        report.binary.display(),
                        report
                            .config
                            .map(|c| c.display().to_string())
                            .unwrap_or_default()
                    );
                    return Ok(());
                }
                if std::time::Instant::now() >= deadline {
                    anyhow::bail!(
                        "no pod network config in {} after {wait:?}: install the pod network first",
                        conf_dir.display()
                    );
                }
                eprintln!(
                    "waiting for the pod network's config in {}",
                    conf_dir.display()
                );
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
        CniCommand::Uninstall {
            bin_dir,
            conf_dir,
            stay,
        } => {
            let report = install::uninstall(&bin_dir, &conf_dir)?;
            match report.config {
                Some(c) => println!("removed nodemesh-cni from {}", c.display()),
                None => println!("no config in {} chains nodemesh-cni", conf_dir.display()),
            }
            println!("removed {}", report.binary.display());
            if stay {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Ok(())
        }
    }
}

/// Logs are written by a dedicated thread, so an access-log line per connection
/// never puts a blocking `write` on a worker thread. Not lossy: if the writer falls
/// behind, workers wait rather than drop lines. The guard flushes on drop.
fn init_logging(format: &str) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_env("NODEMESH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        // The channel is allocated up front: 128,000 lines by default is ~4 MB of RSS.
        .buffered_lines_limit(4096)
        .thread_name("log-writer")
        .finish(batched(std::io::stderr()));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour codes only for a person at a terminal, never in collected logs.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    guard
}

/// A log stream written a batch at a time: the writer thread takes every line
/// waiting in its channel and flushes when the channel is empty, so lines that
/// arrive together (an access-log line per connection under load) cost one
/// `write` instead of one each, and none waits longer than its batch.
fn batched<W: std::io::Write>(stream: W) -> std::io::BufWriter<W> {
    std::io::BufWriter::with_capacity(64 * 1024, stream)
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let _log_writer = init_logging(&args.log_format);
    // Request-log lines are JSON documents of their own on stdout, apart from the
    // agent's logs on stderr; the guard flushes them on exit.
    let request_log = (args.request_log == "json").then(|| {
        tracing_appender::non_blocking::NonBlockingBuilder::default()
            .lossy(false)
            .buffered_lines_limit(4096)
            .thread_name("request-log")
            .finish(batched(std::io::stdout()))
    });
    let cgroup2 = cgroup::preflight()?;
    let fd_limit = mesh_agent::proxy::limits::raise_fd_limit();
    let max_connections = match args.max_connections {
        0 => mesh_agent::proxy::limits::default_max_connections(fd_limit),
        n => n,
    };
    let attach_cgroup = args
        .attach_cgroup
        .as_deref()
        .map(|p| cgroup2.resolve(p))
        .unwrap_or_else(|| cgroup2.mount.clone());
    // Validate the config before touching the kernel: a bad file at start is fatal.
    if let Some(config) = &args.config {
        mesh_agent::state::load(config).context("initial config")?;
    }
    // Likewise the Kubernetes client's configuration (in-cluster or KUBECONFIG).
    let kube_client = if args.kubernetes {
        Some(kube::Client::try_default().await.context(
            "Kubernetes client configuration (in-cluster service account or KUBECONFIG)",
        )?)
    } else {
        None
    };
    // A running agent on this node hands over its listening sockets, so no
    // connect is refused while this one starts.
    let handoff_path = args.handoff_socket.clone();
    let predecessor = tokio::task::spawn_blocking(move || handoff::request(&handoff_path))
        .await?
        .context("taking over from the running agent")?;
    let (predecessor, inherited) = match predecessor {
        Some((p, inherited)) => {
            tracing::info!(
                listeners = inherited.len(),
                "a running agent handed over its listeners"
            );
            (Some(p), inherited)
        }
        None => (None, handoff::Inherited::default()),
    };
    let admin_listener = match inherited.take(0, args.admin_addr) {
        Some(l) => tokio::net::TcpListener::from_std(l)?,
        None => admin::bind(args.admin_addr).await?,
    };
    let on_agent_down = match args.on_agent_down.as_str() {
        "open" => AgentDown::Open,
        _ => AgentDown::Closed,
    };
    let capture = Capture::load(
        &attach_cgroup,
        &CaptureOptions {
            pin_root: args.bpf_dir.clone(),
            on_agent_down,
        },
    )?;
    let attach_cgroup_root = attach_cgroup.clone();
    tracing::info!(cgroup = %attach_cgroup.display(), pins = %capture.pin_dir().display(), startup = ?capture.startup(), on_agent_down = ?on_agent_down, programs = ?capture.programs().iter().map(|p| p.id).collect::<Vec<_>>(), "eBPF programs in force");
    tracing::info!(fd_limit, max_connections, "connection bounds");
    if on_agent_down == AgentDown::Open {
        tracing::warn!(
            "--on-agent-down open: while no agent runs, meshed pods' connections go direct, without mTLS, policy or metrics"
        );
    }
    if capture.startup() != Startup::Fresh && predecessor.is_none() {
        // Records of connections captured for a previous agent: those died with it.
        let cleared = capture.clear_connection_records();
        tracing::info!(
            cleared,
            "adopted pinned capture state; cleared records of the previous agent's connections"
        );
    }
    let issuer = match (&args.ca_dir, &args.ca_address) {
        (Some(dir), _) => Some(IssuerSettings::Local {
            ca_dir: dir.clone(),
        }),
        (None, Some(address)) => Some(IssuerSettings::Service(CaServiceSettings {
            address: address.clone(),
            server_name: args.ca_server_name.clone(),
            root_file: args.ca_root.clone().expect("clap requires --ca-root"),
            token_file: args.ca_token_file.clone(),
            cluster_id: args.cluster_id.clone(),
            timeout: Duration::from_secs(10),
        })),
        (None, None) => None,
    };
    let identity_settings = issuer.map(|issuer| IdentitySettings {
        issuer,
        policy: CertPolicy {
            lifetime: args.cert_lifetime,
            ..CertPolicy::default()
        },
    });
    let metrics = Arc::new(mesh_agent::metrics::Metrics::for_cluster(&args.cluster_id));
    let tracer = mesh_agent::traces::Tracer::start(
        &mesh_agent::traces::TraceSettings {
            endpoint: args.otlp_endpoint.clone(),
            protocol: args.otlp_protocol,
            sampling: args.trace_sampling / 100.0,
            queue: args.trace_queue,
            node_name: args.node_name.clone(),
        },
        metrics.clone(),
    )
    .context("--otlp-endpoint")?;
    let settings = Settings {
        source: match &args.config {
            Some(path) => format!("file {}", path.display()),
            None => "Kubernetes API".to_owned(),
        },
        outbound_port: args.outbound_port,
        connect_timeout: args.connect_timeout,
        drain: args.drain,
        attach_cgroup,
        node_name: args.node_name.clone(),
        identity: identity_settings.clone(),
        l7: mesh_agent::proxy::l7::L7Settings {
            detect_timeout: args.protocol_detection_timeout,
            opaque_ports: args.opaque_ports.0.clone(),
            max_header_bytes: args.max_request_header_bytes as usize,
            header_timeout: args.request_header_timeout,
        },
        request_log: request_log.as_ref().map(|(writer, _)| writer.clone()),
        tracer,
        max_connections,
        same_node_fast_path: args.same_node_fast_path,
    };
    let identity = match &identity_settings {
        Some(s) => Some(Arc::new(
            IdentityState::start(s, metrics.clone()).context("mesh CA")?,
        )),
        None => {
            tracing::warn!(
                "no --ca-address or --ca-dir: running without workload identities or mTLS"
            );
            None
        }
    };
    let mut agent = Agent::new(capture, cgroup2, settings, metrics, identity);
    if predecessor.is_some() {
        agent = agent.with_predecessor(inherited);
    }
    let agent = Arc::new(agent);
    agent.set_admin_listener(args.admin_addr, &admin_listener)?;
    let trust_domain: Arc<str> = Arc::from(args.trust_domain.as_str());
    let source = match (kube_client, &args.config) {
        (Some(client), _) => {
            let settings = KubeSettings {
                node_name: args.node_name.clone().expect("clap requires --node-name"),
                trust_domain,
                cgroup_root: attach_cgroup_root,
                debounce: args.kube_debounce,
                cni_socket: args.cni_socket.clone(),
            };
            // Ready once every kind has been listed and applied.
            tokio::spawn(kube_source::run(client, settings, agent.clone()))
        }
        (None, Some(path)) => {
            let mut file = FileSource::new(path.clone(), trust_domain);
            // Watching first: a change right after the first read is not missed.
            let changes = file.changes()?;
            file.reload(&agent, true).await.context("initial config")?;
            tokio::spawn(file.watch(agent.clone(), changes))
        }
        (None, None) => unreachable!("clap requires --config or --kubernetes"),
    };
    tokio::spawn(admin::serve(admin_listener, agent.clone()));
    let mut source = source;
    wait_ready(&agent, &mut source).await?;
    if let Some(predecessor) = predecessor {
        let joined = tokio::task::spawn_blocking(move || predecessor.serving())
            .await?
            .context("telling the previous agent to stop accepting")?;
        let unused = agent.release_inherited();
        agent.take_over_capture();
        let joined_count = joined.len();
        agent.adopt_joined_connections(joined);
        tracing::info!(
            unused,
            joined = joined_count,
            "the previous agent stopped accepting; this one serves every pod"
        );
    }
    // Now this agent is the one a successor asks.
    let handoff_listener = handoff::listen(&args.handoff_socket)?;
    {
        let agent = agent.clone();
        let path = args.handoff_socket.clone();
        std::thread::Builder::new()
            .name("handoff".into())
            .spawn(move || handoff::serve(handoff_listener, path, agent.as_ref()))?;
    }
    tracing::info!(admin = %args.admin_addr, source = %agent.source(), "agent serving");
    let result = serve_until_stopped(&agent, source).await;
    if !agent.is_retired() {
        agent.retire().await;
    }
    drain_connections(&agent, args.drain_timeout).await;
    // Joined connections handed to a successor may still be in transit.
    agent.exchange_ended(Duration::from_secs(30)).await;
    match agent.capture.on_agent_down() {
        AgentDown::Closed => tracing::info!(
            "exiting; capture stays pinned: meshed pods are refused until an agent serves them"
        ),
        AgentDown::Open => tracing::warn!(
            "exiting; capture stays pinned and meshed pods go direct until an agent serves them"
        ),
    }
    result
}

/// Waits until the first desired state is applied (the source may list for a
/// while), failing if the source stops first.
async fn wait_ready(
    agent: &Agent,
    source: &mut tokio::task::JoinHandle<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    while !agent.is_ready() {
        tokio::select! {
            ended = &mut *source => {
                return match ended {
                    Ok(result) => result.context("state source stopped before the first state was applied"),
                    Err(e) => Err(anyhow::anyhow!("state source task failed: {e}")),
                };
            }
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
        }
    }
    Ok(())
}

/// Lets established connections finish, up to `timeout`.
async fn drain_connections(agent: &Agent, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let open = agent.connections.len();
        if open == 0 {
            tracing::info!("no connections left");
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                open,
                ?timeout,
                "drain timeout: the remaining connections close with this agent"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reloads the trust bundle when the CA directory changes or on SIGHUP, until
/// SIGTERM or SIGINT, or until the state source fails.
async fn serve_until_stopped(
    agent: &Agent,
    mut source: tokio::task::JoinHandle<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    // The trust bundle is reloaded when the CA directory changes (a Secret update).
    let (_ca_watcher, mut ca_changes) = match &agent.identity {
        Some(identity) => {
            let (w, rx) = watch_dir(&identity.watched_dir(), "CA")?;
            // A change since the CA was loaded at start, before the watch: a
            // no-op unless the file's content differs.
            identity.reload();
            (Some(w), rx)
        }
        None => (None, tokio::sync::mpsc::channel(1).1),
    };
    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            Some(()) = ca_changes.recv() => {
                settle(&mut ca_changes).await;
                if let Some(identity) = &agent.identity {
                    identity.reload();
                }
            }
            _ = hangup.recv() => {
                if let Some(identity) = &agent.identity {
                    identity.reload();
                }
            }
            ended = &mut source => {
                return match ended {
                    Ok(result) => result.context("state source stopped"),
                    Err(e) => Err(anyhow::anyhow!("state source task failed: {e}")),
                };
            }
            _ = agent.drain.cancelled() => return Ok(()),
            _ = terminate.recv() => {
                tracing::info!("SIGTERM: no longer accepting; draining established connections");
                return Ok(());
            }
            _ = interrupt.recv() => return Ok(()),
        }
    }
}
