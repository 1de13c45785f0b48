use crate::codec::UserError;
use crate::codec::UserError::*;
use crate::frame::{self, Frame, FrameSize};
use crate::hpack;

use bytes::{Buf, BufMut, BytesMut};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::io::poll_write_buf;

use std::io::{self, Cursor};

// A macro to get around a method needing to borrow &mut self
macro_rules! limited_write_buf {
    ($self:expr) => {{
        let limit = $self.max_frame_size() + frame::HEADER_LEN;
        $self.buf.get_mut().limit(limit)
    }};
}

#[derive(Debug)]
pub struct FramedWrite<T, B> {
    /// Upstream `AsyncWrite`
    inner: T,
    final_flush_done: bool,

    encoder: Encoder<B>,
}

#[derive(Debug)]
struct Encoder<B> {
    /// HPACK encoder
    hpack: hpack::Encoder,

    /// Write buffer
    ///
    /// TODO: Should this be a ring buffer?
    buf: Cursor<BytesMut>,

    /// Next frame to encode
    next: Option<Next<B>>,

    /// Last data frame
    last_data_frame: Option<frame::Data<B>>,

    /// Max frame size, this is specified by the peer
    max_frame_size: FrameSize,

    /// Chain payloads bigger than this.
    chain_threshold: usize,
    // PARLEY PATCH (the connection's state smaller): no `min_buffer_capacity` (the
    // buffer's room a frame needs to be attempted); it was
    // always `chain_threshold + frame::HEADER_LEN` (`Encoder::min_buffer_capacity`).
}

#[derive(Debug)]
enum Next<B> {
    Data(frame::Data<B>),
    Continuation(frame::Continuation),
}

/// Initialize the connection with this amount of write buffer.
///
/// The minimum MAX_FRAME_SIZE is 16kb, so always be able to send a HEADERS
/// frame that big.
const DEFAULT_BUFFER_CAPACITY: usize = 16 * 1_024;

/// PARLEY PATCH (lazy write buffer): what the first frame after a flush reserves.
const FIRST_BUFFER_CAPACITY: usize = 512;

/// PARLEY PATCH (a write buffer of the chain threshold's size): what the first frame
/// after a flush reserves on an I/O that writes vectored, where a DATA frame of
/// `CHAIN_THRESHOLD` bytes or more puts only its head and first bytes in the buffer
/// (256 in all) and writes the rest from its own payload: room for that, or for a
/// smaller DATA frame whole (9 + 255), in glibc's 288-byte chunk. More frames in one
/// flush grow it as before, and the flush gives it back (PARLEY PATCH (write buffer
/// given back after each flush); an event stream kept this one while it waited).
const FIRST_BUFFER_CAPACITY_VECTORED: usize = 280;

/// Chain payloads bigger than this when vectored I/O is enabled. The remote
/// will never advertise a max frame size less than this (well, the spec says
/// the max frame size can't be less than 16kb, so not even close).
const CHAIN_THRESHOLD: usize = 256;

/// Chain payloads bigger than this when vectored I/O is **not** enabled.
/// A larger value in this scenario will reduce the number of small and
/// fragmented data being sent, and hereby improve the throughput.
const CHAIN_THRESHOLD_WITHOUT_VECTORED_IO: usize = 1024;

// TODO: Make generic
impl<T, B> FramedWrite<T, B>
where
    T: AsyncWrite + Unpin,
    B: Buf,
{
    pub fn new(inner: T) -> FramedWrite<T, B> {
        let chain_threshold = if inner.is_write_vectored() {
            CHAIN_THRESHOLD
        } else {
            CHAIN_THRESHOLD_WITHOUT_VECTORED_IO
        };
        FramedWrite {
            inner,
            final_flush_done: false,
            encoder: Encoder {
                hpack: hpack::Encoder::default(),
                // PARLEY PATCH (lazy write buffer): reserved by the first frame buffered.
                buf: Cursor::new(BytesMut::new()),
                next: None,
                last_data_frame: None,
                max_frame_size: frame::DEFAULT_MAX_FRAME_SIZE,
                chain_threshold,
            },
        }
    }

    /// Returns `Ready` when `send` is able to accept a frame
    ///
    /// Calling this function may result in the current contents of the buffer
    /// to be flushed to `T`.
    pub fn poll_ready(&mut self, cx: &mut Context) -> Poll<io::Result<()>> {
        if !self.encoder.has_capacity() {
            // Try flushing
            ready!(self.flush(cx))?;

            if !self.encoder.has_capacity() {
                return Poll::Pending;
            }
        }

        Poll::Ready(Ok(()))
    }

    /// Returns whether a frame can be buffered without first flushing the
    /// underlying I/O object.
    pub(crate) fn has_capacity(&self) -> bool {
        self.encoder.has_capacity()
    }

    /// Buffer a frame.
    ///
    /// `poll_ready` must be called first to ensure that a frame may be
    /// accepted.
    pub fn buffer(&mut self, item: Frame<B>) -> Result<(), UserError> {
        self.encoder.buffer(item)
    }

    /// Flush buffered data to the wire
    pub fn flush(&mut self, cx: &mut Context) -> Poll<io::Result<()>> {
        let span = tracing::trace_span!("FramedWrite::flush");
        let _e = span.enter();

        loop {
            while !self.encoder.is_empty() {
                let n = match self.encoder.next {
                    Some(Next::Data(ref mut frame)) => {
                        tracing::trace!(queued_data_frame = true);
                        let mut buf = (&mut self.encoder.buf).chain(frame.payload_mut());
                        ready!(poll_write_buf(Pin::new(&mut self.inner), cx, &mut buf))?
                    }
                    _ => {
                        tracing::trace!(queued_data_frame = false);
                        ready!(poll_write_buf(
                            Pin::new(&mut self.inner),
                            cx,
                            &mut self.encoder.buf
                        ))?
                    }
                };
                if n == 0 {
                    // No progress is possible; retrying would busy-loop.
                    tracing::trace!("write returned zero, but non-zero bytes remaining");
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
            }

            match self.encoder.unset_frame() {
                ControlFlow::Continue => (),
                ControlFlow::Break => break,
            }
        }

        // PARLEY PATCH (lazy write buffer): everything buffered is written, and the
        // buffer is given back (PARLEY PATCH (write buffer given back after each flush):
        // a connection that waits holds none).
        self.encoder.release_buf();

        tracing::trace!("flushing buffer");
        // Flush the upstream
        ready!(Pin::new(&mut self.inner).poll_flush(cx))?;

        Poll::Ready(Ok(()))
    }

    /// Close the codec
    pub fn shutdown(&mut self, cx: &mut Context) -> Poll<io::Result<()>> {
        if !self.final_flush_done {
            ready!(self.flush(cx))?;
            self.final_flush_done = true;
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[must_use]
enum ControlFlow {
    Continue,
    Break,
}

impl<B> Encoder<B>
where
    B: Buf,
{
    fn unset_frame(&mut self) -> ControlFlow {
        // Clear internal buffer
        self.buf.set_position(0);
        self.buf.get_mut().clear();

        // The data frame has been written, so unset it
        match self.next.take() {
            Some(Next::Data(frame)) => {
                self.last_data_frame = Some(frame);
                debug_assert!(self.is_empty());
                ControlFlow::Break
            }
            Some(Next::Continuation(frame)) => {
                // Buffer the continuation frame, then try to write again
                let mut buf = limited_write_buf!(self);
                if let Some(continuation) = frame.encode(&mut buf) {
                    self.next = Some(Next::Continuation(continuation));
                }
                ControlFlow::Continue
            }
            None => ControlFlow::Break,
        }
    }

    /// PARLEY PATCH (a write buffer of the chain threshold's size): what the first frame
    /// after a flush reserves.
    fn first_buffer_capacity(&self) -> usize {
        if self.chain_threshold == CHAIN_THRESHOLD {
            FIRST_BUFFER_CAPACITY_VECTORED
        } else {
            FIRST_BUFFER_CAPACITY
        }
    }

    /// PARLEY PATCH (lazy write buffer): gives the (empty) write buffer's memory back.
    ///
    /// PARLEY PATCH (write buffer given back after each flush): whatever its size. It
    /// kept a buffer of `first_buffer_capacity` (280 bytes on TCP): an event stream or a
    /// pending long-poll, which writes between long waits, held it for its whole life,
    /// a 320-byte size class with jemalloc. What it costs is an allocation and a free
    /// per flush that wrote something (docs/BENCHMARKS.md, round twenty-three).
    fn release_buf(&mut self) {
        debug_assert!(self.next.is_none() && !self.buf.has_remaining());
        if self.buf.get_ref().capacity() > 0 {
            self.buf = Cursor::new(BytesMut::new());
        }
    }

    fn buffer(&mut self, item: Frame<B>) -> Result<(), UserError> {
        // Ensure that we have enough capacity to accept the write.
        assert!(self.has_capacity());
        // PARLEY PATCH (lazy write buffer): the buffer, if it was given back; small,
        // since most wake-ups write one or two small frames (a DATA frame's head and
        // the first bytes of its payload, a WINDOW_UPDATE), and it grows as frames are
        // put in it.
        if self.buf.get_ref().capacity() == 0 {
            // PARLEY PATCH (write buffer given back after each flush): a new buffer of
            // that size; `reserve` on an empty one took `BytesMut`'s general path, ~200
            // instructions more per flush (callgrind).
            debug_assert_eq!(self.buf.position(), 0);
            self.buf = Cursor::new(BytesMut::with_capacity(self.first_buffer_capacity()));
        }
        let span = tracing::trace_span!("FramedWrite::buffer", frame = ?item);
        let _e = span.enter();

        tracing::debug!(frame = ?item, "send");

        match item {
            Frame::Data(mut v) => {
                // Ensure that the payload is not greater than the max frame.
                let len = v.payload().remaining();

                if len > self.max_frame_size() {
                    return Err(PayloadTooBig);
                }

                if len >= self.chain_threshold {
                    let head = v.head();

                    // Encode the frame head to the buffer
                    head.encode(len, self.buf.get_mut());

                    if self.buf.get_ref().remaining() < self.chain_threshold {
                        let extra_bytes = self.chain_threshold - self.buf.remaining();
                        self.buf.get_mut().put(v.payload_mut().take(extra_bytes));
                    }

                    // Save the data frame
                    self.next = Some(Next::Data(v));
                } else {
                    v.encode_chunk(self.buf.get_mut());

                    // The chunk has been fully encoded, so there is no need to
                    // keep it around
                    assert_eq!(v.payload().remaining(), 0, "chunk not fully encoded");

                    // Save off the last frame...
                    self.last_data_frame = Some(v);
                }
            }
            Frame::Headers(v) => {
                let mut buf = limited_write_buf!(self);
                if let Some(continuation) = v.encode(&mut self.hpack, &mut buf) {
                    self.next = Some(Next::Continuation(continuation));
                }
            }
            Frame::PushPromise(v) => {
                let mut buf = limited_write_buf!(self);
                if let Some(continuation) = v.encode(&mut self.hpack, &mut buf) {
                    self.next = Some(Next::Continuation(continuation));
                }
            }
            Frame::Settings(v) => {
                v.encode(self.buf.get_mut());
                tracing::trace!(rem = self.buf.remaining(), "encoded settings");
            }
            Frame::GoAway(v) => {
                v.encode(self.buf.get_mut());
                tracing::trace!(rem = self.buf.remaining(), "encoded go_away");
            }
            Frame::Ping(v) => {
                v.encode(self.buf.get_mut());
                tracing::trace!(rem = self.buf.remaining(), "encoded ping");
            }
            Frame::WindowUpdate(v) => {
                v.encode(self.buf.get_mut());
                tracing::trace!(rem = self.buf.remaining(), "encoded window_update");
            }

            Frame::Priority(_) => {
                /*
                v.encode(self.buf.get_mut());
                tracing::trace!("encoded priority; rem={:?}", self.buf.remaining());
                */
                unimplemented!();
            }
            Frame::Reset(v) => {
                v.encode(self.buf.get_mut());
                tracing::trace!(rem = self.buf.remaining(), "encoded reset");
            }
        }

        Ok(())
    }

    fn has_capacity(&self) -> bool {
        // PARLEY PATCH (lazy write buffer): the buffer is allocated on use and grows as
        // frames are put in it, so it takes frames as if it were `DEFAULT_BUFFER_CAPACITY`
        // (or its capacity, when larger): frames are batched and flushed exactly where
        // they were with the buffer allocated up front.
        let capacity = self.buf.get_ref().capacity().max(DEFAULT_BUFFER_CAPACITY);
        self.next.is_none() && capacity - self.buf.get_ref().len() >= self.min_buffer_capacity()
    }

    fn is_empty(&self) -> bool {
        match self.next {
            Some(Next::Data(ref frame)) => !frame.payload().has_remaining(),
            _ => !self.buf.has_remaining(),
        }
    }
}

impl<B> Encoder<B> {
    fn max_frame_size(&self) -> usize {
        self.max_frame_size as usize
    }

    /// PARLEY PATCH (the connection's state smaller): the room a frame needs in the
    /// buffer, computed rather than kept.
    fn min_buffer_capacity(&self) -> usize {
        self.chain_threshold + frame::HEADER_LEN
    }
}

impl<T, B> FramedWrite<T, B> {
    /// Returns the max frame size that can be sent
    pub fn max_frame_size(&self) -> usize {
        self.encoder.max_frame_size()
    }

    /// Set the peer's max frame size.
    pub fn set_max_frame_size(&mut self, val: usize) {
        assert!(val <= frame::MAX_MAX_FRAME_SIZE as usize);
        self.encoder.max_frame_size = val as FrameSize;
    }

    /// Set the peer's header table size.
    pub fn set_header_table_size(&mut self, val: usize) {
        self.encoder.hpack.update_max_size(val);
    }

    /// PARLEY PATCH (send header table size): the largest header table this side's
    /// encoder uses, whatever the peer's SETTINGS allow.
    pub fn set_max_header_table_size(&mut self, val: usize) {
        self.encoder.hpack.set_max_allowed_size(val);
    }

    /// Retrieve the last data frame that has been sent
    pub fn take_last_data_frame(&mut self) -> Option<frame::Data<B>> {
        self.encoder.last_data_frame.take()
    }

    pub fn get_mut(&mut self) -> &mut T {
        &mut self.inner
    }
}

impl<T: AsyncRead + Unpin, B> AsyncRead for FramedWrite<T, B> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

// We never project the Pin to `B`.
impl<T: Unpin, B> Unpin for FramedWrite<T, B> {}

#[cfg(feature = "unstable")]
mod unstable {
    use super::*;

    impl<T, B> FramedWrite<T, B> {
        pub fn get_ref(&self) -> &T {
            &self.inner
        }
    }
}

// PARLEY PATCH (lazy write buffer): the buffer is held only while it holds bytes.
#[cfg(test)]
mod lazy_buffer_tests {
    use super::*;
    use crate::frame::{Ping, StreamId};
    use std::task::Waker;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn the_write_buffer_is_reserved_by_a_frame_and_a_grown_one_given_back_by_the_flush() {
        let (a, mut peer) = tokio::io::duplex(1 << 20);
        let mut w: FramedWrite<_, bytes::Bytes> = FramedWrite::new(a);
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(w.encoder.buf.get_ref().capacity(), 0, "none before a frame");
        assert!(w.has_capacity());
        for round in 0..3u8 {
            assert!(w.poll_ready(&mut cx).is_ready());
            w.buffer(Ping::new([round; 8]).into()).unwrap();
            let small = frame::Data::new(StreamId::from(1), bytes::Bytes::from_static(b"hi"));
            w.buffer(small.into()).unwrap();
            let big = frame::Data::new(StreamId::from(1), bytes::Bytes::from(vec![round; 5000]));
            w.buffer(big.into()).unwrap();
            assert!(w.encoder.buf.get_ref().capacity() >= 17 + 11 + 9);
            assert!(matches!(w.flush(&mut cx), Poll::Ready(Ok(()))));
            assert_eq!(w.encoder.buf.get_ref().capacity(), 0, "given back");
            // PARLEY PATCH (write buffer given back after each flush): a small frame
            // alone takes the small buffer, and its flush gives it back too.
            assert!(w.poll_ready(&mut cx).is_ready());
            w.buffer(Ping::new([round; 8]).into()).unwrap();
            let held = w.encoder.buf.get_ref().capacity();
            assert!((17..=FIRST_BUFFER_CAPACITY).contains(&held));
            assert!(matches!(w.flush(&mut cx), Poll::Ready(Ok(()))));
            assert_eq!(w.encoder.buf.get_ref().capacity(), 0, "given back");
            let mut got = vec![0; 17 + 11 + 5009];
            peer.read_exact(&mut got).await.unwrap();
            assert_eq!(&got[9..17], &[round; 8]);
            assert_eq!(&got[26..28], b"hi");
            assert!(got[37..].iter().all(|b| *b == round));
            let mut ping = [0; 17];
            peer.read_exact(&mut ping).await.unwrap();
            assert_eq!(&ping[9..], &[round; 8]);
        }
    }

    // PARLEY PATCH (a write buffer of the chain threshold's size)
    struct Vectored(Vec<u8>);

    impl tokio::io::AsyncWrite for Vectored {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.0.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let mut n = 0;
            for b in bufs {
                self.0.extend_from_slice(b);
                n += b.len();
            }
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    // PARLEY PATCH (a write buffer of the chain threshold's size, given back after
    // each flush)
    #[test]
    fn parley_a_vectored_writer_takes_a_buffer_of_the_chain_thresholds_size() {
        let mut w: FramedWrite<_, bytes::Bytes> = FramedWrite::new(Vectored(Vec::new()));
        let mut cx = Context::from_waker(Waker::noop());
        let mut expected = Vec::new();
        // An event of 283 bytes (chained: its head and 247 bytes in the buffer), one of
        // 255 (whole in the buffer), one of 20: each takes the buffer as the first frame
        // reserves it, and its flush gives it back.
        for (i, len) in [283usize, 255, 20, 4000].into_iter().enumerate() {
            assert!(w.poll_ready(&mut cx).is_ready());
            let payload = bytes::Bytes::from(vec![i as u8; len]);
            w.buffer(frame::Data::new(StreamId::from(1), payload).into())
                .unwrap();
            assert_eq!(
                w.encoder.buf.get_ref().capacity(),
                FIRST_BUFFER_CAPACITY_VECTORED,
                "a frame of {len} bytes"
            );
            assert!(matches!(w.flush(&mut cx), Poll::Ready(Ok(()))));
            assert_eq!(w.encoder.buf.get_ref().capacity(), 0, "given back");
            expected.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8]);
            expected.extend_from_slice(&[0, 0, 0, 0, 0, 1]);
            expected.extend(std::iter::repeat(i as u8).take(len));
        }
        // Several frames in one flush grow it; the flush gives the grown one back.
        assert!(w.poll_ready(&mut cx).is_ready());
        w.buffer(Ping::new([7; 8]).into()).unwrap();
        let payload = bytes::Bytes::from(vec![9u8; 255]);
        w.buffer(frame::Data::new(StreamId::from(1), payload).into())
            .unwrap();
        w.buffer(Ping::new([8; 8]).into()).unwrap();
        assert!(w.encoder.buf.get_ref().capacity() > FIRST_BUFFER_CAPACITY_VECTORED);
        assert!(matches!(w.flush(&mut cx), Poll::Ready(Ok(()))));
        assert_eq!(w.encoder.buf.get_ref().capacity(), 0, "given back");
        expected.extend_from_slice(&[0, 0, 8, 6, 0, 0, 0, 0, 0]);
        expected.extend_from_slice(&[7; 8]);
        expected.extend_from_slice(&[0, 0, 255, 0, 0, 0, 0, 0, 1]);
        expected.extend_from_slice(&[9; 255]);
        expected.extend_from_slice(&[0, 0, 8, 6, 0, 0, 0, 0, 0]);
        expected.extend_from_slice(&[8; 8]);
        assert!(w.get_mut().0 == expected, "the bytes on the wire");
    }
}
