"""Jobs per second of 1 worker and of 3 workers draining one PostgreSQL queue.

Starts a throwaway PostgreSQL server (tests/pg_server.py: initdb + pg_ctl in a temp dir, removed at
the end) unless `--url` names a server, and makes a fresh database for each row. Each row fills its
database with `--jobs` one-image txt2img jobs of 6 users, then drains it with the real `Worker`s,
each with its own `PgJobQueue` pool, `Engine` (GPU thread) and images folder, as separate machines
would have. The generator is a stand-in that takes a fixed time per generation (`--gen-s`, slept in
the engine's thread, in 4 steps that report progress) and returns a tiny real image, so the rest of
the worker's path runs for real: claim, begin, PNG save, `mark_generated` (which copies the PNG into
`job_files`), `claim_delivery`, `ensure_files`, `mark_done`. The delivery stand-in takes
`--upload-s` per job (an upload to Discord) and records every delivery; the run fails if a job was
delivered other than exactly once or did not end done.

jobs/s = jobs / seconds from starting the workers until the last job is done. Target: 3 workers
drain at >= 2.5x the jobs/s of 1 (with `--workers N`: N x 5/6); exit status 1 when missed.

    .venv/bin/python benchmarks/multi_worker_bench.py                    # 60 jobs, 0.2 s each, 1 vs 3
    .venv/bin/python benchmarks/multi_worker_bench.py --jobs 90 --workers 4 --gen-s 0.1
    .venv/bin/python benchmarks/multi_worker_bench.py --url postgresql://user@host/postgres
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import asyncpg  # type: ignore[import-untyped]  # noqa: E402
import pg_server  # type: ignore[import-not-found]  # noqa: E402
from PIL import Image  # noqa: E402

from bot.jobs.models import Job, JobKind, JobStatus, QueueLimits  # noqa: E402
from bot.jobs.pg_db import migrate_url  # noqa: E402
from bot.jobs.pg_queue import PgJobQueue  # noqa: E402
from bot.runtime.engine import Engine  # noqa: E402
from bot.runtime.worker import Worker  # noqa: E402
from generator.config import GeneratorConfig  # noqa: E402
from generator.params import GenerationParams  # noqa: E402

LIMITS = QueueLimits(max_open_per_user=1_000_000, max_queued=1_000_000, cooldown_s=0.0)
USERS = 6
STEPS = 4
#: the target: 3 workers drain at >= 2.5x one worker's jobs/s (other counts: the same 5/6 of ideal)
TARGET_PER_WORKER = 2.5 / 3

if TYPE_CHECKING:
    from generator.pipeline import Generator


@dataclass
class StandInImage:
    """Shaped like generator.pipeline.ImageResult (what bot.runtime.images.save_results reads)."""

    image: Image.Image
    seed: int
    parameters: str


@dataclass
class StandInResult:
    """Shaped like generator.pipeline.GenerationResult."""

    images: list[StandInImage]
    seconds: float
    width: int
    height: int


class FixedTimeGenerator:
    """A Generator stand-in for `Engine(loader=...)`: each call sleeps `gen_s` in the engine's
    thread (in STEPS steps that report progress and honour cancel) and returns 8x8 images."""

    model_name = "fixed-time stand-in"
    model_hash = "0000000000"
    device = "cpu"
    dtype_name = "float32"

    def __init__(self, gen_s: float) -> None:
        self.gen_s = gen_s

    def txt2img(
        self,
        params: GenerationParams,
        *,
        progress: Any = None,
        want_preview: bool = False,
        should_cancel: Any = None,
    ) -> StandInResult:
        """One request: `gen_s` of sleep, then its images."""
        return self.txt2img_batch([params], progress=progress, should_cancel=should_cancel)[0]

    def txt2img_batch(
        self, requests: list[GenerationParams], *, progress: Any = None, should_cancel: Any = None
    ) -> list[StandInResult]:
        """Several requests in one call (the worker batches only with PONY_BATCH_SIZE > 1)."""
        from generator.errors import Cancelled

        started = time.perf_counter()
        for step in range(1, STEPS + 1):
            time.sleep(self.gen_s / STEPS)
            if should_cancel is not None and should_cancel():
                raise Cancelled("Cancelled.")
            if progress is not None:
                progress(step, STEPS, None)
        seconds = time.perf_counter() - started
        return [
            StandInResult(
                images=[
                    StandInImage(
                        Image.new("RGB", (8, 8), (r.seed % 256, 90, 160)),
                        r.seed + i,
                        f"{r.prompt}\nSeed: {r.seed}",
                    )
                    for i in range(r.count)
                ],
                seconds=seconds,
                width=r.width,
                height=r.height,
            )
            for r in requests
        ]


class Deliveries:
    """Every delivery any worker made (job id -> how many times), and when the last job got done."""

    def __init__(self, jobs: int) -> None:
        self.counts: collections.Counter[int] = collections.Counter()
        self.jobs = jobs
        self.all_done = asyncio.Event()


class RecordingDelivery:
    """Delivery stand-in of one worker: takes `upload_s` per job (not CPU) and records it, going
    through the multi-machine steps of the real delivery (`claim_delivery`, `ensure_files`)."""

    def __init__(self, queue: PgJobQueue, record: Deliveries, upload_s: float) -> None:
        self.queue = queue
        self.record = record
        self.upload_s = upload_s
        self.owner = f"bench-delivery:{uuid.uuid4().hex[:8]}"
        self._delivering: set[int] = set()

    async def job_started(self, job: Job) -> None:
        """The "generating" status edit: nothing to show here."""

    async def job_requeued(self, job: Job) -> None:
        """The "will retry" notice: nothing to show here."""

    def progress(self, job: Job, step: int, total: int, preview: Any = None) -> None:
        """Progress edits are not part of this measurement."""

    def is_delivering(self, job_id: int) -> bool:
        """True while this stand-in is delivering the job."""
        return job_id in self._delivering

    async def notify(self, job: Job) -> bool:
        """A failure notice: marks it shown."""
        return await self.queue.mark_notified(job.id)

    async def deliver(self, job: Job) -> None:
        """Claim the delivery, make sure the images are here, "upload", record, mark done."""
        if job.id in self._delivering or not await self.queue.claim_delivery(job.id, self.owner):
            return
        self._delivering.add(job.id)
        try:
            missing = await self.queue.ensure_files(job.result_files)
            if missing:
                raise RuntimeError(f"job #{job.id}: result files not found: {missing}")
            await asyncio.sleep(self.upload_s)
            if await self.queue.mark_done(job.id, job.id):
                self.record.counts[job.id] += 1
                if len(self.record.counts) >= self.record.jobs:
                    self.record.all_done.set()
        finally:
            self._delivering.discard(job.id)


async def fill(url: str, jobs: int) -> list[int]:
    """Queue `jobs` one-image 64x64 jobs, users taking turns; returns their ids."""
    ids = []
    async with await PgJobQueue.open(url, LIMITS) as q:
        for n in range(jobs):
            params = GenerationParams(
                prompt=f"pony {n}", seed=1000 + n, steps=STEPS, width=64, height=64, count=1
            )
            job, _ = await q.enqueue(
                kind=JobKind.TXT2IMG, params=params.to_dict(), channel_id=1, user_id=1 + n % USERS, guild_id=0
            )
            ids.append(job.id)
    return ids


async def drain(url: str, workers: int, ids: list[int], gen_s: float, upload_s: float, tmp: Path) -> float:
    """Start `workers` workers (each its own pool, engine and images folder), wait until every job
    is done, check each was delivered exactly once; returns jobs/s."""
    record = Deliveries(len(ids))
    queues: list[PgJobQueue] = []
    running: list[Worker] = []
    engines: list[Engine] = []
    try:
        for n in range(workers):
            images = tmp / f"machine-{workers}-{n}"
            q = await PgJobQueue.open(url, LIMITS, images_dir=images, application_name=f"bench-{n}")
            queues.append(q)
            engine = Engine(
                GeneratorConfig(model="stand-in", device="cpu"),
                loader=lambda _c: cast("Generator", FixedTimeGenerator(gen_s)),
            )
            engines.append(engine)
            await engine.start_loading()
            running.append(Worker(q, engine, RecordingDelivery(q, record, upload_s), images_dir=images))
        start = time.perf_counter()
        for worker in running:
            worker.start()
        await asyncio.wait_for(record.all_done.wait(), timeout=30 + 3 * len(ids) * (gen_s + upload_s))
        seconds = time.perf_counter() - start
        jobs = await queues[0].get_many(ids)
        not_done = [job.id for job in jobs if job.status is not JobStatus.DONE]
        twice = sorted(job_id for job_id, count in record.counts.items() if count != 1)
        if not_done or twice or len(jobs) != len(ids):
            raise SystemExit(f"{workers} workers: jobs not done {not_done}, delivered more than once {twice}")
    finally:
        for worker in running:
            await worker.stop(grace_s=10)
        for engine in engines:
            engine.shutdown()
        for q in queues:
            await q.close()
    return len(ids) / seconds


@contextmanager
def server_url(url: str | None) -> Iterator[str]:
    """The admin URL of `url`'s server, else of a throwaway server started (and removed) here."""
    if url is not None:
        yield url
        return
    bindir = pg_server.find_bindir()
    if bindir is None:
        raise SystemExit("PostgreSQL server binaries not found (apt-get install postgresql), or pass --url")
    server = pg_server.PgServer(bindir)
    try:
        server.start()
        yield server.url()
    finally:
        server.stop()


def database_url(admin_url: str, name: str) -> str:
    """`admin_url` with its database replaced by `name`."""
    base, _, _ = admin_url.rpartition("/")
    return f"{base}/{name}"


async def row(admin_url: str, workers: int, args: argparse.Namespace, tmp: Path) -> float:
    """One row on a fresh database (dropped afterwards): fill, drain, jobs/s."""
    name = pg_server.unique_database_name("bench")
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    try:
        url = database_url(admin_url, name)
        await migrate_url(url)
        ids = await fill(url, args.jobs)
        return await drain(url, workers, ids, args.gen_s, args.upload_s, tmp)
    finally:
        admin = await asyncpg.connect(admin_url)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await admin.close()


async def main(args: argparse.Namespace) -> int:
    """Both rows, the table and the verdict."""
    with server_url(args.url) as admin_url, tempfile.TemporaryDirectory(prefix="ponybot-bench-") as tmp_name:
        one = await row(admin_url, 1, args, Path(tmp_name))
        many = await row(admin_url, args.workers, args, Path(tmp_name))
    ratio = many / one
    target = args.workers * TARGET_PER_WORKER
    print(
        f"{args.jobs} jobs of {USERS} users, {args.gen_s:g} s per generation, {args.upload_s:g} s per upload"
    )
    print(f"1 worker:  {one:7.2f} jobs/s")
    print(f"{args.workers} workers: {many:7.2f} jobs/s  ({ratio:.2f}x; {args.workers}x would be perfect)")
    print("every job done and delivered exactly once: True")
    met = ratio >= target
    print(f"target {args.workers} workers >= {target:.2f}x one worker: {'met' if met else 'MISSED'}")
    return 0 if met else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=60)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--gen-s", type=float, default=0.2, help="seconds per generation (the stand-in)")
    parser.add_argument("--upload-s", type=float, default=0.05, help="seconds per delivery (the stand-in)")
    parser.add_argument(
        "--url", help="a PostgreSQL server to use (any database on it; one is created per row)"
    )
    sys.exit(asyncio.run(main(parser.parse_args())))
