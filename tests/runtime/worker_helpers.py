"""Helpers for the tests that run the real Worker on the CPU (test_batching, test_worker_overlap)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from bot.jobs.models import Job, JobStatus
from bot.jobs.queue import JobQueue
from bot.runtime.worker import Worker


async def wait_for(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """Poll the coroutine function `check` until it is true; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def wait_for_status(q: JobQueue, job_id: int, status: JobStatus, timeout: float, what: str) -> None:
    """Wait until the job has `status` in the queue."""

    async def has_status() -> bool:
        job = await q.get(job_id)
        return job is not None and job.status is status

    await wait_for(has_status, timeout, what)


async def run_until_done(worker: Worker, q: JobQueue, jobs: list[Job], timeout: float = 60) -> None:
    """Start `worker`, wait until every job is DONE, and stop it (on a timeout too)."""
    worker.start()

    async def all_done() -> bool:
        current = [await q.get(j.id) for j in jobs]
        return all(j is not None and j.status is JobStatus.DONE for j in current)

    try:
        await wait_for(all_done, timeout, "jobs done")
    finally:
        await worker.stop(grace_s=10)
