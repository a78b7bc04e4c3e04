//! Graceful ends for server connections when the agent hands over to a
//! successor: HTTP/2 connections get a GOAWAY (streams in flight finish, new
//! ones go to a fresh connection, which the successor accepts), HTTP/1 ones
//! close after the response in flight. Raw TCP relays need nothing: they run
//! until their ends close.

use std::future::Future;
use std::pin::Pin;

use tokio_util::sync::CancellationToken;

/// A hyper server connection that can be asked to finish gracefully.
pub trait GracefulConnection: Future {
    /// Starts a graceful shutdown (hyper's `graceful_shutdown`).
    fn shut_down(self: Pin<&mut Self>);
}

impl<I, S, E, B> GracefulConnection for hyper::server::conn::http2::Connection<I, S, E>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn shut_down(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, B> GracefulConnection for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn shut_down(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Runs `conn` to completion, shutting it down gracefully once `drain` fires.
pub async fn serve_until_drained<C: GracefulConnection>(
    conn: C,
    drain: &CancellationToken,
) -> C::Output {
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        out = conn.as_mut() => return out,
        _ = drain.cancelled() => conn.as_mut().shut_down(),
    }
    conn.await
}
