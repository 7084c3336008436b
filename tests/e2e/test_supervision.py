"""Supervision (issue #10): database errors, crashes inside the worker, a hung GPU, failing batches,
re-created images and late cancels each end in exactly one visible outcome."""

from __future__ import annotations

import asyncio
import contextlib
import io
import shutil
import sqlite3
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    SubprocessBot,
    bot_env,
    is_result,
    job_messages,
    wait_for_status,
    wait_until,
)
from fake_discord import FakeDiscord
from PIL import Image, ImageChops
from test_bad_input import answer
from test_buttons import button_id, make_result
from test_faults import field, final_message, title

from bot.jobs.queue import JobQueue
from generator.errors import BadOutput, OutOfMemory
from generator.pipeline import BLANK_MESSAGE, OOM_MESSAGE


@contextlib.contextmanager
def database_locked(db: Path) -> Iterator[None]:
    """Hold SQLite's write lock from a second connection, as another process would."""
    conn = sqlite3.connect(db, timeout=30, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


def rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
        return conn.execute(sql).fetchall()


async def test_database_locked_after_generation_is_retried_and_delivered_once(
    discord_server: FakeDiscord, start_bot
) -> None:
    fake = discord_server
    bot = await start_bot(PONY_DB_BUSY_TIMEOUT_MS=100)
    bot.worker.post.retry_delays = (0.3,) * 10
    reached = threading.Event()
    release = threading.Event()
    original = bot.engine.generator.txt2img

    def then_wait(params: Any, **kwargs: Any) -> Any:
        result = original(params, **kwargs)
        reached.set()
        release.wait(30)  # the test takes the lock before the worker records the result
        return result

    bot.engine.generator.txt2img = then_wait
    assert (await answer(fake, {"prompt": "locked out"})).startswith("Queued as job #1:")
    await asyncio.to_thread(reached.wait, 60)
    with database_locked(bot.settings.db_path):
        release.set()
        await asyncio.sleep(1.5)  # mark_generated fails "database is locked" several times
        assert rows(bot.settings.db_path, "SELECT status FROM jobs") == [("running",)]
    result = await fake.wait_for_message(is_result, timeout=60)
    assert await wait_for_status(bot, 1, "done", 20)
    assert job_messages(fake, 1) == [result]
    assert bot.worker.state != "stopped"


async def test_database_gone_for_longer_than_the_retries_still_ends_in_one_result(
    discord_server: FakeDiscord, start_bot
) -> None:
    """Every write fails for a while: the lease is dropped (not extended for ever), the job is
    queued again when it expires, and the member gets exactly one result in the end."""
    fake = discord_server
    bot = await start_bot(PONY_DB_BUSY_TIMEOUT_MS=50, PONY_LEASE_S=2)
    bot.worker.post.retry_delays = (0.1, 0.1)
    reached = threading.Event()
    release = threading.Event()
    original = bot.engine.generator.txt2img
    calls: list[str] = []

    def then_wait(params: Any, **kwargs: Any) -> Any:
        calls.append(params.prompt)
        result = original(params, **kwargs)
        if len(calls) == 1:
            reached.set()
            release.wait(30)
        return result

    bot.engine.generator.txt2img = then_wait
    assert (await answer(fake, {"prompt": "outage"})).startswith("Queued as job #1:")
    await asyncio.to_thread(reached.wait, 60)
    with database_locked(bot.settings.db_path):
        release.set()
        await asyncio.sleep(3)  # mark_generated and fail() both give up; the lease runs out
    result = await fake.wait_for_message(is_result, timeout=90)
    assert await wait_for_status(bot, 1, "done", 20)
    assert job_messages(fake, 1) == [result]
    assert len(calls) == 2, "generated again after the lease expired"


async def test_an_error_inside_the_worker_fails_the_job_visibly_and_the_worker_goes_on(
    discord_server: FakeDiscord, start_bot, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = discord_server
    failures = {"recover": 1, "begin": 1}

    def failing_once(name: str) -> Any:
        original = getattr(JobQueue, name)

        async def wrapper(self: JobQueue, *args: Any, **kwargs: Any) -> Any:
            if failures[name]:
                failures[name] -= 1
                raise RuntimeError(f"{name} broke")
            return await original(self, *args, **kwargs)

        return wrapper

    for name in failures:
        monkeypatch.setattr(JobQueue, name, failing_once(name))
    bot = await start_bot(PONY_DEFAULT_COUNT=1)
    bot.worker.poll_s = 0.1
    assert (await answer(fake, {"prompt": "first"})).startswith("Queued as job #1:")
    notice = await final_message(fake, 1)
    assert field(notice, "Reason") == "Something went wrong on my side."
    assert (await bot.queue.get(1)).status == "failed"
    assert (await answer(fake, {"prompt": "second"}, user=fake.bob)).startswith("Queued as job #2:")
    result = await final_message(fake, 2, "Image")
    assert is_result(result)
    assert failures == {"recover": 0, "begin": 0}


async def test_a_failing_batch_is_retried_one_job_at_a_time(discord_server: FakeDiscord, start_bot) -> None:
    fake = discord_server
    bot = await start_bot(PONY_BATCH_SIZE=2, PONY_DEFAULT_COUNT=1)
    gen = bot.engine.generator
    single, batch = gen.txt2img, gen.txt2img_batch
    calls: list[tuple[str, list[str]]] = []

    def batched(requests: list[Any], **kwargs: Any) -> Any:
        calls.append(("batch", [r.prompt for r in requests]))
        if any(r.prompt == "too big" for r in requests):
            raise OutOfMemory(OOM_MESSAGE)
        return batch(requests, **kwargs)

    def alone(params: Any, **kwargs: Any) -> Any:
        calls.append(("single", [params.prompt]))
        if params.prompt == "blank":
            raise BadOutput(BLANK_MESSAGE)
        return single(params, **kwargs)

    gen.txt2img_batch, gen.txt2img = batched, alone
    bot.worker.pause()
    for prompt, user in (("blank", fake.alice), ("too big", fake.bob), ("fine", fake.mod)):
        assert (await answer(fake, {"prompt": prompt}, user=user)).startswith("Queued as job #")
    bot.worker.resume()
    assert is_result(await final_message(fake, 3, "Image"))
    assert is_result(await final_message(fake, 2, "Image")), "the OOM batch is not formed again"
    blank = await final_message(fake, 1)
    assert field(blank, "Reason") == BLANK_MESSAGE
    for job_id in (2, 3):
        assert await wait_for_status(bot, job_id, "done", 20)
    statuses = rows(bot.settings.db_path, "SELECT id, status, attempts FROM jobs ORDER BY id")
    assert statuses == [(1, "failed", 1), (2, "done", 1), (3, "done", 1)]
    assert calls[0] == ("batch", ["blank", "too big"])
    assert ("batch", ["blank", "too big"]) not in calls[1:]
    assert ("single", ["blank"]) in calls and ("single", ["too big"]) in calls, calls


async def test_upscale_of_a_pruned_variation_recreates_the_variation(
    discord_server: FakeDiscord, start_bot
) -> None:
    fake = discord_server
    bot = await start_bot(PONY_DEFAULT_COUNT=1)
    screened: list[int] = []

    async def screen(job: Any, result: Any) -> None:
        screened.append(job.id)

    bot.worker.screen = screen
    original = await make_result(fake)
    click = await fake.click(original.id, button_id(original, "V1"))
    await click.wait_followup()
    variation = await final_message(fake, 2, "Variations")
    shown = (bot.settings.images_dir / (await bot.queue.get(2)).result_files[0]).read_bytes()
    for job_id in (1, 2):  # retention deleted both images
        shutil.rmtree(bot.settings.images_dir / str(job_id), ignore_errors=True)
    sources: list[Any] = []
    upscale = bot.engine.generator.upscale

    def recording(image: Any, *args: Any, **kwargs: Any) -> Any:
        sources.append(image.copy())
        return upscale(image, *args, **kwargs)

    bot.engine.generator.upscale = recording
    before = len(bot.engine.timeline)
    screened.clear()
    click = await fake.click(variation.id, button_id(variation, "U1"))
    await click.wait_followup()
    assert is_result(await final_message(fake, 3, "Upscale"))
    methods = [call.method for call in list(bot.engine.timeline)[before:]]
    assert methods == ["txt2img", "variation", "upscale"], "the variation is re-created, not a txt2img"
    assert screened == [1, 2, 3], "re-created images go through the image filter too"
    with Image.open(io.BytesIO(shown)) as image:
        assert ImageChops.difference(image.convert("RGB"), sources[0]).getbbox() is None, (
            "U acts on the picture that was shown"
        )


async def test_a_cancel_during_screening_wins_and_posts_no_images(
    discord_server: FakeDiscord, start_bot
) -> None:
    fake = discord_server
    bot = await start_bot(PONY_DEFAULT_COUNT=1)
    screening = asyncio.Event()
    go_on = asyncio.Event()

    async def slow_screen(job: Any, result: Any) -> None:
        screening.set()
        await go_on.wait()

    bot.worker.screen = slow_screen
    assert (await answer(fake, {"prompt": "second thoughts"})).startswith("Queued as job #1:")
    await asyncio.wait_for(screening.wait(), 60)
    status = job_messages(fake, 1)[0]
    click = await fake.click(status.id, button_id(status, "Cancel"))
    assert "Stopping" in (await click.wait_followup()).content
    go_on.set()
    notice = await final_message(fake, 1, "Cancelled")
    assert not notice.attachments
    assert (await bot.queue.get(1)).status == "cancelled"
    await asyncio.sleep(0.5)
    assert [m for m in job_messages(fake, 1) if m.attachments] == [], "no images posted"


HANG_HOOK = textwrap.dedent(
    """
    # test hook: a generator that hangs (ignores the watchdog) for the prompt "hang"
    import threading

    import generator.pipeline as pipeline

    _original = pipeline.Generator.txt2img


    def _txt2img(self, params, **kwargs):
        if params.prompt == "hang":
            threading.Event().wait()
        return _original(self, params, **kwargs)


    pipeline.Generator.txt2img = _txt2img
    """
)


async def test_ponybot_run_exits_non_zero_on_a_hung_gpu_and_the_restart_delivers(
    discord_server: FakeDiscord, tiny_model: Path, tmp_path: Path
) -> None:
    fake = discord_server
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HANG_HOOK)  # loaded at start-up by the child's python
    data = tmp_path / "data"
    env = bot_env(fake, data, tiny_model, PONY_JOB_TIMEOUT_S=1, PONY_DEFAULT_COUNT=1)
    first = SubprocessBot({**env, "PYTHONPATH": str(hook)}, tmp_path / "bot1.log")
    first.start()
    try:
        await fake.wait_until_connected(timeout=60)
        await wait_until(lambda: fake.find_command("pony"), 60, "commands synced")
        assert (await answer(fake, {"prompt": "hang"})).startswith("Queued as job #1:")
        code = await asyncio.to_thread(first.proc.wait, 90)  # 1 s timeout + 10 s grace
    finally:
        if first.proc.poll() is None:
            first.kill()
    assert code == 4, first.log()
    last = first.log().strip().splitlines()[-1]
    assert last.startswith("The GPU stopped responding (") and last.endswith(
        "Exiting so the service manager restarts ponybot on a fresh GPU context."
    )
    assert "Traceback" not in first.log()
    assert rows(data / "jobs.sqlite3", "SELECT status, attempts FROM jobs") == [("queued", 0)]
    assert title(job_messages(fake, 1)[0]) == "Retrying soon"

    # the restarted process (here without the hang) runs it: one result, one attempt
    with contextlib.closing(sqlite3.connect(data / "jobs.sqlite3")) as conn, conn:
        conn.execute("""UPDATE jobs SET params = json_set(params, '$.prompt', 'unstuck')""")
    second = SubprocessBot(env, tmp_path / "bot2.log")
    second.start()
    try:
        await wait_until(
            lambda: rows(data / "jobs.sqlite3", "SELECT status FROM jobs") == [("done",)], 120, "job 1 done"
        )
    finally:
        assert second.terminate() == 0, second.log()
    messages = job_messages(fake, 1)
    assert len(messages) == 1 and is_result(messages[0])
    assert rows(data / "jobs.sqlite3", "SELECT attempts FROM jobs") == [(1,)]
