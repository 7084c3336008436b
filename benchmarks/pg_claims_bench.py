"""Claims per second on the PostgreSQL queue: one claimer against several, on the same backlog.

Starts a throwaway PostgreSQL server (tests/pg_server.py: initdb + pg_ctl in a temp dir, removed at
the end), fills a database with jobs of 6 users, then drains it with one claimer and, on a copy,
with N claimers (each its own pool, `asyncio.gather` per round). Prints claims/s for both and the
ratio; also checks that the N claimers handed the jobs out in the single claimer's order.
A throughput figure, not a pass/fail timing.

    .venv/bin/python benchmarks/pg_claims_bench.py                 # 600 jobs, 3 claimers
    .venv/bin/python benchmarks/pg_claims_bench.py --jobs 2000 --claimers 4
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import asyncpg  # noqa: E402
import pg_server  # noqa: E402

from bot.jobs.models import JobKind, QueueLimits  # noqa: E402
from bot.jobs.pg_db import migrate_url  # noqa: E402
from bot.jobs.pg_queue import PgJobQueue  # noqa: E402

LIMITS = QueueLimits(max_open_per_user=1_000_000, max_queued=1_000_000)
USERS = 6


class TickingClock:
    """Moves 1 ms per reading: `started_at` records the order the claims committed in."""

    def __init__(self) -> None:
        self._ticks = itertools.count()

    def __call__(self) -> float:
        return 1_000_000.0 + next(self._ticks) / 1000


async def fill(url: str, jobs: int) -> None:
    q = await PgJobQueue.open(url, LIMITS)
    try:
        for n in range(jobs):
            await q.enqueue(
                kind=JobKind.TXT2IMG, params={"prompt": f"p{n}"}, channel_id=1, user_id=n % USERS, guild_id=0
            )
    finally:
        await q.close()


async def drain(url: str, claimers: int) -> tuple[float, list[int]]:
    clock = TickingClock()
    queues = [await PgJobQueue.open(url, LIMITS, clock=clock) for _ in range(claimers)]
    try:
        claimed = 0
        start = time.perf_counter()
        while True:
            got = await asyncio.gather(*(q.claim(f"c{i}") for i, q in enumerate(queues)))
            claimed += sum(job is not None for job in got)
            if all(job is None for job in got):
                break
        seconds = time.perf_counter() - start
        async with queues[0].pool.acquire() as conn:
            order = [r["id"] for r in await conn.fetch("SELECT id FROM jobs ORDER BY started_at, id")]
    finally:
        for q in queues:
            await q.close()
    return claimed / seconds, order


async def main(jobs: int, claimers: int) -> None:
    bindir = pg_server.find_bindir()
    if bindir is None:
        raise SystemExit("PostgreSQL server binaries not found (apt-get install postgresql)")
    server = pg_server.PgServer(bindir)
    try:
        server.start()
        admin = await asyncpg.connect(server.url())
        try:
            for name in ("one", "many"):
                await admin.execute(f"CREATE DATABASE {name}")
        finally:
            await admin.close()
        for name in ("one", "many"):
            await migrate_url(server.url(name))
            await fill(server.url(name), jobs)
        single_rate, single_order = await drain(server.url("one"), 1)
        many_rate, many_order = await drain(server.url("many"), claimers)
    finally:
        server.stop()
    print(f"{jobs} jobs of {USERS} users")
    print(f"1 claimer:  {single_rate:8.0f} claims/s")
    print(f"{claimers} claimers: {many_rate:8.0f} claims/s  ({many_rate / single_rate:.2f}x)")
    print(f"same order as one claimer: {many_order == single_order}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=600)
    parser.add_argument("--claimers", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.jobs, args.claimers))
