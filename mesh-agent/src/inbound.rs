//! Inbound plaintext: TCP arriving at a meshed pod from outside it, on any port
//! but the tunnel's, is handed by the kernel (`sk_lookup`, see `capture`) to the
//! agent's listener inside the pod. The accepted socket's local address is where
//! the client was going, so no map lookup is needed.
//!
//! Under `STRICT` peer authentication the connection is refused. Under
//! `PERMISSIVE` it is authorized (with no peer identity) and delivered to the
//! application from inside the pod, labelled `connection_security_policy="none"`.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::connections::{ConnectionGuard, Peers};
use crate::outbound::connect_in_pod;
use crate::policy::{self, Decision};
use crate::relay::relay;
use crate::tunnel::server::InboundContext;

/// Accepts steered connections until `cancel`.
pub async fn serve(listener: TcpListener, ctx: Arc<InboundContext>, cancel: CancellationToken) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(handle(stream, ctx.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed on inbound listener");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

async fn handle(client: TcpStream, ctx: Arc<InboundContext>) {
    let (Ok(peer), Ok(destination)) = (client.peer_addr(), client.local_addr()) else {
        return;
    };
    let w = &ctx.workload;
    let local = w.meta.read().expect("meta lock").clone();
    // Plaintext proves nothing about the client: no source workload or principal.
    let peers = Peers {
        reporter: "destination",
        source: None,
        source_principal: None,
        destination: Some(local.clone()),
        mutual_tls: false,
    };
    let mut guard = ConnectionGuard::open(&w.connections, &w.metrics, peers, peer, destination);
    let attrs = policy::Connection {
        source: None,
        source_ip: peer.ip(),
        destination_port: destination.port(),
    };
    if let Decision::Deny(why) = ctx.policies.get().decide(&local, &attrs) {
        guard.fail("DENY");
        tracing::info!(workload = %local.key(), client = %peer, %destination, reason = %why, "plaintext connection refused");
        let _ = client.set_zero_linger();
        return;
    }
    let cancel = CancellationToken::new();
    guard.authorized(attrs, cancel.clone());
    let app = match connect_in_pod(w, destination).await {
        Ok(app) => app,
        Err(e) => {
            guard.fail("UF");
            tracing::warn!(%destination, error = %e, "delivery to the application failed");
            let _ = client.set_zero_linger();
            return;
        }
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
