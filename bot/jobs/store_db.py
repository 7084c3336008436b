"""One small database interface for the stores beside the queue, on SQLite or PostgreSQL.

The guild settings, app state, retention, usage statistics and the queue gauge run the same SQL
on both engines, written once with `:name` parameters (SQLite takes them as they are; for
asyncpg they become `$n`, `bot.jobs.pg_queue.bind`). Where the engines differ (JSON functions)
the statement asks `StoreDb.dialect` for the piece. Which engine is used follows from what the
store is given (`store_db`):

* a `JobQueue` (SQLite): each call runs on the queue's connection inside `JobQueue.exclusive()`,
  so it never lands inside, and is never rolled back with, a queue transaction;
* a bare `aiosqlite.Connection` (e.g. the ops connection from `bot.jobs.db.connect`): as it is;
* a `PgJobQueue` or an `asyncpg.Pool`: a pooled connection per call.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeAlias

import aiosqlite
import asyncpg  # type: ignore[import-untyped]

from bot.jobs.pg_queue import PgJobQueue, bind
from bot.jobs.queue import JobQueue

Params: TypeAlias = Mapping[str, Any]
Row: TypeAlias = dict[str, Any]


@dataclass(frozen=True)
class Dialect:
    """The SQL pieces that differ between the engines."""

    name: Literal["sqlite", "postgres"]
    #: text (or NULL) at top-level key `{key}` of JSON column `{col}`; NULL when it is no string
    json_text: str
    #: a JSON array value built from parameter `{param}` of SQL type `{type}` (INTEGER/TEXT)
    json_array_of: str

    def text_at(self, column: str, key: str) -> str:
        """SQL for the string at `key` of the JSON object in `column` (NULL otherwise)."""
        return self.json_text.format(col=column, key=key)


SQLITE = Dialect(
    name="sqlite",
    json_text=(
        "(CASE WHEN json_valid({col}) AND json_type({col}, '$.{key}') = 'text'"
        " THEN json_extract({col}, '$.{key}') END)"
    ),
    json_array_of="json_array(CAST(:{param} AS {type}))",
)
POSTGRES = Dialect(
    name="postgres",
    json_text=(
        "(CASE WHEN json_typeof(({col})::json -> '{key}') = 'string' THEN ({col})::json ->> '{key}' END)"
    ),
    json_array_of="jsonb_build_array(CAST(:{param} AS {type}))",
)


class Writer(Protocol):
    """Statements inside one `StoreDb.write()` transaction."""

    async def fetch(self, sql: str, params: Params | None = None) -> list[Row]:
        """Run one statement; its rows as dicts."""
        ...

    async def many(self, sql: str, rows: Sequence[Params]) -> None:
        """Run one statement once per parameter set."""
        ...


class StoreDb(ABC):
    """Single statements (autocommit) and short write transactions on one engine."""

    dialect: Dialect

    @abstractmethod
    async def fetch(self, sql: str, params: Params | None = None) -> list[Row]:
        """Run one statement on its own; its rows (RETURNING included) as dicts."""

    @abstractmethod
    def write(self) -> AbstractAsyncContextManager[Writer]:
        """One write transaction: committed when the block ends, rolled back on any exception."""

    @property
    def shares_files(self) -> bool:
        """True when result files are also kept in the database (`job_files`, PostgreSQL)."""
        return self.dialect is POSTGRES


def _sqlite_rows(cursor: aiosqlite.Cursor, rows: Sequence[Any]) -> list[Row]:
    names = [d[0] for d in cursor.description or ()]
    return [dict(zip(names, tuple(row), strict=True)) for row in rows]


class _SqliteWriter:
    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.conn = conn

    async def fetch(self, sql: str, params: Params | None = None) -> list[Row]:
        async with self.conn.execute(sql, dict(params or {})) as cursor:
            return _sqlite_rows(cursor, list(await cursor.fetchall()))

    async def many(self, sql: str, rows: Sequence[Params]) -> None:
        await self.conn.executemany(sql, [dict(row) for row in rows])


class SqliteDb(StoreDb):
    """SQLite through a connection provider (the queue's `exclusive()`, or a bare connection)."""

    dialect = SQLITE

    def __init__(self, connection: Callable[[], AbstractAsyncContextManager[aiosqlite.Connection]]) -> None:
        self._connection = connection

    async def fetch(self, sql: str, params: Params | None = None) -> list[Row]:
        async with self._connection() as conn:
            return await _SqliteWriter(conn).fetch(sql, params)

    @asynccontextmanager
    async def write(self) -> AsyncIterator[Writer]:
        async with self._connection() as conn:
            await conn.execute("BEGIN IMMEDIATE")
            try:
                yield _SqliteWriter(conn)
            except BaseException:
                with contextlib.suppress(Exception):
                    await conn.rollback()
                raise
            await conn.execute("COMMIT")


class _PgWriter:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def fetch(self, sql: str, params: Params | None = None) -> list[Row]:
        text, args = bind(sql, params or {})
        return [dict(record) for record in await self.conn.fetch(text, *args)]

    async def many(self, sql: str, rows: Sequence[Params]) -> None:
        if not rows:
            return
        text, _ = bind(sql, rows[0])
        await self.conn.executemany(text, [bind(sql, row)[1] for row in rows])


class PgDb(StoreDb):
    """PostgreSQL through an asyncpg pool."""

    dialect = POSTGRES

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def fetch(self, sql: str, params: Params | None = None) -> list[Row]:
        async with self.pool.acquire() as conn:
            return await _PgWriter(conn).fetch(sql, params)

    @asynccontextmanager
    async def write(self) -> AsyncIterator[Writer]:
        async with self.pool.acquire() as conn, conn.transaction():
            yield _PgWriter(conn)


Source: TypeAlias = "StoreDb | JobQueue | PgJobQueue | aiosqlite.Connection | asyncpg.Pool"


def store_db(source: Source) -> StoreDb:
    """The `StoreDb` for a queue (SQLite or PostgreSQL), a bare SQLite connection or a pool."""
    if isinstance(source, StoreDb):
        return source
    if isinstance(source, JobQueue):
        return SqliteDb(source.exclusive)
    if isinstance(source, PgJobQueue):
        return PgDb(source.pool)
    if isinstance(source, aiosqlite.Connection):
        conn = source

        @asynccontextmanager
        async def bare() -> AsyncIterator[aiosqlite.Connection]:
            yield conn

        return SqliteDb(bare)
    if isinstance(source, asyncpg.Pool):
        return PgDb(source)
    raise TypeError(f"no database behind {type(source).__name__}")
