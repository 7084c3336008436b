"""Fixtures shared by the top-level tests (tests/e2e and tests/generator have their own conftest.py;
nothing here is meant for `from conftest import ...`)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import pytest

from bot.jobs.db import MIGRATIONS_DIR

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/pg_server.py, a plain module
import pg_server as pg_harness

MIGRATIONS = MIGRATIONS_DIR
T = TypeVar("T")

#: the backends the queue contract suite runs on (the `backend` fixture)
BACKENDS = ("sqlite", "postgres")
#: the database every PostgreSQL test database is copied from (migrated once per session)
PG_TEMPLATE = "ponybot_template"
_PG_MISSING = "PostgreSQL server binaries not found (apt-get install postgresql)"
_pg_skipped: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "postgres: needs the throwaway PostgreSQL server (tests/pg_server.py)")
    config.addinivalue_line(
        "markers", "sqlite_only(reason): a queue test that reads SQLite internals; not run on PostgreSQL"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run every test that uses the `backend` fixture on each backend (SQLite only when marked)."""
    if "backend" not in metafunc.fixturenames:
        return
    only_sqlite = metafunc.definition.get_closest_marker("sqlite_only") is not None
    params = [
        pytest.param(name, marks=pytest.mark.postgres) if name == "postgres" else name
        for name in BACKENDS
        if name == "sqlite" or not only_sqlite
    ]
    metafunc.parametrize("backend", params, indirect=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without server binaries, skip the PostgreSQL tests (fail them with PONY_TEST_POSTGRES=required)."""
    if pg_harness.find_bindir() is not None or pg_harness.postgres_required():
        return
    skip = pytest.mark.skip(reason=_PG_MISSING)
    for item in items:
        if item.get_closest_marker("postgres") is not None or "pg_server" in getattr(
            item, "fixturenames", ()
        ):
            item.add_marker(skip)
            _pg_skipped.append(item.nodeid)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _pg_skipped:
        terminalreporter.write_line(f"{_PG_MISSING}; skipping {len(_pg_skipped)} PostgreSQL tests")


def _in_thread(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion on a loop of its own (sync fixtures may sit inside a test's loop)."""

    async def run() -> T:
        return await make()

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, run()).result()


async def _pg_execute(url: str, *statements: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """The queue backend under test: "sqlite" or "postgres" (parametrized by pytest_generate_tests)."""
    return str(request.param)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[pg_harness.PgServer]:
    """A PostgreSQL cluster for the session, with the migrated template database; removed at the end."""
    from bot.jobs.pg_db import migrate_url

    bindir = pg_harness.find_bindir()
    if bindir is None:
        pytest.fail(f"{_PG_MISSING}; {pg_harness.REQUIRED_ENV}=required", pytrace=False)
    server = pg_harness.PgServer(bindir)
    try:
        server.start()
        _in_thread(lambda: _pg_execute(server.url(), f"CREATE DATABASE {PG_TEMPLATE}"))
        _in_thread(lambda: migrate_url(server.url(PG_TEMPLATE)))
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(pg_server: pg_harness.PgServer) -> Iterator[str]:
    """The URL of a fresh, migrated PostgreSQL database of this test's own (dropped afterwards)."""
    name = pg_harness.unique_database_name()
    admin = pg_server.url()
    _in_thread(lambda: _pg_execute(admin, f"CREATE DATABASE {name} TEMPLATE {PG_TEMPLATE}"))
    try:
        yield pg_server.url(name)
    finally:
        _in_thread(lambda: _pg_execute(admin, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


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
