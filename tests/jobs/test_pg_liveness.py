"""bot.jobs.pg_queue on several machines: worker liveness, shared files, delivery holds, progress
pacing, cancel notifications and ETAs over the live workers (real PostgreSQL; each PgJobQueue has
a pool of its own, as a process on another machine would)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pytest
from test_queue import FakeClock  # the SQLite queue tests' hand-moved clock

from bot.jobs import estimates
from bot.jobs.models import Job, JobStatus, QueueFull, QueueLimits
from bot.jobs.pg_queue import PgJobQueue

pytestmark = pytest.mark.postgres

LOOSE = QueueLimits(max_open_per_user=10_000, max_queued=10_000, cooldown_s=0.0, lease_s=600.0)


OpenQueue = Callable[..., Awaitable[PgJobQueue]]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def open_queue(pg_url: str, tmp_path: Path, clock: FakeClock) -> AsyncIterator[OpenQueue]:
    """Open PgJobQueues on this test's database, each with its own pool and images folder."""
    opened: list[PgJobQueue] = []

    async def open_(name: str, limits: QueueLimits = LOOSE) -> PgJobQueue:
        q = await PgJobQueue.open(
            pg_url,
            limits,
            clock=clock,
            images_dir=tmp_path / name / "images",
            application_name=f"ponybot-{name}",
        )
        opened.append(q)
        return q

    yield open_
    for q in opened:
        await q.close()


async def admin(pg_url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(pg_url, server_settings={"application_name": "liveness-test"})
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def terminate(pg_url: str, worker_id: str) -> int:
    """Kill every connection named `worker_id`, as an operator (or a dead network) would."""
    rows = await admin(
        pg_url,
        "SELECT pg_terminate_backend(pid) AS ok FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name = $1",
        worker_id,
    )
    return len(rows)


async def add(q: PgJobQueue, user: int = 1, channel: int = 7, cost: int = 10) -> Job:
    job, created = await q.enqueue(
        kind="txt2img", params={"prompt": "a pony"}, channel_id=channel, user_id=user, cost=cost
    )
    assert created
    return job


async def wait_for(condition: Callable[[], bool], timeout_s: float) -> float:
    """Seconds until `condition()` held; fails after `timeout_s`."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"not within {timeout_s} s")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def write_png(q: PgJobQueue, name: str, data: bytes) -> Path:
    assert q.images_dir is not None
    path = q.images_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


async def test_a_live_workers_job_survives_another_workers_recover_and_orphan_sweep(
    open_queue: OpenQueue,
) -> None:
    a, b = await open_queue("a"), await open_queue("b")
    await a.register_worker("machine-a")
    job = await add(a)
    assert (await a.claim("machine-a")) is not None
    crashed = await add(a, user=2)
    assert (await a.claim("machine-gone")) is not None  # a worker that is not live (never registered)

    report = await b.recover("machine-b")
    assert report.requeued == [crashed.id]
    assert await b.requeue_orphaned() == []
    kept = await b.get(job.id)
    assert kept is not None and kept.status is JobStatus.RUNNING and kept.lease_owner == "machine-a"


async def test_a_killed_registration_calls_on_lost_and_its_job_comes_back(
    open_queue: OpenQueue, pg_url: str
) -> None:
    a, b = await open_queue("a"), await open_queue("b")
    lost: list[str] = []
    await a.register_worker("machine-a", on_lost=lambda: lost.append("machine-a"))
    job = await add(a)
    assert (await a.claim("machine-a")) is not None
    write_png(a, f"{job.id}/0.png", b"late image")

    assert await terminate(pg_url, "machine-a") == 1
    await wait_for(lambda: bool(lost), 1.0)
    start = time.monotonic()
    while not (requeued := await b.requeue_orphaned()):
        assert time.monotonic() - start < 1.0, "requeued within 1 s"
        await asyncio.sleep(0.02)
    assert requeued == [job.id]
    back = await b.get(job.id)
    assert back is not None and back.status is JobStatus.QUEUED and back.lease_owner is None

    assert not await a.mark_generated(job.id, "machine-a", [f"{job.id}/0.png"], [1], 1.0)
    assert await admin(pg_url, "SELECT name FROM job_files") == []
    assert not await a.extend_lease(job.id, "machine-a")
    with pytest.raises(ValueError, match="register a fresh id"):
        await a.register_worker("machine-a")
    await asyncio.sleep(0.1)
    assert lost == ["machine-a"], "on_lost is called once"


async def test_a_late_write_of_a_lost_worker_stores_nothing_even_before_the_sweep(
    open_queue: OpenQueue, pg_url: str
) -> None:
    a = await open_queue("a")
    lost: list[bool] = []
    await a.register_worker("machine-a", on_lost=lambda: lost.append(True))
    job = await add(a)
    assert (await a.claim("machine-a")) is not None
    write_png(a, f"{job.id}/0.png", b"late image")
    await terminate(pg_url, "machine-a")
    await wait_for(lambda: bool(lost), 1.0)
    assert not await a.mark_generated(job.id, "machine-a", [f"{job.id}/0.png"], [1], 1.0)
    assert await admin(pg_url, "SELECT name FROM job_files") == []
    still = await a.get(job.id)
    assert still is not None and still.status is JobStatus.RUNNING


async def test_a_worker_id_postgres_would_alter_is_refused(open_queue: OpenQueue) -> None:
    q = await open_queue("a")
    for bad in ("x" * 64, "machine-\u00e9", ""):
        with pytest.raises(ValueError, match="printable ASCII"):
            await q.register_worker(bad)
    await q.register_worker("x" * 63)
    assert await q.live_workers() == 1


async def test_unregister_makes_the_worker_not_live_without_on_lost(open_queue: OpenQueue) -> None:
    a, b = await open_queue("a"), await open_queue("b")
    lost: list[bool] = []
    await a.register_worker("machine-a", on_lost=lambda: lost.append(True))
    job = await add(a)
    assert (await a.claim("machine-a")) is not None
    assert await b.requeue_orphaned() == []
    await a.unregister_worker("machine-a")
    assert await b.requeue_orphaned() == [job.id]
    await asyncio.sleep(0.1)
    assert lost == []


async def test_live_workers_counts_registered_workers_of_every_process(
    open_queue: OpenQueue, pg_url: str
) -> None:
    a, b = await open_queue("a"), await open_queue("b")
    assert await a.live_workers() == 1, "at least 1"
    await a.register_worker("machine-a")
    await b.register_worker("machine-b1")
    await b.register_worker("machine-b2")
    assert await a.live_workers() == 3
    # a pool connection carrying a worker's name does not make it live
    named = await asyncpg.connect(pg_url, server_settings={"application_name": "machine-c"})
    try:
        assert await b.live_workers() == 3
    finally:
        await named.close()
    await b.unregister_worker("machine-b2")
    assert await a.live_workers() == 2


async def test_mark_generated_stores_the_files_and_another_machine_fetches_them(
    open_queue: OpenQueue, pg_url: str
) -> None:
    a, b = await open_queue("a"), await open_queue("b")
    await a.register_worker("machine-a")
    job = await add(a)
    assert (await a.claim("machine-a")) is not None
    names = [f"{job.id}/0.png", f"{job.id}/1.png"]
    write_png(a, names[0], b"\x89PNG first")
    write_png(a, names[1], b"\x89PNG second")
    assert await a.mark_generated(job.id, "machine-a", names, [1, 2], 1.0)
    rows = await admin(pg_url, "SELECT name, job_id, data FROM job_files ORDER BY name")
    assert [(r["name"], r["job_id"], bytes(r["data"])) for r in rows] == [
        (names[0], job.id, b"\x89PNG first"),
        (names[1], job.id, b"\x89PNG second"),
    ]

    assert b.images_dir is not None and not b.images_dir.exists()
    assert await b.ensure_files([*names, "99/0.png"]) == ["99/0.png"]
    assert (b.images_dir / names[0]).read_bytes() == b"\x89PNG first"
    assert (b.images_dir / names[1]).read_bytes() == b"\x89PNG second"
    assert [p.name for p in (b.images_dir / str(job.id)).iterdir() if p.name.endswith(".tmp")] == []
    assert await b.ensure_files(names) == [], "already there"


async def test_share_files_publishes_an_upload_before_its_job_exists(open_queue: OpenQueue) -> None:
    gateway, worker = await open_queue("gateway"), await open_queue("worker")
    write_png(gateway, "uploads/42.png", b"member upload")
    await gateway.share_files(["uploads/42.png"])
    write_png(gateway, "uploads/42.png", b"member upload, replaced")
    await gateway.share_files(["uploads/42.png"], job_id=5)
    assert await worker.ensure_files(["uploads/42.png"]) == []
    assert worker.images_dir is not None
    assert (worker.images_dir / "uploads/42.png").read_bytes() == b"member upload, replaced"
    with pytest.raises(FileNotFoundError, match=r"uploads/nope\.png"):
        await gateway.share_files(["uploads/nope.png"])
    assert await worker.ensure_files(["../escape.png", "/etc/passwd"]) == ["../escape.png", "/etc/passwd"]


async def test_claim_delivery_holds_a_generated_job_for_one_owner(
    open_queue: OpenQueue, clock: FakeClock
) -> None:
    a, b = await open_queue("a"), await open_queue("b")
    one, two = a.application_name, b.application_name  # holders are named by their live connections
    job = await add(a)
    assert (await a.claim("w")) is not None
    assert not await a.claim_delivery(job.id, one), "running: nothing to deliver"
    assert await a.mark_generated(job.id, "w", [], [1], 1.0)
    assert await a.claim_delivery(job.id, one, hold_s=30)
    assert not await b.claim_delivery(job.id, two, hold_s=30)
    assert await a.claim_delivery(job.id, one, hold_s=30), "the holder may go on"
    clock.now += 29
    assert not await b.claim_delivery(job.id, two, hold_s=30)
    clock.now += 2
    assert await b.claim_delivery(job.id, two, hold_s=30), "the hold expired"
    assert not await a.claim_delivery(job.id, one, hold_s=30)
    assert await b.mark_done(job.id, 99)
    assert not await b.claim_delivery(job.id, two), "done: nothing to deliver"


async def test_a_delivery_hold_ends_with_its_holders_connections(open_queue: OpenQueue) -> None:
    """A process killed mid-delivery: its hold is taken over at once, not after `hold_s`."""
    a, b = await open_queue("a"), await open_queue("b")
    job = await add(a)
    assert (await a.claim("w")) is not None
    assert await a.mark_generated(job.id, "w", [], [1], 1.0)
    assert await a.claim_delivery(job.id, a.application_name, hold_s=600)
    assert not await b.claim_delivery(job.id, b.application_name), "a live holder keeps it"
    await a.close()  # the holder's process is gone: no connection carries its name
    assert await b.claim_delivery(job.id, b.application_name), "a dead holder's hold is over"


async def test_progress_slot_lets_one_process_through_per_interval_per_channel(
    open_queue: OpenQueue, clock: FakeClock
) -> None:
    a, b = await open_queue("a"), await open_queue("b")
    first = await asyncio.gather(*(q.progress_slot(7, 2.0) for q in (a, b, a, b)))
    assert sorted(first) == [False, False, False, True]
    assert await b.progress_slot(8, 2.0), "another channel has its own interval"
    clock.now += 1.5
    assert not await a.progress_slot(7, 2.0)
    assert not await b.progress_slot(7, 2.0)
    clock.now += 0.5
    again = await asyncio.gather(a.progress_slot(7, 2.0), b.progress_slot(7, 2.0))
    assert sorted(again) == [False, True]


async def test_a_cancel_on_one_process_reaches_the_listener_on_another(open_queue: OpenQueue) -> None:
    gateway, worker = await open_queue("gateway"), await open_queue("worker")
    await worker.register_worker("machine-w")
    heard: list[int] = []
    await worker.listen_cancels(heard.append)
    job = await add(gateway)
    queued = await add(gateway, user=2)
    assert (await worker.claim("machine-w")) is not None
    assert await gateway.cancel(queued.id) == "cancelled"
    assert await gateway.cancel(job.id) == "requested"
    assert await wait_for(lambda: bool(heard), 1.0) < 1.0
    await asyncio.sleep(0.1)
    assert heard == [job.id], "only a request on a running job is announced"


async def test_listen_cancels_without_a_registered_worker_uses_its_own_connection(
    open_queue: OpenQueue,
) -> None:
    gateway, listener = await open_queue("gateway"), await open_queue("listener")
    heard: list[int] = []
    await listener.listen_cancels(heard.append)
    job = await add(gateway)
    assert (await gateway.claim("w")) is not None
    assert await gateway.cancel(job.id) == "requested"
    await wait_for(lambda: bool(heard), 1.0)
    assert heard == [job.id]


async def test_the_eta_divides_the_work_ahead_by_the_live_workers(open_queue: OpenQueue) -> None:
    a, b = await open_queue("a"), await open_queue("b")
    jobs = [await add(a, user=n, cost=10) for n in range(1, 21)]
    last = jobs[-1]
    await a.register_worker("machine-a")
    one = await a.eta_seconds(last.id)
    await b.register_worker("machine-b")
    two = await a.eta_seconds(last.id)
    assert one is not None and two is not None
    spu = estimates.DEFAULT_SEC_PER_UNIT
    assert one == pytest.approx(20 * 10 * spu)
    assert two == pytest.approx(19 * 10 * spu / 2 + 10 * spu)
    assert two == pytest.approx(one / 2, rel=0.1)


async def test_a_full_queue_suggests_a_retry_shared_by_the_live_workers(open_queue: OpenQueue) -> None:
    q = await open_queue("a", QueueLimits(max_open_per_user=10, max_queued=1, cooldown_s=0.0))
    await add(q, cost=50)
    with pytest.raises(QueueFull) as one:
        await add(q, user=2)
    await q.register_worker("machine-a")
    await q.register_worker("machine-b")
    with pytest.raises(QueueFull) as two:
        await add(q, user=2)
    assert one.value.retry_after == pytest.approx(50 * estimates.DEFAULT_SEC_PER_UNIT)
    assert two.value.retry_after == pytest.approx(50 * estimates.DEFAULT_SEC_PER_UNIT / 2)


async def test_delete_files_drops_stored_files_by_name_and_by_job(open_queue: OpenQueue, pg_url: str) -> None:
    q = await open_queue("a")
    for name in ("uploads/1.png", "uploads/2.png", "4/0.png", "4/1.png"):
        write_png(q, name, name.encode())
    await q.share_files(["uploads/1.png", "uploads/2.png"])
    await q.share_files(["4/0.png", "4/1.png"], job_id=4)
    assert await q.delete_files(["uploads/1.png"], [4]) == 3
    assert [r["name"] for r in await admin(pg_url, "SELECT name FROM job_files")] == ["uploads/2.png"]
