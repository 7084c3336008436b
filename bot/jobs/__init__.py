"""The job queue and everything stored with it: job models and statuses, the SQLite queue, ETAs,
the database connection and migrations, per-guild settings, app state, retention. May import
`bot.config`, `bot.errors`, `bot.logging_setup` and torch-free `generator` modules; never Discord,
the runtime, policy, ops or the UI.
"""
