"""A queue on either engine for the store tests (guild settings, app state, retention, stats,
metrics): `open_queue(backend, request, tmp_path)` with the `backend` fixture of tests/conftest.py,
plus plain SQL helpers that run the same `:name` statement on both engines."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite
import pytest

from bot.jobs.db import connect, migrate
from bot.jobs.models import QueueLimits
from bot.jobs.pg_queue import PgJobQueue
from bot.jobs.queue import JobQueue
from bot.jobs.store_db import Source, store_db

Queue = JobQueue | PgJobQueue
LIMITS = QueueLimits(cooldown_s=0)


@asynccontextmanager
async def open_queue(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, limits: QueueLimits = LIMITS
) -> AsyncIterator[Queue]:
    """A fresh, migrated queue: SQLite in `tmp_path`, or PostgreSQL on its own throwaway database."""
    queue: Queue
    if backend == "postgres":
        url = str(request.getfixturevalue("pg_url"))
        queue = await PgJobQueue.open(url, limits, images_dir=tmp_path / "images")
    else:
        queue = await JobQueue.open(tmp_path / "jobs.sqlite3", limits, images_dir=tmp_path / "images")
    try:
        yield queue
    finally:
        await queue.close()


@asynccontextmanager
async def open_database(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[aiosqlite.Connection | PgJobQueue]:
    """What `Ops` gives the stores: its own migrated SQLite connection, or the PostgreSQL queue."""
    if backend == "postgres":
        async with open_queue(backend, request, tmp_path) as queue:
            assert isinstance(queue, PgJobQueue)
            yield queue
        return
    conn = await connect(tmp_path / "jobs.sqlite3")
    try:
        await migrate(conn)
        yield conn
    finally:
        await conn.close()


async def rows(queue: Source, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run one statement (`:name` parameters) on either engine; its rows as dicts."""
    return await store_db(queue).fetch(sql, params)


def is_json(text: str | None) -> bool:
    """Whether `text` is valid JSON (PostgreSQL's json column refuses anything else)."""
    try:
        json.loads(text or "")
    except ValueError:
        return False
    return True


async def insert_job(queue: Source, **columns: Any) -> int:
    """Insert a jobs row straight into the table (defaults for the required columns); its id.

    On PostgreSQL a `params` text that is no valid JSON is stored as `{}` (its json column refuses
    it; to the stores both mean "no parameters")."""
    cols: dict[str, Any] = {
        "kind": "txt2img",
        "channel_id": 1,
        "user_id": 2,
        "params": "{}",
        **columns,
    }
    if store_db(queue).dialect.name == "postgres" and not is_json(cols["params"]):
        cols["params"] = "{}"
    cols.setdefault("created_at", 0.0)
    cols.setdefault("updated_at", cols["created_at"])
    for name in ("created_at", "updated_at", "started_at", "generated_at", "finished_at", "gen_seconds"):
        if cols.get(name) is not None:
            cols[name] = float(cols[name])
    names = ", ".join(cols)
    marks = ", ".join(f":{name}" for name in cols)
    (row,) = await rows(queue, f"INSERT INTO jobs ({names}) VALUES ({marks}) RETURNING id", cols)
    return int(row["id"])
