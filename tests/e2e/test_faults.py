"""Fault injection end to end: Discord errors, a dropped gateway, generator faults, a hung
generation, a model that cannot load, a full disk and a locked database. Each ends with the user
told and nothing lost or doubled."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import is_result, job_messages, slow_down_generation, wait_until, wait_until_async
from fake_discord import (
    ATTACH_FILES,
    EMBED_LINKS,
    READ_MESSAGE_HISTORY,
    SEND_MESSAGES,
    VIEW_CHANNEL,
    FakeDiscord,
    FakeMessage,
)
from test_bad_input import answer, job_total

from bot.errors import BUSY
from bot.runtime.engine import EngineState
from bot.runtime.worker import WorkerFailed
from generator.pipeline import BLANK_MESSAGE, OOM_MESSAGE


async def has_status(bot: Any, job_id: int, *statuses: str) -> bool:
    job = await bot.queue.get(job_id)
    return job is not None and job.status in statuses


def title(message: FakeMessage) -> str | None:
    return message.embeds[0].get("title") if message.embeds else None


def field(message: FakeMessage, name: str) -> str | None:
    fields = message.embeds[0].get("fields", []) if message.embeds else []
    return next((f["value"] for f in fields if f["name"] == name), None)


async def final_message(fake: FakeDiscord, job_id: int, wanted: str = "Failed") -> FakeMessage:
    """The job's one message once its title is `wanted`."""

    def check() -> FakeMessage | None:
        found = job_messages(fake, job_id)
        return found[0] if len(found) == 1 and title(found[0]) == wanted else None

    return await wait_until(check, 60, f"job {job_id}: {wanted}")


def deliver_with_faults(
    fake: FakeDiscord, bot: Any, monkeypatch: pytest.MonkeyPatch, faults: dict[int, dict[str, Any]]
) -> None:
    """Inject `faults[job id]` once on the edit that turns that job's status message into its
    result (the edit carrying the images, made under the job's lock: no progress edit in between)."""
    original = bot.delivery._post_or_edit

    async def post_or_edit(job: Any, **kwargs: Any) -> Any:
        fault = faults.pop(job.id, None) if kwargs.get("files") else None
        if fault is not None:
            fake.fail_next("PATCH", rf"^/channels/\d+/messages/{job.status_message_id}$", **fault)
        return await original(job, **kwargs)

    monkeypatch.setattr(bot.delivery, "_post_or_edit", post_or_edit)


async def test_result_post_retried_after_429_or_500_posted_once(
    discord_server: FakeDiscord, start_bot, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = discord_server
    bot = await start_bot()
    statuses = {1: 429, 2: 500}
    deliver_with_faults(fake, bot, monkeypatch, {1: {"status": 429, "retry_after": 0.3}, 2: {"status": 500}})
    assert (await answer(fake, {"prompt": "through the storm"})).startswith("Queued as job #1:")
    assert (await answer(fake, {"prompt": "and the rain"}, user=fake.bob)).startswith("Queued as job #2:")
    for job_id, status in statuses.items():
        result = await final_message(fake, job_id, "Image")
        assert len(result.attachments) == 2
        edits = [
            r
            for r in fake.requests_matching("PATCH", rf"/messages/{result.id}$")
            if any(f.filename.endswith(".png") for f in r.files)
        ]
        assert [r.status for r in edits] == [status, 200], "discord.py waited and sent the result again"
        assert await wait_until_async(lambda job_id=job_id: has_status(bot, job_id, "done"), 10, "done")
    posts = fake.requests_matching("POST", r"^/channels/\d+/messages$")
    assert len(posts) == 2, "one message per job: each status message edited into its result"


async def test_missing_permissions_up_front_and_at_delivery(discord_server: FakeDiscord, start_bot) -> None:
    fake = discord_server
    bot = await start_bot()
    channel = fake.channel_id
    full = fake.bot_permissions(channel)
    await fake.set_bot_permissions(channel, VIEW_CHANNEL | SEND_MESSAGES | EMBED_LINKS | READ_MESSAGE_HISTORY)
    assert await answer(fake, {"prompt": "a pony"}) == (
        "I can't post results here: I'm missing Attach Files in this channel."
    )
    await fake.set_bot_permissions(channel, VIEW_CHANNEL)
    assert await answer(fake, {"prompt": "a pony"}) == (
        "I can't post results here: I'm missing Send Messages, Attach Files, Embed Links,"
        " Read Message History in this channel."
    )
    assert await job_total(bot) == 0

    # permission lost while the job waits: 403 Missing Permissions at delivery
    await fake.set_bot_permissions(channel, full)
    bot.worker.pause()
    assert (await answer(fake, {"prompt": "a pony"})).startswith("Queued as job #1:")
    await wait_until(lambda: job_messages(fake, 1), 10, "status message")
    await fake.set_bot_permissions(channel, full & ~ATTACH_FILES)
    bot.worker.resume()
    notice = await final_message(fake, 1)
    reason = "I lost permission to post in that channel (Missing Permissions)."
    assert field(notice, "Reason") == reason and not notice.attachments
    job = await bot.queue.get(1)
    assert (job.status, job.error, job.attempts) == ("failed", reason, 1)
    await asyncio.sleep(1.0)  # no retry loop
    uploads = [r for r in fake.requests if any(f.filename.endswith(".png") for f in r.files)]
    assert [r.status for r in uploads] == [403], "the result upload was tried once"
    assert (await bot.queue.get(1)).status == "failed"


async def test_message_or_channel_deleted_while_the_job_waits(
    discord_server: FakeDiscord, start_bot, caplog: pytest.LogCaptureFixture
) -> None:
    fake = discord_server
    bot = await start_bot(PONY_DEFAULT_COUNT=1)
    bot.worker.pause()
    assert (await answer(fake, {"prompt": "one"})).startswith("Queued as job #1:")
    status = (await wait_until(lambda: job_messages(fake, 1), 10, "status"))[0]
    await fake.delete_message_externally(status.id)
    bot.worker.resume()
    result = await fake.wait_for_message(is_result, timeout=60)
    assert result.id != status.id and job_messages(fake, 1) == [result], "posted anew, once"
    assert await wait_until_async(lambda: has_status(bot, 1, "done"), 10, "done")

    bot.worker.pause()
    assert (await answer(fake, {"prompt": "two"})).startswith("Queued as job #2:")
    await wait_until(lambda: job_messages(fake, 2), 10, "status")
    caplog.set_level(logging.ERROR, logger="bot.discord_ui.delivery")
    await fake.delete_channel(fake.channel_id)
    bot.worker.resume()
    assert await wait_until_async(lambda: has_status(bot, 2, "failed"), 60, "failed")
    reason = "The channel was deleted before the result could be posted."
    job = await bot.queue.get(2)
    assert (job.error, job.attempts) == (reason, 1)
    assert any(
        "delivery failed for good" in r.getMessage() and reason in r.getMessage() for r in caplog.records
    )
    dm = next(c for c in fake.channels.values() if c.type == 1 and c.recipient_id == fake.alice.id)
    told = await wait_until(lambda: fake.channel_messages(dm.id), 10, "DM")
    assert [m.content for m in told] == [f"Your ponybot job #2 in <#{fake.channel_id}> failed: {reason}"]
    await asyncio.sleep(1.0)
    assert (await bot.queue.get(2)).status == "failed", "never retried"


async def test_gateway_dropped_and_resumed_mid_job(discord_server: FakeDiscord, start_bot) -> None:
    fake = discord_server
    bot = await start_bot()
    slow_down_generation(bot, 0.15)
    assert (await answer(fake, {"prompt": "steady", "steps": 12})).startswith("Queued as job #1:")
    await wait_until_async(lambda: has_status(bot, 1, "running"), 20, "running")
    await fake.drop_gateway()  # TCP abort; waits for the RESUME
    assert fake.resume_count == 1 and fake.identify_count == 1
    result = await fake.wait_for_message(is_result, timeout=60)
    assert job_messages(fake, 1) == [result]
    assert await wait_until_async(lambda: has_status(bot, 1, "done"), 10, "done")
    # and the bot still answers commands
    bot.worker.pause()
    assert (await answer(fake, {"prompt": "after"})).startswith("Queued as job #2:")


@contextlib.contextmanager
def swapped(obj: Any, name: str, value: Any) -> Iterator[None]:
    original = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, original)


async def test_out_of_memory_and_nan_output(discord_server: FakeDiscord, start_bot) -> None:
    fake = discord_server
    bot = await start_bot(PONY_MAX_ATTEMPTS=2, PONY_DEFAULT_COUNT=1)
    gen = bot.engine.generator
    original = gen.txt2img

    def oom(**kwargs: Any) -> Any:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def nan_decode(latents: torch.Tensor, *, fp32: bool = False) -> torch.Tensor:
        return torch.full((latents.shape[0], 3, 64, 64), float("nan"))

    def faulty(params: Any, **kwargs: Any) -> Any:  # runs in the GPU thread, one call at a time
        if params.prompt == "oom":
            with swapped(gen, "_sample", oom):
                return original(params, **kwargs)
        if params.prompt == "nan":
            with swapped(gen, "_vae_decode", nan_decode):
                return original(params, **kwargs)
        return original(params, **kwargs)

    gen.txt2img = faulty
    assert (await answer(fake, {"prompt": "oom"})).startswith("Queued as job #1:")
    assert (await answer(fake, {"prompt": "nan"}, user=fake.bob)).startswith("Queued as job #2:")
    assert (await answer(fake, {"prompt": "fine"}, user=fake.owner)).startswith("Queued as job #3:")

    notice = await final_message(fake, 1)
    assert field(notice, "Reason") == OOM_MESSAGE
    assert any(snap.embeds and snap.embeds[0].get("title") == "Retrying soon" for snap in notice.history), (
        "the user saw the retry"
    )
    job = await bot.queue.get(1)
    assert (job.status, job.attempts) == ("dead", 2)

    notice = await final_message(fake, 2)
    assert field(notice, "Reason") == BLANK_MESSAGE
    job = await bot.queue.get(2)
    assert (job.status, job.attempts) == ("failed", 1), "a blank image is not retried"

    result = await final_message(fake, 3, "Image")
    assert is_result(result)
    assert bot.worker.state != "stopped"


async def test_hung_generation_is_stopped_by_the_watchdog(discord_server: FakeDiscord, start_bot) -> None:
    """A call that stops when asked after the timeout fails that job only (JobTimeout)."""
    fake = discord_server
    bot = await start_bot(PONY_JOB_TIMEOUT_S=1, PONY_MAX_ATTEMPTS=1, PONY_DEFAULT_COUNT=1)
    bot.worker.cancel_grace_s = 5
    slow_down_generation(bot, 0.5)  # 3 steps of 0.5 s: past the 1 s timeout, stops at the next step
    assert (await answer(fake, {"prompt": "slow"})).startswith("Queued as job #1:")
    notice = await final_message(fake, 1)
    assert field(notice, "Reason") == "The generation took longer than 1 s and was stopped."
    assert (await bot.queue.get(1)).status == "dead"
    assert bot.engine.state is EngineState.READY, "a call that stopped when asked is not a hung GPU"


async def test_hung_gpu_stops_the_engine_and_puts_its_jobs_back(
    discord_server: FakeDiscord, start_bot
) -> None:
    """A call that ignores the stop request: no next job runs beside it, the running job goes back
    to the queue without losing an attempt, and the bot stops (run_bot raises WorkerFailed)."""
    fake = discord_server
    bot = await start_bot(PONY_JOB_TIMEOUT_S=1, PONY_DEFAULT_COUNT=1)
    bot.worker.cancel_grace_s = 0.3
    gen = bot.engine.generator
    original = gen.txt2img
    unstick = threading.Event()
    calls: list[str] = []

    def hanging(params: Any, **kwargs: Any) -> Any:
        calls.append(params.prompt)
        if params.prompt != "hang":
            return original(params, **kwargs)
        unstick.wait(60)  # ignores should_cancel, like a stuck kernel
        raise RuntimeError("woke up after being abandoned")

    gen.txt2img = hanging
    try:
        assert (await answer(fake, {"prompt": "hang"})).startswith("Queued as job #1:")
        assert (await answer(fake, {"prompt": "next"}, user=fake.bob)).startswith("Queued as job #2:")
        runner = start_bot.runners[0]
        with pytest.raises(WorkerFailed):
            await asyncio.wait_for(runner.task, 60)
        runner.task = None
        assert calls == ["hang"], "no job ran beside the hung call"
        with contextlib.closing(sqlite3.connect(bot.settings.db_path)) as conn:
            rows = conn.execute("SELECT id, status, attempts, lease_owner FROM jobs ORDER BY id").fetchall()
        assert rows == [(1, "queued", 0, None), (2, "queued", 0, None)], "both wait for the restart"
        status = job_messages(fake, 1)[0]
        assert title(status) == "Retrying soon"
    finally:
        unstick.set()


async def test_model_load_failure_keeps_the_bot_up_and_the_queue(
    discord_server: FakeDiscord, start_bot, tmp_path: Path
) -> None:
    fake = discord_server
    bot = await start_bot(PONY_MODEL=str(tmp_path / "no-such-model"))
    assert bot.engine.state is EngineState.FAILED
    ack = await answer(fake, {"prompt": "patience"})
    assert ack.startswith("Queued as job #1:")
    assert ack.endswith("\nThe generator is unavailable right now; your job is kept in the queue.")
    await bot.worker._idle()
    assert (await bot.queue.get(1)).status == "queued"
    assert bot.worker.describe() == "waiting for model (failed)"
    runner = start_bot.runners[0]
    assert not runner.task.done(), "the bot is still up"
    status = await fake.slash("pony-admin", {}, subcommand="status", user=fake.admin)
    text = (await status.wait_followup()).content
    assert "Worker: waiting for model (failed)" in text and "no such file or folder" in text


async def test_disk_full_when_saving(
    discord_server: FakeDiscord, start_bot, monkeypatch: pytest.MonkeyPatch
) -> None:
    import generator.metadata

    fake = discord_server
    bot = await start_bot()  # two images per job
    real_save = generator.metadata.save_png
    calls = []

    def save_until_full(image: Any, path: Path, parameters: str) -> Any:
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(image, path, parameters)

    monkeypatch.setattr(generator.metadata, "save_png", save_until_full)
    assert (await answer(fake, {"prompt": "big"})).startswith("Queued as job #1:")
    notice = await final_message(fake, 1)
    assert field(notice, "Reason") == "Could not save the images (No space left on device)."
    assert (await bot.queue.get(1)).status == "failed"
    assert not any((bot.settings.images_dir / "1").glob("*.png")), "no half-saved set left behind"

    monkeypatch.setattr(generator.metadata, "save_png", real_save)
    assert (await answer(fake, {"prompt": "after"}, user=fake.bob)).startswith("Queued as job #2:")
    assert is_result(await final_message(fake, 2, "Image"))


async def test_locked_database_answers_busy_and_queues_nothing(
    discord_server: FakeDiscord, start_bot
) -> None:
    fake = discord_server
    bot = await start_bot(PONY_DB_BUSY_TIMEOUT_MS=200)
    blocker = sqlite3.connect(bot.settings.db_path, timeout=10, isolation_level=None, check_same_thread=False)
    try:
        await asyncio.to_thread(blocker.execute, "BEGIN EXCLUSIVE")
        started = time.monotonic()
        assert await answer(fake, {"prompt": "locked out"}) == BUSY
        assert time.monotonic() - started < 5
        await asyncio.to_thread(blocker.execute, "ROLLBACK")
    finally:
        blocker.close()
    assert await job_total(bot) == 0
    assert (await answer(fake, {"prompt": "unlocked"})).startswith("Queued as job #1:")
    assert is_result(await final_message(fake, 1, "Image"))
