//! The outbox's wait (`Outbox::next`, a hand-written future): a wait dropped before it
//! resolves loses nothing (the transports drop it in every `select!`), the idle timer
//! fires once per interval, and shutdown ends a wait with a close. Here and not in
//! src/session/outbox.rs because it needs a whole core, which only the server layer
//! assembles (tests/layers.rs).

mod common;

use std::{sync::Arc, time::Duration};

use common::test_config;
use futures_util::FutureExt;
use parley::{
    codec::Push,
    delivery::Recipient,
    proto::{Pong, server_frame::Kind},
    server::build_core,
    session::{
        Session,
        conn::{CloseReason, Conn},
        outbox::{Out, Outbox, OutboxConfig},
    },
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

fn push() -> Arc<Push> {
    Arc::new(Push::new(Kind::Pong(Pong { ts: 1 })))
}

/// An outbox bound to an attached session, as `/ws` has it after `connect`.
fn outbox(config: OutboxConfig) -> (Outbox, Arc<Session>, CancellationToken) {
    let core = build_core(test_config()).expect("core builds");
    let session = core.sessions.create("u").expect("no session limit");
    let attachment = session.attach().expect("a fresh session attaches");
    let conn = Conn::bound(core, session.clone(), Some(attachment));
    let shutdown = CancellationToken::new();
    (
        Outbox::new(conn, config, shutdown.clone()),
        session,
        shutdown,
    )
}

fn pushes(out: Option<Out>) -> usize {
    match out {
        Some(Out::Pushes(p)) => p.len(),
        Some(_) => panic!("not pushes"),
        None => panic!("nothing"),
    }
}

/// `next` is cancel-safe: a wait dropped after a push woke it loses neither the push
/// nor its wake-up (the session wakes a transport once per batch, so a lost wake-up
/// would leave the pushes unsent until the next heartbeat).
#[tokio::test]
async fn a_dropped_wait_loses_no_wake_up() {
    let (mut outbox, session, _shutdown) = outbox(OutboxConfig::default());
    // Nothing to send: it waits.
    assert!(outbox.next().now_or_never().is_none());
    {
        let mut next = std::pin::pin!(outbox.next());
        assert!(next.as_mut().now_or_never().is_none());
        session.push(&push());
        // Dropped woken, before it is polled again.
    }
    // The dropped wait left the outbox as it was: the next `next` finds the push.
    assert_eq!(pushes(outbox.next().now_or_never()), 1);
    assert!(outbox.next().now_or_never().is_none());
    // And again, pushes that come while nothing waits.
    session.push(&push());
    session.push(&push());
    assert_eq!(pushes(outbox.next().now_or_never()), 2);
}

/// The idle timer ends a wait with `Out::Idle`, once per interval, also while the
/// connection is woken for pushes.
#[tokio::test(start_paused = true)]
async fn idle_comes_each_interval() {
    let (mut outbox, session, _shutdown) = outbox(OutboxConfig {
        idle: Some(Duration::from_secs(10)),
        ..Default::default()
    });
    let start = Instant::now();
    assert!(matches!(outbox.next().await, Out::Idle));
    assert_eq!(start.elapsed(), Duration::from_secs(10));
    session.push(&push());
    assert_eq!(pushes(Some(outbox.next().await)), 1);
    assert!(matches!(outbox.next().await, Out::Idle));
    assert_eq!(start.elapsed(), Duration::from_secs(20));
}

/// Shutdown closes a waiting connection, and nothing follows the close.
#[tokio::test]
async fn shutdown_ends_a_wait_with_a_close() {
    let (mut outbox, _session, shutdown) = outbox(OutboxConfig::default());
    let mut next = Box::pin(outbox.next());
    assert!(next.as_mut().now_or_never().is_none());
    drop(next);
    shutdown.cancel();
    assert!(matches!(
        outbox.next().await,
        Out::Close(CloseReason::ShuttingDown)
    ));
    assert!(outbox.next().now_or_never().is_none());
}
