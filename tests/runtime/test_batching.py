"""Dynamic batching: fair claims under an image cap, no starvation, and batched pixels equal to
the same requests run alone (the real Worker, Engine and tiny model on the CPU)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from worker_helpers import run_until_done

from bot.jobs.models import Job, JobKind, QueueLimits
from bot.jobs.queue import JobQueue
from bot.runtime.engine import Engine
from bot.runtime.worker import Worker
from generator.config import GeneratorConfig
from generator.metadata import parse_parameters, read_parameters
from generator.params import GenerationParams
from generator.pipeline import Generator
from generator.tiny import write_tiny_model

torch.set_num_threads(1)  # 2 shared cores: avoid OpenMP contention
LOOSE = QueueLimits(max_open_per_user=10_000, max_queued=10_000, cooldown_s=0.0)


def params(**overrides: Any) -> dict[str, Any]:
    base = GenerationParams(prompt="a pony", seed=1, steps=3, width=64, height=64, count=1).to_dict()
    base.update(overrides)
    return base


@pytest.fixture
async def q(tmp_path: Path) -> AsyncIterator[JobQueue]:
    queue = await JobQueue.open(tmp_path / "jobs.sqlite3", LOOSE)
    yield queue
    await queue.close()


async def add(q: JobQueue, user: int, **overrides: Any) -> Job:
    job, _ = await q.enqueue(
        kind=JobKind.TXT2IMG, params=params(**overrides), channel_id=1, user_id=user, enforce_limits=False
    )
    return job


# --- queue level: fairness, image cap, no starvation ------------------------------------------


async def test_incompatible_job_is_not_starved_by_a_flood_of_compatible_ones(q: JobQueue) -> None:
    a_jobs = [await add(q, user=1, prompt=f"a{i}", seed=i) for i in range(12)]
    b_job = await add(q, user=2, width=128)  # another size: never batched with A's
    claims = []
    while batch := await q.claim_batch("gpu", 4, max_images=4):
        claims.append([j.id for j in batch])
    # A's first batch, then B at once (served least recently), then the rest of A's
    assert claims[0] == [j.id for j in a_jobs[:4]]
    assert claims[1] == [b_job.id]
    assert claims[2:] == [[j.id for j in a_jobs[4:8]], [j.id for j in a_jobs[8:]]]


async def test_batches_interleave_users_and_the_first_job_is_the_fair_pick(q: JobQueue) -> None:
    a = [await add(q, user=1, prompt=f"a{i}") for i in range(4)]
    c = [await add(q, user=3, prompt=f"c{i}") for i in range(4)]
    first = await q.claim_batch("gpu", 4, max_images=4)
    assert [j.id for j in first] == [a[0].id, c[0].id, a[1].id, c[1].id]
    second = await q.claim_batch("gpu", 4, max_images=4)
    assert [j.id for j in second] == [a[2].id, c[2].id, a[3].id, c[3].id]


async def test_batch_size_counts_images_not_jobs(q: JobQueue) -> None:
    big = await add(q, user=1, count=3)
    too_big = await add(q, user=2, count=2)  # 3 + 2 > 4: waits for the next claim
    small = await add(q, user=3, count=1)  # fits the room left
    four = await add(q, user=4, count=4)
    batch = await q.claim_batch("gpu", 4, max_images=4)
    assert [j.id for j in batch] == [big.id, small.id]
    batch = await q.claim_batch("gpu", 4, max_images=4)
    assert [j.id for j in batch] == [too_big.id]  # the fair pick; user 4's 4 images do not fit
    batch = await q.claim_batch("gpu", 4, max_images=4)
    assert [j.id for j in batch] == [four.id]
    # the first job is always taken, even above the cap
    huge = await add(q, user=5, count=4)
    assert [j.id for j in await q.claim_batch("gpu", 2, max_images=2)] == [huge.id]


# --- worker level: each image keeps its prompt, negative and seed ------------------------------


class CollectingDelivery:
    """A Delivery stand-in: records what was delivered and marks it done."""

    def __init__(self, queue: JobQueue) -> None:
        self.queue = queue
        self.delivered: list[int] = []

    async def job_started(self, job: Job) -> None:
        pass

    def progress(self, job: Job, step: int, total: int, preview: Any = None) -> None:
        pass

    async def deliver(self, job: Job) -> None:
        self.delivered.append(job.id)
        await self.queue.mark_done(job.id, 10_000 + job.id)

    async def notify(self, job: Job) -> bool:
        return await self.queue.mark_notified(job.id)

    async def job_requeued(self, job: Job) -> None:
        pass

    def is_delivering(self, job_id: int) -> bool:
        return False


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


async def test_worker_batches_compatible_jobs_with_the_pixels_of_single_runs(
    q: JobQueue, tiny_model: Path, tmp_path: Path
) -> None:
    config = GeneratorConfig(model=str(tiny_model), device="cpu", revision=None)
    engine = Engine(config)
    await engine.start_loading()
    assert await engine.wait_loaded()
    requests = [
        dict(prompt="a red pony", negative="blurry", seed=11, count=1),
        dict(prompt="a (blue:1.3) pony", negative="", seed=22, count=2),
        dict(prompt="meadow at night", negative="sun, day", seed=33, count=1),
    ]
    jobs = [await add(q, user=i + 1, **r) for i, r in enumerate(requests)]
    delivery = CollectingDelivery(q)
    worker = Worker(q, engine, delivery, images_dir=tmp_path / "images", batch_size=4, poll_s=0.05)
    await run_until_done(worker, q, jobs)
    assert [c.method for c in engine.timeline] == ["txt2img_batch"]  # one pipeline call for all three

    alone = Generator.load(config)
    for job, request in zip(jobs, requests, strict=True):
        done = await q.get(job.id)
        assert done is not None and len(done.result_files) == request["count"]
        expected = alone.txt2img(GenerationParams.from_dict(params(**request)))
        for index, name in enumerate(done.result_files):
            with Image.open(tmp_path / "images" / name) as png:
                parsed = parse_parameters(read_parameters(png) or "")
                assert np.array_equal(
                    np.asarray(png.convert("RGB")), np.asarray(expected.images[index].image)
                )
            assert parsed["prompt"] == request["prompt"]
            assert parsed["negative"] == request["negative"]
            assert parsed["seed"] == request["seed"] + index
    engine.shutdown()
