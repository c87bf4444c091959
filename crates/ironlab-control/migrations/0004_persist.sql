-- Persistent playgrounds: stopped runs keep their drives, clones, saved playgrounds, quotas.
-- Portable SQL (SQLite and PostgreSQL).

-- Bytes only this run holds on its worker (measured while stopped); NULL = not measured.
ALTER TABLE runs ADD COLUMN storage_bytes BIGINT;
-- The run this one was cloned from (the clone is re-issued to the worker if it was lost).
ALTER TABLE runs ADD COLUMN cloned_from TEXT;

-- Per-user storage quota in bytes; NULL = the platform default.
ALTER TABLE users ADD COLUMN storage_quota_bytes BIGINT;

-- A playground saved from a run: the worker's saved drives it starts from, the run it was
-- saved from, and the bytes the save held when it was made. (`parent`, from 0001, names the
-- playground it was saved from: the prototype chain.)
ALTER TABLE playgrounds ADD COLUMN saved_id TEXT;
ALTER TABLE playgrounds ADD COLUMN source_run TEXT;
ALTER TABLE playgrounds ADD COLUMN storage_bytes BIGINT;
