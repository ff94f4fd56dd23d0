-- Every signature the server made. Append-only: the triggers refuse updates and deletes.
CREATE TABLE signatures (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    signed_at TEXT NOT NULL,
    identity TEXT NOT NULL,
    source TEXT NOT NULL CHECK (source IN ('path', 'upload')),
    name TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    key_name TEXT NOT NULL,
    keyid TEXT NOT NULL,
    package TEXT NOT NULL,
    fileset TEXT NOT NULL,
    vrmf TEXT NOT NULL,
    ftype TEXT NOT NULL,
    timestamp TEXT NOT NULL,
    signature TEXT NOT NULL
);

CREATE INDEX signatures_sha256 ON signatures (sha256);

CREATE TRIGGER signatures_no_update BEFORE UPDATE ON signatures
BEGIN
    SELECT RAISE(ABORT, 'the audit table is append-only');
END;

CREATE TRIGGER signatures_no_delete BEFORE DELETE ON signatures
BEGIN
    SELECT RAISE(ABORT, 'the audit table is append-only');
END;
