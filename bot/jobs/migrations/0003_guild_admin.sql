-- Per-guild settings and bans, edited with /pony-admin (bot/guild_settings.py).

-- One row per guild that changed anything. NULL in a column = use the global PONY_* setting.
-- allowed_channels and blocked_terms are JSON arrays (channel ids as integers; terms as strings);
-- NULL or [] = every channel allowed / no extra blocked terms.
CREATE TABLE guild_settings (
    guild_id INTEGER PRIMARY KEY,
    allowed_channels TEXT,
    blocked_terms TEXT,
    default_negative TEXT,
    nsfw_default_negative TEXT,
    default_steps INTEGER,
    default_count INTEGER,
    max_steps INTEGER,
    max_open_jobs_per_user INTEGER,
    cooldown_s REAL,
    updated_at REAL NOT NULL,
    updated_by INTEGER
);

-- Members banned from using the bot in one guild.
CREATE TABLE bans (
    guild_id INTEGER NOT NULL,
    user_id INTEGER NOT NULL,
    reason TEXT,
    banned_by INTEGER,
    created_at REAL NOT NULL,
    PRIMARY KEY (guild_id, user_id)
);
