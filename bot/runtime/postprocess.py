"""Post-processing: what happens to a job once its generation has ended (off the GPU thread).

The worker hands each finished result to `PostProcess.save_and_deliver`: the image filter
(`screen`), PNG encoding and disk writes (in the worker's I/O thread), `mark_generated`, then
delivery and the `on_finished` hook. Failed and cancelled jobs go through `fail` / `report`. All of
it runs in background tasks (`spawn`), so nothing Discord-bound is awaited between two generations.

Every path ends in an outcome the member sees: a database write that fails is tried again with
back-off (`bot.db.retrying`) and then fails the job visibly; a job's lease is dropped in `finally`,
so a job whose outcome could not be recorded at all goes back to the queue when its lease runs
out; and a notice that could not be shown stays owed (`notified_at` NULL) until `sweep_notices`
shows it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from bot.jobs.contract import JobQueueContract
from bot.jobs.db import RETRY_DELAYS, retrying
from bot.jobs.models import TERMINAL_STATUSES, Job, JobStatus
from bot.logging_setup import log_job_event
from bot.runtime.images import save_results
from generator.errors import GeneratorError

if TYPE_CHECKING:
    from PIL import Image

    from generator.pipeline import GenerationResult

# the worker's logger: these lines were always `bot.worker` ones, and log filters key on the name
log = logging.getLogger("bot.runtime.worker")
T = TypeVar("T")


class ScreenedImage(Protocol):
    """One image as the image filter sees it (generator.pipeline.ImageResult has this shape)."""

    image: Image.Image


class ScreenedImages(Protocol):
    """The images the image filter looks at, replaced in place (a GenerationResult, or an upload)."""

    @property
    def images(self) -> Sequence[ScreenedImage]: ...


#: the image filter hook: may replace images of the result in place (bot.discord_ui.output_filter)
Screen = Callable[[Job, ScreenedImages], Awaitable[None]]


class Deliverer(Protocol):
    """What the worker needs from delivery (bot.discord_ui.delivery.Delivery implements it)."""

    async def job_started(self, job: Job) -> None: ...
    async def job_requeued(self, job: Job) -> None: ...
    def progress(self, job: Job, step: int, total: int, preview: Image.Image | None) -> None: ...
    async def deliver(self, job: Job) -> None: ...
    def is_delivering(self, job_id: int) -> bool: ...
    async def notify(self, job: Job) -> bool: ...


async def safe(coro: Awaitable[T]) -> T | None:
    """Await a side task; log and swallow its error (it must never kill the worker)."""
    try:
        return await coro
    except Exception:
        log.exception("ignored error in worker side task")
        return None


def _log_outcome(task: asyncio.Task[None]) -> None:
    """Done callback of every background task: its exception is logged, never lost."""
    if not task.cancelled() and task.exception() is not None:
        log.error("background task %s failed", task.get_name(), exc_info=task.exception())


class PostProcess:
    """Saves, records and delivers finished jobs, and reports failed ones; owned by the Worker."""

    def __init__(
        self,
        queue: JobQueueContract,
        delivery: Deliverer,
        *,
        images_dir: Path,
        worker_id: str,
        io: Executor,
        held: set[int],
        wake: Callable[[], None],
        on_finished: Callable[[Job], Awaitable[None] | None] | None = None,
        retry_delays: Sequence[float] = RETRY_DELAYS,
    ):
        self.queue = queue
        self.delivery = delivery
        self.images_dir = images_dir
        self.worker_id = worker_id
        self.on_finished = on_finished
        #: seconds between tries of a failed database write (then the job fails visibly)
        self.retry_delays = tuple(retry_delays)
        #: optional hook run on each finished result before its images are saved (the image filter);
        #: it may replace images in place; if it raises, the job fails and nothing is posted
        self.screen: Screen | None = None
        #: background tasks still running (the worker waits for them when it stops)
        self.tasks: set[asyncio.Task[None]] = set()
        self._io = io
        self._held = held  # the worker's leases: a job leaves it once its outcome is recorded
        self._wake = wake
        self._reporting: set[int] = set()  # notices being shown now (one at a time per job)

    def spawn(self, coro: Awaitable[None]) -> None:
        """Run `coro` in a background task the worker waits for when it stops; errors are logged."""
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        task.add_done_callback(_log_outcome)

    async def _write(self, op: Callable[[], Awaitable[T]], what: str) -> T:
        return await retrying(op, what, delays=self.retry_delays)

    # --- finished generations -----------------------------------------------------------------

    async def save_and_deliver(self, job: Job, result: GenerationResult) -> None:
        """Screen, save and record a finished result, then deliver it; never raises.

        If the outcome cannot be recorded even after retries, the job is failed visibly; if even
        that write fails, its lease is dropped so the job goes back to the queue when it expires.
        """
        try:
            await self._save_and_deliver(job, result)
        except Exception as exc:
            log.exception("post-processing failed", extra={"job_id": job.id})
            await self.fail(
                job, GeneratorError(f"Could not record the result ({type(exc).__name__}: {exc}).")
            )
        finally:
            self._held.discard(job.id)

    async def _save_and_deliver(self, job: Job, result: GenerationResult) -> None:
        if await self._cancel_won(job):
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
            if await self._cancel_won(job):
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
        recorded = await self._write(
            lambda: self.queue.mark_generated(job.id, self.worker_id, files, seeds, result.seconds),
            f"recording job #{job.id} as generated",
        )
        if not recorded:
            if not await self._cancel_won(job):  # a cancel that landed meanwhile wins
                log.warning("lost the lease before saving", extra={"job_id": job.id})
            return
        self._held.discard(job.id)
        log_job_event(log, job.id, job.user_id, "generated", gen_s=result.seconds, images=len(files))
        updated = await self.queue.get(job.id)
        if updated is not None:
            await self.deliver(updated)

    async def _cancel_won(self, job: Job) -> bool:
        """If the member cancelled the job meanwhile: record it cancelled, show that, return True."""
        if not await self._write(lambda: self.queue.is_cancel_requested(job.id), "reading a cancel"):
            return False
        await self.cancelled(job)
        return True

    async def cancelled(self, job: Job) -> None:
        """Record a running job whose cancel was requested as cancelled and show the notice."""
        try:
            await self._write(lambda: self.queue.finish_cancelled(job.id), f"cancelling job #{job.id}")
        finally:  # if that failed, the lease runs out and `requeue_expired` cancels the job
            self._held.discard(job.id)
        log_job_event(log, job.id, job.user_id, "cancelled")
        await self.report(job.id)

    # --- failures and notices -----------------------------------------------------------------

    async def fail(self, job: Job, exc: GeneratorError) -> None:
        """Record a failure (retried, dead or failed) and show it; never raises."""
        try:
            updated: Job = await self._write(
                lambda: self.queue.fail(job.id, str(exc), retryable=exc.retryable), f"failing job #{job.id}"
            )
        except Exception:
            # the database is gone: the lease runs out and the job is queued again (attempts apply)
            log.exception("could not record the failure of job %s", job.id, extra={"job_id": job.id})
            return
        finally:
            self._held.discard(job.id)
        log_job_event(
            log, job.id, job.user_id, str(updated.status), error=str(exc), attempts=updated.attempts
        )
        if updated.status == JobStatus.QUEUED:
            self._wake()
        self.spawn(self.report(job.id))  # a Discord edit: off the path to the next generation

    async def report(self, job_id: int) -> None:
        """Show a job's current outcome: the notice of a finished job (once), or "will retry"."""
        if job_id in self._reporting:
            return
        self._reporting.add(job_id)
        try:
            job = await self.queue.get(job_id)
            if job is None:
                return
            if job.status in TERMINAL_STATUSES:
                if job.notified_at is None and await self.delivery.notify(job):
                    await self._finished(job)
            elif job.status == JobStatus.QUEUED:
                await safe(self.delivery.job_requeued(job))
        finally:
            self._reporting.discard(job_id)

    async def sweep_notices(self) -> None:
        """Show every notice still owed (a crash or a Discord failure after the job ended)."""
        for job in await self.queue.unnotified():
            if job.id not in self._reporting:
                self.spawn(self.report(job.id))

    async def deliver(self, job: Job) -> None:
        """Deliver a generated job's result; a passing failure leaves it for the worker's sweep."""
        try:
            await self.delivery.deliver(job)
        except Exception:
            log.exception("delivery failed", extra={"job_id": job.id})
            return
        done = await self.queue.get(job.id)
        if done is None:
            return
        if done.status == JobStatus.DONE:
            await self._finished(done)
        elif done.status in TERMINAL_STATUSES and done.notified_at is None:
            await self.report(done.id)  # delivery gave up but could not show why yet

    async def _finished(self, job: Job) -> None:
        if self.on_finished is not None:
            outcome = self.on_finished(job)
            if asyncio.iscoroutine(outcome):
                await safe(outcome)
