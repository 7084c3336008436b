"""bot/ops/stats.py against rows written straight into the jobs table, on SQLite and PostgreSQL."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from engine_queue import insert_job, open_database
from PIL import Image

from bot.jobs.store_db import Source
from bot.ops.stats import (
    HourlySeries,
    Stats,
    compute_stats,
    format_stats,
    hourly_series,
    render_chart,
)

ROOT = Path(__file__).resolve().parents[2]
NOW = 1_750_000_000.0 + 1234.5  # not on an hour boundary
DAY = 86400.0
SAMPLERS = ["DDIM", "Euler a", "DPM++ 2M Karras", "Euler", "LMS"]


@pytest.fixture
async def db(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Source]:
    """The jobs database: an SQLite connection (as /pony-stats opens) or the PostgreSQL queue."""
    async with open_database(backend, request, tmp_path) as database:
        yield database


async def insert(conn: Source, job: dict) -> int:
    cols = {"channel_id": 10, "user_id": 20, "params": json.dumps({"prompt": "pony"}), **job}
    return await insert_job(conn, **{"updated_at": job["created_at"], **cols})


def make_jobs(rng: random.Random, n: int) -> list[dict]:
    """Random jobs over the last 9 days (and a few after NOW), in every status."""
    jobs = []
    for _ in range(n):
        created = NOW - rng.uniform(-2 * 3600, 9 * DAY)
        status = rng.choice(
            ["queued", "running", "generated", "done", "done", "done", "failed", "dead", "cancelled"]
        )
        job: dict = {"created_at": created, "status": status}
        params: dict = {"prompt": "pony", "count": rng.randint(1, 4)}
        if rng.random() < 0.9:
            params["sampler"] = rng.choice(SAMPLERS)
        job["params"] = json.dumps(params)
        if status != "queued" and not (status == "cancelled" and rng.random() < 0.5):
            job["started_at"] = created + rng.expovariate(1 / 20)
        if "started_at" in job and status in ("generated", "done", "failed"):
            if rng.random() < 0.8:
                job["generated_at"] = job["started_at"] + rng.uniform(2, 30)
            job["gen_seconds"] = rng.uniform(2, 30)
        if status in ("done", "failed", "dead", "cancelled"):
            job["finished_at"] = (
                max(created, job.get("generated_at") or job.get("started_at") or created) + 1.5
            )
        if status in ("generated", "done"):
            count = params["count"]
            if rng.random() < 0.85:
                job["result_files"] = json.dumps([f"x/ponybot-x-{i}.png" for i in range(count)])
            job["seeds"] = json.dumps([rng.randint(0, 2**32 - 1) for _ in range(count)])
        jobs.append(job)
    return jobs


def expected_stats(jobs: list[dict]) -> dict:
    """The definitions of bot/ops/stats.py, computed independently from the inserted rows."""
    week = [j for j in jobs if NOW - 7 * DAY <= j["created_at"] <= NOW]
    day = [j for j in week if j["created_at"] >= NOW - DAY]
    waits = [j["started_at"] - j["created_at"] for j in week if "started_at" in j]
    runs = []
    for j in week:
        if "started_at" in j and "generated_at" in j:
            runs.append(j["generated_at"] - j["started_at"])
        elif "gen_seconds" in j:
            runs.append(j["gen_seconds"])

    def images(window: float) -> int:
        total = 0
        for j in jobs:
            if j["status"] == "done" and NOW - window <= j["finished_at"] <= NOW:
                total += len(json.loads(j.get("result_files") or j["seeds"]))
        return total

    samplers = Counter(json.loads(j["params"]).get("sampler") for j in week)
    samplers.pop(None, None)
    top = sorted(samplers.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    return {
        "jobs_24h": len(day),
        "jobs_7d": len(week),
        "images_24h": images(DAY),
        "images_7d": images(7 * DAY),
        "wait_median_s": float(np.percentile(waits, 50)),
        "wait_p95_s": float(np.percentile(waits, 95)),
        "run_median_s": float(np.percentile(runs, 50)),
        "run_p95_s": float(np.percentile(runs, 95)),
        "top_samplers": top,
        "outcomes": {s: sum(j["status"] == s for j in week) for s in ("done", "failed", "dead", "cancelled")},
    }


async def test_compute_stats_matches_table(db: Source) -> None:
    jobs = make_jobs(random.Random(7), 400)
    for job in jobs:
        await insert(db, job)
    stats = await compute_stats(db, now=NOW)
    want = expected_stats(jobs)
    assert stats.jobs_24h == want["jobs_24h"] > 0
    assert stats.jobs_7d == want["jobs_7d"] > stats.jobs_24h
    assert stats.images_24h == want["images_24h"] > 0
    assert stats.images_7d == want["images_7d"]
    for key in ("wait_median_s", "wait_p95_s", "run_median_s", "run_p95_s"):
        assert getattr(stats, key) == pytest.approx(want[key]), key
    assert stats.top_samplers == want["top_samplers"]
    assert stats.outcomes == want["outcomes"]


async def test_compute_stats_small_exact(db: Source) -> None:
    # waits 10, 20, 30, 40 s; runs 5 (generated-started), 7 (gen_seconds only); 2 + 3 images
    base = NOW - 3600
    await insert(
        db,
        {
            "status": "done",
            "created_at": base,
            "started_at": base + 10,
            "generated_at": base + 15,
            "finished_at": base + 16,
            "result_files": '["1/a.png", "1/b.png"]',
            "params": '{"sampler": "DDIM"}',
        },
    )
    await insert(
        db,
        {
            "status": "done",
            "created_at": base,
            "started_at": base + 20,
            "gen_seconds": 7.0,
            "finished_at": base + 30,
            "seeds": "[1, 2, 3]",
            "params": '{"sampler": "Euler a"}',
        },
    )
    await insert(
        db,
        {
            "status": "failed",
            "created_at": base,
            "started_at": base + 30,
            "finished_at": base + 31,
            "params": '{"sampler": "DDIM"}',
        },
    )
    await insert(
        db,
        {
            "status": "cancelled",
            "created_at": base - 3 * DAY,
            "started_at": base - 3 * DAY + 40,
            "finished_at": base - 3 * DAY + 41,
            "params": "not json",
        },
    )
    await insert(
        db,
        {
            "status": "done",
            "created_at": NOW - 8 * DAY,
            "started_at": NOW - 8 * DAY + 1000,
            "finished_at": NOW - 8 * DAY + 1001,
            "result_files": '["old.png"]',
        },
    )
    stats = await compute_stats(db, now=NOW)
    assert (stats.jobs_24h, stats.jobs_7d, stats.images_24h, stats.images_7d) == (3, 4, 5, 5)
    assert stats.wait_median_s == pytest.approx(25.0)
    assert stats.wait_p95_s == pytest.approx(38.5)  # 30 + 0.85 * 10
    assert stats.run_median_s == pytest.approx(6.0)
    assert stats.top_samplers == [("DDIM", 2), ("Euler a", 1)]
    assert stats.outcomes == {"done": 2, "failed": 1, "dead": 0, "cancelled": 1}


async def test_compute_stats_tolerates_odd_json(db: Source) -> None:
    """Malformed or unexpected JSON is skipped, not fatal; seeds stand in for bad result_files."""
    base = NOW - 60
    odd = [
        ("done", "garbage", "[1]", '{"sampler": 5}'),  # 1 image from seeds; numeric sampler ignored
        ("done", '{"a": 1}', "[1, 2]", "[1, 2]"),  # result_files not a list -> seeds: 2
        ("done", "[]", "[1, 2, 3]", '{"sampler": ""}'),  # an empty list counts as 0 images
        ("done", None, None, '{"sampler": "Euler"}'),  # nothing to count
        ("done", '["a.png"]', "not json", "{broken"),  # 1 image
    ]
    for status, files, seeds, params in odd:
        await insert(
            db,
            {
                "status": status,
                "created_at": base,
                "finished_at": base + 1,
                "result_files": files,
                "seeds": seeds,
                "params": params,
            },
        )
    stats = await compute_stats(db, now=NOW)
    assert stats.images_24h == stats.images_7d == 4
    assert stats.top_samplers == [("Euler", 1)]
    assert stats.jobs_24h == 5 and stats.outcomes["done"] == 5
    assert stats.wait_median_s is None and stats.run_median_s is None


async def test_compute_stats_empty(db: Source) -> None:
    stats = await compute_stats(db, now=NOW)
    assert stats.jobs_7d == stats.images_7d == 0
    assert stats.wait_median_s is None and stats.run_p95_s is None
    assert stats.top_samplers == []
    text = format_stats(stats)
    assert "n/a" in text and "none yet" in text


async def test_hourly_series_buckets(db: Source) -> None:
    jobs = make_jobs(random.Random(11), 300)
    for job in jobs:
        await insert(db, job)
    series = await hourly_series(db, now=NOW)
    assert len(series.hour_starts) == len(series.jobs) == len(series.median_wait_s) == 24
    assert series.hour_starts[-1] <= NOW < series.hour_starts[-1] + 3600
    assert all(b - a == 3600 for a, b in zip(series.hour_starts, series.hour_starts[1:], strict=False))
    assert series.hour_starts[0] % 3600 == 0
    for i, start in enumerate(series.hour_starts):
        in_bucket = [j for j in jobs if start <= j["created_at"] < start + 3600 and j["created_at"] <= NOW]
        assert series.jobs[i] == len(in_bucket)
        waits = [j["started_at"] - j["created_at"] for j in in_bucket if "started_at" in j]
        if waits:
            assert series.median_wait_s[i] == pytest.approx(float(np.median(waits)))
        else:
            assert series.median_wait_s[i] is None
    assert sum(series.jobs) > 0


@pytest.mark.parametrize(("width", "height"), [(800, 400), (640, 360), (1001, 333)])
def test_render_chart_png_size(width: int, height: int) -> None:
    rng = random.Random(3)
    series = HourlySeries(
        hour_starts=[NOW - NOW % 3600 - (23 - i) * 3600 for i in range(24)],
        jobs=[rng.randint(0, 12) for _ in range(24)],
        median_wait_s=[None if rng.random() < 0.3 else rng.uniform(0, 90) for _ in range(24)],
    )
    png = render_chart(series, width_px=width, height_px=height)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG"
        assert image.size == (width, height)
        image.verify()


async def test_render_chart_from_empty_db(db: Source) -> None:
    png = render_chart(await hourly_series(db, now=NOW))
    with Image.open(io.BytesIO(png)) as image:
        assert image.size == (800, 400)


def test_render_chart_rejects_tiny() -> None:
    with pytest.raises(ValueError):
        render_chart(HourlySeries([0.0], [0], [None]), width_px=50, height_px=50)


def test_no_pyplot_state() -> None:
    code = (
        "import sys, matplotlib; import bot.ops.stats as s;"
        "s.render_chart(s.HourlySeries([0.0, 3600.0], [1, 2], [None, 3.0]));"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported';"
        "assert matplotlib.get_backend().lower() == 'agg'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_format_stats_text() -> None:
    stats = Stats(
        now=NOW,
        jobs_24h=12,
        jobs_7d=80,
        images_24h=40,
        images_7d=250,
        wait_median_s=3.24,
        wait_p95_s=125.0,
        run_median_s=8.0,
        run_p95_s=4000.0,
        top_samplers=[("DPM++ 2M Karras", 40), ("Euler_a*", 20)],
        outcomes={"done": 70, "failed": 3, "dead": 1, "cancelled": 6},
    )
    text = format_stats(stats)
    lines = text.splitlines()
    assert lines[0] == "**Last 24 h:** 12 jobs, 40 images"
    assert lines[1] == "**Last 7 days:** 80 jobs, 250 images"
    assert "median 3.2 s · p95 2 m 05 s" in text
    assert "p95 1 h 06 m" in text
    assert "DPM++ 2M Karras (40), Euler\\_a\\* (20)" in text
    assert "done 70 · failed 3 · dead 1 · cancelled 6" in text
    assert len(text) < 2000


def test_format_stats_escapes_sampler_names_from_the_db() -> None:
    stats = Stats(
        now=NOW,
        jobs_24h=1,
        jobs_7d=1,
        images_24h=1,
        images_7d=1,
        wait_median_s=None,
        wait_p95_s=None,
        run_median_s=None,
        run_p95_s=None,
        top_samplers=[("@everyone `x`|" + "y" * 60, 1)],
    )
    line = format_stats(stats).splitlines()[4]
    assert "@everyone" not in line and "\\`x\\`\\|" in line
    name = line.removeprefix("**Top samplers (7 d):** ").removesuffix(" (1)")
    assert len(name) == 40 and name.endswith("…")
