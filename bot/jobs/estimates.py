"""ETA arithmetic for the job queue: pure functions over costs, start times and the measured speed.

A job's `cost` is its work in step-images (`bot.jobs.extras.job_cost`); the queue keeps a moving
average of seconds per cost unit (`queue_stats.sec_per_unit`, folded in by `mark_generated`).
`JobQueue` reads the numbers in one snapshot and hands them to these functions; no SQL here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

#: ETA speed used until a job has been measured: seconds per step-image.
DEFAULT_SEC_PER_UNIT = 0.1
#: Weight of the newest measurement in the `sec_per_unit` moving average.
EMA_ALPHA = 0.3
#: The shortest wait `slot_free_seconds` suggests to a member turned away by a full queue.
MIN_RETRY_S = 1.0


@dataclass(frozen=True)
class RunningWork:
    """A running job as the ETA sees it: its cost and when it started (None: reserved, not started)."""

    cost: float
    started_at: float | None


@dataclass(frozen=True)
class QueuePlace:
    """Where a queued job stands in claim order: the jobs ahead, their total cost, its own cost."""

    ahead: int
    ahead_cost: float
    own_cost: float

    @property
    def position(self) -> int:
        """1-based place in the claim order (1 = next to run)."""
        return self.ahead + 1


def sec_per_unit(measured: float | None) -> float:
    """The speed to estimate with: the measured average, or `DEFAULT_SEC_PER_UNIT` before any."""
    return float(measured) if measured is not None and measured > 0 else DEFAULT_SEC_PER_UNIT


def speed_sample(gen_seconds: float, cost: float) -> float | None:
    """Seconds per cost unit measured on one generated job; None when it tells nothing (0 cost or time)."""
    return gen_seconds / cost if cost > 0 and gen_seconds > 0 else None


def remaining_seconds(work: RunningWork, now: float, spu: float) -> float:
    """Seconds a running job still needs (0 once over its estimate; a job not started: all of it)."""
    return max(work.cost * spu - (now - (work.started_at or now)), 0.0)


def queued_eta(
    place: QueuePlace, running: Iterable[RunningWork], now: float, spu: float, workers: int = 1
) -> float:
    """Seconds until a queued job is generated: the work ahead, its own, and what running jobs have left.

    `workers` live workers drain the work ahead (and what is running) side by side; the job's own
    work runs on one of them.
    """
    running_s = sum(remaining_seconds(work, now, spu) for work in running)
    return (place.ahead_cost * spu + running_s) / max(workers, 1) + place.own_cost * spu


def slot_free_seconds(
    running: Iterable[RunningWork], next_queued_cost: float | None, now: float, spu: float, workers: int = 1
) -> float:
    """Seconds until a queue slot frees: the soonest running job's remaining time, else the next job's.

    With nothing running the next queued job's cost (1 when none), shared by `workers` live
    workers, is the estimate; never below `MIN_RETRY_S`.
    """
    remaining = [remaining_seconds(work, now, spu) for work in running]
    if remaining:
        return max(min(remaining), MIN_RETRY_S)
    cost = 1 if next_queued_cost is None else next_queued_cost
    return max(cost * spu / max(workers, 1), MIN_RETRY_S)
