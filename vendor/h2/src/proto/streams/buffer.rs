use slab::Slab;

/// Buffers frames for multiple streams.
#[derive(Debug)]
pub struct Buffer<T> {
    slab: Slab<Slot<T>>,
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
#[derive(Debug, Default, Copy, Clone)]
struct Indices {
    head: usize,
    tail: usize,
}

#[derive(Debug)]
struct Slot<T> {
    value: T,
    next: Option<usize>,
}

impl<T> Buffer<T> {
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
    fn insert(&mut self, slot: Slot<T>) -> usize {
        if self.slab.capacity() == 0 {
            self.slab.reserve_exact(1);
        }
        self.slab.insert(slot)
    }

    fn remove(&mut self, key: usize) -> Slot<T> {
        let slot = self.slab.remove(key);
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

    pub fn push_back<T>(&mut self, buf: &mut Buffer<T>, value: T) {
        let key = buf.insert(Slot { value, next: None });

        match self.indices {
            Some(ref mut idxs) => {
                buf.slab[idxs.tail].next = Some(key);
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

    pub fn push_front<T>(&mut self, buf: &mut Buffer<T>, value: T) {
        let key = buf.insert(Slot { value, next: None });

        match self.indices {
            Some(ref mut idxs) => {
                buf.slab[key].next = Some(idxs.head);
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

    pub fn pop_front<T>(&mut self, buf: &mut Buffer<T>) -> Option<T> {
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

                Some(slot.value)
            }
            None => None,
        }
    }
}

// PARLEY PATCH (buffers held while in use)
#[cfg(test)]
mod tests {
    use super::*;

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
