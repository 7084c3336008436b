-- Several machines on one queue (issue #12): shared result files, delivery holds, progress pacing.

-- The bytes of every result file (`mark_generated`, same transaction) and member upload
-- (`share_files`), so a machine that did not write a file can fetch it (`ensure_files`).
-- name: the path relative to the images folder; job_id: the job it belongs to (NULL: an upload
-- saved before its job existed).
CREATE TABLE job_files (
    name        text PRIMARY KEY,
    job_id      bigint,
    data        bytea NOT NULL,
    created_at  double precision NOT NULL
);
CREATE INDEX job_files_job ON job_files(job_id);
CREATE INDEX job_files_created ON job_files(created_at);

-- The last progress edit allowed per channel, from any process (`progress_slot`).
CREATE TABLE channel_progress (
    channel_id  bigint PRIMARY KEY,
    last_at     double precision NOT NULL
);

-- Who is delivering a generated job, until when (`claim_delivery`).
ALTER TABLE jobs ADD COLUMN delivery_owner text;
ALTER TABLE jobs ADD COLUMN delivery_until double precision;
