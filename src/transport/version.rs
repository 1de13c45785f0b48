//! Telling HTTP/1 from HTTP/2 on an accepted connection (cleartext h2c, or TLS whatever
//! ALPN said), the way hyper-util's `auto` builder does: read until the bytes are not a
//! prefix of the HTTP/2 connection preface, or are all of it, then hand the connection
//! to the right protocol with those bytes put back in front.
//!
//! Done here rather than by `auto` because `auto`'s connection future holds the HTTP/1
//! and the HTTP/2 connection states in one enum, so every HTTP/1 connection (an idle
//! SSE stream, a pending long-poll) carried the much larger HTTP/2 state's size in its
//! task. The server boxes the HTTP/2 connection instead (`server::serve_connection`).

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// What an HTTP/2 client sends first (RFC 9113 section 3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An accepted connection whose first bytes were read to tell its HTTP version; reads
/// return them again first.
pub struct Sniffed<I> {
    io: I,
    first: [u8; 24],
    at: u8,
    len: u8,
}

impl<I: AsyncRead + Unpin> Sniffed<I> {
    /// Reads the connection's first bytes; `true` when it speaks HTTP/2. A connection
    /// that ends before it said anything counts as HTTP/1 (which then sees the end).
    pub async fn read(mut io: I) -> io::Result<(bool, Sniffed<I>)> {
        let mut first = [0u8; 24];
        let mut len = 0;
        let h2 = loop {
            let n = io.read(&mut first[len..]).await?;
            len += n;
            if n == 0 || first[..len] != H2_PREFACE[..len] {
                break false;
            }
            if len == H2_PREFACE.len() {
                break true;
            }
        };
        let sniffed = Sniffed {
            io,
            first,
            at: 0,
            len: len as u8,
        };
        Ok((h2, sniffed))
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Sniffed<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let (at, len) = (usize::from(self.at), usize::from(self.len));
        if at < len {
            let n = (len - at).min(buf.remaining());
            buf.put_slice(&self.first[at..at + n]);
            self.at += n as u8;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Sniffed<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn sniff(sent: &[u8], close: bool) -> (bool, Vec<u8>) {
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(sent).await.unwrap();
        if close {
            client.shutdown().await.unwrap();
        }
        let (h2, mut s) = Sniffed::read(server).await.unwrap();
        let mut got = vec![0; sent.len()];
        s.read_exact(&mut got).await.unwrap();
        (h2, got)
    }

    #[tokio::test]
    async fn tells_the_version_and_gives_every_byte_back() {
        let h1 = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(sniff(h1, false).await, (false, h1.to_vec()));
        let mut h2 = H2_PREFACE.to_vec();
        h2.extend_from_slice(b"\0\0\0\x04\0\0\0\0\0");
        assert_eq!(sniff(&h2, false).await, (true, h2.clone()));
        // A prefix of the preface, then the end: HTTP/1 (which sees the end).
        assert_eq!(sniff(b"PRI * H", true).await, (false, b"PRI * H".to_vec()));
        // Diverging after a shared start.
        assert_eq!(sniff(b"PRI /x", false).await, (false, b"PRI /x".to_vec()));
    }
}
