"""The job queue under real process crashes: SIGKILLed workers, racing processes, torn writes.

The worker tests run on both backends (`db` is an SQLite file or a PostgreSQL URL); the torn-write
test reads SQLite's integrity and foreign-key checks and stays SQLite-only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.jobs.contract import JobQueueContract
from bot.jobs.db import integrity_ok
from bot.jobs.models import JobKind, JobStatus, QueueLimits
from bot.jobs.pg_queue import PgJobQueue
from bot.jobs.queue import JobQueue

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="uses SIGKILL")

# The worker process. Modes:
#   hang     claim one job, print its id, then "generate" forever (until killed)
#   complete claim one job, mark it generated and done, print its id
#   drain    claim until the queue is empty, printing each id (after a start signal)
#   churn    enqueue/claim/generate/deliver forever, printing each finished id after its commit
WORKER = textwrap.dedent(
    """
    import asyncio, sys, time
    from pathlib import Path
    from bot.jobs.models import QueueLimits
    from bot.jobs.pg_queue import PgJobQueue
    from bot.jobs.queue import JobQueue

    async def main(db, mode, worker_id, max_attempts):
        limits = QueueLimits(max_attempts=max_attempts)
        if db.startswith("postgresql://"):
            q = await PgJobQueue.open(db, limits)
        else:
            q = await JobQueue.open(Path(db), limits)
        if mode == "hang":
            job = await q.claim(worker_id)
            print(job.id if job else "none", flush=True)
            while True:
                time.sleep(1)
        elif mode == "complete":
            job = await q.claim(worker_id)
            if job is None:
                print("none", flush=True)
            else:
                ok_gen = await q.mark_generated(job.id, worker_id, [f"{job.id}/a.png"], [1], 0.5)
                ok_done = await q.mark_done(job.id, 10_000 + job.id)
                print(job.id, ok_gen, ok_done, flush=True)
        elif mode == "drain":
            print("ready", flush=True)
            sys.stdin.readline()  # start together
            while (job := await q.claim(worker_id)) is not None:
                print(job.id, flush=True)
                time.sleep(0.001)  # a little work outside the transaction, as a real worker does
        elif mode == "churn":
            n = 0
            while True:
                n += 1
                job, _ = await q.enqueue(kind="txt2img", params={"prompt": "x" * 200, "n": n},
                                         channel_id=1, user_id=n % 7, guild_id=n % 3,
                                         enforce_limits=False)
                got = await q.claim(worker_id)
                await q.mark_generated(got.id, worker_id, [f"{got.id}/a.png"], [n], 0.01)
                await q.mark_done(got.id, n)
                print(got.id, flush=True)
        await q.close()

    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
    """
)


def spawn(db: str, mode: str, worker_id: str, max_attempts: int = 3) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(db), mode, worker_id, str(max_attempts)],
        cwd=REPO,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def read_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=30)
        stderr = proc.stderr.read() if proc.stderr else ""
        raise AssertionError(f"worker exited ({proc.returncode}) without output:\n{stderr}")
    return line.strip()


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:  # only the processes this test started
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def db(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """Where the queue lives: an SQLite file, or the URL of a fresh PostgreSQL database."""
    if backend == "postgres":
        return str(request.getfixturevalue("pg_url"))
    return str(tmp_path / "jobs.sqlite3")


async def open_queue(db: str, limits: QueueLimits) -> JobQueueContract:
    """The queue at `db` (see the `db` fixture)."""
    if db.startswith("postgresql://"):
        return await PgJobQueue.open(db, limits)
    return await JobQueue.open(Path(db), limits)


async def running_by_owner(q: JobQueueContract) -> dict[str, tuple[int, int]]:
    """lease owner -> (running jobs, their highest attempt count)."""
    query = (
        "SELECT lease_owner, count(*), max(attempts) FROM jobs WHERE status = 'running' GROUP BY lease_owner"
    )
    if isinstance(q, PgJobQueue):
        async with q.pool.acquire() as conn:
            rows = [tuple(r) for r in await conn.fetch(query)]
    else:
        assert isinstance(q, JobQueue)
        rows = [tuple(r) for r in await q.connection.execute_fetchall(query)]
    return {r[0]: (r[1], r[2]) for r in rows}


async def add_jobs(q: JobQueueContract, n: int) -> list[int]:
    ids = []
    for i in range(n):
        job, _ = await q.enqueue(
            kind=JobKind.TXT2IMG, params={"prompt": f"p{i}"}, channel_id=1, user_id=i % 5, guild_id=i % 2
        )
        ids.append(job.id)
    return ids


async def test_killed_worker_job_is_recovered_and_completes_once(
    db: str, procs: list[subprocess.Popen[str]]
) -> None:
    q = await open_queue(db, QueueLimits(max_attempts=3))
    try:
        [job_id] = await add_jobs(q, 1)
        hung = spawn(db, "hang", "worker-1")
        procs.append(hung)
        assert read_line(hung) == str(job_id)
        running = await q.get(job_id)
        assert running is not None and running.status is JobStatus.RUNNING
        assert running.lease_owner == "worker-1" and running.attempts == 1
        kill(hung)

        report = await q.recover("boot-2")  # the bot restarts
        assert report.requeued == [job_id] and report.dead == []

        finisher = spawn(db, "complete", "worker-2")
        procs.append(finisher)
        assert read_line(finisher) == f"{job_id} True True"
        assert finisher.wait(timeout=30) == 0

        done = await q.get(job_id)
        assert done is not None and done.status is JobStatus.DONE
        assert done.attempts == 2 and done.lease_owner == "worker-2"
        assert done.result_message_id == 10_000 + job_id and done.result_files == [f"{job_id}/a.png"]
        # the dead worker's lease is void, and the job cannot be finished a second time
        assert not await q.mark_generated(job_id, "worker-1", ["zombie.png"], [2], 1.0)
        assert not await q.mark_done(job_id, 1)
        assert await q.claim("worker-3") is None
        after = await q.get(job_id)
        assert after is not None and after.result_message_id == 10_000 + job_id
        if isinstance(q, JobQueue):
            assert await integrity_ok(q.connection)
    finally:
        await q.close()


async def test_job_killing_its_worker_every_time_ends_dead(
    db: str, procs: list[subprocess.Popen[str]]
) -> None:
    q = await open_queue(db, QueueLimits(max_attempts=3))
    try:
        [job_id] = await add_jobs(q, 1)
        for attempt in (1, 2, 3):
            worker = spawn(db, "hang", f"worker-{attempt}")
            procs.append(worker)
            assert read_line(worker) == str(job_id)
            kill(worker)
            report = await q.recover(f"boot-{attempt + 1}")
            if attempt < 3:
                assert report.requeued == [job_id]
            else:
                assert report.dead == [job_id] and report.requeued == []
        dead = await q.get(job_id)
        assert dead is not None and dead.status is JobStatus.DEAD and dead.attempts == 3
        assert dead.error == "This job crashed the generator 3 times and was dropped."
        assert await q.claim("worker-5") is None
    finally:
        await q.close()


async def test_two_processes_racing_never_claim_the_same_job(
    db: str, procs: list[subprocess.Popen[str]]
) -> None:
    q = await open_queue(db, QueueLimits(max_open_per_user=1000, max_queued=1000))
    try:
        ids = await add_jobs(q, 300)
        workers = [spawn(db, "drain", f"racer-{i}") for i in range(2)]
        procs.extend(workers)
        for worker in workers:
            assert read_line(worker) == "ready"
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write("go\n")
            worker.stdin.flush()
        claimed: list[list[int]] = []
        for worker in workers:
            out, err = worker.communicate(timeout=120)
            assert worker.returncode == 0, err
            claimed.append([int(line) for line in out.split()])
        assert all(claimed), "both processes should have claimed some jobs"
        assert not set(claimed[0]) & set(claimed[1])
        assert sorted(claimed[0] + claimed[1]) == ids
        by_owner = await running_by_owner(q)
        assert by_owner == {"racer-0": (len(claimed[0]), 1), "racer-1": (len(claimed[1]), 1)}
    finally:
        await q.close()


@pytest.mark.sqlite_only("checks SQLite's integrity_check / foreign_key_check after a kill mid-WAL-write")
async def test_kill_during_write_stream_keeps_database_intact(
    db: str, procs: list[subprocess.Popen[str]]
) -> None:
    q = await JobQueue.open(Path(db), QueueLimits())
    await q.close()
    churn = spawn(db, "churn", "churner")
    procs.append(churn)
    finished = [int(read_line(churn)) for _ in range(150)]
    kill(churn)  # lands somewhere inside the stream of transactions

    q = await JobQueue.open(Path(db), QueueLimits())
    try:
        assert await integrity_ok(q.connection)
        rows = await q.connection.execute_fetchall("PRAGMA foreign_key_check")
        assert list(rows) == []
        # everything the worker saw committed survived the kill
        for job_id in finished:
            job = await q.get(job_id)
            assert job is not None and job.status is JobStatus.DONE
        # the trigger-kept counters match the jobs table
        mismatch = await q.connection.execute_fetchall(
            "SELECT g.guild_id FROM queue_guilds g WHERE g.queued != "
            "(SELECT count(*) FROM jobs j WHERE j.guild_id = g.guild_id AND j.status = 'queued')"
        )
        assert list(mismatch) == []
        # at most the one in-flight job is left open; recovery resolves it
        await q.recover("after-crash")
        counts = await q.counts()
        assert counts["running"] == 0
        assert counts["queued"] <= 1 and counts["generated"] <= 1
        assert counts["done"] >= len(finished)
        leftovers = await q.connection.execute_fetchall(
            "SELECT count(*) FROM jobs WHERE status NOT IN ('done', 'queued', 'generated')"
        )
        assert next(iter(leftovers))[0] == 0
    finally:
        await q.close()
