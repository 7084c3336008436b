"""bot.jobs.pg_queue / pg_db only: several claimers on one PostgreSQL queue, and migrations racing.

The shared contract (every transition on both backends) is tests/jobs/test_queue.py; this file
holds what only a multi-claimer engine can show: concurrent claims keep the single-claimer fair
order, batches stay compatible and disjoint, two processes can migrate at once.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest

from bot.jobs.db import DatabaseTooNew, MigrationError
from bot.jobs.models import Job, JobKind, JobStatus, QueueLimits
from bot.jobs.pg_db import MIGRATE_LOCK, MIGRATIONS_PG_DIR, migrate, schema_version
from bot.jobs.pg_queue import PgJobQueue

pytestmark = pytest.mark.postgres

REPO = Path(__file__).resolve().parents[2]
LOOSE = QueueLimits(max_open_per_user=10_000, max_queued=10_000, cooldown_s=0.0)
USERS = 6
CLAIMERS = 3
SIZES = ((512, 512), (768, 512))


class TickingClock:
    """A clock that moves 1 s on every reading: claims taken under the queue lock get distinct,
    increasing `started_at`s, which record the order the claims committed in."""

    def __init__(self) -> None:
        self._ticks = itertools.count(1_000_000)

    def __call__(self) -> float:
        return float(next(self._ticks))


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


OpenQueue = Callable[..., Awaitable[PgJobQueue]]


@pytest.fixture
async def open_queue() -> AsyncIterator[OpenQueue]:
    """Open PgJobQueues (each with a pool of its own); all closed at the end."""
    opened: list[PgJobQueue] = []

    async def open_(
        url: str, limits: QueueLimits = LOOSE, clock: Callable[[], float] | None = None
    ) -> PgJobQueue:
        q = await PgJobQueue.open(url, limits, clock=clock or TickingClock())
        opened.append(q)
        return q

    yield open_
    for q in opened:
        await q.close()


async def second_database(url: str) -> str:
    """A second fresh migrated database on the same server as `url` (dropped with the server)."""
    base, _, _ = url.rpartition("/")
    name = f"twin_{os.urandom(6).hex()}"
    conn = await asyncpg.connect(f"{base}/postgres")
    try:
        await conn.execute(f"CREATE DATABASE {name} TEMPLATE ponybot_template")
    finally:
        await conn.close()
    return f"{base}/{name}"


def job_params(rng: random.Random, n: int) -> dict[str, Any]:
    width, height = rng.choice(SIZES)
    return {
        "prompt": f"pony {n}",
        "seed": n,
        "steps": 20,
        "guidance": 7.0,
        "width": width,
        "height": height,
        "count": rng.choice((1, 1, 2)),
        "sampler": "DDIM",
    }


async def fill(q: PgJobQueue, jobs: int, seed: int = 3) -> None:
    """The same backlog every time: jobs of USERS users in two guilds, two sizes, 1-2 images."""
    rng = random.Random(seed)
    for n in range(jobs):
        user = rng.randrange(USERS)
        await q.enqueue(
            kind=JobKind.UPSCALE if n % 11 == 5 else JobKind.TXT2IMG,
            params=job_params(rng, n),
            channel_id=1,
            user_id=user,
            guild_id=user % 2,
        )


async def commit_order(q: PgJobQueue) -> list[int]:
    """Claimed job ids in the order their claims committed (the ticking clock's `started_at`)."""
    async with q.pool.acquire() as conn:
        rows = await conn.fetch("SELECT id FROM jobs WHERE started_at IS NOT NULL ORDER BY started_at, id")
    return [row["id"] for row in rows]


async def test_concurrent_claimers_hand_out_the_single_claimer_order(
    pg_url: str, open_queue: OpenQueue
) -> None:
    solo = await open_queue(pg_url)
    await fill(solo, 240)
    single = []
    while (job := await solo.claim("only")) is not None:
        single.append(job.id)

    twin_url = await second_database(pg_url)
    seeder = await open_queue(twin_url)
    await fill(seeder, 240)
    clock = TickingClock()  # one clock for the three claimers, as one machine's wall clock would be
    claimers = [await open_queue(twin_url, clock=clock) for _ in range(CLAIMERS)]
    got: list[list[int]] = [[] for _ in claimers]
    rounds = []
    while True:
        round_ = await asyncio.gather(*(q.claim(f"claimer-{i}") for i, q in enumerate(claimers)))
        rounds.append(round_)
        for mine, job in zip(got, round_, strict=True):
            if job is not None:
                mine.append(job.id)
        if all(job is None for job in round_):
            break

    assert all(job is not None for round_ in rounds[:-1] for job in round_), "None only once empty"
    assert sorted(itertools.chain(*got)) == sorted(single), "each job handed out exactly once"
    assert await commit_order(seeder) == single


async def test_concurrent_claim_batch_matches_one_claimer_and_never_shares_a_job(
    pg_url: str, open_queue: OpenQueue
) -> None:
    solo = await open_queue(pg_url)
    await fill(solo, 180, seed=5)
    single: list[list[int]] = []
    while batch := await solo.claim_batch("only", 4, max_images=4):
        single.append([job.id for job in batch])

    twin_url = await second_database(pg_url)
    seeder = await open_queue(twin_url)
    await fill(seeder, 180, seed=5)
    clock = TickingClock()
    claimers = [await open_queue(twin_url, clock=clock) for _ in range(CLAIMERS)]
    batches: list[list[Job]] = []
    rounds = []
    while True:
        round_ = await asyncio.gather(
            *(q.claim_batch(f"claimer-{i}", 4, max_images=4) for i, q in enumerate(claimers))
        )
        rounds.append(round_)
        batches.extend(batch for batch in round_ if batch)
        if not any(round_):
            break

    # an empty batch only when the queue ran dry: in the round that drained it, and the last one
    assert all(all(round_) for round_ in rounds[:-2]), "no empty batch while jobs were waiting"

    ids = [job.id for batch in batches for job in batch]
    assert len(ids) == len(set(ids)) == 180, "no job handed to two claimers, none left behind"
    for batch in batches:
        first = batch[0]
        assert len({job.lease_owner for job in batch}) == 1
        assert sum(job.image_count for job in batch) <= 4 or len(batch) == 1
        if len(batch) > 1:
            assert all(job.batchable for job in batch)
            assert {job.batch_key for job in batch} == {first.batch_key}, "one compatible batch key"
    # in commit order, each batch is exactly what one claimer would have taken at that point,
    # so its first job is the fair pick
    by_start = sorted(batches, key=lambda batch: batch[0].started_at or 0.0)
    assert [[job.id for job in batch] for batch in by_start] == single


async def test_late_mark_generated_after_the_lease_expired_is_refused(
    pg_url: str, open_queue: OpenQueue
) -> None:
    clock = FakeClock()
    limits = QueueLimits(lease_s=10.0, max_attempts=3)
    slow, fast = await open_queue(pg_url, limits, clock), await open_queue(pg_url, limits, clock)
    job, _ = await slow.enqueue(kind="txt2img", params={"prompt": "p"}, channel_id=1, user_id=1)
    claimed = await slow.claim("slow-machine")
    assert claimed is not None and claimed.id == job.id
    clock.now += 11
    assert await fast.requeue_expired() == [job.id]
    again = await fast.claim("fast-machine")
    assert again is not None and again.id == job.id and again.attempts == 2
    assert not await slow.extend_lease(job.id, "slow-machine")
    assert not await slow.mark_generated(job.id, "slow-machine", ["late.png"], [1], 9.0)
    assert await fast.mark_generated(job.id, "fast-machine", ["1/a.png"], [2], 1.0)
    stored = await slow.get(job.id)
    assert stored is not None and stored.status is JobStatus.GENERATED
    assert stored.lease_owner == "fast-machine" and stored.result_files == ["1/a.png"]


MIGRATOR = textwrap.dedent(
    """
    import asyncio, sys
    from bot.jobs.pg_db import migrate_url
    print(asyncio.run(migrate_url(sys.argv[1])), flush=True)
    """
)


async def empty_database(pg_url: str) -> str:
    base, _, _ = pg_url.rpartition("/")
    name = f"empty_{os.urandom(6).hex()}"
    conn = await asyncpg.connect(f"{base}/postgres")
    try:
        await conn.execute(f"CREATE DATABASE {name} TEMPLATE template0")
    finally:
        await conn.close()
    return f"{base}/{name}"


async def test_two_processes_migrating_at_once_both_succeed(pg_url: str) -> None:
    url = await empty_database(pg_url)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", MIGRATOR, url],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    outputs = []
    for proc in procs:
        out, err = await asyncio.to_thread(proc.communicate, timeout=120)
        assert proc.returncode == 0, err.decode()
        outputs.append(out.decode().strip())
    newest = max(int(file.name[:4]) for file in MIGRATIONS_PG_DIR.glob("[0-9]*.sql"))
    everything = str(list(range(1, newest + 1)))
    assert sorted(outputs) == sorted([everything, "[]"]), "each migration applied once, by one of them"
    conn = await asyncpg.connect(url)
    try:
        assert await schema_version(conn) == newest
        assert await conn.fetchval("SELECT count(*) FROM queue_serve_clock") == 1
    finally:
        await conn.close()


async def test_a_database_newer_than_the_code_is_refused(pg_url: str) -> None:
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("UPDATE schema_version SET version = 99")
    finally:
        await conn.close()
    with pytest.raises(DatabaseTooNew, match="version 99"):
        await PgJobQueue.open(pg_url, LOOSE)


async def test_a_failing_migration_changes_nothing(pg_url: str, tmp_path: Path) -> None:
    url = await empty_database(pg_url)
    (tmp_path / "0001_ok.sql").write_text("CREATE TABLE kept (id integer);")
    (tmp_path / "0002_broken.sql").write_text("CREATE TABLE half (id integer);\nSELECT no_such_function();")
    conn = await asyncpg.connect(url)
    try:
        with pytest.raises(MigrationError, match=r"0002_broken\.sql failed and was rolled back"):
            await migrate(conn, tmp_path)
        assert await schema_version(conn) == 1
        assert await conn.fetchval("SELECT to_regclass('kept') IS NOT NULL")
        assert await conn.fetchval("SELECT to_regclass('half') IS NULL")
    finally:
        await conn.close()
    other = await asyncpg.connect(url)
    try:
        assert await other.fetchval("SELECT pg_try_advisory_lock($1)", MIGRATE_LOCK), "the lock was released"
    finally:
        await other.close()


async def test_the_owed_notice_sweep_can_use_its_partial_index(pg_url: str) -> None:
    """As on SQLite: the unnotified() query's IN list implies jobs_unnotified's WHERE."""
    from bot.jobs.models import NOTICE_STATUSES, sql_literals

    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("SET enable_seqscan = off")
        plan = await conn.fetch(
            "EXPLAIN SELECT * FROM jobs WHERE notified_at IS NULL"
            f" AND status IN ({sql_literals(NOTICE_STATUSES)}) ORDER BY id"
        )
    finally:
        await conn.close()
    assert any("jobs_unnotified" in row[0] for row in plan), [row[0] for row in plan]
