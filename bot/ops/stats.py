"""Usage statistics read straight from the jobs table, a 24-hour chart, and Discord-ready text.

Discord-free: every function takes the database (an SQLite connection, or a queue on either
engine: `bot.jobs.store_db`; the SQL is the same on both) or plain data, and the current time, so
tests pin `now`. Definitions (all windows are `[now - window, now]`):

* jobs in a window: rows whose `created_at` falls in it, whatever their status;
* images in a window: result files of `done` jobs whose `finished_at` falls in it (the length of
  `result_files`, or of `seeds` where `result_files` is missing);
* wait = `started_at - created_at`; run = `generated_at - started_at`, or `gen_seconds` where
  either end is missing; both over jobs created in the last 7 days, negative values (clock
  jumps) left out; p95 interpolates linearly between ranks (numpy's default method);
* top samplers: `params.sampler` of jobs created in the last 7 days, top 3, ties by name;
* outcomes: jobs created in the last 7 days that ended done / failed / dead / cancelled.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import matplotlib

matplotlib.use("Agg")  # headless; set before anything could import pyplot

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from bot.jobs.models import TERMINAL_STATUSES
from bot.jobs.store_db import Source, store_db
from bot.policy.text import escape_for_discord, format_duration

DAY_S = 86400.0
WEEK_S = 7 * DAY_S
HOUR_S = 3600.0
OUTCOMES: tuple[str, ...] = tuple(status.value for status in TERMINAL_STATUSES)  # in report order
TOP_SAMPLERS = 3
SAMPLER_NAME_CHARS = 40  #: a sampler name (from the DB) is cut to this in the text


@dataclass(frozen=True)
class Stats:
    """Numbers for `/pony stats`; durations in seconds, None where there was no data."""

    now: float
    jobs_24h: int
    jobs_7d: int
    images_24h: int
    images_7d: int
    wait_median_s: float | None
    wait_p95_s: float | None
    run_median_s: float | None
    run_p95_s: float | None
    top_samplers: list[tuple[str, int]] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class HourlySeries:
    """Per-hour buckets, oldest first: `hour_starts[i]` is the UTC hour the bucket begins."""

    hour_starts: list[float]
    jobs: list[int]
    median_wait_s: list[float | None]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-quantile (0..1) with linear interpolation between ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


# Window filter shared by the queries over jobs created in the last 7 days.
_CREATED_IN = "created_at >= :week AND created_at <= :now"


def _list_len(text: str | None) -> int | None:
    """The length of the JSON array in `text`; None when it is no valid JSON array."""
    try:
        value = json.loads(text) if text is not None else None
    except (TypeError, ValueError):
        return None
    return len(value) if isinstance(value, list) else None


def _count(flag: str) -> str:
    """SQL counting the rows where `flag` holds (the same on SQLite and PostgreSQL)."""
    return f"COALESCE(SUM(CASE WHEN {flag} THEN 1 ELSE 0 END), 0)"


async def compute_stats(conn: Source, *, now: float) -> Stats:
    """Compute `Stats` over the jobs table as of `now` (epoch seconds).

    `conn`: an SQLite connection, a queue (SQLite or PostgreSQL) or a `StoreDb`.
    """
    db = store_db(conn)
    args = {"now": now, "day": now - DAY_S, "week": now - WEEK_S}
    outcome_sums = ", ".join(_count(f"status = '{o}'") + f" AS n_{o}" for o in OUTCOMES)
    (totals,) = await db.fetch(
        f"SELECT COUNT(*) AS jobs_7d, {_count('created_at >= :day')} AS jobs_24h, {outcome_sums}"
        f" FROM jobs WHERE {_CREATED_IN}",
        args,
    )
    waits = [
        float(row["wait"])
        for row in await db.fetch(
            f"SELECT started_at - created_at AS wait FROM jobs WHERE {_CREATED_IN}"
            " AND started_at IS NOT NULL AND started_at >= created_at",
            args,
        )
    ]
    runs = [
        float(row["run"])
        for row in await db.fetch(
            "SELECT run FROM (SELECT CASE WHEN started_at IS NOT NULL AND generated_at IS NOT NULL"
            " THEN generated_at - started_at ELSE gen_seconds END AS run"
            f" FROM jobs WHERE {_CREATED_IN}) AS t WHERE run IS NOT NULL AND run >= 0",
            args,
        )
    ]
    sampler = db.dialect.text_at("params", "sampler")
    samplers = await db.fetch(
        f"SELECT sampler, COUNT(*) AS n FROM (SELECT {sampler} AS sampler FROM jobs WHERE {_CREATED_IN})"
        " AS t WHERE sampler IS NOT NULL AND sampler <> '' GROUP BY sampler",
        args,
    )
    # ties by name in code point order on both engines (a PostgreSQL collation may order otherwise)
    ranked = sorted(
        ((str(r["sampler"]), int(r["n"])) for r in samplers), key=lambda item: (-item[1], item[0])
    )
    images_7d = images_24h = 0
    for row in await db.fetch(
        "SELECT finished_at, result_files, seeds FROM jobs"
        " WHERE status = 'done' AND finished_at >= :week AND finished_at <= :now",
        args,
    ):
        count = _list_len(row["result_files"])
        if count is None:
            count = _list_len(row["seeds"]) or 0
        images_7d += count
        if row["finished_at"] >= args["day"]:
            images_24h += count
    return Stats(
        now=now,
        jobs_24h=int(totals["jobs_24h"]),
        jobs_7d=int(totals["jobs_7d"]),
        images_24h=images_24h,
        images_7d=images_7d,
        wait_median_s=percentile(waits, 0.5),
        wait_p95_s=percentile(waits, 0.95),
        run_median_s=percentile(runs, 0.5),
        run_p95_s=percentile(runs, 0.95),
        top_samplers=ranked[:TOP_SAMPLERS],
        outcomes={o: int(totals[f"n_{o}"]) for o in OUTCOMES},
    )


async def hourly_series(conn: Source, *, now: float, hours: int = 24) -> HourlySeries:
    """Jobs created per UTC hour and their median wait, for the last `hours` hours.

    The last bucket is the current (partial) hour; jobs created after `now` are left out.
    """
    current = math.floor(now / HOUR_S) * HOUR_S
    starts = [current - (hours - 1 - i) * HOUR_S for i in range(hours)]
    counts = [0] * hours
    waits: list[list[float]] = [[] for _ in range(hours)]
    rows = await store_db(conn).fetch(
        "SELECT created_at, started_at FROM jobs WHERE created_at >= :start AND created_at <= :now",
        {"start": starts[0], "now": now},
    )
    for row in rows:
        created, started = row["created_at"], row["started_at"]
        index = min(int((created - starts[0]) // HOUR_S), hours - 1)
        counts[index] += 1
        if started is not None and started >= created:
            waits[index].append(started - created)
    return HourlySeries(hour_starts=starts, jobs=counts, median_wait_s=[percentile(w, 0.5) for w in waits])


def render_chart(series: HourlySeries, *, width_px: int = 800, height_px: int = 400) -> bytes:
    """PNG of exactly width_px x height_px: bars = jobs per hour, line = median wait (twin axis).

    CPU-bound (tens of ms): call it through `asyncio.to_thread` from the bot. Uses no pyplot state.
    """
    if width_px < 200 or height_px < 150:
        raise ValueError("chart must be at least 200x150 pixels")
    dpi = 100
    fig = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = list(range(len(series.jobs)))
    ax.bar(x, series.jobs, color="#9b59b6", alpha=0.8, label="jobs")
    ax.set_ylabel("jobs per hour")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0, top=max([*series.jobs, 1]) * 1.15)

    waits = [math.nan if w is None else w for w in series.median_wait_s]
    ax2 = ax.twinx()
    ax2.plot(x, waits, color="#e67e22", marker="o", markersize=3, linewidth=1.5, label="median wait")
    ax2.set_ylabel("median wait (s)")
    known = [w for w in waits if not math.isnan(w)]
    ax2.set_ylim(bottom=0, top=max([*known, 1.0]) * 1.15)

    step = max(1, len(x) // 8)
    ticks = x[::step]
    ax.set_xticks(ticks)
    ax.set_xticklabels(
        [datetime.fromtimestamp(series.hour_starts[i], UTC).strftime("%H:00") for i in ticks], fontsize=8
    )
    ax.set_xlim(-0.6, len(x) - 0.4)
    ax.set_title("ponybot: last 24 hours (UTC)", fontsize=10)
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper left", fontsize=8, frameon=False)

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def format_stats(stats: Stats) -> str:
    """A few markdown lines for a Discord message or embed description (well under 2000 chars)."""
    samplers = (
        ", ".join(
            f"{escape_for_discord(name, SAMPLER_NAME_CHARS)} ({count})" for name, count in stats.top_samplers
        )
        or "none yet"
    )
    outcomes = " · ".join(f"{name} {stats.outcomes.get(name, 0)}" for name in OUTCOMES)
    return "\n".join(
        [
            f"**Last 24 h:** {stats.jobs_24h} jobs, {stats.images_24h} images",
            f"**Last 7 days:** {stats.jobs_7d} jobs, {stats.images_7d} images",
            f"**Wait (7 d):** median {format_duration(stats.wait_median_s, precise=True)}"
            f" · p95 {format_duration(stats.wait_p95_s, precise=True)}",
            f"**Run time (7 d):** median {format_duration(stats.run_median_s, precise=True)}"
            f" · p95 {format_duration(stats.run_p95_s, precise=True)}",
            f"**Top samplers (7 d):** {samplers}",
            f"**Outcomes (7 d):** {outcomes}",
        ]
    )
