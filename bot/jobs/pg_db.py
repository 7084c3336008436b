"""PostgreSQL connection pool set-up and the schema migration runner (the twin of bot/jobs/db.py).

Migrations are files `NNNN_name.sql` in `bot/jobs/migrations_pg/`, numbered like the SQLite ones
in `bot/jobs/migrations/` (version N is the same schema on both engines). The version is the one
row of the `schema_version` table. `migrate` holds a session advisory lock (`MIGRATE_LOCK`) while
it reads the version and applies files, each in its own transaction together with the version
bump, so two processes migrating at once apply each file once and a failed file changes nothing.

Driver: asyncpg (native asyncio, binary protocol, a built-in pool, `add_listener` for
LISTEN/NOTIFY, no libpq needed). It ships no type information, hence the `type: ignore` below.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import asyncpg  # type: ignore[import-untyped]

from bot.jobs.db import DatabaseTooNew, MigrationError, available_migrations

#: The `migrations_pg/` folder inside this package (shipped in the wheel as package data).
MIGRATIONS_PG_DIR = Path(__file__).resolve().parent / "migrations_pg"
#: pg_advisory_lock key held while migrating ("ponymigr" as an integer; any constant unique to us)
MIGRATE_LOCK = 0x706F6E796D696772
#: what connecting to (or talking with) an unreachable or refusing server raises
CONNECT_ERRORS: tuple[type[BaseException], ...] = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)
#: pool sizes: a worker claims, heartbeats and delivers concurrently; a few connections are plenty
POOL_MIN_SIZE = 1
POOL_MAX_SIZE = 8

_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    version  integer NOT NULL
);
INSERT INTO schema_version (only_row, version) VALUES (true, 0) ON CONFLICT (only_row) DO NOTHING;
"""


def database_place(url: str) -> str:
    """Where a database URL points, without its user or password: `host:port/database`."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.hostname or 'localhost'}{port}{parts.path or '/'}"


async def create_pool(
    url: str,
    *,
    application_name: str = "ponybot",
    min_size: int = POOL_MIN_SIZE,
    max_size: int = POOL_MAX_SIZE,
) -> asyncpg.Pool:
    """A connection pool to the database at `url` (`postgresql://user@host:port/db`), not migrated."""
    return await asyncpg.create_pool(
        url,
        min_size=min_size,
        max_size=max_size,
        server_settings={"application_name": application_name},
    )


async def schema_version(conn: asyncpg.Connection) -> int:
    """The version recorded in `schema_version` (0 when the table does not exist yet)."""
    exists = await conn.fetchval("SELECT to_regclass('schema_version') IS NOT NULL")
    if not exists:
        return 0
    version = await conn.fetchval("SELECT version FROM schema_version")
    return int(version or 0)


async def migrate(conn: asyncpg.Connection, folder: Path | None = None) -> list[int]:
    """Apply pending migrations in order; return the numbers applied (empty when up to date).

    Raises `DatabaseTooNew` when the database is newer than the newest migration known here, and
    `MigrationError` (after rolling that file back) when a migration fails.
    """
    migrations = available_migrations(MIGRATIONS_PG_DIR if folder is None else Path(folder))
    newest = migrations[-1][0] if migrations else 0
    applied: list[int] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATE_LOCK)
    try:
        await conn.execute(_VERSION_TABLE)
        current = await schema_version(conn)
        if current > newest:
            database = await conn.fetchval("SELECT current_database()")
            raise DatabaseTooNew(
                f"The PostgreSQL database {database} is version {current} but this ponybot only knows up "
                f"to {newest}; upgrade ponybot or point PONY_DATABASE_URL elsewhere."
            )
        for number, file in migrations:
            if number <= current:
                continue
            script = file.read_text(encoding="utf-8")
            try:
                async with conn.transaction():
                    await conn.execute(script)
                    await conn.execute("UPDATE schema_version SET version = $1", number)
            except asyncpg.PostgresError as exc:
                raise MigrationError(f"Migration {file.name} failed and was rolled back: {exc}") from exc
            current = number
            applied.append(number)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATE_LOCK)
    return applied


async def migrate_url(url: str, *, application_name: str = "ponybot") -> list[int]:
    """Connect to `url`, apply pending migrations, disconnect; return the numbers applied."""
    conn = await asyncpg.connect(url, server_settings={"application_name": application_name})
    try:
        return await migrate(conn)
    finally:
        await conn.close()
