//! A write deadline on every accepted socket. A client that stops reading eventually
//! fills its socket buffers; a write then waits for it forever, and the task (a
//! WebSocket's, or hyper's connection task behind an SSE stream or a long-poll reply)
//! is stuck with it. [`DeadlineIo`] fails any write that makes no progress for the
//! connection's [`WriteDeadline`], so the connection errors out, its task ends, and the
//! outbox's drop guard detaches the session. The timer exists only while a write is
//! blocked: an idle or healthy connection pays one pointer for it.
//!
//! The deadline starts as `server.write_timeout`; a handler may change it for its
//! connection (SSE to `sse.write_timeout`, WebSocket to a bit more than
//! `ws.write_timeout`, whose own shorter deadline then closes with 4008 first).

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep, sleep_until},
};

/// The write deadline of one connection, shared with the requests it carries (as a
/// request extension).
#[derive(Clone, Debug)]
pub struct WriteDeadline(Arc<AtomicU64>);

impl WriteDeadline {
    pub fn new(limit: Duration) -> Self {
        Self(Arc::new(AtomicU64::new(limit.as_millis() as u64)))
    }

    pub fn set(&self, limit: Duration) {
        self.0.store(limit.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn get(&self) -> Duration {
        Duration::from_millis(self.0.load(Ordering::Relaxed))
    }
}

/// A socket whose writes fail with `TimedOut` after making no progress for the deadline.
pub struct DeadlineIo<I> {
    io: I,
    deadline: WriteDeadline,
    /// Running only while a write is blocked.
    stalled: Option<Pin<Box<Sleep>>>,
    /// The connection's admission slot, given back when the socket goes.
    _slot: Option<super::admission::Slot>,
}

impl<I> DeadlineIo<I> {
    pub fn new(io: I, deadline: WriteDeadline) -> Self {
        Self {
            io,
            deadline,
            stalled: None,
            _slot: None,
        }
    }

    /// The socket.
    pub fn get_ref(&self) -> &I {
        &self.io
    }

    /// Holds `slot` for as long as the socket lives.
    pub fn with_slot(mut self, slot: super::admission::Slot) -> Self {
        self._slot = Some(slot);
        self
    }

    /// A write returned `Pending`: start (or check) the stall timer.
    fn stalled(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let limit = self.deadline.get();
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(sleep_until(Instant::now() + limit)));
        ready!(timer.as_mut().poll(cx));
        self.stalled = None;
        Poll::Ready(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("write made no progress for {limit:?}"),
        ))
    }

    fn track<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match r {
            Poll::Pending => self.stalled(cx).map(Err),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for DeadlineIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for DeadlineIo<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.track(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.track(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.track(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_shutdown(cx);
        self.track(cx, r)
    }
}

/// Runs `fut` with a deadline of `limit` that is armed only if `fut` does not finish on
/// its first poll: a write that goes out at once (the common case) costs no clock read
/// and no timer. `None`: the deadline passed first (measured from the first poll that
/// did not finish).
pub async fn lazy_timeout<F: Future>(limit: Duration, fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    let mut timer: Option<Pin<Box<Sleep>>> = None;
    std::future::poll_fn(move |cx| {
        if let Poll::Ready(out) = fut.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        let timer = timer.get_or_insert_with(|| Box::pin(sleep_until(Instant::now() + limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test(start_paused = true)]
    async fn a_blocked_write_fails_after_the_deadline() {
        // A pipe with a 64-byte buffer that nobody reads.
        let (client, _server) = tokio::io::duplex(64);
        let mut io = DeadlineIo::new(client, WriteDeadline::new(Duration::from_secs(3)));
        io.write_all(&[0; 64]).await.unwrap();
        let started = Instant::now();
        let err = io.write_all(&[0; 64]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn progress_resets_the_timer() {
        let (client, mut server) = tokio::io::duplex(64);
        let mut io = DeadlineIo::new(client, WriteDeadline::new(Duration::from_secs(3)));
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            // Reads a chunk every 2 s: slower than the writer, faster than the deadline.
            for _ in 0..4 {
                tokio::time::sleep(Duration::from_secs(2)).await;
                tokio::io::AsyncReadExt::read_exact(&mut server, &mut buf)
                    .await
                    .unwrap();
            }
        });
        for _ in 0..4 {
            io.write_all(&[1; 64]).await.unwrap();
        }
        reader.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn lazy_timeout_fires_only_for_a_future_that_waits() {
        let ready = lazy_timeout(Duration::from_millis(10), async { 7 }).await;
        assert_eq!(ready, Some(7));
        let never = lazy_timeout(Duration::from_millis(10), std::future::pending::<()>()).await;
        assert_eq!(never, None);
        let late = lazy_timeout(Duration::from_millis(10), async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            1
        })
        .await;
        assert_eq!(late, Some(1));
    }
}
