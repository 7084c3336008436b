-- One owner for every outcome (issue #10).

-- When the member was shown the job's outcome: NULL on a finished job = a notice is still owed
-- (PgJobQueue.unnotified).
ALTER TABLE jobs ADD COLUMN notified_at double precision;
-- 1 = run this job alone: it was part of a batch that failed, so only the job at fault fails.
ALTER TABLE jobs ADD COLUMN solo integer NOT NULL DEFAULT 0 CHECK (solo IN (0, 1));
-- Jobs finished before this migration were reported the old way; don't report them again.
UPDATE jobs SET notified_at = coalesce(finished_at, updated_at)
    WHERE status IN ('done', 'failed', 'cancelled', 'dead');
CREATE INDEX jobs_unnotified ON jobs(id)
    WHERE notified_at IS NULL AND status IN ('failed', 'cancelled', 'dead');

-- Small facts the bot keeps between runs (e.g. the hash of the last command schema synced).
CREATE TABLE app_state (
    key        text PRIMARY KEY,
    value      text NOT NULL,
    updated_at double precision NOT NULL
);
