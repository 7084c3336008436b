"""Post-processing: what happens to a job once its generation has ended (off the GPU thread).

The worker hands each finished result to `PostProcess.save_and_deliver`: the image filter
(`screen`), PNG encoding and disk writes (in the worker's I/O thread), `mark_generated`, then
delivery and the `on_finished` hook. Failed and cancelled jobs go through `fail` / `report`. All of
it runs in background tasks (`spawn`), so nothing Discord-bound is awaited between two generations.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, Protocol

from bot.images import save_results
from bot.logging_setup import log_job_event
from bot.queue import Job, JobQueue, JobStatus
from generator.errors import GeneratorError

# the worker's logger: these lines were always `bot.worker` ones, and log filters key on the name
log = logging.getLogger("bot.worker")


class Deliverer(Protocol):
    """What the worker needs from delivery (bot.delivery.Delivery implements it)."""

    async def job_started(self, job: Job) -> None: ...
    def progress(self, job: Job, step: int, total: int, preview: Any) -> None: ...
    async def deliver(self, job: Job) -> None: ...
    def is_delivering(self, job_id: int) -> bool: ...
    async def report_failure(self, job: Job) -> None: ...


async def safe(coro: Awaitable[Any]) -> Any:
    """Await a side task; log and swallow its error (it must never kill the worker)."""
    try:
        return await coro
    except Exception:
        log.exception("ignored error in worker side task")
        return None


class PostProcess:
    """Saves, records and delivers finished jobs, and reports failed ones; owned by the Worker."""

    def __init__(
        self,
        queue: JobQueue,
        delivery: Deliverer,
        *,
        images_dir: Path,
        worker_id: str,
        io: Executor,
        held: set[int],
        wake: Callable[[], None],
        on_finished: Callable[[Job], Awaitable[None] | None] | None = None,
    ):
        self.queue = queue
        self.delivery = delivery
        self.images_dir = images_dir
        self.worker_id = worker_id
        self.on_finished = on_finished
        #: optional hook run on each finished result before its images are saved (the image filter);
        #: it may replace images in place; if it raises, the job fails and nothing is posted
        self.screen: Callable[[Job, Any], Awaitable[None]] | None = None
        #: background tasks still running (the worker waits for them when it stops)
        self.tasks: set[asyncio.Task[None]] = set()
        self._io = io
        self._held = held  # the worker's leases: a job leaves it once its outcome is recorded
        self._wake = wake

    def spawn(self, coro: Awaitable[None]) -> None:
        """Run `coro` in a background task the worker waits for when it stops."""
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def save_and_deliver(self, job: Job, result: Any) -> None:
        if await self.queue.is_cancel_requested(job.id):  # cancelled while it ran: drop the images
            await self.queue.finish_cancelled(job.id)
            self._held.discard(job.id)
            await self.report(job.id)
            return
        if self.screen is not None:
            try:
                await self.screen(job, result)
            except Exception:
                log.exception("image filter failed", extra={"job_id": job.id})
                await self.fail(
                    job, GeneratorError("The image filter failed, so the images were not posted.")
                )
                return
        try:
            files = await asyncio.get_running_loop().run_in_executor(
                self._io, save_results, self.images_dir, job.id, result
            )
        except OSError as exc:
            log.error("could not save images: %s", exc, extra={"job_id": job.id})
            await self.fail(job, GeneratorError(f"Could not save the images ({exc.strerror or exc})."))
            return
        seeds = [img.seed for img in result.images]
        if not await self.queue.mark_generated(job.id, self.worker_id, files, seeds, result.seconds):
            log.warning("lost the lease before saving", extra={"job_id": job.id})
            self._held.discard(job.id)
            return
        self._held.discard(job.id)
        log_job_event(log, job.id, job.user_id, "generated", gen_s=result.seconds, images=len(files))
        updated = await self.queue.get(job.id)
        if updated is not None:
            await self.deliver(updated)

    async def fail(self, job: Job, exc: GeneratorError) -> None:
        updated = await self.queue.fail(job.id, str(exc), retryable=exc.retryable)
        self._held.discard(job.id)
        log_job_event(
            log, job.id, job.user_id, str(updated.status), error=str(exc), attempts=updated.attempts
        )
        if updated.status == JobStatus.QUEUED:
            self._wake()
        self.spawn(self.report(job.id))  # a Discord edit: off the path to the next generation

    async def report(self, job_id: int) -> None:
        job = await self.queue.get(job_id)
        if job is None:
            return
        if job.status != JobStatus.QUEUED:
            await safe(self.delivery.report_failure(job))
            await self._finished(job)
        else:
            await safe(self.delivery.job_requeued(job))

    async def deliver(self, job: Job) -> None:
        try:
            await self.delivery.deliver(job)
        except Exception:
            log.exception("delivery failed", extra={"job_id": job.id})
            return
        done = await self.queue.get(job.id)
        if done is not None:
            await self._finished(done)

    async def _finished(self, job: Job) -> None:
        if self.on_finished is not None:
            outcome = self.on_finished(job)
            if asyncio.iscoroutine(outcome):
                await safe(outcome)
