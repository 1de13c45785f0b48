//! PARLEY PATCH: TLS 1.3 traffic keys given back while a connection is idle.
//!
//! An expanded AEAD key is the largest thing an idle TLS connection keeps (aws-lc-rs:
//! 48 + 592 bytes per direction, the AES key schedule and the GHASH table). With this
//! turned on ([`release_after`]), a TLS 1.3 connection also keeps the key's bytes (a
//! 32-byte key and a 12-byte IV per direction, in one small box), and gives the expanded
//! keys back once it has been quiet: when its writes are all out or a read finds nothing,
//! a key not used for `release_after` ticks, or one whose last use came after such a gap
//! (a heartbeat on an otherwise idle connection), is dropped. The next record that needs
//! it expands it again from the kept bytes (an AES key schedule and a GHASH table, about a
//! microsecond). Sequence numbers live in the record layer and are untouched, so the
//! records on the wire are the ones rustls would have sent.
//!
//! The clock is coarse and driven by the application ([`tick`], once a second in parley),
//! so a record costs a relaxed atomic load, not a clock read. Off (the default, and
//! whenever the application never calls [`release_after`]) nothing changes: no box, no
//! check. TLS 1.2 keys are never given back.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

static NOW: AtomicU32 = AtomicU32::new(0);
static AFTER: AtomicU32 = AtomicU32::new(0);
static RELEASED: AtomicU64 = AtomicU64::new(0);
static EXPANDED: AtomicU64 = AtomicU64::new(0);

/// Give a TLS 1.3 connection's expanded traffic keys back once they have not been used for
/// `ticks` ticks of [`tick`]; 0 (the default) keeps them for the connection's life. Takes
/// effect for keys installed after the call.
pub fn release_after(ticks: u32) {
    AFTER.store(ticks, Ordering::Relaxed);
}

/// Advance the idle clock by one tick.
pub fn tick() {
    NOW.fetch_add(1, Ordering::Relaxed);
}

/// How many expanded keys were given back since the process started.
pub fn released() -> u64 {
    RELEASED.load(Ordering::Relaxed)
}

/// How many given-back keys were expanded again since the process started: `released()`
/// less this is how many are away now.
pub fn expanded_again() -> u64 {
    EXPANDED.load(Ordering::Relaxed)
}

pub(crate) fn now() -> u32 {
    NOW.load(Ordering::Relaxed)
}

pub(crate) fn after() -> u32 {
    AFTER.load(Ordering::Relaxed)
}

pub(crate) fn count_release() {
    RELEASED.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn count_expansion() {
    EXPANDED.fetch_add(1, Ordering::Relaxed);
}
