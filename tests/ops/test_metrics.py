"""bot/ops/metrics.py: private registries, the HTTP server, and the health logic."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from engine_queue import insert_job, open_database, rows
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from bot.jobs.store_db import Source
from bot.ops.metrics import Health, Metrics, MetricsServer

NOW = 1_750_000_000.0


@pytest.fixture
async def conn(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Source]:
    """The jobs database on each engine: the ops connection (SQLite) or the PostgreSQL queue."""
    async with open_database(backend, request, tmp_path) as database:
        yield database


async def add_jobs(conn: Source, status: str, n: int) -> None:
    for _ in range(n):
        await insert_job(conn, status=status, created_at=NOW, updated_at=NOW)


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, tuple(sorted(labels.items()))))


@pytest.fixture
async def served():
    """A running server with its Metrics and Health (fake clock); stopped afterwards."""
    clock = FakeClock()
    health = Health(stuck_after_s=60, gateway_grace_s=30, clock=clock)
    metrics = Metrics()
    server = MetricsServer(metrics, health.check)
    await server.start(port=0)
    try:
        yield server, metrics, health, clock
    finally:
        await server.stop()


async def get(server: MetricsServer, path: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as session, session.get(f"{server.url}{path}") as resp:
        return resp.status, resp.headers["Content-Type"], await resp.text()


def test_private_registries_do_not_collide() -> None:
    a, b = Metrics(), Metrics()
    a.job_finished("done", 1.0, 2.0, 4)
    assert a.registry.get_sample_value("ponybot_jobs_total", {"outcome": "done"}) == 1
    assert b.registry.get_sample_value("ponybot_jobs_total", {"outcome": "done"}) == 0
    assert a.registry.get_sample_value("ponybot_images_total") == 4
    assert b.registry.get_sample_value("ponybot_images_total") == 0


def test_job_finished_rejects_unknown_outcome() -> None:
    with pytest.raises(ValueError):
        Metrics().job_finished("exploded", None, None, 0)


def test_job_finished_none_safe() -> None:
    m = Metrics()
    m.job_finished("cancelled", None, None, 0)
    m.job_finished("failed", -1.0, None)
    assert m.registry.get_sample_value("ponybot_jobs_total", {"outcome": "cancelled"}) == 1
    assert m.registry.get_sample_value("ponybot_wait_seconds_count") == 0
    assert m.registry.get_sample_value("ponybot_generation_seconds_count") == 0


def test_gpu_memory_gauge_is_none_safe() -> None:
    m = Metrics()
    assert m.registry.get_sample_value("ponybot_gpu_memory_bytes") is None  # no source
    m.set_gpu_memory_source(lambda: None)
    assert m.registry.get_sample_value("ponybot_gpu_memory_bytes") is None

    def broken() -> int:
        raise RuntimeError("CUDA error")

    m.set_gpu_memory_source(broken)
    assert m.registry.get_sample_value("ponybot_gpu_memory_bytes") is None
    m.set_gpu_memory_source(lambda: 123_456_789)
    assert m.registry.get_sample_value("ponybot_gpu_memory_bytes") == 123_456_789
    assert Metrics(gpu_memory=lambda: 42).registry.get_sample_value("ponybot_gpu_memory_bytes") == 42


async def test_scrape_moves_after_job_finished_and_refresh(served, conn: Source) -> None:
    server, metrics, _health, _clock = served
    assert server.url.startswith("http://127.0.0.1:")
    status, ctype, text = await get(server, "/metrics")
    assert status == 200
    assert ctype == CONTENT_TYPE_LATEST
    assert value(text, "ponybot_jobs_total", outcome="done") == 0
    assert value(text, "ponybot_queue_jobs", status="queued") == 0
    assert value(text, "ponybot_images_total") == 0

    metrics.job_finished("done", wait_s=3.0, gen_s=7.5, images=4)
    metrics.job_finished("done", wait_s=40.0, gen_s=9.0, images=2)
    metrics.job_finished("failed", wait_s=1.0, gen_s=None, images=0)
    await add_jobs(conn, "queued", 3)
    await add_jobs(conn, "running", 1)
    await add_jobs(conn, "done", 5)  # ended jobs are not queue depth
    counts = await metrics.refresh_from_db(conn)
    assert counts == {"queued": 3, "running": 1, "generated": 0}
    metrics.set_gpu_memory_source(lambda: 2 * 1024**3)

    _, _, text = await get(server, "/metrics")
    assert value(text, "ponybot_jobs_total", outcome="done") == 2
    assert value(text, "ponybot_jobs_total", outcome="failed") == 1
    assert value(text, "ponybot_images_total") == 6
    assert value(text, "ponybot_queue_jobs", status="queued") == 3
    assert value(text, "ponybot_queue_jobs", status="running") == 1
    assert value(text, "ponybot_queue_jobs", status="generated") == 0
    assert value(text, "ponybot_wait_seconds_count") == 3
    assert value(text, "ponybot_wait_seconds_sum") == pytest.approx(44.0)
    assert value(text, "ponybot_wait_seconds_bucket", le="5.0") == 2
    assert value(text, "ponybot_generation_seconds_count") == 2
    assert value(text, "ponybot_generation_seconds_sum") == pytest.approx(16.5)
    assert value(text, "ponybot_gpu_memory_bytes") == 2 * 1024**3


async def test_before_scrape_refreshes_queue(conn: Source) -> None:
    metrics = Metrics()
    server = MetricsServer(metrics, before_scrape=lambda: metrics.refresh_from_db(conn))
    await server.start()
    try:
        await add_jobs(conn, "generated", 2)
        _, _, text = await get(server, "/metrics")
        assert value(text, "ponybot_queue_jobs", status="generated") == 2
        await rows(conn, "UPDATE jobs SET status = 'done'")
        _, _, text = await get(server, "/metrics")
        assert value(text, "ponybot_queue_jobs", status="generated") == 0
    finally:
        await server.stop()


async def test_before_scrape_failure_still_serves() -> None:
    async def boom() -> None:
        raise RuntimeError("db is locked")

    server = MetricsServer(Metrics(), before_scrape=boom)
    await server.start()
    try:
        status, _, text = await get(server, "/metrics")
        assert status == 200 and "ponybot_jobs_total" in text
    finally:
        await server.stop()


async def test_healthz_ok_then_stale_worker(served) -> None:
    server, _metrics, health, clock = served
    health.set_gateway(True)
    health.set_queue_depth({"queued": 2, "running": 0})
    health.worker_heartbeat(busy=True)
    status, _, body = await get(server, "/healthz")
    data = json.loads(body)
    assert status == 200 and data["ok"] is True and data["reasons"] == []
    assert data["gateway_connected"] is True and data["queue"]["queued"] == 2

    clock.t += 61  # heartbeat now older than stuck_after_s=60 while busy with work queued
    status, _, body = await get(server, "/healthz")
    data = json.loads(body)
    assert status == 503 and data["ok"] is False
    assert any("heartbeat" in r for r in data["reasons"])

    health.worker_heartbeat()  # the worker comes back
    status, _, _ = await get(server, "/healthz")
    assert status == 200


async def test_healthz_idle_worker_with_empty_queue_is_healthy(served) -> None:
    server, _metrics, health, clock = served
    health.set_gateway(True)
    health.worker_heartbeat(busy=False)
    health.set_queue_depth({"queued": 0, "running": 0, "generated": 0})
    clock.t += 3600
    status, _, body = await get(server, "/healthz")
    assert status == 200, body
    health.set_queue_depth({"queued": 1})  # work arrives and nobody picks it up
    status, _, _ = await get(server, "/healthz")
    assert status == 503


async def test_healthz_gateway_down_after_grace(served) -> None:
    server, _metrics, health, clock = served
    health.worker_heartbeat()
    assert (await get(server, "/healthz"))[0] == 200  # start-up grace
    clock.t += 31
    status, _, body = await get(server, "/healthz")
    assert status == 503 and any("gateway" in r for r in json.loads(body)["reasons"])
    health.set_gateway(True)
    assert (await get(server, "/healthz"))[0] == 200
    health.set_gateway(False)
    clock.t += 5  # a short reconnect is fine
    assert (await get(server, "/healthz"))[0] == 200
    clock.t += 30
    assert (await get(server, "/healthz"))[0] == 503


async def test_healthz_callable_raising_is_503() -> None:
    def broken() -> tuple[bool, dict]:
        raise RuntimeError("oops")

    server = MetricsServer(Metrics(), broken)
    await server.start()
    try:
        status, _, body = await get(server, "/healthz")
        assert status == 503 and json.loads(body)["ok"] is False
    finally:
        await server.stop()


def test_health_check_details() -> None:
    clock = FakeClock(50.0)
    health = Health(stuck_after_s=10, clock=clock)
    health.worker_heartbeat(busy=True)
    health.set_gateway(True)
    ok, details = health.check(now=55.0)
    assert ok and details["worker_heartbeat_age_s"] == 5.0 and details["worker_busy"] is True
    ok, details = health.check(now=61.0)
    assert not ok and len(details["reasons"]) == 1


async def test_server_start_stop_twice() -> None:
    server = MetricsServer(Metrics())
    await server.start("127.0.0.1", 0)
    port = server.port
    assert port
    with pytest.raises(RuntimeError):
        await server.start()
    await server.stop()
    await server.stop()
    assert server.url is None
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics"):
            pass


def test_a_worker_process_has_no_gateway_to_report() -> None:
    """`ponybot worker` never connects a gateway: its health names no gateway reason."""
    clock = [0.0]
    health = Health(gateway_grace_s=60.0, watch_gateway=False, clock=lambda: clock[0])
    clock[0] = 3600.0
    health.worker_heartbeat(now=3600.0)
    ok, details = health.check()
    assert ok and details["reasons"] == []
    assert details["gateway_connected"] is None


def test_a_gateway_without_a_worker_is_not_stuck_while_jobs_wait() -> None:
    """`ponybot run --no-worker`: queued jobs wait for other machines, not for this process."""
    clock = [0.0]
    health = Health(stuck_after_s=300.0, watch_worker=False, clock=lambda: clock[0])
    watched = Health(stuck_after_s=300.0, clock=lambda: clock[0])  # the default: this process runs the jobs
    for each in (health, watched):
        each.set_gateway(True, now=0.0)
        each.set_queue_depth({"queued": 5, "running": 0, "generated": 0})
    clock[0] = 3600.0
    ok, details = health.check()
    assert ok and details["reasons"] == []
    assert watched.check()[1]["reasons"] == ["worker heartbeat is 3600 s old (limit 300 s) with work pending"]
