"""Running it for real: metrics and /healthz, job log lines, /pony-stats, /pony-about, retention."""

from __future__ import annotations

import io
import json
import logging
import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import is_result, job_messages, wait_until, wait_until_async
from fake_discord import FakeDiscord, FakeMessage
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

import bot.ops.ops
from bot.jobs.db import connect
from bot.jobs.retention import prune
from bot.logging_setup import JsonLinesFormatter
from bot.ops.about import USE_RESTRICTIONS, bot_version
from bot.policy.text import format_duration


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def fetch(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in a Prometheus text exposition (None when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


async def make_result(fake: FakeDiscord, **options: Any) -> FakeMessage:
    """Run /pony and return its result message."""
    before = set(fake.messages)
    interaction = await fake.slash("pony", {"prompt": "a pony", "seed": 7, **options})
    await interaction.wait_followup()
    return await fake.wait_for_message(lambda m: is_result(m) and m.id not in before, timeout=60)


def button_id(message: FakeMessage, label: str) -> str:
    return next(cid for lab, cid in message.buttons() if lab == label)


async def job_row(bot: Any, job_id: int) -> Any:
    return await bot.queue.get(job_id)


async def test_metrics_move_as_jobs_run_and_each_state_change_is_logged(
    discord_server: FakeDiscord, start_bot, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    fake = discord_server
    port = free_port()
    bot = await start_bot(PONY_METRICS_PORT=port)
    assert bot.ops.server is not None and bot.ops.server.port == port
    base = f"http://127.0.0.1:{port}"

    status, text = await fetch(f"{base}/metrics")
    assert status == 200
    assert metric(text, "ponybot_jobs_total", outcome="done") == 0
    assert metric(text, "ponybot_images_total") == 0
    assert metric(text, "ponybot_gpu_memory_bytes") is None  # CPU: no GPU gauge

    bot.worker.pause()
    interaction = await fake.slash("pony", {"prompt": "counted", "count": 2})
    await interaction.wait_followup()
    _, text = await fetch(f"{base}/metrics")
    assert metric(text, "ponybot_queue_jobs", status="queued") == 1

    bot.worker.resume()
    await fake.wait_for_message(is_result, timeout=60)

    async def counted() -> str | None:
        _, text = await fetch(f"{base}/metrics")
        return text if metric(text, "ponybot_jobs_total", outcome="done") == 1 else None

    text = await wait_until_async(counted, 20, "job counted")
    assert metric(text, "ponybot_images_total") == 2
    assert metric(text, "ponybot_wait_seconds_count") == 1
    assert metric(text, "ponybot_generation_seconds_count") == 1
    assert metric(text, "ponybot_queue_jobs", status="queued") == 0
    assert metric(text, "ponybot_queue_jobs", status="running") == 0
    assert metric(text, "ponybot_jobs_total", outcome="failed") == 0

    status, body = await fetch(f"{base}/healthz")
    health = json.loads(body)
    assert status == 200 and health["ok"] is True
    assert health["gateway_connected"] is True and health["model"] == "ready"

    # one line per state change, each with job id, user id and status (and timings where known)
    records = [r for r in caplog.records if getattr(r, "job_id", None) == 1 and hasattr(r, "status")]
    assert [r.status for r in records] == ["queued", "running", "generated", "done"]
    assert all(r.user_id == fake.alice.id for r in records)
    running, generated, done = records[1:]
    assert running.wait_s >= 0
    assert generated.gen_s > 0 and generated.images == 2
    assert done.images == 2 and done.total_s >= done.gen_s and done.wait_s == running.wait_s
    line = json.loads(JsonLinesFormatter().format(done))
    assert line["job_id"] == 1 and line["user_id"] == fake.alice.id and line["status"] == "done"
    assert line["msg"] == "job 1 done" and "gen_s" in line and "wait_s" in line

    # the gateway state comes from on_disconnect / on_resumed
    seen: list[bool] = []
    record_gateway = bot.ops.gateway
    bot.ops.gateway = lambda connected: (seen.append(connected), record_gateway(connected))  # type: ignore[method-assign]
    await fake.drop_gateway()
    await wait_until(lambda: seen[-2:] == [False, True], 20, "disconnect then resume")
    assert bot.ops.health.check()[1]["gateway_connected"] is True


async def test_healthz_turns_unhealthy_when_the_worker_is_stuck(
    discord_server: FakeDiscord, start_bot, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = discord_server
    monkeypatch.setattr(bot.ops.ops, "REFRESH_S", 0.2)
    port = free_port()
    pony = await start_bot(PONY_METRICS_PORT=port, PONY_HEALTH_STUCK_S=2)
    healthz = f"http://127.0.0.1:{port}/healthz"
    assert (await fetch(healthz))[0] == 200

    release = threading.Event()
    generator = pony.engine.generator
    original = generator.txt2img

    def hang(*args: Any, **kwargs: Any) -> Any:  # a generation that never reaches its first step
        release.wait(60)
        return original(*args, **kwargs)

    generator.txt2img = hang
    try:
        interaction = await fake.slash("pony", {"prompt": "stuck"})
        await interaction.wait_followup()

        async def unhealthy() -> dict | None:
            status, body = await fetch(healthz)
            return json.loads(body) if status == 503 else None

        data = await wait_until_async(unhealthy, 20, "/healthz 503")
        assert data["ok"] is False
        assert any("heartbeat" in reason for reason in data["reasons"]), data
        assert data["queue"]["running"] == 1
    finally:
        release.set()
    await fake.wait_for_message(is_result, timeout=60)

    async def healthy() -> bool:
        return (await fetch(healthz))[0] == 200

    await wait_until_async(healthy, 20, "/healthz 200 again")


async def test_pony_stats_matches_the_jobs_table(discord_server: FakeDiscord, start_bot) -> None:
    fake = discord_server
    pony = await start_bot()
    pony.worker.pause()
    first = await fake.slash("pony", {"prompt": "one", "count": 2})
    await first.wait_followup()
    second = await fake.slash("pony", {"prompt": "two", "count": 1, "sampler": "Euler a"}, user=fake.bob)
    await second.wait_followup()
    status = (await wait_until(lambda: job_messages(fake, 2), 10, "status of job 2"))[0]
    click = await fake.click(status.id, button_id(status, "Cancel"), user=fake.bob)
    await click.wait_followup()
    pony.worker.resume()
    await fake.wait_for_message(is_result, timeout=60)
    await wait_until_async(lambda: _status_is(pony, 1, "done"), 20, "job 1 done")

    interaction = await fake.slash("pony-stats")
    response = await interaction.wait_response()
    assert response.type == 5 and response.ephemeral
    reply = await interaction.wait_followup(timeout=60)
    assert reply.ephemeral
    assert [a.filename for a in reply.attachments] == ["ponybot-stats.png"]
    chart = Image.open(io.BytesIO(reply.attachments[0].data))
    assert chart.format == "PNG" and chart.size == (800, 400)
    embed = reply.embeds[0]
    assert embed["image"]["url"].endswith("/ponybot-stats.png")  # the chart shows inside the embed
    text = embed["description"]

    # the same numbers, read straight from the jobs table
    with sqlite3.connect(pony.settings.db_path) as db:
        rows = db.execute(
            "SELECT status, created_at, started_at, generated_at, result_files FROM jobs"
        ).fetchall()
    jobs = len(rows)
    images = sum(len(json.loads(files)) for status, *_, files in rows if status == "done")
    waits = [started - created for _, created, started, _, _ in rows if started is not None]
    runs = [generated - started for _, _, started, generated, _ in rows if generated is not None]
    assert (jobs, images, len(waits), len(runs)) == (2, 2, 1, 1)
    assert f"**Last 24 h:** {jobs} jobs, {images} images" in text
    assert f"**Last 7 days:** {jobs} jobs, {images} images" in text
    assert f"**Wait (7 d):** median {format_duration(waits[0], precise=True)}" in text
    assert f"**Run time (7 d):** median {format_duration(runs[0], precise=True)}" in text
    assert "**Top samplers (7 d):** DDIM (1), Euler a (1)" in text
    assert "**Outcomes (7 d):** done 1 · failed 0 · dead 0 · cancelled 1" in text

    about = await fake.slash("pony-about")
    response = await about.wait_response()
    assert response.type == 4 and response.ephemeral
    description = response.data["embeds"][0]["description"]
    assert "CreativeML Open RAIL-M" in description
    assert "`tiny-sd`" in description and bot_version() in description
    assert all(item in description for item in USE_RESTRICTIONS)


async def _status_is(pony: Any, job_id: int, status: str) -> bool:
    job = await pony.queue.get(job_id)
    return job is not None and job.status == status


async def test_buttons_on_a_pruned_result_re_create_the_image(
    discord_server: FakeDiscord, start_bot, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    fake = discord_server
    pony = await start_bot()
    original = await make_result(fake)
    await wait_until_async(lambda: _status_is(pony, 1, "done"), 20, "job 1 done")
    files = [pony.settings.images_dir / name for name in (await pony.queue.get(1)).result_files]
    assert all(path.exists() for path in files)

    conn = await connect(pony.settings.db_path)
    try:
        report = await prune(
            conn, pony.settings.images_dir, max_age_s=0, max_bytes=10**12, now=time.time() + 1
        )
    finally:
        await conn.close()
    assert report.jobs_pruned == [1]
    assert not any(path.exists() for path in files)
    assert (await pony.queue.get(1)).pruned_at is not None

    click = await fake.click(original.id, button_id(original, "U1"))
    await click.wait_followup()
    upscale = await fake.wait_for_message(
        lambda m: is_result(m) and m.embeds[0]["title"] == "Upscale", timeout=60
    )
    assert Image.open(io.BytesIO(upscale.attachments[0].data)).size == (128, 128)

    click = await fake.click(original.id, button_id(original, "V1"))
    await click.wait_followup()
    variation = await fake.wait_for_message(
        lambda m: is_result(m) and m.embeds[0]["title"] == "Variations", timeout=60
    )
    assert len(variation.attachments) == 2
    recreated = [r for r in caplog.records if r.getMessage() == "re-creating pruned image"]
    assert sorted(r.job_id for r in recreated) == [2, 3]
    assert all(r.parent_id == 1 for r in recreated)


async def test_retention_prunes_periodically(discord_server: FakeDiscord, start_bot) -> None:
    fake = discord_server
    # keep images about 0.1 s, prune every 0.3 s
    pony = await start_bot(PONY_RETENTION_DAYS="0.000001", PONY_RETENTION_EVERY_MIN="0.005")
    await make_result(fake)
    await wait_until_async(lambda: _status_is(pony, 1, "done"), 20, "job 1 done")

    async def pruned() -> bool:
        job = await pony.queue.get(1)
        return job is not None and job.pruned_at is not None

    await wait_until_async(pruned, 20, "job 1 pruned")
    job = await pony.queue.get(1)
    assert not any((pony.settings.images_dir / name).exists() for name in job.result_files)
    assert not (pony.settings.images_dir / "1").exists()
    assert Path(pony.settings.images_dir).is_dir()
