"""The job queue's plain data: statuses and kinds, the status groupings, `Job`, limits and reports.

Every status grouping is defined once here; SQL that needs one as text derives it with
`sql_literals` (so a partial index's `WHERE status IN (...)` and the query using it stay equal).
No SQL runs here; the batch key's fields come from the torch-free `generator.params`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from generator.params import BATCH_KEY_FIELDS  # the keys jobs must share to batch (one definition)

if TYPE_CHECKING:
    import aiosqlite

    from bot.config import Settings


class JobStatus(StrEnum):
    """Where a job is in its life cycle."""

    QUEUED = "queued"
    RUNNING = "running"
    GENERATED = "generated"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    DEAD = "dead"


class JobKind(StrEnum):
    """What a job asks the generator for."""

    TXT2IMG = "txt2img"
    UPSCALE = "upscale"
    VARIATION = "variation"


#: not finished yet: waiting, generating, or generated and waiting for delivery
OPEN_STATUSES: tuple[JobStatus, ...] = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.GENERATED)
#: finished for good, in the order outcomes are reported (stats, metrics)
TERMINAL_STATUSES: tuple[JobStatus, ...] = (
    JobStatus.DONE,
    JobStatus.FAILED,
    JobStatus.DEAD,
    JobStatus.CANCELLED,
)
#: finished without a result: the member is owed a notice until `notified_at` is set
#: (the order of the partial index jobs_unnotified, migrations/0004_outcomes.sql)
NOTICE_STATUSES: tuple[JobStatus, ...] = (JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.DEAD)

#: the error stored on a cancelled job
CANCELLED_ERROR = "Cancelled."


def sql_literals(statuses: Iterable[JobStatus]) -> str:
    """The statuses as SQL string literals for an `IN (...)` list: `'queued', 'running'`."""
    return ", ".join(f"'{JobStatus(status).value}'" for status in statuses)


def crashed_message(attempts: int) -> str:
    """The error stored on a job dropped after crashing the generator `attempts` times."""
    times = "once" if attempts == 1 else f"{attempts} times"
    return f"This job crashed the generator {times} and was dropped."


@dataclass(frozen=True)
class Job:
    """One row of `jobs`, decoded (params as a dict, files/seeds as lists)."""

    id: int
    kind: JobKind
    parent_id: int | None
    image_index: int | None
    guild_id: int
    channel_id: int
    user_id: int
    interaction_id: int | None
    params: dict[str, Any]
    cost: int
    status: JobStatus
    attempts: int
    cancel_requested: bool
    lease_owner: str | None
    lease_expires_at: float | None
    not_before: float
    created_at: float
    started_at: float | None
    generated_at: float | None
    finished_at: float | None
    updated_at: float
    reply_to_message_id: int | None
    status_message_id: int | None
    result_message_id: int | None
    result_files: list[str]
    seeds: list[int]
    gen_seconds: float | None
    error: str | None
    #: when retention deleted the result files (migration 0002); None while they are kept
    pruned_at: float | None = None
    #: when the member was shown the outcome (migration 0004); None on a finished job = notice owed
    notified_at: float | None = None
    #: run alone: it was in a batch that failed, so a retry shows which job is at fault (0004)
    solo: bool = False

    @classmethod
    def from_row(cls, row: Mapping[str, Any] | aiosqlite.Row) -> Job:
        """Decode a `SELECT * FROM jobs` row."""
        return cls(
            id=row["id"],
            kind=JobKind(row["kind"]),
            parent_id=row["parent_id"],
            image_index=row["image_index"],
            guild_id=row["guild_id"],
            channel_id=row["channel_id"],
            user_id=row["user_id"],
            interaction_id=row["interaction_id"],
            params=json.loads(row["params"]),
            cost=row["cost"],
            status=JobStatus(row["status"]),
            attempts=row["attempts"],
            cancel_requested=bool(row["cancel_requested"]),
            lease_owner=row["lease_owner"],
            lease_expires_at=row["lease_expires_at"],
            not_before=row["not_before"],
            created_at=row["created_at"],
            started_at=row["started_at"],
            generated_at=row["generated_at"],
            finished_at=row["finished_at"],
            updated_at=row["updated_at"],
            reply_to_message_id=row["reply_to_message_id"],
            status_message_id=row["status_message_id"],
            result_message_id=row["result_message_id"],
            result_files=json.loads(row["result_files"]) if row["result_files"] else [],
            seeds=json.loads(row["seeds"]) if row["seeds"] else [],
            gen_seconds=row["gen_seconds"],
            error=row["error"],
            pruned_at=row["pruned_at"] if "pruned_at" in row.keys() else None,  # noqa: SIM118
            notified_at=row["notified_at"] if "notified_at" in row.keys() else None,  # noqa: SIM118
            solo=bool(row["solo"]) if "solo" in row.keys() else False,  # noqa: SIM118
        )

    @property
    def batch_key(self) -> tuple[Any, ...]:
        """Jobs with equal keys (and kind txt2img) can share one batched pipeline call."""
        return tuple(self.params.get(name) for name in BATCH_KEY_FIELDS)

    @property
    def batchable(self) -> bool:
        """May share a batch: txt2img, not `solo`, no hires fix (its second pass is per image).

        `JobQueue`'s SQL batch filter (`_BATCH_FILTER`) states the same rule for queued rows.
        """
        return self.kind is JobKind.TXT2IMG and not self.solo and not self.params.get("hires")

    @property
    def image_count(self) -> int:
        """The number of images the job asks for (its params' `count`, 1 if absent)."""
        return int(self.params.get("count") or 1)


@dataclass(frozen=True)
class QueueLimits:
    """Admission and retry limits (see `Settings` for the matching `PONY_*` variables)."""

    max_open_per_user: int = 3
    max_queued: int = 100
    cooldown_s: float = 0.0
    max_attempts: int = 3
    lease_s: float = 120.0
    retry_backoff_s: float = 5.0

    @classmethod
    def from_settings(cls, settings: Settings) -> QueueLimits:
        """The limits configured in `settings`."""
        return cls(
            max_open_per_user=settings.max_open_jobs_per_user,
            max_queued=settings.max_queue,
            cooldown_s=settings.cooldown_s,
            max_attempts=settings.max_attempts,
            lease_s=settings.lease_s,
            retry_backoff_s=settings.retry_backoff_s,
        )


class QueueFull(Exception):
    """`enqueue` refused the job; `reason` is shown to the user, `retry_after` in seconds or None.

    `kind` says which limit: "user" (open jobs per user), "queue" (queued jobs in all) or
    "cooldown"; empty when raised by other code.
    """

    def __init__(self, reason: str, retry_after: float | None = None, kind: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.kind = kind


@dataclass
class RecoveryReport:
    """What `recover` did to jobs left running by a previous process."""

    requeued: list[int] = field(default_factory=list)
    dead: list[int] = field(default_factory=list)
    #: jobs whose cancel had been requested: cancelled instead of re-run
    cancelled: list[int] = field(default_factory=list)
