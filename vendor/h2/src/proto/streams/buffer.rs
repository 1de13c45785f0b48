use slab::Slab;

use crate::frame::{self, Frame};

/// Buffers frames for multiple streams.
#[derive(Debug)]
pub struct Buffer<T: Queued> {
    slab: Slab<Slot<T::Stored>>,
    // PARLEY PATCH (receive queue given back): whether an emptied buffer keeps room
    // for one frame.
    keep_one: bool,
}

/// A sequence of frames in a `Buffer`
#[derive(Debug)]
pub struct Deque {
    indices: Option<Indices>,
}

/// Tracks the head & tail for a sequence of frames in a `Buffer`.
///
/// PARLEY PATCH (queue indices in 32 bits): `u32`s. Every stream holds two `Deque`s
/// (frames to send, frames received), 24 bytes each with `usize` indices and 12 with
/// these: a `Stream` is 248 bytes, not 272, and a stream's slot fits jemalloc's 256-byte
/// class, not the 320-byte one. A buffer never holds 2^32 frames (each is a slot of
/// 56 bytes or more).
#[derive(Debug, Default, Copy, Clone)]
struct Indices {
    head: u32,
    tail: u32,
}

#[derive(Debug)]
struct Slot<T> {
    value: T,
    // PARLEY PATCH (queue indices in 32 bits)
    next: Option<u32>,
}

/// PARLEY PATCH (queued frames boxed but DATA): how a value is held in a `Buffer`'s
/// slots. Every slot is as large as the largest value it can hold, and a buffer keeps
/// room for one (above), so the send queue's slot, sized for a HEADERS frame (a
/// `frame::Headers` is ~290 bytes: its `HeaderMap` and pseudo-headers), was held by
/// every connection that had sent a response, for its life. A connection that waits (an
/// event stream, a pending long-poll) queues DATA frames (~50 bytes) one at a time, and
/// a HEADERS or RST_STREAM frame once per stream.
pub trait Queued: Sized {
    /// The form a value takes in a slot.
    type Stored;
    /// Into its slot.
    fn store(self) -> Self::Stored;
    /// Out of its slot.
    fn unstore(stored: Self::Stored) -> Self;
}

/// PARLEY PATCH (queued frames boxed but DATA): a frame in the send queue. DATA frames
/// (an event stream's every event) are held as they are; the others, queued once per
/// stream or rarer (HEADERS, trailers, RST_STREAM, PUSH_PROMISE), in a box: one
/// allocation per such frame, and a slot of ~70 bytes instead of ~310.
#[derive(Debug)]
pub enum StoredFrame<B> {
    Data(frame::Data<B>),
    Boxed(Box<Frame<B>>),
}

impl<B> Queued for Frame<B> {
    type Stored = StoredFrame<B>;

    fn store(self) -> StoredFrame<B> {
        match self {
            Frame::Data(data) => StoredFrame::Data(data),
            other => StoredFrame::Boxed(Box::new(other)),
        }
    }

    fn unstore(stored: StoredFrame<B>) -> Frame<B> {
        match stored {
            StoredFrame::Data(data) => Frame::Data(data),
            StoredFrame::Boxed(frame) => *frame,
        }
    }
}

impl<T: Queued> Buffer<T> {
    pub fn new() -> Self {
        Buffer {
            slab: Slab::new(),
            keep_one: true,
        }
    }

    /// PARLEY PATCH (receive queue given back): a buffer that gives all its room back
    /// when it empties. For the receive queue: a connection receives few frames (request
    /// heads and bodies) and then mostly waits or sends, so the room for one (~248
    /// bytes: an `Event` holds a request head) was held for nothing; an allocation per
    /// frame received is what it costs.
    pub fn released_when_empty() -> Self {
        Buffer {
            slab: Slab::new(),
            keep_one: false,
        }
    }

    // PARLEY PATCH (buffers held while in use): the first frame takes room for one (a
    // `Slab` takes room for four: ~1.2 KB of frames for the send queue, held for the
    // connection's life once used), and a buffer that grew past one gives the room back
    // when it empties, keeping room for one: a connection that queues one frame at a time
    // (an event stream) allocates nothing per frame.
    fn insert(&mut self, slot: Slot<T::Stored>) -> u32 {
        if self.slab.capacity() == 0 {
            self.slab.reserve_exact(1);
        }
        // PARLEY PATCH (queue indices in 32 bits)
        let key = self.slab.insert(slot);
        u32::try_from(key).expect("fewer than 2^32 frames queued")
    }

    fn remove(&mut self, key: u32) -> Slot<T::Stored> {
        let slot = self.slab.remove(key as usize);
        // PARLEY PATCH (receive queue given back): all the room, or room for one.
        if self.slab.is_empty() {
            if !self.keep_one && self.slab.capacity() > 0 {
                self.slab = Slab::new();
            } else if self.slab.capacity() > 1 {
                self.slab = Slab::with_capacity(1);
            }
        }
        slot
    }

    pub fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }
}

impl Deque {
    pub fn new() -> Self {
        Deque { indices: None }
    }

    pub fn is_empty(&self) -> bool {
        self.indices.is_none()
    }

    pub fn push_back<T: Queued>(&mut self, buf: &mut Buffer<T>, value: T) {
        let key = buf.insert(Slot {
            value: value.store(),
            next: None,
        });

        match self.indices {
            Some(ref mut idxs) => {
                buf.slab[idxs.tail as usize].next = Some(key);
                idxs.tail = key;
            }
            None => {
                self.indices = Some(Indices {
                    head: key,
                    tail: key,
                });
            }
        }
    }

    pub fn push_front<T: Queued>(&mut self, buf: &mut Buffer<T>, value: T) {
        let key = buf.insert(Slot {
            value: value.store(),
            next: None,
        });

        match self.indices {
            Some(ref mut idxs) => {
                buf.slab[key as usize].next = Some(idxs.head);
                idxs.head = key;
            }
            None => {
                self.indices = Some(Indices {
                    head: key,
                    tail: key,
                });
            }
        }
    }

    pub fn pop_front<T: Queued>(&mut self, buf: &mut Buffer<T>) -> Option<T> {
        match self.indices {
            Some(mut idxs) => {
                let mut slot = buf.remove(idxs.head);

                if idxs.head == idxs.tail {
                    assert!(slot.next.is_none());
                    self.indices = None;
                } else {
                    idxs.head = slot.next.take().unwrap();
                    self.indices = Some(idxs);
                }

                Some(T::unstore(slot.value))
            }
            None => None,
        }
    }
}

// PARLEY PATCH (buffers held while in use)
#[cfg(test)]
mod tests {
    use super::*;

    // PARLEY PATCH (queued frames boxed but DATA): the tests' values are held as they are.
    impl Queued for i32 {
        type Stored = i32;
        fn store(self) -> i32 {
            self
        }
        fn unstore(stored: i32) -> i32 {
            stored
        }
    }

    // PARLEY PATCH (queued frames boxed but DATA)
    // PARLEY PATCH (queue indices in 32 bits)
    #[test]
    fn parley_a_deque_holds_32_bit_indices() {
        assert_eq!(std::mem::size_of::<Deque>(), 12);
        // Frames pushed at both ends come out in order, across a buffer shared by two
        // deques.
        let mut buf = Buffer::<i32>::new();
        let (mut a, mut b) = (Deque::new(), Deque::new());
        for i in 0..4 {
            a.push_back(&mut buf, i);
            b.push_back(&mut buf, 10 + i);
        }
        a.push_front(&mut buf, -1);
        let a: Vec<i32> = std::iter::from_fn(|| a.pop_front(&mut buf)).collect();
        assert_eq!(a, [-1, 0, 1, 2, 3]);
        let b: Vec<i32> = std::iter::from_fn(|| b.pop_front(&mut buf)).collect();
        assert_eq!(b, [10, 11, 12, 13]);
        assert!(buf.is_empty());
    }

    #[test]
    fn parley_a_send_queue_slot_holds_a_data_frame_and_other_frames_boxed() {
        use crate::frame::{Headers, Reason, Reset, StreamId};
        use bytes::Bytes;
        use std::mem::size_of;

        // The slot is sized for a DATA frame, no longer for a HEADERS frame.
        let slot = size_of::<Slot<StoredFrame<Bytes>>>();
        assert!(size_of::<Frame<Bytes>>() >= 250, "a HEADERS frame is large");
        assert!(
            slot <= size_of::<frame::Data<Bytes>>() + 24,
            "a slot of {slot} bytes"
        );

        // Frames of every kind keep their order and come out as they went in.
        let id = StreamId::from(1);
        let mut buf = Buffer::<Frame<Bytes>>::new();
        let mut q = Deque::new();
        let mut headers = Headers::new(id, Default::default(), Default::default());
        headers.set_end_headers();
        q.push_back(&mut buf, headers.into());
        q.push_back(
            &mut buf,
            frame::Data::new(id, Bytes::from_static(b"one")).into(),
        );
        q.push_back(&mut buf, Reset::new(id, Reason::CANCEL).into());
        q.push_front(
            &mut buf,
            frame::Data::new(id, Bytes::from_static(b"zero")).into(),
        );
        match q.pop_front(&mut buf) {
            Some(Frame::Data(d)) => assert_eq!(d.payload(), &Bytes::from_static(b"zero")),
            f => panic!("{f:?}"),
        }
        assert!(matches!(q.pop_front(&mut buf), Some(Frame::Headers(h)) if h.stream_id() == id));
        match q.pop_front(&mut buf) {
            Some(Frame::Data(d)) => assert_eq!(d.payload(), &Bytes::from_static(b"one")),
            f => panic!("{f:?}"),
        }
        assert!(
            matches!(q.pop_front(&mut buf), Some(Frame::Reset(r)) if r.reason() == Reason::CANCEL)
        );
        assert!(q.pop_front(&mut buf).is_none() && buf.is_empty());
    }

    #[test]
    fn an_emptied_buffer_holds_room_for_one_and_its_deques_keep_their_order() {
        let mut buf = Buffer::new();
        let (mut a, mut b) = (Deque::new(), Deque::new());
        assert_eq!(buf.slab.capacity(), 0);
        a.push_back(&mut buf, 1);
        assert_eq!(buf.slab.capacity(), 1, "room for one frame");
        b.push_back(&mut buf, 10);
        a.push_back(&mut buf, 2);
        a.push_front(&mut buf, 0);
        b.push_back(&mut buf, 11);
        assert_eq!(a.pop_front(&mut buf), Some(0));
        assert_eq!(b.pop_front(&mut buf), Some(10));
        assert_eq!(a.pop_front(&mut buf), Some(1));
        assert_eq!(a.pop_front(&mut buf), Some(2));
        assert_eq!(a.pop_front(&mut buf), None);
        assert!(buf.slab.capacity() > 0, "b still holds a frame");
        assert_eq!(b.pop_front(&mut buf), Some(11));
        assert!(buf.is_empty() && b.is_empty());
        assert_eq!(buf.slab.capacity(), 1, "given back but room for one");
        b.push_back(&mut buf, 12);
        assert_eq!(b.pop_front(&mut buf), Some(12));
        assert_eq!(buf.slab.capacity(), 1);
    }

    // PARLEY PATCH (receive queue given back)
    #[test]
    fn a_buffer_released_when_empty_holds_nothing_once_drained() {
        let mut buf = Buffer::released_when_empty();
        let mut a = Deque::new();
        a.push_back(&mut buf, 1);
        a.push_back(&mut buf, 2);
        assert_eq!(a.pop_front(&mut buf), Some(1));
        assert!(buf.slab.capacity() > 0, "a frame is still queued");
        assert_eq!(a.pop_front(&mut buf), Some(2));
        assert_eq!(buf.slab.capacity(), 0);
        a.push_back(&mut buf, 3);
        assert_eq!(a.pop_front(&mut buf), Some(3));
        assert_eq!(buf.slab.capacity(), 0);
    }
}
