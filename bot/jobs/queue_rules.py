"""The job queue's rules that do not depend on the database engine, shared by both backends.

`JobQueue` (SQLite, bot/jobs/queue.py) and `PgJobQueue` (PostgreSQL, bot/jobs/pg_queue.py) run
different SQL but must decide the same way: what an admission refusal says, how long a retry
backs off, what happens to a failed or abandoned job, how claims are stamped for fairness and
which jobs may join a batch. Those decisions live here, once; no SQL runs here (the status
lists below are plain `IN (...)` text valid in both dialects).
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from bot.jobs.models import (
    CANCELLED_ERROR,
    OPEN_STATUSES,
    TERMINAL_STATUSES,
    Job,
    JobStatus,
    QueueFull,
    QueueLimits,
    sql_literals,
)
from generator.params import BATCH_KEY_FIELDS

#: the queue's time source: seconds as a float (`time.time`; tests pass a fake clock)
Clock = Callable[[], float]

#: `status IN <this>`: the open jobs (queued, running, generated)
OPEN_SQL = f"({sql_literals(OPEN_STATUSES)})"
#: the states `mark_done` finishes (normally generated; running is accepted too)
DELIVERABLE_SQL = sql_literals((JobStatus.GENERATED, JobStatus.RUNNING))
#: the states `finish_cancelled` ends (a job whose cancel was requested)
CANCELLABLE_SQL = sql_literals((JobStatus.RUNNING, JobStatus.QUEUED))
#: what every move out of `running` to a state without a worker clears
FREE_LEASE: tuple[str, ...] = ("lease_owner = NULL", "lease_expires_at = NULL")
#: the gap between two service stamps taken at the same clock reading
SERVE_STAMP_STEP = 1e-6
#: `claim_batch` without `max_images`: room for any number of images
UNLIMITED_IMAGES = 2**31


def dumps(value: Any) -> str:
    """Compact JSON, as the queue stores params, result files and seeds."""
    return json.dumps(value, separators=(",", ":"))


@dataclass(frozen=True)
class Admission:
    """What `enqueue` reads before deciding: the user's open jobs, the queued total, the last enqueue."""

    open_jobs: int
    queued: float
    last_enqueued: float | None


async def check_limits(
    state: Admission, now: float, limits: QueueLimits, slot_free: Callable[[], Awaitable[float]]
) -> None:
    """Raise `QueueFull` if `state` breaks a limit; `slot_free()` gives the retry hint of a full queue."""
    open_jobs = state.open_jobs
    if open_jobs >= limits.max_open_per_user:
        noun = "job" if open_jobs == 1 else "jobs"
        raise QueueFull(f"You already have {open_jobs} {noun} waiting; wait for one to finish.", None, "user")
    if state.queued >= limits.max_queued:
        retry_after = await slot_free()
        raise QueueFull(
            f"The queue is full ({limits.max_queued} jobs); try again in a few minutes.",
            retry_after,
            "queue",
        )
    last = state.last_enqueued
    if limits.cooldown_s > 0 and last is not None and last > 0:
        remaining = limits.cooldown_s - (now - last)
        if remaining > 0:
            raise QueueFull(
                f"Slow down: try again in {max(1, math.ceil(remaining))} s.", remaining, "cooldown"
            )


def retry_backoff(limits: QueueLimits, attempts: int) -> float:
    """Seconds a job waits before its next try after `attempts` tries: `retry_backoff_s * 2**(attempts-1)`."""
    return limits.retry_backoff_s * 2 ** max(attempts - 1, 0)


def failure_outcome(job: Job, *, retryable: bool, limits: QueueLimits) -> JobStatus:
    """Where `fail` sends an open job: cancelled (cancel requested), queued (retry), dead or failed."""
    if job.cancel_requested:
        return JobStatus.CANCELLED
    if retryable and job.attempts < limits.max_attempts:
        return JobStatus.QUEUED
    return JobStatus.DEAD if retryable else JobStatus.FAILED


def abandoned_outcome(attempts: int, cancel_requested: bool, limits: QueueLimits) -> JobStatus:
    """Where `recover`/`requeue_expired` send a running job whose worker is gone."""
    if cancel_requested:
        return JobStatus.CANCELLED
    if attempts >= limits.max_attempts:
        return JobStatus.DEAD
    return JobStatus.QUEUED


def next_serve_stamp(now: float, last: float) -> float:
    """A service time after `last`, so claims at one clock reading still rotate users."""
    return max(now, last + SERVE_STAMP_STEP)


def batch_key(job: Job) -> dict[str, Any]:
    """The `BATCH_KEY_FIELDS` values a companion job must share with `job`, by field name."""
    return dict(zip(BATCH_KEY_FIELDS, job.batch_key, strict=True))


def batch_room(first: Job, max_images: int | None) -> int:
    """Images still free in a batch led by `first` (`claim_batch`'s `max_images`; None: no limit)."""
    return UNLIMITED_IMAGES if max_images is None else max_images - first.image_count


def status_counts(rows: Iterable[tuple[str, int]]) -> dict[str, int]:
    """`counts()`'s answer from (status, count) rows: every status present, 0 when none."""
    counts = {status.value: 0 for status in JobStatus}
    counts.update({status: int(count) for status, count in rows})
    return counts


def transition_sql(status: JobStatus, where: str, *, sets: Sequence[str] = (), returning: str = "id") -> str:
    """The one UPDATE behind every status change (named `:params`; `:now` must be bound).

    Besides `sets` it stamps `updated_at` (and `finished_at` when `status` is terminal) with `:now`.
    """
    assignments = [f"status = '{status.value}'", *sets, "updated_at = :now"]
    if status in TERMINAL_STATUSES:
        assignments.append("finished_at = :now")
    return f"UPDATE jobs SET {', '.join(assignments)} WHERE {where} RETURNING {returning}"


ConnT = TypeVar("ConnT")
RowT = TypeVar("RowT")


class Transitions(Generic[ConnT, RowT]):
    """The named status changes both queue backends make, written once over their `_transition`."""

    async def _transition(
        self,
        conn: ConnT,
        status: JobStatus,
        where: str,
        params: Mapping[str, Any],
        *,
        sets: Sequence[str] = (),
        returning: str = "id",
    ) -> list[RowT]:
        raise NotImplementedError

    async def _set_cancelled(
        self, conn: ConnT, where: str, params: Mapping[str, Any], *, returning: str = "id"
    ) -> list[RowT]:
        """Cancel the jobs matching `where` (error "Cancelled.", lease freed)."""
        return await self._transition(
            conn,
            JobStatus.CANCELLED,
            where,
            {**params, "error": CANCELLED_ERROR},
            sets=("error = :error", *FREE_LEASE),
            returning=returning,
        )

    async def _requeue(
        self,
        conn: ConnT,
        where: str,
        params: Mapping[str, Any],
        *,
        not_before: float,
        sets: Sequence[str] = (),
        returning: str = "id",
    ) -> list[RowT]:
        """Put the jobs matching `where` back in the queue, eligible from `not_before`, lease freed."""
        return await self._transition(
            conn,
            JobStatus.QUEUED,
            where,
            {**params, "not_before": not_before},
            sets=("not_before = :not_before", *sets, *FREE_LEASE),
            returning=returning,
        )

    async def _bury(
        self,
        conn: ConnT,
        status: JobStatus,
        error: str,
        where: str,
        params: Mapping[str, Any],
        *,
        returning: str = "id",
    ) -> list[RowT]:
        """End the jobs matching `where` as `status` (failed or dead) with `error`, lease freed."""
        return await self._transition(
            conn,
            status,
            where,
            {**params, "error": error},
            sets=("error = :error", *FREE_LEASE),
            returning=returning,
        )
