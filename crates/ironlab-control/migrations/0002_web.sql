-- Web UI: local passwords, browser sessions, one-time admin sign-in links, run expiry.
-- Portable SQL (SQLite and PostgreSQL). Secrets are stored as SHA-256 hex, never in clear.

ALTER TABLE users ADD COLUMN password_hash TEXT;

CREATE TABLE web_sessions (
    id_hash     TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    csrf_token  TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL
);
CREATE INDEX web_sessions_user ON web_sessions (user_id);
CREATE INDEX web_sessions_expiry ON web_sessions (expires_at);

CREATE TABLE login_keys (
    key_hash    TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL
);

-- When a run is destroyed automatically (ms since the epoch). Filled in by the web expiry sweep
-- for runs created without one: created_at + 2 h.
ALTER TABLE runs ADD COLUMN expires_at BIGINT;
UPDATE runs SET expires_at = created_at + 7200000 WHERE expires_at IS NULL;
