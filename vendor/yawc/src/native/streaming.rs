//! Low-level streaming WebSocket layer for manual fragment control.
//!
//! This module provides the [`Streaming`] type, which gives users direct control over
//! WebSocket frame fragmentation without automatic reassembly or fragmentation.
//!
//! # When to Use Streaming
//!
//! Use `Streaming` when you need:
//! - **Manual fragment control**: Send and receive individual fragments without automatic reassembly
//! - **Memory-efficient streaming**: Process large messages incrementally without buffering
//! - **Custom fragmentation logic**: Implement application-specific fragmentation strategies
//! - **Real-time processing**: Handle fragments as they arrive for low-latency applications
//!
//! # Comparison with WebSocket
//!
//! | Feature | `WebSocket` | `Streaming` |
//! |---------|------------|------------|
//! | Fragment reassembly | Automatic | Manual |
//! | Auto-fragmentation | Optional | Manual |
//! | Compression | Yes | Yes |
//! | Memory usage | Higher | Lower |
//! | Control | Limited | Full |
//!
//! # Example
//!
//! ```rust,no_run
//! use yawc::{WebSocket, Frame, OpCode};
//! use futures::SinkExt;
//!
//! # async fn example() -> yawc::Result<()> {
//! // Convert WebSocket to Streaming for manual fragment control
//! let ws = WebSocket::connect("ws://example.com".parse()?).await?;
//! let mut streaming = ws.into_streaming();
//!
//! // Send a message as multiple fragments manually
//! streaming.send(Frame::text("Hello").with_fin(false)).await?;
//! streaming.send(Frame::continuation(" ").with_fin(false)).await?;
//! streaming.send(Frame::continuation("World!")).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Safety
//!
//! When using `Streaming`, you are responsible for:
//! - **Fragment ordering**: Continuation frames must follow a non-FIN data frame
//! - **OpCode rules**: Only the first fragment carries the message opcode
//! - **Control frames**: Cannot be fragmented and can be sent between data fragments
//! - **Compression**: RSV1 bit is managed automatically based on compression state

use std::{
    collections::VecDeque,
    future::poll_fn,
    mem::MaybeUninit,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
};

use crate::{close::CloseCode, codec, Negotiation, OpCode, Result, Role};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::codec::{Decoder as _, Framed, FramedParts};

/// The buffer size tokio-util starts `Framed` with, used when none is configured.
const DEFAULT_BUFFER_CAPACITY: usize = 8 * 1024;

// PARLEY PATCH: see `Options::lazy_buffers`.
/// How many bytes a connection without a read buffer reads at once, on the stack.
const LAZY_READ_BYTES: usize = 2048;

use crate::{
    codec::Codec,
    compression::{Compressor, Decompressor},
    native::{ContextKind, WakeProxy},
    Frame, ReadHalf, WebSocketError, WriteHalf,
};

/// Low-level streaming WebSocket connection with manual fragment control.
///
/// `Streaming` provides direct access to WebSocket frames without automatic
/// fragmentation or reassembly. This allows for:
/// - Streaming large files directly from/to disk without loading them in memory
/// - Implementing custom fragmentation strategies
/// - Processing data incrementally as fragments arrive
/// - Fine-grained control over frame boundaries
///
/// # Conversion
///
/// You can convert a [`WebSocket`](super::WebSocket) into a [`Streaming`] connection:
///
/// ```rust,no_run
/// # use yawc::WebSocket;
/// # async fn example() -> yawc::Result<()> {
/// let ws = WebSocket::connect("ws://example.com".parse()?).await?;
/// let streaming = ws.into_streaming();
/// # Ok(())
/// # }
/// ```
///
/// # Fragmentation Protocol
///
/// When manually fragmenting messages:
/// 1. Send first fragment with desired OpCode (Text/Binary) and `FIN=false`
/// 2. Send continuation fragments with OpCode::Continuation and `FIN=false`
/// 3. Send final fragment with OpCode::Continuation and `FIN=true`
///
/// # Example: Streaming File Upload
///
/// ```rust,no_run
/// use yawc::{WebSocket, Frame, OpCode};
/// use futures::SinkExt;
/// use std::io::Read;
///
/// # async fn upload_file() -> yawc::Result<()> {
/// let ws = WebSocket::connect("ws://example.com/upload".parse()?).await?;
/// let mut streaming = ws.into_streaming();
///
/// let mut file = std::fs::File::open("large_file.bin")?;
/// let mut buffer = vec![0u8; 64 * 1024]; // 64 KiB chunks
/// let mut first = true;
///
/// loop {
///     let bytes_read = file.read(&mut buffer)?;
///     if bytes_read == 0 {
///         break;
///     }
///
///     let chunk = buffer[..bytes_read].to_vec();
///     let frame = if first {
///         first = false;
///         Frame::binary(chunk).with_fin(false)
///     } else {
///         Frame::continuation(chunk).with_fin(false)
///     };
///
///     streaming.send(frame).await?;
/// }
///
/// // Send final empty fragment to close the message
/// streaming.send(Frame::continuation(vec![])).await?;
/// # Ok(())
/// # }
/// ```
///
/// # Compression Behavior
///
/// Unlike [`WebSocket`](super::WebSocket) which compresses complete messages,
/// `Streaming` performs **streaming compression**:
/// - Compression state is maintained across fragments
/// - RSV1 bit is automatically managed (set only on first fragment)
/// - Decompression happens per-fragment with context preservation
///
/// This allows compressed data to be processed incrementally without waiting
/// for the complete message.
pub struct Streaming<S> {
    stream: Framed<S, Codec>,
    // Reading state
    read_half: ReadHalf,
    // Writing state
    write_half: WriteHalf,
    // waker proxy
    wake_proxy: Arc<WakeProxy>,
    // frames we must send (control..)
    // PARLEY PATCH: boxed, present only while it holds frames (`Obligated`).
    obligated_sends: Obligated,
    // flag to indicate the writer to flush sends
    flush_sends: bool,
    // compressor
    deflate: Option<Compressor>,
    // decompressor
    inflate: Option<Decompressor>,
    max_payload_read: usize,
    // messages sent as one frame below this size are not compressed
    compression_threshold: usize,
    // size the read buffer returns to after a larger frame
    read_buffer_capacity: usize,
    // size the write buffer returns to after it grew past the backpressure boundary
    write_buffer_capacity: usize,
    // the write buffer grew past its usual size and is replaced once flushed
    write_buffer_grown: bool,
    // PARLEY PATCH: buffers held only while they hold bytes (`Options::lazy_buffers`).
    lazy_buffers: bool,
    // bytes this layer read itself (lazy buffers) may hold frames `Framed` does not
    // know about: it decodes only after reads of its own, so decode them here first
    prefilled: bool,
    // PARLEY PATCH: the peer's close frame was read (a lingering close may end at once).
    close_received: bool,
}

impl<S> Streaming<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// PARLEY PATCH (see vendor/README.md): `start_send` of one complete (FIN) Text or
    /// Binary frame whose payload is `prefix` followed by `payload`, both copied straight
    /// into the write buffer: no `Frame`, no payload `Bytes` to build or release. Call it
    /// where `start_send` may be called (after `poll_ready`). `compressed`: the payload is
    /// already a permessage-deflate message (RSV1, as `Frame::with_precompressed`).
    /// `false`, with nothing written, when the frame must take the `Frame` path: this side
    /// masks its frames, or the connection's compressor would compress it.
    pub(crate) fn start_send_parts(
        &mut self,
        opcode: OpCode,
        compressed: bool,
        prefix: &[u8],
        payload: &[u8],
    ) -> bool {
        let len = prefix.len() + payload.len();
        let compresses = !compressed && self.deflate.is_some() && len >= self.compression_threshold;
        if compresses || opcode.is_control() || self.stream.codec().masks() {
            return false;
        }
        // As `WriteHalf::start_send` does for a FIN data frame.
        self.write_half.streaming = false;
        if self.lazy_buffers && self.stream.write_buffer().capacity() == 0 {
            // As `start_send`: the first frame since the buffer was given back allocates
            // it at its usual size, not at this frame's.
            self.stream
                .write_buffer_mut()
                .reserve(self.write_buffer_capacity);
        }
        let dst = self.stream.write_buffer_mut();
        dst.reserve(crate::frame::MAX_HEAD_SIZE + len);
        let first_byte = 0x80 | u8::from(compressed) << 6 | u8::from(opcode);
        crate::frame::put_head(dst, first_byte, len, None);
        dst.extend_from_slice(prefix);
        dst.extend_from_slice(payload);
        let usual = self
            .write_buffer_capacity
            .max(self.stream.backpressure_boundary());
        if self.stream.write_buffer().len() > usual {
            self.write_buffer_grown = true;
        }
        true
    }

    pub(crate) fn new(role: Role, stream: S, read_buf: Bytes, negotiated: &Negotiation) -> Self {
        let decoder = codec::Decoder::new(role, negotiated.max_payload_read);
        let encoder = codec::Encoder::new(role);
        let codec = Codec::from((decoder, encoder));

        let lazy_buffers = negotiated.lazy_buffers;
        let mut framed = if lazy_buffers && read_buf.is_empty() {
            // PARLEY PATCH: no buffer at all until there are bytes to hold (and no 8 KiB
            // ones allocated and freed at once, as `from_parts` would).
            let mut framed = Framed::with_capacity(stream, codec, 0);
            // tokio-util before 0.7.16 gives `with_capacity`'s write buffer 8 KiB
            // whatever `capacity` says (yawc 0.5.0's own Cargo.lock has 0.7.15).
            *framed.write_buffer_mut() = BytesMut::new();
            framed.set_backpressure_boundary(DEFAULT_BUFFER_CAPACITY);
            framed
        } else {
            let mut parts = FramedParts::new(stream, codec);
            parts.read_buf = read_buf.into();

            // `from_parts` marks leftover handshake bytes as readable, which
            // `Framed::with_capacity` cannot, but it also raises both buffers to 8 KiB.
            // Swap in buffers of the configured size afterwards.
            let mut framed = Framed::from_parts(parts);
            if let Some(capacity) = negotiated.read_buffer_capacity {
                set_capacity(framed.read_buffer_mut(), capacity);
            }
            if lazy_buffers {
                *framed.write_buffer_mut() = BytesMut::new();
            } else if let Some(capacity) = negotiated.write_buffer_capacity {
                set_capacity(framed.write_buffer_mut(), capacity);
            }
            framed
        };
        if let Some(boundary) = negotiated.max_backpressure_write_boundary {
            framed.set_backpressure_boundary(boundary);
        }

        Self {
            stream: framed,
            read_half: ReadHalf::new(),
            write_half: WriteHalf::new(),
            wake_proxy: Arc::new(WakeProxy::default()),
            obligated_sends: Obligated::default(),
            flush_sends: false,
            deflate: negotiated.compressor(),
            inflate: negotiated.decompressor(),
            max_payload_read: negotiated.max_payload_read,
            compression_threshold: negotiated.compression_threshold,
            read_buffer_capacity: negotiated
                .read_buffer_capacity
                .unwrap_or(DEFAULT_BUFFER_CAPACITY),
            write_buffer_capacity: negotiated
                .write_buffer_capacity
                .unwrap_or(DEFAULT_BUFFER_CAPACITY),
            write_buffer_grown: false,
            lazy_buffers,
            prefilled: false,
            close_received: false,
        }
    }

    /// Asynchronously retrieves the next frame from the WebSocket stream.
    pub async fn next_frame(&mut self) -> Result<Frame> {
        poll_fn(|cx| self.poll_next_frame(cx)).await
    }

    /// Splits the `Streaming` connection into its low-level components for advanced usage.
    ///
    /// This method provides access to the underlying framed stream and read/write halves,
    /// allowing for direct manipulation of the WebSocket protocol layer.
    ///
    /// # Safety
    ///
    /// This function is unsafe because it splits ownership of shared state. The caller
    /// must ensure that:
    /// - Only one component performs reads at a time
    /// - Only one component performs writes at a time
    /// - Protocol invariants are maintained (control frames, fragment ordering, etc.)
    ///
    /// # Example
    ///
    /// See [`examples/streaming.rs`](https://github.com/infinitefield/yawc/blob/master/examples/streaming.rs)
    /// for a complete example of using `split_stream()` for low-level frame processing.
    pub unsafe fn split_stream(self) -> (Framed<S, Codec>, ReadHalf, WriteHalf) {
        (self.stream, self.read_half, self.write_half)
    }

    /// Polls for the next frame in the WebSocket stream.
    ///
    /// This method returns individual frames without reassembling fragments. Applications
    /// using this method must handle fragmentation manually by checking the `FIN` flag
    /// and `OpCode` of each frame.
    ///
    /// # Returns
    ///
    /// - `Poll::Ready(Ok(frame))` - A complete frame is available
    /// - `Poll::Ready(Err(e))` - A protocol error occurred
    /// - `Poll::Pending` - No frame is available yet
    ///
    /// # Fragment Handling
    ///
    /// Frames may arrive as:
    /// - Complete messages: `OpCode::{Text,Binary}` with `FIN=true`
    /// - First fragment: `OpCode::{Text,Binary}` with `FIN=false`
    /// - Middle fragments: `OpCode::Continuation` with `FIN=false`
    /// - Final fragment: `OpCode::Continuation` with `FIN=true`
    pub fn poll_next_frame(&mut self, cx: &mut Context<'_>) -> Poll<Result<Frame>> {
        self.poll_next_frame_with_limit(cx, self.max_payload_read)
    }

    pub(crate) fn poll_next_frame_with_limit(
        &mut self,
        cx: &mut Context<'_>,
        max_read_buffer: usize,
    ) -> Poll<Result<Frame>> {
        // PARLEY PATCH: no reading while frames this side owes (a pong, a close) cannot
        // be written: a peer that sends pings and never reads would otherwise have them
        // read, and answers queued, without bound. Its own sends back up instead.
        if !self.read_half.is_closed && (!self.obligated_sends.is_empty() || self.flush_sends) {
            ready!(self.poll_flush_obligated(ContextKind::Read, cx))?;
        }
        let res = if self.lazy_buffers {
            self.poll_frame_lazily(cx)
        } else if self.stream.read_buffer().is_empty() {
            self.wake_proxy.set_waker(ContextKind::Read, cx.waker());
            self.wake_proxy
                .with_context(|cx| self.read_half.poll_frame(&mut self.stream, cx))
        } else {
            self.wake_proxy
                .poll_with_context(ContextKind::Read, cx, |cx| {
                    self.read_half.poll_frame(&mut self.stream, cx)
                })
        };
        let res = res.map(|res| {
            res.and_then(|frame| {
                self.release_read_buffer(frame.payload.len());
                self.on_frame(frame, max_read_buffer)
            })
        });
        if self.lazy_buffers {
            // PARLEY PATCH: nothing left to decode: hold no read buffer. A frame's
            // payload shares the allocation and keeps it alive only as long as it lives.
            release_if_empty(self.stream.read_buffer_mut());
        }
        match res {
            Poll::Ready(Ok(frame)) => Poll::Ready(Ok(frame)),
            Poll::Ready(Err(WebSocketError::ConnectionClosed)) => {
                ready!(self.poll_flush_obligated(ContextKind::Read, cx))?;
                Poll::Ready(Err(WebSocketError::ConnectionClosed))
            }
            Poll::Ready(Err(err)) => {
                self.fail(&err);
                Poll::Ready(Err(err))
            }
            Poll::Pending => {
                ready!(self.poll_flush_obligated(ContextKind::Read, cx))?;
                Poll::Pending
            }
        }
    }

    // PARLEY PATCH: see `Options::lazy_buffers`.
    /// Reads the next frame without holding a read buffer while waiting: with no
    /// buffer, the first bytes are read onto the stack and a buffer is allocated only
    /// when some arrived. Afterwards `Framed` reads on as usual until the buffer is
    /// empty again (and released by the caller).
    fn poll_frame_lazily(&mut self, cx: &mut Context<'_>) -> Poll<Result<Frame>> {
        loop {
            if self.prefilled {
                // `Framed` decodes only after reads of its own; these bytes came from
                // the read below, so frames already complete in them are decoded here.
                let mut buffer = std::mem::take(self.stream.read_buffer_mut());
                let decoded = self.stream.codec_mut().decode(&mut buffer);
                *self.stream.read_buffer_mut() = buffer;
                match decoded {
                    Ok(None) => self.prefilled = false,
                    decoded => {
                        if decoded.is_err() {
                            self.prefilled = false;
                        }
                        let mut one = Decoded(decoded.transpose());
                        return self.read_half.poll_frame(&mut one, cx);
                    }
                }
            }
            if self.stream.read_buffer().capacity() == 0 {
                let mut bytes = [MaybeUninit::<u8>::uninit(); LAZY_READ_BYTES];
                let mut read = ReadBuf::uninit(&mut bytes);
                self.wake_proxy.set_waker(ContextKind::Read, cx.waker());
                let polled = self
                    .wake_proxy
                    .with_context(|cx| Pin::new(self.stream.get_mut()).poll_read(cx, &mut read));
                match polled {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(err)) => return Poll::Ready(Err(err.into())),
                    // End of stream: `Framed` reads it again and reports it.
                    Poll::Ready(Ok(())) if read.filled().is_empty() => {}
                    Poll::Ready(Ok(())) => {
                        let filled = read.filled();
                        let mut buffer =
                            BytesMut::with_capacity(self.read_buffer_capacity.max(filled.len()));
                        buffer.extend_from_slice(filled);
                        *self.stream.read_buffer_mut() = buffer;
                        self.prefilled = true;
                        continue;
                    }
                }
            }
            // Bytes of an unfinished frame are buffered: `Framed` reads the rest.
            return self
                .wake_proxy
                .poll_with_context(ContextKind::Read, cx, |cx| {
                    self.read_half.poll_frame(&mut self.stream, cx)
                });
        }
    }

    // PARLEY PATCH: see `Options::lazy_buffers`.
    /// Frees the write buffer if it holds no bytes; with [`crate::Options::lazy_buffers`]
    /// the next frame allocates it again. For a caller that knows the connection goes
    /// idle now (freeing it after every flush would cost an allocation per flush).
    pub fn free_write_buffer(&mut self) {
        release_if_empty(self.stream.write_buffer_mut());
    }

    /// Gives back the memory a frame larger than the read buffer made it grow to.
    ///
    /// The frame's payload shares the buffer's allocation, so the buffer keeps all of
    /// it until replaced. Bytes of the next frame already read are kept, unless there
    /// are more than fit, in which case the next frame shrinks it instead.
    fn release_read_buffer(&mut self, frame_len: usize) {
        let capacity = self.read_buffer_capacity;
        let buffer = self.stream.read_buffer_mut();
        if frame_len > capacity && buffer.len() <= capacity {
            set_capacity(buffer, capacity);
        }
    }

    /// Gives back the memory the write buffer grew to, once it has been written out.
    fn release_write_buffer(&mut self) {
        if self.write_buffer_grown && self.stream.write_buffer().is_empty() {
            set_capacity(self.stream.write_buffer_mut(), self.write_buffer_capacity);
            self.write_buffer_grown = false;
        }
    }

    fn on_frame(&mut self, mut frame: Frame, max_read_buffer: usize) -> Result<Frame> {
        #[cfg(test)]
        println!(
            "<<Compression<< OpCode={:?} Fin={} Payload={}",
            frame.opcode,
            frame.fin,
            frame.payload.len()
        );

        // Handle protocol control frames first
        match frame.opcode {
            OpCode::Ping => {
                self.on_ping(&frame);
                return Ok(frame);
            }
            OpCode::Close => {
                self.on_close(&frame)?;
                return Ok(frame);
            }
            OpCode::Pong => return Ok(frame),
            _ => {}
        }

        let max_output_size = if !frame.is_fin() || frame.opcode == OpCode::Continuation {
            self.max_payload_read.min(max_read_buffer)
        } else {
            self.max_payload_read
        };

        if frame.is_compressed {
            let inflate = self
                .inflate
                .as_mut()
                .ok_or(WebSocketError::CompressionNotSupported)?;
            frame.payload = inflate.decompress(&frame.payload, frame.is_fin(), max_output_size)?;
            frame.is_compressed = false;
        }

        if frame.payload.len() >= max_output_size {
            return Err(WebSocketError::FrameTooLarge);
        }

        Ok(frame)
    }

    // PARLEY PATCH: owed pongs are bounded. RFC 6455 section 5.5.3 lets an endpoint
    // that has not yet answered earlier pings answer only the most recent one, so a pong
    // still waiting in the queue takes the newer payload instead of a second pong
    // joining it. The payload is copied (at most 125 bytes): a slice would keep the
    // whole read buffer it came from alive for as long as the pong waits.
    fn on_ping(&mut self, frame: &Frame) {
        let payload = Bytes::copy_from_slice(&frame.payload);
        if let Some(owed) = self
            .obligated_sends
            .iter_mut()
            .find(|f| f.opcode == OpCode::Pong)
        {
            owed.payload = payload;
            return;
        }
        self.obligated_sends.push_back(Frame::pong(payload));
    }

    // PARLEY PATCH: one mapping from a read error to the close code that fails the
    // connection, for errors of this layer and of `WebSocket`'s (fragments, UTF-8).
    /// Fails the connection after `err`: queues the close frame its code calls for (RFC
    /// 6455 section 7.4.1), written by the next read, `poll_ready` or flush.
    pub(crate) fn fail(&mut self, err: &WebSocketError) {
        let code = match err {
            // The peer went away, or the socket failed: nothing can be sent.
            WebSocketError::ConnectionClosed | WebSocketError::IoError(_) => return,
            WebSocketError::FrameTooLarge => CloseCode::Size,
            WebSocketError::InvalidUTF8 | WebSocketError::InvalidCompressedData => {
                CloseCode::Invalid
            }
            // PARLEY PATCH: a reserved opcode is a protocol error (RFC 6455
            // section 5.2 "fail the WebSocket connection"; 1002, as the Autobahn
            // cases 4.x expect), not unsupported data (1003).
            WebSocketError::ReservedBitsNotZero
            | WebSocketError::InvalidOpCode(_)
            | WebSocketError::ControlFrameFragmented
            | WebSocketError::PingFrameTooLarge
            | WebSocketError::InvalidFragment
            | WebSocketError::InvalidCloseFrame
            | WebSocketError::InvalidCloseCode
            | WebSocketError::FragmentTimeout
            | WebSocketError::InvalidContinuationFrame
            | WebSocketError::CompressionNotSupported => CloseCode::Protocol,
            _ => CloseCode::Error,
        };
        if self.read_half.is_closed && self.obligated_sends.iter().any(|f| f.opcode == OpCode::Close) {
            // A close frame is already on its way; only one may be sent.
            return;
        }
        // Pongs still owed are moot: the connection is failing.
        self.obligated_sends.retain(|f| f.opcode != OpCode::Pong);
        self.emit_close(Frame::close(code, err.to_string()));
    }

    // PARLEY PATCH: a lingering close. After the close frame, the write side is shut
    // down (FIN) and what the peer still sends is read and discarded, up to `remaining`
    // bytes, until it closes too: closing a socket with unread bytes makes the kernel
    // send a reset, which can destroy the close frame before the peer reads it.
    /// Writes what is owed, shuts the write side down once, then reads and discards until
    /// the end of the stream or until `remaining` bytes were discarded. The caller bounds
    /// it in time. `peer_closed`: the caller read the peer's close frame and this side's
    /// close is its reply (the peer started the close): when nothing the peer sent after
    /// its close frame was read either, nothing is discarded — the peer sends nothing
    /// after its close frame (RFC 6455 §5.5.1), and the server closes the connection
    /// first (§7.1.1) — and the write side is shut down only if `shut_down_then`.
    pub(crate) fn poll_linger(
        &mut self,
        cx: &mut Context<'_>,
        shut_down: &mut bool,
        remaining: &mut usize,
        peer_closed: bool,
        shut_down_then: bool,
    ) -> Poll<Result<()>> {
        use futures::SinkExt as _;
        if !*shut_down {
            // Nothing read past the peer's close frame (bytes there: it does send more,
            // so linger): nothing to wait for once the reply is out.
            let at_once =
                peer_closed && self.close_received && self.stream.read_buffer().is_empty();
            if at_once {
                *remaining = 0;
            }
            ready!(self.poll_flush_obligated(ContextKind::Write, cx))?;
            ready!(self
                .wake_proxy
                .poll_with_context(ContextKind::Write, cx, |cx| self.stream.poll_flush_unpin(cx)))?;
            if !at_once || shut_down_then {
                ready!(self
                    .wake_proxy
                    .poll_with_context(ContextKind::Write, cx, |cx| {
                        Pin::new(self.stream.get_mut()).poll_shutdown(cx)
                    }))?;
            }
            *shut_down = true;
            // Nothing more is decoded.
            *self.stream.read_buffer_mut() = BytesMut::new();
            self.read_half.is_closed = true;
        }
        while *remaining > 0 {
            let mut bytes = [MaybeUninit::<u8>::uninit(); LAZY_READ_BYTES];
            let mut read = ReadBuf::uninit(&mut bytes);
            ready!(self
                .wake_proxy
                .poll_with_context(ContextKind::Read, cx, |cx| {
                    Pin::new(self.stream.get_mut()).poll_read(cx, &mut read)
                }))?;
            let n = read.filled().len();
            if n == 0 {
                break;
            }
            *remaining = remaining.saturating_sub(n);
        }
        Poll::Ready(Ok(()))
    }

    fn on_close(&mut self, frame: &Frame) -> Result<()> {
        // PARLEY PATCH: the peer's close frame was read (see `poll_linger`).
        self.close_received = true;
        match frame.payload.len() {
            0 => {}
            1 => return Err(WebSocketError::InvalidCloseFrame),
            _ => {
                let code = frame.close_code().expect("close code");
                let _ = frame.close_reason()?;

                if !code.is_allowed() {
                    return Err(WebSocketError::InvalidCloseCode);
                }
            }
        }

        let frame = Frame::close_raw(frame.payload.clone());
        self.emit_close(frame);

        Ok(())
    }

    fn emit_close(&mut self, frame: Frame) {
        self.obligated_sends.push_back(frame);
        self.read_half.is_closed = true;
    }

    fn poll_flush_obligated(
        &mut self,
        kind: ContextKind,
        cx: &mut Context<'_>,
    ) -> Poll<Result<()>> {
        if self.obligated_sends.is_empty() && !self.flush_sends {
            return Poll::Ready(Ok(()));
        }
        self.wake_proxy.poll_with_context(kind, cx, |cx| {
            while !self.obligated_sends.is_empty() {
                ready!(self.write_half.poll_ready(&mut self.stream, cx))?;

                let next = self.obligated_sends.pop_front().expect("obligated send");
                self.write_half.start_send(&mut self.stream, next)?;
                self.flush_sends = true;
            }

            if self.flush_sends {
                ready!(self.write_half.poll_flush(&mut self.stream, cx))?;
                self.flush_sends = false;
            }

            Poll::Ready(Ok(()))
        })
    }
}

impl<S> futures::Stream for Streaming<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    type Item = Frame;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        match ready!(this.poll_next_frame(cx)) {
            Ok(ok) => Poll::Ready(Some(ok)),
            Err(_) => Poll::Ready(None),
        }
    }
}

impl<S> futures::Sink<Frame> for Streaming<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    type Error = WebSocketError;

    fn poll_ready(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::result::Result<(), Self::Error>> {
        let this = self.get_mut();
        if this.obligated_sends.is_empty()
            && !this.flush_sends
            && this.stream.write_buffer().len() < this.stream.backpressure_boundary()
        {
            // Framed can accept another frame without polling the transport.
            return this.write_half.poll_ready(&mut this.stream, cx);
        }
        this.wake_proxy.set_waker(ContextKind::Write, cx.waker());
        ready!(this.poll_flush_obligated(ContextKind::Write, cx))?;
        this.wake_proxy
            .with_context(|cx| this.write_half.poll_ready(&mut this.stream, cx))
    }

    fn start_send(self: Pin<&mut Self>, mut item: Frame) -> std::result::Result<(), Self::Error> {
        let this = self.get_mut();

        #[cfg(test)]
        println!(
            ">>Compression>> OpCode={:?} Fin={} Payload={}",
            item.opcode,
            item.fin,
            item.payload.len()
        );

        // A whole message in one frame may skip compression. A fragmented message
        // cannot, since RSV1 on its first frame covers every fragment.
        let small_message = item.opcode != OpCode::Continuation
            && item.is_fin()
            && item.payload.len() < this.compression_threshold;
        // PARLEY PATCH: a frame marked with `Frame::with_precompressed` is already a
        // permessage-deflate message; it is written as is.
        let should_compress = !item.opcode.is_control() && !small_message && !item.is_compressed;
        if this.lazy_buffers && this.stream.write_buffer().capacity() == 0 {
            // PARLEY PATCH: the first frame since the buffer was written out allocates
            // it at its usual size (frames that follow before the flush fit in it).
            this.stream
                .write_buffer_mut()
                .reserve(this.write_buffer_capacity);
        }
        if should_compress {
            if let Some(deflate) = this.deflate.as_mut() {
                let output = deflate.compress(&item.payload, item.is_fin())?;
                // Set the RSV1 bit only when we are not streaming
                item.is_compressed = !this.write_half.streaming;
                item.payload = output;
            }
        }

        this.write_half.start_send(&mut this.stream, item)?;

        // Frames up to the backpressure boundary collect in the buffer between
        // flushes, so only growth past both limits is given back.
        let usual = this
            .write_buffer_capacity
            .max(this.stream.backpressure_boundary());
        if this.stream.write_buffer().len() > usual {
            this.write_buffer_grown = true;
        }
        Ok(())
    }

    fn poll_flush(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::result::Result<(), Self::Error>> {
        let this = self.get_mut();
        this.wake_proxy.set_waker(ContextKind::Write, cx.waker());
        ready!(this
            .wake_proxy
            .with_context(|cx| this.write_half.poll_flush(&mut this.stream, cx)))?;
        this.release_write_buffer();
        Poll::Ready(Ok(()))
    }

    fn poll_close(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::result::Result<(), Self::Error>> {
        let this = self.get_mut();
        this.wake_proxy.set_waker(ContextKind::Write, cx.waker());
        this.wake_proxy
            .with_context(|cx| this.write_half.poll_close(&mut this.stream, cx))
    }
}

// PARLEY PATCH: see `Options::lazy_buffers`.
/// Frees `buffer`'s memory when it holds no bytes.
#[inline]
fn release_if_empty(buffer: &mut BytesMut) {
    if buffer.is_empty() && buffer.capacity() != 0 {
        *buffer = BytesMut::new();
    }
}

// PARLEY PATCH: see `Options::lazy_buffers`.
/// One frame (or error) decoded outside `Framed`, as the stream `ReadHalf` reads.
struct Decoded(Option<Result<Frame>>);

// PARLEY PATCH: the queue of frames this side owes (a pong, a close) boxed, and present
// only while it holds one: a `VecDeque` inline was 32 bytes of every connection, and
// once a ping had been answered its buffer (4 frames, 160 bytes) stayed for the
// connection's life. Now a connection that owes nothing holds a null pointer.
/// The frames this side owes the peer, in order; `None` when there are none.
#[derive(Default)]
struct Obligated(Option<Box<VecDeque<Frame>>>);

impl Obligated {
    fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    fn push_back(&mut self, frame: Frame) {
        self.0.get_or_insert_with(Box::default).push_back(frame);
    }

    fn pop_front(&mut self) -> Option<Frame> {
        let queue = self.0.as_mut()?;
        let frame = queue.pop_front();
        if queue.is_empty() {
            self.0 = None;
        }
        frame
    }

    fn retain(&mut self, keep: impl FnMut(&Frame) -> bool) {
        if let Some(queue) = self.0.as_mut() {
            queue.retain(keep);
            if queue.is_empty() {
                self.0 = None;
            }
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Frame> {
        self.0.iter().flat_map(|queue| queue.iter())
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = &mut Frame> {
        self.0.iter_mut().flat_map(|queue| queue.iter_mut())
    }
}

impl futures::Stream for Decoded {
    type Item = Result<Frame>;

    fn poll_next(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Poll::Ready(self.get_mut().0.take())
    }
}

/// Replaces `buffer` with one of `capacity` bytes, keeping its contents.
///
/// The new buffer is never smaller than the bytes already in it.
fn set_capacity(buffer: &mut BytesMut, capacity: usize) {
    let mut resized = BytesMut::with_capacity(capacity.max(buffer.len()));
    resized.extend_from_slice(buffer);
    *buffer = resized;
}

#[cfg(test)]
mod wake_tests {
    use super::*;
    use crate::Options;
    use std::{
        sync::atomic::{AtomicUsize, Ordering},
        task::{Wake, Waker},
    };
    use tokio::io::{duplex, AsyncWriteExt};

    #[derive(Default)]
    struct WakeCount(AtomicUsize);

    impl Wake for WakeCount {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }

        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[tokio::test]
    async fn two_buffered_header_bytes_register_a_waker_when_payload_is_missing() {
        let negotiated = Negotiation::new(None, &Options::default(), Role::Client).unwrap();
        let (io, mut peer) = duplex(16);
        let mut stream = Streaming::new(
            Role::Client,
            io,
            Bytes::from_static(b"\x82\x03"),
            &negotiated,
        );
        let count = Arc::new(WakeCount::default());
        let waker = Waker::from(Arc::clone(&count));
        let mut cx = Context::from_waker(&waker);

        assert_eq!(stream.stream.read_buffer().len(), 2);
        assert!(stream.poll_next_frame(&mut cx).is_pending());
        assert_eq!(count.0.load(Ordering::Relaxed), 0);

        peer.write_all(b"abc").await.unwrap();
        assert!(count.0.load(Ordering::Relaxed) > 0);
        let Poll::Ready(Ok(frame)) = stream.poll_next_frame(&mut cx) else {
            panic!("the completed frame must be ready after its payload arrives");
        };
        assert_eq!(frame.opcode(), OpCode::Binary);
        assert_eq!(frame.payload().as_ref(), b"abc");
    }
}

#[cfg(test)]
mod capacity_tests {
    use super::*;
    use crate::Options;
    use tokio::io::duplex;

    #[tokio::test]
    async fn reservation_preserves_bytes_received_with_the_upgrade() {
        let options = Options::default().with_read_buffer_capacity(64 * 1024);
        let negotiated = Negotiation::new(None, &options, Role::Client).unwrap();
        let (io, _peer) = duplex(1);
        let mut stream = Streaming::new(
            Role::Client,
            io,
            Bytes::from_static(b"\x82\x03abc"),
            &negotiated,
        );
        assert!(stream.stream.read_buffer().capacity() >= 64 * 1024);
        assert_eq!(
            stream.next_frame().await.unwrap().payload().as_ref(),
            b"abc"
        );
    }

    #[tokio::test]
    async fn small_capacities_are_exact_and_keep_upgrade_bytes() {
        let options = Options::default()
            .with_read_buffer_capacity(512)
            .with_write_buffer_capacity(256);
        let negotiated = Negotiation::new(None, &options, Role::Client).unwrap();
        let (io, _peer) = duplex(1);
        let mut stream = Streaming::new(
            Role::Client,
            io,
            Bytes::from_static(b"\x82\x03abc"),
            &negotiated,
        );
        assert_eq!(stream.stream.read_buffer().capacity(), 512);
        assert_eq!(stream.stream.write_buffer().capacity(), 256);
        // The flush threshold stays at tokio-util's default, not the buffer size.
        let default = Negotiation::new(None, &Options::default(), Role::Client).unwrap();
        let (io, _peer) = duplex(1);
        let default = Streaming::new(Role::Client, io, Bytes::new(), &default);
        assert_eq!(
            stream.stream.backpressure_boundary(),
            default.stream.backpressure_boundary()
        );
        assert_eq!(
            stream.next_frame().await.unwrap().payload().as_ref(),
            b"abc"
        );
    }

    #[tokio::test]
    async fn capacity_does_not_relax_the_payload_limit() {
        let options = Options::default()
            .with_read_buffer_capacity(64 * 1024)
            .with_max_payload_read(2);
        let negotiated = Negotiation::new(None, &options, Role::Client).unwrap();
        let (io, _peer) = duplex(1);
        let mut stream = Streaming::new(
            Role::Client,
            io,
            Bytes::from_static(b"\x82\x03abc"),
            &negotiated,
        );
        assert!(matches!(
            stream.next_frame().await,
            Err(WebSocketError::FrameTooLarge)
        ));
    }
}

// PARLEY PATCH: tests of `Options::lazy_buffers`.
#[cfg(test)]
mod lazy_buffer_tests {
    use super::*;
    use crate::Options;
    use futures::SinkExt;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    fn lazy(
        read_buf: &'static [u8],
    ) -> (Streaming<tokio::io::DuplexStream>, tokio::io::DuplexStream) {
        let options = Options::default()
            .with_read_buffer_capacity(512)
            .with_write_buffer_capacity(256)
            .with_lazy_buffers();
        let negotiated = Negotiation::new(None, &options, Role::Client).unwrap();
        let (io, peer) = duplex(1 << 20);
        let stream = Streaming::new(Role::Client, io, Bytes::from_static(read_buf), &negotiated);
        (stream, peer)
    }

    fn holds_no_buffer(stream: &Streaming<tokio::io::DuplexStream>) -> bool {
        stream.stream.read_buffer().capacity() == 0 && stream.stream.write_buffer().capacity() == 0
    }

    /// An unmasked server frame of `len` bytes of `byte`.
    fn frame(byte: u8, len: usize) -> Vec<u8> {
        let mut out = vec![0x82];
        match len {
            0..=125 => out.push(len as u8),
            126..=65535 => {
                out.push(126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                out.push(127);
                out.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        out.extend(std::iter::repeat(byte).take(len));
        out
    }

    #[tokio::test]
    async fn a_waiting_connection_holds_no_buffer() {
        let (mut stream, mut peer) = lazy(b"");
        assert!(holds_no_buffer(&stream));
        // Waiting for a frame allocates nothing.
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(stream.poll_next_frame(&mut cx).is_pending());
        assert!(holds_no_buffer(&stream));

        peer.write_all(&frame(1, 3)).await.unwrap();
        let got = stream.next_frame().await.unwrap();
        assert_eq!(got.payload().as_ref(), &[1, 1, 1]);
        assert!(
            holds_no_buffer(&stream),
            "the buffer is given back once empty"
        );

        stream.send(Frame::binary(vec![7u8; 10])).await.unwrap();
        assert!(stream.stream.write_buffer().capacity() > 0);
        stream.free_write_buffer();
        assert!(
            holds_no_buffer(&stream),
            "the write buffer is freed once flushed"
        );
        let mut written = [0u8; 2 + 4 + 10];
        peer.read_exact(&mut written).await.unwrap();
        assert_eq!(&written[..2], &[0x82, 0x80 | 10]);
    }

    #[tokio::test]
    async fn frames_in_one_read_and_frames_across_reads_all_arrive() {
        let (mut stream, mut peer) = lazy(b"");
        // Two whole frames and the start of a third in one write.
        let mut bytes = frame(1, 5);
        bytes.extend(frame(2, 7));
        let third = frame(3, 4000);
        bytes.extend_from_slice(&third[..100]);
        peer.write_all(&bytes).await.unwrap();
        assert_eq!(
            stream.next_frame().await.unwrap().payload().as_ref(),
            &[1; 5]
        );
        assert_eq!(
            stream.next_frame().await.unwrap().payload().as_ref(),
            &[2; 7]
        );
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(stream.poll_next_frame(&mut cx).is_pending());
        assert!(
            !stream.stream.read_buffer().is_empty(),
            "the partial frame stays"
        );
        peer.write_all(&third[100..]).await.unwrap();
        let got = stream.next_frame().await.unwrap();
        assert_eq!(got.payload().len(), 4000);
        assert!(got.payload().iter().all(|b| *b == 3));
        // A header alone, then its payload.
        let fourth = frame(4, 9);
        peer.write_all(&fourth[..2]).await.unwrap();
        assert!(stream.poll_next_frame(&mut cx).is_pending());
        peer.write_all(&fourth[2..]).await.unwrap();
        assert_eq!(
            stream.next_frame().await.unwrap().payload().as_ref(),
            &[4; 9]
        );
        // Larger than the stack read and the buffer.
        peer.write_all(&frame(5, 100_000)).await.unwrap();
        assert_eq!(stream.next_frame().await.unwrap().payload().len(), 100_000);
        assert!(holds_no_buffer(&stream));
        // The end of the stream is reported as before.
        drop(peer);
        assert!(matches!(
            stream.next_frame().await,
            Err(WebSocketError::ConnectionClosed)
        ));
    }

    #[tokio::test]
    async fn bytes_received_with_the_upgrade_are_read_first() {
        let (mut stream, _peer) = lazy(b"\x82\x03abc");
        assert_eq!(
            stream.next_frame().await.unwrap().payload().as_ref(),
            b"abc"
        );
        assert!(holds_no_buffer(&stream));
    }
}
