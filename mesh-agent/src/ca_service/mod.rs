//! The mesh CA service (`mesh-agent ca serve`), run as a Deployment: the only
//! holder of the signing key. It serves Istio's certificate API over TLS to
//! node agents (and to istio-agent or ztunnel clients alike), authenticates
//! each caller's Kubernetes token with a TokenReview, and signs a workload
//! identity for a node agent only when a pod with that identity runs on the
//! agent's own node ([`authorize`]).

pub mod authorize;
pub mod pods;
pub mod review;
pub mod server;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use self::authorize::Policy;
use self::pods::PodIndex;
use self::server::{CaMetrics, CaService};
use crate::identity::ca::Signer;
use crate::identity::istio_ca::istio_certificate_service_server::IstioCertificateServiceServer;
use crate::sources::file::{settle, watch_dir};

/// How the CA service runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Istio `cacerts` directory with the signing key (a Secret mounted only here).
    pub ca_dir: PathBuf,
    /// Where Istio's certificate API is served (TLS).
    pub listen: SocketAddr,
    /// Where `/healthz/ready` and `/metrics` are served (plain HTTP).
    pub admin: SocketAddr,
    /// DNS names of the service's own TLS certificate (the Service's names).
    pub server_names: Vec<String>,
    /// Who may ask for what.
    pub policy: Policy,
    /// Longest certificate lifetime granted.
    pub max_lifetime: Duration,
}

/// Lifetime of the service's own TLS certificate; it is re-made at half of it
/// and whenever the signing CA changes.
const SERVING_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// The service's TLS certificate, swapped without a restart.
#[derive(Debug)]
struct ServingCert(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().expect("serving cert lock").clone())
    }
}

fn serving_key(signer: &Signer, names: &[String]) -> anyhow::Result<Arc<CertifiedKey>> {
    let (chain, key) = signer
        .server_certificate(names, SERVING_LIFETIME)
        .context("making the CA service's TLS certificate")?;
    let key =
        rustls::crypto::ring::sign::any_supported_type(&key).context("the CA service's TLS key")?;
    Ok(Arc::new(CertifiedKey::new(chain, key)))
}

/// A TLS connection as tonic's server takes it.
struct TlsConnection(tokio_rustls::server::TlsStream<TcpStream>);

impl tonic::transport::server::Connected for TlsConnection {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl tokio::io::AsyncRead for TlsConnection {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Runs the service until SIGTERM or SIGINT.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let signer = Arc::new(RwLock::new(Arc::new(
        Signer::load(&settings.ca_dir).context("signing CA")?,
    )));
    let serving = Arc::new(ServingCert(RwLock::new(serving_key(
        &signer.read().expect("signer lock"),
        &settings.server_names,
    )?)));
    let metrics = Arc::new(CaMetrics::default());
    metrics.signer_healthy.set(1);
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);

    let client = kube::Client::try_default()
        .await
        .context("Kubernetes client (in-cluster config, or KUBECONFIG)")?;
    let pods = Arc::new(PodIndex::default());
    {
        let (pods, client) = (pods.clone(), client.clone());
        tokio::spawn(async move { pods.run(client).await });
    }

    let listener = TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("listening on {}", settings.listen))?;
    let admin = TcpListener::bind(settings.admin)
        .await
        .with_context(|| format!("listening on {}", settings.admin))?;
    let stop = CancellationToken::new();
    tokio::spawn(serve_admin(
        admin,
        pods.clone(),
        metrics.clone(),
        Arc::new(registry),
    ));

    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS versions")?
    .with_no_client_auth()
    .with_cert_resolver(serving.clone());
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let (connections, incoming) = tokio::sync::mpsc::channel::<TlsConnection>(64);
    tokio::spawn(accept_tls(listener, acceptor, connections, stop.clone()));
    let incoming = futures::stream::unfold(incoming, |mut rx| async move {
        rx.recv().await.map(|c| (Ok::<_, std::io::Error>(c), rx))
    });

    let service = CaService {
        policy: settings.policy.clone(),
        max_lifetime: settings.max_lifetime,
        signer: signer.clone(),
        pods: pods.clone(),
        client,
        metrics: metrics.clone(),
    };
    tracing::info!(
        listen = %settings.listen,
        admin = %settings.admin,
        trust_domain = %settings.policy.trust_domain,
        node_agents = ?settings.policy.node_agents.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "mesh CA service starting"
    );
    let grpc = tonic::transport::Server::builder()
        .add_service(IstioCertificateServiceServer::new(service))
        .serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned());
    let grpc = tokio::spawn(grpc);

    let (_watcher, mut changes) = watch_dir(&settings.ca_dir, "CA")?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut refresh = tokio::time::interval(SERVING_LIFETIME / 2);
    refresh.tick().await;
    loop {
        tokio::select! {
            Some(()) = changes.recv() => {
                settle(&mut changes).await;
                reload(&settings, &signer, &serving, &metrics);
            }
            _ = refresh.tick() => {
                match serving_key(&signer.read().expect("signer lock"), &settings.server_names) {
                    Ok(key) => *serving.0.write().expect("serving cert lock") = key,
                    Err(e) => tracing::error!(error = %format!("{e:#}"), "renewing the CA service's TLS certificate failed"),
                }
            }
            _ = terminate.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    tracing::info!("stopping: no new connections; answering requests in flight");
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), grpc).await;
    Ok(())
}

/// Re-reads the signing CA after its files changed (a rotation); on bad files
/// keeps signing with the CA loaded before, and says so.
fn reload(
    settings: &Settings,
    signer: &RwLock<Arc<Signer>>,
    serving: &ServingCert,
    metrics: &CaMetrics,
) {
    let loaded = Signer::load(&settings.ca_dir)
        .map_err(anyhow::Error::from)
        .and_then(|new| Ok((serving_key(&new, &settings.server_names)?, new)));
    match loaded {
        Ok((key, new)) => {
            *signer.write().expect("signer lock") = Arc::new(new);
            *serving.0.write().expect("serving cert lock") = key;
            metrics.signer_healthy.set(1);
            tracing::info!(dir = %settings.ca_dir.display(), "signing CA reloaded");
        }
        Err(e) => {
            metrics.signer_healthy.set(0);
            tracing::error!(error = %format!("{e:#}"), "signing CA files unusable; signing on with the CA loaded before");
        }
    }
}

/// Accepts TCP connections and hands each finished TLS handshake to tonic; a
/// slow or failed handshake holds up no other.
async fn accept_tls(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    connections: tokio::sync::mpsc::Sender<TlsConnection>,
    stop: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let (acceptor, connections) = (acceptor.clone(), connections.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let _ = connections.send(TlsConnection(tls)).await;
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

/// `/healthz/ready` (ready once pods are listed) and `/metrics`.
async fn serve_admin(
    listener: TcpListener,
    pods: Arc<PodIndex>,
    metrics: Arc<CaMetrics>,
    registry: Arc<prometheus_client::registry::Registry>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (pods, metrics, registry) = (pods.clone(), metrics.clone(), registry.clone());
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (pods, metrics, registry) =
                        (pods.clone(), metrics.clone(), registry.clone());
                    async move {
                        let (status, body) = match req.uri().path() {
                            "/healthz/ready" if pods.synced() => (200, "ready\n".to_owned()),
                            "/healthz/ready" => (503, "pods not listed yet\n".to_owned()),
                            "/metrics" => {
                                metrics.pods.set(pods.len() as i64);
                                let mut text = String::new();
                                let _ =
                                    prometheus_client::encoding::text::encode(&mut text, &registry);
                                (200, text)
                            }
                            _ => (404, "not found\n".to_owned()),
                        };
                        Ok::<_, Infallible>(
                            hyper::Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from(body)))
                                .expect("valid response"),
                        )
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}
