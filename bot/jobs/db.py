"""SQLite connection set-up and the schema migration runner.

Migrations are files `NNNN_name.sql` in `bot/jobs/migrations/`, applied in order.
The schema version is `PRAGMA user_version`: migration N is applied when N > user_version, in one
`BEGIN IMMEDIATE` transaction together with `PRAGMA user_version = N`, so a failed migration leaves
the database exactly as it was.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

import aiosqlite

#: The `migrations/` folder inside this package (shipped in the wheel as package data).
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

log = logging.getLogger(__name__)
T = TypeVar("T")

_MIGRATION_NAME = re.compile(r"^(\d{4})_[A-Za-z0-9_\-]+\.sql$")
#: How long a statement waits for another connection's lock by default (PONY_DB_BUSY_TIMEOUT_MS).
DEFAULT_BUSY_TIMEOUT_MS = 10_000


class MigrationError(Exception):
    """A migration file is malformed or failed to apply (the database was left unchanged)."""


class DatabaseTooNew(MigrationError):
    """The database was written by a newer ponybot than this one."""


async def connect(path: Path, *, busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS) -> aiosqlite.Connection:
    """Open (creating if needed) the SQLite database at `path` with ponybot's pragmas.

    The connection is in autocommit mode (`isolation_level=None`): callers open transactions
    themselves with `BEGIN IMMEDIATE` ... `COMMIT`, which is what the job queue needs.
    `busy_timeout_ms` is how long a statement waits for another connection's lock.
    """
    path = Path(path)
    if str(path) != ":memory:":
        path.parent.mkdir(parents=True, exist_ok=True)
    conn = await aiosqlite.connect(path, isolation_level=None)
    try:
        conn.row_factory = aiosqlite.Row
        await conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms):d}")
        await conn.execute("PRAGMA journal_mode = WAL")
        # synchronous=NORMAL: in WAL mode this never corrupts the database, and a process crash
        # (including kill -9) loses nothing, because committed transactions are already in the WAL
        # file in the OS page cache. Only an OS crash or power loss may roll back the last few
        # commits. FULL would cost an fsync on every commit, i.e. on every queue transition.
        await conn.execute("PRAGMA synchronous = NORMAL")
        await conn.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        await conn.close()
        raise
    return conn


def migrations_dir() -> Path:
    """The folder holding the `NNNN_name.sql` files (inside the package)."""
    if MIGRATIONS_DIR.is_dir():
        return MIGRATIONS_DIR
    raise MigrationError(f"No migrations folder found (looked in {MIGRATIONS_DIR}).")


def available_migrations(folder: Path | None = None) -> list[tuple[int, Path]]:
    """(number, file) for every migration in `folder`, sorted by number."""
    folder = migrations_dir() if folder is None else Path(folder)
    found: dict[int, Path] = {}
    for file in folder.iterdir():
        match = _MIGRATION_NAME.match(file.name)
        if not match:
            continue
        number = int(match.group(1))
        if number == 0:
            raise MigrationError(f"Migration numbers start at 0001 (found {file.name}).")
        if number in found:
            raise MigrationError(
                f"Two migrations are numbered {number:04d}: {found[number].name}, {file.name}."
            )
        found[number] = file
    return sorted(found.items())


def split_statements(script: str) -> list[str]:
    """Split an SQL script into complete statements (trigger bodies and string literals respected)."""
    statements: list[str] = []
    start = 0
    for index, char in enumerate(script):
        if char == ";" and sqlite3.complete_statement(script[start : index + 1]):
            statement = script[start : index + 1].strip()
            if statement:
                statements.append(statement)
            start = index + 1
    rest = "\n".join(
        line for line in script[start:].splitlines() if line.strip() and not line.strip().startswith("--")
    )
    if rest.strip():
        raise MigrationError(f"Incomplete SQL statement at the end of the script: {rest.strip()[:60]!r}")
    return statements


async def schema_version(conn: aiosqlite.Connection) -> int:
    """The database's `PRAGMA user_version`."""
    rows = await conn.execute_fetchall("PRAGMA user_version")
    return int(next(iter(rows))[0])


async def _database_file(conn: aiosqlite.Connection) -> str:
    rows = await conn.execute_fetchall("PRAGMA database_list")
    for row in rows:
        if row[1] == "main":
            return row[2] or ":memory:"
    return "?"


async def migrate(conn: aiosqlite.Connection, folder: Path | None = None) -> list[int]:
    """Apply pending migrations in order; return the numbers applied (empty when up to date).

    Each migration runs in its own `BEGIN IMMEDIATE` transaction with the version bump; the
    version is re-read under that lock, so two processes migrating at once apply each file once.
    Raises `DatabaseTooNew` when the database is newer than the newest migration known here, and
    `MigrationError` (after rolling back) when a migration fails.
    """
    migrations = available_migrations(folder)
    newest = migrations[-1][0] if migrations else 0
    current = await schema_version(conn)
    if current > newest:
        where = await _database_file(conn)
        raise DatabaseTooNew(
            f"The database at {where} is version {current} but this ponybot only knows up to "
            f"{newest}; upgrade ponybot or point PONY_DB elsewhere."
        )
    applied: list[int] = []
    for number, file in migrations:
        if number <= current:
            continue
        statements = split_statements(file.read_text(encoding="utf-8"))
        try:
            await conn.execute("BEGIN IMMEDIATE")
            current = await schema_version(conn)
            if number <= current:  # another process applied it while we waited for the lock
                await conn.rollback()
                continue
            for statement in statements:
                await conn.execute(statement)
            await conn.execute(f"PRAGMA user_version = {number:d}")
            await conn.execute("COMMIT")
        except BaseException as exc:
            await conn.rollback()  # a no-op when no transaction is open
            if isinstance(exc, sqlite3.Error):
                raise MigrationError(f"Migration {file.name} failed and was rolled back: {exc}") from exc
            raise
        current = number
        applied.append(number)
    return applied


async def integrity_ok(conn: aiosqlite.Connection) -> bool:
    """True when `PRAGMA integrity_check` reports exactly `ok` (False if it cannot even run)."""
    try:
        rows = list(await conn.execute_fetchall("PRAGMA integrity_check"))
    except sqlite3.DatabaseError:
        return False
    return len(rows) == 1 and rows[0][0] == "ok"


async def _migrate_path(path: Path) -> list[int]:
    conn = await connect(path)
    try:
        return await migrate(conn)
    finally:
        await conn.close()


def migrate_path(path: Path) -> list[int]:
    """Synchronous `connect` + `migrate` + close, for the CLI. Returns the numbers applied."""
    return asyncio.run(_migrate_path(Path(path)))


#: seconds between tries of a write that failed for a passing reason (see `retrying`)
RETRY_DELAYS: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
#: errors worth trying again: "database is locked" past the busy timeout, "disk is full", I/O
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (sqlite3.OperationalError, OSError)


async def retrying(op: Callable[[], Awaitable[T]], what: str, *, delays: Sequence[float] = RETRY_DELAYS) -> T:
    """Await `op()`, trying again after each delay while it fails with a `TRANSIENT_ERRORS` error.

    The last error is raised once the delays are used up; any other error at once.
    """
    for delay in (*delays, None):
        try:
            return await op()
        except TRANSIENT_ERRORS as exc:
            if delay is None:
                raise
            log.warning("%s failed (%s); trying again in %.1f s", what, exc, delay)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover
