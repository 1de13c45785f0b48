use crate::frame::{self, Frame, Kind, Reason};
use crate::frame::{
    DEFAULT_MAX_FRAME_SIZE, DEFAULT_SETTINGS_HEADER_TABLE_SIZE, MAX_MAX_FRAME_SIZE,
};
use crate::proto::Error;

use crate::hpack;

use futures_core::Stream;

use bytes::{Buf, BytesMut};

use std::io;

use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, ReadBuf};

// 16 MB "sane default" taken from golang http2
const DEFAULT_SETTINGS_MAX_HEADER_LIST_SIZE: usize = 16 << 20;

const MAX_FIELDS_HINT: usize = 64;

// PARLEY PATCH (lazy read buffer): the socket is read here, not through
// `tokio_util::codec::FramedRead`, which reserves its buffer before every read and so
// holds 8 KiB per connection for the connection's life, most of it while the connection
// waits. Here a connection with nothing buffered waits with no buffer at all: its next
// bytes are read into `PROBE_LEN` bytes on the stack and copied into a buffer of their
// size (or `INITIAL_CAPACITY` when the probe came back full), and the buffer is given
// back when a read finds nothing to read with nothing buffered.
#[derive(Debug)]
pub struct FramedRead<T> {
    io: T,

    /// Frames the bytes read (3-byte length, 9-byte head).
    ///
    /// PARLEY PATCH (frame lengths read in place): 12 bytes, where
    /// `tokio_util::codec::LengthDelimitedCodec` took 72 (its builder's settings for any
    /// framing, every connection for its life).
    length: FrameLength,

    /// Bytes read and not yet decoded; unallocated while the connection waits.
    buf: BytesMut,

    /// The stream ended (EOF, or a read or framing error was returned).
    done: bool,

    decoder: FrameDecoder,
}

/// The stack buffer a connection with no read buffer reads its next bytes into.
const PROBE_LEN: usize = 1024;

/// The read buffer reserved when a probe came back full, or to read on into a buffer
/// with less than `PROBE_LEN` of room left: a read never gets less room than the probe
/// had (tokio-util's reader reserves one byte, and reads got smaller as the buffer's
/// room was split off; hyperium/h2#902).
const INITIAL_CAPACITY: usize = 8 * 1024;

/// PARLEY PATCH (frame lengths read in place): what `tokio_util::codec::LengthDelimitedCodec`
/// did for h2 (a 3-byte big-endian length, 9 bytes of head besides, nothing skipped),
/// with the state it needs: the largest payload taken, and the length of the frame whose
/// head has been read. As the codec, a frame whose head was read is not checked again
/// when the largest size changes before its payload has arrived.
#[derive(Debug)]
struct FrameLength {
    /// The largest frame payload taken (at most `MAX_MAX_FRAME_SIZE`, 24 bits).
    max: u32,
    /// The whole length (head and payload) of the frame whose head was read, while the
    /// rest of it is awaited.
    pending: Option<u32>,
}

/// The bytes of a frame's length field.
const LENGTH_LEN: usize = 3;

/// A frame's length field named more than the largest payload taken.
#[derive(Debug)]
struct FrameTooBig;

impl std::fmt::Display for FrameTooBig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("frame size too big")
    }
}

impl std::error::Error for FrameTooBig {}

impl FrameLength {
    fn new(max_frame_size: usize) -> FrameLength {
        FrameLength {
            max: max_frame_size.min(MAX_MAX_FRAME_SIZE as usize) as u32,
            pending: None,
        }
    }

    /// The next whole frame (head and payload) split off `src`, if it has arrived; as
    /// the codec, the buffer is made room for the rest of a frame whose head was read,
    /// and for the next length field after a frame.
    fn decode(&mut self, src: &mut BytesMut) -> io::Result<Option<BytesMut>> {
        let n = match self.pending {
            Some(n) => n as usize,
            None => {
                if src.len() < LENGTH_LEN {
                    return Ok(None);
                }
                let len = u32::from_be_bytes([0, src[0], src[1], src[2]]);
                if len > self.max {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, FrameTooBig));
                }
                let n = len as usize + frame::HEADER_LEN;
                src.reserve(n.saturating_sub(src.len()));
                self.pending = Some(n as u32);
                n
            }
        };
        if src.len() < n {
            return Ok(None);
        }
        self.pending = None;
        let frame = src.split_to(n);
        src.reserve(LENGTH_LEN.saturating_sub(src.len()));
        Ok(Some(frame))
    }
}

#[derive(Debug)]
struct FrameDecoder {
    // hpack decoder state
    hpack: hpack::Decoder,

    max_header_list_size: usize,

    /// PARLEY PATCH (the connection's state smaller): a `u32`, as `fields_hint` (at
    /// most `MAX_FIELDS_HINT`): 8 bytes of every connection, not 16.
    max_continuation_frames: u32,

    /// Moving average of the field count of recent header blocks, used to
    /// size the next block's `HeaderMap` so decoding it doesn't rehash.
    fields_hint: u32,

    // PARLEY PATCH (partial header block boxed): a header block continued in
    // CONTINUATION frames is rare, and the partial frame (~336 bytes: a `HeaderMap`
    // and the pseudo-headers) took room in every connection for its whole life.
    partial: Option<Box<Partial>>,
}

/// Partially loaded headers frame
#[derive(Debug)]
struct Partial {
    /// Empty frame
    frame: Continuable,

    /// Partial header payload
    buf: BytesMut,

    continuation_frames_count: usize,
}

#[derive(Debug)]
enum Continuable {
    Headers(frame::Headers),
    PushPromise(frame::PushPromise),
}

impl<T> FramedRead<T> {
    // PARLEY PATCH (lazy read buffer): the I/O and the largest frame payload, not
    // tokio-util's reader. PARLEY PATCH (frame lengths read in place): not a codec.
    pub fn new(io: T, max_frame_size: usize) -> FramedRead<T> {
        let decoder = FrameDecoder::new(max_frame_size);
        FramedRead {
            io,
            length: FrameLength::new(max_frame_size),
            buf: BytesMut::new(),
            done: false,
            decoder,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.io
    }

    pub fn get_mut(&mut self) -> &mut T {
        &mut self.io
    }

    /// Returns the current max frame size setting
    #[inline]
    pub fn max_frame_size(&self) -> usize {
        self.length.max as usize
    }

    /// Updates the max frame size setting.
    ///
    /// Must be within 16,384 and 16,777,215.
    #[inline]
    pub fn set_max_frame_size(&mut self, val: usize) {
        assert!(DEFAULT_MAX_FRAME_SIZE as usize <= val && val <= MAX_MAX_FRAME_SIZE as usize);
        self.length.max = val as u32;
        // Update max CONTINUATION frames too, since its based on this
        self.decoder.set_max_frame_size(val);
    }

    /// Update the max header list size setting.
    #[inline]
    pub fn set_max_header_list_size(&mut self, val: usize) {
        self.decoder
            .set_max_header_list_size(val, self.max_frame_size());
    }

    /// Update the header table size setting.
    #[inline]
    pub fn set_header_table_size(&mut self, val: usize) {
        self.decoder.set_header_table_size(val);
    }
}

fn calc_max_continuation_frames(header_max: usize, frame_max: usize) -> u32 {
    // At least this many frames needed to use max header list size
    let min_frames_for_list = (header_max / frame_max).max(1);
    // Some padding for imperfectly packed frames
    // 25% without floats
    let padding = min_frames_for_list >> 2;
    // PARLEY PATCH (the connection's state smaller): kept as a `u32` (a list of 4 GiB
    // in frames of 16 KiB is 2^18 of them).
    min_frames_for_list
        .saturating_add(padding)
        .max(5)
        .min(u32::MAX as usize) as u32
}

impl FrameDecoder {
    fn new(max_frame_size: usize) -> Self {
        let max_header_list_size = DEFAULT_SETTINGS_MAX_HEADER_LIST_SIZE;
        FrameDecoder {
            hpack: hpack::Decoder::new(DEFAULT_SETTINGS_HEADER_TABLE_SIZE),
            max_header_list_size,
            max_continuation_frames: calc_max_continuation_frames(
                max_header_list_size,
                max_frame_size,
            ),
            fields_hint: 0,
            partial: None,
        }
    }

    fn update_fields_hint(&mut self, len: usize) {
        // The newest block weighs 1/4. Rounding up keeps a steady count from
        // decaying, and the cap bounds what one huge block makes later ones reserve.
        let len = len.min(MAX_FIELDS_HINT) as u32;
        self.fields_hint = (self.fields_hint * 3 + len + 3) / 4;
    }

    fn set_max_frame_size(&mut self, val: usize) {
        self.max_continuation_frames = calc_max_continuation_frames(self.max_header_list_size, val);
    }

    fn set_max_header_list_size(&mut self, val: usize, max_frame_size: usize) {
        self.max_header_list_size = val;
        // Update max CONTINUATION frames too, since its based on this
        self.max_continuation_frames = calc_max_continuation_frames(val, max_frame_size);
    }

    fn set_header_table_size(&mut self, val: usize) {
        self.hpack.queue_size_update(val);
    }

    fn decode(&mut self, bytes: BytesMut) -> Result<Option<Frame>, Error> {
        decode_frame(self, bytes)
    }
}

/// Decodes a frame.
///
/// This function is intentionally de-generified and outlined because it is very large.
fn decode_frame(decoder: &mut FrameDecoder, mut bytes: BytesMut) -> Result<Option<Frame>, Error> {
    let span = tracing::trace_span!("FramedRead::decode_frame", offset = bytes.len());
    let _e = span.enter();

    tracing::trace!("decoding frame from {}B", bytes.len());

    // Parse the head
    let head = frame::Head::parse(&bytes);

    if decoder.partial.is_some() && head.kind() != Kind::Continuation {
        proto_err!(conn: "expected CONTINUATION, got {:?}", head.kind());
        return Err(Error::library_go_away(Reason::PROTOCOL_ERROR));
    }

    let kind = head.kind();

    tracing::trace!(frame.kind = ?kind);

    macro_rules! header_block {
        ($frame:ident, $head:ident, $bytes:ident) => ({
            // Drop the frame header
            $bytes.advance(frame::HEADER_LEN);

            // Parse the header frame w/o parsing the payload
            let (mut frame, mut payload) = match frame::$frame::load($head, $bytes, decoder.fields_hint as usize) {
                Ok(res) => res,
                Err(frame::Error::InvalidDependencyId) => {
                    proto_err!(stream: "invalid HEADERS dependency ID");
                    // A stream cannot depend on itself. An endpoint MUST
                    // treat this as a stream error (Section 5.4.2) of type
                    // `PROTOCOL_ERROR`.
                    return Err(Error::library_reset($head.stream_id(), Reason::PROTOCOL_ERROR));
                },
                Err(e) => {
                    proto_err!(conn: "failed to load frame; err={:?}", e);
                    return Err(Error::library_go_away(Reason::PROTOCOL_ERROR));
                }
            };

            let is_end_headers = frame.is_end_headers();

            // Load the HPACK encoded headers
            match frame.load_hpack(&mut payload, decoder.max_header_list_size, &mut decoder.hpack) {
                Ok(_) => {},
                Err(frame::Error::Hpack(hpack::DecoderError::NeedMore(_))) if !is_end_headers => {},
                Err(frame::Error::MalformedMessage) => {
                    let id = $head.stream_id();
                    proto_err!(stream: "malformed header block; stream={:?}", id);
                    return Err(Error::library_reset(id, Reason::PROTOCOL_ERROR));
                },
                Err(frame::Error::HeaderListWayTooLarge) => {
                    proto_err!(conn: "decoded header list size over abuse limit");
                    return Err(Error::library_go_away_data(
                        Reason::ENHANCE_YOUR_CALM,
                        "header_list_way_too_large",
                    ));
                },
                Err(e) => {
                    proto_err!(conn: "failed HPACK decoding; err={:?}", e);
                    return Err(Error::library_go_away(Reason::PROTOCOL_ERROR));
                }
            }

            if is_end_headers {
                frame.into()
            } else {
                tracing::trace!("loaded partial header block");
                // Defer returning the frame
                // PARLEY PATCH (partial header block boxed)
                decoder.partial = Some(Box::new(Partial {
                    frame: Continuable::$frame(frame),
                    buf: payload,
                    continuation_frames_count: 0,
                }));

                return Ok(None);
            }
        });
    }

    let frame = match kind {
        Kind::Settings => {
            let res = frame::Settings::load(head, &bytes[frame::HEADER_LEN..]);

            res.map_err(|e| {
                proto_err!(conn: "failed to load SETTINGS frame; err={:?}", e);
                Error::library_go_away(Reason::PROTOCOL_ERROR)
            })?
            .into()
        }
        Kind::Ping => {
            let res = frame::Ping::load(head, &bytes[frame::HEADER_LEN..]);

            res.map_err(|e| {
                proto_err!(conn: "failed to load PING frame; err={:?}", e);
                Error::library_go_away(Reason::PROTOCOL_ERROR)
            })?
            .into()
        }
        Kind::WindowUpdate => {
            let res = frame::WindowUpdate::load(head, &bytes[frame::HEADER_LEN..]);

            res.map_err(|e| {
                proto_err!(conn: "failed to load WINDOW_UPDATE frame; err={:?}", e);
                Error::library_go_away(Reason::PROTOCOL_ERROR)
            })?
            .into()
        }
        Kind::Data => {
            bytes.advance(frame::HEADER_LEN);
            let res = frame::Data::load(head, bytes.freeze());

            // TODO: Should this always be connection level? Probably not...
            res.map_err(|e| {
                proto_err!(conn: "failed to load DATA frame; err={:?}", e);
                Error::library_go_away(Reason::PROTOCOL_ERROR)
            })?
            .into()
        }
        Kind::Headers => header_block!(Headers, head, bytes),
        Kind::Reset => {
            let res = frame::Reset::load(head, &bytes[frame::HEADER_LEN..]);
            res.map_err(|e| {
                proto_err!(conn: "failed to load RESET frame; err={:?}", e);
                Error::library_go_away(Reason::PROTOCOL_ERROR)
            })?
            .into()
        }
        Kind::GoAway => {
            let res = frame::GoAway::load(head, &bytes[frame::HEADER_LEN..]);
            res.map_err(|e| {
                proto_err!(conn: "failed to load GO_AWAY frame; err={:?}", e);
                Error::library_go_away(Reason::PROTOCOL_ERROR)
            })?
            .into()
        }
        Kind::PushPromise => header_block!(PushPromise, head, bytes),
        Kind::Priority => {
            if head.stream_id() == 0 {
                // Invalid stream identifier
                proto_err!(conn: "invalid stream ID 0");
                return Err(Error::library_go_away(Reason::PROTOCOL_ERROR));
            }

            match frame::Priority::load(head, &bytes[frame::HEADER_LEN..]) {
                Ok(frame) => frame.into(),
                Err(frame::Error::InvalidDependencyId) => {
                    // A stream cannot depend on itself. An endpoint MUST
                    // treat this as a stream error (Section 5.4.2) of type
                    // `PROTOCOL_ERROR`.
                    let id = head.stream_id();
                    proto_err!(stream: "PRIORITY invalid dependency ID; stream={:?}", id);
                    return Err(Error::library_reset(id, Reason::PROTOCOL_ERROR));
                }
                Err(e) => {
                    proto_err!(conn: "failed to load PRIORITY frame; err={:?};", e);
                    return Err(Error::library_go_away(Reason::PROTOCOL_ERROR));
                }
            }
        }
        Kind::Continuation => {
            let is_end_headers = (head.flag() & 0x4) == 0x4;

            let mut partial = match decoder.partial.take() {
                Some(partial) => partial,
                None => {
                    proto_err!(conn: "received unexpected CONTINUATION frame");
                    return Err(Error::library_go_away(Reason::PROTOCOL_ERROR));
                }
            };

            // The stream identifiers must match
            if partial.frame.stream_id() != head.stream_id() {
                proto_err!(conn: "CONTINUATION frame stream ID does not match previous frame stream ID");
                return Err(Error::library_go_away(Reason::PROTOCOL_ERROR));
            }

            // Check for CONTINUATION flood
            if is_end_headers {
                partial.continuation_frames_count = 0;
            } else {
                let cnt = partial.continuation_frames_count + 1;
                if cnt > decoder.max_continuation_frames as usize {
                    tracing::debug!(
                        "too_many_continuations, max = {}",
                        decoder.max_continuation_frames
                    );
                    return Err(Error::library_go_away_data(
                        Reason::ENHANCE_YOUR_CALM,
                        "too_many_continuations",
                    ));
                } else {
                    partial.continuation_frames_count = cnt;
                }
            }

            // Extend the buf
            if partial.buf.is_empty() {
                partial.buf = bytes.split_off(frame::HEADER_LEN);
            } else {
                if partial.frame.is_over_size() {
                    // If there was left over bytes previously, they may be
                    // needed to continue decoding, even though we will
                    // be ignoring this frame. This is done to keep the HPACK
                    // decoder state up-to-date.
                    //
                    // Still, we need to be careful, because if a malicious
                    // attacker were to try to send a gigantic string, such
                    // that it fits over multiple header blocks, we could
                    // grow memory uncontrollably again, and that'd be a shame.
                    //
                    // Instead, we use a simple heuristic to determine if
                    // we should continue to ignore decoding, or to tell
                    // the attacker to go away.
                    if partial.buf.len() + bytes.len() > decoder.max_header_list_size {
                        proto_err!(conn: "CONTINUATION frame header block size over ignorable limit");
                        return Err(Error::library_go_away(Reason::COMPRESSION_ERROR));
                    }
                }
                partial.buf.extend_from_slice(&bytes[frame::HEADER_LEN..]);
            }

            match partial.frame.load_hpack(
                &mut partial.buf,
                decoder.max_header_list_size,
                &mut decoder.hpack,
            ) {
                Ok(_) => {}
                Err(frame::Error::Hpack(hpack::DecoderError::NeedMore(_))) if !is_end_headers => {}
                Err(frame::Error::MalformedMessage) => {
                    let id = head.stream_id();
                    proto_err!(stream: "malformed CONTINUATION frame; stream={:?}", id);
                    return Err(Error::library_reset(id, Reason::PROTOCOL_ERROR));
                }
                Err(frame::Error::HeaderListWayTooLarge) => {
                    proto_err!(conn: "decoded CONTINUATION header list size over abuse limit");
                    return Err(Error::library_go_away_data(
                        Reason::ENHANCE_YOUR_CALM,
                        "header_list_way_too_large",
                    ));
                }
                Err(e) => {
                    proto_err!(conn: "failed HPACK decoding; err={:?}", e);
                    return Err(Error::library_go_away(Reason::PROTOCOL_ERROR));
                }
            }

            if is_end_headers {
                partial.frame.into()
            } else {
                decoder.partial = Some(partial);
                return Ok(None);
            }
        }
        Kind::Unknown => {
            // Unknown frames are ignored
            return Ok(None);
        }
    };

    if let Frame::Headers(ref headers) = frame {
        decoder.update_fields_hint(headers.fields().keys_len());
    }

    Ok(Some(frame))
}

impl<T> FramedRead<T>
where
    T: AsyncRead + Unpin,
{
    /// The next length-delimited frame, read from the socket as needed.
    ///
    /// PARLEY PATCH (lazy read buffer): the read loop of `tokio_util::codec::FramedRead`
    /// (decode what is buffered, else read; at EOF what is left must be nothing), with
    /// the buffer reserved only when bytes arrived and given back while waiting.
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<BytesMut>>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            if !self.buf.is_empty() {
                match self.length.decode(&mut self.buf) {
                    Ok(Some(frame)) => return Poll::Ready(Some(Ok(frame))),
                    Ok(None) => {}
                    Err(e) => {
                        self.done = true;
                        return Poll::Ready(Some(Err(e)));
                    }
                }
            }
            let n = match self.poll_fill(cx) {
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Pending => {
                    if self.buf.is_empty() {
                        // Nothing buffered and nothing to read: wait without a buffer.
                        self.buf = BytesMut::new();
                    }
                    return Poll::Pending;
                }
            };
            if n == 0 {
                // EOF: bytes of an unfinished frame are an error, as in tokio-util's
                // `Decoder::decode_eof`.
                self.done = true;
                if self.buf.is_empty() {
                    return Poll::Ready(None);
                }
                self.buf = BytesMut::new();
                return Poll::Ready(Some(Err(io::Error::other("bytes remaining on stream"))));
            }
        }
    }

    /// Reads what the socket has: into the stack probe when no buffer is held, else into
    /// the buffer's spare room. `Ok(0)` is EOF.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() == self.buf.len() && self.buf.is_empty() {
            let mut probe = [MaybeUninit::<u8>::uninit(); PROBE_LEN];
            let mut read = ReadBuf::uninit(&mut probe);
            ready!(Pin::new(&mut self.io).poll_read(cx, &mut read))?;
            let bytes = read.filled();
            if !bytes.is_empty() {
                // A full probe means more is waiting: make room to read it in one go.
                let want = if bytes.len() == PROBE_LEN {
                    INITIAL_CAPACITY
                } else {
                    bytes.len()
                };
                self.buf = BytesMut::with_capacity(want);
                self.buf.extend_from_slice(bytes);
            }
            return Poll::Ready(Ok(bytes.len()));
        }
        if self.buf.capacity() - self.buf.len() < PROBE_LEN {
            self.buf.reserve(INITIAL_CAPACITY);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }
}

impl<T> Stream for FramedRead<T>
where
    T: AsyncRead + Unpin,
{
    type Item = Result<Frame, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let span = tracing::trace_span!("FramedRead::poll_next");
        let _e = span.enter();
        loop {
            tracing::trace!("poll");
            let bytes = match ready!(self.poll_frame(cx)) {
                Some(Ok(bytes)) => bytes,
                Some(Err(e)) => return Poll::Ready(Some(Err(map_err(e)))),
                None => return Poll::Ready(None),
            };

            tracing::trace!(read.bytes = bytes.len());
            if let Some(frame) = self.decoder.decode(bytes)? {
                tracing::debug!(?frame, "received");
                return Poll::Ready(Some(Ok(frame)));
            }
        }
    }
}

fn map_err(err: io::Error) -> Error {
    if let io::ErrorKind::InvalidData = err.kind() {
        if let Some(custom) = err.get_ref() {
            if custom.is::<FrameTooBig>() {
                return Error::library_go_away(Reason::FRAME_SIZE_ERROR);
            }
        }
    }
    err.into()
}

// ===== impl Continuable =====

impl Continuable {
    fn stream_id(&self) -> frame::StreamId {
        match *self {
            Continuable::Headers(ref h) => h.stream_id(),
            Continuable::PushPromise(ref p) => p.stream_id(),
        }
    }

    fn is_over_size(&self) -> bool {
        match *self {
            Continuable::Headers(ref h) => h.is_over_size(),
            Continuable::PushPromise(ref p) => p.is_over_size(),
        }
    }

    fn load_hpack(
        &mut self,
        src: &mut BytesMut,
        max_header_list_size: usize,
        decoder: &mut hpack::Decoder,
    ) -> Result<(), frame::Error> {
        match *self {
            Continuable::Headers(ref mut h) => h.load_hpack(src, max_header_list_size, decoder),
            Continuable::PushPromise(ref mut p) => p.load_hpack(src, max_header_list_size, decoder),
        }
    }
}

impl<T> From<Continuable> for Frame<T> {
    fn from(cont: Continuable) -> Self {
        match cont {
            Continuable::Headers(mut headers) => {
                headers.set_end_headers();
                headers.into()
            }
            Continuable::PushPromise(mut push) => {
                push.set_end_headers();
                push.into()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;
    use http::HeaderMap;

    fn headers_frame(stream_id: u32, fields: usize) -> BytesMut {
        let mut block = vec![0x82, 0x86, 0x84]; // :method GET, :scheme http, :path /
        for i in 0..fields {
            let name = format!("x-h-{i}");
            block.push(0x00); // literal without indexing, new name
            block.push(name.len() as u8);
            block.extend_from_slice(name.as_bytes());
            block.extend_from_slice(&[1, b'v']);
        }
        let mut frame = BytesMut::new();
        frame.put_uint(block.len() as u64, 3);
        frame.put_u8(0x01); // HEADERS
        frame.put_u8(0x04); // END_HEADERS
        frame.put_u32(stream_id);
        frame.extend_from_slice(&block);
        frame
    }

    fn decode_fields(decoder: &mut FrameDecoder, stream_id: u32, fields: usize) -> HeaderMap {
        match decode_frame(decoder, headers_frame(stream_id, fields)) {
            Ok(Some(Frame::Headers(headers))) => headers.into_fields(),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn header_block_reserves_recent_field_count() {
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_SIZE as usize);
        assert_eq!(decode_fields(&mut decoder, 1, 0).capacity(), 0);

        for id in (3..40).step_by(2) {
            decode_fields(&mut decoder, id, 20);
        }
        assert_eq!(decoder.fields_hint, 20);
        // Reserved up front, before a single field was decoded into it.
        assert!(decode_fields(&mut decoder, 41, 0).capacity() >= 20);

        for id in (43..80).step_by(2) {
            decode_fields(&mut decoder, id, 1000);
        }
        assert_eq!(decoder.fields_hint as usize, MAX_FIELDS_HINT);
    }
}

// PARLEY PATCH (lazy read buffer): tests of the read loop and of the buffer it holds.
#[cfg(test)]
mod lazy_buffer_tests {
    use super::*;
    use crate::frame::{Data, Ping, StreamId};
    use std::task::Waker;
    use tokio::io::{AsyncWriteExt, DuplexStream};

    fn reader() -> (FramedRead<DuplexStream>, DuplexStream) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let mut r = FramedRead::new(a, DEFAULT_MAX_FRAME_SIZE as usize);
        r.set_max_frame_size(DEFAULT_MAX_FRAME_SIZE as usize);
        (r, b)
    }

    fn poll(r: &mut FramedRead<DuplexStream>) -> Poll<Option<Result<Frame, Error>>> {
        Pin::new(r).poll_next(&mut Context::from_waker(Waker::noop()))
    }

    fn ping(payload: u8) -> Vec<u8> {
        let mut b = BytesMut::new();
        Ping::new([payload; 8]).encode(&mut b);
        b.to_vec()
    }

    fn data(len: usize) -> Vec<u8> {
        let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let mut b = BytesMut::new();
        Data::new(StreamId::from(1), &payload[..]).encode_chunk(&mut b);
        b.to_vec()
    }

    fn expect_ping(r: &mut FramedRead<DuplexStream>, payload: u8) {
        match poll(r) {
            Poll::Ready(Some(Ok(Frame::Ping(p)))) => assert_eq!(p.payload(), &[payload; 8]),
            other => panic!("expected a ping, got {other:?}"),
        }
    }

    fn expect_data(r: &mut FramedRead<DuplexStream>, len: usize) {
        match poll(r) {
            Poll::Ready(Some(Ok(Frame::Data(d)))) => {
                assert_eq!(d.payload().len(), len);
                assert!(d.payload().iter().enumerate().all(|(i, b)| *b == i as u8));
            }
            other => panic!("expected {len} bytes of data, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_waiting_connection_holds_no_read_buffer() {
        let (mut r, mut peer) = reader();
        assert!(poll(&mut r).is_pending());
        assert_eq!(r.buf.capacity(), 0, "no buffer before the first bytes");
        peer.write_all(&ping(1)).await.unwrap();
        expect_ping(&mut r, 1);
        assert!(poll(&mut r).is_pending());
        assert_eq!(r.buf.capacity(), 0, "no buffer once everything was decoded");
    }

    #[tokio::test]
    async fn frames_in_one_probe_are_all_decoded_before_the_next_read() {
        let (mut r, mut peer) = reader();
        let mut bytes = ping(1);
        bytes.extend(ping(2));
        bytes.extend(data(100));
        peer.write_all(&bytes).await.unwrap();
        expect_ping(&mut r, 1);
        expect_ping(&mut r, 2);
        expect_data(&mut r, 100);
        assert!(poll(&mut r).is_pending());
        assert_eq!(r.buf.capacity(), 0);
    }

    #[tokio::test]
    async fn a_frame_split_anywhere_and_larger_than_the_probe_arrives_whole() {
        for cut in [
            1,
            2,
            3,
            9,
            10,
            PROBE_LEN - 1,
            PROBE_LEN,
            PROBE_LEN + 1,
            9_000,
        ] {
            let (mut r, mut peer) = reader();
            let mut bytes = data(12_000);
            bytes.extend(ping(7));
            peer.write_all(&bytes[..cut]).await.unwrap();
            assert!(poll(&mut r).is_pending(), "cut at {cut}");
            assert!(r.buf.capacity() > 0, "a partial frame keeps its bytes");
            peer.write_all(&bytes[cut..]).await.unwrap();
            expect_data(&mut r, 12_000);
            expect_ping(&mut r, 7);
            assert!(poll(&mut r).is_pending());
            assert_eq!(r.buf.capacity(), 0);
        }
    }

    // PARLEY PATCH (partial header block boxed): a header block continued in a
    // CONTINUATION frame still arrives as one HEADERS frame; the partial one is boxed.
    #[tokio::test]
    async fn a_header_block_continued_arrives_whole_and_the_partial_is_boxed() {
        assert!(std::mem::size_of::<FrameDecoder>() <= 160);
        let (mut r, mut peer) = reader();
        // HEADERS on stream 1 without END_HEADERS (:method GET, :scheme http), then a
        // CONTINUATION with END_HEADERS (:path /).
        let mut bytes = vec![0, 0, 2, 1, 0x1, 0, 0, 0, 1, 0x82, 0x86];
        bytes.extend([0, 0, 1, 9, 0x4, 0, 0, 0, 1, 0x84]);
        peer.write_all(&bytes[..11]).await.unwrap();
        assert!(poll(&mut r).is_pending());
        assert!(r.decoder.partial.is_some(), "the first part is kept");
        peer.write_all(&bytes[11..]).await.unwrap();
        match poll(&mut r) {
            Poll::Ready(Some(Ok(Frame::Headers(h)))) => {
                assert_eq!(h.stream_id(), StreamId::from(1));
                let (pseudo, _) = h.into_parts();
                assert_eq!(pseudo.method, Some(http::Method::GET));
                assert_eq!(pseudo.path.as_deref(), Some("/"));
            }
            other => panic!("expected the whole header block, got {other:?}"),
        }
        assert!(r.decoder.partial.is_none());
    }

    #[tokio::test]
    async fn eof_ends_the_stream_and_a_cut_frame_is_an_error() {
        let (mut r, mut peer) = reader();
        peer.write_all(&ping(3)).await.unwrap();
        drop(peer);
        expect_ping(&mut r, 3);
        assert!(matches!(poll(&mut r), Poll::Ready(None)));

        let (mut r, mut peer) = reader();
        peer.write_all(&ping(3)[..12]).await.unwrap();
        drop(peer);
        assert!(matches!(poll(&mut r), Poll::Ready(Some(Err(_)))));
        assert!(matches!(poll(&mut r), Poll::Ready(None)));
    }

    #[tokio::test]
    async fn a_frame_over_the_max_frame_size_is_a_frame_size_error() {
        let (mut r, mut peer) = reader();
        peer.write_all(&data(DEFAULT_MAX_FRAME_SIZE as usize + 1))
            .await
            .unwrap();
        match poll(&mut r) {
            Poll::Ready(Some(Err(Error::GoAway(_, Reason::FRAME_SIZE_ERROR, _)))) => {}
            other => panic!("expected FRAME_SIZE_ERROR, got {other:?}"),
        }
    }

    // PARLEY PATCH (frame lengths read in place, the connection's state smaller)
    #[tokio::test]
    async fn a_frame_of_the_max_frame_size_is_taken() {
        let (mut r, mut peer) = reader();
        peer.write_all(&data(DEFAULT_MAX_FRAME_SIZE as usize))
            .await
            .unwrap();
        expect_data(&mut r, DEFAULT_MAX_FRAME_SIZE as usize);
        assert!(poll(&mut r).is_pending());
        assert_eq!(r.buf.capacity(), 0);
    }

    /// As tokio-util's codec: a frame whose head was read is not checked again when the
    /// largest frame size shrinks before the rest of it arrives; the next frame is.
    #[tokio::test]
    async fn a_smaller_max_frame_size_binds_from_the_next_frame() {
        let (mut r, mut peer) = reader();
        r.set_max_frame_size(20_000);
        let bytes = data(18_000);
        peer.write_all(&bytes[..100]).await.unwrap();
        assert!(poll(&mut r).is_pending());
        r.set_max_frame_size(DEFAULT_MAX_FRAME_SIZE as usize);
        assert_eq!(r.max_frame_size(), DEFAULT_MAX_FRAME_SIZE as usize);
        peer.write_all(&bytes[100..]).await.unwrap();
        expect_data(&mut r, 18_000);
        peer.write_all(&data(17_000)).await.unwrap();
        match poll(&mut r) {
            Poll::Ready(Some(Err(Error::GoAway(_, Reason::FRAME_SIZE_ERROR, _)))) => {}
            other => panic!("expected FRAME_SIZE_ERROR, got {other:?}"),
        }
    }

    /// The reader's own state: the frame length (12 bytes, where tokio-util's codec took
    /// 72) and the frame decoder without the HPACK decoder's buffer, its two counts
    /// `u32`s (96 bytes, 136 before). Every HTTP/2 connection holds both for its life.
    #[test]
    fn the_reader_holds_no_codec_settings() {
        let reader = std::mem::size_of::<FramedRead<()>>();
        let decoder = std::mem::size_of::<FrameDecoder>();
        eprintln!("FramedRead<()> {reader} B, FrameDecoder {decoder} B");
        assert!(std::mem::size_of::<FrameLength>() <= 12);
        assert!(decoder <= 96, "FrameDecoder: {decoder} bytes (136 before)");
        assert!(reader <= 144, "FramedRead<()>: {reader} bytes (248 before)");
    }
}
