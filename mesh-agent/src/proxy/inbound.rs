//! Inbound plaintext: TCP arriving at a meshed pod from outside it, on any port
//! but the tunnel's, is handed by the kernel (`sk_lookup`, see `capture`) to the
//! agent's listener inside the pod. The accepted socket's local address is where
//! the client was going, so no map lookup is needed.
//!
//! Under `STRICT` peer authentication the connection is refused. Under
//! `PERMISSIVE` it is authorized (with no peer identity) and delivered to the
//! application from inside the pod, labelled `connection_security_policy="none"`.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::connections::{ConnectionGuard, Peers};
use crate::identity::Identity;
use crate::identity::node::IdentityState;
use crate::proxy::pod::{PodContext, accept_until_cancelled, connect_in_pod};
use crate::proxy::relay::relay;
use crate::proxy::tunnel::{ServingCert, server_config};
use crate::state::policy::{self, Decision, PolicyStore};
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
    ) -> Self {
        let serving = Arc::new(ServingCert::new(identity, identity_state.certs.clone()));
        InboundContext {
            workload,
            identity: identity_state,
            ips,
            policies,
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
    let Ok((guard, cancel, app)) = admit(&ctx, None, None, peer, destination).await else {
        let _ = client.set_zero_linger();
        return;
    };
    let _ = client.set_nodelay(true);
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

/// Why an inbound connection was not delivered; already logged and counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Peer authentication or an authorization policy refused it (`DENY`).
    Denied,
    /// The application could not be reached from inside the pod (`UF`).
    Undeliverable,
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
) -> Result<(ConnectionGuard, CancellationToken, TcpStream), Refusal> {
    let (mut guard, cancel) = authorize(ctx, source_workload, source, peer, destination)?;
    match connect_in_pod(&ctx.workload, destination).await {
        Ok(app) => Ok((guard, cancel, app)),
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
    let w = &ctx.workload;
    let local = w.meta.read().expect("meta lock").clone();
    let peers = Peers {
        reporter: "destination",
        source: source_workload,
        source_principal: source.as_ref().map(Identity::to_string),
        destination: Some(local.clone()),
        mutual_tls: source.is_some(),
        service: None,
    };
    let mut guard = ConnectionGuard::open(&w.connections, &w.metrics, peers, peer, destination);
    let attrs = policy::Connection {
        source,
        source_ip: peer.ip(),
        destination_port: destination.port(),
    };
    if let Decision::Deny(why) = ctx.policies.get().decide(&local, &attrs) {
        guard.fail("DENY");
        tracing::info!(
            workload = %local.key(),
            source = attrs.source.as_ref().map_or("plaintext".to_owned(), Identity::to_string),
            client = %peer,
            %destination,
            reason = %why,
            "inbound connection denied by policy"
        );
        return Err(Refusal::Denied);
    }
    // Registered before dialling, so a policy change meanwhile still revokes it.
    let cancel = CancellationToken::new();
    guard.authorized(attrs, cancel.clone());
    Ok((guard, cancel))
}
