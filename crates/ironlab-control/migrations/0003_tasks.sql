-- Tasks (issue 6): every state change of every task of a run, as its machine's agent reported it.
-- Portable SQL (SQLite and PostgreSQL). `seq` is the agent's per-machine event number (monotonic
-- across agent restarts), so (run_id, machine, seq) names one change: a snapshot re-sent after a
-- reconnect is recognised and not stored twice. The current state of a task is its row with the
-- highest seq; a completed or failed task never goes back.

CREATE TABLE task_events (
    run_id       TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    machine      TEXT NOT NULL,
    task         TEXT NOT NULL,
    seq          BIGINT NOT NULL,
    state        TEXT NOT NULL,
    hint         TEXT NOT NULL,
    attempt      INTEGER NOT NULL,
    at           BIGINT NOT NULL,
    recorded_at  BIGINT NOT NULL,
    PRIMARY KEY (run_id, machine, seq)
);
CREATE INDEX task_events_task ON task_events (run_id, task, seq);
