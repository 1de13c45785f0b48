-- 3: the room browser reads public rooms in byte order of their names without stepping
-- over the private ones (direct messages may far outnumber public rooms). SQLite's
-- migration 5 adds the same index; tests/store_contract.rs checks the two schemas agree.

CREATE INDEX rooms_public ON rooms(private, name COLLATE "C");
