"""The GPU thread never waits for Discord: the real Worker and Engine with the tiny model on the CPU,
against a delivery whose status edits and uploads are slow. Timestamps come from the engine's own
record of its GPU thread (`Engine.timeline`, `time.perf_counter`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch
from worker_helpers import run_until_done, wait_for, wait_for_status

from bot.jobs.models import Job, JobKind, JobStatus, QueueLimits
from bot.jobs.queue import JobQueue
from bot.runtime.engine import Engine
from bot.runtime.worker import Worker
from generator.config import GeneratorConfig
from generator.params import GenerationParams
from generator.tiny import write_tiny_model

torch.set_num_threads(1)  # 2 shared cores: avoid OpenMP contention
LOOSE = QueueLimits(max_open_per_user=10_000, max_queued=10_000, cooldown_s=0.0)
UPLOAD_S = 1.0  #: how long each slow Discord call takes


class SlowDelivery:
    """Status edits and uploads that each take UPLOAD_S; records when they start and end."""

    def __init__(self, queue: JobQueue) -> None:
        self.queue = queue
        self.started_edit: dict[int, tuple[float, float]] = {}
        self.upload: dict[int, tuple[float, float]] = {}
        self.failures: list[int] = []

    async def job_started(self, job: Job) -> None:
        t0 = time.perf_counter()
        await asyncio.sleep(UPLOAD_S)
        self.started_edit[job.id] = (t0, time.perf_counter())

    def progress(self, job: Job, step: int, total: int, preview: Any = None) -> None:
        pass

    async def deliver(self, job: Job) -> None:
        t0 = time.perf_counter()
        await asyncio.sleep(UPLOAD_S)
        await self.queue.mark_done(job.id, 10_000 + job.id)
        self.upload[job.id] = (t0, time.perf_counter())

    async def notify(self, job: Job) -> bool:
        self.failures.append(job.id)
        await asyncio.sleep(UPLOAD_S)
        return await self.queue.mark_notified(job.id)

    async def job_requeued(self, job: Job) -> None:
        await asyncio.sleep(UPLOAD_S)

    def is_delivering(self, job_id: int) -> bool:
        return False


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
async def q(tmp_path: Path) -> AsyncIterator[JobQueue]:
    queue = await JobQueue.open(tmp_path / "jobs.sqlite3", LOOSE)
    yield queue
    await queue.close()


@pytest.fixture
async def engine(tiny_model: Path) -> AsyncIterator[Engine]:
    engine = Engine(GeneratorConfig(model=str(tiny_model), device="cpu", revision=None))
    await engine.start_loading()
    assert await engine.wait_loaded()
    yield engine
    engine.shutdown()


async def add(q: JobQueue, user: int, **overrides: Any) -> Job:
    params = GenerationParams(prompt=f"pony {user}", seed=user, steps=3, width=64, height=64).to_dict()
    params.update(overrides)
    job, _ = await q.enqueue(
        kind=JobKind.TXT2IMG, params=params, channel_id=1, user_id=user, enforce_limits=False
    )
    return job


def slow_decode(engine: Engine, seconds: float) -> None:
    """Make the VAE decode (after the last step, in the GPU thread) take `seconds` longer."""
    generator = engine.generator
    decode = generator._decode

    def slowed(latents: torch.Tensor) -> Any:
        time.sleep(seconds)
        return decode(latents)

    generator._decode = slowed


async def test_gpu_thread_never_waits_for_status_edits_or_uploads(
    q: JobQueue, engine: Engine, tmp_path: Path
) -> None:
    jobs = [await add(q, user=u) for u in (1, 2, 3)]
    delivery = SlowDelivery(q)
    worker = Worker(q, engine, delivery, images_dir=tmp_path / "images", batch_size=1, poll_s=0.05)
    await run_until_done(worker, q, jobs)
    calls = list(engine.timeline)
    assert [c.method for c in calls] == ["txt2img"] * 3 and all(c.ok for c in calls)
    first, second, third = (j.id for j in jobs)
    # the first generation did not wait for its "generating" edit
    assert calls[0].start < delivery.started_edit[first][1]
    # each next generation started before the previous job's upload finished
    assert calls[1].start < delivery.upload[first][1]
    assert calls[2].start < delivery.upload[second][1]
    # and the GPU thread sat idle for far less than one upload between them
    assert max(engine.idle_gaps(calls)) < UPLOAD_S / 2
    assert set(delivery.upload) == {first, second, third}


async def test_next_batch_is_claimed_while_the_last_one_decodes(
    q: JobQueue, engine: Engine, tmp_path: Path
) -> None:
    slow_decode(engine, 0.4)
    jobs = [await add(q, user=u) for u in (1, 2)]
    claims: list[tuple[float, list[int]]] = []
    claim_batch = q.claim_batch

    async def recorded(*args: Any, **kwargs: Any) -> list[Job]:
        t0 = time.perf_counter()
        batch = await claim_batch(*args, **kwargs)
        if batch:
            claims.append((t0, [j.id for j in batch]))
        return batch

    q.claim_batch = recorded  # type: ignore[method-assign]
    worker = Worker(q, engine, SlowDelivery(q), images_dir=tmp_path / "images", batch_size=1, poll_s=0.05)
    await run_until_done(worker, q, jobs)
    calls = list(engine.timeline)
    assert [ids for _, ids in claims] == [[jobs[0].id], [jobs[1].id]]
    assert claims[1][0] < calls[0].end, "claimed during the first job's decode"
    assert calls[1].start - calls[0].end < 0.2


async def test_a_batch_claimed_ahead_is_cancelled_or_put_back(
    q: JobQueue, engine: Engine, tmp_path: Path
) -> None:
    slow_decode(engine, 1.0)
    first = await add(q, user=1)
    cancelled = await add(q, user=2)
    delivery = SlowDelivery(q)
    worker = Worker(q, engine, delivery, images_dir=tmp_path / "images", batch_size=1, poll_s=0.05)
    worker.start()

    await wait_for_status(q, cancelled.id, JobStatus.RUNNING, 30, "second job claimed ahead")
    assert await q.cancel(cancelled.id) == "requested"
    worker.request_cancel(cancelled.id)

    async def settled() -> bool:
        a, b = await q.get(first.id), await q.get(cancelled.id)
        return (
            a is not None and b is not None and a.status is JobStatus.DONE and b.status is JobStatus.CANCELLED
        )

    await wait_for(settled, 30, "first done, second cancelled")
    calls = list(engine.timeline)
    assert len(calls) == 1 and calls[0].ok, "a job cancelled while claimed ahead never reaches the GPU"
    stored = await q.get(cancelled.id)
    assert stored is not None and stored.attempts == 0 and stored.notified_at is not None
    assert delivery.failures == [cancelled.id], "its cancel notice is shown once"

    # stopping while a batch is claimed ahead puts it back, its attempt not counted
    third = await add(q, user=3)
    fourth = await add(q, user=4)
    worker.wake()

    await wait_for_status(q, fourth.id, JobStatus.RUNNING, 30, "fourth job claimed ahead")
    await worker.stop(grace_s=10)
    back = await q.get(fourth.id)
    assert back is not None and back.status is JobStatus.QUEUED and back.attempts == 0
    done = await q.get(third.id)
    assert done is not None and done.status in (JobStatus.GENERATED, JobStatus.DONE)
