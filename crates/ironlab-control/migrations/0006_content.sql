-- Content (issue 8): the index of published tutorials, challenges, courses and skill paths.
-- Bundles (tar archives of the item's folder) are immutable files under
-- DATA_DIR/control/objects/content/<sha256>.tar; a version row names its bundle by digest, so
-- publishing version N+1 never touches what version N's pages and runs read.
-- Portable SQL (SQLite and PostgreSQL).

CREATE TABLE content (
    name          TEXT PRIMARY KEY,
    kind          TEXT NOT NULL CHECK (kind IN ('tutorial', 'challenge', 'course', 'skill-path')),
    version       BIGINT NOT NULL,
    title         TEXT NOT NULL,
    description   TEXT NOT NULL,
    categories    TEXT NOT NULL,  -- JSON array of strings
    tags          TEXT NOT NULL,  -- JSON array of strings
    difficulty    TEXT,
    visibility    TEXT NOT NULL CHECK (visibility IN ('private', 'unlisted', 'public')),
    access        TEXT NOT NULL,  -- JSON array of user names who may see a private item
    author        TEXT NOT NULL REFERENCES users (id),
    playground    TEXT,
    created_at    BIGINT NOT NULL,
    published_at  BIGINT NOT NULL
);
CREATE INDEX content_visibility ON content (visibility, kind);

CREATE TABLE content_versions (
    name       TEXT NOT NULL REFERENCES content (name) ON DELETE CASCADE,
    version    BIGINT NOT NULL,
    digest     TEXT NOT NULL,
    size       BIGINT NOT NULL,
    pushed_by  TEXT NOT NULL,
    pushed_at  BIGINT NOT NULL,
    PRIMARY KEY (name, version)
);

-- A run started from a content item remembers which item and version it serves.
ALTER TABLE runs ADD COLUMN content TEXT;
ALTER TABLE runs ADD COLUMN content_version BIGINT;
-- A course lesson's run: `MODULE/LESSON`.
ALTER TABLE runs ADD COLUMN content_lesson TEXT;

-- Progress per user and item: when they first started it, when a run of it first had every
-- task completed (kept when the run, or the item, is gone), and their latest run of it.
CREATE TABLE content_progress (
    user_id         TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name            TEXT NOT NULL,
    started_at      BIGINT NOT NULL,
    solved_at       BIGINT,
    solved_version  BIGINT,
    last_run        TEXT,
    PRIMARY KEY (user_id, name)
);

-- Users an admin made content authors (admins are authors anyway).
CREATE TABLE content_authors (
    user_id     TEXT PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    granted_by  TEXT NOT NULL,
    granted_at  BIGINT NOT NULL
);
