-- Per-guild settings and bans, edited with /pony-admin (bot/jobs/guild_settings.py).

-- One row per guild that changed anything. NULL in a column = use the global PONY_* setting.
-- allowed_channels and blocked_terms are JSON arrays (channel ids as integers; terms as strings);
-- NULL or [] = every channel allowed / no extra blocked terms.
CREATE TABLE guild_settings (
    guild_id bigint PRIMARY KEY,
    allowed_channels text,
    blocked_terms text,
    default_negative text,
    nsfw_default_negative text,
    default_steps integer,
    default_count integer,
    max_steps integer,
    max_open_jobs_per_user integer,
    cooldown_s double precision,
    updated_at double precision NOT NULL,
    updated_by bigint
);

-- Members banned from using the bot in one guild.
CREATE TABLE bans (
    guild_id bigint NOT NULL,
    user_id bigint NOT NULL,
    reason text,
    banned_by bigint,
    created_at double precision NOT NULL,
    PRIMARY KEY (guild_id, user_id)
);
