//! Byte relay between two TCP sockets, both directions in one task, with
//! half-close passed on and an error on either side resetting both.
//!
//! Each direction starts by copying through a small user-space buffer, which is
//! cheapest for request/response traffic. Once a direction has carried
//! [`SPLICE_AFTER`] bytes it is bulk, and it switches to `splice(2)` through a
//! pipe: the payload then moves between the two sockets inside the kernel,
//! without the two copies to and from user space that dominate a bulk profile.
//! Short connections never pay for the pipe's file descriptors.
//!
//! A direction that reads a socket holds its copy buffer only while the socket
//! has data: it waits for readability with none, reads until the socket would
//! block, and frees the buffer again. An idle connection, the common case for
//! pooled and long-lived connections, then costs no buffer at all in that
//! direction.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::connections::ByteCounter;

/// Per-direction copy buffer; a full 1 KiB-response exchange fits many times over.
const COPY_BUFFER: usize = 16 * 1024;
/// Copy buffer of a tunnelled direction once a read has filled [`COPY_BUFFER`].
const BULK_BUFFER: usize = 128 * 1024;
/// Bytes one direction carries by copying before it moves to `splice`.
pub const SPLICE_AFTER: u64 = 256 * 1024;
/// Pipe capacity once spliced; a larger pipe means fewer system calls per byte.
const PIPE_SIZE: usize = 256 * 1024;

/// Relays until both directions have finished. On error both sockets are reset
/// (zero linger), so neither peer mistakes a failure for a clean end.
pub async fn relay(
    client: &TcpStream,
    upstream: &TcpStream,
    from_client: ByteCounter,
    to_client: ByteCounter,
) -> io::Result<()> {
    let result = tokio::try_join!(
        pump(client, upstream, from_client),
        pump(upstream, client, to_client),
    );
    if result.is_err() {
        let _ = client.set_zero_linger();
        let _ = upstream.set_zero_linger();
    }
    result.map(|_| ())
}

/// Relays between a TCP socket and a tunnel stream (an HTTP/2 CONNECT stream over
/// TLS). The tunnel side needs user-space copies anyway, so no splice here.
/// On error the TCP side is reset; dropping the tunnel resets its stream.
pub async fn relay_tunnel<T>(
    tcp: &TcpStream,
    tunnel: T,
    from_tcp: ByteCounter,
    to_tcp: ByteCounter,
) -> io::Result<()>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut tunnel_read, mut tunnel_write) = tokio::io::split(tunnel);
    let up = async {
        let mut size = COPY_BUFFER;
        loop {
            tcp.readable().await?;
            let mut buf = Vec::with_capacity(size);
            loop {
                buf.clear();
                match tcp.try_read_buf(&mut buf) {
                    // END_STREAM on the tunnel: the peer sees a half-close.
                    Ok(0) => return tunnel_write.shutdown().await,
                    Ok(n) => {
                        tunnel_write.write_all(&buf).await?;
                        from_tcp.add(n);
                        // A full buffer means bulk: larger pieces mean fewer reads,
                        // DATA frames and wake-ups per byte.
                        if n == buf.capacity() && size < BULK_BUFFER {
                            size = BULK_BUFFER;
                            buf = Vec::with_capacity(size);
                        }
                    }
                    // Drained: the buffer goes while the socket is idle.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
        }
    };
    let down = async {
        let mut buf = vec![0u8; COPY_BUFFER];
        loop {
            let n = tunnel_read.read(&mut buf).await?;
            if n == 0 {
                return shutdown_write(tcp);
            }
            write_all(tcp, &buf[..n]).await?;
            to_tcp.add(n);
            if n == buf.len() && buf.len() < BULK_BUFFER {
                buf = vec![0u8; BULK_BUFFER];
            }
        }
    };
    let result = tokio::try_join!(up, down);
    if result.is_err() {
        let _ = tcp.set_zero_linger();
    }
    result.map(|_| ())
}

/// One direction: `from` until EOF, then a write shutdown on `to`.
async fn pump(from: &TcpStream, to: &TcpStream, counter: ByteCounter) -> io::Result<()> {
    let mut carried = 0u64;
    loop {
        if carried >= SPLICE_AFTER {
            match Pipe::new() {
                Ok(pipe) => return pipe.pump(from, to, &counter).await,
                // Out of descriptors or pipe memory: keep copying rather than fail,
                // and try again after another SPLICE_AFTER bytes.
                Err(e) => tracing::debug!(error = %e, "no pipe for splice; copying instead"),
            }
            carried = 0;
        }
        from.readable().await?;
        // No zeroing: `try_read_buf` fills spare capacity. Held only while
        // `from` has data (see the module comment).
        let mut buf = Vec::with_capacity(COPY_BUFFER);
        while carried < SPLICE_AFTER {
            buf.clear();
            match from.try_read_buf(&mut buf) {
                Ok(0) => return shutdown_write(to),
                Ok(n) => {
                    write_all(to, &buf).await?;
                    counter.add(n);
                    carried += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Writes all of `data` to a shared socket, waiting for room as needed.
pub(crate) async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Half-closes `to`; a peer already gone is not an error here.
pub(crate) fn shutdown_write(to: &TcpStream) -> io::Result<()> {
    match socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write) {
        // The peer may already be gone; its own error will surface on the other direction.
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        other => other,
    }
}

/// A pipe used as the in-kernel buffer between two sockets.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // Best effort: the default 64 KiB still works, with more system calls.
        let _ = fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as libc::c_int));
        Ok(Pipe { read, write })
    }

    async fn pump(
        &self,
        from: &TcpStream,
        to: &TcpStream,
        counter: &ByteCounter,
    ) -> io::Result<()> {
        let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
        loop {
            // The pipe is empty here, so EAGAIN can only mean the socket has nothing yet.
            let n = from
                .async_io(Interest::READABLE, || {
                    splice(
                        from.as_fd(),
                        None,
                        self.write.as_fd(),
                        None,
                        PIPE_SIZE,
                        flags,
                    )
                    .map_err(io::Error::from)
                })
                .await?;
            if n == 0 {
                return shutdown_write(to);
            }
            let mut left = n;
            while left > 0 {
                // The pipe holds `left` bytes, so EAGAIN can only mean `to` is full.
                left -= to
                    .async_io(Interest::WRITABLE, || {
                        splice(self.read.as_fd(), None, to.as_fd(), None, left, flags)
                            .map_err(io::Error::from)
                    })
                    .await?;
            }
            counter.add(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    /// Both directions cross the copy-to-splice switch; bytes, counts and the
    /// half-close (each side sees EOF only after all data) must come through intact.
    #[tokio::test]
    async fn relays_both_ways_across_the_splice_switch() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (mut app, client_side) = pair(&listener).await;
        let (upstream_side, mut server) = pair(&listener).await;
        let (up, down) = (
            std::sync::Arc::new(AtomicU64::new(0)),
            std::sync::Arc::new(AtomicU64::new(0)),
        );
        let len = 3 * SPLICE_AFTER as usize + 12_345;
        let (request, response) = (pattern(len, 1), pattern(len / 2, 7));

        let client = async {
            let (mut r, mut w) = app.split();
            let write = async {
                w.write_all(&request).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let mut got = Vec::new();
            tokio::join!(write, r.read_to_end(&mut got)).1.unwrap();
            got
        };
        let server = async {
            let (mut r, mut w) = server.split();
            let mut got = Vec::new();
            let write = async {
                w.write_all(&response).await.unwrap();
                w.shutdown().await.unwrap();
            };
            tokio::join!(write, r.read_to_end(&mut got)).1.unwrap();
            got
        };
        let relayed = relay(
            &client_side,
            &upstream_side,
            ByteCounter::new(up.clone(), Counter::default()),
            ByteCounter::new(down.clone(), Counter::default()),
        );
        let (client_got, server_got, result) = tokio::join!(client, server, relayed);
        result.unwrap();
        assert!(server_got == request, "request corrupted");
        assert!(client_got == response, "response corrupted");
        assert_eq!(up.load(Ordering::Relaxed), request.len() as u64);
        assert_eq!(down.load(Ordering::Relaxed), response.len() as u64);
    }
}
