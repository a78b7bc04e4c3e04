//! Inbound plaintext: TCP arriving at a meshed pod from outside it, on any port
//! but the tunnel's, is handed by the kernel (`sk_lookup`, see `capture`) to the
//! agent's listener inside the pod. The accepted socket's local address is where
//! the client was going, so no map lookup is needed.
//!
//! Under `STRICT` peer authentication the connection is refused. Under
//! `PERMISSIVE` it is authorized (with no peer identity) and delivered to the
//! application from inside the pod, labelled `connection_security_policy="none"`.
//!
//! Every admitted connection, tunnelled or plaintext, is then detected as on
//! the client side: HTTP is served request by request (`l7::destination`),
//! anything else is relayed byte for byte.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::connections::{ConnectionGuard, Peers, Reporting};
use crate::identity::Identity;
use crate::identity::node::IdentityState;
use crate::proxy::l7::L7;
use crate::proxy::l7::catalog::ServicePortState;
use crate::proxy::l7::destination;
use crate::proxy::l7::detect::Detected;
use crate::proxy::pod::{PodContext, accept_until_cancelled, connect_in_pod};
use crate::proxy::relay::relay;
use crate::proxy::tunnel::{ServingCert, server_config};
use crate::state::policy::{self, Decision, PolicyStore};
use crate::state::service::{PortProtocol, Service};
use crate::state::workload::WorkloadMeta;

/// What the listener of one workload needs.
pub struct InboundContext {
    /// The workload's shared state (identity, netns, metrics, connection table).
    pub workload: Arc<PodContext>,
    /// Certificates and trust.
    pub identity: Arc<IdentityState>,
    /// The pod's IPs; a CONNECT to any other address is refused.
    pub ips: Vec<IpAddr>,
    /// Peer authentication and authorization in force.
    pub policies: Arc<PolicyStore>,
    /// Services (to name the one a connection reaches, and its protocol) and L7 settings.
    pub l7: Arc<L7>,
    /// The TLS config, rebuilt when the trust bundle changes.
    tls: Mutex<Option<(Arc<rustls::RootCertStore>, Arc<rustls::ServerConfig>)>>,
    serving: Arc<ServingCert>,
}

impl InboundContext {
    /// The listener context of `workload`, serving the certificate of `identity`.
    pub fn new(
        workload: Arc<PodContext>,
        identity_state: Arc<IdentityState>,
        identity: Identity,
        ips: Vec<IpAddr>,
        policies: Arc<PolicyStore>,
        l7: Arc<L7>,
    ) -> Self {
        let serving = Arc::new(ServingCert::new(identity, identity_state.certs.clone()));
        InboundContext {
            workload,
            identity: identity_state,
            ips,
            policies,
            l7,
            tls: Mutex::new(None),
            serving,
        }
    }

    /// The TLS config for the current trust bundle (rebuilt when it changes).
    pub fn tls_config(&self) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
        let trust = self.identity.trust();
        let mut cached = self.tls.lock().expect("tls config lock");
        if let Some((roots, config)) = cached.as_ref()
            && Arc::ptr_eq(roots, &trust.roots)
        {
            return Ok(config.clone());
        }
        let config = Arc::new(server_config(self.serving.clone(), &trust)?);
        *cached = Some((trust.roots.clone(), config.clone()));
        Ok(config)
    }
}

/// Accepts steered connections until `cancel`.
pub async fn serve(listener: TcpListener, ctx: Arc<InboundContext>, cancel: CancellationToken) {
    accept_until_cancelled(&listener, &cancel, &ctx.workload, "inbound", |stream, _| {
        handle(stream, ctx.clone())
    })
    .await;
}

async fn handle(client: TcpStream, ctx: Arc<InboundContext>) {
    let (Ok(peer), Ok(destination)) = (client.peer_addr(), client.local_addr()) else {
        return;
    };
    // Plaintext proves nothing about the client: no source workload or principal.
    let Ok(admitted) = admit(&ctx, None, None, peer, destination).await else {
        let _ = client.set_zero_linger();
        return;
    };
    let _ = client.set_nodelay(true);
    let Opaque {
        client,
        guard,
        cancel,
        app,
    } = match admitted.carry(client, &ctx, peer, destination).await {
        Carried::Relay(opaque) => opaque,
        Carried::Refused(client) => {
            let _ = client.set_zero_linger();
            return;
        }
        Carried::Done => return,
    };
    tokio::select! {
        result = relay(&client, &app, guard.received(), guard.sent()) => {
            if let Err(e) = result {
                tracing::debug!(%destination, error = %e, "inbound connection ended with error");
            }
        }
        _ = cancel.cancelled() => {
            let _ = client.set_zero_linger();
            let _ = app.set_zero_linger();
        }
    }
}

/// Writes the bytes read during detection to the application, counted as the client's.
async fn pass_on(
    app: &mut TcpStream,
    prefix: &[u8],
    guard: &ConnectionGuard,
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    if !prefix.is_empty() {
        app.write_all(prefix).await?;
        guard.received().add(prefix.len());
    }
    Ok(())
}

/// Why an inbound connection was not delivered; already logged and counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Peer authentication or an authorization policy refused it (`DENY`).
    Denied,
    /// The application could not be reached from inside the pod (`UF`).
    Undeliverable,
}

/// An inbound connection past its checks, with its application socket.
pub struct Admitted {
    /// Counts it and lists it until it ends; its TCP reporting is undecided
    /// until its protocol is known.
    pub guard: ConnectionGuard,
    /// Fires if a later policy revokes it.
    pub cancel: CancellationToken,
    /// The application's end, dialled inside the pod.
    pub app: TcpStream,
    /// Who is on each end.
    pub peers: Peers,
    /// What its authorization saw.
    pub attrs: policy::Connection,
    /// The Service port the destination serves, if any.
    pub service: Option<Arc<ServicePortState>>,
    /// How its bytes are treated ([`destination::inbound_protocol`]).
    pub protocol: PortProtocol,
}

/// What became of an admitted connection once its first bytes were read.
// Returned once per connection and taken apart at once, never stored: boxing
// `Relay` would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub enum Carried<C> {
    /// Served to its end (HTTP), or the client went away during detection.
    Done,
    /// Not HTTP, and refused by a rule about HTTP; the application side is
    /// reset, the client is handed back to be reset too.
    Refused(C),
    /// Not HTTP: its bytes are to be relayed.
    Relay(Opaque<C>),
}

/// A connection carried byte for byte, its detected first bytes already
/// passed on to the application.
pub struct Opaque<C> {
    /// The client end (a socket or a tunnel stream).
    pub client: C,
    /// Counts it as a TCP connection.
    pub guard: ConnectionGuard,
    /// Fires if a later policy revokes it.
    pub cancel: CancellationToken,
    /// The application's end.
    pub app: TcpStream,
}

impl Admitted {
    /// Reads the client's first bytes as the port's protocol says, the same way
    /// for plaintext and tunnelled connections: HTTP is served to its end;
    /// anything else is checked as a connection that is not HTTP, and what is
    /// let through comes back to be relayed.
    pub async fn carry<C>(
        mut self,
        mut client: C,
        ctx: &InboundContext,
        peer: SocketAddr,
        destination: SocketAddr,
    ) -> Carried<C>
    where
        C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (protocol, prefix) = match destination::detect(
            &mut client,
            self.protocol,
            ctx.l7.settings.detect_timeout,
            &ctx.workload.metrics,
        )
        .await
        {
            Ok(found) => found,
            Err(e) => {
                tracing::debug!(client = %peer, error = %e, "client went away during detection");
                return Carried::Done;
            }
        };
        if protocol != Detected::Opaque {
            self.serve_http(client, prefix, protocol, ctx, peer, destination)
                .await;
            return Carried::Done;
        }
        self.guard.report(Reporting::Tcp);
        if self.refused_as_opaque(ctx) {
            let _ = self.app.set_zero_linger();
            return Carried::Refused(client);
        }
        let Admitted {
            guard,
            cancel,
            mut app,
            ..
        } = self;
        if let Err(e) = pass_on(&mut app, &prefix, &guard).await {
            tracing::debug!(%destination, error = %e, "connection ended with error");
            return Carried::Done;
        }
        Carried::Relay(Opaque {
            client,
            guard,
            cancel,
            app,
        })
    }

    /// Whether the policies in force refuse it now that it is known not to
    /// speak HTTP (an L7 rule cannot be met: Istio denies); logged and marked.
    pub fn refused_as_opaque(&mut self, ctx: &InboundContext) -> bool {
        let Some(local) = self.peers.destination.clone() else {
            return false;
        };
        match ctx.policies.get().decide_opaque(&local, &self.attrs) {
            Decision::Deny(why) => {
                self.guard.deny(&why);
                log_denied(&local, &self.attrs, self.app_destination(), &why);
                true
            }
            _ => false,
        }
    }

    fn app_destination(&self) -> SocketAddr {
        SocketAddr::new(self.attrs.destination_ip, self.attrs.destination_port)
    }

    /// Serves its requests (the client spoke `protocol`, starting with
    /// `prefix`) until the connection ends, is revoked, or the agent hands over.
    async fn serve_http<C>(
        self,
        client: C,
        prefix: Vec<u8>,
        protocol: Detected,
        ctx: &InboundContext,
        peer: SocketAddr,
        destination: SocketAddr,
    ) where
        C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let connection = self.http_connection(ctx, peer, destination);
        let Admitted {
            mut guard,
            cancel,
            app,
            ..
        } = self;
        destination::serve_http(
            client,
            prefix,
            app,
            protocol,
            connection,
            &mut guard,
            &ctx.l7.settings,
            &cancel,
            &ctx.workload.drain,
        )
        .await;
    }

    /// What serving its requests needs.
    fn http_connection(
        &self,
        ctx: &InboundContext,
        client: SocketAddr,
        destination: SocketAddr,
    ) -> destination::HttpConnection {
        let metrics = &ctx.workload.metrics;
        destination::HttpConnection {
            labels: destination::request_labels(
                metrics,
                &self.peers,
                self.service.as_ref().map(|s| &*s.service),
                destination,
            ),
            metrics: metrics.clone(),
            request_log: ctx.l7.request_log.clone(),
            client,
            policies: ctx.policies.clone(),
            workload: self.peers.destination.clone(),
            attrs: self.attrs.clone(),
            tracer: ctx.l7.tracer.clone(),
        }
    }
}

/// The checks every inbound connection passes, tunnelled (`source` is the proven
/// identity) or plaintext (`None`): count it, authorize it against the policies in
/// force, and dial the application from inside the pod. The returned token fires
/// if a later policy revokes the connection.
pub async fn admit(
    ctx: &InboundContext,
    source_workload: Option<Arc<WorkloadMeta>>,
    source: Option<Identity>,
    peer: SocketAddr,
    destination: SocketAddr,
) -> Result<Admitted, Refusal> {
    let service = ctx.l7.catalog.get().serving(destination);
    let (mut guard, cancel, peers, attrs) = authorize_reporting(
        ctx,
        source_workload,
        source,
        peer,
        destination,
        service.as_ref().map(|s| s.service.clone()),
        Reporting::Undecided,
    )?;
    let protocol = destination::inbound_protocol(
        &ctx.l7.settings,
        service.as_ref().map(|s| (s.protocol, s.port.port)),
        destination.port(),
    );
    match connect_in_pod(&ctx.workload, destination).await {
        Ok(app) => Ok(Admitted {
            guard,
            cancel,
            app,
            peers,
            attrs,
            service,
            protocol,
        }),
        Err(e) => {
            guard.fail("UF");
            tracing::warn!(%destination, error = %e, "delivery to the application failed");
            Err(Refusal::Undeliverable)
        }
    }
}

/// The policy half of [`admit`], for a connection whose application socket
/// already exists (a joined connection handed over by a predecessor agent):
/// the connection is counted, checked against the policies in force now, and
/// registered for revocation.
pub fn authorize(
    ctx: &InboundContext,
    source_workload: Option<Arc<WorkloadMeta>>,
    source: Option<Identity>,
    peer: SocketAddr,
    destination: SocketAddr,
) -> Result<(ConnectionGuard, CancellationToken), Refusal> {
    let service = ctx
        .l7
        .catalog
        .get()
        .serving(destination)
        .map(|s| s.service.clone());
    authorize_reporting(
        ctx,
        source_workload,
        source,
        peer,
        destination,
        service,
        Reporting::Tcp,
    )
    .map(|(guard, cancel, _, _)| (guard, cancel))
}

/// [`authorize`], reported as `reporting` says, naming `service` as the one reached.
fn authorize_reporting(
    ctx: &InboundContext,
    source_workload: Option<Arc<WorkloadMeta>>,
    source: Option<Identity>,
    peer: SocketAddr,
    destination: SocketAddr,
    service: Option<Arc<Service>>,
    reporting: Reporting,
) -> Result<
    (
        ConnectionGuard,
        CancellationToken,
        Peers,
        policy::Connection,
    ),
    Refusal,
> {
    let w = &ctx.workload;
    let local = w.meta.read().expect("meta lock").clone();
    let peers = Peers {
        reporter: "destination",
        source: source_workload,
        source_principal: source.as_ref().map(Identity::to_string),
        destination: Some(local.clone()),
        mutual_tls: source.is_some(),
        service,
    };
    let mut guard = ConnectionGuard::open_reporting(
        &w.connections,
        &w.metrics,
        peers.clone(),
        peer,
        destination,
        reporting,
    );
    let attrs = policy::Connection {
        source,
        source_ip: peer.ip(),
        destination_ip: destination.ip(),
        destination_port: destination.port(),
    };
    let policies = ctx.policies.get();
    // A connection already known to be carried unread (a joined one handed
    // over) cannot meet rules about HTTP; any other may still be HTTP.
    let decision = match reporting {
        Reporting::Tcp => policies.decide_opaque(&local, &attrs),
        _ => policies.decide(&local, &attrs),
    };
    if let Decision::Deny(why) = decision {
        guard.deny(&why);
        log_denied(&local, &attrs, destination, &why);
        return Err(Refusal::Denied);
    }
    // Registered before dialling, so a policy change meanwhile still revokes it.
    let cancel = CancellationToken::new();
    guard.authorized(attrs.clone(), cancel.clone());
    Ok((guard, cancel, peers, attrs))
}

fn log_denied(
    local: &WorkloadMeta,
    attrs: &policy::Connection,
    destination: SocketAddr,
    why: &policy::Denial,
) {
    tracing::info!(
        workload = %local.key(),
        source = attrs.source.as_ref().map_or("plaintext".to_owned(), Identity::to_string),
        client = %attrs.source_ip,
        %destination,
        reason = %why,
        "inbound connection denied by policy"
    );
}
