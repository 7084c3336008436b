"""Operations wiring: metrics, health, periodic queue refresh and retention, job logs' final line.

The composition root (bot.app) builds one `Ops` after the worker it watches and hands the worker
its `worker_heartbeat` and `job_finished` hooks; the Discord client reports the gateway state
(`gateway`, per shard when it runs several). `run_bot` calls `start()` once everything is built and `stop()` on the way out. `start()` opens a database connection of its own (retention writes in its own
transactions, so it must not share the queue's), starts the periodic tasks and, when
`PONY_METRICS_PORT` is set, the `/metrics` + `/healthz` server. With a PostgreSQL queue
(`Ops(..., queue=pg_queue)`) both periodic tasks use the queue's pool instead of a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import aiosqlite

from bot.config import Settings
from bot.jobs.contract import JobQueueContract
from bot.jobs.db import connect
from bot.jobs.models import Job
from bot.jobs.pg_queue import PgJobQueue
from bot.jobs.retention import prune, retention_limits
from bot.jobs.store_db import StoreDb, store_db
from bot.ops.metrics import OUTCOMES, Health, Metrics, MetricsServer
from bot.runtime.engine import Engine, EngineState
from bot.runtime.worker import Worker

log = logging.getLogger(__name__)

#: seconds between two refreshes of the queue-depth gauge and health's view of the queue
REFRESH_S = 10.0
#: how many finished job ids are remembered so a job is counted once
_SEEN_LIMIT = 10_000


class Ops:
    """Metrics, health and the periodic tasks of one bot process."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        worker: Worker,
        *,
        queue: JobQueueContract | None = None,
        gateway: bool = True,
        local_worker: bool = True,
    ) -> None:
        """`queue` picks the database of the refresh and retention: a `PgJobQueue` = its pool;
        anything else (or None) = a dedicated SQLite connection to `PONY_DB`, opened by `start()`.
        `gateway` / `local_worker`: whether this process has a gateway / runs its worker (health
        watches only what the process has: `ponybot worker` has no gateway, `run --no-worker` no worker)."""
        self.settings = settings
        self.engine = engine
        self.worker = worker
        self.queue = queue
        self.metrics = Metrics(gpu_memory=self._gpu_bytes)
        self.health = Health(
            stuck_after_s=self.settings.health_stuck_s, watch_gateway=gateway, watch_worker=local_worker
        )
        self.server: MetricsServer | None = None
        self.conn: aiosqlite.Connection | None = None  # the SQLite ops connection (None on PostgreSQL)
        self.db: StoreDb | None = None  # what refresh and prune read and write, once started
        self._tasks: list[asyncio.Task[None]] = []
        self._pruning = asyncio.Lock()  # one retention run at a time (its SQLite transaction)
        self._counted: OrderedDict[int, None] = OrderedDict()
        self._shard_count = 1  # gateway shards the client runs (PONY_SHARDS)
        self._shards_up: set[int] = set()

    # --- hooks ----------------------------------------------------------------------------------

    def worker_heartbeat(self) -> None:
        """The worker's `heartbeat`: alive now, busy when it holds jobs."""
        self.health.worker_heartbeat(busy=bool(self.worker.current_job_ids))

    def gateway(self, connected: bool, *, shard_id: int = 0, shard_count: int = 1) -> None:
        """Record that gateway shard `shard_id` of `shard_count` (the one connection of an unsharded
        client: 0 of 1) connected (ready/resumed) or lost its connection; health counts the gateway
        as connected only while every shard is."""
        self._shard_count = shard_count
        if connected:
            self._shards_up.add(shard_id)
        else:
            self._shards_up.discard(shard_id)
        self.health.set_gateway(not self.shards_down())

    def shards_down(self) -> list[int]:
        """The gateway shards that are not connected now (ids, ascending)."""
        return [shard for shard in range(self._shard_count) if shard not in self._shards_up]

    def job_finished(self, job: Job) -> None:
        """The worker's `on_finished`: count a job that ended, once, with its timings."""
        outcome = str(job.status)
        if outcome not in OUTCOMES or job.id in self._counted:
            return
        self._counted[job.id] = None
        while len(self._counted) > _SEEN_LIMIT:
            self._counted.popitem(last=False)
        wait_s = job.started_at - job.created_at if job.started_at is not None else None
        images = len(job.result_files) if outcome == "done" else 0
        self.metrics.job_finished(outcome, wait_s, job.gen_seconds, images)

    def check_health(self) -> tuple[bool, dict[str, Any]]:
        """`Health.check` plus the model state: a model that failed to load is unhealthy."""
        ok, details = self.health.check()
        engine = self.engine
        details["model"] = engine.state.value
        details["worker"] = self.worker.describe()
        down = self.shards_down()
        details["gateway_shards"] = {
            "total": self._shard_count,
            "up": self._shard_count - len(down),
            "down": down,
        }
        if engine.state is EngineState.FAILED:
            details["reasons"].append(f"model failed to load: {engine.error}")
            ok = False
        elif engine.state is EngineState.HUNG:
            details["reasons"].append(f"GPU hung: {engine.error}")
            ok = False
        return ok, details

    def _gpu_bytes(self) -> int | None:
        memory = self.engine.gpu_memory()
        return memory[1] if memory is not None else None

    # --- life cycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the ops connection, start the periodic tasks and (if configured) the metrics server."""
        if isinstance(self.queue, PgJobQueue):
            self.db = store_db(self.queue)
        else:
            self.conn = await connect(self.settings.db_path, busy_timeout_ms=self.settings.db_busy_timeout_ms)
            self.db = store_db(self.conn)
        self._spawn(self._every(REFRESH_S, self.refresh), "ponybot-metrics-refresh")
        self._spawn(self._every(self.settings.retention_every_min * 60.0, self.prune), "ponybot-retention")
        if self.settings.metrics_port is not None:
            server = MetricsServer(self.metrics, self.check_health, before_scrape=self.refresh)
            host, port = self.settings.metrics_host, self.settings.metrics_port
            try:
                await server.start(host, port)
            except OSError as exc:  # the bot still serves Discord; `ponybot doctor` points at the cause
                log.error(
                    "metrics are off: cannot listen on %s:%s (%s); change PONY_METRICS_PORT", host, port, exc
                )
            else:
                self.server = server

    async def stop(self) -> None:
        """Stop the server and the periodic tasks; close the ops connection. Safe to call twice."""
        if self.server is not None:
            await self.server.stop()
            self.server = None
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        conn, self.conn, self.db = self.conn, None, None
        if conn is not None:
            await conn.close()

    # --- periodic work --------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Read the open-job counts into the queue gauge and health."""
        if self.db is None:
            return
        counts = await self.metrics.refresh_from_db(self.db)
        self.health.set_queue_depth(counts)

    async def prune(self) -> None:
        """Apply the retention limits once (PONY_RETENTION_DAYS, PONY_RETENTION_MAX_GB)."""
        if self.db is None:
            return
        max_age_s, max_bytes = retention_limits(self.settings.retention_days, self.settings.retention_max_gb)
        async with self._pruning:  # the periodic run and a direct call never overlap
            await prune(
                self.db, self.settings.images_dir, max_age_s=max_age_s, max_bytes=max_bytes, now=time.time()
            )

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        self._tasks.append(asyncio.ensure_future(coro))
        self._tasks[-1].set_name(name)

    async def _every(self, interval_s: float, action: Callable[[], Awaitable[None]]) -> None:
        """Run `action` now and then every `interval_s`; errors are logged, never fatal."""
        while True:
            try:
                await action()
            except Exception:
                log.exception("periodic task %s failed", getattr(action, "__name__", action))
            await asyncio.sleep(interval_s)
