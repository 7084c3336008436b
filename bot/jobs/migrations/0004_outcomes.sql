-- One owner for every outcome (issue #10).

-- When the member was shown the job's outcome: the result posted, or the failure/cancel notice
-- shown (in the channel or by DM). NULL on a finished job = a notice is still owed; the worker's
-- sweep (JobQueue.unnotified) sends it, so a crash between `fail()` and the message edit loses nothing.
ALTER TABLE jobs ADD COLUMN notified_at REAL;
-- 1 = run this job alone: it was part of a batch that failed, so only the job at fault fails.
ALTER TABLE jobs ADD COLUMN solo INTEGER NOT NULL DEFAULT 0;
-- Jobs finished before this migration were reported the old way; don't report them again.
UPDATE jobs SET notified_at = coalesce(finished_at, updated_at)
    WHERE status IN ('done', 'failed', 'cancelled', 'dead');
CREATE INDEX jobs_unnotified ON jobs(id)
    WHERE notified_at IS NULL AND status IN ('failed', 'cancelled', 'dead');

-- Small facts the bot keeps between runs (e.g. the hash of the last command schema synced).
CREATE TABLE app_state (
    key        TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    updated_at REAL NOT NULL
);
