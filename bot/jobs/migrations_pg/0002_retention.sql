-- Image retention: when the result files of a finished job were deleted (bot/jobs/retention.py).
-- NULL = files still kept (or the job never had any).
ALTER TABLE jobs ADD COLUMN pruned_at double precision;
