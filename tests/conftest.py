"""Fixtures shared by the top-level tests (tests/e2e and tests/generator have their own conftest.py;
nothing here is meant for `from conftest import ...`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiosqlite
import pytest

from bot.jobs.db import MIGRATIONS_DIR

MIGRATIONS = MIGRATIONS_DIR


@pytest.fixture
async def conn(tmp_path: Path) -> AsyncIterator[aiosqlite.Connection]:
    """A fresh jobs database with every migration applied."""
    # the bot's settings (bot/jobs/db.py): autocommit, rows as aiosqlite.Row
    db = await aiosqlite.connect(tmp_path / "jobs.sqlite3", isolation_level=None)
    db.row_factory = aiosqlite.Row
    for script in sorted(MIGRATIONS.glob("[0-9][0-9][0-9][0-9]_*.sql")):
        await db.executescript(script.read_text())
    await db.commit()
    yield db
    await db.close()
