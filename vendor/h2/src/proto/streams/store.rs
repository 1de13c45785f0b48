use super::*;

use std::convert::Infallible;
use std::fmt;
use std::marker::PhantomData;
use std::ops;

/// Storage for streams
#[derive(Debug)]
pub(super) struct Store {
    slab: slab::Slab<Stream>,
    // PARLEY PATCH (stream ids in a sorted vector): see `Ids`.
    ids: Ids,
}

/// PARLEY PATCH (stream ids in a sorted vector): the stream id -> slab index map, as a
/// vector sorted by id, looked up by binary search. It was an `IndexMap` (72 bytes in
/// every connection, and once a stream had opened, its entries' vector and its hash
/// table, ~100 bytes, kept for the connection's life) for a map that holds the few
/// streams a connection has open at a time (one, for an event stream or a pending
/// long-poll; at most `max_concurrent_streams`). Stream ids grow, so a new stream is
/// appended; a removal moves the ids after it (`for_each` relies only on a removal
/// taking the current entry's place, as `swap_remove` did).
#[derive(Debug, Default)]
struct Ids(Vec<(StreamId, SlabIndex)>);

impl Ids {
    fn position(&self, id: &StreamId) -> Result<usize, usize> {
        // Most lookups are for the newest stream.
        match self.0.last() {
            Some((last, _)) if last == id => Ok(self.0.len() - 1),
            Some((last, _)) if last < id => Err(self.0.len()),
            _ => self.0.binary_search_by(|(other, _)| other.cmp(id)),
        }
    }

    fn get(&self, id: &StreamId) -> Option<&SlabIndex> {
        self.position(id).ok().map(|i| &self.0[i].1)
    }

    fn contains_key(&self, id: &StreamId) -> bool {
        self.position(id).is_ok()
    }

    /// Inserts `id`, which must not be present; `false` if it was.
    fn insert(&mut self, id: StreamId, index: SlabIndex) -> bool {
        match self.position(&id) {
            Ok(_) => false,
            Err(at) => {
                self.0.insert(at, (id, index));
                true
            }
        }
    }

    fn remove(&mut self, id: &StreamId) {
        if let Ok(at) = self.position(id) {
            self.0.remove(at);
        }
    }

    fn get_index(&self, i: usize) -> Option<(&StreamId, &SlabIndex)> {
        self.0.get(i).map(|(id, index)| (id, index))
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

/// "Pointer" to an entry in the store
pub(super) struct Ptr<'a> {
    key: Key,
    store: &'a mut Store,
}

/// References an entry in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Key {
    index: SlabIndex,
    /// Keep the stream ID in the key as an ABA guard, since slab indices
    /// could be re-used with a new stream.
    stream_id: StreamId,
}

// We can never have more than `StreamId::MAX` streams in the store,
// so we can save a smaller index (u32 vs usize).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SlabIndex(u32);

pub(super) struct Queue<N> {
    indices: Option<store::Indices>,
    _p: PhantomData<N>,
}

pub(super) trait Next {
    fn next(stream: &Stream) -> Option<Key>;

    fn set_next(stream: &mut Stream, key: Option<Key>);

    fn take_next(stream: &mut Stream) -> Option<Key>;

    fn is_queued(stream: &Stream) -> bool;

    fn set_queued(stream: &mut Stream, val: bool);
}

/// A linked list
#[derive(Debug, Clone, Copy)]
struct Indices {
    pub head: Key,
    pub tail: Key,
}

pub(super) enum Entry<'a> {
    Occupied(OccupiedEntry<'a>),
    Vacant(VacantEntry<'a>),
}

// PARLEY PATCH (stream ids in a sorted vector): the entries of `Ids`.
pub(super) struct OccupiedEntry<'a> {
    key: Key,
    _store: PhantomData<&'a mut Store>,
}

pub(super) struct VacantEntry<'a> {
    ids: &'a mut Ids,
    at: usize,
    slab: &'a mut slab::Slab<Stream>,
}

pub(super) trait Resolve {
    fn resolve(&mut self, key: Key) -> Ptr<'_>;
}

// ===== impl Store =====

impl Store {
    pub fn new() -> Self {
        Store {
            slab: slab::Slab::new(),
            ids: Ids::default(),
        }
    }

    pub fn find_mut(&mut self, id: &StreamId) -> Option<Ptr<'_>> {
        let index = {
            let key = self.ids.get(id)?;
            *key
        };

        Some(Ptr {
            key: Key {
                index,
                stream_id: *id,
            },
            store: self,
        })
    }

    pub fn insert(&mut self, id: StreamId, val: Stream) -> Ptr<'_> {
        let index = SlabIndex(insert_stream(&mut self.slab, val) as u32);
        assert!(self.ids.insert(id, index));

        Ptr {
            key: Key {
                index,
                stream_id: id,
            },
            store: self,
        }
    }

    pub fn find_entry(&mut self, id: StreamId) -> Entry<'_> {
        // PARLEY PATCH (stream ids in a sorted vector)
        match self.ids.position(&id) {
            Ok(at) => Entry::Occupied(OccupiedEntry {
                key: Key {
                    index: self.ids.0[at].1,
                    stream_id: id,
                },
                _store: PhantomData,
            }),
            Err(at) => Entry::Vacant(VacantEntry {
                ids: &mut self.ids,
                at,
                slab: &mut self.slab,
            }),
        }
    }

    #[allow(clippy::blocks_in_conditions)]
    pub(crate) fn for_each<F>(&mut self, mut f: F)
    where
        F: FnMut(Ptr),
    {
        match self.try_for_each(|ptr| {
            f(ptr);
            Ok::<_, Infallible>(())
        }) {
            Ok(()) => (),
            #[allow(unused)]
            Err(infallible) => match infallible {},
        }
    }

    pub fn try_for_each<F, E>(&mut self, mut f: F) -> Result<(), E>
    where
        F: FnMut(Ptr) -> Result<(), E>,
    {
        let mut len = self.ids.len();
        let mut i = 0;

        while i < len {
            // Get the key by index, this makes the borrow checker happy
            let (stream_id, index) = {
                let entry = self.ids.get_index(i).unwrap();
                (*entry.0, *entry.1)
            };

            f(Ptr {
                key: Key { index, stream_id },
                store: self,
            })?;

            // TODO: This logic probably could be better...
            let new_len = self.ids.len();

            if new_len < len {
                debug_assert!(new_len == len - 1);
                len -= 1;
            } else {
                i += 1;
            }
        }

        Ok(())
    }
}

impl Resolve for Store {
    fn resolve(&mut self, key: Key) -> Ptr<'_> {
        Ptr { key, store: self }
    }
}

impl ops::Index<Key> for Store {
    type Output = Stream;

    fn index(&self, key: Key) -> &Self::Output {
        self.slab
            .get(key.index.0 as usize)
            .filter(|s| s.id == key.stream_id)
            .unwrap_or_else(|| {
                panic!("dangling store key for stream_id={:?}", key.stream_id);
            })
    }
}

impl ops::IndexMut<Key> for Store {
    fn index_mut(&mut self, key: Key) -> &mut Self::Output {
        self.slab
            .get_mut(key.index.0 as usize)
            .filter(|s| s.id == key.stream_id)
            .unwrap_or_else(|| {
                panic!("dangling store key for stream_id={:?}", key.stream_id);
            })
    }
}

impl Store {
    #[cfg(feature = "unstable")]
    pub fn num_active_streams(&self) -> usize {
        self.ids.len()
    }

    #[cfg(feature = "unstable")]
    pub fn num_wired_streams(&self) -> usize {
        self.slab.len()
    }
}

// While running h2 unit/integration tests, enable this debug assertion.
//
// In practice, we don't need to ensure this. But the integration tests
// help to make sure we've cleaned up in cases where we could (like, the
// runtime isn't suddenly dropping the task for unknown reasons).
#[cfg(feature = "unstable")]
impl Drop for Store {
    fn drop(&mut self) {
        use std::thread;

        if !thread::panicking() {
            debug_assert!(self.slab.is_empty());
        }
    }
}

// ===== impl Queue =====

impl<N> Queue<N>
where
    N: Next,
{
    pub fn new() -> Self {
        Queue {
            indices: None,
            _p: PhantomData,
        }
    }

    pub fn take(&mut self) -> Self {
        Queue {
            indices: self.indices.take(),
            _p: PhantomData,
        }
    }

    /// Queue the stream.
    ///
    /// If the stream is already contained by the list, return `false`.
    pub fn push(&mut self, stream: &mut store::Ptr) -> bool {
        tracing::trace!("Queue::push_back");

        if N::is_queued(stream) {
            tracing::trace!(" -> already queued");
            return false;
        }

        N::set_queued(stream, true);

        // The next pointer shouldn't be set
        debug_assert!(N::next(stream).is_none());

        // Queue the stream
        match self.indices {
            Some(ref mut idxs) => {
                tracing::trace!(" -> existing entries");

                // Update the current tail node to point to `stream`
                let key = stream.key();
                N::set_next(&mut stream.resolve(idxs.tail), Some(key));

                // Update the tail pointer
                idxs.tail = stream.key();
            }
            None => {
                tracing::trace!(" -> first entry");
                self.indices = Some(store::Indices {
                    head: stream.key(),
                    tail: stream.key(),
                });
            }
        }

        true
    }

    /// Queue the stream
    ///
    /// If the stream is already contained by the list, return `false`.
    pub fn push_front(&mut self, stream: &mut store::Ptr) -> bool {
        tracing::trace!("Queue::push_front");

        if N::is_queued(stream) {
            tracing::trace!(" -> already queued");
            return false;
        }

        N::set_queued(stream, true);

        // The next pointer shouldn't be set
        debug_assert!(N::next(stream).is_none());

        // Queue the stream
        match self.indices {
            Some(ref mut idxs) => {
                tracing::trace!(" -> existing entries");

                // Update the provided stream to point to the head node
                let head_key = stream.resolve(idxs.head).key();
                N::set_next(stream, Some(head_key));

                // Update the head pointer
                idxs.head = stream.key();
            }
            None => {
                tracing::trace!(" -> first entry");
                self.indices = Some(store::Indices {
                    head: stream.key(),
                    tail: stream.key(),
                });
            }
        }

        true
    }

    pub fn pop<'a, R>(&mut self, store: &'a mut R) -> Option<store::Ptr<'a>>
    where
        R: Resolve,
    {
        if let Some(mut idxs) = self.indices {
            let mut stream = store.resolve(idxs.head);

            if idxs.head == idxs.tail {
                assert!(N::next(&stream).is_none());
                self.indices = None;
            } else {
                idxs.head = N::take_next(&mut stream).unwrap();
                self.indices = Some(idxs);
            }

            debug_assert!(N::is_queued(&stream));
            N::set_queued(&mut stream, false);

            return Some(stream);
        }

        None
    }

    pub fn is_empty(&self) -> bool {
        self.indices.is_none()
    }

    pub fn pop_if<'a, R, F>(&mut self, store: &'a mut R, f: F) -> Option<store::Ptr<'a>>
    where
        R: Resolve,
        F: Fn(&Stream) -> bool,
    {
        if let Some(idxs) = self.indices {
            let should_pop = f(&store.resolve(idxs.head));
            if should_pop {
                return self.pop(store);
            }
        }

        None
    }
}

impl<N> fmt::Debug for Queue<N> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.debug_struct("Queue")
            .field("indices", &self.indices)
            // skip phantom data
            .finish()
    }
}

// ===== impl Ptr =====

impl<'a> Ptr<'a> {
    /// Returns the Key associated with the stream
    pub fn key(&self) -> Key {
        self.key
    }

    pub fn store_mut(&mut self) -> &mut Store {
        self.store
    }

    /// Remove the stream from the store
    pub fn remove(self) -> StreamId {
        // The stream must have been unlinked before this point
        debug_assert!(!self.store.ids.contains_key(&self.key.stream_id));

        // Remove the stream state
        let stream = self.store.slab.remove(self.key.index.0 as usize);
        assert_eq!(stream.id, self.key.stream_id);
        // PARLEY PATCH (streams held while in use): give back the room of streams gone,
        // so that a connection left with its one long stream (an event stream, a
        // pending poll) holds room for one, not for the most it ever had.
        let slab = &mut self.store.slab;
        if slab.is_empty() {
            *slab = slab::Slab::new();
        } else if slab.len() * 4 <= slab.capacity() {
            slab.shrink_to_fit();
        }
        stream.id
    }

    /// Remove the StreamId -> stream state association.
    ///
    /// This will effectively remove the stream as far as the H2 protocol is
    /// concerned.
    pub fn unlink(&mut self) {
        let id = self.key.stream_id;
        self.store.ids.remove(&id);
    }
}

impl<'a> Resolve for Ptr<'a> {
    fn resolve(&mut self, key: Key) -> Ptr<'_> {
        Ptr {
            key,
            store: &mut *self.store,
        }
    }
}

impl<'a> ops::Deref for Ptr<'a> {
    type Target = Stream;

    fn deref(&self) -> &Stream {
        &self.store[self.key]
    }
}

impl<'a> ops::DerefMut for Ptr<'a> {
    fn deref_mut(&mut self) -> &mut Stream {
        &mut self.store[self.key]
    }
}

impl<'a> fmt::Debug for Ptr<'a> {
    fn fmt(&self, fmt: &mut fmt::Formatter) -> fmt::Result {
        (**self).fmt(fmt)
    }
}

// ===== impl OccupiedEntry =====

impl<'a> OccupiedEntry<'a> {
    pub fn key(&self) -> Key {
        self.key
    }
}

/// PARLEY PATCH (streams held while in use): the first stream takes room for one (a
/// `Slab` would take room for four, ~1.3 KB).
fn insert_stream(slab: &mut slab::Slab<Stream>, value: Stream) -> usize {
    if slab.capacity() == 0 {
        slab.reserve_exact(1);
    }
    slab.insert(value)
}

// ===== impl VacantEntry =====

impl<'a> VacantEntry<'a> {
    pub fn insert(self, value: Stream) -> Key {
        // Insert the value in the slab
        let stream_id = value.id;
        let index = SlabIndex(insert_stream(self.slab, value) as u32);

        // Insert the handle in the ID map
        self.ids.0.insert(self.at, (stream_id, index));

        Key { index, stream_id }
    }
}

// PARLEY PATCH (stream ids in a sorted vector)
#[cfg(test)]
mod parley_tests {
    use super::*;

    fn stream(id: u32) -> Stream {
        Stream::new(StreamId::from(id), 65_535, 65_535)
    }

    #[test]
    fn parley_streams_are_found_by_id_in_a_sorted_vector() {
        assert!(std::mem::size_of::<Store>() <= 64, "the map is a vector");
        let mut store = Store::new();
        // In order (a peer's new streams), then out of order (pushed streams, a test).
        for id in [1u32, 3, 5, 11, 7, 2, 9] {
            let key = match store.find_entry(StreamId::from(id)) {
                Entry::Vacant(e) => e.insert(stream(id)),
                Entry::Occupied(_) => panic!("{id} is new"),
            };
            assert_eq!(key.stream_id, StreamId::from(id));
        }
        assert!(store.ids.0.windows(2).all(|w| w[0].0 < w[1].0), "sorted");
        assert_eq!(store.ids.0.capacity(), 8, "8 bytes per stream");
        for id in [1u32, 2, 3, 5, 7, 9, 11] {
            let ptr = store.find_mut(&StreamId::from(id)).expect("found");
            assert_eq!(ptr.id, StreamId::from(id));
            match store.find_entry(StreamId::from(id)) {
                Entry::Occupied(e) => assert_eq!(e.key().stream_id, StreamId::from(id)),
                Entry::Vacant(_) => panic!("{id} is there"),
            }
        }
        for id in [0u32, 4, 13] {
            assert!(store.find_mut(&StreamId::from(id)).is_none());
        }
        let ptr = store.insert(StreamId::from(13), stream(13));
        assert_eq!(ptr.key().stream_id, StreamId::from(13));

        // for_each visits every stream once, also when it unlinks the one it is at.
        let mut seen = Vec::new();
        store.for_each(|mut ptr| {
            seen.push(u32::from(ptr.id));
            if u32::from(ptr.id) % 3 == 0 {
                ptr.unlink();
                ptr.remove();
            }
        });
        assert_eq!(seen, [1, 2, 3, 5, 7, 9, 11, 13]);
        let left: Vec<u32> = store.ids.0.iter().map(|(id, _)| u32::from(*id)).collect();
        assert_eq!(left, [1, 2, 5, 7, 11, 13]);
        for id in left {
            let ptr = store.find_mut(&StreamId::from(id)).expect("still there");
            assert_eq!(ptr.id, StreamId::from(id));
        }
    }
}
