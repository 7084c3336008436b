"""`ponybot doctor` with PONY_DATABASE_URL: the PostgreSQL line, ok or one line naming the cause."""

from __future__ import annotations

import io
import socket
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pytest
from engine_queue import insert_job, open_queue

from bot.config import load_settings
from bot.jobs.db import available_migrations
from bot.jobs.guild_settings import GuildSettingsStore
from bot.jobs.pg_db import MIGRATIONS_PG_DIR
from bot.ops.doctor import Report, check_postgres, postgres_failure, url_password

NEWEST = available_migrations(MIGRATIONS_PG_DIR)[-1][0]


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def doctor_lines(url: str, tmp_path: Path) -> tuple[list[str], Report, dict[int, tuple[int, ...]]]:
    out = io.StringIO()
    report = Report(out, secrets=[url_password(url)])
    settings = load_settings(data_dir=tmp_path, database_url=url)
    allowed = await check_postgres(settings, report)
    return out.getvalue().splitlines(), report, allowed


@pytest.mark.postgres
async def test_a_reachable_database_reports_server_and_schema(
    request: pytest.FixtureRequest, pg_url: str, tmp_path: Path
) -> None:
    async with open_queue("postgres", request, tmp_path) as queue:
        await queue.enqueue(kind="txt2img", params={"prompt": "p"}, channel_id=1, user_id=2)
        await insert_job(queue, status="done", created_at=1.0, updated_at=2.0)
        await GuildSettingsStore(queue).allow_channel(55, 1, 66)
    lines, report, allowed = await doctor_lines(pg_url, tmp_path)
    place = pg_url.split("@", 1)[1]
    assert report.failures == 0
    assert len(lines) == 1 and lines[0].startswith(f"ok  database {place}: PostgreSQL 15.")
    assert lines[0].endswith(f", schema {NEWEST}, up to date; 2 jobs, 1 open")
    assert allowed == {55: (66,)}, "the Discord check looks at the channels a server allowed"


async def test_a_closed_port_is_one_line_naming_the_refused_connection(tmp_path: Path) -> None:
    port = closed_port()
    url = f"postgresql://ponybot:s3cret-pw@127.0.0.1:{port}/ponybot"
    lines, report, allowed = await doctor_lines(url, tmp_path)
    assert report.failures == 1 and allowed == {}
    assert lines == [
        f"FAIL database 127.0.0.1:{port}/ponybot: connection refused at 127.0.0.1:{port}: is PostgreSQL"
        " running there, listening on that address (listen_addresses) and port?"
    ]
    assert "s3cret-pw" not in lines[0] and "Traceback" not in lines[0]


@pytest.mark.postgres
async def test_a_missing_database_and_an_unknown_user_are_named(pg_url: str, tmp_path: Path) -> None:
    server = pg_url.rsplit("/", 1)[0]  # postgresql://postgres@127.0.0.1:PORT
    host = server.split("@", 1)[1]
    lines, report, _ = await doctor_lines(f"{server}/no_such_db", tmp_path)
    assert report.failures == 1 and len(lines) == 1
    assert lines[0].startswith(
        f"FAIL database {host}/no_such_db: database no_such_db does not exist on {host}"
    )
    nobody = server.replace("postgresql://postgres@", "postgresql://nobody@") + "/postgres"
    lines, report, _ = await doctor_lines(nobody, tmp_path)
    assert report.failures == 1 and len(lines) == 1
    assert lines[0].startswith(f"FAIL database {host}/postgres: the server refused user nobody (")
    assert 'role "nobody" does not exist' in lines[0]


def test_a_bad_password_names_the_password() -> None:
    """The throwaway server trusts every local login, so the server's answer is built here."""
    url = "postgresql://ponybot:wrong@db-host:5433/ponybot"
    error = asyncpg.InvalidPasswordError('password authentication failed for user "ponybot"')
    assert postgres_failure(error, url) == (
        "password authentication failed for user ponybot: check the password in PONY_DATABASE_URL"
    )
    assert postgres_failure(TimeoutError(), url).startswith("no answer from db-host:5433 within 5 s")
    assert url_password(url) == "wrong" and url_password("postgresql://db/ponybot") == ""
