//! Protocol detection from a connection's first bytes. A client that sends
//! nothing (a server-speaks-first protocol such as MySQL or SMTP) is treated as
//! opaque once the detection timeout passes, so it never stalls for long.

use std::io;
use std::time::Duration;

use tokio::net::TcpStream;

/// What a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// HTTP/1.x.
    Http1,
    /// HTTP/2 with prior knowledge (the client preface), gRPC included.
    Http2,
    /// Anything else: carried byte for byte.
    Opaque,
}

impl Detected {
    /// Its name in `nodemesh_protocol_detections_total`.
    pub fn name(self) -> &'static str {
        match self {
            Detected::Http1 => "http1",
            Detected::Http2 => "http2",
            Detected::Opaque => "tcp",
        }
    }
}

/// The HTTP/2 client connection preface.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// HTTP/1 request methods the agent proxies. `CONNECT` is left opaque: a client
/// tunnelling through a Service is the backend's business.
const METHODS: [&[u8]; 8] = [
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"TRACE ",
    b"PATCH ",
];

/// Classifies the bytes seen so far; `None` means more bytes are needed.
pub fn classify(buf: &[u8]) -> Option<Detected> {
    if buf.is_empty() {
        return None;
    }
    if buf.starts_with(H2_PREFACE) {
        return Some(Detected::Http2);
    }
    if METHODS.iter().any(|m| buf.starts_with(m)) {
        return Some(Detected::Http1);
    }
    let could_be = H2_PREFACE.starts_with(buf) || METHODS.iter().any(|m| m.starts_with(buf));
    if could_be {
        None
    } else {
        Some(Detected::Opaque)
    }
}

/// Reads from `stream` until its protocol is known, EOF, or `timeout`. Returns the
/// protocol and every byte read, which the caller must replay.
pub async fn sniff(stream: &TcpStream, timeout: Duration) -> io::Result<(Detected, Vec<u8>)> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = Vec::with_capacity(1024);
    loop {
        match tokio::time::timeout_at(deadline, stream.readable()).await {
            Err(_) => return Ok((Detected::Opaque, buf)),
            Ok(ready) => ready?,
        }
        let mut chunk = [0u8; 4096];
        match stream.try_read(&mut chunk) {
            Ok(0) => return Ok((Detected::Opaque, buf)),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
        if let Some(detected) = classify(&buf) {
            return Ok((detected, buf));
        }
    }
}

/// [`sniff`] for any byte stream (a tunnel stream, for one): reads until the
/// protocol is known, EOF, or `timeout`, and returns every byte read.
pub async fn sniff_io<C>(stream: &mut C, timeout: Duration) -> io::Result<(Detected, Vec<u8>)>
where
    C: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = Vec::with_capacity(1024);
    loop {
        let mut chunk = [0u8; 4096];
        // Reads of tokio streams are cancel-safe: a timed-out read took no bytes.
        let n = match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => return Ok((Detected::Opaque, buf)),
            Ok(read) => read?,
        };
        if n == 0 {
            return Ok((Detected::Opaque, buf));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(detected) = classify(&buf) {
            return Ok((detected, buf));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        let cases: &[(&[u8], Option<Detected>)] = &[
            (b"GET / HTTP/1.1\r\n", Some(Detected::Http1)),
            (b"POST /x HTTP/1.1\r\n", Some(Detected::Http1)),
            (b"GE", None),
            (b"PRI * HTTP/2.0\r\n", None),
            (H2_PREFACE, Some(Detected::Http2)),
            (
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00",
                Some(Detected::Http2),
            ),
            (b"CONNECT a:1 HTTP/1.1\r\n", Some(Detected::Opaque)),
            (b"\x16\x03\x01", Some(Detected::Opaque)),
            (b"SSH-2.0", Some(Detected::Opaque)),
            (b"GETX", Some(Detected::Opaque)),
            (b"", None),
        ];
        for (bytes, expected) in cases {
            assert_eq!(
                classify(bytes),
                *expected,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }
}
