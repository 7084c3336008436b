"""The crash-safe job queue on PostgreSQL: `JobQueue`'s contract for workers on several machines.

Same life cycle, limits, fairness, batching, leases and ETAs as the SQLite queue (bot/jobs/queue.py);
the engine-neutral decisions come from `bot.jobs.queue_rules`, the ETA arithmetic from
`bot.jobs.estimates`. Times are the queue's `clock` readings passed as parameters (never `now()`), so
a fake clock drives both backends alike.

Concurrency. PostgreSQL runs transactions side by side, where SQLite has one writer, so the
queue takes two transaction-scoped advisory locks where SQLite's write lock did the job:

- `ORDER_LOCK` is held by every transaction that moves a job out of or back into `queued`, or
  many running jobs at once (claim, claim_batch, cancel, finish_cancelled, fail, release, recover,
  requeue_expired). A claim's pick and take are therefore serialised across all claimers, so
  concurrent claimers hand out jobs in exactly the least-recently-served order one claimer would
  (`FOR UPDATE SKIP LOCKED` alone would let two claimers pick the same user before either commits);
  it also keeps the fairness bookkeeping (`queue_users`/`queue_guilds`, kept by triggers) free of
  lock-order deadlocks.
- `ADMIT_LOCK` serialises `enqueue`, so the per-user cap, the queue cap and the cooldown are checked
  in the same transaction as the insert without two enqueues both seeing the last free slot.

Other writes (mark_generated, mark_done, extend_lease, begin, ...) touch one job's row, or several
running rows locked in id order, and take no advisory lock.

Several machines. A worker registers (`register_worker`: a dedicated connection named after it,
see `bot.jobs.pg_liveness`); `requeue_orphaned` and `recover` take back only running jobs whose
owner is not live. Result files travel in `job_files` (stored by `mark_generated` in its own
transaction, fetched by `ensure_files`), a delivery is held by one process at a time
(`claim_delivery`), progress edits are paced per channel across processes (`progress_slot`) and
cancel requests reach the worker's machine through NOTIFY (`listen_cancels`).

Driver: asyncpg (native asyncio, binary protocol, a built-in pool, `add_listener` for
LISTEN/NOTIFY, no libpq needed).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from bot.jobs import estimates, job_files, queue_rules
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
from bot.jobs.pg_db import create_pool, migrate
from bot.jobs.pg_liveness import LIVE_WORKERS_SQL, WorkerRegistration
from bot.jobs.queue_rules import (
    CANCELLABLE_SQL,
    DELIVERABLE_SQL,
    OPEN_SQL,
    SERVE_STAMP_STEP,
    Admission,
    Clock,
    dumps,
)
from generator.params import BATCH_KEY_FIELDS

#: pg_advisory_xact_lock key of the queue order ("ponyordr"): see the module docstring
ORDER_LOCK = 0x706F6E796F726472
#: pg_advisory_xact_lock key of admission ("ponyadmt")
ADMIT_LOCK = 0x706F6E7961646D74
#: the longest worker id PostgreSQL keeps whole as an application_name
MAX_WORKER_ID = 63
#: the NOTIFY channel of cancel requests on running jobs (payload: the job id)
CANCEL_CHANNEL = "ponybot_cancel"

log = logging.getLogger(__name__)

#: running jobs whose lease owner is not a live registered worker (`requeue_orphaned`, `recover`)
_ORPHANED_SQL = f"""
SELECT id, attempts, cancel_requested FROM jobs AS j
WHERE j.status = 'running' AND NOT EXISTS (
    SELECT 1 FROM ({LIVE_WORKERS_SQL}) AS live WHERE live.worker_id = j.lease_owner
){{extra}}
ORDER BY id{{lock}}
"""

_NAMED_PARAM = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")

_ADMISSION_SQL = f"""
SELECT (SELECT id FROM jobs WHERE interaction_id = :interaction) AS existing,
       (SELECT count(*) FROM jobs WHERE user_id = :user AND status IN {OPEN_SQL}) AS open_jobs,
       (SELECT coalesce(sum(queued), 0) FROM queue_guilds) AS queued,
       (SELECT last_enqueued_at FROM queue_users WHERE guild_id = :guild AND user_id = :user) AS last_enqueued
"""

# A waiting user's oldest eligible job, for the waiting users of one guild in service order
# (indexes queue_users_waiting and jobs_pick, as in SQLite; seq plays SQLite's rowid).
_PICK_SQL = """
SELECT first.id AS job_id
FROM queue_users AS u
CROSS JOIN LATERAL (
    SELECT j.id FROM jobs AS j
    WHERE j.guild_id = u.guild_id AND j.user_id = u.user_id AND j.status = 'queued'
      AND j.not_before <= :now{extra}
    ORDER BY j.id LIMIT 1
) AS first
WHERE u.guild_id = {guild} AND u.queued > 0
ORDER BY u.last_served_at, u.seq
LIMIT 1
"""
_NEXT_GUILD = "(SELECT guild_id FROM queue_guilds WHERE queued > 0 ORDER BY last_served_at, guild_id LIMIT 1)"
# `Job.batchable` plus the batch key and the room left, for queued rows: JSON values compare as
# jsonb (512 = 512.0), a missing key as JSON null (Python's `params.get` gives None for both).
_BATCH_FILTER = (
    f"\n      AND j.kind = '{JobKind.TXT2IMG.value}' AND j.solo = 0"
    "\n      AND j.params ->> 'hires' IS NULL"
    + "".join(
        f"\n      AND coalesce((j.params -> '{name}')::jsonb, 'null'::jsonb) = :{name}::jsonb"
        for name in BATCH_KEY_FIELDS
    )
    + "\n      AND coalesce((j.params ->> 'count')::numeric, 1) <= :room"
)
_PICK = {
    (first_guild, batch): _PICK_SQL.format(
        extra=_BATCH_FILTER if batch else "", guild=_NEXT_GUILD if first_guild else ":guild"
    )
    for first_guild in (True, False)
    for batch in (True, False)
}

# Queue order model for position/ETA (see PgJobQueue.position; the SQL of JobQueue's _AHEAD_SQL).
_AHEAD_SQL = """
WITH q AS (
    SELECT j.id, j.cost, j.guild_id,
           row_number() OVER (PARTITION BY j.guild_id, j.user_id ORDER BY j.id) AS user_round,
           u.last_served_at AS user_served, u.seq AS user_seq
    FROM jobs AS j
    JOIN queue_users AS u ON u.guild_id = j.guild_id AND u.user_id = j.user_id
    WHERE j.status = 'queued'
), r AS (
    SELECT q.id, q.cost, q.guild_id,
           row_number() OVER (PARTITION BY q.guild_id ORDER BY q.user_round, q.user_served, q.user_seq)
               AS guild_round
    FROM q
), o AS (
    SELECT r.id, r.cost, r.guild_id, r.guild_round, g.last_served_at AS guild_served
    FROM r JOIN queue_guilds AS g ON g.guild_id = r.guild_id
), me AS (
    SELECT * FROM o WHERE o.id = :id
)
SELECT count(o.id) AS ahead, coalesce(sum(o.cost), 0) AS ahead_cost, max(me.cost) AS own_cost
FROM me LEFT JOIN o ON o.guild_round < me.guild_round
    OR (o.guild_round = me.guild_round AND (o.guild_served < me.guild_served
        OR (o.guild_served = me.guild_served AND o.guild_id < me.guild_id)))
"""


def bind(sql: str, params: Mapping[str, Any]) -> tuple[str, list[Any]]:
    """Turn `:name` parameters into asyncpg's `$n` (one number per name) and the argument list."""
    numbers: dict[str, int] = {}

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in numbers:
            numbers[name] = len(numbers) + 1
        return f"${numbers[name]}"

    text = _NAMED_PARAM.sub(number, sql)
    return text, [params[name] for name in numbers]


def _row_count(status: str) -> int:
    """The row count of a command tag such as `UPDATE 3`."""
    return int(status.rsplit(" ", 1)[-1])


class PgJobQueue(queue_rules.Transitions[asyncpg.Connection, asyncpg.Record]):
    """The job queue over an asyncpg pool. Open with `PgJobQueue.open(url, limits)`.

    Safe to use from many tasks and from many processes on many machines at once.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        limits: QueueLimits,
        *,
        clock: Clock = time.time,
        images_dir: Path | None = None,
        url: str | None = None,
        application_name: str = "ponybot",
    ) -> None:
        """Wrap a pool to an already migrated database (`bot.jobs.pg_db.create_pool` + `migrate`).

        `images_dir`: where result files live locally (the file methods need it); `url`: the
        database, for the dedicated connections of `register_worker` and `listen_cancels`.
        """
        self._pool = pool
        self.limits = limits
        self._clock = clock
        self.images_dir = None if images_dir is None else Path(images_dir)
        self._url = url
        self._application_name = application_name
        #: worker id -> its registration (dedicated connection)
        self._workers: dict[str, WorkerRegistration] = {}
        #: worker ids whose registration was lost: their late writes are refused
        self._lost: set[str] = set()
        #: connections opened by `listen_cancels` when no worker was registered
        self._listeners: list[asyncpg.Connection] = []

    @classmethod
    async def open(
        cls,
        url: str,
        limits: QueueLimits,
        *,
        clock: Clock = time.time,
        application_name: str = "ponybot",
        images_dir: Path | None = None,
    ) -> PgJobQueue:
        """Connect a pool to the database at `url`, apply migrations, and return the queue."""
        pool = await create_pool(url, application_name=application_name)
        try:
            async with pool.acquire() as conn:
                await migrate(conn)
        except BaseException:
            await pool.close()
            raise
        return cls(
            pool, limits, clock=clock, images_dir=images_dir, url=url, application_name=application_name
        )

    async def close(self) -> None:
        """Unregister the workers, close the listeners and the pool (waits for connections in use)."""
        for worker_id in list(self._workers):
            await self.unregister_worker(worker_id)
        listeners, self._listeners = self._listeners, []
        for conn in listeners:
            if not conn.is_closed():
                await conn.close()
        await self._pool.close()

    async def __aenter__(self) -> PgJobQueue:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def application_name(self) -> str:
        """The name this process's pool connections carry (`pg_stat_activity.application_name`)."""
        return self._application_name

    @property
    def pool(self) -> asyncpg.Pool:
        """The underlying connection pool (for tests and, later, the other stores)."""
        return self._pool

    # --- plumbing ------------------------------------------------------------------------------

    def _now(self) -> float:
        return float(self._clock())

    @asynccontextmanager
    async def _write(self, lock: int | None = ORDER_LOCK) -> AsyncIterator[asyncpg.Connection]:
        """A transaction holding the advisory lock `lock` (None: none); rolled back on any exception."""
        async with self._pool.acquire() as conn, conn.transaction():
            if lock is not None:
                await conn.execute("SELECT pg_advisory_xact_lock($1)", lock)
            yield conn

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[asyncpg.Connection]:
        """A read-only transaction: one consistent snapshot across several SELECTs."""
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            yield conn

    @staticmethod
    async def _fetch(conn: asyncpg.Connection, sql: str, params: Mapping[str, Any]) -> list[asyncpg.Record]:
        text, args = bind(sql, params)
        return list(await conn.fetch(text, *args))

    @staticmethod
    async def _fetch_one(
        conn: asyncpg.Connection, sql: str, params: Mapping[str, Any]
    ) -> asyncpg.Record | None:
        text, args = bind(sql, params)
        return await conn.fetchrow(text, *args)

    @staticmethod
    async def _fetch_job(conn: asyncpg.Connection, job_id: int, *, for_update: bool = False) -> Job | None:
        lock = " FOR UPDATE" if for_update else ""
        row = await conn.fetchrow(f"SELECT * FROM jobs WHERE id = $1{lock}", job_id)
        return Job.from_row(row) if row is not None else None

    async def _jobs(self, sql: str, *args: Any) -> list[Job]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(sql, *args)
        return [Job.from_row(row) for row in rows]

    async def _one_statement(self, sql: str, params: Mapping[str, Any]) -> int:
        """Run one write statement on its own (atomic); return the rows it changed."""
        text, args = bind(sql, params)
        async with self._pool.acquire() as conn:
            return _row_count(await conn.execute(text, *args))

    @staticmethod
    async def _sec_per_unit(conn: asyncpg.Connection) -> float:
        value = await conn.fetchval("SELECT value FROM queue_stats WHERE key = 'sec_per_unit'")
        return estimates.sec_per_unit(value)

    @staticmethod
    async def _running_work(conn: asyncpg.Connection) -> list[RunningWork]:
        rows = await conn.fetch("SELECT cost, started_at FROM jobs WHERE status = 'running'")
        return [RunningWork(row["cost"], row["started_at"]) for row in rows]

    @staticmethod
    async def _serve_stamp(conn: asyncpg.Connection, now: float) -> float:
        """A service time after every one handed out before (`queue_rules.next_serve_stamp`, in SQL).

        Read and bumped under `ORDER_LOCK`, so stamps grow across every claimer and process.
        """
        stamp = await conn.fetchval(
            "UPDATE queue_serve_clock SET last_served_at ="
            " greatest($1::double precision, last_served_at + $2::double precision) RETURNING last_served_at",
            now,
            SERVE_STAMP_STEP,
        )
        return float(stamp)

    # --- transitions: every status change goes through `_transition` ---------------------------

    async def _transition(
        self,
        conn: asyncpg.Connection,
        status: JobStatus,
        where: str,
        params: Mapping[str, Any],
        *,
        sets: Sequence[str] = (),
        returning: str = "id",
    ) -> list[asyncpg.Record]:
        """Move the jobs matching `where` to `status` (`queue_rules.transition_sql`); return those moved."""
        sql = queue_rules.transition_sql(status, where, sets=sets, returning=returning)
        return await self._fetch(conn, sql, params)

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
        """Add a job; return (job, created). Idempotent on `interaction_id` (see `JobQueue.enqueue`).

        The limits are checked under `ADMIT_LOCK`, in the transaction of the insert.
        """
        kind = JobKind(kind)
        params_json = dumps(params)
        async with self._write(ADMIT_LOCK) as conn:
            now = self._now()
            if interaction_id is not None or enforce_limits:
                state = await self._fetch_one(
                    conn, _ADMISSION_SQL, {"interaction": interaction_id, "user": user_id, "guild": guild_id}
                )
                assert state is not None
                if state["existing"] is not None:
                    existing = await self._fetch_job(conn, state["existing"])
                    assert existing is not None
                    return existing, False
                if enforce_limits:
                    admission = Admission(
                        int(state["open_jobs"]), float(state["queued"]), state["last_enqueued"]
                    )
                    await queue_rules.check_limits(
                        admission, now, limits or self.limits, lambda: self._slot_free_estimate(conn, now)
                    )
            # The insert trigger counts the job as waiting and stamps queue_users.last_enqueued_at.
            row = await conn.fetchrow(
                "INSERT INTO jobs (kind, parent_id, image_index, guild_id, channel_id, user_id,"
                " interaction_id, params, cost, status, created_at, updated_at, reply_to_message_id)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'queued', $10, $10, $11) RETURNING *",
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
                reply_to_message_id,
            )
            return Job.from_row(row), True

    async def _slot_free_estimate(self, conn: asyncpg.Connection, now: float) -> float:
        """Seconds until a queue slot frees (`estimates.slot_free_seconds`)."""
        spu = await self._sec_per_unit(conn)
        running = await self._running_work(conn)
        cost = await conn.fetchval("SELECT cost FROM jobs WHERE status = 'queued' ORDER BY id LIMIT 1")
        workers = await self._live_workers(conn)
        return estimates.slot_free_seconds(running, cost, now, spu, workers)

    # --- claiming ------------------------------------------------------------------------------

    async def _pick(self, conn: asyncpg.Connection, now: float, key: dict[str, Any] | None) -> int | None:
        """The id of the next job in fair order (optionally only txt2img jobs matching `key`).

        The least recently served waiting guild's least recently served user with an eligible job;
        only when that guild has nothing eligible are the other guilds walked in order.
        """
        params: dict[str, Any] = {"now": now}
        if key is not None:
            params.update({name: dumps(value) for name, value in key.items() if name != "room"})
            params["room"] = key["room"]
        batch = key is not None
        row = await self._fetch_one(conn, _PICK[True, batch], params)
        if row is not None:
            return int(row["job_id"])
        guilds = await conn.fetch(
            "SELECT guild_id FROM queue_guilds WHERE queued > 0 ORDER BY last_served_at, guild_id"
        )
        for guild in guilds[1:]:
            row = await self._fetch_one(conn, _PICK[False, batch], {**params, "guild": guild["guild_id"]})
            if row is not None:
                return int(row["job_id"])
        return None

    async def _take(
        self, conn: asyncpg.Connection, job_id: int, worker_id: str, now: float, *, reserve: bool = False
    ) -> Job | None:
        """Move a queued job to running under `worker_id` and mark its guild and user served.

        Started at once (attempts + 1, `started_at` set) unless `reserve`: then it is only held
        (`started_at` NULL) until `begin` counts the attempt.
        """
        rows = await self._transition(
            conn,
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
                "started_at = CASE WHEN :start = 1 THEN :now::double precision END",
            ),
            returning="*",
        )
        if not rows:
            return None
        job = Job.from_row(rows[0])
        stamp = await self._serve_stamp(conn, now)
        await conn.execute(
            "UPDATE queue_guilds SET last_served_at = $1 WHERE guild_id = $2", stamp, job.guild_id
        )
        await conn.execute(
            "UPDATE queue_users SET last_served_at = $1 WHERE guild_id = $2 AND user_id = $3",
            stamp,
            job.guild_id,
            job.user_id,
        )
        return job

    async def claim(self, worker_id: str) -> Job | None:
        """Take the next job in fair order (running, attempts+1, leased to `worker_id`), or None."""
        async with self._write() as conn:
            now = self._now()
            job_id = await self._pick(conn, now, None)
            if job_id is None:
                return None
            return await self._take(conn, job_id, worker_id, now)

    async def claim_batch(
        self, worker_id: str, max_jobs: int, *, max_images: int | None = None, reserve: bool = False
    ) -> list[Job]:
        """Claim the fair pick plus up to `max_jobs - 1` compatible txt2img jobs in fair order.

        The rules of `JobQueue.claim_batch`: images within `max_images`, solo and hires-fix jobs
        never batched, `reserve` holds the jobs until `begin` counts their attempt.
        """
        async with self._write() as conn:
            now = self._now()
            first_id = await self._pick(conn, now, None)
            if first_id is None:
                return []
            first = await self._take(conn, first_id, worker_id, now, reserve=reserve)
            if first is None:  # pragma: no cover - ORDER_LOCK keeps a picked job queued
                return []
            jobs = [first]
            if not first.batchable:
                return jobs
            key = queue_rules.batch_key(first)
            room = queue_rules.batch_room(first, max_images)
            while len(jobs) < max_jobs and room > 0:
                job_id = await self._pick(conn, now, {**key, "room": room})
                if job_id is None:
                    break
                job = await self._take(conn, job_id, worker_id, now, reserve=reserve)
                if job is None:  # pragma: no cover
                    break
                jobs.append(job)
                room -= job.image_count
            return jobs

    async def begin(self, job_ids: Sequence[int], worker_id: str) -> list[Job]:
        """Start jobs reserved by `claim_batch(reserve=True)`: attempts + 1, `started_at` now.

        As `JobQueue.begin`: started and cancel-requested jobs are returned unchanged, jobs no
        longer running under `worker_id` are left out.
        """
        if not job_ids:
            return []
        ids = list(job_ids)
        async with self._write(lock=None) as conn:
            now = self._now()
            # lock the rows in id order (as recover does), so two multi-row writers never deadlock
            await conn.execute("SELECT id FROM jobs WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE", ids)
            await conn.execute(
                "UPDATE jobs SET attempts = attempts + 1, started_at = $1, lease_expires_at = $2, updated_at = $1"
                " WHERE id = ANY($3::bigint[]) AND status = 'running' AND lease_owner = $4"
                " AND started_at IS NULL AND cancel_requested = 0",
                now,
                now + self.limits.lease_s,
                ids,
                worker_id,
            )
            rows = await conn.fetch(
                "SELECT * FROM jobs WHERE id = ANY($1::bigint[]) AND status = 'running' AND lease_owner = $2"
                " ORDER BY id",
                ids,
                worker_id,
            )
        by_id = {row["id"]: Job.from_row(row) for row in rows}
        return [by_id[i] for i in ids if i in by_id]

    async def extend_lease(self, job_id: int, worker_id: str) -> bool:
        """Push the lease of a running job forward; False if it is not running under `worker_id`
        (or `worker_id`'s registration was lost)."""
        if worker_id in self._lost:
            return False
        now = self._now()
        return (
            await self._one_statement(
                "UPDATE jobs SET lease_expires_at = :lease, updated_at = :now"
                " WHERE id = :id AND status = 'running' AND lease_owner = :owner",
                {"lease": now + self.limits.lease_s, "now": now, "id": job_id, "owner": worker_id},
            )
            > 0
        )

    async def set_status_message(self, job_id: int, message_id: int) -> None:
        """Record the public status message that will become the job's result message."""
        await self._one_statement(
            "UPDATE jobs SET status_message_id = :message, updated_at = :now WHERE id = :id",
            {"message": message_id, "now": self._now(), "id": job_id},
        )

    # --- finishing -----------------------------------------------------------------------------

    async def mark_generated(
        self, job_id: int, worker_id: str, files: list[str], seeds: list[int], gen_seconds: float
    ) -> bool:
        """running -> generated, only under the same lease owner and with no cancel requested.

        Also folds `gen_seconds / cost` into the `sec_per_unit` moving average and stores the bytes
        of `files` (read from `images_dir`) in `job_files`, both in the same transaction: a refused
        write stores nothing. Refused too once `worker_id`'s registration was lost.
        """
        if worker_id in self._lost:
            return False
        found = await self._read_local(files, job_id)
        async with self._write(lock=None) as conn:
            now = self._now()
            rows = await self._transition(
                conn,
                JobStatus.GENERATED,
                "id = :id AND status = 'running' AND lease_owner = :owner AND cancel_requested = 0",
                {
                    "files": dumps(list(files)),
                    "seeds": dumps(list(seeds)),
                    "gen_seconds": float(gen_seconds),
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
            sample = estimates.speed_sample(gen_seconds, rows[0]["cost"])
            if sample is not None:
                await conn.execute(
                    "INSERT INTO queue_stats (key, value) VALUES ('sec_per_unit', $1)"
                    " ON CONFLICT (key) DO UPDATE"
                    " SET value = (1 - $2::double precision) * queue_stats.value + $2 * excluded.value",
                    sample,
                    EMA_ALPHA,
                )
            await self._store_files(conn, found, job_id, now)
            return True

    async def mark_done(self, job_id: int, result_message_id: int) -> bool:
        """generated (or running) -> done; False if the job was in any other state (e.g. already done)."""
        async with self._write(lock=None) as conn:
            rows = await self._transition(
                conn,
                JobStatus.DONE,
                f"id = :id AND status IN ({DELIVERABLE_SQL})",
                {"id": job_id, "now": self._now(), "message": result_message_id},
                sets=("result_message_id = :message", "notified_at = :now", "lease_expires_at = NULL"),
            )
        return bool(rows)

    async def mark_notified(self, job_id: int) -> bool:
        """Record that the member was shown a finished job's outcome; False when not finished or marked."""
        return (
            await self._one_statement(
                "UPDATE jobs SET notified_at = :now, updated_at = :now WHERE id = :id AND notified_at IS NULL"
                f" AND status IN ({sql_literals(TERMINAL_STATUSES)})",
                {"now": self._now(), "id": job_id},
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
        """Record a failure and return the updated job (the rules of `JobQueue.fail`).

        Raises LookupError for an unknown id; a job already finished is returned unchanged.
        """
        async with self._write() as conn:
            now = self._now()
            job = await self._fetch_job(conn, job_id, for_update=True)
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

        A request is announced on `CANCEL_CHANNEL` (`listen_cancels`) in the same transaction.
        """
        async with self._write() as conn:
            now = self._now()
            if await self._set_cancelled(conn, "id = :id AND status = 'queued'", {"id": job_id, "now": now}):
                return "cancelled"
            status = await conn.execute(
                "UPDATE jobs SET cancel_requested = 1, updated_at = $1 WHERE id = $2 AND status = 'running'",
                now,
                job_id,
            )
            if _row_count(status) == 0:
                return "not_open"
            # delivered to every listener when (and only if) this transaction commits
            await conn.execute("SELECT pg_notify($1, $2)", CANCEL_CHANNEL, str(job_id))
            return "requested"

    async def is_cancel_requested(self, job_id: int) -> bool:
        """True once `cancel` was called on the (running) job."""
        async with self._pool.acquire() as conn:
            value = await conn.fetchval("SELECT cancel_requested FROM jobs WHERE id = $1", job_id)
        return bool(value)

    async def finish_cancelled(self, job_id: int) -> bool:
        """running (or queued) job whose cancel was requested -> cancelled ("Cancelled.")."""
        async with self._write() as conn:
            rows = await self._set_cancelled(
                conn,
                f"id = :id AND status IN ({CANCELLABLE_SQL}) AND cancel_requested = 1",
                {"id": job_id, "now": self._now()},
            )
        return bool(rows)

    async def release(self, job_id: int, worker_id: str, *, solo: bool = False) -> bool:
        """Give a running job back without penalty (the rules of `JobQueue.release`).

        False (nothing changed) unless the job is running under `worker_id`.
        """
        async with self._write() as conn:
            now = self._now()
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
                    "solo = greatest(solo, :solo)",
                    "attempts = CASE WHEN started_at IS NULL THEN attempts ELSE greatest(attempts - 1, 0) END",
                ),
            )
            return bool(rows)

    # --- recovery ------------------------------------------------------------------------------

    async def _release_abandoned(
        self, conn: asyncpg.Connection, rows: Iterable[asyncpg.Record], now: float, report: RecoveryReport
    ) -> None:
        """Requeue (at once), cancel or bury jobs whose worker is gone; caller holds `ORDER_LOCK`."""
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
        """At start-up: jobs running under another worker id that is not live go back to queued
        (or dead at the limit, cancelled when a cancel was requested).

        Running jobs of live registered workers (other machines) are left alone, as are jobs under
        `worker_id`; generated jobs stay generated.
        """
        report = RecoveryReport()
        async with self._write() as conn:
            now = self._now()
            sql = _ORPHANED_SQL.format(extra=" AND j.lease_owner IS DISTINCT FROM $1", lock=" FOR UPDATE")
            rows = await conn.fetch(sql, worker_id)
            await self._release_abandoned(conn, rows, now, report)
        return report

    async def requeue_orphaned(self) -> list[int]:
        """Take back running jobs whose owner is not a live worker (rules of `recover`); their ids.

        Cheap when there are none: one read, no lock; `ORDER_LOCK` is taken only to move jobs.
        """
        async with self._pool.acquire() as conn:
            if not await conn.fetch(_ORPHANED_SQL.format(extra="", lock="")):
                return []
        report = RecoveryReport()
        async with self._write() as conn:
            now = self._now()
            rows = await conn.fetch(_ORPHANED_SQL.format(extra="", lock=" FOR UPDATE"))
            await self._release_abandoned(conn, rows, now, report)
        return sorted(report.requeued + report.dead + report.cancelled)

    async def requeue_expired(self) -> list[int]:
        """Release running jobs whose lease expired (same rule as `recover`); return their ids."""
        report = RecoveryReport()
        async with self._write() as conn:
            now = self._now()
            rows = await conn.fetch(
                "SELECT id, attempts, cancel_requested FROM jobs"
                " WHERE status = 'running' AND lease_expires_at < $1 ORDER BY id FOR UPDATE",
                now,
            )
            await self._release_abandoned(conn, rows, now, report)
        return sorted(report.requeued + report.dead + report.cancelled)

    # --- reading -------------------------------------------------------------------------------

    async def _place(self, conn: asyncpg.Connection, job_id: int) -> QueuePlace | None:
        """Where a queued job stands in claim order (see `position`); None when it is not queued."""
        row = await self._fetch_one(conn, _AHEAD_SQL, {"id": job_id})
        if row is None or row["own_cost"] is None:
            return None
        return QueuePlace(int(row["ahead"]), float(row["ahead_cost"]), float(row["own_cost"]))

    async def position(self, job_id: int) -> int | None:
        """1-based place of a queued job in the claim order (the model of `JobQueue.position`)."""
        async with self._read() as conn:
            place = await self._place(conn, job_id)
        return None if place is None else place.position

    async def eta_seconds(self, job_id: int) -> float | None:
        """Estimated seconds until a job is generated; None unless queued or running (see `JobQueue`)."""
        async with self._read() as conn:
            now = self._now()
            spu = await self._sec_per_unit(conn)
            job = await self._fetch_job(conn, job_id)
            if job is None:
                return None
            if job.status is JobStatus.RUNNING:
                return estimates.remaining_seconds(RunningWork(job.cost, job.started_at), now, spu)
            if job.status is not JobStatus.QUEUED:
                return None
            running = await self._running_work(conn)
            place = await self._place(conn, job_id)
            workers = await self._live_workers(conn)
        if place is None:  # pragma: no cover - read in the same snapshot as the status
            return None
        return estimates.queued_eta(place, running, now, spu, workers)

    async def open_jobs(self, user_id: int) -> list[Job]:
        """The user's queued, running and generated jobs, oldest first."""
        return await self._jobs(
            f"SELECT * FROM jobs WHERE user_id = $1 AND status IN {OPEN_SQL} ORDER BY id", user_id
        )

    async def get(self, job_id: int) -> Job | None:
        """The job with this id, or None."""
        async with self._pool.acquire() as conn:
            return await self._fetch_job(conn, job_id)

    async def get_many(self, job_ids: Iterable[int]) -> list[Job]:
        """The jobs with these ids that exist, in id order."""
        ids = sorted(set(job_ids))
        if not ids:
            return []
        return await self._jobs("SELECT * FROM jobs WHERE id = ANY($1::bigint[]) ORDER BY id", ids)

    async def undelivered(self) -> list[Job]:
        """Generated jobs waiting for delivery, oldest first."""
        return await self._jobs("SELECT * FROM jobs WHERE status = 'generated' ORDER BY id")

    async def counts(self) -> dict[str, int]:
        """Number of jobs per status; every status is present (0 when none)."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch("SELECT status, count(*) AS n FROM jobs GROUP BY status")
        return queue_rules.status_counts((row["status"], row["n"]) for row in rows)

    async def recent_jobs(self, since: float) -> list[Job]:
        """Jobs created at or after `since` (a clock timestamp), oldest first; for stats."""
        return await self._jobs("SELECT * FROM jobs WHERE created_at >= $1 ORDER BY id", float(since))

    # --- several machines: liveness ------------------------------------------------------------

    def _connect_url(self) -> str:
        if self._url is None:
            raise RuntimeError("this PgJobQueue was built without `url` (open it with PgJobQueue.open)")
        return self._url

    async def register_worker(self, worker_id: str, on_lost: Callable[[], None] | None = None) -> None:
        """Make `worker_id` live: a dedicated connection named `worker_id` (see `bot.jobs.pg_liveness`).

        When that connection is lost, `on_lost()` is called once, `worker_id` stays dead (its late
        `mark_generated` / `extend_lease` are refused) and may not be registered again.
        """
        if not (0 < len(worker_id) <= MAX_WORKER_ID and worker_id.isascii() and worker_id.isprintable()):
            # PostgreSQL truncates a longer application_name and replaces other characters
            raise ValueError(f"worker id {worker_id!r}: 1-{MAX_WORKER_ID} printable ASCII characters")
        if worker_id in self._lost:
            raise ValueError(f"worker id {worker_id} lost its registration; register a fresh id")
        if worker_id in self._workers:
            return

        def lost(registration: WorkerRegistration) -> None:
            self._lost.add(registration.worker_id)
            if self._workers.get(registration.worker_id) is registration:
                del self._workers[registration.worker_id]
            if on_lost is not None:
                on_lost()

        self._workers[worker_id] = await WorkerRegistration.open(self._connect_url(), worker_id, lost)

    async def unregister_worker(self, worker_id: str) -> None:
        """Close `worker_id`'s dedicated connection: it is no longer live (no `on_lost`)."""
        registration = self._workers.pop(worker_id, None)
        if registration is not None:
            await registration.close()

    async def _live_workers(self, conn: asyncpg.Connection) -> int:
        return max(int(await conn.fetchval(f"SELECT count(*) FROM ({LIVE_WORKERS_SQL}) AS live")), 1)

    async def live_workers(self) -> int:
        """Number of live registered workers on this database, from every machine (at least 1)."""
        async with self._pool.acquire() as conn:
            return await self._live_workers(conn)

    async def listen_cancels(self, on_cancel: Callable[[int], None]) -> None:
        """Call `on_cancel(job_id)` for each cancel request `cancel()` announces, from any process.

        Listens on the newest registered worker's connection (so it ends with that registration),
        or on a connection of its own when no worker is registered here.
        """

        def notified(conn: object, pid: int, channel: str, payload: str) -> None:
            try:
                on_cancel(int(payload))
            except Exception:
                log.exception("cancel listener failed on job %s", payload)

        registrations = [r for r in self._workers.values() if not r.lost]
        if registrations:
            await registrations[-1].listen(CANCEL_CHANNEL, notified)
            return
        conn = await asyncpg.connect(
            self._connect_url(), server_settings={"application_name": self._application_name}
        )
        self._listeners.append(conn)
        conn.add_termination_listener(self._listener_closed)
        await conn.add_listener(CANCEL_CHANNEL, notified)

    def _listener_closed(self, conn: asyncpg.Connection) -> None:
        """asyncpg: a `listen_cancels` connection closed; say so unless the queue is closing."""
        if conn in self._listeners:
            log.warning("the cancel listener connection closed; cancels fall back to polling")

    # --- several machines: files, delivery, progress ---------------------------------------------

    def _folder(self) -> Path:
        if self.images_dir is None:
            raise RuntimeError(
                "this PgJobQueue was opened without images_dir (PgJobQueue.open(images_dir=...))"
            )
        return self.images_dir

    async def _read_local(self, names: Sequence[str], job_id: int | None) -> dict[str, bytes]:
        """The bytes of the local files `names` (none without `images_dir`); missing ones are logged."""
        if self.images_dir is None or not names:
            return {}
        found, missing = await asyncio.to_thread(job_files.read_local, self.images_dir, names)
        if missing:
            log.warning("job %s: files not found under %s, not shared: %s", job_id, self.images_dir, missing)
        return found

    @staticmethod
    async def _store_files(
        conn: asyncpg.Connection, files: Mapping[str, bytes], job_id: int | None, now: float
    ) -> None:
        if files:
            await conn.executemany(
                "INSERT INTO job_files (name, job_id, data, created_at) VALUES ($1, $2, $3, $4)"
                " ON CONFLICT (name) DO UPDATE SET job_id = excluded.job_id, data = excluded.data,"
                " created_at = excluded.created_at",
                [(name, job_id, data, now) for name, data in files.items()],
            )

    async def share_files(self, names: Sequence[str], job_id: int | None = None) -> None:
        """Store the local files `images_dir/name` in `job_files` for other machines (upsert).

        Raises FileNotFoundError naming the files that are not there (nothing is stored then).
        """
        found, missing = await asyncio.to_thread(job_files.read_local, self._folder(), names)
        if missing:
            raise FileNotFoundError(f"not under {self._folder()}: {', '.join(missing)}")
        async with self._write(lock=None) as conn:
            await self._store_files(conn, found, job_id, self._now())

    async def ensure_files(self, names: Sequence[str]) -> list[str]:
        """Make each name present under `images_dir`, writing missing ones from `job_files`
        (atomic: a temporary file and a rename); return the names found nowhere."""
        folder = self._folder()
        missing = await asyncio.to_thread(job_files.missing_locally, folder, names)
        if not missing:
            return []
        async with self._pool.acquire() as conn:
            rows = await conn.fetch("SELECT name, data FROM job_files WHERE name = ANY($1::text[])", missing)
        stored = {
            row["name"]: bytes(row["data"]) for row in rows if job_files.local_path(folder, row["name"])
        }
        await asyncio.to_thread(job_files.write_all, folder, stored)
        return [name for name in missing if name not in stored]

    async def delete_files(self, names: Sequence[str] = (), job_ids: Sequence[int] = ()) -> int:
        """Drop stored files (retention): those named, and every file of `job_ids`; how many went."""
        async with self._pool.acquire() as conn:
            status = await conn.execute(
                "DELETE FROM job_files WHERE name = ANY($1::text[]) OR job_id = ANY($2::bigint[])",
                list(names),
                list(job_ids),
            )
        return _row_count(status)

    async def claim_delivery(self, job_id: int, owner: str, hold_s: float = 60.0) -> bool:
        """True when `owner` may deliver the generated job now: it is unheld, held by `owner`, the
        hold expired, or its holder has no connection to this database any more (a process whose
        `application_name` it was, killed mid-delivery); the hold (`delivery_owner`,
        `delivery_until`) is then set for `hold_s` s. Pass `application_name` as `owner` so a dead
        holder's hold ends with its connections rather than after `hold_s`."""
        now = self._now()
        return (
            await self._one_statement(
                "UPDATE jobs SET delivery_owner = :owner, delivery_until = :until"
                " WHERE id = :id AND status = 'generated'"
                " AND (delivery_owner IS NULL OR delivery_owner = :owner OR delivery_until <= :now"
                "      OR NOT EXISTS (SELECT 1 FROM pg_stat_activity AS a"
                "                     WHERE a.datname = current_database() AND a.application_name = delivery_owner))",
                {"owner": owner, "until": now + hold_s, "id": job_id, "now": now},
            )
            > 0
        )

    async def progress_slot(self, channel_id: int, every_s: float) -> bool:
        """True (and recorded) when no process was allowed a progress edit in this channel in the
        last `every_s` seconds (one conditional upsert: concurrent callers get one True)."""
        now = self._now()
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                "INSERT INTO channel_progress (channel_id, last_at) VALUES ($1, $2)"
                " ON CONFLICT (channel_id) DO UPDATE SET last_at = excluded.last_at"
                " WHERE channel_progress.last_at <= excluded.last_at - $3::double precision"
                " RETURNING channel_id",
                channel_id,
                now,
                float(every_s),
            )
        return row is not None
