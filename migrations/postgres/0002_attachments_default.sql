-- 2: messages.attachments defaults to '' as in SQLite (whose migration 3 added the
-- column with that default); tests/store_contract.rs checks the two schemas agree.

ALTER TABLE messages ALTER COLUMN attachments SET DEFAULT '';
