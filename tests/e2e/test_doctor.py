"""`ponybot doctor` as the admin runs it: a subprocess against the loopback Discord and the tiny model."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import PONYBOT_SCRIPT, bot_env
from fake_discord import (
    EMBED_LINKS,
    READ_MESSAGE_HISTORY,
    SEND_MESSAGES,
    VIEW_CHANNEL,
    FakeDiscord,
)

from bot.jobs.guild_settings import GuildSettingsStore
from bot.jobs.models import QueueLimits
from bot.jobs.queue import JobQueue

ROOT = Path(__file__).resolve().parents[2]
#: deliberately not token-shaped, so the test proves it is never printed (not just redacted by shape)
SECRET = "s3cret-doctor-token-value"


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    server = FakeDiscord(bot_token=SECRET)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def doctor_env(fake: FakeDiscord, tmp_path: Path, model: Path, **extra: object) -> dict[str, str]:
    """The process environment: this machine's, minus any ponybot settings, plus the test's."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PONY_", "DISCORD_"))}
    env = bot_env(fake, tmp_path / "data", model, HF_HUB_OFFLINE="1", **extra)
    # run this checkout's code, whatever the environment's editable install points at
    python_path = os.pathsep.join(p for p in (str(ROOT), base.get("PYTHONPATH", "")) if p)
    return {**base, **env, "PYTHONPATH": python_path}


async def run_doctor(env: dict[str, str], cwd: Path) -> tuple[int, list[str], str]:
    """Run `ponybot doctor`; (exit code, stdout lines, stdout + stderr)."""
    proc = await asyncio.create_subprocess_exec(
        str(PONYBOT_SCRIPT),
        "doctor",
        env=env,
        cwd=cwd,  # no stray .env from the repository
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 240)
    stdout, stderr = out.decode(), err.decode()
    return proc.returncode or 0, stdout.splitlines(), stdout + stderr


def check_lines(lines: list[str]) -> list[str]:
    """The per-check lines (not the summary)."""
    return [line for line in lines if line.startswith(("ok  ", "FAIL "))]


def line_starting(lines: list[str], prefix: str) -> str:
    found = [line for line in lines if line.startswith(prefix)]
    assert found, f"no line starting {prefix!r} in:\n" + "\n".join(lines)
    return found[0]


def assert_secret_kept(everything: str, *secrets: str) -> None:
    for secret in (SECRET, *secrets):
        assert secret not in everything


async def test_all_ok(fake: FakeDiscord, tiny_model: Path, tmp_path: Path) -> None:
    rc, lines, everything = await run_doctor(doctor_env(fake, tmp_path, tiny_model), tmp_path)
    checks = check_lines(lines)
    assert rc == 0, everything
    assert all(line.startswith("ok  ") for line in checks), everything
    assert lines[-1] == "All checks passed."
    assert line_starting(checks, "ok  settings: ")
    assert "writable" in line_starting(checks, f"ok  data folder {tmp_path / 'data'}")
    assert "not created yet" in line_starting(checks, "ok  database ")
    assert line_starting(checks, "ok  model tiny-sd loads on cpu (float32)")
    assert line_starting(checks, "ok  upscaler: none set")
    assert line_starting(checks, "ok  metrics: off")
    assert line_starting(checks, f"ok  Discord token: logged in as ponybot (id {fake.bot_user_id})")
    assert line_starting(checks, "ok  Discord servers: 1 (Pony Test Guild)")
    assert "can post in 2 channel(s) (#general, #nsfw)" in line_starting(checks, "ok  server Pony Test Guild")
    assert (tmp_path / "data" / "images").is_dir()
    assert_secret_kept(everything)
    # it really asked Discord with the configured token
    me = fake.requests_matching("GET", r"^/users/@me$")
    assert me and all(r.status == 200 for r in me)
    assert fake.requests_matching("GET", r"^/users/@me/guilds$")


#: what the doctor itself prints: check lines, the stderr note while the model loads, the summary
OWN_LINE = re.compile(r"^(ok  |FAIL |\(loading the model )|^(All checks passed\.|\d+ check\(s\) failed\.)$")


async def test_prints_only_its_own_lines(fake: FakeDiscord, tiny_model: Path, tmp_path: Path) -> None:
    """No library progress bars or warnings around the checks: every line shown is the doctor's own."""
    rc, lines, everything = await run_doctor(doctor_env(fake, tmp_path, tiny_model), tmp_path)
    assert rc == 0, everything
    model = line_starting(lines, "ok  model tiny-sd loads on cpu")
    assert model.endswith("; 1 torch thread(s) (PONY_CPU_THREADS)")  # bot_env's PONY_CPU_THREADS=1
    foreign = [line for line in everything.splitlines() if line.strip() and not OWN_LINE.match(line)]
    assert foreign == [], everything
    assert "Loading" not in everything and "%|" not in everything, everything


async def test_bad_token(fake: FakeDiscord, tiny_model: Path, tmp_path: Path) -> None:
    wrong = "wrong-secret-token-123"
    env = doctor_env(fake, tmp_path, tiny_model, DISCORD_TOKEN=wrong)
    rc, lines, everything = await run_doctor(env, tmp_path)
    assert rc == 1, everything
    failed = [line for line in check_lines(lines) if line.startswith("FAIL")]
    assert failed == [
        "FAIL Discord token: Discord refused it (401 Unauthorized): reset the token in the Discord"
        " Developer Portal (your application > Bot > Reset Token) and put the new one in .env as DISCORD_TOKEN"
    ]
    assert lines[-1] == "1 check(s) failed."
    assert_secret_kept(everything, wrong)


async def test_missing_permission(fake: FakeDiscord, tiny_model: Path, tmp_path: Path) -> None:
    fake.set_bot_permissions(
        fake.channel_id, VIEW_CHANNEL | SEND_MESSAGES | EMBED_LINKS | READ_MESSAGE_HISTORY
    )
    # every text channel the bot can see
    rc, lines, everything = await run_doctor(doctor_env(fake, tmp_path, tiny_model), tmp_path)
    assert rc == 1, everything
    failed = [line for line in check_lines(lines) if line.startswith("FAIL")]
    assert len(failed) == 1, everything
    assert failed[0].startswith(
        f"FAIL channel #general ({fake.channel_id}) in Pony Test Guild: missing Attach Files: allow"
    )
    assert "#nsfw" in line_starting(lines, "ok  server Pony Test Guild: the bot can post in 1 channel(s)")
    assert_secret_kept(everything)

    # where the server's admins restricted the bot (/pony-admin channels allow), only those count
    unknown = 1_000_000_000_000_000_999
    queue = await JobQueue.open(tmp_path / "data" / "jobs.sqlite3", QueueLimits())
    try:
        store = GuildSettingsStore(queue)
        for channel_id in (fake.channel_id, fake.nsfw_channel_id, unknown):
            await store.allow_channel(fake.guild_id, fake.admin.id, channel_id)
    finally:
        await queue.close()
    rc, lines, everything = await run_doctor(doctor_env(fake, tmp_path, tiny_model), tmp_path)
    assert rc == 1, everything
    guild = "Pony Test Guild"
    assert line_starting(
        lines, f"FAIL channel #general ({fake.channel_id}) in {guild}: missing Attach Files: "
    )
    assert line_starting(
        lines, f"ok  channel #nsfw ({fake.nsfw_channel_id}) in {guild}: the bot has View Channel, "
    )
    assert line_starting(lines, f"FAIL channel {unknown} (allowed in {guild}): no such channel")
    assert not [line for line in lines if line.startswith("ok  server ")]
    assert_secret_kept(everything)


async def test_unwritable_data_folder(fake: FakeDiscord, tiny_model: Path, tmp_path: Path) -> None:
    if os.geteuid() == 0:  # root writes through any mode bits: make the "folder" a file's child instead
        blocker = tmp_path / "blocker"
        blocker.write_text("not a folder")
        data = blocker / "data"
    else:
        data = tmp_path / "readonly"
        data.mkdir()
        data.chmod(0o555)
    env = doctor_env(fake, tmp_path, tiny_model, PONY_DATA_DIR=str(data))
    rc, lines, everything = await run_doctor(env, tmp_path)
    assert rc == 1, everything
    folder = line_starting(lines, f"FAIL data folder {data}: not writable (")
    assert "or set PONY_DATA_DIR" in folder
    assert line_starting(lines, "FAIL database ")
    assert line_starting(lines, "ok  model tiny-sd loads")  # the other checks still run
    assert line_starting(lines, "ok  Discord token: logged in")
    assert_secret_kept(everything)


async def test_unloadable_model(fake: FakeDiscord, tmp_path: Path) -> None:
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"this is not a checkpoint" * 10)
    rc, lines, everything = await run_doctor(doctor_env(fake, tmp_path, bad), tmp_path)
    assert rc == 1, everything
    failed = [line for line in check_lines(lines) if line.startswith("FAIL")]
    assert len(failed) == 1, everything
    assert failed[0].startswith(f"FAIL model: Could not load model '{bad}'")
    assert "Set PONY_MODEL" in failed[0]
    assert line_starting(lines, "ok  Discord token: logged in")
    assert_secret_kept(everything)


async def test_bad_setting_is_one_line(fake: FakeDiscord, tiny_model: Path, tmp_path: Path) -> None:
    env = doctor_env(fake, tmp_path, tiny_model, PONY_MAX_STEPS="lots")
    rc, lines, everything = await run_doctor(env, tmp_path)
    assert rc == 2, everything
    assert len(lines) == 1 and lines[0].startswith("FAIL settings: Invalid setting PONY_MAX_STEPS: ")
    assert_secret_kept(everything)
