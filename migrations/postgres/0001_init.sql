-- 1: rooms with their seq counter and member count, members with read markers,
-- messages with an idempotency key, uploaded files and the rooms each was posted to.
-- The same shape as the SQLite schema (src/store/sqlite.rs, migrations 1-3).

CREATE TABLE rooms (
    name TEXT PRIMARY KEY,
    private BOOLEAN NOT NULL,
    -- The room's seq counter: an append locks this row, so commit order = seq order.
    last_seq BIGINT NOT NULL DEFAULT 0,
    members BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL
);

CREATE TABLE members (
    room TEXT NOT NULL REFERENCES rooms(name),
    user_id TEXT NOT NULL,
    read_seq BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (room, user_id)
);
CREATE INDEX members_by_user ON members(user_id, room);

CREATE TABLE messages (
    room TEXT NOT NULL,
    seq BIGINT NOT NULL,
    sender TEXT NOT NULL,
    client_msg_id TEXT NOT NULL,
    body TEXT NOT NULL,
    -- JSON object of string pairs, or '' for none.
    metadata TEXT NOT NULL,
    ts BIGINT NOT NULL,
    -- JSON array of attachments, or '' for none.
    attachments TEXT NOT NULL,
    PRIMARY KEY (room, seq)
);
CREATE UNIQUE INDEX messages_idempotency ON messages(room, sender, client_msg_id);

CREATE TABLE files (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    content_type TEXT NOT NULL,
    size BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    width BIGINT NOT NULL,
    height BIGINT NOT NULL,
    blurhash TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    referenced BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX files_by_owner ON files(owner);
CREATE INDEX files_orphans ON files(referenced, created_at);

CREATE TABLE file_rooms (
    file_id TEXT NOT NULL,
    room TEXT NOT NULL,
    PRIMARY KEY (file_id, room)
);
