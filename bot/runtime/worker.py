"""The worker: drains the queue through the engine and hands results to delivery.

One loop claims jobs (batched when compatible, at most `batch_size` images), runs them in the
engine's GPU thread, and hands each finished job to its `PostProcess` (bot/runtime/postprocess.py): PNG
encoding and disk writes (in an I/O thread), `mark_generated`, then delivery. Nothing Discord-bound
is awaited between two generations: the "generating" status edit, failure and cancel notices,
encodes and uploads all run in background tasks. When the running generation reports its last step, the next
batch is claimed ahead (`_claim_ahead`), so the GPU thread gets it the moment it is free; the
fair pick is thus made at most one VAE decode early.

Several workers may drain one PostgreSQL queue (`ponybot worker` processes on other machines): a
worker registers its id with the queue on start (a live connection named after it), listens for
cancels made by other processes, and puts back about every second the running jobs of workers
that are no longer live (`requeue_orphaned`). When its own registration is lost, it takes a fresh
id and registers again; its late writes under the old id are refused by the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from bot.jobs.contract import JobQueueContract
from bot.jobs.db import retrying
from bot.jobs.extras import hires_of
from bot.jobs.models import Job, JobKind
from bot.logging_setup import log_job_event
from bot.runtime.engine import Engine, EngineState
from bot.runtime.postprocess import Deliverer, PostProcess, Screen, safe
from bot.runtime.sources import load_source
from generator.errors import Cancelled, GeneratorError
from generator.params import GenerationParams

if TYPE_CHECKING:
    from PIL import Image

    from generator.pipeline import GenerationResult

log = logging.getLogger(__name__)
T = TypeVar("T")


class WorkerState(enum.StrEnum):
    """What the worker is doing (its value is what /pony-admin status and /healthz show)."""

    STARTING = "starting"
    IDLE = "idle"
    GENERATING = "generating"
    #: paused by an admin (`Worker.pause`): queued jobs wait
    PAUSED = "paused"
    #: the model is loading, failed to load or hung (`Worker.describe` names which)
    WAITING_FOR_MODEL = "waiting for model"
    STOPPING = "stopping"
    STOPPED = "stopped"
    #: this process runs no worker (`ponybot run --no-worker`): `ponybot worker` processes run the jobs
    ELSEWHERE = "none in this process (ponybot worker runs the jobs)"


class JobTimeout(GeneratorError):
    """The generation ran past PONY_JOB_TIMEOUT_S and was interrupted."""

    retryable = True


class WorkerFailed(Exception):
    """The worker cannot go on in this process (a hung GPU, a crashed worker task).

    `run_bot` raises it after a clean shutdown; `ponybot run` prints it as one line and exits
    non-zero, so its supervisor (systemd) restarts the bot. Its jobs are back in the queue.
    """


class GpuHung(Exception):
    """A generator call ignored the watchdog's stop request: the GPU thread is hung.

    The engine stops taking work, the worker puts its jobs back (their attempt not counted) and
    reports it through `on_fatal`; the process then exits non-zero so its supervisor restarts it
    on a fresh CUDA context.
    """


@dataclass
class _Running:
    job: Job
    cancel: threading.Event = field(default_factory=threading.Event)
    timed_out: bool = False


def _consume(task: asyncio.Future[Any]) -> None:
    """Read an abandoned generation's outcome so asyncio does not warn about it."""
    if not task.cancelled():
        task.exception()


def new_worker_id() -> str:
    """A worker id unique to this process run (at most 63 characters: a PostgreSQL application_name)."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Worker:
    """Claims jobs and runs them; one per bot process."""

    def __init__(
        self,
        queue: JobQueueContract,
        engine: Engine,
        delivery: Deliverer,
        *,
        images_dir: Path,
        batch_size: int = 1,
        job_timeout_s: float = 600.0,
        lease_s: float = 120.0,
        poll_s: float = 1.0,
        heartbeat: Callable[[], None] | None = None,
        on_finished: Callable[[Job], Awaitable[None] | None] | None = None,
        on_fatal: Callable[[str], None] | None = None,
        worker_id: str | None = None,
    ):
        self.queue = queue
        self.engine = engine
        self.delivery = delivery
        self.images_dir = images_dir
        self.batch_size = batch_size
        self.job_timeout_s = job_timeout_s
        #: after the watchdog fires, how long a generation may take to stop before its thread is abandoned
        self.cancel_grace_s = 10.0
        self.lease_s = lease_s
        self.poll_s = poll_s
        #: seconds between two `requeue_orphaned` sweeps (jobs of workers that are no longer live)
        self.orphan_every_s = 1.0
        self.worker_id = worker_id or new_worker_id()
        self._registration_lost = False
        self._paused = False
        self.heartbeat = heartbeat or (lambda: None)
        #: called once when the worker cannot go on in this process (a hung GPU thread)
        self.on_fatal = on_fatal or (lambda reason: None)
        #: why the worker stopped for good, if it did
        self.fatal: str | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._running: dict[int, _Running] = {}
        self._held: set[int] = set()  # jobs this worker holds a lease on (generating or saving)
        self._io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ponybot-io")
        self.post = PostProcess(
            queue,
            delivery,
            images_dir=images_dir,
            worker_id=self.worker_id,
            io=self._io,
            held=self._held,
            wake=self.wake,
            on_finished=on_finished,
        )
        self._main: asyncio.Task[None] | None = None
        self._lease_task: asyncio.Task[None] | None = None
        #: the next batch, claimed while the running generation finishes (see `_claim_ahead`)
        self._ahead: asyncio.Future[list[Job]] | None = None
        self.current_job_ids: list[int] = []
        self.state = WorkerState.STARTING

    @property
    def screen(self) -> Screen | None:
        """The image filter hook, run on each finished result before saving (see `PostProcess`)."""
        return self.post.screen

    @screen.setter
    def screen(self, hook: Screen | None) -> None:
        self.post.screen = hook

    @property
    def on_finished(self) -> Callable[[Job], Awaitable[None] | None] | None:
        """Called with each job that reached its outcome through this worker (see `PostProcess`)."""
        return self.post.on_finished

    @on_finished.setter
    def on_finished(self, hook: Callable[[Job], Awaitable[None] | None] | None) -> None:
        self.post.on_finished = hook

    def describe(self) -> str:
        """The state in words, e.g. "idle" or "waiting for model (loading)"."""
        if self.state is WorkerState.WAITING_FOR_MODEL:
            return f"{self.state.value} ({self.engine.state.value})"
        return self.state.value

    # --- control ------------------------------------------------------------------------------

    @property
    def paused(self) -> bool:
        """True while paused (`pause`): no new job starts; a running one finishes."""
        return self._paused

    def pause(self) -> None:
        """Start no new jobs until `resume` (the running batch finishes; one claimed ahead goes back)."""
        self._paused = True

    def resume(self) -> None:
        """Start jobs again after `pause`."""
        self._paused = False
        self.wake()

    def stay_elsewhere(self) -> None:
        """This process runs no worker (`ponybot run --no-worker`): never started, it claims nothing;
        `request_cancel` and `wake` do nothing, and status shows `WorkerState.ELSEWHERE`."""
        self.state = WorkerState.ELSEWHERE

    def start(self) -> None:
        """Register with the queue, recover left-over jobs and start draining the queue."""
        self._main = asyncio.get_running_loop().create_task(self._run(), name="ponybot-worker")
        self._lease_task = asyncio.get_running_loop().create_task(self._keep_leases(), name="ponybot-leases")
        self._main.add_done_callback(self._ended)
        self._lease_task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        """A worker task ended: if by an error (a bug), stop for good so the process is restarted
        rather than accepting jobs nobody runs."""
        if task.cancelled() or task.exception() is None:
            return
        log.critical("worker task %s crashed", task.get_name(), exc_info=task.exception())
        if self.fatal is None:
            self.fatal = f"The worker crashed ({type(task.exception()).__name__}: {task.exception()})"
            self._stopping = True
            self.on_fatal(self.fatal)

    def wake(self) -> None:
        """Tell the worker a job may be waiting."""
        self._wake.set()

    def request_cancel(self, job_id: int) -> None:
        """Interrupt a running job at its next step (the queue flag is set by the caller)."""
        running = self._running.get(job_id)
        if running is not None:
            running.cancel.set()

    async def stop(self, grace_s: float = 30.0) -> None:
        """Stop claiming; let the running job finish within `grace_s`, else put it back."""
        self._stopping = True
        self._wake.set()
        if self._main is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._main), grace_s)
            except TimeoutError:
                for running in list(self._running.values()):
                    running.cancel.set()
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(self._main, 10)
        if self._ahead is not None:  # a claim ahead still in flight: its jobs are released below
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._ahead), 10)
        if self.post.tasks:
            await asyncio.wait(self.post.tasks, timeout=grace_s)
        for job_id in list(self._held):  # if this fails, the lease runs out and recovery requeues
            await safe(self.queue.release(job_id, self.worker_id))
        if self._lease_task is not None:
            self._lease_task.cancel()
        if self._main is not None:
            await safe(self.queue.unregister_worker(self.worker_id))
        self._io.shutdown(wait=False)
        self.state = WorkerState.STOPPED

    # --- main loop ----------------------------------------------------------------------------

    async def _run(self) -> None:
        await self._register()
        await self._recover()
        last_sweep = last_orphans = 0.0
        while not self._stopping:
            self.heartbeat()
            try:
                if self._registration_lost:
                    await self._register_again()
                if time.monotonic() - last_orphans >= self.orphan_every_s:
                    last_orphans = time.monotonic()
                    await self._requeue_orphaned()
                if time.monotonic() - last_sweep > self.lease_s / 4:
                    last_sweep = time.monotonic()
                    await self._sweep()
                await self._step()
            except Exception:  # a database or Discord error must never end the worker
                log.exception("worker step failed; going on")
                await self._idle()
        await safe(self._release_ahead())
        self.state = WorkerState.STOPPING

    async def _register(self) -> None:
        """Register `worker_id` as a live worker and listen for cancels made by other processes;
        retried until the database answers."""
        while not self._stopping:
            try:
                await self.queue.register_worker(self.worker_id, on_lost=self._lost)
                await self.queue.listen_cancels(self.request_cancel)
            except Exception:
                log.exception("registering worker %s failed; trying again", self.worker_id)
                await self._idle()
                continue
            log.info("worker registered", extra={"worker_id": self.worker_id})
            return

    def _lost(self) -> None:
        """The queue lost this worker's registration (its connection died): the loop re-registers."""
        log.warning("worker %s is no longer registered; registering a fresh id", self.worker_id)
        for running in list(self._running.values()):
            running.cancel.set()  # its result would be refused: free the GPU now, not at the end
        self._registration_lost = True
        self.wake()

    async def _register_again(self) -> None:
        """After a lost registration: drop the jobs held under the old id (another live worker, or
        this one, requeues them; late writes under the old id are refused), take a fresh id and
        register it."""
        self._registration_lost = False
        for running in list(self._running.values()):
            running.cancel.set()  # its result could not be recorded any more: free the GPU
        self._held.clear()
        await safe(self.queue.unregister_worker(self.worker_id))
        self.worker_id = new_worker_id()
        self.post.worker_id = self.worker_id
        await self._register()

    async def _requeue_orphaned(self) -> None:
        """Running jobs of workers that are no longer live go back to the queue."""
        requeued = await safe(self.queue.requeue_orphaned())
        if requeued:
            log.info("requeued jobs of workers that are gone: %s", requeued)
            await safe(self.post.sweep_notices())  # an orphan whose cancel was requested ended cancelled
            self.wake()

    async def _recover(self) -> None:
        """Put back what a previous process left running; retried until the database answers."""
        while not self._stopping:
            try:
                report = await self.queue.recover(self.worker_id)
            except Exception:
                log.exception("recovery failed; trying again")
                await self._idle()
                continue
            if report.requeued or report.dead or report.cancelled:
                log.info(
                    "recovered jobs: requeued %s, dead %s, cancelled %s",
                    report.requeued,
                    report.dead,
                    report.cancelled,
                )
            return

    async def _sweep(self) -> None:
        """Expired leases back to the queue; owed deliveries and notices sent again."""
        await safe(self.queue.requeue_expired())
        await safe(self._redeliver())
        await safe(self.post.sweep_notices())

    async def _step(self) -> None:
        """Claim and run one batch, or wait a little when there is nothing to do."""
        if self._paused or self.engine.state is not EngineState.READY:
            self.state = WorkerState.PAUSED if self._paused else WorkerState.WAITING_FOR_MODEL
            await self._release_ahead()
            await self._idle()
            return
        try:
            jobs = await self._next_jobs()
        except Exception:
            log.exception("claim failed; retrying")
            await self._idle()
            return
        if not jobs:
            self.state = WorkerState.IDLE
            await self._idle()
            return
        self.state = WorkerState.GENERATING
        await self._process(jobs)

    async def _claim(self) -> list[Job]:
        """Reserve the next batch (at most `batch_size` images) and hold its leases.

        Reserved, not started: the attempt counts when `_process` begins the jobs.
        """
        jobs = await self.queue.claim_batch(
            self.worker_id, self.batch_size, max_images=self.batch_size, reserve=True
        )
        for job in jobs:
            self._held.add(job.id)
            self._running.setdefault(job.id, _Running(job))  # cancel requests reach it from now on
        return jobs

    def _claim_ahead(self) -> None:
        """The running generation is at its last step: claim the next batch now (on the loop)."""
        if (
            self._ahead is None
            and not self._stopping
            and not self._paused
            and self.engine.state is EngineState.READY
        ):
            self._ahead = asyncio.ensure_future(self._claim())

    async def _next_jobs(self) -> list[Job]:
        """The batch claimed ahead, if any (and not empty), else a fresh claim."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            try:
                jobs = await ahead
            except Exception:
                log.exception("claim ahead failed; claiming again")
                jobs = []
            if jobs:
                return jobs
        return await self._claim()

    async def _release_ahead(self) -> None:
        """Put a batch claimed ahead back in the queue (paused, model gone, stopping)."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return
        try:
            jobs = await ahead
        except Exception:
            return
        for job in jobs:
            self._running.pop(job.id, None)
            self._held.discard(job.id)
            await safe(self.queue.release(job.id, self.worker_id))

    async def _redeliver(self) -> None:
        """Retry results whose delivery failed for a passing reason (Discord down, 5xx)."""
        busy = {job_id for job_id in self._held}
        for job in await self.queue.undelivered():
            if job.id not in busy and not self.delivery.is_delivering(job.id):
                self.post.spawn(self.post.deliver(job))

    async def _idle(self) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), self.poll_s)

    async def _keep_leases(self) -> None:
        """Extend leases of held jobs and notice cancel requests made elsewhere."""
        while True:
            await asyncio.sleep(max(0.2, min(self.lease_s / 3, 2.0)))
            for job_id in list(self._held):
                with contextlib.suppress(Exception):
                    await self.queue.extend_lease(job_id, self.worker_id)
            for job_id, running in list(self._running.items()):
                with contextlib.suppress(Exception):
                    if await self.queue.is_cancel_requested(job_id):
                        running.cancel.set()

    # --- one claim ----------------------------------------------------------------------------

    async def _process(self, claimed: list[Job]) -> None:
        """Begin, generate and hand over one batch; whatever happens, every job ends somewhere.

        A job handed to post-processing is its business from then on; any other job whose
        outcome this batch could not record loses its lease here, so the sweep requeues it.
        """
        handed: set[int] = set()
        try:
            await self._process_batch(claimed, handed)
        except Exception:
            log.exception("batch failed", extra={"job_ids": [j.id for j in claimed]})
            for job in claimed:
                if job.id not in handed:
                    await safe(self.post.fail(job, GeneratorError("Something went wrong on my side.")))
        finally:
            self.current_job_ids = []
            for job in claimed:
                self._running.pop(job.id, None)
                if job.id not in handed:
                    self._held.discard(job.id)

    async def _process_batch(self, claimed: list[Job], handed: set[int]) -> None:
        jobs = await retrying(
            lambda: self.queue.begin([j.id for j in claimed], self.worker_id), "starting a batch"
        )
        for job in jobs:
            if job.cancel_requested:  # cancelled while it waited in the claimed-ahead batch
                handed.add(job.id)
                self.post.spawn(self.post.cancelled(job))
        jobs = [job for job in jobs if not job.cancel_requested]
        if not jobs:
            return
        for job in jobs:
            run = self._running.setdefault(job.id, _Running(job))  # keeps a cancel that came early
            run.job = job
            wait_s = (job.started_at or time.time()) - job.created_at
            log_job_event(log, job.id, job.user_id, "running", wait_s=wait_s, attempt=job.attempts)
            self.post.spawn(safe(self.delivery.job_started(job)))  # a Discord edit: never awaited here
        self.current_job_ids = [j.id for j in jobs]
        try:
            results = await self._generate(jobs)
        except Cancelled:
            await self._after_cancel(jobs)
            return
        except GpuHung as exc:
            await self._hung(jobs, str(exc))
            return
        except Exception as exc:
            if not isinstance(exc, GeneratorError):  # a bug in generation fails the job, never the worker
                log.exception("generation crashed", extra={"job_ids": [j.id for j in jobs]})
                exc = GeneratorError(f"The generator failed unexpectedly ({type(exc).__name__}).")
            if len(jobs) > 1:
                await self._split(jobs, exc)
                return
            await self.post.fail(jobs[0], exc)
            return
        for job, result in zip(jobs, results, strict=True):
            handed.add(job.id)
            self.post.spawn(self.post.save_and_deliver(job, result))

    async def _split(self, jobs: list[Job], exc: GeneratorError) -> None:
        """A batch of several jobs failed: each goes back to run alone, its attempt not counted,
        so only the job at fault fails (an OOM batch is not formed again)."""
        log.warning(
            "batch of %d failed (%s); retrying its jobs one at a time",
            len(jobs),
            exc,
            extra={"job_ids": [j.id for j in jobs]},
        )
        for job in jobs:
            await retrying(
                functools.partial(self.queue.release, job.id, self.worker_id, solo=True),
                f"putting job #{job.id} back",
            )
            self._held.discard(job.id)
        await self.post.sweep_notices()  # a job whose cancel was requested ended cancelled
        self.wake()

    async def _hung(self, jobs: list[Job], reason: str) -> None:
        """The GPU thread is hung: stop taking work, put the jobs back, and ask for a restart."""
        self.engine.mark_hung(reason)
        for job in jobs:
            await safe(
                retrying(functools.partial(self.queue.release, job.id, self.worker_id), "putting back")
            )
            self._held.discard(job.id)
            self.post.spawn(self.post.report(job.id))  # "Retrying soon" (or its cancel notice)
        await safe(self._release_ahead())
        self.fatal = reason
        self._stopping = True
        self.on_fatal(reason)

    async def _generate(self, jobs: list[Job]) -> list[GenerationResult]:
        runs = [self._running[j.id] for j in jobs]
        loop = asyncio.get_running_loop()

        def progress(step: int, total: int, preview: Image.Image | None = None) -> None:
            for run in runs:
                loop.call_soon_threadsafe(self.delivery.progress, run.job, step, total, preview)
            loop.call_soon_threadsafe(self.heartbeat)
            if step >= total:  # only the decode is left: line up the next batch
                loop.call_soon_threadsafe(self._claim_ahead)

        def should_cancel() -> bool:
            return all(r.cancel.is_set() for r in runs)

        first = jobs[0]
        params = GenerationParams.from_dict(first.params)
        kwargs = {"progress": progress, "should_cancel": should_cancel}
        call: Awaitable[GenerationResult | list[GenerationResult]]
        if first.kind == JobKind.TXT2IMG and len(jobs) > 1:
            call = self.engine.call(
                "txt2img_batch", [GenerationParams.from_dict(j.params) for j in jobs], **kwargs
            )
        elif first.kind == JobKind.TXT2IMG:
            call = self._txt2img_call(first, params, want_preview=True, **kwargs)
        else:
            source = await self._source_image(first)
            if first.kind == JobKind.UPSCALE:
                call = self.engine.call("upscale", source, params, **kwargs)
            else:  # an upload's own strength (bot.discord_ui.member_images), else the configured one
                call = self.engine.call(
                    "variation", source, params, strength=first.params.get("strength"), **kwargs
                )
        result = await self._watched(runs, call)
        return result if isinstance(result, list) else [result]

    def _txt2img_call(self, job: Job, params: GenerationParams, **kwargs: Any) -> Awaitable[GenerationResult]:
        """txt2img, or the hires fix when the job asks for it (`params["hires"]`, never batched)."""
        hires = hires_of(job.params)
        if hires is None:
            return self.engine.call("txt2img", params, **kwargs)
        return self.engine.call(
            "txt2img_hires", params, scale=float(hires["scale"]), strength=hires.get("strength"), **kwargs
        )

    async def _watched(self, runs: list[_Running], call: Awaitable[T]) -> T:
        """Await a generator call under the watchdog: past `job_timeout_s` it is asked to stop
        (JobTimeout); one that ignores that for `cancel_grace_s` means a hung GPU (GpuHung)."""
        task = asyncio.ensure_future(call)
        done, _ = await asyncio.wait({task}, timeout=self.job_timeout_s)
        if not done:
            for run in runs:
                run.timed_out = True
                run.cancel.set()
            done, _ = await asyncio.wait({task}, timeout=self.cancel_grace_s)
            if not done:
                task.add_done_callback(_consume)
                raise GpuHung(
                    f"The GPU stopped responding (a generation ignored the stop request for"
                    f" {self.cancel_grace_s:g} s after the {self.job_timeout_s:g} s timeout)"
                )
            _consume(task)
            raise JobTimeout(f"The generation took longer than {self.job_timeout_s:g} s and was stopped.")
        return task.result()

    async def _source_image(self, job: Job) -> Image.Image:
        """The parent's image for upscale/variation (see `_image_of`), or the member's upload
        (`params["source"]`, screened by the image filter)."""
        if job.parent_id is None and job.params.get("source"):
            return await load_source(self.images_dir, job, self.post.screen, self._io, files=self.queue)
        parent = await self.queue.get(job.parent_id) if job.parent_id else None
        if parent is None:
            raise GeneratorError("The original image no longer exists.")
        return await self._image_of(parent, job.image_index or 0, [self._running[job.id]])

    async def _image_of(self, job: Job, index: int, runs: list[_Running]) -> Image.Image:
        """Image `index` of a finished job: read from disk, or re-created if retention deleted it.

        Re-creation repeats what made the image (txt2img from its seed; a variation or upscale of
        its own parent's image, re-created the same way), under the watchdog and the member's
        cancel, and goes through the image filter, so it is the picture the member was shown.
        """
        from PIL import Image

        if index < len(job.result_files):
            name = job.result_files[index]
            await safe(self.queue.ensure_files([name]))  # another machine's result: fetched from the queue
            path = self.images_dir / name
            if path.exists():
                return await asyncio.get_running_loop().run_in_executor(
                    self._io, lambda: Image.open(path).convert("RGB")
                )
        log.info(
            "re-creating pruned image",
            extra={"job_id": runs[0].job.id, "parent_id": job.id, "image_index": index},
        )
        params = GenerationParams.from_dict(job.params)
        kwargs = {"should_cancel": lambda: all(r.cancel.is_set() for r in runs)}
        if job.kind == JobKind.TXT2IMG:
            call = self._txt2img_call(job, params.single(index), **kwargs)
        else:
            if job.parent_id is None and job.params.get("source"):  # a member's upload
                source = await load_source(self.images_dir, job, self.post.screen, self._io, files=self.queue)
            else:
                parent = await self.queue.get(job.parent_id) if job.parent_id else None
                if parent is None:
                    raise GeneratorError("The original image no longer exists.")
                source = await self._image_of(parent, job.image_index or 0, runs)
            if job.kind == JobKind.UPSCALE:
                call = self.engine.call("upscale", source, params, **kwargs)
            else:
                strength = job.params.get("strength")
                call = self.engine.call(
                    "variation", source, params.single(index), strength=strength, **kwargs
                )
        result = await self._watched(runs, call)
        if self.post.screen is not None:
            await self.post.screen(job, result)
        return result.images[0].image

    async def _after_cancel(self, jobs: list[Job]) -> None:
        for job in jobs:
            running = self._running.get(job.id)
            if running is not None and running.timed_out:
                await self.post.fail(job, JobTimeout("The generation took too long and was stopped."))
                continue
            if not await retrying(functools.partial(self.queue.finish_cancelled, job.id), "cancelling"):
                # stopped by us (shutdown), not by the user: put it back for the next start
                await retrying(functools.partial(self.queue.release, job.id, self.worker_id), "putting back")
                self._held.discard(job.id)
                continue
            self._held.discard(job.id)
            log_job_event(log, job.id, job.user_id, "cancelled")
            self.post.spawn(self.post.report(job.id))
