"""PostProcess on a real JobQueue: save the PNGs, record, deliver; cancels, failed writes, owed notices.

Delivery is a recording double (what Discord would have been asked to show, and the job's row at
that moment); it marks jobs done / notified the way bot.discord_ui.delivery.Delivery does.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bot.jobs.models import Job, JobStatus, QueueLimits
from bot.jobs.queue import JobQueue
from bot.runtime.postprocess import PostProcess
from generator.metadata import read_parameters

WORKER = "worker-pp"
FAST_RETRY = (0.001, 0.002, 0.004)


@dataclass
class Picture:
    """One generated image (GenerationResult's ImageResult shape)."""

    image: Image.Image
    seed: int
    parameters: str


@dataclass
class Result:
    """A finished generation (GenerationResult's shape, without torch)."""

    images: list[Picture]
    seconds: float


def result_of(job: Job, count: int = 2) -> Result:
    return Result(
        [
            Picture(Image.new("RGB", (64, 48), (40 * n, 100, 200)), 5 + n, f"a pony\nSteps: 3, Seed: {5 + n}")
            for n in range(count)
        ],
        seconds=1.25,
    )


@dataclass
class RecordingDelivery:
    """Records every call; `deliver` marks the job done, `notify` records the notice once."""

    queue: JobQueue
    delivered: list[tuple[int, JobStatus, list[str]]] = field(default_factory=list)
    notices: list[tuple[int, JobStatus, str | None]] = field(default_factory=list)
    requeued: list[int] = field(default_factory=list)
    #: answers of the next `notify` calls (True: shown; False: Discord failed for a passing reason)
    notify_answers: list[bool] = field(default_factory=list)
    deliver_error: Exception | None = None

    async def job_started(self, job: Job) -> None:
        """Not used by PostProcess."""

    async def job_requeued(self, job: Job) -> None:
        self.requeued.append(job.id)

    def progress(self, job: Job, step: int, total: int, preview: Any) -> None:
        """Not used by PostProcess."""

    def is_delivering(self, job_id: int) -> bool:
        return False

    async def deliver(self, job: Job) -> None:
        current = await self.queue.get(job.id)
        assert current is not None
        self.delivered.append((job.id, current.status, current.result_files))
        if self.deliver_error is not None:
            raise self.deliver_error
        await self.queue.mark_done(job.id, 4242)

    async def notify(self, job: Job) -> bool:
        current = await self.queue.get(job.id)
        assert current is not None
        if current.notified_at is not None:
            return True
        if self.notify_answers and not self.notify_answers.pop(0):
            return False
        self.notices.append((job.id, current.status, current.error))
        await self.queue.mark_notified(job.id)
        return True


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[JobQueue]:
    q = await JobQueue.open(tmp_path / "jobs.sqlite3", QueueLimits(max_attempts=3, retry_backoff_s=0.01))
    yield q
    await q.close()


@pytest.fixture
def io_pool() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(1, thread_name_prefix="pp-io")
    yield pool
    pool.shutdown(wait=True)


@pytest.fixture
def delivery(queue: JobQueue) -> RecordingDelivery:
    return RecordingDelivery(queue)


@pytest.fixture
def finished() -> list[int]:
    return []


@pytest.fixture
def held() -> set[int]:
    """The worker's leases (jobs whose outcome is not recorded yet)."""
    return set()


@pytest.fixture
def post(
    queue: JobQueue,
    delivery: RecordingDelivery,
    tmp_path: Path,
    io_pool: ThreadPoolExecutor,
    finished: list[int],
    held: set[int],
) -> PostProcess:
    def on_finished(job: Job) -> None:
        finished.append(job.id)

    return PostProcess(
        queue,
        delivery,
        images_dir=tmp_path / "images",
        worker_id=WORKER,
        io=io_pool,
        held=held,
        wake=lambda: None,
        on_finished=on_finished,
        retry_delays=FAST_RETRY,
    )


async def running_job(queue: JobQueue, prompt: str = "a pony") -> Job:
    """A job claimed by this worker (what the worker hands to post-processing)."""
    job, _ = await queue.enqueue(
        kind="txt2img",
        params={"prompt": prompt, "seed": 5, "count": 2},
        channel_id=2,
        user_id=111,
        guild_id=1,
    )
    claimed = await queue.claim(WORKER)
    assert claimed is not None and claimed.id == job.id
    return claimed


async def settle(post: PostProcess) -> None:
    """Wait for the background tasks (notices) post-processing started."""
    while post.tasks:
        await asyncio.gather(*list(post.tasks))


async def row(queue: JobQueue, job_id: int) -> Job:
    job = await queue.get(job_id)
    assert job is not None
    return job


def fail_times(target: Callable[..., Awaitable[Any]], times: int | None) -> Callable[..., Awaitable[Any]]:
    """`target`, raising "database is locked" on its first `times` calls (None: always)."""
    calls = {"n": 0}

    async def flaky(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if times is None or calls["n"] <= times:
            raise sqlite3.OperationalError("database is locked")
        return await target(*args, **kwargs)

    flaky.calls = calls  # type: ignore[attr-defined]
    return flaky


async def test_save_and_deliver_writes_the_pngs_records_then_delivers(
    post: PostProcess,
    queue: JobQueue,
    delivery: RecordingDelivery,
    tmp_path: Path,
    finished: list[int],
    held: set[int],
) -> None:
    job = await running_job(queue)
    held.add(job.id)

    await post.save_and_deliver(job, result_of(job))

    names = [f"{job.id}/ponybot-{job.id}-1.png", f"{job.id}/ponybot-{job.id}-2.png"]
    # delivery was handed a job already recorded as generated, with its files
    assert delivery.delivered == [(job.id, JobStatus.GENERATED, names)]
    for n, name in enumerate(names):
        path = tmp_path / "images" / name
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (64, 48)
        assert read_parameters(path) == f"a pony\nSteps: 3, Seed: {5 + n}"
    done = await row(queue, job.id)
    assert done.status is JobStatus.DONE and done.seeds == [5, 6] and done.gen_seconds == 1.25
    assert finished == [job.id]
    assert delivery.notices == []
    assert job.id not in held


async def test_a_cancel_before_saving_wins_and_nothing_is_delivered(
    post: PostProcess, queue: JobQueue, delivery: RecordingDelivery, tmp_path: Path
) -> None:
    job = await running_job(queue)
    assert await queue.cancel(job.id) == "requested"

    await post.save_and_deliver(job, result_of(job))
    await settle(post)

    cancelled = await row(queue, job.id)
    assert cancelled.status is JobStatus.CANCELLED and cancelled.error == "Cancelled."
    assert cancelled.result_files == []
    assert delivery.delivered == []
    assert delivery.notices == [(job.id, JobStatus.CANCELLED, "Cancelled.")]
    assert not (tmp_path / "images" / str(job.id)).exists()


async def test_a_cancel_that_lands_while_the_filter_runs_still_wins(
    post: PostProcess, queue: JobQueue, delivery: RecordingDelivery, finished: list[int]
) -> None:
    job = await running_job(queue)

    async def screen(screened: Job, result: Any) -> None:
        assert await queue.cancel(screened.id) == "requested"  # the member pressed Cancel just now

    post.screen = screen
    await post.save_and_deliver(job, result_of(job))
    await settle(post)

    assert (await row(queue, job.id)).status is JobStatus.CANCELLED
    assert delivery.delivered == []
    assert [status for _, status, _ in delivery.notices] == [JobStatus.CANCELLED]
    assert finished == [job.id]  # the cancelled notice is the job's outcome


async def test_a_failing_filter_fails_the_job_visibly_without_posting(
    post: PostProcess, queue: JobQueue, delivery: RecordingDelivery, tmp_path: Path
) -> None:
    job = await running_job(queue)

    async def screen(screened: Job, result: Any) -> None:
        raise RuntimeError("classifier crashed")

    post.screen = screen
    await post.save_and_deliver(job, result_of(job))
    await settle(post)

    reason = "The image filter failed, so the images were not posted."
    assert (await row(queue, job.id)).status is JobStatus.FAILED
    assert delivery.notices == [(job.id, JobStatus.FAILED, reason)]
    assert delivery.delivered == []
    assert not (tmp_path / "images" / str(job.id)).exists()


async def test_a_database_write_that_fails_briefly_is_retried(
    post: PostProcess, queue: JobQueue, delivery: RecordingDelivery, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = await running_job(queue)
    flaky = fail_times(queue.mark_generated, 2)
    monkeypatch.setattr(queue, "mark_generated", flaky)

    await post.save_and_deliver(job, result_of(job))

    assert flaky.calls["n"] == 3  # type: ignore[attr-defined]
    assert (await row(queue, job.id)).status is JobStatus.DONE
    assert len(delivery.delivered) == 1 and delivery.notices == []


async def test_a_database_write_that_keeps_failing_fails_the_job_visibly(
    post: PostProcess,
    queue: JobQueue,
    delivery: RecordingDelivery,
    monkeypatch: pytest.MonkeyPatch,
    held: set[int],
) -> None:
    job = await running_job(queue)
    held.add(job.id)
    flaky = fail_times(queue.mark_generated, None)
    monkeypatch.setattr(queue, "mark_generated", flaky)

    await post.save_and_deliver(job, result_of(job))
    await settle(post)

    assert flaky.calls["n"] == len(FAST_RETRY) + 1
    reason = "Could not record the result (OperationalError: database is locked)."
    failed = await row(queue, job.id)
    assert failed.status is JobStatus.FAILED and failed.error == reason
    assert delivery.notices == [(job.id, JobStatus.FAILED, reason)]
    assert delivery.delivered == []
    assert job.id not in held  # its lease is dropped either way


async def test_images_that_cannot_be_written_fail_the_job_with_the_reason(
    post: PostProcess, queue: JobQueue, delivery: RecordingDelivery, tmp_path: Path
) -> None:
    (tmp_path / "images").write_text("not a folder")  # every write fails with an OSError
    job = await running_job(queue)

    await post.save_and_deliver(job, result_of(job))
    await settle(post)

    failed = await row(queue, job.id)
    assert failed.status is JobStatus.FAILED
    assert failed.error is not None and failed.error.startswith("Could not save the images (")
    assert delivery.notices == [(job.id, JobStatus.FAILED, failed.error)]
    assert delivery.delivered == []


async def test_a_passing_delivery_failure_leaves_the_job_generated_for_the_sweep(
    post: PostProcess, queue: JobQueue, delivery: RecordingDelivery, finished: list[int]
) -> None:
    job = await running_job(queue)
    delivery.deliver_error = ConnectionResetError("Discord went away")

    await post.save_and_deliver(job, result_of(job))
    await settle(post)

    waiting = await row(queue, job.id)
    assert waiting.status is JobStatus.GENERATED and len(waiting.result_files) == 2
    assert finished == [] and delivery.notices == []

    delivery.deliver_error = None
    await post.deliver(waiting)  # what the worker's sweep does
    assert (await row(queue, job.id)).status is JobStatus.DONE
    assert finished == [job.id]


async def test_sweep_notices_shows_each_owed_notice_once(
    post: PostProcess, queue: JobQueue, delivery: RecordingDelivery, finished: list[int]
) -> None:
    first = await running_job(queue, "one")
    await queue.fail(first.id, "Out of memory.", retryable=False)
    second, _ = await queue.enqueue(kind="txt2img", params={"prompt": "two"}, channel_id=2, user_id=222)
    assert await queue.cancel(second.id) == "cancelled"
    delivery.notify_answers = [True, False]  # the second notice hits a Discord outage

    await post.sweep_notices()
    await settle(post)
    assert delivery.notices == [(first.id, JobStatus.FAILED, "Out of memory.")]
    assert [job.id for job in await queue.unnotified()] == [second.id]

    await post.sweep_notices()
    await settle(post)
    await post.sweep_notices()
    await settle(post)
    assert delivery.notices == [
        (first.id, JobStatus.FAILED, "Out of memory."),
        (second.id, JobStatus.CANCELLED, "Cancelled."),
    ]
    assert await queue.unnotified() == []
    assert finished == [first.id, second.id]
