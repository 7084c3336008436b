"""Small facts the bot keeps between runs, in the `app_state` table (migrations/0004_outcomes.sql).

The store shares the job queue's connection: each read or write is one autocommit statement sent
through `JobQueue.exclusive()`, so it never lands inside (or is rolled back with) a queue transaction.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bot.jobs.queue import JobQueue


class AppState:
    """A string-to-string store over `app_state (key, value, updated_at)`."""

    def __init__(self, queue: JobQueue, *, clock: Callable[[], float] = time.time) -> None:
        self.queue = queue
        self._clock = clock

    async def get(self, key: str) -> str | None:
        """The value stored under `key`, or None."""
        async with self.queue.exclusive() as conn:
            rows = list(await conn.execute_fetchall("SELECT value FROM app_state WHERE key = ?", (key,)))
        return str(rows[0][0]) if rows else None

    async def set(self, key: str, value: str) -> None:
        """Store `value` under `key` (replacing any previous value)."""
        async with self.queue.exclusive() as conn:
            await conn.execute(
                "INSERT INTO app_state (key, value, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                (key, value, self._clock()),
            )

    async def delete(self, key: str) -> bool:
        """Forget `key`; False if it was not stored."""
        async with self.queue.exclusive() as conn:
            rows = list(
                await conn.execute_fetchall("DELETE FROM app_state WHERE key = ? RETURNING key", (key,))
            )
        return bool(rows)
