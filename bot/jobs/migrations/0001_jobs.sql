-- The job queue. One row per accepted request; see bot/queue.py for the life cycle.
CREATE TABLE jobs (
    id                   INTEGER PRIMARY KEY,
    kind                 TEXT    NOT NULL CHECK (kind IN ('txt2img', 'upscale', 'variation')),
    parent_id            INTEGER REFERENCES jobs(id),
    image_index          INTEGER,            -- upscale/variation: which image of the parent (0-based)
    guild_id             INTEGER NOT NULL DEFAULT 0,   -- 0 for DMs
    channel_id           INTEGER NOT NULL,
    user_id              INTEGER NOT NULL,
    interaction_id       INTEGER UNIQUE,     -- enqueue is idempotent on it
    params               TEXT    NOT NULL,   -- JSON of generator.params.GenerationParams
    cost                 INTEGER NOT NULL DEFAULT 1,   -- steps x images, for the ETA
    status               TEXT    NOT NULL DEFAULT 'queued'
                         CHECK (status IN ('queued', 'running', 'generated', 'done', 'failed', 'cancelled', 'dead')),
    attempts             INTEGER NOT NULL DEFAULT 0,
    cancel_requested     INTEGER NOT NULL DEFAULT 0,
    lease_owner          TEXT,
    lease_expires_at     REAL,
    not_before           REAL    NOT NULL DEFAULT 0,   -- retry back-off
    created_at           REAL    NOT NULL,
    started_at           REAL,
    generated_at         REAL,
    finished_at          REAL,
    updated_at           REAL    NOT NULL,
    reply_to_message_id  INTEGER,            -- buttons: the result message the new job answers
    status_message_id    INTEGER,            -- the public status message (becomes the result)
    result_message_id    INTEGER,
    result_files         TEXT,               -- JSON list of paths relative to the images folder
    seeds                TEXT,               -- JSON list, one per image
    gen_seconds          REAL,
    error                TEXT                -- shown to the user when failed/dead/cancelled
);

CREATE INDEX jobs_status ON jobs(status, id);
CREATE INDEX jobs_user_open ON jobs(user_id, status);
-- claim: a waiting user's oldest eligible job, read in id order (cost independent of backlog size).
CREATE INDEX jobs_pick ON jobs(guild_id, user_id, id, not_before) WHERE status = 'queued';
CREATE INDEX jobs_lease ON jobs(lease_expires_at) WHERE status = 'running';
CREATE INDEX jobs_finished ON jobs(finished_at);
CREATE INDEX jobs_parent ON jobs(parent_id);

-- Fairness bookkeeping: who was served least recently, and how many queued jobs each has.
-- Kept by triggers so claim can walk users with queued work in index order instead of scanning jobs.
CREATE TABLE queue_guilds (
    guild_id        INTEGER PRIMARY KEY,
    last_served_at  REAL    NOT NULL DEFAULT 0,
    queued          INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX queue_guilds_waiting ON queue_guilds(last_served_at) WHERE queued > 0;

CREATE TABLE queue_users (
    guild_id        INTEGER NOT NULL,
    user_id         INTEGER NOT NULL,
    last_served_at  REAL    NOT NULL DEFAULT 0,
    last_enqueued_at REAL   NOT NULL DEFAULT 0,
    queued          INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (guild_id, user_id)
);
CREATE INDEX queue_users_waiting ON queue_users(guild_id, last_served_at) WHERE queued > 0;

-- A new job also stamps the user's last_enqueued_at (the enqueue cooldown reads it).
CREATE TRIGGER jobs_queued_insert AFTER INSERT ON jobs WHEN NEW.status = 'queued'
BEGIN
    INSERT INTO queue_guilds(guild_id, queued) VALUES (NEW.guild_id, 1)
        ON CONFLICT(guild_id) DO UPDATE SET queued = queued + 1;
    INSERT INTO queue_users(guild_id, user_id, queued, last_enqueued_at)
        VALUES (NEW.guild_id, NEW.user_id, 1, NEW.created_at)
        ON CONFLICT(guild_id, user_id) DO UPDATE
        SET queued = queued + 1, last_enqueued_at = max(last_enqueued_at, excluded.last_enqueued_at);
END;

CREATE TRIGGER jobs_queued_leave AFTER UPDATE OF status ON jobs
WHEN OLD.status = 'queued' AND NEW.status <> 'queued'
BEGIN
    UPDATE queue_guilds SET queued = queued - 1 WHERE guild_id = OLD.guild_id;
    UPDATE queue_users SET queued = queued - 1 WHERE guild_id = OLD.guild_id AND user_id = OLD.user_id;
END;

CREATE TRIGGER jobs_queued_enter AFTER UPDATE OF status ON jobs
WHEN OLD.status <> 'queued' AND NEW.status = 'queued'
BEGIN
    INSERT INTO queue_guilds(guild_id, queued) VALUES (NEW.guild_id, 1)
        ON CONFLICT(guild_id) DO UPDATE SET queued = queued + 1;
    INSERT INTO queue_users(guild_id, user_id, queued) VALUES (NEW.guild_id, NEW.user_id, 1)
        ON CONFLICT(guild_id, user_id) DO UPDATE SET queued = queued + 1;
END;

-- Measured speed, for ETAs: an exponential moving average of seconds per step-image.
CREATE TABLE queue_stats (
    key    TEXT PRIMARY KEY,
    value  REAL NOT NULL
);
