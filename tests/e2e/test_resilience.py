"""Restarts, kill -9, expired interaction tokens and gateway reconnects: one result per job."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from conftest import (
    SubprocessBot,
    bot_env,
    is_result,
    job_messages,
    job_status,
    slow_down_generation,
    wait_for_status,
    wait_until,
)
from fake_discord import FakeDiscord
from test_buttons import button_id, make_result


async def test_buttons_work_after_a_restart(discord_server: FakeDiscord, start_bot) -> None:
    fake = discord_server
    await start_bot()
    original = await make_result(fake)
    await start_bot.runners[0].stop()

    bot = await start_bot()
    assert fake.identify_count == 2
    click = await fake.click(original.id, button_id(original, "V1"), user=fake.bob)
    ack = await click.wait_followup()
    assert ack.content.startswith("Queued as job #2")
    variation = await fake.wait_for_message(lambda m: is_result(m) and m.id != original.id, timeout=60)
    assert variation.reference_id == original.id
    assert (await bot.queue.get(2)).parent_id == 1


async def test_expired_interaction_token_still_delivers(discord_server: FakeDiscord, start_bot) -> None:
    fake = discord_server
    bot = await start_bot()
    bot.worker.pause()
    interaction = await fake.slash("pony", {"prompt": "patience"})
    await interaction.wait_followup()
    fake.expire_token(interaction)  # the job waited past the 15-minute interaction token
    bot.worker.resume()
    result = await fake.wait_for_message(is_result, timeout=60)
    assert job_messages(fake, 1) == [result]
    assert await wait_for_status(bot, 1, "done", 10)
    rejected = [r for r in fake.requests if "/webhooks/" in r.path and r.status == 401]
    assert rejected == [], "delivery never used the expired interaction token"


async def test_gateway_reconnect_mid_job_delivers_once(discord_server: FakeDiscord, start_bot) -> None:
    fake = discord_server
    bot = await start_bot()
    slow_down_generation(bot, 0.2)
    interaction = await fake.slash("pony", {"prompt": "through the storm", "steps": 12})
    await interaction.wait_followup()
    await wait_for_status(bot, 1, "running", 20)
    await fake.reconnect_gateway()
    await fake.drop_gateway()
    result = await fake.wait_for_message(is_result, timeout=60)
    assert fake.resume_count >= 2
    assert await wait_for_status(bot, 1, "done", 10)
    assert job_messages(fake, 1) == [result]


async def test_kill_9_while_generating_loses_and_doubles_nothing(
    discord_server: FakeDiscord, tiny_model: Path, tmp_path: Path
) -> None:
    fake = discord_server
    data = tmp_path / "data"
    # big enough steps that the kill lands mid-generation on any machine
    # job 1 is long (100 steps at 256x256) so the kill lands mid-generation on any machine
    env = bot_env(fake, data, tiny_model, PONY_MAX_STEPS=100, PONY_BASE_RESOLUTION=256)
    first = SubprocessBot(env, tmp_path / "bot1.log")
    first.start()
    try:
        await fake.wait_until_connected(timeout=60)
        await wait_until(lambda: fake.find_command("pony"), 60, "commands synced")
        for user, steps in ((fake.alice, 100), (fake.bob, 3), (fake.mod, 3)):
            options = {"prompt": f"job of {user.username}", "steps": steps}
            interaction = await fake.slash("pony", options, user=user)
            await interaction.wait_followup(timeout=30)
        await wait_until(lambda: _shows_progress(fake, 1), 120, "job 1 generating")
    finally:
        first.kill()
    assert _db_status(data, 1) == "running"

    second = SubprocessBot(env, tmp_path / "bot2.log")
    second.start()
    try:
        await wait_until(
            lambda: all(_db_status(data, j) == "done" for j in (1, 2, 3)), 240, "all jobs done after restart"
        )
    finally:
        assert second.terminate() == 0, second.log()
    for job_id in (1, 2, 3):
        messages = job_messages(fake, job_id)
        assert len(messages) == 1 and is_result(messages[0]), (job_id, messages)
    attempts = _db_attempts(data, 1)
    assert attempts == 2  # claimed once by each process


def _shows_progress(fake: FakeDiscord, job_id: int) -> bool:
    return any(
        "step" in str(f.get("value")) and "step 0 of" not in str(f.get("value"))
        for m in job_messages(fake, job_id)
        for f in m.embeds[0].get("fields", [])
    )


def _db_status(data: Path, job_id: int) -> str | None:
    with sqlite3.connect(data / "jobs.sqlite3", timeout=10) as conn:
        row = conn.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return row[0] if row else None


def _db_attempts(data: Path, job_id: int) -> int:
    with sqlite3.connect(data / "jobs.sqlite3", timeout=10) as conn:
        return conn.execute("SELECT attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]


async def test_sigterm_puts_the_running_job_back_and_exits_cleanly(
    discord_server: FakeDiscord, tiny_model: Path, tmp_path: Path
) -> None:
    fake = discord_server
    data = tmp_path / "data"
    env = bot_env(
        fake, data, tiny_model, PONY_MAX_STEPS=100, PONY_BASE_RESOLUTION=256, PONY_SHUTDOWN_GRACE_S=0.5
    )
    first = SubprocessBot(env, tmp_path / "bot1.log")
    first.start()
    try:
        await fake.wait_until_connected(timeout=60)
        await wait_until(lambda: fake.find_command("pony"), 60, "commands synced")
        interaction = await fake.slash("pony", {"prompt": "interrupted", "steps": 100})
        await interaction.wait_followup(timeout=30)
        await wait_until(lambda: _shows_progress(fake, 1), 120, "job 1 generating")
    finally:
        code = first.terminate(timeout=60)
    assert code == 0, first.log()
    assert "Traceback" not in first.log()
    assert _db_status(data, 1) == "queued"
    assert _db_attempts(data, 1) == 0, "a clean shutdown does not count as a try"
    with sqlite3.connect(data / "jobs.sqlite3") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    second = SubprocessBot(env, tmp_path / "bot2.log")
    second.start()
    try:
        await wait_until(lambda: _db_status(data, 1) == "done", 240, "job done after restart")
    finally:
        second.terminate()
    messages = job_messages(fake, 1)
    assert len(messages) == 1 and is_result(messages[0])


async def test_interactions_answered_while_the_model_loads(
    discord_server: FakeDiscord, start_bot, monkeypatch
) -> None:
    import time as _time

    from generator.pipeline import Generator

    fake = discord_server
    original_load = Generator.load.__func__

    def slow_load(cls, config):
        _time.sleep(4)
        return original_load(cls, config)

    monkeypatch.setattr(Generator, "load", classmethod(slow_load))
    bot = await start_bot(wait_model=False)
    assert bot.engine.state.value == "loading"
    interaction = await fake.slash("pony", {"prompt": "early bird"})
    first = await interaction.wait_response(timeout=3)
    assert first.type == 5
    ack = await interaction.wait_followup()
    assert "The model is still loading" in ack.content
    assert interaction.errors == []
    result = await fake.wait_for_message(is_result, timeout=60)
    assert job_messages(fake, 1) == [result]


async def test_crash_before_the_status_message_id_was_recorded_posts_once(
    discord_server: FakeDiscord, start_bot
) -> None:
    fake = discord_server
    bot = await start_bot()
    bot.worker.pause()
    interaction = await fake.slash("pony", {"prompt": "lost id"})
    await interaction.wait_followup()
    status = (await wait_until(lambda: job_messages(fake, 1), 10, "status message"))[0]
    # as if the process died between posting the status message and recording its id
    await bot.queue.connection.execute("UPDATE jobs SET status_message_id = NULL WHERE id = 1")
    bot.worker.resume()
    await wait_for_status(bot, 1, "done", 60)
    messages = job_messages(fake, 1)
    assert [m.id for m in messages] == [status.id], "the bot found its own message and edited it"
    assert is_result(messages[0])


async def test_crash_after_posting_the_result_before_marking_done_posts_once(
    discord_server: FakeDiscord, start_bot, monkeypatch
) -> None:
    fake = discord_server
    bot = await start_bot()

    async def crash(*_args, **_kwargs):
        raise RuntimeError("simulated crash after the result was posted")

    monkeypatch.setattr(bot.queue, "mark_done", crash)
    interaction = await fake.slash("pony", {"prompt": "posted but not recorded"})
    await interaction.wait_followup()
    result = await fake.wait_for_message(is_result, timeout=60)
    assert await job_status(bot, 1) == "generated"
    await start_bot.runners[0].stop()

    bot = await start_bot()  # a fresh process: recovery delivers what was left generated
    await wait_for_status(bot, 1, "done", 60)
    assert job_messages(fake, 1) == [result]
    assert (await bot.queue.get(1)).result_message_id == result.id
