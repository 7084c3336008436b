"""Issue #10 end to end: every accepted request ends in exactly one visible outcome.

A failure or cancel notice that Discord refused for a passing reason, or that a dead process never
sent, is shown later by the worker's sweep (`notified_at`); a Discord answer that will never change
ends delivery at once (the job fails, the requester is told by DM, nothing is retried); channel posts
carry a deterministic nonce, so a post whose answer was lost is not doubled; and the history search
for a job's own message reads everything since the job was created, not just the last 100 messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import discord.http
import pytest
from conftest import embed_footer, is_result, job_messages, wait_until, wait_until_async
from fake_discord import FakeDiscord, FakeMessage
from test_bad_input import answer
from test_faults import field, final_message, has_status, title

from bot.discord_ui.delivery import post_nonce
from bot.jobs.models import crashed_message
from generator.errors import BadOutput
from generator.pipeline import BLANK_MESSAGE

#: tries discord.py makes of a request answered 500 before it raises (discord/http.py: range(5))
DISCORD_PY_TRIES = 5
#: sweeps every PONY_LEASE_S / 4 = 0.5 s
FAST = {"PONY_LEASE_S": 2, "PONY_DEFAULT_COUNT": 1}


class _QuickSleepAsyncio:
    """`asyncio` as discord.http sees it, with its retry back-off (1, 3, 5, 7, 9 s) cut short."""

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    @staticmethod
    async def sleep(delay: float, result: Any = None) -> Any:
        return await asyncio.sleep(min(delay, 0.05), result)


@pytest.fixture
def quick_discord_retries(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """discord.py still retries a 500 five times; it just does not wait 25 s doing so."""
    monkeypatch.setattr(discord.http, "asyncio", _QuickSleepAsyncio())
    yield


def titles_shown(message: FakeMessage) -> list[str | None]:
    """Every title the message had, oldest first (each edit's before-state, then the current one)."""
    return [(s.embeds[0].get("title") if s.embeds else None) for s in message.history] + [title(message)]


def fail_prompt(bot: Any, prompt: str, error: Exception) -> None:
    """Make the generator raise `error` for jobs with this prompt (in the GPU thread)."""
    gen = bot.engine.generator
    original = gen.txt2img

    def faulty(params: Any, **kwargs: Any) -> Any:
        if params.prompt == prompt:
            raise error
        return original(params, **kwargs)

    gen.txt2img = faulty


def dm_texts(fake: FakeDiscord, user: Any) -> list[str]:
    """The DMs the bot sent this user, oldest first."""
    channels = [c for c in fake.channels.values() if c.type == 1 and c.recipient_id == user.id]
    return [m.content for c in channels for m in fake.channel_messages(c.id)]


def dm_posts(fake: FakeDiscord, user: Any) -> list[Any]:
    """The bot's message POSTs to this user's DM channel (delivered or refused)."""
    channels = [c.id for c in fake.channels.values() if c.type == 1 and c.recipient_id == user.id]
    return [r for cid in channels for r in fake.requests_matching("POST", rf"^/channels/{cid}/messages$")]


def edits_titled(fake: FakeDiscord, message_id: int, wanted: str) -> list[Any]:
    """PATCH requests on the message whose embed title is `wanted` (answered or refused)."""
    return [
        r
        for r in fake.requests_matching("PATCH", rf"^/channels/\d+/messages/{message_id}$")
        if (r.json or {}).get("embeds") and r.json["embeds"][0].get("title") == wanted
    ]


def png_uploads(fake: FakeDiscord, message_id: int) -> list[Any]:
    """PATCH requests carrying the result images onto the message."""
    return [
        r
        for r in fake.requests_matching("PATCH", rf"^/channels/\d+/messages/{message_id}$")
        if any(f.filename.endswith(".png") for f in r.files)
    ]


async def status_message(fake: FakeDiscord, job_id: int) -> FakeMessage:
    return (await wait_until(lambda: job_messages(fake, job_id), 10, f"job {job_id} status message"))[0]


async def shown_once(fake: FakeDiscord, job_id: int, message_id: int, wanted: str) -> FakeMessage:
    """The job's one message (the one it always had) once it shows `wanted`, and only once."""
    notice = await final_message(fake, job_id, wanted)
    assert notice.id == message_id, "the notice replaced the job's own message"
    assert titles_shown(notice).count(wanted) == 1, titles_shown(notice)
    return notice


async def settled(bot: Any, job_id: int) -> Any:
    """The job once its outcome is recorded as shown (`notified_at`, written right after the edit)."""

    async def notified() -> Any:
        job = await bot.queue.get(job_id)
        return job if job is not None and job.notified_at is not None else None

    return await wait_until_async(notified, 10, f"job {job_id} notified_at")


async def quiet_for(seconds: float) -> None:
    """Let several sweeps (every 0.5 s) run."""
    await asyncio.sleep(seconds)


# --- 1. a notice whose edit failed for a passing reason is shown by the sweep ------------------


async def test_failure_notice_refused_with_500s_is_shown_by_the_sweep(
    discord_server: FakeDiscord, start_bot, monkeypatch: pytest.MonkeyPatch, quick_discord_retries: None
) -> None:
    fake = discord_server
    bot = await start_bot(**FAST)
    fail_prompt(bot, "doomed", BadOutput(BLANK_MESSAGE))
    original = bot.delivery._post_or_edit
    injected: list[int] = []

    async def post_or_edit(job: Any, **kwargs: Any) -> Any:
        if kwargs["embed"].title == "Failed" and not injected:  # the first try of the notice only
            injected.append(job.status_message_id)
            fake.fail_next(
                "PATCH", rf"^/channels/\d+/messages/{job.status_message_id}$", 500, times=DISCORD_PY_TRIES
            )
        return await original(job, **kwargs)

    monkeypatch.setattr(bot.delivery, "_post_or_edit", post_or_edit)
    assert (await answer(fake, {"prompt": "doomed"})).startswith("Queued as job #1:")
    status = await status_message(fake, 1)

    notice = await shown_once(fake, 1, status.id, "Failed")
    assert field(notice, "Reason") == BLANK_MESSAGE and not notice.attachments
    assert injected == [status.id]
    tries = edits_titled(fake, status.id, "Failed")
    assert [r.status for r in tries] == [500] * DISCORD_PY_TRIES + [200], "refused 5 times, then the sweep"
    job = await settled(bot, 1)
    assert (job.status, job.error) == ("failed", BLANK_MESSAGE)
    await quiet_for(1.5)
    assert len(edits_titled(fake, status.id, "Failed")) == len(tries), "shown once, not again"
    assert titles_shown(fake.messages[status.id]).count("Failed") == 1


# --- 2. the process died before the notice: the next start shows it ---------------------------


def write_db(db_path: Path, sql: str, params: tuple[Any, ...] = ()) -> None:
    conn = sqlite3.connect(db_path, timeout=10, isolation_level=None)
    try:
        assert conn.execute(sql, params).rowcount == 1
    finally:
        conn.close()


async def test_notices_owed_by_a_dead_process_are_shown_after_a_restart(
    discord_server: FakeDiscord, start_bot
) -> None:
    fake = discord_server
    env = {**FAST, "PONY_MAX_ATTEMPTS": 2}
    bot = await start_bot(**env)
    bot.worker.pause()
    for n, user in enumerate((fake.alice, fake.bob, fake.owner), start=1):
        assert (await answer(fake, {"prompt": f"left behind {n}"}, user=user)).startswith(
            f"Queued as job #{n}:"
        )
    statuses = {n: (await status_message(fake, n)).id for n in (1, 2, 3)}
    db_path = bot.settings.db_path
    await start_bot.runners[0].stop()

    # the process died: after fail() committed, before the edit; mid-run after a cancel request;
    # mid-run on the job's last allowed attempt
    now = time.time()
    error = "Could not save the images (No space left on device)."
    write_db(
        db_path,
        "UPDATE jobs SET status = 'failed', error = ?, attempts = 1, started_at = ?, finished_at = ?,"
        " updated_at = ?, notified_at = NULL WHERE id = 1",
        (error, now - 5, now - 1, now - 1),
    )
    write_db(
        db_path,
        "UPDATE jobs SET status = 'running', attempts = 1, cancel_requested = 1, lease_owner = 'gone:1:dead',"
        " lease_expires_at = ?, started_at = ?, updated_at = ? WHERE id = 2",
        (now + 600, now - 5, now - 1),
    )
    write_db(
        db_path,
        "UPDATE jobs SET status = 'running', attempts = 2, lease_owner = 'gone:1:dead',"
        " lease_expires_at = ?, started_at = ?, updated_at = ? WHERE id = 3",
        (now - 1, now - 30, now - 30),
    )

    bot = await start_bot(**env)
    failed = await shown_once(fake, 1, statuses[1], "Failed")
    assert field(failed, "Reason") == error
    cancelled = await shown_once(fake, 2, statuses[2], "Cancelled")
    assert field(cancelled, "Reason") == "Cancelled." and cancelled.buttons() == []
    dead = await shown_once(fake, 3, statuses[3], "Failed")
    assert (
        field(dead, "Reason")
        == crashed_message(2)
        == "This job crashed the generator 2 times and was dropped."
    )
    for n, status in ((1, "failed"), (2, "cancelled"), (3, "dead")):
        assert (await settled(bot, n)).status == status

    # a running job whose worker vanished while this process runs: its lease expires, the sweep
    # buries it at the attempt limit and shows why
    bot.worker.pause()
    assert (await answer(fake, {"prompt": "orphan"})).startswith("Queued as job #4:")
    orphan = await status_message(fake, 4)
    async with bot.queue.exclusive() as conn:
        await conn.execute(
            "UPDATE jobs SET status = 'running', attempts = 2, lease_owner = 'other-host:7:gone',"
            " lease_expires_at = ?, started_at = ? WHERE id = 4",
            (time.time() - 1, time.time() - 30),
        )
    swept = await shown_once(fake, 4, orphan.id, "Failed")
    assert field(swept, "Reason") == crashed_message(2)
    assert (await settled(bot, 4)).status == "dead"

    await quiet_for(1.5)
    for n, message_id, wanted in (
        (1, statuses[1], "Failed"),
        (2, statuses[2], "Cancelled"),
        (3, statuses[3], "Failed"),
        (4, orphan.id, "Failed"),
    ):
        assert job_messages(fake, n) == [fake.messages[message_id]]
        assert titles_shown(fake.messages[message_id]).count(wanted) == 1, (
            n,
            titles_shown(fake.messages[message_id]),
        )
        assert len(edits_titled(fake, message_id, wanted)) == 1, f"job {n}: one notice edit"


async def test_cancel_turned_cancelled_by_release_at_shutdown_is_shown_after_restart(
    discord_server: FakeDiscord, start_bot
) -> None:
    fake = discord_server
    env = {**FAST, "PONY_SHUTDOWN_GRACE_S": 0}
    bot = await start_bot(**env)
    entered = asyncio.Event()
    held: list[asyncio.Task[Any]] = []

    async def hold(job: Any, result: Any) -> None:  # post-processing that outlasts the shutdown grace
        held.append(asyncio.current_task())  # type: ignore[arg-type]
        entered.set()
        await asyncio.Event().wait()

    bot.worker.screen = hold
    assert (await answer(fake, {"prompt": "stop right there"})).startswith("Queued as job #1:")
    status = await status_message(fake, 1)
    await asyncio.wait_for(entered.wait(), 60)
    assert (await bot.queue.get(1)).status == "running", "generated, not yet recorded: the job is held"
    click = await fake.click(status.id, next(c for label, c in status.buttons() if label == "Cancel"))
    assert (await click.wait_followup()).content == "Stopping job #1…"
    await start_bot.runners[0].stop()  # release() turns the requested cancel into cancelled
    for task in held:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    conn = sqlite3.connect(bot.settings.db_path)
    try:
        row = conn.execute("SELECT status, error, notified_at FROM jobs WHERE id = 1").fetchone()
    finally:
        conn.close()
    assert row == ("cancelled", "Cancelled.", None), "cancelled at shutdown, the notice still owed"
    assert "Cancelled" not in titles_shown(fake.messages[status.id])

    bot = await start_bot(**env)
    notice = await shown_once(fake, 1, status.id, "Cancelled")
    assert not notice.attachments and notice.buttons() == []
    assert (await settled(bot, 1)).status == "cancelled"
    await quiet_for(1.5)
    assert len(edits_titled(fake, status.id, "Cancelled")) == 1


# --- 3. a permanent Discord refusal ends delivery at once --------------------------------------

PERMANENT_REFUSALS = [
    (400, 50083, "Thread is archived", "The thread was archived before the result could be posted."),
    (404, 10003, "Unknown Channel", "The channel was deleted before the result could be posted."),
    (403, 50001, "Missing Access", "I lost permission to post in that channel (Missing Permissions)."),
]


async def test_permanent_refusal_of_the_result_fails_the_job_and_tells_the_requester(
    discord_server: FakeDiscord, start_bot, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = discord_server
    bot = await start_bot(**FAST, PONY_MAX_OPEN_JOBS_PER_USER=1)
    faults: dict[int, dict[str, Any]] = {}
    original = bot.delivery._post_or_edit

    async def post_or_edit(job: Any, **kwargs: Any) -> Any:
        fault = faults.pop(job.id, None) if kwargs.get("files") else None
        if fault is not None:  # the result edit and the notice edit after it are both refused
            fake.fail_next("PATCH", rf"^/channels/\d+/messages/{job.status_message_id}$", times=2, **fault)
        return await original(job, **kwargs)

    monkeypatch.setattr(bot.delivery, "_post_or_edit", post_or_edit)
    cases: list[tuple[int, int, int, str]] = []
    for job_id, (status, code, message, reason) in enumerate(PERMANENT_REFUSALS, start=1):
        faults[job_id] = {"status": status, "body": {"code": code, "message": message}}
        # the member may ask again at once: the job before this one is over (one open job allowed)
        assert (await answer(fake, {"prompt": f"refused {code}"})).startswith(f"Queued as job #{job_id}:")
        assert await wait_until_async(lambda job_id=job_id: has_status(bot, job_id, "failed"), 60, "failed")
        told = f"Your ponybot job #{job_id} in <#{fake.channel_id}> failed: {reason}"
        await wait_until(lambda told=told: told in dm_texts(fake, fake.alice), 10, f"DM for {code}")
        job = await settled(bot, job_id)  # the DM settled the notice
        assert (job.error, job.attempts) == (reason, 1)
        cases.append((job_id, job.status_message_id, status, code))

    assert (await answer(fake, {"prompt": "and again"})).startswith("Queued as job #4:")
    assert is_result(await final_message(fake, 4, "Image"))
    assert await wait_until_async(lambda: has_status(bot, 4, "done"), 10, "done")
    await quiet_for(1.5)
    for job_id, message_id, status, code in cases:
        assert [r.status for r in png_uploads(fake, message_id)] == [status], f"{code}: the result tried once"
        assert [r.status for r in edits_titled(fake, message_id, "Failed")] == [status], (
            f"{code}: notice once"
        )
        reposts = [
            r
            for r in fake.requests_matching("POST", r"^/channels/\d+/messages$")
            if (r.json or {}).get("nonce") in (post_nonce(job_id, "r"), post_nonce(job_id, "n"))
        ]
        assert reposts == [], f"{code}: nothing posted anew"
        assert not fake.messages[message_id].attachments, f"{code}: no images shown"
        job = await bot.queue.get(job_id)
        assert job.status == "failed", f"{code}: never retried"
    assert len(dm_texts(fake, fake.alice)) == len(PERMANENT_REFUSALS), "one DM per job"


# --- 4. the channel is gone: DM; DMs closed too: still settled ----------------------------------


async def test_failure_notice_falls_back_to_a_dm_and_settles_when_dms_are_closed(
    discord_server: FakeDiscord, start_bot
) -> None:
    fake = discord_server
    bot = await start_bot(**FAST)
    fail_prompt(bot, "doomed", BadOutput(BLANK_MESSAGE))
    bot.worker.pause()
    assert (await answer(fake, {"prompt": "doomed"})).startswith("Queued as job #1:")
    assert (await answer(fake, {"prompt": "doomed"}, user=fake.bob)).startswith("Queued as job #2:")
    statuses = {n: (await status_message(fake, n)).id for n in (1, 2)}
    fake.block_dms(fake.bob)
    await fake.delete_channel(fake.channel_id)
    bot.worker.resume()

    told = f"Your ponybot job #1 in <#{fake.channel_id}> failed: {BLANK_MESSAGE}"
    await wait_until(lambda: dm_texts(fake, fake.alice) == [told], 60, "alice's DM")
    for n in (1, 2):
        assert await wait_until_async(lambda n=n: has_status(bot, n, "failed"), 60, f"job {n} failed"), (
            "the generation failed"
        )
        await settled(bot, n)
    assert dm_texts(fake, fake.bob) == []
    assert [r.status for r in dm_posts(fake, fake.bob)] == [403], "bob's closed DMs were tried once"

    await quiet_for(1.5)
    assert dm_texts(fake, fake.alice) == [told], "one DM"
    assert [r.status for r in dm_posts(fake, fake.bob)] == [403], "not retried"
    for n in (1, 2):
        assert [r.status for r in edits_titled(fake, statuses[n], "Failed")] == [404], f"job {n}: tried once"

    # and the bot keeps serving, in a channel that still exists
    assert (await answer(fake, {"prompt": "fine"}, channel_id=fake.nsfw_channel_id)).startswith(
        "Queued as job #3:"
    )
    result = await wait_until(
        lambda: next((m for m in job_messages(fake, 3, fake.nsfw_channel_id) if is_result(m)), None),
        60,
        "job 3 result",
    )
    assert len(job_messages(fake, 3, fake.nsfw_channel_id)) == 1 and len(result.attachments) == 1
    assert bot.worker.state != "stopped"


# --- 5. deterministic nonces: a post whose answer was lost is not doubled ------------------------


async def test_posts_carry_a_fixed_nonce_and_a_lost_answer_leaves_one_result(
    discord_server: FakeDiscord, start_bot, quick_discord_retries: None
) -> None:
    fake = discord_server
    bot = await start_bot(**FAST)
    bot.worker.pause()
    assert (await answer(fake, {"prompt": "said once"})).startswith("Queued as job #1:")
    status = await status_message(fake, 1)
    assert status.nonce == post_nonce(1, "s")
    await fake.delete_message_externally(status.id)  # delivery must post anew
    # the post lands but its answer is lost, on every try discord.py makes
    fake.fail_next(
        "POST", rf"^/channels/{fake.channel_id}/messages$", 500, times=DISCORD_PY_TRIES, apply=True
    )
    bot.worker.resume()

    assert await wait_until_async(lambda: has_status(bot, 1, "done"), 60, "done after the redelivery sweep")
    await quiet_for(1.0)
    results = job_messages(fake, 1)
    assert len(results) == 1 and is_result(results[0]), [title(m) for m in results]
    assert results[0].id != status.id and results[0].nonce == post_nonce(1, "r")
    assert (await bot.queue.get(1)).result_message_id == results[0].id

    posts = fake.requests_matching("POST", rf"^/channels/{fake.channel_id}/messages$")
    assert posts, "the bot posted in the channel"
    for r in posts:
        assert r.json.get("enforce_nonce") is True, r.json
    assert [r.json["nonce"] for r in posts] == [post_nonce(1, "s")] + [post_nonce(1, "r")] * (
        DISCORD_PY_TRIES + 1
    )
    assert [r.status for r in posts] == [200] + [500] * DISCORD_PY_TRIES + [200], (
        "discord.py's tries, then one more by the worker's redelivery sweep"
    )
    same_nonce = [m for m in fake.channel_messages(fake.channel_id) if m.nonce == post_nonce(1, "r")]
    assert same_nonce == results


# --- 6. the history search reaches past the last 100 messages ------------------------------------


async def test_own_message_found_beyond_the_last_100_messages(discord_server: FakeDiscord, start_bot) -> None:
    fake = discord_server
    bot = await start_bot(**FAST)
    bot.worker.pause()
    assert (await answer(fake, {"prompt": "buried"})).startswith("Queued as job #1:")
    status = await status_message(fake, 1)
    async with bot.queue.exclusive() as conn:  # the id was never recorded (a crash after posting)
        await conn.execute("UPDATE jobs SET status_message_id = NULL WHERE id = 1")
    for n in range(150):
        await fake.user_message(f"chatter {n}", user=fake.bob)
    assert len(fake.channel_messages(fake.channel_id, include_ephemeral=False)) >= 151
    bot.worker.resume()

    assert await wait_until_async(lambda: has_status(bot, 1, "done"), 60, "done")
    result = fake.messages[status.id]
    assert is_result(result) and embed_footer(result) == "ponybot job #1"
    assert job_messages(fake, 1) == [result], "the status message itself became the result"
    assert (await bot.queue.get(1)).result_message_id == status.id
    new_posts = [
        r
        for r in fake.requests_matching("POST", rf"^/channels/{fake.channel_id}/messages$")
        if r.json.get("nonce") != post_nonce(1, "s")
    ]
    assert new_posts == [], "no new post"
    assert len(png_uploads(fake, status.id)) == 1
