"""Workers on one PostgreSQL queue: each registers itself (a live connection named after its id),
takes a fresh id when that registration is lost, and puts back the jobs of workers that are gone."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from worker_helpers import wait_for

from bot.jobs.models import JobStatus, QueueLimits
from bot.jobs.pg_queue import PgJobQueue
from bot.runtime.engine import Engine
from bot.runtime.worker import Worker
from generator.config import GeneratorConfig

pytestmark = pytest.mark.postgres


class NoDiscord:
    """A Deliverer that shows nothing (no job is generated in these tests)."""

    async def job_started(self, job: Any) -> None: ...
    async def job_requeued(self, job: Any) -> None: ...
    def progress(self, job: Any, step: int, total: int, preview: Any) -> None: ...
    async def deliver(self, job: Any) -> None: ...
    def is_delivering(self, job_id: int) -> bool:
        return False

    async def notify(self, job: Any) -> bool:
        return True


async def live_names(pg_url: str) -> set[str]:
    """application_name of every connection to this test's database."""
    conn = await asyncpg.connect(pg_url)
    try:
        rows = await conn.fetch(
            "SELECT application_name FROM pg_stat_activity WHERE datname = current_database()"
        )
    finally:
        await conn.close()
    return {str(r["application_name"]) for r in rows}


async def terminate(pg_url: str, application_name: str) -> int:
    """Kill the connections named `application_name` (as a failing network would); how many."""
    conn = await asyncpg.connect(pg_url)
    try:
        rows = await conn.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = $1",
            application_name,
        )
    finally:
        await conn.close()
    return len(rows)


@pytest.fixture
async def queue(pg_url: str, tmp_path: Path) -> AsyncIterator[PgJobQueue]:
    q = await PgJobQueue.open(pg_url, QueueLimits(), images_dir=tmp_path / "images")
    yield q
    await q.close()


@pytest.fixture
async def worker(queue: PgJobQueue, tmp_path: Path) -> AsyncIterator[Worker]:
    """A started worker whose model never loads: it claims nothing, but registers and sweeps."""
    engine = Engine(GeneratorConfig(model="unused"), loader=lambda config: object())
    w = Worker(queue, engine, NoDiscord(), images_dir=tmp_path / "images", poll_s=0.05)
    w.start()
    yield w
    await w.stop(grace_s=5)


async def test_a_worker_is_live_while_it_runs(worker: Worker, pg_url: str) -> None:
    async def registered() -> bool:
        return worker.worker_id in await live_names(pg_url)

    await wait_for(registered, 10, "worker registered")
    worker_id = worker.worker_id
    await worker.stop(grace_s=5)

    async def gone() -> bool:
        return worker_id not in await live_names(pg_url)

    await wait_for(gone, 10, "registration closed on stop")


async def test_a_lost_registration_is_replaced_by_a_fresh_id(worker: Worker, pg_url: str) -> None:
    first = worker.worker_id

    async def registered(name: str) -> bool:
        return name in await live_names(pg_url)

    await wait_for(lambda: registered(first), 10, "worker registered")
    assert await terminate(pg_url, first) >= 1

    async def re_registered() -> bool:
        return worker.worker_id != first and await registered(worker.worker_id)

    await wait_for(re_registered, 15, "registered again under a fresh id")
    assert first not in await live_names(pg_url)


async def test_running_jobs_of_a_worker_that_is_gone_go_back_to_the_queue(
    worker: Worker, queue: PgJobQueue
) -> None:
    job, _ = await queue.enqueue(
        kind="txt2img",
        params={"prompt": "a pony", "steps": 3, "width": 64, "height": 64},
        channel_id=1,
        user_id=2,
    )
    claimed = await queue.claim("a-worker-that-died")  # never registered: not live
    assert claimed is not None and claimed.id == job.id

    async def requeued() -> bool:
        current = await queue.get(job.id)
        return current is not None and current.status is JobStatus.QUEUED

    await wait_for(requeued, 10, "the orphaned job back in the queue")
    current = await queue.get(job.id)
    assert current is not None and current.lease_owner is None
