"""The `ponybot` console script: settings errors, migrate, invite-url."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

PONYBOT = Path(sys.executable).with_name("ponybot")


def run(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PONYBOT), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )


def base_env(tmp_path: Path) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PONY_", "DISCORD_"))}
    env["PONY_DATA_DIR"] = str(tmp_path / "data")
    return env


def test_bad_setting_is_one_clear_line_and_nonzero_exit(tmp_path: Path) -> None:
    env = base_env(tmp_path) | {"PONY_MAX_STEPS": "lots", "DISCORD_TOKEN": "sekrit.token.value"}
    result = run("migrate", env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "Invalid setting PONY_MAX_STEPS: Input should be a valid integer, unable to parse string as an integer"
        " (got 'lots')"
    )
    assert "Traceback" not in result.stderr and "sekrit" not in result.stderr + result.stdout


def test_run_without_token_says_what_to_set(tmp_path: Path) -> None:
    result = run("run", env=base_env(tmp_path), cwd=tmp_path)
    assert result.returncode == 2
    assert "DISCORD_TOKEN" in result.stderr and "Traceback" not in result.stderr


def test_migrate_creates_and_is_idempotent(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    first = run("migrate", env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "applied [1" in first.stdout
    again = run("migrate", env=env, cwd=tmp_path)
    assert again.returncode == 0 and "up to date" in again.stdout
    with sqlite3.connect(tmp_path / "data" / "jobs.sqlite3") as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] >= 1
        conn.execute("PRAGMA user_version = 999")
    newer = run("migrate", env=env, cwd=tmp_path)
    assert newer.returncode == 2 and "version 999" in newer.stderr


@pytest.mark.postgres
def test_migrate_with_a_database_url_creates_the_postgresql_schema(tmp_path: Path, pg_url: str) -> None:
    env = {**base_env(tmp_path), "PONY_DATABASE_URL": pg_url}
    first = run("migrate", env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("127.0.0.1:") and "hunter2" not in first.stdout
    again = run("migrate", env=env, cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.strip().endswith("up to date")

    async def version() -> int:
        import asyncpg

        from bot.jobs.pg_db import schema_version

        conn = await asyncpg.connect(pg_url)
        try:
            return await schema_version(conn)
        finally:
            await conn.close()

    from bot.jobs.db import available_migrations
    from bot.jobs.pg_db import MIGRATIONS_PG_DIR

    assert asyncio.run(version()) == available_migrations(MIGRATIONS_PG_DIR)[-1][0]
    assert not (tmp_path / "data" / "jobs.sqlite3").exists(), "no SQLite file once the queue is in PostgreSQL"


def test_migrate_with_an_unreachable_database_is_one_line(tmp_path: Path) -> None:
    env = {**base_env(tmp_path), "PONY_DATABASE_URL": "postgresql://ponybot:hunter2@127.0.0.1:1/ponybot"}
    result = run("migrate", env=env, cwd=tmp_path)
    assert result.returncode == 5
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "Could not migrate the PostgreSQL database at 127.0.0.1:1/ponybot"
    )
    assert "hunter2" not in result.stderr


def test_invite_url_has_scopes_and_permissions(tmp_path: Path) -> None:
    result = run("invite-url", "123456789", env=base_env(tmp_path), cwd=tmp_path)
    assert result.returncode == 0
    url = result.stdout.strip()
    assert url.startswith("https://discord.com/oauth2/authorize?client_id=123456789")
    assert "scope=bot%20applications.commands" in url
    assert "permissions=117760" in url  # view, send, embed links, attach files, read history


def test_run_with_discord_unreachable_is_one_line(tmp_path: Path) -> None:
    env = base_env(tmp_path) | {
        "DISCORD_TOKEN": "sekrit.token.value",
        "DISCORD_API_BASE": "http://127.0.0.1:9",  # nothing listens on the discard port
        "DISCORD_GATEWAY_URL": "ws://127.0.0.1:9/gateway",
        "PONY_MODEL": str(tmp_path / "no-model"),
    }
    result = run("run", env=env, cwd=tmp_path)
    assert result.returncode == 3
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Could not reach Discord at http://127.0.0.1:9")
    assert "Traceback" not in result.stderr and "sekrit" not in result.stderr + result.stdout


def test_worker_without_database_url_is_one_line(tmp_path: Path) -> None:
    for env in (base_env(tmp_path), base_env(tmp_path) | {"DISCORD_TOKEN": "sekrit.token.value"}):
        result = run("worker", env=env, cwd=tmp_path)
        assert result.returncode == 2
        assert result.stderr.strip() == (
            "ponybot worker needs PONY_DATABASE_URL (PostgreSQL) to share the queue with `ponybot run`;"
            " with SQLite, one `ponybot run` is the worker."
        )
        assert result.stdout == "" and not (tmp_path / "data" / "jobs.sqlite3").exists()


def test_worker_with_the_database_unreachable_is_one_line(tmp_path: Path) -> None:
    env = base_env(tmp_path) | {
        "DISCORD_TOKEN": "sekrit.token.value",
        "PONY_DATABASE_URL": "postgresql://pony:hunter2@127.0.0.1:9/ponybot",  # the discard port
        "DISCORD_API_BASE": "http://127.0.0.1:9",
    }
    result = run("worker", env=env, cwd=tmp_path)
    assert result.returncode == 5
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Could not open the PostgreSQL queue at 127.0.0.1:9/ponybot (")
    assert last.endswith("Check PONY_DATABASE_URL and that the server is up.")
    assert "Traceback" not in result.stderr
    assert "hunter2" not in result.stderr + result.stdout and "sekrit" not in result.stderr + result.stdout
