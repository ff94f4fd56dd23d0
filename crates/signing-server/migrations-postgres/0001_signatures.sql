-- PostgreSQL's twin of migrations/0001_signatures.sql: the same table, columns and index;
-- append-only by triggers (UPDATE and DELETE per row, TRUNCATE per statement) on top of the
-- service role's privileges (docs/signing-server.md, "Several instances").
CREATE TABLE signatures (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    signed_at TEXT NOT NULL,
    identity TEXT NOT NULL,
    source TEXT NOT NULL CHECK (source IN ('path', 'upload')),
    name TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size BIGINT NOT NULL,
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

CREATE FUNCTION signatures_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit table is append-only';
END;
$$;

CREATE TRIGGER signatures_no_update_or_delete BEFORE UPDATE OR DELETE ON signatures
    FOR EACH ROW EXECUTE FUNCTION signatures_append_only();

CREATE TRIGGER signatures_no_truncate BEFORE TRUNCATE ON signatures
    FOR EACH STATEMENT EXECUTE FUNCTION signatures_append_only();
