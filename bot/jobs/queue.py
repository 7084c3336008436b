"""The crash-safe job queue: pure SQL over aiosqlite, no Discord imports.

Life cycle: queued -> running -> generated -> done, or failed / cancelled / dead. Every transition
is one SQLite transaction (`BEGIN IMMEDIATE` where it reads before it writes), so a crash at any
point leaves each job in exactly one state, and two claimers can never take the same job.

Fairness: `claim` serves the guild served least recently (among guilds with queued work), then
within it the user served least recently, then that user's oldest eligible job. `queue_guilds` and
`queue_users` (kept by triggers, see migrations/0001_jobs.sql) hold the per-guild / per-user queued
counts and service times, so a claim walks waiting users in index order and never scans the jobs.

The engine-neutral rules (admission refusals, retry back-off, failure and recovery outcomes, service
stamps, batch room) live in `bot.jobs.queue_rules`, shared with the PostgreSQL twin of this queue
(`bot.jobs.pg_queue.PgJobQueue`); both satisfy `bot.jobs.contract.JobQueueContract`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite

from bot.jobs import estimates, job_files, queue_rules
from bot.jobs.db import DEFAULT_BUSY_TIMEOUT_MS, connect, migrate
from bot.jobs.estimates import EMA_ALPHA, QueuePlace, RunningWork
from bot.jobs.models import (
    NOTICE_STATUSES,
    TERMINAL_STATUSES,
    Job,
    JobKind,
    JobStatus,
    QueueLimits,
    RecoveryReport,
    crashed_message,
    sql_literals,
)
from bot.jobs.queue_rules import (
    CANCELLABLE_SQL,
    DELIVERABLE_SQL,
    OPEN_SQL,
    Admission,
    Clock,
    dumps,
)
from generator.params import BATCH_KEY_FIELDS  # the keys jobs must share to batch (one definition)

# Everything enqueue needs to decide, in one round trip: an existing job for the interaction,
# the user's open jobs (index jobs_user_open), the waiting total (kept per guild by triggers) and
# the user's last enqueue time in this guild (kept by the insert trigger).
_ADMISSION_SQL = f"""
SELECT (SELECT id FROM jobs WHERE interaction_id = :interaction) AS existing,
       (SELECT count(*) FROM jobs WHERE user_id = :user AND status IN {OPEN_SQL}) AS open_jobs,
       (SELECT total(queued) FROM queue_guilds) AS queued,
       (SELECT last_enqueued_at FROM queue_users WHERE guild_id = :guild AND user_id = :user) AS last_enqueued
"""

# A waiting user's oldest eligible job, for each waiting user of one guild in service order.
# Served by queue_users_waiting (guild_id, last_served_at [, rowid]) and the partial index jobs_pick
# (guild_id, user_id, id, not_before) WHERE status = 'queued': no sort, no scan of the backlog.
_PICK_SQL = """
SELECT u.user_id AS user_id, (
    SELECT j.id FROM jobs AS j
    WHERE j.guild_id = u.guild_id AND j.user_id = u.user_id AND j.status = 'queued'
      AND j.not_before <= :now{extra}
    ORDER BY j.id LIMIT 1
) AS job_id
FROM queue_users AS u
WHERE u.guild_id = {guild} AND u.queued > 0 AND job_id IS NOT NULL
ORDER BY u.last_served_at, u.rowid
LIMIT 1
"""
# The guild served least recently among those with waiting jobs (index queue_guilds_waiting).
_NEXT_GUILD = "(SELECT guild_id FROM queue_guilds WHERE queued > 0 ORDER BY last_served_at, guild_id LIMIT 1)"
# The SQL twin of `Job.batchable` (plus the batch key and the room left), for queued rows.
_BATCH_FILTER = (
    f"\n      AND j.kind = '{JobKind.TXT2IMG.value}' AND j.solo = 0"
    # hires-fix jobs (issue #14, params.hires) run alone: their second pass is per image
    "\n      AND json_extract(j.params, '$.hires') IS NULL"
    + "".join(f"\n      AND json_extract(j.params, '$.{name}') IS :{name}" for name in BATCH_KEY_FIELDS)
    # the images still free in the batch (`claim_batch`'s max_images)
    + "\n      AND coalesce(json_extract(j.params, '$.count'), 1) <= :room"
)
_PICK = {
    (first_guild, batch): _PICK_SQL.format(
        extra=_BATCH_FILTER if batch else "", guild=_NEXT_GUILD if first_guild else ":guild"
    )
    for first_guild in (True, False)
    for batch in (True, False)
}

# Queue order model for position/ETA (see JobQueue.position).
_AHEAD_SQL = """
WITH q AS (
    SELECT j.id, j.cost, j.guild_id,
           ROW_NUMBER() OVER (PARTITION BY j.guild_id, j.user_id ORDER BY j.id) AS user_round,
           u.last_served_at AS user_served, u.rowid AS user_seq
    FROM jobs AS j
    JOIN queue_users AS u ON u.guild_id = j.guild_id AND u.user_id = j.user_id
    WHERE j.status = 'queued'
), r AS (
    SELECT q.id, q.cost, q.guild_id,
           ROW_NUMBER() OVER (PARTITION BY q.guild_id ORDER BY q.user_round, q.user_served, q.user_seq)
               AS guild_round
    FROM q
), o AS (
    SELECT r.id, r.cost, r.guild_id, r.guild_round, g.last_served_at AS guild_served
    FROM r JOIN queue_guilds AS g ON g.guild_id = r.guild_id
), me AS (
    SELECT * FROM o WHERE o.id = :id
)
SELECT count(o.id) AS ahead, total(o.cost) AS ahead_cost, max(me.cost) AS own_cost
FROM me LEFT JOIN o ON o.guild_round < me.guild_round
    OR (o.guild_round = me.guild_round AND (o.guild_served < me.guild_served
        OR (o.guild_served = me.guild_served AND o.guild_id < me.guild_id)))
"""


class JobQueue(queue_rules.Transitions[aiosqlite.Connection, aiosqlite.Row]):
    """The job queue over one aiosqlite connection. Open with `JobQueue.open(path, limits)`.

    All methods are safe to call concurrently from many tasks (they share one lock) and from
    several processes on the same database file (SQLite's write lock serialises them).
    """

    def __init__(
        self,
        conn: aiosqlite.Connection,
        limits: QueueLimits,
        *,
        clock: Clock = time.time,
        images_dir: Path | None = None,
    ) -> None:
        """Wrap an already migrated connection from `bot.db.connect` (autocommit mode).

        `images_dir`: where result files live (`ensure_files` looks there; default `./images`).
        """
        self._conn = conn
        self.limits = limits
        self._clock = clock
        self._lock = asyncio.Lock()
        self._last_served: float | None = None
        self.images_dir = Path("images") if images_dir is None else Path(images_dir)
        #: channel id -> clock reading of the last progress edit allowed there (`progress_slot`)
        self._progress: dict[int, float] = {}

    @classmethod
    async def open(
        cls,
        path: Path,
        limits: QueueLimits,
        *,
        clock: Clock = time.time,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
        images_dir: Path | None = None,
    ) -> JobQueue:
        """Connect to the database at `path`, apply migrations, and return the queue.

        `busy_timeout_ms`: how long a statement waits for another connection's write lock before
        failing with `sqlite3.OperationalError` ("database is locked"). `images_dir`: where result
        files live (default: `images` next to the database file).
        """
        conn = await connect(Path(path), busy_timeout_ms=busy_timeout_ms)
        try:
            await migrate(conn)
        except BaseException:
            await conn.close()
            raise
        folder = Path(path).parent / "images" if images_dir is None else images_dir
        return cls(conn, limits, clock=clock, images_dir=folder)

    async def close(self) -> None:
        """Close the connection (waits for queued statements to finish)."""
        async with self._lock:
            await self._conn.close()

    async def __aenter__(self) -> JobQueue:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connection(self) -> aiosqlite.Connection:
        """The underlying connection (for stats and tests)."""
        return self._conn

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[aiosqlite.Connection]:
        """The connection, while no queue transaction is open (for stores sharing it).

        Run single autocommit statements inside; a statement sent on `connection` without this
        could land inside a queue transaction and be rolled back with it.
        """
        async with self._lock:
            yield self._conn

    # --- plumbing ------------------------------------------------------------------------------

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[aiosqlite.Connection]:
        """A `BEGIN IMMEDIATE` transaction: committed on success, rolled back on any exception.

        aiosqlite runs statements in order on one thread, so the rollback queued here runs after
        anything already queued, even when the awaiting task was cancelled mid-statement;
        `sqlite3.Connection.rollback` is a no-op when no transaction is open.
        """
        async with self._lock:
            conn = self._conn
            try:
                await conn.execute("BEGIN IMMEDIATE")
                yield conn
                await conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(Exception):
                    await conn.rollback()
                raise

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[aiosqlite.Connection]:
        """A read transaction: one consistent snapshot across several SELECTs."""
        async with self._lock:
            conn = self._conn
            try:
                await conn.execute("BEGIN")
                yield conn
            finally:
                with contextlib.suppress(Exception):
                    await conn.rollback()  # nothing was written; this just ends the snapshot

    async def _one_statement(self, sql: str, params: Sequence[Any] | Mapping[str, Any]) -> int:
        """Run one write statement on its own (atomic in autocommit mode); return rowcount."""
        async with self._lock:
            cursor = await self._conn.execute(sql, params)
            return cursor.rowcount

    async def _fetch_one(
        self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()
    ) -> aiosqlite.Row | None:
        rows = await self._conn.execute_fetchall(sql, params)
        return next(iter(rows), None)

    async def _fetch_job(self, job_id: int) -> Job | None:
        row = await self._fetch_one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return Job.from_row(row) if row is not None else None

    async def _jobs(self, sql: str, params: Sequence[Any] = ()) -> list[Job]:
        async with self._lock:
            rows = await self._conn.execute_fetchall(sql, params)
        return [Job.from_row(row) for row in rows]

    async def _sec_per_unit(self) -> float:
        row = await self._fetch_one("SELECT value FROM queue_stats WHERE key = 'sec_per_unit'")
        return estimates.sec_per_unit(row[0] if row is not None else None)

    async def _running_work(self) -> list[RunningWork]:
        rows = await self._conn.execute_fetchall("SELECT cost, started_at FROM jobs WHERE status = 'running'")
        return [RunningWork(row["cost"], row["started_at"]) for row in rows]

    async def _serve_stamp(self, now: float) -> float:
        """A strictly increasing service time, so equal clock readings still order the claims."""
        if self._last_served is None:
            row = await self._fetch_one(
                "SELECT max((SELECT max(last_served_at) FROM queue_guilds),"
                " (SELECT max(last_served_at) FROM queue_users))"
            )
            self._last_served = float(row[0]) if row is not None and row[0] is not None else 0.0
        stamp = queue_rules.next_serve_stamp(now, self._last_served)
        self._last_served = stamp
        return stamp

    # --- transitions: every status change goes through `_transition` ---------------------------

    async def _transition(
        self,
        conn: aiosqlite.Connection,
        status: JobStatus,
        where: str,
        params: Mapping[str, Any],
        *,
        sets: Sequence[str] = (),
        returning: str = "id",
    ) -> list[aiosqlite.Row]:
        """Move the jobs matching `where` to `status`; return the `returning` columns of each one moved.

        The one UPDATE behind every status change: besides `sets` it stamps `updated_at` (and
        `finished_at` when `status` is terminal) with `:now`, which `params` must bind. One
        statement, so it is atomic on its own in autocommit mode.
        """
        sql = queue_rules.transition_sql(status, where, sets=sets, returning=returning)
        return list(await conn.execute_fetchall(sql, params))

    # --- admission -----------------------------------------------------------------------------

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
        """Add a job; return (job, created). Idempotent on `interaction_id`.

        A repeated `interaction_id` returns the existing job with created=False (no limits
        checked). With `enforce_limits` the per-user open-job cap, the global queued cap and the
        per-user cooldown are checked in the same transaction as the insert; a refusal raises
        `QueueFull` with a user-facing reason. `limits` overrides the queue's own (e.g. a guild's
        per-user cap and cooldown).
        """
        kind = JobKind(kind)
        params_json = dumps(params)
        async with self._write() as conn:
            now = self._clock()
            if interaction_id is not None or enforce_limits:
                state = await self._fetch_one(
                    _ADMISSION_SQL, {"interaction": interaction_id, "user": user_id, "guild": guild_id}
                )
                assert state is not None
                if state["existing"] is not None:
                    existing = await self._fetch_job(state["existing"])
                    assert existing is not None
                    return existing, False
                if enforce_limits:
                    admission = Admission(state["open_jobs"], state["queued"], state["last_enqueued"])
                    await queue_rules.check_limits(
                        admission, now, limits or self.limits, lambda: self._slot_free_estimate(now)
                    )
            # The insert trigger counts the job as waiting and stamps queue_users.last_enqueued_at.
            rows = await conn.execute_fetchall(
                "INSERT INTO jobs (kind, parent_id, image_index, guild_id, channel_id, user_id,"
                " interaction_id, params, cost, status, created_at, updated_at, reply_to_message_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?) RETURNING *",
                (
                    kind.value,
                    parent_id,
                    image_index,
                    guild_id,
                    channel_id,
                    user_id,
                    interaction_id,
                    params_json,
                    cost,
                    now,
                    now,
                    reply_to_message_id,
                ),
            )
            return Job.from_row(next(iter(rows))), True

    async def _slot_free_estimate(self, now: float) -> float:
        """Seconds until a queue slot frees (`estimates.slot_free_seconds`)."""
        spu = await self._sec_per_unit()
        running = await self._running_work()
        row = await self._fetch_one("SELECT cost FROM jobs WHERE status = 'queued' ORDER BY id LIMIT 1")
        return estimates.slot_free_seconds(running, row[0] if row is not None else None, now, spu)

    # --- claiming ------------------------------------------------------------------------------

    async def _pick(self, now: float, key: dict[str, Any] | None) -> int | None:
        """The id of the next job in fair order (optionally only txt2img jobs matching `key`).

        Usually one query: the least recently served waiting guild's least recently served user
        with an eligible job. Only when that guild has nothing eligible (all its waiting jobs are
        backing off, or none match `key`) are the other guilds walked in order.
        """
        params: dict[str, Any] = {"now": now, **(key or {})}
        batch = key is not None
        row = await self._fetch_one(_PICK[True, batch], params)
        if row is not None:
            return int(row["job_id"])
        guilds = await self._conn.execute_fetchall(
            "SELECT guild_id FROM queue_guilds WHERE queued > 0 ORDER BY last_served_at, guild_id"
        )
        for guild in list(guilds)[1:]:
            row = await self._fetch_one(_PICK[False, batch], {**params, "guild": guild[0]})
            if row is not None:
                return int(row["job_id"])
        return None

    async def _take(self, job_id: int, worker_id: str, now: float, *, reserve: bool = False) -> Job | None:
        """Move a queued job to running under `worker_id` and mark its guild and user served.

        Started at once (attempts + 1, `started_at` set) unless `reserve`: then it is only held
        (`started_at` NULL) until `begin` counts the attempt.
        """
        rows = await self._transition(
            self._conn,
            JobStatus.RUNNING,
            "id = :id AND status = 'queued'",
            {
                "start": 0 if reserve else 1,
                "owner": worker_id,
                "lease": now + self.limits.lease_s,
                "now": now,
                "id": job_id,
            },
            sets=(
                "attempts = attempts + :start",
                "lease_owner = :owner",
                "lease_expires_at = :lease",
                "started_at = CASE WHEN :start THEN :now END",
            ),
            returning="*",
        )
        if not rows:
            return None
        job = Job.from_row(rows[0])
        stamp = await self._serve_stamp(now)
        await self._conn.execute(
            "UPDATE queue_guilds SET last_served_at = ? WHERE guild_id = ?", (stamp, job.guild_id)
        )
        await self._conn.execute(
            "UPDATE queue_users SET last_served_at = ? WHERE guild_id = ? AND user_id = ?",
            (stamp, job.guild_id, job.user_id),
        )
        return job

    async def claim(self, worker_id: str) -> Job | None:
        """Take the next job in fair order (running, attempts+1, leased to `worker_id`), or None."""
        async with self._write():
            now = self._clock()
            job_id = await self._pick(now, None)
            if job_id is None:
                return None
            return await self._take(job_id, worker_id, now)

    async def claim_batch(
        self, worker_id: str, max_jobs: int, *, max_images: int | None = None, reserve: bool = False
    ) -> list[Job]:
        """Claim the next job, plus up to `max_jobs - 1` queued txt2img jobs with the same batch key.

        The first job is always the fair pick (`claim`'s), whatever its image count. The extra jobs
        are picked in the same fair order (each one marks its guild and user served), all in one
        transaction, and only while the batch's images (the sum of the jobs' `count`) stay within
        `max_images` (None: no image limit): a job that does not fit is left for a later claim,
        and a smaller compatible job of the next user in fair order may fill the room instead.
        A first job that is not txt2img is returned alone. Compatibility is read from the params
        JSON (`json_extract`), so the last, fruitless search reads the queued jobs of users who
        have no compatible job. A `solo` job (from a batch that failed) and a hires-fix job
        (`params["hires"]`) are never batched.

        `reserve`: hold the jobs without starting them (a batch claimed ahead of time): their
        attempt counts only when `begin` is called, so a crash of the job running meanwhile does
        not use up theirs.
        """
        async with self._write():
            now = self._clock()
            first_id = await self._pick(now, None)
            if first_id is None:
                return []
            first = await self._take(first_id, worker_id, now, reserve=reserve)
            if first is None:  # pragma: no cover - we hold the write lock
                return []
            jobs = [first]
            if not first.batchable:
                return jobs
            key = queue_rules.batch_key(first)
            room = queue_rules.batch_room(first, max_images)
            while len(jobs) < max_jobs and room > 0:
                job_id = await self._pick(now, {**key, "room": room})
                if job_id is None:
                    break
                job = await self._take(job_id, worker_id, now, reserve=reserve)
                if job is None:  # pragma: no cover
                    break
                jobs.append(job)
                room -= job.image_count
            return jobs

    async def begin(self, job_ids: Sequence[int], worker_id: str) -> list[Job]:
        """Start jobs reserved by `claim_batch(reserve=True)`: attempts + 1, `started_at` now.

        Jobs already started are returned as they are, and so are jobs whose cancel was requested
        meanwhile (not counted: the caller cancels them); jobs no longer running under `worker_id`
        (cancelled, lease lost) are left out.
        """
        if not job_ids:
            return []
        marks = ", ".join("?" * len(job_ids))
        async with self._write() as conn:
            now = self._clock()
            await conn.execute(
                "UPDATE jobs SET attempts = attempts + 1, started_at = ?, lease_expires_at = ?, updated_at = ?"
                f" WHERE id IN ({marks}) AND status = 'running' AND lease_owner = ? AND started_at IS NULL"
                " AND cancel_requested = 0",
                (now, now + self.limits.lease_s, now, *job_ids, worker_id),
            )
            rows = await conn.execute_fetchall(
                f"SELECT * FROM jobs WHERE id IN ({marks}) AND status = 'running' AND lease_owner = ?"
                " ORDER BY id",
                (*job_ids, worker_id),
            )
        by_id = {row["id"]: Job.from_row(row) for row in rows}
        return [by_id[i] for i in job_ids if i in by_id]

    async def extend_lease(self, job_id: int, worker_id: str) -> bool:
        """Push the lease of a running job forward; False if it is not running under `worker_id`."""
        now = self._clock()
        return (
            await self._one_statement(
                "UPDATE jobs SET lease_expires_at = ?, updated_at = ?"
                " WHERE id = ? AND status = 'running' AND lease_owner = ?",
                (now + self.limits.lease_s, now, job_id, worker_id),
            )
            > 0
        )

    async def set_status_message(self, job_id: int, message_id: int) -> None:
        """Record the public status message that will become the job's result message."""
        await self._one_statement(
            "UPDATE jobs SET status_message_id = ?, updated_at = ? WHERE id = ?",
            (message_id, self._clock(), job_id),
        )

    # --- finishing -----------------------------------------------------------------------------

    async def mark_generated(
        self, job_id: int, worker_id: str, files: list[str], seeds: list[int], gen_seconds: float
    ) -> bool:
        """running -> generated (images saved, not yet delivered), only under the same lease owner.

        Also folds `gen_seconds / cost` into the `sec_per_unit` moving average used for ETAs.
        Returns False (and changes nothing) if the job is not running under `worker_id`, or if
        its cancel was requested: a cancel that lands before this wins (`finish_cancelled` it).
        """
        # Two autocommit statements, no explicit transaction: the transition is one atomic
        # statement, and a crash between the two loses one speed sample at most.
        now = self._clock()
        async with self._lock:
            rows = await self._transition(
                self._conn,
                JobStatus.GENERATED,
                "id = :id AND status = 'running' AND lease_owner = :owner AND cancel_requested = 0",
                {
                    "files": dumps(list(files)),
                    "seeds": dumps(list(seeds)),
                    "gen_seconds": gen_seconds,
                    "now": now,
                    "id": job_id,
                    "owner": worker_id,
                },
                sets=(
                    "result_files = :files",
                    "seeds = :seeds",
                    "gen_seconds = :gen_seconds",
                    "generated_at = :now",
                    "lease_expires_at = NULL",
                ),
                returning="cost",
            )
            if not rows:
                return False
            sample = estimates.speed_sample(gen_seconds, rows[0][0])
            if sample is not None:
                await self._conn.execute(
                    "INSERT INTO queue_stats (key, value) VALUES ('sec_per_unit', :sample)"
                    " ON CONFLICT (key) DO UPDATE SET value = (1 - :alpha) * value + :alpha * excluded.value",
                    {"sample": sample, "alpha": EMA_ALPHA},
                )
            return True

    async def mark_done(self, job_id: int, result_message_id: int) -> bool:
        """generated (or running) -> done; False if the job was in any other state (e.g. already done)."""
        now = self._clock()
        async with self._lock:
            rows = await self._transition(
                self._conn,
                JobStatus.DONE,
                f"id = :id AND status IN ({DELIVERABLE_SQL})",
                {"id": job_id, "now": now, "message": result_message_id},
                sets=("result_message_id = :message", "notified_at = :now", "lease_expires_at = NULL"),
            )
        return bool(rows)

    async def mark_notified(self, job_id: int) -> bool:
        """Record that the member was shown a finished job's outcome (its notice is no longer owed).

        False (nothing changed) when the job is not finished or was already marked.
        """
        now = self._clock()
        return (
            await self._one_statement(
                "UPDATE jobs SET notified_at = ?, updated_at = ? WHERE id = ? AND notified_at IS NULL"
                f" AND status IN ({sql_literals(TERMINAL_STATUSES)})",
                (now, now, job_id),
            )
            > 0
        )

    async def unnotified(self) -> list[Job]:
        """Failed, cancelled and dead jobs whose notice is still owed, oldest first (index jobs_unnotified)."""
        return await self._jobs(
            f"SELECT * FROM jobs WHERE notified_at IS NULL AND status IN ({sql_literals(NOTICE_STATUSES)})"
            " ORDER BY id"
        )

    async def fail(self, job_id: int, error: str, *, retryable: bool) -> Job:
        """Record a failure and return the updated job.

        retryable and attempts < max_attempts: back to queued, eligible after
        `retry_backoff_s * 2**(attempts-1)`; retryable at the limit: dead; not retryable: failed.
        A job whose cancel was requested becomes cancelled instead. A job already finished is
        returned unchanged. Raises LookupError for an unknown id.
        """
        async with self._write() as conn:
            now = self._clock()
            job = await self._fetch_job(job_id)
            if job is None:
                raise LookupError(f"No job #{job_id}.")
            if job.status in TERMINAL_STATUSES:
                return job
            params = {"id": job_id, "now": now}
            outcome = queue_rules.failure_outcome(job, retryable=retryable, limits=self.limits)
            if outcome is JobStatus.CANCELLED:
                rows = await self._set_cancelled(conn, "id = :id", params, returning="*")
            elif outcome is JobStatus.QUEUED:
                rows = await self._requeue(
                    conn,
                    "id = :id",
                    {**params, "error": error},
                    not_before=now + queue_rules.retry_backoff(self.limits, job.attempts),
                    sets=("error = :error",),
                    returning="*",
                )
            else:
                rows = await self._bury(conn, outcome, error, "id = :id", params, returning="*")
            return Job.from_row(rows[0])

    async def cancel(self, job_id: int) -> str:
        """Cancel a job: "cancelled" (was queued), "requested" (running: the worker stops it), else "not_open".

        Generated jobs are finished work waiting for delivery, so they are "not_open" here too.
        """
        async with self._write() as conn:
            now = self._clock()
            if await self._set_cancelled(conn, "id = :id AND status = 'queued'", {"id": job_id, "now": now}):
                return "cancelled"
            cursor = await conn.execute(
                "UPDATE jobs SET cancel_requested = 1, updated_at = ? WHERE id = ? AND status = 'running'",
                (now, job_id),
            )
            return "requested" if cursor.rowcount > 0 else "not_open"

    async def is_cancel_requested(self, job_id: int) -> bool:
        """True once `cancel` was called on the (running) job."""
        async with self._lock:
            row = await self._fetch_one("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,))
        return bool(row and row[0])

    async def finish_cancelled(self, job_id: int) -> bool:
        """running (or queued) job whose cancel was requested -> cancelled ("Cancelled.").

        For the worker once the generator stopped on the request. Returns False, changing
        nothing, when no cancel was requested or the job is no longer running/queued (e.g. the
        worker stopped it for its own reasons: then `release` or `fail` it instead).
        """
        now = self._clock()
        async with self._lock:
            rows = await self._set_cancelled(
                self._conn,
                f"id = :id AND status IN ({CANCELLABLE_SQL}) AND cancel_requested = 1",
                {"id": job_id, "now": now},
            )
        return bool(rows)

    async def release(self, job_id: int, worker_id: str, *, solo: bool = False) -> bool:
        """Give a running job back without penalty (clean shutdown, hung GPU, a failed batch):
        queued at once, the attempt not counted. A job whose cancel was requested is cancelled
        instead (its notice is then owed, see `unnotified`). `solo`: the job runs alone next
        time. False (nothing changed) unless the job is running under `worker_id`.
        """
        async with self._write() as conn:
            now = self._clock()
            held = "id = :id AND status = 'running' AND lease_owner = :owner"
            params = {"id": job_id, "owner": worker_id, "now": now}
            if await self._set_cancelled(conn, f"{held} AND cancel_requested = 1", params):
                return True
            rows = await self._requeue(
                conn,
                held,
                {**params, "solo": int(solo)},
                not_before=now,
                sets=(
                    "solo = max(solo, :solo)",
                    "attempts = CASE WHEN started_at IS NULL THEN attempts ELSE max(attempts - 1, 0) END",
                ),
            )
            return bool(rows)

    # --- recovery ------------------------------------------------------------------------------

    async def _release_abandoned(
        self, rows: Iterable[aiosqlite.Row], now: float, report: RecoveryReport
    ) -> None:
        """Requeue (at once), cancel or bury jobs whose worker is gone; caller holds a write transaction."""
        conn = self._conn
        for row in rows:
            job_id, attempts = row["id"], row["attempts"]
            params = {"id": job_id, "now": now}
            outcome = queue_rules.abandoned_outcome(attempts, bool(row["cancel_requested"]), self.limits)
            if outcome is JobStatus.CANCELLED:
                await self._set_cancelled(conn, "id = :id", params)
                report.cancelled.append(job_id)
            elif outcome is JobStatus.DEAD:
                await self._bury(conn, JobStatus.DEAD, crashed_message(attempts), "id = :id", params)
                report.dead.append(job_id)
            else:
                await self._requeue(conn, "id = :id", params, not_before=now)
                report.requeued.append(job_id)

    async def recover(self, worker_id: str) -> RecoveryReport:
        """At start-up: every job running under another worker id goes back to queued at once,
        or to dead ("This job crashed the generator N times ...") at the attempt limit.

        `worker_id` must be unique per process start (e.g. host-pid-random): jobs running under
        it are left alone. Generated jobs stay generated (they only need delivery).
        """
        report = RecoveryReport()
        async with self._write() as conn:
            now = self._clock()
            rows = await conn.execute_fetchall(
                "SELECT id, attempts, cancel_requested FROM jobs"
                " WHERE status = 'running' AND lease_owner IS NOT ? ORDER BY id",
                (worker_id,),
            )
            await self._release_abandoned(rows, now, report)
        return report

    async def requeue_expired(self) -> list[int]:
        """Release running jobs whose lease expired (same rule as `recover`); return their ids."""
        report = RecoveryReport()
        async with self._write() as conn:
            now = self._clock()
            rows = await conn.execute_fetchall(
                "SELECT id, attempts, cancel_requested FROM jobs"
                " WHERE status = 'running' AND lease_expires_at < ? ORDER BY id",
                (now,),
            )
            await self._release_abandoned(rows, now, report)
        return sorted(report.requeued + report.dead + report.cancelled)

    # --- reading -------------------------------------------------------------------------------

    async def _place(self, job_id: int) -> QueuePlace | None:
        """Where a queued job stands in claim order (see `position`); None when it is not queued."""
        row = await self._fetch_one(_AHEAD_SQL, {"id": job_id})
        if row is None or row["own_cost"] is None:
            return None
        return QueuePlace(int(row["ahead"]), float(row["ahead_cost"]), float(row["own_cost"]))

    async def position(self, job_id: int) -> int | None:
        """1-based place of a queued job in the claim order (1 = next to run); None if not queued.

        Model: claims go round-robin over guilds in `queue_guilds.last_served_at` order and, within
        a guild, round-robin over its users in `queue_users.last_served_at` order, each user's jobs
        oldest first -- which is what `claim` does when no new work arrives. Jobs waiting out a
        retry back-off are counted as if eligible, and running jobs are not counted.
        """
        async with self._read():
            place = await self._place(job_id)
        return None if place is None else place.position

    async def eta_seconds(self, job_id: int) -> float | None:
        """Estimated seconds until a job is generated; None unless queued or running.

        queued: (cost ahead + own cost + remaining cost of running jobs) * sec_per_unit;
        running: its own remaining time. sec_per_unit is the measured moving average
        (`estimates.DEFAULT_SEC_PER_UNIT` until a job has been measured).
        """
        async with self._read():
            now = self._clock()
            spu = await self._sec_per_unit()
            job = await self._fetch_job(job_id)
            if job is None:
                return None
            if job.status is JobStatus.RUNNING:
                return estimates.remaining_seconds(RunningWork(job.cost, job.started_at), now, spu)
            if job.status is not JobStatus.QUEUED:
                return None
            running = await self._running_work()
            place = await self._place(job_id)
        if place is None:  # pragma: no cover - read in the same snapshot as the status
            return None
        return estimates.queued_eta(place, running, now, spu)

    async def open_jobs(self, user_id: int) -> list[Job]:
        """The user's queued, running and generated jobs, oldest first."""
        return await self._jobs(
            f"SELECT * FROM jobs WHERE user_id = ? AND status IN {OPEN_SQL} ORDER BY id", (user_id,)
        )

    async def get(self, job_id: int) -> Job | None:
        """The job with this id, or None."""
        async with self._lock:
            return await self._fetch_job(job_id)

    async def get_many(self, job_ids: Iterable[int]) -> list[Job]:
        """The jobs with these ids that exist, in id order."""
        ids = sorted(set(job_ids))
        if not ids:
            return []
        marks = ", ".join("?" * len(ids))
        return await self._jobs(f"SELECT * FROM jobs WHERE id IN ({marks}) ORDER BY id", ids)

    async def undelivered(self) -> list[Job]:
        """Generated jobs waiting for delivery, oldest first."""
        return await self._jobs("SELECT * FROM jobs WHERE status = 'generated' ORDER BY id")

    async def counts(self) -> dict[str, int]:
        """Number of jobs per status; every status is present (0 when none)."""
        async with self._lock:
            rows = await self._conn.execute_fetchall("SELECT status, count(*) FROM jobs GROUP BY status")
        return queue_rules.status_counts((row[0], row[1]) for row in rows)

    async def recent_jobs(self, since: float) -> list[Job]:
        """Jobs created at or after `since` (a clock timestamp), oldest first; for stats."""
        return await self._jobs("SELECT * FROM jobs WHERE created_at >= ? ORDER BY id", (since,))

    # --- several machines: one process on SQLite, so these are the simple answers -------------

    async def register_worker(self, worker_id: str, on_lost: Callable[[], None] | None = None) -> None:
        """Nothing to do: SQLite workers share one machine (liveness is the lease)."""

    async def unregister_worker(self, worker_id: str) -> None:
        """Nothing to do (see `register_worker`)."""

    async def requeue_orphaned(self) -> list[int]:
        """Always `[]`: jobs of a gone process come back through `recover` and `requeue_expired`."""
        return []

    async def share_files(self, names: Sequence[str], job_id: int | None = None) -> None:
        """Nothing to do: every process reads the same images folder."""

    async def ensure_files(self, names: Sequence[str]) -> list[str]:
        """The names with no file under `images_dir` (nowhere else to fetch them from)."""
        return await asyncio.to_thread(job_files.missing_locally, self.images_dir, names)

    async def claim_delivery(self, job_id: int, owner: str, hold_s: float = 60.0) -> bool:
        """True when the job is generated (one process delivers on SQLite; no hold is needed)."""
        async with self._lock:
            row = await self._fetch_one("SELECT status FROM jobs WHERE id = ?", (job_id,))
        return row is not None and row[0] == JobStatus.GENERATED.value

    async def progress_slot(self, channel_id: int, every_s: float) -> bool:
        """True (and recorded) when no progress edit was allowed in this channel in the last `every_s` s."""
        now = self._clock()
        last = self._progress.get(channel_id)
        if last is not None and now - last < every_s:
            return False
        self._progress[channel_id] = now
        return True

    async def live_workers(self) -> int:
        """Always 1: one worker per SQLite database."""
        return 1

    async def listen_cancels(self, on_cancel: Callable[[int], None]) -> None:
        """Nothing to do: the process that cancels also runs the worker (`Worker.request_cancel`)."""
