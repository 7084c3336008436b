"""The job queue's contract: the methods the SQLite `JobQueue` and the PostgreSQL `PgJobQueue` share.

The multi-machine methods (`register_worker` ... `listen_cancels`) are real on PostgreSQL and the
simple single-process answer on SQLite (no-ops, the local disk, an in-memory rate limit).

Callers that need no engine-specific extra (`JobQueue.exclusive()`, `PgJobQueue.pool`) can be
typed against `JobQueueContract`; both classes satisfy it (checked by tests/jobs/test_contract.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from bot.jobs.models import Job, JobKind, QueueLimits, RecoveryReport


@runtime_checkable
class JobQueueContract(Protocol):
    """What every job queue backend offers (see docs/ARCHITECTURE.md, "Queue contract")."""

    limits: QueueLimits

    async def close(self) -> None:
        """Release the database connection(s)."""
        ...

    async def enqueue(
        self,
        *,
        kind: JobKind | str,
        params: dict[str, Any],
        channel_id: int,
        user_id: int,
        guild_id: int = 0,
        interaction_id: int | None = None,
        parent_id: int | None = None,
        image_index: int | None = None,
        reply_to_message_id: int | None = None,
        cost: int = 1,
        enforce_limits: bool = True,
        limits: QueueLimits | None = None,
    ) -> tuple[Job, bool]:
        """Add a job (idempotent on `interaction_id`); raises `QueueFull`."""
        ...

    async def claim(self, worker_id: str) -> Job | None:
        """Take the next job in fair order."""
        ...

    async def claim_batch(
        self, worker_id: str, max_jobs: int, *, max_images: int | None = None, reserve: bool = False
    ) -> list[Job]:
        """Take the fair pick plus compatible txt2img jobs in fair order."""
        ...

    async def begin(self, job_ids: Sequence[int], worker_id: str) -> list[Job]:
        """Start reserved jobs (the attempt counts here)."""
        ...

    async def extend_lease(self, job_id: int, worker_id: str) -> bool:
        """Push a running job's lease forward."""
        ...

    async def set_status_message(self, job_id: int, message_id: int) -> None:
        """Record the job's public status message."""
        ...

    async def mark_generated(
        self, job_id: int, worker_id: str, files: list[str], seeds: list[int], gen_seconds: float
    ) -> bool:
        """running -> generated under the same lease, unless a cancel was requested."""
        ...

    async def mark_done(self, job_id: int, result_message_id: int) -> bool:
        """generated (or running) -> done."""
        ...

    async def mark_notified(self, job_id: int) -> bool:
        """Record that a finished job's notice was shown."""
        ...

    async def unnotified(self) -> list[Job]:
        """Failed, cancelled and dead jobs whose notice is owed."""
        ...

    async def fail(self, job_id: int, error: str, *, retryable: bool) -> Job:
        """Record a failure: retry with back-off, dead, failed or cancelled."""
        ...

    async def cancel(self, job_id: int) -> str:
        """ "cancelled", "requested" or "not_open"."""
        ...

    async def is_cancel_requested(self, job_id: int) -> bool:
        """True once a cancel was requested."""
        ...

    async def finish_cancelled(self, job_id: int) -> bool:
        """A job whose cancel was requested -> cancelled."""
        ...

    async def release(self, job_id: int, worker_id: str, *, solo: bool = False) -> bool:
        """Give a running job back without counting the attempt."""
        ...

    async def recover(self, worker_id: str) -> RecoveryReport:
        """Start-up: jobs running under other worker ids go back (or die at the limit)."""
        ...

    async def requeue_expired(self) -> list[int]:
        """Release running jobs whose lease expired."""
        ...

    async def position(self, job_id: int) -> int | None:
        """1-based place of a queued job in claim order."""
        ...

    async def eta_seconds(self, job_id: int) -> float | None:
        """Estimated seconds until the job is generated."""
        ...

    async def open_jobs(self, user_id: int) -> list[Job]:
        """The user's queued, running and generated jobs."""
        ...

    async def get(self, job_id: int) -> Job | None:
        """The job with this id, or None."""
        ...

    async def get_many(self, job_ids: Iterable[int]) -> list[Job]:
        """The jobs with these ids that exist, in id order."""
        ...

    async def undelivered(self) -> list[Job]:
        """Generated jobs waiting for delivery."""
        ...

    async def counts(self) -> dict[str, int]:
        """Jobs per status (every status present)."""
        ...

    async def recent_jobs(self, since: float) -> list[Job]:
        """Jobs created at or after `since`."""
        ...

    # --- several machines on one queue (PostgreSQL; the single-process answer on SQLite) -------

    async def register_worker(self, worker_id: str, on_lost: Callable[[], None] | None = None) -> None:
        """Make `worker_id` live (a dedicated connection on PG); `on_lost()` once if that is lost."""
        ...

    async def unregister_worker(self, worker_id: str) -> None:
        """Close `worker_id`'s registration (it is no longer live)."""
        ...

    async def requeue_orphaned(self) -> list[int]:
        """Take back running jobs whose owner is not a live worker; return their ids."""
        ...

    async def share_files(self, names: Sequence[str], job_id: int | None = None) -> None:
        """Publish local files `images_dir/name` to other machines."""
        ...

    async def ensure_files(self, names: Sequence[str]) -> list[str]:
        """Make each name present under images_dir; return the names found nowhere."""
        ...

    async def claim_delivery(self, job_id: int, owner: str, hold_s: float = 60.0) -> bool:
        """True when `owner` may deliver the generated job now (holds it for `hold_s`)."""
        ...

    async def progress_slot(self, channel_id: int, every_s: float) -> bool:
        """True when a progress edit in this channel may be sent now (records it)."""
        ...

    async def live_workers(self) -> int:
        """How many workers are live (at least 1)."""
        ...

    async def listen_cancels(self, on_cancel: Callable[[int], None]) -> None:
        """Call `on_cancel(job_id)` when another process requests a running job's cancel."""
        ...


if TYPE_CHECKING:  # mypy checks both backends against the contract (nothing runs at import)
    from bot.jobs.pg_queue import PgJobQueue
    from bot.jobs.queue import JobQueue

    _SQLITE_BACKEND: type[JobQueueContract] = JobQueue
    _POSTGRES_BACKEND: type[JobQueueContract] = PgJobQueue
