"""bot.jobs.db: connection pragmas and the migration runner."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from bot.jobs import db
from bot.jobs.db import (
    MIGRATIONS_DIR,
    DatabaseTooNew,
    MigrationError,
    available_migrations,
    connect,
    integrity_ok,
    migrate,
    migrate_path,
    schema_version,
    split_statements,
)


def write_migrations(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, sql in files.items():
        (folder / name).write_text(sql, encoding="utf-8")
    return folder


def tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


async def test_connect_creates_parent_dir_and_sets_pragmas(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "deeper" / "jobs.sqlite3"
    conn = await connect(path)
    try:
        assert path.parent.is_dir()
        pragmas = {}
        for name in ("journal_mode", "busy_timeout", "foreign_keys", "synchronous"):
            rows = await conn.execute_fetchall(f"PRAGMA {name}")
            pragmas[name] = next(iter(rows))[0]
        assert pragmas == {"journal_mode": "wal", "busy_timeout": 10000, "foreign_keys": 1, "synchronous": 1}
        row = next(iter(await conn.execute_fetchall("SELECT 1 AS one")))
        assert row["one"] == 1  # aiosqlite.Row: access by name
        assert conn.isolation_level is None  # autocommit; callers run BEGIN IMMEDIATE themselves
        assert await integrity_ok(conn)
    finally:
        await conn.close()


async def test_real_migrations_apply_and_rerun_is_noop(tmp_path: Path) -> None:
    numbers = [n for n, _ in available_migrations()]
    assert numbers and numbers[0] == 1 and numbers == sorted(numbers)
    path = tmp_path / "jobs.sqlite3"
    conn = await connect(path)
    try:
        assert await migrate(conn) == numbers
        assert await schema_version(conn) == numbers[-1]
        assert await migrate(conn) == []
        assert await schema_version(conn) == numbers[-1]
    finally:
        await conn.close()
    assert {"jobs", "queue_guilds", "queue_users", "queue_stats"} <= tables(path)


async def test_migrations_applied_in_numeric_order(tmp_path: Path) -> None:
    folder = write_migrations(
        tmp_path / "m",
        {
            "0002_second.sql": "INSERT INTO log VALUES ('second');",
            "0001_first.sql": "CREATE TABLE log (step TEXT);\nINSERT INTO log VALUES ('first');",
            "0010_tenth.sql": "INSERT INTO log VALUES ('tenth');",
            "README.md": "not a migration",
            "0003_notes.txt": "ignored too",
        },
    )
    conn = await connect(tmp_path / "x.db")
    try:
        assert await migrate(conn, folder) == [1, 2, 10]
        rows = await conn.execute_fetchall("SELECT step FROM log ORDER BY rowid")
        assert [r[0] for r in rows] == ["first", "second", "tenth"]
        assert await schema_version(conn) == 10
        # a new file numbered above the current version is applied on the next run, only it
        write_migrations(folder, {"0011_more.sql": "INSERT INTO log VALUES ('eleventh');"})
        assert await migrate(conn, folder) == [11]
        rows = await conn.execute_fetchall("SELECT count(*) FROM log")
        assert next(iter(rows))[0] == 4
    finally:
        await conn.close()


async def test_failing_migration_rolls_back_and_keeps_version(tmp_path: Path) -> None:
    folder = write_migrations(
        tmp_path / "m",
        {
            "0001_ok.sql": "CREATE TABLE a (x INTEGER);",
            "0002_broken.sql": "CREATE TABLE b (x INTEGER);\nINSERT INTO a VALUES (1);\nINSERT INTO nope VALUES (1);",
        },
    )
    path = tmp_path / "x.db"
    conn = await connect(path)
    try:
        with pytest.raises(
            MigrationError, match=r"0002_broken\.sql failed and was rolled back: no such table"
        ):
            await migrate(conn, folder)
        assert await schema_version(conn) == 1
        assert not conn.in_transaction
        rows = await conn.execute_fetchall("SELECT count(*) FROM a")
        assert next(iter(rows))[0] == 0
    finally:
        await conn.close()
    assert tables(path) == {"a"}  # table b from the failed migration is gone


async def test_too_new_database_is_refused_with_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    with sqlite3.connect(path) as raw:
        raw.execute("PRAGMA user_version = 99")
    newest = available_migrations()[-1][0]
    conn = await connect(path)
    try:
        with pytest.raises(DatabaseTooNew) as info:
            await migrate(conn)
        assert str(info.value) == (
            f"The database at {path} is version 99 but this ponybot only knows up to {newest}; "
            "upgrade ponybot or point PONY_DB elsewhere."
        )
        assert await schema_version(conn) == 99
    finally:
        await conn.close()
    assert tables(path) == set()


def test_migrate_path_sync_helper(tmp_path: Path) -> None:
    path = tmp_path / "cli" / "jobs.sqlite3"
    assert migrate_path(path) == [n for n, _ in available_migrations()]
    assert migrate_path(path) == []
    assert "jobs" in tables(path)


def test_duplicate_migration_numbers_rejected(tmp_path: Path) -> None:
    folder = write_migrations(tmp_path / "m", {"0001_a.sql": "SELECT 1;", "0001_b.sql": "SELECT 2;"})
    with pytest.raises(MigrationError, match="Two migrations are numbered 0001"):
        available_migrations(folder)


def test_split_statements_keeps_triggers_strings_and_comments_whole() -> None:
    script = """
    -- a comment; with a semicolon
    CREATE TABLE t (x TEXT DEFAULT 'a;b');
    CREATE TRIGGER tr AFTER INSERT ON t BEGIN
        UPDATE t SET x = 'c;d';
        SELECT 1;
    END;
    -- trailing comment
    """
    statements = split_statements(script)
    assert len(statements) == 2
    assert statements[1].startswith("CREATE TRIGGER") and statements[1].endswith("END;")
    with pytest.raises(MigrationError, match="Incomplete SQL statement"):
        split_statements("CREATE TABLE t (x);\nSELECT 1")


def test_migrations_dir_is_inside_the_package() -> None:
    assert Path(db.__file__).resolve().parent / "migrations" == MIGRATIONS_DIR
    assert (MIGRATIONS_DIR / "0001_jobs.sql").is_file()


async def test_integrity_ok_false_on_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    with sqlite3.connect(path) as raw:
        raw.execute("PRAGMA journal_mode = DELETE")
        raw.execute("CREATE TABLE t (x INTEGER PRIMARY KEY, y TEXT)")
        raw.execute("CREATE INDEX t_y ON t(y)")
        raw.executemany("INSERT INTO t VALUES (?, ?)", [(i, f"row {i}" * 20) for i in range(2000)])
    data = bytearray(path.read_bytes())
    page = 4096
    # scribble over a page in the middle of the file (index/table b-tree pages)
    data[page * 10 + 100 : page * 10 + 1000] = b"\x07" * 900
    path.write_bytes(bytes(data))
    conn = await connect(path)
    try:
        assert not await integrity_ok(conn)
    finally:
        await conn.close()
