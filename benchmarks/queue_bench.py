"""Job queue throughput and claim latency at a small and a large backlog.

A full cycle is what every job costs the database: enqueue (limits checked), claim,
mark_generated, mark_done. The run measures cycles per second and the latency of each claim with a
standing backlog of queued jobs spread over many users and a few guilds; the smallest backlog is
the baseline the larger ones are compared against (claim cost should not grow with the backlog).

    python benchmarks/queue_bench.py                       # backlogs 100 and 10,000
    python benchmarks/queue_bench.py --rounds 5 --json out.json
    python benchmarks/queue_bench.py --users 2 --guilds 1 --original-pick-index   # old index
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bot.jobs.models import JobKind, QueueLimits
from bot.jobs.queue import JobQueue

PARAMS = {
    "prompt": "a cute pony in a meadow, highly detailed, soft lighting, masterpiece",
    "negative": "lowres, bad anatomy, worst quality, low quality",
    "seed": 123456789,
    "steps": 25,
    "guidance": 7.0,
    "width": 512,
    "height": 512,
    "count": 4,
    "sampler": "DDIM",
}
LIFTED = QueueLimits(max_open_per_user=10**9, max_queued=10**9, cooldown_s=0.0)
ORIGINAL_PICK_INDEX = "CREATE INDEX jobs_pick ON jobs(guild_id, user_id, status, not_before, id)"


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))
    return ordered[index]


async def prefill(q: JobQueue, backlog: int, users: int, guilds: int) -> None:
    """Insert `backlog` queued jobs directly (the triggers keep the fairness tables)."""
    now = time.time()
    params = json.dumps(PARAMS)
    rows = [
        (i % guilds, 1, i % users, params, 100, now, now)
        for i in range(backlog)  # user u always lives in guild u % guilds
    ]
    conn = q.connection
    await conn.execute("BEGIN IMMEDIATE")
    await conn.executemany(
        "INSERT INTO jobs (guild_id, channel_id, user_id, kind, params, cost, created_at, updated_at)"
        " VALUES (?, ?, ?, 'txt2img', ?, ?, ?, ?)",
        rows,
    )
    await conn.execute("COMMIT")


async def run_backlog(
    backlog: int, cycles: int, warmup: int, users: int, guilds: int, original_index: bool
) -> dict[str, Any]:
    """Measure `cycles` full cycles with `backlog` jobs standing in the queue."""
    with tempfile.TemporaryDirectory(prefix="queue-bench-") as tmp:
        q = await JobQueue.open(Path(tmp) / "jobs.sqlite3", LIFTED)
        try:
            if original_index:
                await q.connection.execute("DROP INDEX jobs_pick")
                await q.connection.execute(ORIGINAL_PICK_INDEX)
            await prefill(q, backlog, users, guilds)
            claim_s: list[float] = []
            interaction = 10**12
            started = 0.0
            for i in range(warmup + cycles):
                if i == warmup:
                    claim_s.clear()
                    started = time.perf_counter()
                user = i % users
                interaction += 1
                await q.enqueue(
                    kind=JobKind.TXT2IMG,
                    params=PARAMS,
                    channel_id=1,
                    user_id=user,
                    guild_id=user % guilds,
                    interaction_id=interaction,
                    cost=100,
                )
                t0 = time.perf_counter()
                job = await q.claim("bench")
                claim_s.append(time.perf_counter() - t0)
                assert job is not None
                await q.mark_generated(job.id, "bench", [f"{job.id}/a.png"], [1, 2, 3, 4], 0.01)
                await q.mark_done(job.id, job.id)
            elapsed = time.perf_counter() - started
            queued = (await q.counts())["queued"]
            assert queued == backlog, (queued, backlog)
        finally:
            await q.close()
    return {
        "backlog": backlog,
        "cycles": cycles,
        "cycles_per_s": cycles / elapsed,
        "claim_p50_ms": statistics.median(claim_s) * 1000,
        "claim_p99_ms": percentile(claim_s, 0.99) * 1000,
        "claim_mean_ms": statistics.fmean(claim_s) * 1000,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlogs", type=int, nargs="+", default=[100, 10_000], help="queued jobs standing")
    parser.add_argument("--cycles", type=int, default=2000, help="measured cycles per backlog and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are reported")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured cycles first")
    parser.add_argument("--users", type=int, default=50, help="users the backlog is spread over")
    parser.add_argument("--guilds", type=int, default=5, help="guilds the users are spread over")
    parser.add_argument(
        "--original-pick-index",
        action="store_true",
        help="use the pre-change jobs_pick index (guild_id, user_id, status, not_before, id) for comparison",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    # Rounds alternate between the backlogs so drift in machine load hits each one alike; each
    # figure is the median over the rounds.
    runs: dict[int, list[dict[str, Any]]] = {backlog: [] for backlog in args.backlogs}
    for _ in range(args.rounds):
        for backlog in args.backlogs:
            runs[backlog].append(
                asyncio.run(
                    run_backlog(
                        backlog, args.cycles, args.warmup, args.users, args.guilds, args.original_pick_index
                    )
                )
            )
    results = [
        {
            "backlog": backlog,
            "cycles": args.cycles,
            "rounds": args.rounds,
            **{
                key: statistics.median(run[key] for run in rounds)
                for key in ("cycles_per_s", "claim_p50_ms", "claim_p99_ms", "claim_mean_ms")
            },
        }
        for backlog, rounds in runs.items()
    ]
    base = results[0]
    for result in results:
        result["claim_p50_vs_baseline"] = result["claim_p50_ms"] / base["claim_p50_ms"]

    print(f"{'backlog':>8} {'cycles/s':>9} {'claim p50 ms':>13} {'claim p99 ms':>13} {'p50 vs base':>12}")
    for r in results:
        print(
            f"{r['backlog']:>8} {r['cycles_per_s']:>9.0f} {r['claim_p50_ms']:>13.3f} "
            f"{r['claim_p99_ms']:>13.3f} {r['claim_p50_vs_baseline']:>11.2f}x"
        )
    report = {
        "benchmark": "queue",
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "users": args.users,
        "guilds": args.guilds,
        "original_pick_index": args.original_pick_index,
        "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
