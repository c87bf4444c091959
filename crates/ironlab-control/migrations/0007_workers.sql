-- Several workers: every run is pinned to one (by its configured name); saved drives live on
-- the worker that saved them. NULL (rows from before): the first configured worker.
ALTER TABLE runs ADD COLUMN worker TEXT;
ALTER TABLE playgrounds ADD COLUMN saved_worker TEXT;
