"""The queue contract on both backends (bot.jobs.queue on SQLite, bot.jobs.pg_queue on PostgreSQL):
every transition, the admission limits, fairness, batching, position and ETA.

Every test taking `backend` (through `make_queue` / `q`) runs once per backend; the few that read
SQLite internals are marked `sqlite_only` with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from bot.jobs.contract import JobQueueContract
from bot.jobs.models import OPEN_STATUSES, Job, JobKind, JobStatus, QueueFull, QueueLimits, RecoveryReport
from bot.jobs.pg_queue import PgJobQueue
from bot.jobs.queue import JobQueue

T0 = 1_000_000.0
LOOSE = QueueLimits(max_open_per_user=10_000, max_queued=10_000, cooldown_s=0.0)


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def params(**overrides: Any) -> dict[str, Any]:
    base = {
        "prompt": "a pony",
        "negative": "",
        "seed": 1,
        "steps": 20,
        "guidance": 7.0,
        "width": 512,
        "height": 512,
        "count": 1,
        "sampler": "DDIM",
    }
    base.update(overrides)
    return base


Queue = JobQueueContract
MakeQueue = Callable[..., Awaitable[Queue]]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def make_queue(
    backend: str, tmp_path: Path, clock: FakeClock, request: pytest.FixtureRequest
) -> AsyncIterator[MakeQueue]:
    """Open queues on one database of `backend` (each call: a new connection / pool to it)."""
    opened: list[Queue] = []
    url = str(request.getfixturevalue("pg_url")) if backend == "postgres" else ""

    async def make(limits: QueueLimits = LOOSE, name: str = "jobs.sqlite3") -> Queue:
        q: Queue
        if backend == "postgres":
            q = await PgJobQueue.open(url, limits, clock=clock, images_dir=tmp_path / "images")
        else:
            q = await JobQueue.open(tmp_path / name, limits, clock=clock, images_dir=tmp_path / "images")
        opened.append(q)
        return q

    yield make
    for q in opened:
        await check_counters(q)
        await q.close()


@pytest.fixture
async def q(make_queue: MakeQueue) -> Queue:
    return await make_queue()


async def add(q: Queue, user: int = 1, guild: int = 0, **kwargs: Any) -> Job:
    kwargs.setdefault("kind", JobKind.TXT2IMG)
    kwargs.setdefault("params", params())
    kwargs.setdefault("channel_id", 500 + guild)
    job, created = await q.enqueue(user_id=user, guild_id=guild, **kwargs)
    assert created
    return job


def _numbered(query: str) -> str:
    """`?` placeholders as PostgreSQL's `$1, $2, ...`."""
    parts = query.split("?")
    return parts[0] + "".join(f"${n}{part}" for n, part in enumerate(parts[1:], start=1))


async def sql(q: Queue, query: str, *args: Any) -> list[tuple[Any, ...]]:
    """Rows of a plain SQL query valid on both engines (`?` placeholders), as tuples."""
    if isinstance(q, PgJobQueue):
        async with q.pool.acquire() as conn:
            return [tuple(r) for r in await conn.fetch(_numbered(query), *args)]
    assert isinstance(q, JobQueue)
    return [tuple(r) for r in await q.connection.execute_fetchall(query, args)]


async def execute(q: Queue, statement: str, *args: Any) -> None:
    """Run one write statement valid on both engines (`?` placeholders) on its own."""
    if isinstance(q, PgJobQueue):
        async with q.pool.acquire() as conn:
            await conn.execute(_numbered(statement), *args)
        return
    assert isinstance(q, JobQueue)
    async with q.exclusive() as conn:
        await conn.execute(statement, args)


async def row(q: Queue, job_id: int) -> dict[str, Any]:
    if isinstance(q, PgJobQueue):
        async with q.pool.acquire() as conn:
            found = await conn.fetchrow("SELECT * FROM jobs WHERE id = $1", job_id)
        assert found is not None
        return dict(found)
    assert isinstance(q, JobQueue)
    rows = await q.connection.execute_fetchall("SELECT * FROM jobs WHERE id = ?", (job_id,))
    return dict(next(iter(rows)))


async def transaction_open(q: Queue) -> bool:
    """Whether the queue left a transaction open (PostgreSQL: any session of its database, after
    the pool got its connections back; a cancelled call releases its connection in the background).
    """
    if isinstance(q, JobQueue):
        return q.connection.in_transaction
    assert isinstance(q, PgJobQueue)
    for _ in range(200):
        async with q.pool.acquire() as conn:
            busy = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid() AND state <> 'idle'"
            )
        if busy == 0:
            return False
        await asyncio.sleep(0.025)
    return True


async def check_counters(q: Queue) -> None:
    """The trigger-maintained waiting counts agree with the jobs table."""
    by_guild = await sql(q, "SELECT guild_id, count(*) FROM jobs WHERE status = 'queued' GROUP BY guild_id")
    kept = await sql(q, "SELECT guild_id, queued FROM queue_guilds WHERE queued != 0")
    assert sorted(by_guild) == sorted(kept)
    by_user = await sql(
        q, "SELECT guild_id, user_id, count(*) FROM jobs WHERE status = 'queued' GROUP BY guild_id, user_id"
    )
    kept_users = await sql(q, "SELECT guild_id, user_id, queued FROM queue_users WHERE queued != 0")
    assert sorted(by_user) == sorted(kept_users)


async def drain(q: Queue, worker: str = "w") -> list[Job]:
    claimed = []
    while (job := await q.claim(worker)) is not None:
        claimed.append(job)
    return claimed


# --- enqueue and admission ----------------------------------------------------------------------


async def test_enqueue_writes_a_queued_row(q: Queue) -> None:
    job, created = await q.enqueue(
        kind="variation",
        params=params(seed=42),
        channel_id=7,
        user_id=8,
        guild_id=9,
        interaction_id=10,
        parent_id=None,
        image_index=2,
        reply_to_message_id=11,
        cost=80,
    )
    assert created
    stored = await row(q, job.id)
    assert stored["status"] == "queued" and stored["kind"] == "variation"
    assert (stored["channel_id"], stored["user_id"], stored["guild_id"]) == (7, 8, 9)
    assert (stored["interaction_id"], stored["image_index"], stored["reply_to_message_id"]) == (10, 2, 11)
    assert stored["cost"] == 80 and stored["attempts"] == 0 and stored["cancel_requested"] == 0
    assert stored["created_at"] == stored["updated_at"] == T0
    assert job.params == params(seed=42) and job.kind is JobKind.VARIATION
    assert job.status is JobStatus.QUEUED and job.result_files == [] and job.seeds == []
    assert job == await q.get(job.id)
    assert job.pruned_at is None
    await execute(q, "UPDATE jobs SET pruned_at = 5.0 WHERE id = ?", job.id)
    assert (await q.get(job.id)).pruned_at == 5.0  # type: ignore[union-attr]
    assert await sql(q, "SELECT queued FROM queue_users WHERE guild_id = 9 AND user_id = 8") == [(1,)]
    with pytest.raises(ValueError):
        await q.enqueue(kind="img2img", params=params(), channel_id=1, user_id=1)
    assert await q.get(999) is None


async def test_enqueue_is_idempotent_on_interaction_id(make_queue: MakeQueue, clock: FakeClock) -> None:
    q = await make_queue(QueueLimits(max_open_per_user=1, cooldown_s=30.0))
    first, created = await q.enqueue(
        kind="txt2img", params=params(), channel_id=1, user_id=1, interaction_id=77
    )
    assert created
    clock.advance(1)
    # the retry arrives while the user is both at the cap and in the cooldown: still answered
    again, created = await q.enqueue(
        kind="txt2img", params=params(prompt="other"), channel_id=1, user_id=1, interaction_id=77
    )
    assert not created and again.id == first.id and again.params == params()
    assert await sql(q, "SELECT count(*) FROM jobs") == [(1,)]


async def test_per_user_open_cap(make_queue: MakeQueue) -> None:
    q = await make_queue(QueueLimits(max_open_per_user=3))
    jobs = [await add(q, user=1) for _ in range(3)]
    with pytest.raises(QueueFull) as info:
        await add(q, user=1)
    assert info.value.reason == "You already have 3 jobs waiting; wait for one to finish."
    assert info.value.retry_after is None
    assert await sql(q, "SELECT count(*) FROM jobs WHERE user_id = 1") == [(3,)]
    await add(q, user=2)  # other users are unaffected
    # running and generated jobs still count as open; only done frees the slot
    first = await q.claim("w")
    assert first is not None and first.id == jobs[0].id
    with pytest.raises(QueueFull):
        await add(q, user=1)
    assert await q.mark_generated(first.id, "w", ["a.png"], [1], 1.0)
    with pytest.raises(QueueFull):
        await add(q, user=1)
    assert await q.mark_done(first.id, 1234)
    await add(q, user=1)
    # enforce_limits=False (admin / re-creation) skips the cap
    await add(q, user=1, enforce_limits=False)
    assert len(await q.open_jobs(1)) == 4
    assert {j.status for j in await q.open_jobs(1)} <= set(OPEN_STATUSES)


async def test_global_queue_cap(make_queue: MakeQueue) -> None:
    q = await make_queue(QueueLimits(max_open_per_user=100, max_queued=5))
    for user in range(5):
        await add(q, user=user, guild=user % 2, cost=20)
    with pytest.raises(QueueFull) as info:
        await add(q, user=99)
    assert info.value.reason == "The queue is full (5 jobs); try again in a few minutes."
    assert info.value.retry_after is not None and info.value.retry_after >= 1.0
    assert await sql(q, "SELECT count(*) FROM jobs") == [(5,)]
    # a running job does not count against the queued cap
    assert await q.claim("w") is not None
    await add(q, user=99)
    with pytest.raises(QueueFull, match="queue is full"):
        await add(q, user=100)
    await add(q, user=100, enforce_limits=False)
    assert await sql(q, "SELECT count(*) FROM jobs WHERE status = 'queued'") == [(6,)]


async def test_cooldown(make_queue: MakeQueue, clock: FakeClock) -> None:
    q = await make_queue(QueueLimits(max_open_per_user=100, cooldown_s=3.0))
    await add(q, user=1)
    clock.advance(1.0)
    with pytest.raises(QueueFull) as info:
        await add(q, user=1)
    assert info.value.reason == "Slow down: try again in 2 s."
    assert info.value.retry_after == pytest.approx(2.0)
    await add(q, user=2)  # another user is not slowed down
    clock.advance(1.5)
    with pytest.raises(QueueFull, match=r"try again in 1 s\."):
        await add(q, user=1)
    clock.advance(0.5)
    await add(q, user=1)
    assert await sql(q, "SELECT last_enqueued_at FROM queue_users WHERE user_id = 1") == [(T0 + 3.0,)]
    # an admin re-creation skips the check, and (like any new job) restarts the cooldown
    clock.advance(1.0)
    await add(q, user=1, enforce_limits=False)
    clock.advance(2.5)
    with pytest.raises(QueueFull, match=r"try again in 1 s\."):
        await add(q, user=1)
    assert await sql(q, "SELECT count(*) FROM jobs WHERE user_id = 1") == [(3,)]


async def test_concurrent_enqueues_cannot_exceed_caps(make_queue: MakeQueue) -> None:
    qa = await make_queue(QueueLimits(max_open_per_user=3, max_queued=10))
    qb = await make_queue(QueueLimits(max_open_per_user=3, max_queued=10))  # second connection

    async def try_add(q: Queue, user: int) -> bool:
        try:
            await add(q, user=user)
        except QueueFull:
            return False
        return True

    results = await asyncio.gather(*(try_add(qa if i % 2 else qb, user=i % 5) for i in range(40)))
    assert sum(results) == 10
    counts = await sql(qa, "SELECT user_id, count(*) FROM jobs GROUP BY user_id")
    assert all(n <= 3 for _, n in counts)
    assert await sql(qa, "SELECT count(*) FROM jobs") == [(10,)]


# --- claim and the lease ------------------------------------------------------------------------


async def test_claim_leases_the_job(make_queue: MakeQueue, clock: FakeClock) -> None:
    q = await make_queue(QueueLimits(lease_s=60.0))
    assert await q.claim("w") is None
    job = await add(q)
    clock.advance(2)
    claimed = await q.claim("worker-1")
    assert claimed is not None and claimed.id == job.id
    stored = await row(q, job.id)
    assert stored["status"] == "running" and stored["attempts"] == 1
    assert stored["lease_owner"] == "worker-1" and stored["lease_expires_at"] == T0 + 62
    assert stored["started_at"] == stored["updated_at"] == T0 + 2
    assert await q.claim("worker-2") is None


async def test_extend_lease_only_for_the_owner(make_queue: MakeQueue, clock: FakeClock) -> None:
    q = await make_queue(QueueLimits(lease_s=60.0))
    queued = await add(q)
    assert not await q.extend_lease(queued.id, "w")  # not running
    job = await q.claim("w")
    assert job is not None
    clock.advance(30)
    assert await q.extend_lease(job.id, "w")
    assert (await row(q, job.id))["lease_expires_at"] == T0 + 90
    assert not await q.extend_lease(job.id, "someone-else")
    assert (await row(q, job.id))["lease_expires_at"] == T0 + 90


async def test_mark_generated_and_done(q: Queue, clock: FakeClock) -> None:
    job = await add(q, cost=20)
    claimed = await q.claim("w")
    assert claimed is not None
    assert not await q.mark_generated(job.id, "intruder", ["x.png"], [1], 3.0)
    assert (await row(q, job.id))["status"] == "running"
    clock.advance(4)
    assert await q.mark_generated(job.id, "w", ["1/ponybot-1-0.png", "1/ponybot-1-1.png"], [5, 6], 4.0)
    generated = await q.get(job.id)
    assert generated is not None and generated.status is JobStatus.GENERATED
    assert generated.result_files == ["1/ponybot-1-0.png", "1/ponybot-1-1.png"] and generated.seeds == [5, 6]
    assert generated.gen_seconds == 4.0 and generated.generated_at == T0 + 4
    assert await q.undelivered() == [generated]
    assert not await q.mark_generated(job.id, "w", [], [], 1.0)  # not running any more
    assert await sql(q, "SELECT value FROM queue_stats WHERE key = 'sec_per_unit'") == [(0.2,)]
    clock.advance(1)
    assert await q.mark_done(job.id, 999)
    done = await q.get(job.id)
    assert done is not None and done.status is JobStatus.DONE
    assert done.result_message_id == 999 and done.finished_at == T0 + 5
    assert not await q.mark_done(job.id, 1000)  # idempotent: second call is refused, state kept
    stored = await row(q, job.id)
    assert stored["status"] == "done" and stored["result_message_id"] == 999
    assert await q.undelivered() == []


async def test_mark_done_from_running_but_not_queued(q: Queue) -> None:
    queued = await add(q)
    assert not await q.mark_done(queued.id, 1)
    assert (await row(q, queued.id))["status"] == "queued"
    running = await q.claim("w")
    assert running is not None
    assert await q.mark_done(running.id, 2)
    assert (await row(q, running.id))["status"] == "done"


async def test_sec_per_unit_is_an_ema(q: Queue) -> None:
    for seconds in (2.0, 4.0):
        await add(q, cost=10)
        job = await q.claim("w")
        assert job is not None
        assert await q.mark_generated(job.id, "w", [], [], seconds)
    # first sample 0.2, then 0.7 * 0.2 + 0.3 * 0.4
    [(value,)] = await sql(q, "SELECT value FROM queue_stats WHERE key = 'sec_per_unit'")
    assert value == pytest.approx(0.26)


async def test_set_status_message(q: Queue) -> None:
    job = await add(q)
    await q.set_status_message(job.id, 4242)
    assert (await row(q, job.id))["status_message_id"] == 4242


# --- failure, retry, back-off, dead -------------------------------------------------------------


async def test_retry_backoff_then_dead(make_queue: MakeQueue, clock: FakeClock) -> None:
    q = await make_queue(QueueLimits(max_attempts=3, retry_backoff_s=5.0))
    job = await add(q)
    assert await q.claim("w") is not None
    failed = await q.fail(job.id, "GPU hiccup", retryable=True)
    assert failed.status is JobStatus.QUEUED and failed.attempts == 1
    assert failed.not_before == T0 + 5 and failed.error == "GPU hiccup"
    assert failed.lease_owner is None and failed.lease_expires_at is None and failed.finished_at is None
    clock.advance(4.9)
    assert await q.claim("w") is None  # still backing off
    assert await q.position(job.id) == 1
    clock.advance(0.1)
    again = await q.claim("w")
    assert again is not None and again.id == job.id and again.attempts == 2
    failed = await q.fail(job.id, "GPU hiccup", retryable=True)
    assert failed.status is JobStatus.QUEUED and failed.not_before == clock.now + 10  # doubled
    clock.advance(10)
    third = await q.claim("w")
    assert third is not None and third.attempts == 3
    dead = await q.fail(job.id, "GPU hiccup", retryable=True)
    assert dead.status is JobStatus.DEAD and dead.finished_at == clock.now and dead.error == "GPU hiccup"
    assert await q.claim("w") is None
    assert (await row(q, job.id))["status"] == "dead"


async def test_backoff_skips_to_other_eligible_work(q: Queue, clock: FakeClock) -> None:
    a1 = await add(q, user=1)
    a2 = await add(q, user=1)
    assert (await q.claim("w")).id == a1.id  # type: ignore[union-attr]
    await q.fail(a1.id, "oops", retryable=True)
    nxt = await q.claim("w")
    assert nxt is not None and nxt.id == a2.id  # a1 waits out its back-off


async def test_not_retryable_fails_at_once(q: Queue, clock: FakeClock) -> None:
    job = await add(q)
    await q.claim("w")
    clock.advance(1)
    failed = await q.fail(job.id, "The prompt is empty.", retryable=False)
    assert failed.status is JobStatus.FAILED and failed.error == "The prompt is empty."
    assert failed.finished_at == T0 + 1
    # failing a finished job changes nothing
    again = await q.fail(job.id, "late", retryable=True)
    assert again.status is JobStatus.FAILED and again.error == "The prompt is empty."
    with pytest.raises(LookupError):
        await q.fail(12345, "nope", retryable=False)


async def test_fail_after_cancel_request_cancels(q: Queue) -> None:
    job = await add(q)
    await q.claim("w")
    assert await q.cancel(job.id) == "requested"
    result = await q.fail(job.id, "Cancelled by generator", retryable=True)
    assert result.status is JobStatus.CANCELLED and result.error == "Cancelled."


# --- cancel -------------------------------------------------------------------------------------


async def test_cancel_queued_running_and_finished(q: Queue, clock: FakeClock) -> None:
    running = await add(q, user=1)
    queued = await add(q, user=2)
    assert (await q.claim("w")).id == running.id  # type: ignore[union-attr]
    later = await add(q, user=3)
    clock.advance(1)
    assert await q.cancel(queued.id) == "cancelled"
    stored = await row(q, queued.id)
    assert (
        stored["status"] == "cancelled"
        and stored["error"] == "Cancelled."
        and stored["finished_at"] == T0 + 1
    )
    assert await q.cancel(running.id) == "requested"
    assert await q.is_cancel_requested(running.id)
    assert not await q.is_cancel_requested(later.id)
    stored = await row(q, running.id)
    assert stored["status"] == "running" and stored["cancel_requested"] == 1
    assert await q.cancel(running.id) == "requested"  # asking again is harmless
    assert await q.cancel(queued.id) == "not_open"
    assert await q.cancel(999) == "not_open"
    nxt = await q.claim("w")
    assert nxt is not None and nxt.id == later.id  # the cancelled job is never claimed
    assert await q.claim("w") is None
    assert await q.mark_generated(later.id, "w", [], [], 1.0)
    assert await q.cancel(later.id) == "not_open"  # already generated: only delivery is left


async def test_finish_cancelled_only_after_a_request(q: Queue, clock: FakeClock) -> None:
    job = await add(q)
    await q.claim("w")
    assert not await q.finish_cancelled(job.id)  # nobody asked: the worker must release or fail it
    assert (await row(q, job.id))["status"] == "running"
    assert await q.cancel(job.id) == "requested"
    clock.advance(2)
    assert await q.finish_cancelled(job.id)
    stored = await row(q, job.id)
    assert stored["status"] == "cancelled" and stored["error"] == "Cancelled."
    assert stored["finished_at"] == T0 + 2 and stored["lease_owner"] is None
    assert not await q.finish_cancelled(job.id)


async def test_release_gives_the_job_back_without_penalty(q: Queue, clock: FakeClock) -> None:
    job = await add(q, user=1)
    other = await add(q, user=2)
    await q.claim("w")
    await q.claim("w")
    assert not await q.release(job.id, "someone-else")
    clock.advance(3)
    assert await q.release(job.id, "w")
    stored = await row(q, job.id)
    assert stored["status"] == "queued" and stored["attempts"] == 0 and stored["not_before"] == T0 + 3
    assert stored["lease_owner"] is None and stored["lease_expires_at"] is None
    assert not await q.release(job.id, "w")  # not running any more
    assert await q.cancel(other.id) == "requested"
    assert await q.release(other.id, "w")  # a cancel was requested: cancelled, not requeued
    assert (await row(q, other.id))["status"] == "cancelled"
    again = await q.claim("w2")
    assert again is not None and again.id == job.id and again.attempts == 1


# --- recovery -----------------------------------------------------------------------------------


async def test_recover_requeues_other_workers_jobs(make_queue: MakeQueue, clock: FakeClock) -> None:
    q = await make_queue(QueueLimits(max_attempts=3))
    crashed = await add(q, user=1)
    generated = await add(q, user=2)
    mine = await add(q, user=3)
    still_queued = await add(q, user=4)
    assert (await q.claim("old")).id == crashed.id  # type: ignore[union-attr]
    assert (await q.claim("old")).id == generated.id  # type: ignore[union-attr]
    assert await q.mark_generated(generated.id, "old", ["g.png"], [1], 1.0)
    assert (await q.claim("new")).id == mine.id  # type: ignore[union-attr]
    clock.advance(100)
    report = await q.recover("new")
    assert report == RecoveryReport(requeued=[crashed.id], dead=[])
    stored = await row(q, crashed.id)
    assert stored["status"] == "queued" and stored["not_before"] == T0 + 100
    assert stored["lease_owner"] is None and stored["lease_expires_at"] is None and stored["attempts"] == 1
    assert (await row(q, generated.id))["status"] == "generated"
    assert (await row(q, mine.id))["status"] == "running"
    assert (await row(q, still_queued.id))["status"] == "queued"
    assert not await q.mark_generated(crashed.id, "old", [], [], 1.0)  # the old lease is void
    assert await q.recover("new") == RecoveryReport()


async def test_recover_at_attempt_limit_marks_dead(make_queue: MakeQueue) -> None:
    q = await make_queue(QueueLimits(max_attempts=2))
    job = await add(q)
    await q.claim("a")
    assert (await q.recover("b")).requeued == [job.id]
    await q.claim("b")
    report = await q.recover("c")
    assert report.dead == [job.id] and report.requeued == []
    dead = await q.get(job.id)
    assert dead is not None and dead.status is JobStatus.DEAD and dead.finished_at is not None
    assert dead.error == "This job crashed the generator 2 times and was dropped."


async def test_recover_cancels_jobs_with_cancel_requested(q: Queue) -> None:
    job = await add(q)
    await q.claim("a")
    await q.cancel(job.id)
    report = await q.recover("b")
    assert report.cancelled == [job.id] and report.requeued == [] and report.dead == []
    assert (await row(q, job.id))["status"] == "cancelled"


async def test_requeue_expired(make_queue: MakeQueue, clock: FakeClock) -> None:
    q = await make_queue(QueueLimits(lease_s=10.0, max_attempts=2))
    job = await add(q, user=1)
    other = await add(q, user=2)
    await q.claim("w1")
    await q.claim("w2")
    clock.advance(5)
    assert await q.requeue_expired() == []
    assert await q.extend_lease(other.id, "w2")  # w2 is alive and keeps extending
    clock.advance(6)
    assert await q.requeue_expired() == [job.id]
    assert (await row(q, job.id))["status"] == "queued"
    assert (await row(q, other.id))["status"] == "running"
    assert not await q.extend_lease(job.id, "w1")  # the stale worker lost its lease
    assert not await q.mark_generated(job.id, "w1", [], [], 1.0)
    again = await q.claim("w3")
    assert again is not None and again.id == job.id and again.attempts == 2
    clock.advance(11)
    assert sorted(await q.requeue_expired()) == sorted([job.id, other.id])
    assert (await row(q, job.id))["status"] == "dead"  # second expiry at max_attempts=2
    assert (await row(q, other.id))["status"] == "queued"


# --- fairness -----------------------------------------------------------------------------------


async def test_fairness_between_users(q: Queue) -> None:
    a_jobs = [await add(q, user=1) for _ in range(10)]
    b_job = await add(q, user=2)
    order = [job.id for job in await drain(q)]
    assert order[0] == a_jobs[0].id
    assert order[1] == b_job.id
    assert order[2:] == [j.id for j in a_jobs[1:]]


async def test_fairness_round_robin_with_frozen_clock(q: Queue) -> None:
    # every claim happens at the same clock reading: ordering must still rotate
    for _ in range(3):
        for user in (1, 2, 3):
            await add(q, user=user)
    users = [job.user_id for job in await drain(q)]
    assert users == [1, 2, 3] * 3


async def test_fairness_between_guilds(q: Queue) -> None:
    # guild 1 is busy with two users; guild 2 has one job queued last: it goes second
    for _ in range(5):
        await add(q, user=1, guild=1)
        await add(q, user=2, guild=1)
    late = await add(q, user=3, guild=2)
    claimed = await drain(q)
    assert claimed[1].id == late.id
    assert [j.user_id for j in claimed] == [1, 3, 2, 1, 2, 1, 2, 1, 2, 1, 2]


async def test_served_user_goes_to_the_back(q: Queue, clock: FakeClock) -> None:
    await add(q, user=1)
    await add(q, user=1)
    assert (await q.claim("w")).user_id == 1  # type: ignore[union-attr]
    clock.advance(1)
    await add(q, user=2)
    # user 1 was just served; newcomer 2 is next even though 1's job is older
    assert (await q.claim("w")).user_id == 2  # type: ignore[union-attr]
    assert (await q.claim("w")).user_id == 1  # type: ignore[union-attr]


@pytest.mark.sqlite_only("reads SQLite's EXPLAIN QUERY PLAN of the SQLite queue's own SQL")
async def test_claim_queries_use_indexes_not_scans(q: JobQueue) -> None:
    """Claim cost must scale with waiting users, never with the number of jobs."""
    from bot.jobs.queue import _ADMISSION_SQL, _PICK

    key = {
        "width": 512,
        "height": 512,
        "steps": 20,
        "sampler": "DDIM",
        "guidance": 7.0,
        "clip_skip": 1,
        "schedule": "automatic",
        "loras": "",
        "room": 4,
    }
    for sql in [*_PICK.values(), _ADMISSION_SQL]:
        plan = await q.connection.execute_fetchall(
            "EXPLAIN QUERY PLAN " + sql, {"now": 1.0, "guild": 0, "interaction": 1, "user": 1, **key}
        )
        details = [r[3] for r in plan]
        assert not [d for d in details if d.startswith("SCAN j") or d.startswith("SCAN jobs")], details
        assert not [d for d in details if "TEMP B-TREE" in d], details
        if sql in _PICK.values():
            assert any("USING INDEX jobs_pick" in d for d in details), details
            assert any("USING INDEX queue_users_waiting" in d for d in details), details


# --- claim_batch --------------------------------------------------------------------------------


async def test_claim_batch_takes_compatible_jobs_in_fair_order(q: Queue) -> None:
    backing_off = await add(q, user=6, params=params())
    assert (await q.claim("x")).id == backing_off.id  # type: ignore[union-attr]
    await q.fail(backing_off.id, "retry", retryable=True)  # compatible, but waits 5 s
    first = await add(q, user=1, params=params(prompt="a"))
    a2 = await add(q, user=1, params=params(prompt="a2", seed=9))
    other_size = await add(q, user=2, params=params(width=768))
    other_steps = await add(q, user=2, params=params(steps=30))
    upscale = await add(q, user=3, kind=JobKind.UPSCALE, params=params())
    b_ok = await add(q, user=2, params=params(prompt="b", guidance=7))  # 7 == 7.0
    c_ok = await add(q, user=4, guild=9, params=params(prompt="c"))
    d_ok = await add(q, user=5, params=params(prompt="d"))

    batch = await q.claim_batch("gpu", 4)
    # guild 9 was never served, so c_ok leads; then guild 0's users in service order, one job
    # each: user 1 (first), user 2 (skips two incompatible jobs to b_ok), user 3 has only an
    # upscale, user 5 (d_ok). User 1's second job waits for a later round.
    assert [j.id for j in batch] == [c_ok.id, first.id, b_ok.id, d_ok.id]
    assert all(j.status is JobStatus.RUNNING and j.lease_owner == "gpu" and j.attempts == 1 for j in batch)
    stored = await sql(q, "SELECT id FROM jobs WHERE status = 'running' AND lease_owner = 'gpu' ORDER BY id")
    assert [r[0] for r in stored] == sorted(j.id for j in batch)
    # every served user and guild moved to the back of the line
    served = await sql(q, "SELECT user_id FROM queue_users ORDER BY last_served_at DESC LIMIT 4")
    assert [r[0] for r in served] == [5, 2, 1, 4]
    # the rest stay queued and are claimed normally (backing_off is still waiting)
    rest = {j.id for j in await drain(q)}
    assert rest == {a2.id, other_size.id, other_steps.id, upscale.id}
    assert (await row(q, backing_off.id))["status"] == "queued"


async def test_claim_batch_non_txt2img_first_and_empty(q: Queue) -> None:
    assert await q.claim_batch("gpu", 4) == []
    up = await add(q, user=1, kind=JobKind.UPSCALE)
    await add(q, user=2)
    await add(q, user=3)
    batch = await q.claim_batch("gpu", 4)
    assert [j.id for j in batch] == [up.id]
    batch = await q.claim_batch("gpu", 1)
    assert len(batch) == 1
    assert len(await q.claim_batch("gpu", 8)) == 1
    assert await sql(q, "SELECT count(*) FROM jobs WHERE status = 'running'") == [(3,)]


async def test_claim_batch_round_robins_users(q: Queue) -> None:
    for _ in range(3):
        await add(q, user=1)
    await add(q, user=2)
    batch = await q.claim_batch("gpu", 4)
    assert [j.user_id for j in batch] == [1, 2, 1, 1]


# --- position and ETA ---------------------------------------------------------------------------


async def test_position_and_eta(q: Queue, clock: FakeClock) -> None:
    a = [await add(q, user=1, cost=10) for _ in range(3)]
    b = await add(q, user=2, cost=30)
    assert [await q.position(j.id) for j in a] == [1, 3, 4]
    assert await q.position(b.id) == 2
    # nothing measured yet: 0.1 s per unit; B waits for a[0] (10) then runs its own 30
    assert await q.eta_seconds(b.id) == pytest.approx(4.0)
    running = await q.claim("w")
    assert running is not None and running.id == a[0].id
    assert await q.position(a[0].id) is None
    assert await q.position(b.id) == 1
    clock.advance(0.5)
    # running a[0] has 1.0 - 0.5 s left; then B's own 3.0 s
    assert await q.eta_seconds(b.id) == pytest.approx(3.5)
    assert await q.eta_seconds(a[0].id) == pytest.approx(0.5)
    assert await q.mark_generated(a[0].id, "w", [], [], 5.0)  # 0.5 s per unit measured
    assert await q.eta_seconds(b.id) == pytest.approx(15.0)
    assert await q.eta_seconds(a[0].id) is None
    assert await q.position(12345) is None and await q.eta_seconds(12345) is None


async def test_position_predicts_claim_order(q: Queue) -> None:
    rng = random.Random(7)
    for _ in range(60):
        guild = rng.choice([0, 1, 2])
        await add(q, user=rng.randint(1, 4) + 10 * guild, guild=guild)
    # serve a few so the service times differ, then check the model against reality
    for _ in range(7):
        await q.claim("w")
    queued = await sql(q, "SELECT id FROM jobs WHERE status = 'queued'")
    predicted = sorted([(await q.position(job_id), job_id) for (job_id,) in queued])
    assert [p for p, _ in predicted] == list(range(1, len(queued) + 1))
    actual = [job.id for job in await drain(q)]
    assert actual == [job_id for _, job_id in predicted]


async def test_cancelled_calls_leave_no_transaction_open(q: Queue) -> None:
    for i in range(8):
        await add(q, user=i)
    for steps in range(8):  # cancel at different points inside the claim transaction
        task = asyncio.create_task(q.claim("w"))
        for _ in range(steps):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert not await transaction_open(q)
    # the queue still works and every job is in exactly one consistent state
    claimed = await drain(q)
    counts = await q.counts()
    assert counts["queued"] == 0 and counts["running"] == 8
    assert len(claimed) <= 8


# --- reading helpers ----------------------------------------------------------------------------


async def test_open_jobs_counts_recent(q: Queue, clock: FakeClock) -> None:
    j1 = await add(q, user=1)
    j2 = await add(q, user=1)
    clock.advance(10)
    j3 = await add(q, user=1)
    await add(q, user=2)
    await q.claim("w")  # j1 running
    await q.cancel(j2.id)
    assert [j.id for j in await q.open_jobs(1)] == [j1.id, j3.id]
    assert [j.id for j in await q.get_many([j3.id, j1.id, 999, j1.id])] == [j1.id, j3.id]
    assert await q.get_many([]) == []
    assert await q.open_jobs(99) == []
    counts = await q.counts()
    assert counts == {
        "queued": 2,
        "running": 1,
        "generated": 0,
        "done": 0,
        "failed": 0,
        "cancelled": 1,
        "dead": 0,
    }
    assert [j.id for j in await q.recent_jobs(T0 + 5)] == [j3.id, j3.id + 1]
    assert len(await q.recent_jobs(0)) == 4


def test_limits_from_settings() -> None:
    from bot.config import Settings

    settings = Settings(
        max_open_jobs_per_user=2, max_queue=7, cooldown_s=1.5, max_attempts=4, lease_s=30, retry_backoff_s=2
    )
    assert QueueLimits.from_settings(settings) == QueueLimits(
        max_open_per_user=2, max_queued=7, cooldown_s=1.5, max_attempts=4, lease_s=30.0, retry_backoff_s=2.0
    )


async def test_two_connections_racing_never_share_a_job(make_queue: MakeQueue) -> None:
    qa = await make_queue()
    qb = await make_queue()
    for i in range(120):
        await add(qa, user=i % 7, guild=i % 3)

    async def worker(q: Queue, name: str) -> list[int]:
        got = []
        while (job := await q.claim(name)) is not None:
            got.append(job.id)
            await asyncio.sleep(0.001)  # let the other connection in
        return got

    got_a, got_b = await asyncio.gather(worker(qa, "a"), worker(qb, "b"))
    assert not set(got_a) & set(got_b)
    assert sorted(got_a + got_b) == list(range(1, 121))
    owners = await sql(qa, "SELECT lease_owner, count(*) FROM jobs WHERE status = 'running' GROUP BY 1")
    expected = {name: len(got) for name, got in (("a", got_a), ("b", got_b)) if got}
    assert dict(owners) == expected
    assert await sql(qa, "SELECT max(attempts) FROM jobs") == [(1,)]


async def test_a_job_claimed_ahead_is_not_charged_for_the_crashes_of_the_running_one(
    make_queue: MakeQueue,
) -> None:
    """Attempts count when generation starts: the innocent job reserved ahead survives."""
    q = await make_queue(QueueLimits(max_attempts=3))
    crasher = await add(q, user=1)
    innocent = await add(q, user=2)
    for process in ("a", "b", "c"):
        [running] = await q.claim_batch(process, 1, reserve=True)
        assert running.id == crasher.id and running.started_at is None
        assert [j.id for j in await q.begin([running.id], process)] == [crasher.id]
        ahead = await q.claim_batch(process, 1, reserve=True)
        assert [j.id for j in ahead] == [innocent.id]
        await q.recover(f"after {process}")  # the process died with one job running, one reserved
    dead, waiting = await q.get(crasher.id), await q.get(innocent.id)
    assert dead is not None and dead.status is JobStatus.DEAD and dead.attempts == 3
    assert waiting is not None and waiting.status is JobStatus.QUEUED and waiting.attempts == 0


async def test_begin_counts_once_and_skips_cancelled_and_foreign_jobs(q: Queue) -> None:
    started, cancelled, foreign = [await add(q, user=u) for u in (1, 2, 3)]
    mine = await q.claim_batch("w", 2, reserve=True)
    await q.claim_batch("other", 1, reserve=True)
    assert await q.cancel(cancelled.id) == "requested"
    begun = await q.begin([j.id for j in mine] + [foreign.id], "w")
    assert [(j.id, j.attempts, j.cancel_requested) for j in begun] == [
        (started.id, 1, False),
        (cancelled.id, 0, True),
    ]
    again = await q.begin([started.id], "w")
    assert again[0].attempts == 1, "begin twice counts once"
    assert await q.release(started.id, "w") and (await q.get(started.id)).attempts == 0  # type: ignore[union-attr]


async def test_release_solo_keeps_a_job_out_of_batches(q: Queue) -> None:
    first, second, third = [await add(q, user=u, params=params()) for u in (1, 2, 3)]
    batch = await q.claim_batch("w", 3, reserve=True)
    assert [j.id for j in batch] == [first.id, second.id, third.id]
    for job in batch:
        assert await q.release(job.id, "w", solo=True)
    again = await q.claim_batch("w", 3)
    assert len(again) == 1 and again[0].solo, "a solo job runs alone"
    rest = await q.claim_batch("w", 3)
    assert len(rest) == 1, "and is not picked as a batch companion either"


async def test_a_cancel_before_mark_generated_wins(q: Queue) -> None:
    job = await add(q)
    await q.claim("w")
    assert await q.cancel(job.id) == "requested"
    assert not await q.mark_generated(job.id, "w", ["1/a.png"], [1], 1.0)
    assert await q.finish_cancelled(job.id)
    stored = await q.get(job.id)
    assert stored is not None and stored.status is JobStatus.CANCELLED and stored.result_files == []
    assert [j.id for j in await q.unnotified()] == [job.id], "its notice is owed"
    assert await q.mark_notified(job.id) and await q.unnotified() == []
    assert not await q.mark_notified(job.id), "marked once"


async def test_mark_done_settles_the_notice(q: Queue) -> None:
    job = await add(q)
    await q.claim("w")
    assert await q.mark_generated(job.id, "w", ["1/a.png"], [1], 1.0)
    assert await q.mark_done(job.id, 99)
    stored = await q.get(job.id)
    assert stored is not None and stored.notified_at is not None


async def test_jobs_with_different_lora_sets_do_not_share_a_batch(q: Queue) -> None:
    from generator.params import GenerationParams

    def with_prompt(prompt: str) -> dict[str, Any]:
        return GenerationParams(prompt=prompt, width=512, height=512).to_dict()

    a = await add(q, user=1, params=with_prompt("a <lora:add_detail:0.8>"))
    b = await add(q, user=2, params=with_prompt("b <lora:add_detail:0.5>"))
    c = await add(q, user=3, params=with_prompt("c, <lora:add_detail:0.8>"))
    plain = await add(q, user=4, params=with_prompt("d"))
    assert [j.id for j in await q.claim_batch("w", 4)] == [a.id, c.id]
    assert [j.id for j in await q.claim_batch("w", 4)] == [b.id]
    assert [j.id for j in await q.claim_batch("w", 4)] == [plain.id]


# --- the several-machines methods: what both backends answer alike ------------------------------


async def test_ensure_files_reports_the_names_found_nowhere(q: Queue, tmp_path: Path) -> None:
    (tmp_path / "images" / "3").mkdir(parents=True)
    (tmp_path / "images" / "3" / "0.png").write_bytes(b"png")
    assert await q.ensure_files(["3/0.png", "3/1.png", "uploads/9.png"]) == ["3/1.png", "uploads/9.png"]
    assert await q.ensure_files(["3/0.png"]) == []
    assert await q.ensure_files(["../jobs.sqlite3"]) == ["../jobs.sqlite3"], "never outside the folder"


async def test_claim_delivery_only_for_a_generated_job(q: Queue) -> None:
    job = await add(q)
    assert not await q.claim_delivery(job.id, "gateway"), "queued"
    assert (await q.claim("w")) is not None
    assert not await q.claim_delivery(job.id, "gateway"), "running"
    assert await q.mark_generated(job.id, "w", [], [1], 1.0)
    assert await q.claim_delivery(job.id, "gateway")
    assert await q.claim_delivery(job.id, "gateway"), "the same owner again"
    assert await q.mark_done(job.id, 77)
    assert not await q.claim_delivery(job.id, "gateway"), "done"
    assert not await q.claim_delivery(999_999, "gateway"), "no such job"


async def test_progress_slot_paces_each_channel(q: Queue, clock: FakeClock) -> None:
    assert await q.progress_slot(5, 2.0)
    assert not await q.progress_slot(5, 2.0)
    assert await q.progress_slot(6, 2.0), "each channel on its own"
    clock.advance(1.9)
    assert not await q.progress_slot(5, 2.0)
    clock.advance(0.1)
    assert await q.progress_slot(5, 2.0)


async def test_without_registered_workers_there_is_one_live_worker(q: Queue) -> None:
    assert await q.live_workers() == 1


@pytest.mark.sqlite_only("SQLite has no liveness: its no-op registration and orphan sweep")
async def test_sqlite_registration_is_a_no_op_and_orphans_wait_for_their_lease(q: Queue) -> None:
    job = await add(q)
    assert (await q.claim("gone")) is not None
    await q.register_worker("here", on_lost=lambda: None)
    await q.listen_cancels(lambda job_id: None)
    await q.share_files(["never/written.png"])
    assert await q.live_workers() == 1
    assert await q.requeue_orphaned() == []
    await q.unregister_worker("here")
    running = await q.get(job.id)
    assert running is not None and running.status is JobStatus.RUNNING
