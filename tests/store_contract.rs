//! The store contract: what every [`Store`] backend promises chat, written once and run
//! on each — SQLite on a file, SQLite in memory, PostgreSQL (`PARLEY_TEST_PG_URL`;
//! `scripts/test` starts a private cluster). A new backend adds one line to
//! `on_every_backend!` and passes the same properties.
//!
//! Also here: the two schemas checked against each other (tables, columns with their
//! types mapped, nullability, defaults, primary keys, indexes), and `/readyz` failing when
//! the SQLite writer thread dies.
//!
//! Backend-specific behaviour has its own tests: several PostgreSQL instances on one
//! database, migrations, a lost server (`tests/postgres.rs`); SQLite's point reads and
//! schema versions (`src/store/sqlite.rs`).

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use common::{pg::TestDb, store_message as msg, *};
use parley::{
    config::{StoreBackend, StoreConfig, Synchronous},
    proto::Message,
    server::Server,
    store::{
        self, FileRecord, Inserted, NewRoom, Page, Range, ReadMarker, RoomMeta, Store, StoreError,
        sqlite::SqliteStore,
    },
};

/// Where a backend keeps its data; [`Place::open`] opens a store on it (again and again:
/// a reopen, or another instance).
enum Place {
    SqliteFile(PathBuf),
    SqliteMemory,
    Postgres(TestDb),
}

impl Place {
    fn sqlite_file() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "parley-contract-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        Place::SqliteFile(dir)
    }

    async fn postgres() -> Self {
        Place::Postgres(TestDb::create().await)
    }

    fn config(&self) -> StoreConfig {
        match self {
            Place::SqliteFile(dir) => StoreConfig {
                path: dir.join("parley.db").to_str().unwrap().into(),
                synchronous: Synchronous::Normal,
                ..Default::default()
            },
            Place::SqliteMemory => StoreConfig {
                path: ":memory:".into(),
                ..Default::default()
            },
            Place::Postgres(db) => StoreConfig {
                backend: StoreBackend::Postgres,
                postgres_url: db.url.clone(),
                postgres_pool_size: 4,
                postgres_writers: 2,
                ..Default::default()
            },
        }
    }

    /// A store on this place, through the same door the server uses.
    async fn open(&self) -> Arc<dyn Store> {
        store::open(&self.config()).await.expect("store opens")
    }

    /// Whether a store opened again sees what an earlier one wrote.
    fn durable(&self) -> bool {
        !matches!(self, Place::SqliteMemory)
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if let Place::SqliteFile(dir) = self {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// One test per property per backend: `sqlite_file::history_pages_in_both_directions`, …
macro_rules! on_every_backend {
    ($($property:ident),* $(,)?) => {
        mod sqlite_file {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $property() {
                    super::$property(&super::Place::sqlite_file()).await
                }
            )*
        }
        mod sqlite_memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $property() {
                    super::$property(&super::Place::SqliteMemory).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $property() {
                    super::$property(&super::Place::postgres().await).await
                }
            )*
        }
    };
}

on_every_backend!(
    appends_get_gap_free_seqs_in_call_order,
    a_resend_returns_the_original,
    history_pages_in_both_directions,
    rooms_and_membership,
    a_room_and_its_membership_in_one_read,
    the_room_browser_pages_public_rooms_by_name,
    read_markers_move_forward_only_and_count_unread,
    the_room_cap_holds,
    the_file_index_keeps_quota_and_readers,
    reopening_keeps_everything,
);

fn seqs(p: &Page) -> Vec<u64> {
    p.messages.iter().map(|m| m.seq).collect()
}

/// A room's whole log, page by page.
async fn log(s: &dyn Store, room: &str) -> Vec<Arc<Message>> {
    let mut out: Vec<Arc<Message>> = Vec::new();
    loop {
        let after = out.last().map_or(0, |m| m.seq);
        let page = s.history(room, Range::After(after), 7).await.unwrap();
        out.extend(page.messages);
        if !page.more {
            return out;
        }
    }
}

/// Appends called one after another get increasing seqs with no gap, even while they
/// are all in flight together; an append to a room that does not exist is refused.
async fn appends_get_gap_free_seqs_in_call_order(place: &Place) {
    let s = place.open().await;
    assert!(matches!(
        s.append(msg("nope", "u", "x")).await,
        Err(StoreError::NoSuchRoom(room)) if room == "nope"
    ));
    s.join("r", "u", 0).await.unwrap();
    let futures: Vec<_> = (0..300)
        .map(|i| s.append(msg("r", "u", &i.to_string())))
        .collect();
    let results = futures_util::future::join_all(futures).await;
    for (i, r) in results.into_iter().enumerate() {
        let a = r.unwrap();
        assert_eq!(a.message.seq, i as u64 + 1);
        assert!(!a.duplicate);
        assert_eq!(a.message.client_msg_id, i.to_string());
    }
    let all = log(&*s, "r").await;
    assert_eq!(
        all.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=300).collect::<Vec<_>>()
    );
    assert_eq!(all[41].body, "body of 41");
    assert_eq!(all[41].ts, 1_700_000_000_000);
    assert_eq!(s.room("r").await.unwrap().unwrap().last_seq, 300);
}

/// (room, sender, client_msg_id) is appended once: a resend — in the same batch or
/// later — gets the original back, metadata and all; another sender's same id is another
/// message.
async fn a_resend_returns_the_original(place: &Place) {
    let s = place.open().await;
    s.join("r", "u", 0).await.unwrap();
    s.join("r", "v", 0).await.unwrap();
    let (a, b) = tokio::join!(
        s.append(msg("r", "u", "dup")),
        s.append(msg("r", "u", "dup"))
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!((a.message.seq, b.message.seq), (1, 1));
    assert!(!a.duplicate && b.duplicate);
    let mut again = msg("r", "u", "dup");
    again.body = "a different body".into();
    again.metadata.clear();
    let again = s.append(again).await.unwrap();
    assert!(again.duplicate);
    assert_eq!(
        again.message.body, "body of dup",
        "the original, not the resend"
    );
    assert_eq!(
        again.message.metadata.get("k").map(String::as_str),
        Some("dup")
    );
    let other = s.append(msg("r", "v", "dup")).await.unwrap();
    assert!(!other.duplicate);
    assert_eq!(other.message.seq, 2);
    assert_eq!(log(&*s, "r").await.len(), 2);
}

/// Pages of at most `limit`, oldest first, in both directions, with `more` telling
/// whether the log goes on; bounds past the end are empty pages, never a wrap.
async fn history_pages_in_both_directions(place: &Place) {
    let s = place.open().await;
    s.join("r", "u", 0).await.unwrap();
    for i in 0..10 {
        s.append(msg("r", "u", &i.to_string())).await.unwrap();
    }
    let p = s.history("r", Range::After(3), 4).await.unwrap();
    assert_eq!((seqs(&p), p.more), (vec![4, 5, 6, 7], true));
    let p = s.history("r", Range::After(6), 4).await.unwrap();
    assert_eq!((seqs(&p), p.more), (vec![7, 8, 9, 10], false));
    let p = s.history("r", Range::After(8), 4).await.unwrap();
    assert_eq!((seqs(&p), p.more), (vec![9, 10], false));
    let p = s.history("r", Range::After(u64::MAX), 4).await.unwrap();
    assert_eq!((seqs(&p), p.more), (vec![], false));
    let p = s.history("r", Range::Before(u64::MAX), 3).await.unwrap();
    assert_eq!((seqs(&p), p.more), (vec![8, 9, 10], true));
    let p = s.history("r", Range::Before(4), 3).await.unwrap();
    assert_eq!((seqs(&p), p.more), (vec![1, 2, 3], false));
    let p = s.history("r", Range::Before(3), 5).await.unwrap();
    assert_eq!((seqs(&p), p.more), (vec![1, 2], false));
    assert_eq!(
        p.messages[0].metadata.get("k").map(String::as_str),
        Some("0")
    );
    let p = s.history("r", Range::After(0), 0).await.unwrap();
    assert_eq!((seqs(&p), p.more), (vec![], true));
    let p = s
        .history("empty", Range::Before(u64::MAX), 5)
        .await
        .unwrap();
    assert_eq!((seqs(&p), p.more), (vec![], false));
}

/// Creating, joining, leaving; member lists in byte order; counts; direct-message rooms;
/// the room list with unread counts and DM peers.
async fn rooms_and_membership(place: &Place) {
    let s = place.open().await;
    assert!(s.room("r").await.unwrap().is_none());
    assert!(s.create_room(NewRoom::public("r", "u"), 0).await.unwrap());
    assert!(
        !s.create_room(NewRoom::private("r", "v"), 0).await.unwrap(),
        "taken"
    );
    assert!(!s.is_member("r", "v").await.unwrap());
    assert!(s.create_room(NewRoom::private("p", "v"), 0).await.unwrap());
    assert_eq!(
        s.room("p").await.unwrap(),
        Some(RoomMeta {
            private: true,
            last_seq: 0,
            members: 1
        })
    );
    // Joining a room that does not exist makes a public one.
    let joined = s.join("new", "u", 0).await.unwrap();
    assert_eq!((joined.private, joined.members), (false, 1));
    s.join("r", "b", 0).await.unwrap();
    s.join("r", "B", 0).await.unwrap();
    let again = s.join("r", "B", 0).await.unwrap();
    assert_eq!(again.members, 3, "a second join counts once");
    assert_eq!(s.members("r").await.unwrap(), ["B", "b", "u"], "byte order");
    assert!(s.share_a_room("b", "u").await.unwrap());
    assert!(!s.share_a_room("b", "v").await.unwrap());

    s.ensure_dm("dm:b:u", "b", "u", 0).await.unwrap();
    s.ensure_dm("dm:b:u", "b", "u", 0).await.unwrap();
    assert_eq!(s.members("dm:b:u").await.unwrap(), ["b", "u"]);
    s.append(msg("r", "u", "1")).await.unwrap();
    s.append(msg("r", "b", "2")).await.unwrap();
    let rooms = s.rooms_of("u").await.unwrap();
    let names: Vec<_> = rooms.iter().map(|r| r.room.as_str()).collect();
    assert_eq!(names, ["dm:b:u", "new", "r"]);
    assert_eq!((rooms[0].dm_peer.as_str(), rooms[0].private), ("b", true));
    assert_eq!(rooms[2].dm_peer, "");
    assert_eq!(
        (
            rooms[2].last_seq,
            rooms[2].read_seq,
            rooms[2].unread,
            rooms[2].members
        ),
        (2, 1, 1, 3),
        "the sender's marker moved to its own message"
    );
    assert!(s.rooms_of("nobody").await.unwrap().is_empty());

    assert!(s.leave("r", "b").await.unwrap());
    assert!(!s.leave("r", "b").await.unwrap());
    assert!(!s.leave("nowhere", "b").await.unwrap());
    assert!(!s.is_member("r", "b").await.unwrap());
    assert!(s.is_member("r", "u").await.unwrap());
    assert_eq!(s.room("r").await.unwrap().unwrap().members, 2);
    assert_eq!(s.members("r").await.unwrap(), ["B", "u"]);
}

/// `room_for` (what a join reads) agrees with `room` and `is_member` together: no room,
/// a room the user is not in, one it is in, one it left, a private one; other users'
/// memberships and other rooms do not leak into the answer.
async fn a_room_and_its_membership_in_one_read(place: &Place) {
    let s = place.open().await;
    assert_eq!(s.room_for("r", "u").await.unwrap(), None);
    s.join("r", "v", 0).await.unwrap();
    s.join("other", "u", 0).await.unwrap();
    let r = |members| RoomMeta {
        private: false,
        last_seq: 0,
        members,
    };
    assert_eq!(s.room_for("r", "u").await.unwrap(), Some((r(1), false)));
    assert_eq!(s.room_for("r", "v").await.unwrap(), Some((r(1), true)));
    s.join("r", "u", 0).await.unwrap();
    s.append(msg("r", "u", "1")).await.unwrap();
    let now = RoomMeta {
        last_seq: 1,
        ..r(2)
    };
    assert_eq!(s.room_for("r", "u").await.unwrap(), Some((now, true)));
    assert!(s.leave("r", "u").await.unwrap());
    let left = RoomMeta { members: 1, ..now };
    assert_eq!(s.room_for("r", "u").await.unwrap(), Some((left, false)));
    assert!(s.create_room(NewRoom::private("p", "v"), 0).await.unwrap());
    let p = RoomMeta {
        private: true,
        ..r(1)
    };
    assert_eq!(s.room_for("p", "v").await.unwrap(), Some((p, true)));
    assert_eq!(s.room_for("p", "u").await.unwrap(), Some((p, false)));
    for (room, user) in [("r", "u"), ("r", "v"), ("p", "u"), ("p", "v"), ("x", "u")] {
        let both = s.room(room).await.unwrap().map(|m| (m, false));
        let member = s.is_member(room, user).await.unwrap();
        let want = both.map(|(m, _)| (m, member));
        assert_eq!(s.room_for(room, user).await.unwrap(), want, "{room} {user}");
    }
}

/// The room browser lists public rooms only (no private room, no direct messages), in
/// byte order, with last seq and member count, a page at a time after a cursor; every
/// public room is listed exactly once across the pages.
async fn the_room_browser_pages_public_rooms_by_name(place: &Place) {
    let s = place.open().await;
    assert!(s.public_rooms("", 10).await.unwrap().is_empty());
    // Upper case sorts before lower case in byte order; "b.2" before "b2" and "b_".
    let public = ["Zeta", "a", "b.2", "b2", "b_", "c", "lobby"];
    for (i, room) in public.iter().enumerate() {
        assert!(s.create_room(NewRoom::public(room, "u"), 0).await.unwrap());
        for j in 0..i {
            s.join(room, &format!("m{j}"), 0).await.unwrap();
        }
    }
    s.create_room(NewRoom::private("b1-secret", "u"), 0)
        .await
        .unwrap();
    s.ensure_dm("dm:u:v", "u", "v", 0).await.unwrap();
    s.append(msg("lobby", "u", "1")).await.unwrap();
    s.append(msg("lobby", "m0", "2")).await.unwrap();

    let all = s.public_rooms("", 100).await.unwrap();
    let names: Vec<_> = all.iter().map(|r| r.room.as_str()).collect();
    assert_eq!(names, public, "public only, byte order");
    for (i, r) in all.iter().enumerate() {
        assert_eq!(
            (r.members, r.private, r.dm_peer.as_str()),
            (1 + i as u64, false, "")
        );
        assert_eq!((r.read_seq, r.unread), (0, 0), "no read marker: {}", r.room);
    }
    assert_eq!(all[6].last_seq, 2);
    assert_eq!(all[0].last_seq, 0);

    // Pages of 3 after the last name of the previous page: each room once.
    let mut paged: Vec<String> = Vec::new();
    loop {
        let after = paged.last().cloned().unwrap_or_default();
        let page = s.public_rooms(&after, 3).await.unwrap();
        assert!(page.len() <= 3);
        if page.is_empty() {
            break;
        }
        paged.extend(page.into_iter().map(|r| r.room));
    }
    assert_eq!(paged, public);
    // A cursor that is no room's name starts after where it would sort.
    let names =
        |v: Vec<parley::proto::RoomState>| v.into_iter().map(|r| r.room).collect::<Vec<_>>();
    assert_eq!(names(s.public_rooms("b", 2).await.unwrap()), ["b.2", "b2"]);
    assert_eq!(
        names(s.public_rooms("b1", 10).await.unwrap()),
        ["b2", "b_", "c", "lobby"]
    );
    assert!(s.public_rooms("lobby", 10).await.unwrap().is_empty());

    // Leaving updates the count; a room that turns up later is listed.
    assert!(s.leave("lobby", "m0").await.unwrap());
    s.join("new", "x", 0).await.unwrap();
    let after_c = s.public_rooms("c", 10).await.unwrap();
    assert_eq!(names(after_c.clone()), ["lobby", "new"]);
    assert_eq!((after_c[0].members, after_c[1].members), (6, 1));
}

/// A read marker only moves forward, is capped at the room's last seq, says whether it
/// moved, and is `None` for a non-member.
async fn read_markers_move_forward_only_and_count_unread(place: &Place) {
    let s = place.open().await;
    s.join("r", "u", 0).await.unwrap();
    s.join("r", "b", 0).await.unwrap();
    for i in 0..11 {
        s.append(msg("r", "u", &i.to_string())).await.unwrap();
    }
    let marker = |seq, unread, moved| Some(ReadMarker { seq, unread, moved });
    assert_eq!(s.set_read("r", "b", 4).await.unwrap(), marker(4, 7, true));
    assert_eq!(
        s.set_read("r", "b", 2).await.unwrap(),
        marker(4, 7, false),
        "never back"
    );
    assert_eq!(
        s.set_read("r", "b", 99).await.unwrap(),
        marker(11, 0, true),
        "capped"
    );
    assert_eq!(
        s.set_read("r", "b", u64::MAX).await.unwrap(),
        marker(11, 0, false),
        "a marker at the end does not move"
    );
    assert_eq!(s.set_read("r", "nobody", 1).await.unwrap(), None);
    assert_eq!(s.set_read("nowhere", "b", 1).await.unwrap(), None);
    assert_eq!(
        s.set_read("r", "u", 3).await.unwrap(),
        marker(11, 0, false),
        "the sender read its own messages"
    );
    s.append(msg("r", "u", "more")).await.unwrap();
    let b = s.rooms_of("b").await.unwrap();
    assert_eq!((b[0].read_seq, b[0].unread), (11, 1));
}

/// `max_rooms`: joins, creations and DMs past the cap are refused whole; a room the user
/// is in may be joined again; 0 is no cap.
async fn the_room_cap_holds(place: &Place) {
    let s = place.open().await;
    for i in 0..3 {
        s.join(&format!("r{i}"), "u", 3).await.unwrap();
    }
    let refused = s.join("r3", "u", 3).await.unwrap_err();
    assert!(
        matches!(&refused, StoreError::TooManyRooms { user, max: 3 } if user == "u"),
        "{refused:?}"
    );
    assert!(!s.is_member("r3", "u").await.unwrap());
    s.join("r1", "u", 3).await.unwrap();
    assert!(matches!(
        s.create_room(NewRoom::public("mine", "u"), 3).await,
        Err(StoreError::TooManyRooms { .. })
    ));
    assert!(s.room("mine").await.unwrap().is_none(), "nothing half-made");
    assert!(matches!(
        s.ensure_dm("dm:u:v", "u", "v", 3).await,
        Err(StoreError::TooManyRooms { .. })
    ));
    assert!(
        s.room("dm:u:v").await.unwrap().is_none(),
        "nothing half-made"
    );
    assert_eq!(s.rooms_of("u").await.unwrap().len(), 3);
    // Another user is not affected, and 0 is no cap.
    s.ensure_dm("dm:v:w", "v", "w", 3).await.unwrap();
    s.join("r3", "u", 0).await.unwrap();
    assert_eq!(s.rooms_of("u").await.unwrap().len(), 4);
}

fn file(id: &str, size: u64) -> FileRecord {
    FileRecord {
        id: id.into(),
        owner: "u".into(),
        name: "a.png".into(),
        content_type: "image/png".into(),
        size,
        sha256: "00".into(),
        width: 3,
        height: u32::MAX,
        blurhash: "L".into(),
        created_at: 5,
    }
}

/// Uploads within the owner's quota; readers are the owner and the members of a room
/// the file was posted to; unattached files are orphans; deleting an attached file only
/// when asked to.
async fn the_file_index_keeps_quota_and_readers(place: &Place) {
    let s = place.open().await;
    assert_eq!(
        s.insert_file(file("f1", 60), 100).await.unwrap(),
        Inserted::Ok
    );
    assert_eq!(
        s.insert_file(file("f2", 60), 100).await.unwrap(),
        Inserted::OverQuota
    );
    assert!(s.file("f2").await.unwrap().is_none());
    assert_eq!(
        s.insert_file(file("f3", 40), 100).await.unwrap(),
        Inserted::Ok
    );
    assert_eq!(s.bytes_of("u").await.unwrap(), 100);
    assert_eq!(s.bytes_of("v").await.unwrap(), 0);
    assert_eq!(s.file("f1").await.unwrap(), Some(file("f1", 60)));
    assert!(s.may_read("f1", "u").await.unwrap());
    assert!(!s.may_read("f1", "v").await.unwrap());
    assert!(!s.may_read("nothing", "u").await.unwrap());

    s.create_room(NewRoom::private("p", "v"), 0).await.unwrap();
    s.join("p", "u", 0).await.unwrap();
    let mut with = msg("p", "u", "att");
    with.attachments = vec![file("f1", 60).attachment("renamed.png")];
    let sent = s.append(with).await.unwrap();
    assert_eq!(sent.message.attachments[0].name, "renamed.png");
    assert!(s.may_read("f1", "v").await.unwrap(), "a member of the room");
    assert!(!s.may_read("f1", "w").await.unwrap());
    // Attaching someone else's file links nothing.
    let mut theirs = msg("p", "v", "steal");
    theirs.attachments = vec![file("f3", 40).attachment("")];
    s.append(theirs).await.unwrap();
    let mut orphans = s.orphans(10, 10).await.unwrap();
    orphans.sort();
    assert_eq!(orphans, ["f3"]);
    assert!(s.orphans(5, 10).await.unwrap().is_empty(), "created at 5");
    assert!(!s.delete_file("f1", true).await.unwrap(), "attached: kept");
    assert!(s.delete_file("f3", true).await.unwrap());
    assert!(!s.delete_file("f3", false).await.unwrap(), "gone already");
    assert!(s.delete_file("f1", false).await.unwrap());
    assert!(!s.may_read("f1", "v").await.unwrap());
    assert_eq!(s.bytes_of("u").await.unwrap(), 0);
    let h = s.history("p", Range::After(0), 10).await.unwrap();
    assert_eq!(
        h.messages[0].attachments[0].file_id, "f1",
        "the message keeps it"
    );
    assert_eq!(h.messages[0].attachments[0].height, u32::MAX);
}

/// A store opened again on the same place sees everything (durable backends); a private
/// in-memory database starts empty.
async fn reopening_keeps_everything(place: &Place) {
    {
        let s = place.open().await;
        assert!(s.create_room(NewRoom::private("r", "u"), 0).await.unwrap());
        s.join("r", "v", 0).await.unwrap();
        s.append(msg("r", "u", "a")).await.unwrap();
        s.append(msg("r", "v", "b")).await.unwrap();
        s.insert_file(file("f", 1), 10).await.unwrap();
    }
    let s = place.open().await;
    if !place.durable() {
        assert!(s.room("r").await.unwrap().is_none());
        return;
    }
    assert_eq!(
        s.room("r").await.unwrap(),
        Some(RoomMeta {
            private: true,
            last_seq: 2,
            members: 2
        })
    );
    assert_eq!(s.members("r").await.unwrap(), ["u", "v"]);
    let u = s.rooms_of("u").await.unwrap();
    assert_eq!((u[0].read_seq, u[0].unread, u[0].private), (1, 1, true));
    let all = log(&*s, "r").await;
    assert_eq!(
        all.iter().map(|m| m.body.as_str()).collect::<Vec<_>>(),
        ["body of a", "body of b"]
    );
    assert!(s.append(msg("r", "u", "a")).await.unwrap().duplicate);
    assert_eq!(s.append(msg("r", "u", "c")).await.unwrap().message.seq, 3);
    assert_eq!(s.file("f").await.unwrap(), Some(file("f", 1)));
}

/// A column as both schemas describe it, in SQLite's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Column {
    /// SQLite's declared type; PostgreSQL's mapped onto it (bigint, integer and boolean
    /// are INTEGER; text is TEXT).
    kind: String,
    not_null: bool,
    default: Option<String>,
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Schema {
    /// (table, column) → column.
    columns: BTreeMap<(String, String), Column>,
    /// table → primary key columns, in order.
    primary_keys: BTreeMap<String, Vec<String>>,
    /// index name → (table, unique, columns in order); primary keys not included.
    indexes: BTreeMap<String, (String, bool, Vec<String>)>,
}

impl Schema {
    fn tables(&self) -> BTreeSet<&str> {
        self.columns.keys().map(|(t, _)| t.as_str()).collect()
    }
}

fn sqlite_schema(path: &str) -> Schema {
    let conn = rusqlite::Connection::open(path).unwrap();
    let mut schema = Schema::default();
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for table in tables {
        let mut pk: Vec<(i64, String)> = Vec::new();
        let mut st = conn
            .prepare("SELECT name, type, \"notnull\", dflt_value, pk FROM pragma_table_info(?1)")
            .unwrap();
        let rows = st
            .query_map([&table], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, bool>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })
            .unwrap();
        for row in rows {
            let (name, kind, not_null, default, in_pk) = row.unwrap();
            if in_pk > 0 {
                pk.push((in_pk, name.clone()));
            }
            schema.columns.insert(
                (table.clone(), name),
                Column {
                    kind: kind.to_uppercase(),
                    not_null,
                    default,
                },
            );
        }
        pk.sort();
        schema
            .primary_keys
            .insert(table.clone(), pk.into_iter().map(|(_, c)| c).collect());
        let mut st = conn
            .prepare("SELECT name, \"unique\", origin FROM pragma_index_list(?1)")
            .unwrap();
        let indexes: Vec<(String, bool, String)> = st
            .query_map([&table], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        for (index, unique, origin) in indexes {
            if origin == "pk" {
                continue;
            }
            let columns: Vec<String> = conn
                .prepare("SELECT name FROM pragma_index_info(?1) ORDER BY seqno")
                .unwrap()
                .query_map([&index], |r| r.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            schema
                .indexes
                .insert(index, (table.clone(), unique, columns));
        }
    }
    schema
}

async fn postgres_schema(url: &str) -> Schema {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut schema = Schema::default();
    let skip = "parley_schema_version";
    for r in c
        .query(
            "SELECT table_name::text, column_name::text, data_type::text, is_nullable = 'NO',
                    column_default::text
             FROM information_schema.columns WHERE table_schema = 'public' AND table_name <> $1",
            &[&skip],
        )
        .await
        .unwrap()
    {
        let kind = match r.get::<_, &str>(2) {
            "bigint" | "integer" | "boolean" => "INTEGER",
            "text" => "TEXT",
            other => panic!("no SQLite type for PostgreSQL's {other}"),
        };
        // '…'::text → '…'; booleans as SQLite stores them.
        let default = r
            .get::<_, Option<String>>(4)
            .map(|d| match d.trim_end_matches("::text") {
                "false" => "0".to_string(),
                "true" => "1".to_string(),
                d => d.to_string(),
            });
        schema.columns.insert(
            (r.get(0), r.get(1)),
            Column {
                kind: kind.into(),
                not_null: r.get(3),
                default,
            },
        );
    }
    for r in c
        .query(
            "SELECT t.relname::text, i.relname::text, ix.indisprimary, ix.indisunique,
                    array(SELECT a.attname::text
                          FROM unnest(ix.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
                          JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum
                          ORDER BY k.n)
             FROM pg_index ix
             JOIN pg_class i ON i.oid = ix.indexrelid
             JOIN pg_class t ON t.oid = ix.indrelid
             JOIN pg_namespace n ON n.oid = t.relnamespace
             WHERE n.nspname = 'public' AND t.relname <> $1",
            &[&skip],
        )
        .await
        .unwrap()
    {
        let (table, index): (String, String) = (r.get(0), r.get(1));
        let columns: Vec<String> = r.get(4);
        if r.get::<_, bool>(2) {
            schema.primary_keys.insert(table, columns);
        } else {
            schema
                .indexes
                .insert(index, (table, r.get::<_, bool>(3), columns));
        }
    }
    schema
}

/// Both backends' migrations end at the same schema: the same tables and columns (types
/// mapped), nullability, defaults, primary keys and indexes. A migration added to one
/// backend and not the other fails here.
#[tokio::test]
async fn the_two_schemas_agree() {
    let sqlite = Place::sqlite_file();
    drop(sqlite.open().await);
    let lite = sqlite_schema(&sqlite.config().path);
    let postgres = Place::postgres().await;
    drop(postgres.open().await);
    let Place::Postgres(db) = &postgres else {
        unreachable!()
    };
    let pg = postgres_schema(&db.url).await;
    assert_eq!(
        lite.tables(),
        ["file_rooms", "files", "members", "messages", "rooms"].into(),
        "the tables this test knows"
    );
    assert_eq!(lite.tables(), pg.tables());
    for (key, column) in &lite.columns {
        assert_eq!(Some(column), pg.columns.get(key), "{key:?}");
    }
    assert_eq!(lite.columns, pg.columns);
    assert_eq!(lite.primary_keys, pg.primary_keys);
    assert_eq!(lite.indexes, pg.indexes);
}

/// A dead SQLite writer thread (a panic in a write) takes the instance out of rotation:
/// `/readyz` answers 503 and says why, instead of "ready" while every write fails.
#[tokio::test]
async fn readyz_fails_when_the_sqlite_writer_dies() {
    let place = Place::sqlite_file();
    let mut config = test_config();
    config.store = place.config();
    let store = Arc::new(SqliteStore::open(&config.store).unwrap());
    let server = Server::start_with_store(config, store.clone())
        .await
        .unwrap();
    let ready = || async { http(server.local_addr(), "GET", "/readyz", &[], "").await };
    assert_eq!(ready().await.status, 200);
    store.join("r", "u", 0).await.unwrap();

    store.fail_writer_for_tests();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let r = loop {
        let r = ready().await;
        if r.status != 200 {
            break r;
        }
        assert!(tokio::time::Instant::now() < deadline, "readyz stays 200");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(r.status, 503);
    let why = String::from_utf8_lossy(&r.body);
    assert!(why.contains("SQLite") && why.contains("writer"), "{why}");
    assert!(store.append(msg("r", "u", "x")).await.is_err());
    // Reads still work (they do not need the writer).
    assert!(store.is_member("r", "u").await.unwrap());
    server.shutdown();
}
