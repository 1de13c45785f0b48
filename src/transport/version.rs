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
    future::poll_fn,
    io,
    mem::MaybeUninit,
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What an HTTP/2 client sends first (RFC 9113 section 3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Most bytes one read takes while the version is told. A client's first bytes are
/// mostly all it sends before an answer (a request head, or the preface and its first
/// frames), so reading them whole here saves the protocol's own first read: one system
/// call fewer per connection (hyper would otherwise read again right away).
const FIRST_READ_BYTES: usize = 4096;

/// An accepted connection whose first bytes were read to tell its HTTP version; reads
/// return them again first.
pub struct Sniffed<I> {
    io: I,
    /// The bytes read to tell the version, from `at` on not yet read again (given back
    /// once they all were: an idle connection holds none).
    first: Vec<u8>,
    at: usize,
}

impl<I: AsyncRead + Unpin> Sniffed<I> {
    /// Reads the connection's first bytes; `true` when it speaks HTTP/2. A connection
    /// that ends before it said anything counts as HTTP/1 (which then sees the end).
    pub async fn read(mut io: I) -> io::Result<(bool, Sniffed<I>)> {
        let mut first = Vec::new();
        let h2 = loop {
            let n = poll_fn(|cx| read_onto(&mut io, cx, &mut first)).await?;
            let told = first.len().min(H2_PREFACE.len());
            if n == 0 || first[..told] != H2_PREFACE[..told] {
                break false;
            }
            if told == H2_PREFACE.len() {
                break true;
            }
        };
        Ok((h2, Sniffed { io, first, at: 0 }))
    }
}

impl<I> Sniffed<I> {
    /// The connection under the bytes read to tell the version.
    pub fn get_ref(&self) -> &I {
        &self.io
    }

    /// Whether some of those bytes were not read again yet.
    fn has_unread(&self) -> bool {
        self.at < self.first.len()
    }
}

impl<I: AsyncRead + Unpin> Sniffed<I> {
    /// Waits for the connection's next bytes and keeps them to be read again (an idle
    /// HTTP/1 connection's wait, `server::wait_idle`): how many there are, 0 at the end.
    /// Ready at once while some are still unread.
    pub fn poll_more(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.has_unread() {
            return Poll::Ready(Ok(self.first.len() - self.at));
        }
        read_onto(&mut self.io, cx, &mut self.first)
    }
}

/// One read from `io`, onto the end of `first`; how many bytes it brought. The bytes
/// are read onto the stack (inside one poll: the connection's future holds no buffer)
/// and copied into `first`, allocated only once some arrived.
fn read_onto<I: AsyncRead + Unpin>(
    io: &mut I,
    cx: &mut Context<'_>,
    first: &mut Vec<u8>,
) -> Poll<io::Result<usize>> {
    let mut bytes = [MaybeUninit::<u8>::uninit(); FIRST_READ_BYTES];
    let mut read = ReadBuf::uninit(&mut bytes);
    ready!(Pin::new(io).poll_read(cx, &mut read))?;
    first.extend_from_slice(read.filled());
    Poll::Ready(Ok(read.filled().len()))
}

impl<I: AsyncRead + Unpin> AsyncRead for Sniffed<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.at < this.first.len() {
            let n = (this.first.len() - this.at).min(buf.remaining());
            buf.put_slice(&this.first[this.at..this.at + n]);
            this.at += n;
            if this.at == this.first.len() {
                this.first = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
        // The preface a byte at a time.
        let (mut client, server) = tokio::io::duplex(64);
        let sniffing = tokio::spawn(Sniffed::read(server));
        for b in H2_PREFACE {
            client.write_all(&[*b]).await.unwrap();
            tokio::task::yield_now().await;
        }
        let (h2, mut s) = sniffing.await.unwrap().unwrap();
        assert!(h2);
        let mut got = [0u8; 24];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, H2_PREFACE);
    }

    /// A request head sent at once is read whole while the version is told, and given
    /// back in one read: the protocol need not read the socket again for it.
    #[tokio::test]
    async fn a_head_sent_at_once_comes_back_in_one_read() {
        let head = b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
        let (mut client, server) = tokio::io::duplex(4096);
        client.write_all(head).await.unwrap();
        let (h2, mut s) = Sniffed::read(server).await.unwrap();
        assert!(!h2);
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], head);
        // Given back: nothing held.
        assert_eq!((s.first.capacity(), s.at), (0, 0));
    }

    /// An idle connection's wait ([`Sniffed::poll_more`]) keeps what it reads to be read
    /// again, says at once while bytes are unread, and tells the end (0).
    #[tokio::test]
    async fn the_idle_wait_keeps_what_it_reads() {
        let (mut client, server) = tokio::io::duplex(4096);
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let (_, mut s) = Sniffed::read(server).await.unwrap();
        // The first bytes are still unread: ready at once, nothing more read.
        let unread = std::future::poll_fn(|cx| s.poll_more(cx)).await.unwrap();
        assert_eq!(unread, 18);
        let mut buf = [0u8; 64];
        assert_eq!(s.read(&mut buf).await.unwrap(), 18);
        // Nothing to read: the wait waits.
        let waiting = std::future::poll_fn(|cx| s.poll_more(cx));
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(20), waiting)
                .await
                .is_err()
        );
        client.write_all(b"GET /next").await.unwrap();
        let more = std::future::poll_fn(|cx| s.poll_more(cx)).await.unwrap();
        assert_eq!(more, 9);
        assert_eq!(s.read(&mut buf).await.unwrap(), 9);
        assert_eq!(&buf[..9], b"GET /next");
        assert_eq!((s.first.capacity(), s.at), (0, 0));
        client.shutdown().await.unwrap();
        assert_eq!(std::future::poll_fn(|cx| s.poll_more(cx)).await.unwrap(), 0);
    }
}
