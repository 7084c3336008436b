"""Prometheus metrics and the health endpoint, on a private registry (Discord-free).

The bot owns one `Metrics` and one `Health`; `MetricsServer` exposes them over HTTP:

* `GET /metrics`: text exposition of `Metrics.registry`; an optional `before_scrape` coroutine
  (e.g. `lambda: metrics.refresh_from_db(conn)`) runs first so queue gauges are fresh;
* `GET /healthz`: 200 `{"ok": true, ...}` or 503 `{"ok": false, "reasons": [...], ...}` from the
  `health` callable (usually `Health.check`).

The server binds 127.0.0.1 unless told otherwise: the metrics are not meant for the internet.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bot.jobs.models import OPEN_STATUSES, TERMINAL_STATUSES, sql_literals
from bot.jobs.store_db import Source, store_db

log = logging.getLogger(__name__)

#: statuses counted by the `ponybot_queue_jobs` gauge (the open ones; ended jobs are counters)
QUEUE_STATUSES: tuple[str, ...] = tuple(status.value for status in OPEN_STATUSES)
#: allowed `outcome` label values of `ponybot_jobs_total`
OUTCOMES: tuple[str, ...] = tuple(status.value for status in TERMINAL_STATUSES)

WAIT_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600)
GENERATION_BUCKETS = (0.5, 1, 2, 3, 5, 8, 12, 20, 30, 45, 60, 90, 120, 180, 300, 600)

GpuMemoryFn = Callable[[], "int | float | None"]
HealthFn = Callable[[], tuple[bool, dict[str, Any]]]

_dumps = functools.partial(json.dumps, default=str)


class _GpuMemoryCollector(Collector):
    """`ponybot_gpu_memory_bytes` from a callable; absent when it is unset, returns None or fails."""

    NAME = "ponybot_gpu_memory_bytes"
    DOC = "GPU memory allocated by the generator, in bytes"

    def __init__(self, source: GpuMemoryFn | None) -> None:
        self.source = source

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily(self.NAME, self.DOC)]

    def collect(self) -> Iterable[Metric]:
        source = self.source
        if source is None:
            return []
        try:
            value = source()
        except Exception:  # a scrape must never fail because the GPU query did
            log.debug("gpu memory source failed", exc_info=True)
            return []
        if value is None:
            return []
        return [GaugeMetricFamily(self.NAME, self.DOC, value=float(value))]


class Metrics:
    """All ponybot metrics, registered on their own `CollectorRegistry`."""

    def __init__(
        self, registry: CollectorRegistry | None = None, *, gpu_memory: GpuMemoryFn | None = None
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.queue_jobs = Gauge(
            "ponybot_queue_jobs", "Open jobs by status", ["status"], registry=self.registry
        )
        self.wait_seconds = Histogram(
            "ponybot_wait_seconds",
            "Seconds from enqueue to the start of generation",
            buckets=WAIT_BUCKETS,
            registry=self.registry,
        )
        self.generation_seconds = Histogram(
            "ponybot_generation_seconds",
            "Seconds spent generating one job",
            buckets=GENERATION_BUCKETS,
            registry=self.registry,
        )
        self.jobs_total = Counter(
            "ponybot_jobs_total", "Jobs that ended, by outcome", ["outcome"], registry=self.registry
        )
        self.images_total = Counter("ponybot_images_total", "Images delivered", registry=self.registry)
        self._gpu = _GpuMemoryCollector(gpu_memory)
        self.registry.register(self._gpu)
        for status in QUEUE_STATUSES:
            self.queue_jobs.labels(status=status).set(0)
        for outcome in OUTCOMES:
            self.jobs_total.labels(outcome=outcome)

    def set_gpu_memory_source(self, source: GpuMemoryFn | None) -> None:
        """Set (or clear) the callable giving GPU bytes in use; it is called on each scrape."""
        self._gpu.source = source

    def observe_wait(self, wait_s: float | None) -> None:
        """Record one queue wait (None and negative values are ignored)."""
        if wait_s is not None and wait_s >= 0:
            self.wait_seconds.observe(wait_s)

    def observe_generation(self, gen_s: float | None) -> None:
        """Record one generation time (None and negative values are ignored)."""
        if gen_s is not None and gen_s >= 0:
            self.generation_seconds.observe(gen_s)

    def job_finished(
        self, outcome: str, wait_s: float | None = None, gen_s: float | None = None, images: int = 0
    ) -> None:
        """Count a job that reached `outcome` (done/failed/dead/cancelled) with its timings."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}; expected one of {', '.join(OUTCOMES)}")
        self.jobs_total.labels(outcome=outcome).inc()
        self.observe_wait(wait_s)
        self.observe_generation(gen_s)
        if images > 0:
            self.images_total.inc(images)

    def set_queue_depth(self, counts: Mapping[str, int]) -> None:
        """Set `ponybot_queue_jobs` for every open status (missing ones become 0)."""
        for status in QUEUE_STATUSES:
            self.queue_jobs.labels(status=status).set(counts.get(status, 0))

    async def refresh_from_db(self, conn: Source) -> dict[str, int]:
        """Read open-job counts from the jobs table, set the gauge, and return the counts.

        `conn`: an SQLite connection, a queue (SQLite or PostgreSQL) or a `StoreDb`.
        """
        counts = dict.fromkeys(QUEUE_STATUSES, 0)
        rows = await store_db(conn).fetch(
            f"SELECT status, COUNT(*) AS n FROM jobs WHERE status IN ({sql_literals(OPEN_STATUSES)})"
            " GROUP BY status"
        )
        for row in rows:
            counts[str(row["status"])] = int(row["n"])
        self.set_queue_depth(counts)
        return counts

    def render(self) -> bytes:
        """The text exposition of the registry."""
        return generate_latest(self.registry)


class Health:
    """Liveness from the worker heartbeat, the gateway state and the queue depth.

    Unhealthy when the worker heartbeat is older than `stuck_after_s` while it is busy or jobs are
    queued/running (an idle worker with an empty queue is fine; the worker also beats while
    idle-polling and while waiting for the model), or when the gateway has been disconnected for
    more than `gateway_grace_s` (discord.py reconnects on its own; short gaps are normal). The
    grace periods start when the object is made, so start-up is healthy for a while.

    A process without a gateway (`ponybot worker`: `watch_gateway=False`) reports
    `gateway_connected` None and never a gateway reason; one without a worker (`ponybot run
    --no-worker`: `watch_worker=False`) never a heartbeat reason (its jobs wait for other machines).
    """

    def __init__(
        self,
        *,
        stuck_after_s: float = 300.0,
        gateway_grace_s: float = 60.0,
        watch_gateway: bool = True,
        watch_worker: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.watch_gateway = watch_gateway
        self.watch_worker = watch_worker
        self.stuck_after_s = stuck_after_s
        self.gateway_grace_s = gateway_grace_s
        self._clock = clock
        start = clock()
        self._last_beat = start
        self._busy = False
        self._gateway = False
        self._gateway_since = start
        self._queue: dict[str, int] | None = None

    def worker_heartbeat(self, *, busy: bool | None = None, now: float | None = None) -> None:
        """The worker is alive; `busy` says whether it holds a job (None: unchanged)."""
        self._last_beat = self._clock() if now is None else now
        if busy is not None:
            self._busy = busy

    def set_gateway(self, connected: bool, *, now: float | None = None) -> None:
        """Record a gateway connect (on_ready/on_resumed) or disconnect (on_disconnect)."""
        if connected != self._gateway:
            self._gateway = connected
            self._gateway_since = self._clock() if now is None else now

    def set_queue_depth(self, counts: Mapping[str, int]) -> None:
        """Latest open-job counts, e.g. `health.set_queue_depth(await metrics.refresh_from_db(conn))`."""
        self._queue = {status: int(counts.get(status, 0)) for status in QUEUE_STATUSES}

    def check(self, now: float | None = None) -> tuple[bool, dict[str, Any]]:
        """(ok, details); details always carry `reasons` (empty when ok)."""
        now = self._clock() if now is None else now
        age = max(0.0, now - self._last_beat)
        queue = self._queue or {}
        pending = self._busy or queue.get("queued", 0) > 0 or queue.get("running", 0) > 0
        reasons: list[str] = []
        if self.watch_worker and pending and age > self.stuck_after_s:
            reasons.append(
                f"worker heartbeat is {age:.0f} s old (limit {self.stuck_after_s:g} s) with work pending"
            )
        down_for = max(0.0, now - self._gateway_since)
        if self.watch_gateway and not self._gateway and down_for > self.gateway_grace_s:
            reasons.append(f"discord gateway disconnected for {down_for:.0f} s")
        details: dict[str, Any] = {
            "worker_heartbeat_age_s": round(age, 3),
            "worker_busy": self._busy,
            "stuck_after_s": self.stuck_after_s,
            "queue": dict(self._queue) if self._queue is not None else None,
            "gateway_connected": self._gateway if self.watch_gateway else None,
            "reasons": reasons,
        }
        return not reasons, details


class MetricsServer:
    """aiohttp app serving `/metrics` and `/healthz`."""

    def __init__(
        self,
        metrics: Metrics,
        health: HealthFn | None = None,
        *,
        before_scrape: Callable[[], Awaitable[object]] | None = None,
        before_scrape_timeout_s: float = 5.0,
    ) -> None:
        self.metrics = metrics
        self.health = health
        self.before_scrape = before_scrape
        self.before_scrape_timeout_s = before_scrape_timeout_s
        self._runner: web.AppRunner | None = None
        self._host: str | None = None
        self._port: int | None = None
        self.app = web.Application()
        self.app.router.add_get("/metrics", self._metrics)
        self.app.router.add_get("/healthz", self._healthz)

    @property
    def port(self) -> int | None:
        """The bound port once started (useful with port 0), else None."""
        return self._port

    @property
    def url(self) -> str | None:
        """`http://host:port` once started, else None."""
        if self._port is None:
            return None
        host = f"[{self._host}]" if self._host and ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    async def start(self, host: str | None = None, port: int = 0) -> None:
        """Listen on `host` (127.0.0.1 when None) and `port` (0: any free port)."""
        if self._runner is not None:
            raise RuntimeError("MetricsServer already started")
        host = host or "127.0.0.1"
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner, self._host = runner, host
        self._port = runner.addresses[0][1]
        log.info("metrics server listening on %s", self.url)

    async def stop(self) -> None:
        """Stop listening; safe to call twice."""
        runner, self._runner, self._host, self._port = self._runner, None, None, None
        if runner is not None:
            await runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        if self.before_scrape is not None:
            try:
                await asyncio.wait_for(self.before_scrape(), self.before_scrape_timeout_s)
            except Exception:  # serve the last values rather than nothing
                log.warning("metrics refresh before scrape failed", exc_info=True)
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        if self.health is None:
            return web.json_response({"ok": True})
        try:
            ok, details = self.health()
        except Exception as exc:
            log.exception("health check raised")
            return web.json_response({"ok": False, "reasons": [f"health check error: {exc}"]}, status=503)
        body: dict[str, Any] = {"ok": bool(ok), **{k: v for k, v in details.items() if k != "ok"}}
        if not ok and not body.get("reasons"):
            body["reasons"] = ["unhealthy"]
        return web.json_response(body, status=200 if ok else 503, dumps=_dumps)
