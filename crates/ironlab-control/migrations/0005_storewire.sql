-- Off-host snapshots: where the upload of a stopped run's drives to the worker's snapshot store
-- stands, as the worker last reported it (`uploading`, `uploaded`, `failed`); NULL = unknown.
-- Portable SQL (SQLite and PostgreSQL).
ALTER TABLE runs ADD COLUMN snapshot TEXT;
