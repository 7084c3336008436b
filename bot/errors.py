"""Refusals: what a use case raises to turn a request down with a short, member-facing text.

Raised by the guard rails (bot.policy.guard) and the Discord use cases (bot.discord_ui); the
Discord side answers them privately and queues nothing.
"""

from __future__ import annotations

import sqlite3

#: the answer when the database was busy (`sqlite3.OperationalError`): nothing was queued
BUSY = "The queue is busy right now; nothing was queued. Try again in a moment."


class Refusal(Exception):
    """A request refused with a short, user-facing reason."""


def refusal_text(exc: Exception) -> str:
    """What to tell the member: the refusal's reason, or BUSY for a locked database."""
    return BUSY if isinstance(exc, sqlite3.OperationalError) else str(exc)
