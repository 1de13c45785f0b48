//! parley: a chat (IM) backend. See `../shared/DESIGN.md` for the architecture. The
//! layers, top to bottom; a module only imports modules of its own layer or below
//! (`tests/layers.rs` checks this):
//!
//! 1. `server` — wiring, router, accept loop (only the binary and tests use it);
//! 2. `transport` — `/ws`, `/sse`, `/poll`, the HTTP command endpoint and API: bytes in,
//!    frames to the session layer, the session's one outbox framed and written out;
//! 3. `session` — the one connect path, sessions, positions, resume, the outbox;
//! 4. `chat` — the domain: rooms, messages, typing, presence, ordering;
//! 5. `files` — attachments: uploads streamed to a blob store, who may read them;
//! 6. `store`, `broker` — the durable log and fan-out between instances;
//! 7. `delivery` — targets, recipients and the local hub that `chat` and `broker` share;
//! 8. `auth`, `codec`, `config`, `deflate`, `metrics`, `proto`, `ratelimit` — foundations.

pub mod auth;
pub mod broker;
pub mod chat;
pub mod codec;
pub mod config;
pub mod deflate;
pub mod delivery;
pub mod files;
pub mod metrics;
pub mod proto;
pub mod ratelimit;
pub mod server;
pub mod session;
pub mod store;
pub mod transport;
pub mod web;

/// Narrow copies of configured figures that every connection or session keeps (4 B each,
/// not a `usize`'s 8 or a `Duration`'s 16), saturating: a figure past `u32::MAX` reads as
/// `u32::MAX`.
pub mod compact {
    use std::time::Duration;

    pub fn saturating_u32(n: usize) -> u32 {
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// `d` in whole milliseconds (`u32::MAX` is ~49.7 days).
    pub fn saturating_ms(d: Duration) -> u32 {
        u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn figures_past_u32_saturate() {
            assert_eq!(saturating_u32(7), 7);
            assert_eq!(saturating_u32(usize::MAX), u32::MAX);
            assert_eq!(saturating_ms(Duration::from_micros(2_999)), 2);
            assert_eq!(saturating_ms(Duration::from_secs(u64::MAX)), u32::MAX);
        }
    }
}

#[cfg(all(feature = "mimalloc", feature = "jemalloc"))]
compile_error!(
    "features `mimalloc` and `jemalloc` each pick the global allocator: enable one \
     (`--no-default-features --features mimalloc` for mimalloc)"
);

/// The build's global allocator, declared by [`build_allocator!`] in the `parley` binary
/// and in the benchmarks: jemalloc by default (feature `jemalloc`), mimalloc with
/// `--no-default-features --features mimalloc`, the C library's malloc with
/// `--no-default-features`. Not declared by the library itself, so that its tests keep
/// the system allocator (tests/hub_allocs.rs counts allocations with its own).
#[doc(hidden)]
pub mod allocator {
    #[cfg(jemalloc)]
    pub use tikv_jemallocator::Jemalloc;

    #[cfg(feature = "mimalloc")]
    pub use mimalloc::MiMalloc;

    /// jemalloc's options unless `_RJEM_MALLOC_CONF` (read after these) says otherwise:
    /// a background thread gives freed pages back within a second of going unused
    /// (jemalloc otherwise purges only when the arena is next used, ~10 s on, so after a
    /// burst an idle server kept ~20 MiB more than glibc with parley's trim). With these,
    /// 5,000 idle joined sessions held 3.1 KB each on WebSocket and on SSE over HTTP/1.1
    /// (glibc: 3.7 and 4.7-4.8 KB), and a burst's memory fell back as with glibc, at the
    /// same CPU (docs/BENCHMARKS.md, "Round fourteen: jemalloc again").
    #[cfg(jemalloc)]
    pub const JEMALLOC_OPTIONS: &std::ffi::CStr =
        c"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0";

    /// A C `const char *` (what jemalloc's `malloc_conf` is), pointing at a static
    /// string.
    #[cfg(jemalloc)]
    #[repr(transparent)]
    pub struct JemallocConf(pub *const std::ffi::c_char);

    // SAFETY: it points at a `'static` string that nothing writes.
    #[cfg(jemalloc)]
    unsafe impl Sync for JemallocConf {}
}

/// Declares the build's global allocator (see [`allocator`]) in the crate that invokes
/// it: the `parley` binary and each benchmark. The cfgs it tests (`jemalloc`, set by
/// build.rs, and feature `mimalloc`) are the invoking crate's, which are parley's own:
/// they are targets of the same package.
#[doc(hidden)]
#[macro_export]
macro_rules! build_allocator {
    () => {
        #[cfg(jemalloc)]
        #[global_allocator]
        static GLOBAL: $crate::allocator::Jemalloc = $crate::allocator::Jemalloc;

        /// jemalloc reads its options from this symbol at its start.
        #[cfg(jemalloc)]
        #[unsafe(export_name = "_rjem_malloc_conf")]
        pub static JEMALLOC_CONF: $crate::allocator::JemallocConf =
            $crate::allocator::JemallocConf($crate::allocator::JEMALLOC_OPTIONS.as_ptr());

        #[cfg(feature = "mimalloc")]
        #[global_allocator]
        static GLOBAL: $crate::allocator::MiMalloc = $crate::allocator::MiMalloc;
    };
}
