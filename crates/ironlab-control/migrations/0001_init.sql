-- ironlab control plane schema. Portable SQL: runs on SQLite and PostgreSQL.
-- Timestamps are milliseconds since the Unix epoch (BIGINT).

CREATE TABLE users (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    role        TEXT NOT NULL CHECK (role IN ('admin', 'user')),
    created_at  BIGINT NOT NULL
);

CREATE TABLE api_tokens (
    token_hash    TEXT PRIMARY KEY,
    user_id       TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name          TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    last_used_at  BIGINT
);
CREATE INDEX api_tokens_user ON api_tokens (user_id);

CREATE TABLE playgrounds (
    name         TEXT PRIMARY KEY,
    owner        TEXT NOT NULL,
    title        TEXT NOT NULL,
    description  TEXT NOT NULL,
    manifest     TEXT NOT NULL,
    stock        BOOLEAN NOT NULL,
    parent       TEXT,
    created_at   BIGINT NOT NULL
);

CREATE TABLE runs (
    id               TEXT PRIMARY KEY,
    owner            TEXT NOT NULL REFERENCES users (id),
    playground       TEXT NOT NULL,
    title            TEXT NOT NULL,
    state            TEXT NOT NULL,
    reason           TEXT,
    plan             TEXT NOT NULL,
    worker_attempts  INTEGER NOT NULL DEFAULT 0,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL
);
CREATE INDEX runs_owner ON runs (owner);
CREATE INDEX runs_state ON runs (state);

CREATE TABLE run_events (
    run_id  TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    state   TEXT NOT NULL,
    reason  TEXT,
    at      BIGINT NOT NULL
);
CREATE INDEX run_events_run ON run_events (run_id, at);
