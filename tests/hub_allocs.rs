//! What the hub allocates for one connect storm handshake (docs/BENCHMARKS.md, "Round
//! nine: the hub and the registry per handshake"): a user with no other session here
//! connects (attach), its one room is registered (`joined` from the connect's read of
//! its rooms), it joins that room again (the `join` command), and it closes (detach).
//!
//! Counted with a counting global allocator, on this test's own thread only (other tests'
//! threads do not count). Its own binary: the allocator is the whole process's (the
//! library declares none; the `parley` binary declares jemalloc, src/lib.rs `allocator`).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    sync::Arc,
};

use parley::{
    codec::Push,
    delivery::{Hub, Recipient, Target},
    proto::{Pong, server_frame::Kind},
};

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call is passed on to the system allocator unchanged; the count is a
// thread-local `Cell` (no allocation, no lock).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|n| n.set(n.get() + 1));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCS.try_with(|n| n.set(n.get() + 1));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.with(|n| n.get())
}

struct Session {
    id: u64,
    user: Arc<str>,
}

impl Recipient for Session {
    fn recipient_id(&self) -> u64 {
        self.id
    }
    fn user(&self) -> &str {
        &self.user
    }
    fn user_key(&self) -> Arc<str> {
        self.user.clone()
    }
    fn push(&self, _: &Arc<Push>) {}
}

/// Allocations of one handshake of a user alone in its room, after a first one warmed the
/// shards' tables (a map keeps its table when emptied): the room's name (one `Arc` for
/// both maps) and the room's members (an `IndexMap`: its table and its entries). Nothing
/// for the user's entry's list of sessions (its first is inline), the user's list of
/// rooms (its first is inline; a map of rooms was a fourth allocation until round
/// eighteen), the room's snapshot chunks (the first inline), the second `joined`, or the
/// detach (it hands back the user's list of rooms itself, not a copy). Before round
/// nine: 8.
#[test]
fn a_handshake_of_a_user_alone_in_its_room_allocates_three_times_in_the_hub() {
    let hub = Hub::new();
    let user: Arc<str> = "storm-user-17".into();
    let handshake = |id: u64| {
        let session: Arc<dyn Recipient> = Arc::new(Session {
            id,
            user: user.clone(),
        });
        // The session's own `Arc` is the registry's, not the hub's.
        let before = allocs();
        assert!(hub.attach(session), "the user's first session here");
        hub.joined(&user, "storm-room-17", Some(1));
        hub.joined(&user, "storm-room-17", Some(1));
        let rooms = hub.detach(&user, id).expect("the user's last session");
        assert_eq!(rooms.len(), 1);
        drop(rooms);
        allocs() - before
    };
    handshake(1);
    let n = handshake(2);
    assert!(n <= 3, "one handshake allocated {n} times in the hub");
    // And the hub is empty again: a delivery to the room reaches nobody.
    let push = Arc::new(Push::new(Kind::Pong(Pong { ts: 1 })));
    assert_eq!(hub.deliver(&Target::Room("storm-room-17".into()), &push), 0);
    assert!(!hub.is_local(&user));
}
