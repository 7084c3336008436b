"""A worker task that dies by a bug stops the worker for a restart instead of leaving jobs unrun."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from worker_helpers import wait_for

from bot.jobs.models import Job, QueueLimits
from bot.jobs.queue import JobQueue
from bot.runtime.engine import Engine
from bot.runtime.worker import Worker
from generator.config import GeneratorConfig


class NoDiscord:
    """A Deliverer that shows nothing (no job reaches it in these tests)."""

    async def job_started(self, job: Job) -> None: ...
    async def job_requeued(self, job: Job) -> None: ...
    def progress(self, job: Job, step: int, total: int, preview: Any) -> None: ...
    async def deliver(self, job: Job) -> None: ...
    def is_delivering(self, job_id: int) -> bool:
        return False

    async def notify(self, job: Job) -> bool:
        return True


async def test_a_crashed_worker_task_asks_for_a_restart(tmp_path: Path) -> None:
    queue = await JobQueue.open(tmp_path / "jobs.sqlite3", QueueLimits())
    engine = Engine(GeneratorConfig(model="unused"), loader=lambda config: object())
    reasons: list[str] = []
    worker = Worker(
        queue, engine, NoDiscord(), images_dir=tmp_path / "images", poll_s=0.05, on_fatal=reasons.append
    )

    async def broken() -> None:
        raise KeyError("lease bookkeeping")

    worker._keep_leases = broken  # type: ignore[method-assign]
    try:
        worker.start()

        async def told() -> bool:
            return bool(reasons)

        await wait_for(told, 10, "on_fatal called")
        assert reasons == ["The worker crashed (KeyError: 'lease bookkeeping')"]
        assert worker.fatal == reasons[0]
    finally:
        await worker.stop(grace_s=5)
        await queue.close()
    assert worker.state == "stopped"
