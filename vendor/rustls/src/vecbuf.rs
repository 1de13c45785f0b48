use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::{cmp, mem};
#[cfg(feature = "std")]
use std::io;
#[cfg(feature = "std")]
use std::io::Read;

#[cfg(feature = "std")]
use crate::msgs::message::OutboundChunks;

/// This is a byte buffer that is built from a deque of byte vectors.
///
/// This avoids extra copies when appending a new byte vector,
/// at the expense of more complexity when reading out.
// PARLEY PATCH: the chunks and the first one's consumed prefix are boxed, and the box
// exists only while the buffer holds bytes (16 B, not 48 B, in each of a connection's
// three buffers, which a connection that waits holds empty: `sendable_tls`,
// `received_plaintext` and `sendable_plaintext`). The first append allocates it, and
// the read or pop that empties the buffer gives it back with the deque's room.
pub(crate) struct ChunkVecBuffer {
    chunks: Option<Box<Chunks>>,

    /// The total upper limit (in bytes) of this object.
    // PARLEY PATCH: `usize::MAX` for none (an `Option<usize>` took 16 B, in each of a
    // connection's three buffers; no buffer can hold `usize::MAX` bytes, so that limit
    // is never reached, as none).
    limit: usize,
}

/// PARLEY PATCH: what a [`ChunkVecBuffer`] holds while it is not empty.
struct Chunks {
    /// How many bytes have been consumed in the first chunk.
    ///
    /// Invariant: 0 <= `prefix_used` < `deque[0].len()`
    prefix_used: usize,

    /// Invariant: not empty (an empty buffer has no `Chunks`), and no chunk is empty.
    deque: VecDeque<Vec<u8>>,
}

impl ChunkVecBuffer {
    pub(crate) fn new(limit: Option<usize>) -> Self {
        Self {
            chunks: None,
            limit: limit.unwrap_or(usize::MAX),
        }
    }

    /// Sets the upper limit on how many bytes this
    /// object can store.
    ///
    /// Setting a lower limit than the currently stored
    /// data is not an error.
    ///
    /// A [`None`] limit is interpreted as no limit.
    pub(crate) fn set_limit(&mut self, new_limit: Option<usize>) {
        self.limit = new_limit.unwrap_or(usize::MAX);
    }

    /// If we're empty
    pub(crate) fn is_empty(&self) -> bool {
        self.chunks.is_none()
    }

    /// How many bytes we're storing
    pub(crate) fn len(&self) -> usize {
        match &self.chunks {
            None => 0,
            Some(chunks) => {
                chunks
                    .deque
                    .iter()
                    .fold(0usize, |acc, chunk| acc + chunk.len())
                    - chunks.prefix_used
            }
        }
    }

    /// For a proposed append of `len` bytes, how many
    /// bytes should we actually append to adhere to the
    /// currently set `limit`?
    pub(crate) fn apply_limit(&self, len: usize) -> usize {
        let space = self.limit.saturating_sub(self.len());
        cmp::min(len, space)
    }

    /// Take and append the given `bytes`.
    pub(crate) fn append(&mut self, bytes: Vec<u8>) -> usize {
        let len = bytes.len();

        if !bytes.is_empty() {
            match &mut self.chunks {
                Some(chunks) => chunks.deque.push_back(bytes),
                None => {
                    let mut deque = VecDeque::new();
                    deque.push_back(bytes);
                    self.chunks = Some(Box::new(Chunks {
                        prefix_used: 0,
                        deque,
                    }));
                }
            }
        }

        len
    }

    /// Take one of the chunks from this object.
    ///
    /// This function returns `None` if the object `is_empty`.
    pub(crate) fn pop(&mut self) -> Option<Vec<u8>> {
        let chunks = self.chunks.as_mut()?;
        let mut first = chunks.deque.pop_front();

        if let Some(first) = &mut first {
            // slice off `prefix_used` if needed (uncommon)
            let prefix = mem::take(&mut chunks.prefix_used);
            first.drain(0..prefix);
        }
        self.release_if_empty();

        first
    }

    /// PARLEY PATCH: an empty buffer gives its chunks' box back, and with it the deque's
    /// room (4 chunks, 96 bytes, once anything was queued), so a connection that waits
    /// holds neither: every TLS connection kept the deque in `sendable_tls` since its
    /// ServerHello and in `received_plaintext` since its first record. The next append
    /// takes them again.
    fn release_if_empty(&mut self) {
        if self
            .chunks
            .as_ref()
            .is_some_and(|chunks| chunks.deque.is_empty())
        {
            self.chunks = None;
        }
    }

    #[cfg(read_buf)]
    /// Read data out of this object, writing it into `cursor`.
    pub(crate) fn read_buf(
        &mut self,
        mut cursor: core::io::BorrowedCursor<'_, u8>,
    ) -> io::Result<()> {
        while cursor.capacity() > 0 {
            let Some(chunk) = self.chunk() else {
                break;
            };
            let used = cmp::min(chunk.len(), cursor.capacity());
            cursor.append(&chunk[..used]);
            self.consume(used);
        }

        Ok(())
    }

    /// Inspect the first chunk from this object.
    pub(crate) fn peek(&self) -> Option<&[u8]> {
        self.chunks
            .as_ref()
            .and_then(|chunks| chunks.deque.front())
            .map(|ch| ch.as_slice())
    }
}

#[cfg(feature = "std")]
impl ChunkVecBuffer {
    pub(crate) fn is_full(&self) -> bool {
        self.len() > self.limit
    }

    /// Append a copy of `bytes`, perhaps a prefix if
    /// we're near the limit.
    pub(crate) fn append_limited_copy(&mut self, payload: OutboundChunks<'_>) -> usize {
        let take = self.apply_limit(payload.len());
        self.append(payload.split_at(take).0.to_vec());
        take
    }

    /// Read data out of this object, writing it into `buf`
    /// and returning how many bytes were written there.
    pub(crate) fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut offs = 0;

        while offs < buf.len() {
            let Some(mut chunk) = self.chunk() else {
                break;
            };
            let used = chunk.read(&mut buf[offs..])?;

            self.consume(used);
            offs += used;
        }

        Ok(offs)
    }

    pub(crate) fn consume_first_chunk(&mut self, used: usize) {
        // this backs (infallible) `BufRead::consume`, where `used` is
        // user-supplied.
        assert!(
            used <= self
                .chunk()
                .map(|ch| ch.len())
                .unwrap_or_default(),
            "illegal `BufRead::consume` usage",
        );
        self.consume(used);
    }

    fn consume(&mut self, used: usize) {
        let Some(chunks) = self.chunks.as_mut() else {
            debug_assert_eq!(
                used, 0,
                "attempted to `ChunkVecBuffer::consume` more than available"
            );
            return;
        };
        // first, mark the rightmost extent of the used buffer
        chunks.prefix_used += used;

        // then reduce `prefix_used` by discarding wholly-covered
        // buffers
        while let Some(buf) = chunks.deque.front() {
            if chunks.prefix_used < buf.len() {
                return;
            } else {
                chunks.prefix_used -= buf.len();
                chunks.deque.pop_front();
            }
        }

        debug_assert_eq!(
            chunks.prefix_used, 0,
            "attempted to `ChunkVecBuffer::consume` more than available"
        );
        // PARLEY PATCH: everything consumed: the chunks' box goes back.
        self.release_if_empty();
    }

    /// Read data out of this object, passing it `wr`
    pub(crate) fn write_to(&mut self, wr: &mut dyn io::Write) -> io::Result<usize> {
        let Some(chunks) = self.chunks.as_ref() else {
            return Ok(0);
        };

        let mut prefix = chunks.prefix_used;
        let mut bufs = [io::IoSlice::new(&[]); 64];
        for (iov, chunk) in bufs.iter_mut().zip(chunks.deque.iter()) {
            *iov = io::IoSlice::new(&chunk[prefix..]);
            prefix = 0;
        }
        let len = cmp::min(bufs.len(), chunks.deque.len());
        let bufs = &bufs[..len];
        let used = wr.write_vectored(bufs)?;
        let available_bytes = bufs.iter().map(|ch| ch.len()).sum();

        if used > available_bytes {
            // This is really unrecoverable, since the amount of data written
            // is now unknown.  Consume all the potentially-written data in
            // case the caller ignores the error.
            // See <https://github.com/rustls/rustls/issues/2316> for background.
            self.consume(available_bytes);
            return Err(io::Error::new(
                io::ErrorKind::Other,
                std::format!("illegal write_vectored return value ({used} > {available_bytes})"),
            ));
        }
        self.consume(used);
        Ok(used)
    }

    /// Returns the first contiguous chunk of data, or None if empty.
    pub(crate) fn chunk(&self) -> Option<&[u8]> {
        let chunks = self.chunks.as_ref()?;
        chunks
            .deque
            .front()
            .map(|chunk| &chunk[chunks.prefix_used..])
    }
}

// PARLEY PATCH: an emptied buffer holds no room.
#[cfg(all(test, feature = "std"))]
mod parley_release_tests {
    use alloc::vec::Vec;
    use std::io;

    use super::ChunkVecBuffer;

    /// The deque's room, 0 when the chunks' box is given back too.
    fn room(cvb: &ChunkVecBuffer) -> usize {
        assert_eq!(cvb.chunks.is_none(), cvb.is_empty());
        cvb.chunks
            .as_ref()
            .map_or(0, |chunks| chunks.deque.capacity())
    }

    #[test]
    fn room_given_back_once_empty() {
        let mut cvb = ChunkVecBuffer::new(None);
        assert_eq!(room(&cvb), 0);
        cvb.append(b"hello".to_vec());
        cvb.append(b"world".to_vec());
        assert!(room(&cvb) > 0);

        // read: partly, then the rest
        let mut buf = [0u8; 7];
        assert_eq!(cvb.read(&mut buf).unwrap(), 7);
        assert!(room(&cvb) > 0);
        assert_eq!(cvb.read(&mut buf).unwrap(), 3);
        assert_eq!(&buf[..3], b"rld");
        assert!(cvb.is_empty());
        assert_eq!(room(&cvb), 0);

        // write_to
        cvb.append(b"abc".to_vec());
        let mut out = Vec::new();
        assert_eq!(cvb.write_to(&mut out).unwrap(), 3);
        assert_eq!(out, b"abc");
        assert_eq!(room(&cvb), 0);

        // a partial write keeps the rest, and its room
        struct Two(Vec<u8>);
        impl io::Write for Two {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                let n = b.len().min(2);
                self.0.extend_from_slice(&b[..n]);
                Ok(n)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut two = Two(Vec::new());
        cvb.append(b"xyz".to_vec());
        assert_eq!(cvb.write_to(&mut two).unwrap(), 2);
        assert!(room(&cvb) > 0);
        assert_eq!(cvb.write_to(&mut two).unwrap(), 1);
        assert_eq!(two.0, b"xyz");
        assert_eq!(room(&cvb), 0);

        // pop
        cvb.append(b"one".to_vec());
        cvb.append(b"two".to_vec());
        assert_eq!(cvb.pop().unwrap(), b"one");
        assert!(room(&cvb) > 0);
        assert_eq!(cvb.pop().unwrap(), b"two");
        assert_eq!(room(&cvb), 0);
        assert!(cvb.pop().is_none());
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use alloc::vec;
    use alloc::vec::Vec;

    use super::ChunkVecBuffer;

    #[test]
    fn short_append_copy_with_limit() {
        let mut cvb = ChunkVecBuffer::new(Some(12));
        assert_eq!(cvb.append_limited_copy(b"hello"[..].into()), 5);
        assert_eq!(cvb.append_limited_copy(b"world"[..].into()), 5);
        assert_eq!(cvb.append_limited_copy(b"hello"[..].into()), 2);
        assert_eq!(cvb.append_limited_copy(b"world"[..].into()), 0);

        let mut buf = [0u8; 12];
        assert_eq!(cvb.read(&mut buf).unwrap(), 12);
        assert_eq!(buf.to_vec(), b"helloworldhe".to_vec());
    }

    // PARLEY PATCH: no limit is kept as `usize::MAX`.
    #[test]
    fn no_limit_takes_everything_and_is_never_full() {
        let mut cvb = ChunkVecBuffer::new(Some(4));
        assert_eq!(cvb.append_limited_copy(b"hello"[..].into()), 4);
        cvb.set_limit(None);
        assert_eq!(cvb.append_limited_copy(b"world"[..].into()), 5);
        assert!(!cvb.is_full());
        cvb.set_limit(Some(8));
        assert!(cvb.is_full());
        assert_eq!(cvb.append_limited_copy(b"!"[..].into()), 0);
        assert_eq!(size_of::<ChunkVecBuffer>(), 16);
    }

    #[test]
    fn read_byte_by_byte() {
        let mut cvb = ChunkVecBuffer::new(None);
        cvb.append(b"test fixture data".to_vec());
        assert!(!cvb.is_empty());
        for expect in b"test fixture data" {
            let mut byte = [0];
            assert_eq!(cvb.read(&mut byte).unwrap(), 1);
            assert_eq!(byte[0], *expect);
        }

        assert_eq!(cvb.read(&mut [0]).unwrap(), 0);
    }

    #[test]
    fn every_possible_chunk_interleaving() {
        let input = (0..=0xffu8)
            .cycle()
            .take(4096)
            .collect::<Vec<u8>>();

        for input_chunk_len in 1..64usize {
            for output_chunk_len in 1..65usize {
                std::println!("check input={input_chunk_len} output={output_chunk_len}");
                let mut cvb = ChunkVecBuffer::new(None);
                for chunk in input.chunks(input_chunk_len) {
                    cvb.append(chunk.to_vec());
                }

                assert_eq!(cvb.len(), input.len());
                let mut buf = vec![0u8; output_chunk_len];

                for expect in input.chunks(output_chunk_len) {
                    assert_eq!(expect.len(), cvb.read(&mut buf).unwrap());
                    assert_eq!(expect, &buf[..expect.len()]);
                }

                assert_eq!(cvb.read(&mut [0]).unwrap(), 0);
            }
        }
    }

    #[cfg(read_buf)]
    #[test]
    fn read_buf() {
        use core::io::BorrowedBuf;
        use core::mem::MaybeUninit;

        {
            let mut cvb = ChunkVecBuffer::new(None);
            cvb.append(b"test ".to_vec());
            cvb.append(b"fixture ".to_vec());
            cvb.append(b"data".to_vec());

            let mut buf = [MaybeUninit::<u8>::uninit(); 8];
            let mut buf: BorrowedBuf<'_, u8> = buf.as_mut_slice().into();
            cvb.read_buf(buf.unfilled()).unwrap();
            assert_eq!(buf.filled(), b"test fix");
            buf.clear();
            cvb.read_buf(buf.unfilled()).unwrap();
            assert_eq!(buf.filled(), b"ture dat");
            buf.clear();
            cvb.read_buf(buf.unfilled()).unwrap();
            assert_eq!(buf.filled(), b"a");
        }

        {
            let mut cvb = ChunkVecBuffer::new(None);
            cvb.append(b"short message".to_vec());

            let mut buf = [MaybeUninit::<u8>::uninit(); 1024];
            let mut buf: BorrowedBuf<'_, u8> = buf.as_mut_slice().into();
            cvb.read_buf(buf.unfilled()).unwrap();
            assert_eq!(buf.filled(), b"short message");
        }
    }
}

#[cfg(bench)]
mod benchmarks {
    use alloc::vec;

    use super::ChunkVecBuffer;

    #[bench]
    fn read_one_byte_from_large_message(b: &mut test::Bencher) {
        b.iter(|| {
            let mut cvb = ChunkVecBuffer::new(None);
            cvb.append(vec![0u8; 16_384]);
            assert_eq!(1, cvb.read(&mut [0u8]).unwrap());
        });
    }

    #[bench]
    fn read_all_individual_from_large_message(b: &mut test::Bencher) {
        b.iter(|| {
            let mut cvb = ChunkVecBuffer::new(None);
            cvb.append(vec![0u8; 16_384]);
            loop {
                if let Ok(0) = cvb.read(&mut [0u8]) {
                    break;
                }
            }
        });
    }

    #[bench]
    fn read_half_bytes_from_large_message(b: &mut test::Bencher) {
        b.iter(|| {
            let mut cvb = ChunkVecBuffer::new(None);
            cvb.append(vec![0u8; 16_384]);
            assert_eq!(8192, cvb.read(&mut [0u8; 8192]).unwrap());
            assert_eq!(8192, cvb.read(&mut [0u8; 8192]).unwrap());
        });
    }

    #[bench]
    fn read_entire_large_message(b: &mut test::Bencher) {
        b.iter(|| {
            let mut cvb = ChunkVecBuffer::new(None);
            cvb.append(vec![0u8; 16_384]);
            assert_eq!(16_384, cvb.read(&mut [0u8; 16_384]).unwrap());
        });
    }
}
