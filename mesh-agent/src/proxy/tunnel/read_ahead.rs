//! A read buffer under the tunnel's TLS, so one `recv` takes what the socket has.
//!
//! rustls asks its transport for at most 4 KiB per read (its deframer grows in
//! 4 KiB steps up to one record), so a bulk stream of 16 KiB records costs four
//! or five `recv` calls per record, each a system call with its own locking of
//! the socket. Reading ahead into [`READ_AHEAD`] bytes turns those into one call
//! per socket-full, and rustls then takes its 4 KiB pieces from memory.
//!
//! The buffer exists only while the socket has data: it is taken when a read
//! needs it and given back when the socket would block with the buffer empty,
//! so an idle tunnel connection holds none. Writes pass straight through.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes one `recv` may take: several TLS records (16 KiB each) per call.
pub const READ_AHEAD: usize = 64 * 1024;

/// A transport whose reads go through a read-ahead buffer.
#[derive(Debug)]
pub struct ReadAhead<S> {
    inner: S,
    /// Bytes read from `inner`; `buf[start..]` are not yet handed out. Filled
    /// through its spare capacity, so it is never zeroed.
    buf: Vec<u8>,
    start: usize,
}

impl<S> ReadAhead<S> {
    /// Wraps `inner`; no buffer is allocated until the first read.
    pub fn new(inner: S) -> Self {
        ReadAhead {
            inner,
            buf: Vec::new(),
            start: 0,
        }
    }

    /// The wrapped transport.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    fn buffered(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.start == this.buf.len() {
            // A caller asking for at least a buffer-full gains nothing from a copy.
            if out.remaining() >= READ_AHEAD {
                this.buf = Vec::new();
                this.start = 0;
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            this.buf.clear();
            this.start = 0;
            this.buf.reserve_exact(READ_AHEAD);
            let mut fill = ReadBuf::uninit(&mut this.buf.spare_capacity_mut()[..READ_AHEAD]);
            match Pin::new(&mut this.inner).poll_read(cx, &mut fill) {
                Poll::Ready(Ok(())) => {
                    let n = fill.filled().len();
                    // SAFETY: `inner` initialised the first `n` spare bytes.
                    unsafe { this.buf.set_len(n) };
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Idle: the buffer goes until the socket has data again.
                    this.buf = Vec::new();
                    return Poll::Pending;
                }
            }
        }
        let n = this.buffered().len().min(out.remaining());
        out.put_slice(&this.buf[this.start..this.start + n]);
        this.start += n;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Small reads are served from one large read of the transport, in order,
    /// up to and including the end of stream.
    #[tokio::test]
    async fn small_reads_see_every_byte_in_order_then_eof() {
        let (mut writer, reader) = tokio::io::duplex(256 * 1024);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let send = tokio::spawn(async move {
            writer.write_all(&sent).await.unwrap();
            writer.shutdown().await.unwrap();
        });
        let mut reader = ReadAhead::new(reader);
        let mut got = Vec::new();
        let mut piece = [0u8; 4096];
        loop {
            let n = reader.read(&mut piece).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&piece[..n]);
        }
        send.await.unwrap();
        assert_eq!(got, data);
    }

    /// A large read bypasses the buffer; a read after an idle moment has none.
    #[tokio::test]
    async fn large_reads_bypass_and_idle_frees_the_buffer() {
        let (mut writer, reader) = tokio::io::duplex(256 * 1024);
        let mut reader = ReadAhead::new(reader);
        writer.write_all(&[7u8; 1000]).await.unwrap();
        let mut big = vec![0u8; READ_AHEAD];
        assert_eq!(reader.read(&mut big).await.unwrap(), 1000);
        assert_eq!(reader.buf.capacity(), 0);
        writer.write_all(&[8u8; 10]).await.unwrap();
        let mut small = [0u8; 4];
        assert_eq!(reader.read(&mut small).await.unwrap(), 4);
        assert_eq!(reader.buffered(), &[8u8; 6]);
        let mut rest = [0u8; 16];
        assert_eq!(reader.read(&mut rest).await.unwrap(), 6);
        // Nothing more to read: the pending read gives the buffer back.
        let pending = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            reader.read(&mut small),
        )
        .await;
        assert!(pending.is_err());
        assert_eq!(reader.buf.capacity(), 0);
    }
}
