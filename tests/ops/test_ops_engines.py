"""`Ops` on both engines: the queue gauge and retention read the queue's database (SQLite: a
connection of its own to PONY_DB; PostgreSQL: the PgJobQueue's pool, no SQLite file at all)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from engine_queue import insert_job, open_queue, rows
from PIL import Image

from bot.config import load_settings
from bot.jobs.models import Job
from bot.jobs.pg_queue import PgJobQueue
from bot.ops.ops import Ops
from bot.runtime.engine import Engine
from bot.runtime.worker import Worker

DAY = 86400.0


class Undelivered:
    """A Deliverer for a worker that is never started (Ops only reads its hooks)."""

    async def job_started(self, job: Job) -> None:
        raise AssertionError("the worker is not started in these tests")

    async def job_requeued(self, job: Job) -> None:
        raise AssertionError("the worker is not started in these tests")

    def progress(self, job: Job, step: int, total: int, preview: Image.Image | None) -> None:
        raise AssertionError("the worker is not started in these tests")

    async def deliver(self, job: Job) -> None:
        raise AssertionError("the worker is not started in these tests")

    def is_delivering(self, job_id: int) -> bool:
        return False

    async def notify(self, job: Job) -> bool:
        raise AssertionError("the worker is not started in these tests")


async def test_ops_refresh_and_retention_use_the_queues_database(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    settings = load_settings(data_dir=tmp_path / "data", retention_days=30)
    async with open_queue(backend, request, settings.data_dir) as queue:
        images = settings.images_dir
        old_rel = "1/ponybot-1-0.png"
        now = time.time()
        old = await insert_job(
            queue,
            status="done",
            created_at=now - 41 * DAY,
            finished_at=now - 40 * DAY,
            updated_at=now - 40 * DAY,
            result_files=json.dumps([old_rel]),
        )
        (images / old_rel).parent.mkdir(parents=True)
        (images / old_rel).write_bytes(b"old png")
        if isinstance(queue, PgJobQueue):
            await queue.share_files([old_rel], job_id=old)
        for _ in range(2):
            await queue.enqueue(kind="txt2img", params={"prompt": "p"}, channel_id=1, user_id=3)

        engine = Engine(settings.generator_config())  # never started: no model is loaded
        worker = Worker(queue, engine, Undelivered(), images_dir=images)
        ops = Ops(settings, engine, worker, queue=queue)
        await ops.start()
        try:
            await ops.refresh()
            assert ops.metrics.registry.get_sample_value("ponybot_queue_jobs", {"status": "queued"}) == 2
            assert ops.health.check()[1]["queue"]["queued"] == 2
            await ops.prune()
        finally:
            await ops.stop()
            engine.shutdown()
        assert not (images / old_rel).exists()
        (row,) = await rows(queue, "SELECT pruned_at FROM jobs WHERE id = :id", {"id": old})
        assert row["pruned_at"] is not None
        if isinstance(queue, PgJobQueue):
            assert await rows(queue, "SELECT name FROM job_files") == []
            assert not settings.db_path.exists(), "on PostgreSQL Ops opens no SQLite file"
