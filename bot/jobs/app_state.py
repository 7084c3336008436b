"""Small facts the bot keeps between runs, in the `app_state` table (migrations/0004_outcomes.sql).

The store works on the queue it is given (`bot.jobs.store_db`): SQLite through the queue's
connection (`JobQueue.exclusive()`, so a read or write never lands inside, or is rolled back
with, a queue transaction), PostgreSQL through the queue's pool. Each call is one autocommit
statement, the same SQL on both engines.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from bot.jobs.store_db import Source, store_db


class AppState:
    """A string-to-string store over `app_state (key, value, updated_at)`."""

    def __init__(self, queue: Source, *, clock: Callable[[], float] = time.time) -> None:
        self.queue = queue
        self.db = store_db(queue)
        self._clock = clock

    async def get(self, key: str) -> str | None:
        """The value stored under `key`, or None."""
        rows = await self.db.fetch("SELECT value FROM app_state WHERE key = :key", {"key": key})
        return str(rows[0]["value"]) if rows else None

    async def set(self, key: str, value: str) -> None:
        """Store `value` under `key` (replacing any previous value)."""
        await self.db.fetch(
            "INSERT INTO app_state (key, value, updated_at) VALUES (:key, :value, :now)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
            {"key": key, "value": value, "now": self._clock()},
        )

    async def delete(self, key: str) -> bool:
        """Forget `key`; False if it was not stored."""
        rows = await self.db.fetch("DELETE FROM app_state WHERE key = :key RETURNING key", {"key": key})
        return bool(rows)
