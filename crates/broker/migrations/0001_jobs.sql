-- One schema for SQLite and PostgreSQL: only portable types and statements.
-- Times are Unix seconds (jobs, revoked) or milliseconds (audit). A job is live while
-- expires_at >= now (whole seconds), so it never lives shorter than its TTL.

CREATE TABLE jobs (
    id              TEXT PRIMARY KEY,
    owner           TEXT NOT NULL,
    owner_uid       BIGINT,
    job_type        TEXT NOT NULL,
    host            TEXT NOT NULL,
    port            BIGINT NOT NULL,
    secret          TEXT,
    cert_pem        TEXT,
    key_pem         TEXT,
    client_cert_pem TEXT,
    client_key_pem  TEXT,
    -- The CA that issued this job's certificates: brokers sharing a registry may differ.
    ca_pem          TEXT,
    cert_serial     TEXT,
    client_serial   TEXT,
    label           TEXT,
    created_at      BIGINT NOT NULL,
    expires_at      BIGINT NOT NULL,
    ttl_secs        BIGINT NOT NULL,
    -- The promise that two live jobs never share a port on one host.
    CONSTRAINT jobs_host_port UNIQUE (host, port)
);
-- Covers the per-user quota count and query (owner, then live ones).
CREATE INDEX jobs_owner ON jobs (owner, expires_at);
CREATE INDEX jobs_expires ON jobs (expires_at);

-- Serials of certificates whose job ended, for the CRL; dropped once the certificate has
-- expired anyway.
CREATE TABLE revoked (
    serial     TEXT PRIMARY KEY,
    job_id     TEXT NOT NULL,
    revoked_at BIGINT NOT NULL,
    not_after  BIGINT NOT NULL
);

-- Every save, load, verify, heartbeat, delete and reap. Never a secret.
CREATE TABLE audit (
    at_ms     BIGINT NOT NULL,
    via       TEXT NOT NULL,
    user_name TEXT NOT NULL,
    uid       BIGINT,
    action    TEXT NOT NULL,
    job_id    TEXT,
    result    TEXT NOT NULL,
    detail    TEXT
);
CREATE INDEX audit_at ON audit (at_ms);
