//! Instruction counts of the local fan-out index under churn (gungraun: valgrind's
//! callgrind driven from `cargo bench --bench hub`; needs `valgrind` and the
//! `gungraun-runner` binary of the same version as the `gungraun` crate, see
//! docs/BENCHMARKS.md).
//!
//! - `hub::churn`: in a room of N members whose snapshot is built (a message was just
//!   delivered), one member leaves, another joins, and one push is delivered to the room.
//!   What this costs beyond the delivery itself is what a membership change costs a big
//!   room while messages flow. Recipients only count the pushes they get, so the
//!   delivery's own per-recipient cost is the same in every variant: compare
//!   `churn` with `steady` (the same delivery with no membership change) at the same N.
//!
//! - `hub::handshake`: a session attaches, joins the room, gets one message and
//!   detaches: the hub's share of a connect + join + close (issue 24's storms).
//!
//! Setup (attaching N sessions and joining them) is not counted.

use std::{
    hint::black_box,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use gungraun::{library_benchmark, library_benchmark_group, main};
use parley::{
    codec::Push,
    delivery::{Hub, Recipient, Target},
    proto::{Pong, server_frame::Kind},
};

// The binary's allocator (jemalloc by default), so that counts here match the server's.
parley::build_allocator!();

const ROOM: &str = "big";

struct Member {
    id: u64,
    user: String,
    got: AtomicUsize,
}

impl Recipient for Member {
    fn recipient_id(&self) -> u64 {
        self.id
    }
    fn user(&self) -> &str {
        &self.user
    }
    fn push(&self, _: &Arc<Push>) {
        self.got.fetch_add(1, Ordering::Relaxed);
    }
}

struct Bench {
    hub: Hub,
    push: Arc<Push>,
    target: Target,
    n: usize,
    /// A member in the middle of the room, and the attached non-member.
    leaver: String,
    joiner: String,
}

/// A room of `n` attached members (user `u{i}`), plus one attached non-member `u{n}`,
/// with the room's snapshot built by a first delivery.
fn setup(n: usize) -> Bench {
    let hub = Hub::new();
    for i in 0..=n {
        let user = format!("u{i}");
        hub.attach(Arc::new(Member {
            id: i as u64,
            user: user.clone(),
            got: AtomicUsize::new(0),
        }));
        if i < n {
            hub.joined(&user, ROOM, None);
        }
    }
    let push = Arc::new(Push::new(Kind::Pong(Pong { ts: 1 })));
    let target = Target::Room(ROOM.into());
    assert_eq!(hub.deliver(&target, &push), n);
    Bench {
        hub,
        push,
        target,
        n,
        leaver: format!("u{}", n / 2),
        joiner: format!("u{n}"),
    }
}

#[library_benchmark]
#[bench::n1000(args = (1000), setup = setup)]
#[bench::n19000(args = (19_000), setup = setup)]
fn churn(b: Bench) -> usize {
    // A member in the middle leaves, the outsider joins, a message goes out.
    b.hub.left(&b.leaver, ROOM);
    b.hub.joined(&b.joiner, ROOM, None);
    let got = b.hub.deliver(&b.target, &b.push);
    assert_eq!(got, b.n);
    std::mem::forget(b);
    black_box(got)
}

#[library_benchmark]
#[bench::n1000(args = (1000), setup = setup)]
#[bench::n19000(args = (19_000), setup = setup)]
fn steady(b: Bench) -> usize {
    let got = b.hub.deliver(&b.target, &b.push);
    assert_eq!(got, b.n);
    std::mem::forget(b);
    black_box(got)
}

// What one connect + join + close costs the hub (a connect storm's share): a session
// of a new user attaches, the user joins the big room, a message reaches the room, the
// session detaches (the user's last: it leaves every room here).
#[library_benchmark]
#[bench::n1000(args = (1000), setup = setup)]
fn handshake(b: Bench) -> usize {
    let id = 1 << 40;
    let first = b.hub.attach(Arc::new(Member {
        id,
        user: "storm".into(),
        got: AtomicUsize::new(0),
    }));
    assert!(first);
    b.hub.joined("storm", ROOM, Some(1));
    let got = b.hub.deliver(&b.target, &b.push);
    assert_eq!(got, b.n + 1);
    let rooms = b.hub.detach("storm", id).expect("the user's last session");
    assert_eq!(rooms.len(), 1);
    assert_eq!(rooms.get(ROOM), Some(&Some(1)));
    std::mem::forget(b);
    black_box(got)
}

library_benchmark_group!(name = hub, benchmarks = [churn, steady, handshake]);

main!(library_benchmark_groups = hub);
