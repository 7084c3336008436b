"""`ponybot worker` and `ponybot run --no-worker`: the worker half and the gateway half of ponybot.

The worker process logs in over REST only and drains a PostgreSQL queue (a throwaway server,
tests/pg_server.py): it must deliver a job's image as one message without ever opening a gateway
connection or syncing commands. A gateway without a local worker answers /pony and queues, and
nothing in it claims the job.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    PONYBOT_SCRIPT,
    bot_env,
    is_result,
    job_messages,
    slow_down_generation,
    wait_until,
    wait_until_async,
)
from fake_discord import FakeDiscord

from bot.app import WorkerProcess, run_worker
from bot.config import load_settings
from bot.discord_ui.commands.admin import NO_LOCAL_WORKER
from bot.jobs.models import JobKind, JobStatus, QueueLimits
from bot.jobs.pg_queue import PgJobQueue
from bot.runtime.engine import EngineState
from bot.runtime.worker import WorkerState
from generator.params import GenerationParams


class WorkerRunner:
    """`run_worker` in this event loop, configured through the environment (as `ponybot worker`)."""

    def __init__(self, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
        self.env = env
        self.monkeypatch = monkeypatch
        self.stop_event = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.process: WorkerProcess | None = None

    async def start(self) -> WorkerProcess:
        for key, value in self.env.items():
            self.monkeypatch.setenv(key, value)
        built: asyncio.Future[WorkerProcess] = asyncio.get_running_loop().create_future()
        self.task = asyncio.create_task(
            run_worker(load_settings(), handle_signals=False, stop=self.stop_event, started=built.set_result)
        )
        done, _ = await asyncio.wait({built, self.task}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if self.task in done:
            self.task.result()
        assert built in done, "the worker process did not start"
        self.process = built.result()
        await wait_until(lambda: self.process.engine.state is not EngineState.LOADING, 60, "model loaded")
        return self.process

    async def stop(self) -> None:
        if self.task is None:
            return
        self.stop_event.set()
        await asyncio.wait_for(self.task, 60)
        self.task = None


@pytest.fixture
async def start_worker(
    discord_server: FakeDiscord,
    tiny_model: Path,
    tmp_path: Path,
    pg_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Callable[..., Any]]:
    """`await start_worker(**env)`: a `ponybot worker` on the test's PostgreSQL database."""
    runners: list[WorkerRunner] = []

    async def start(**extra: Any) -> WorkerProcess:
        env = bot_env(discord_server, tmp_path / "worker-data", tiny_model, PONY_DATABASE_URL=pg_url, **extra)
        runner = WorkerRunner(env, monkeypatch)
        runners.append(runner)
        return await runner.start()

    start.runners = runners  # type: ignore[attr-defined]
    yield start
    for runner in runners:
        await runner.stop()


async def enqueue(pg_url: str, fake: FakeDiscord, images_dir: Path, *, seed: int = 7) -> int:
    """Queue a one-image txt2img job for alice in the test channel, as a gateway would."""
    params = GenerationParams(prompt="a pony", seed=seed, steps=3, width=64, height=64, count=1)
    queue = await PgJobQueue.open(pg_url, QueueLimits(), images_dir=images_dir)
    try:
        job, _ = await queue.enqueue(
            kind=JobKind.TXT2IMG,
            params=params.to_dict(),
            channel_id=fake.channel_id,
            guild_id=fake.guild_id,
            user_id=fake.alice.id,
        )
    finally:
        await queue.close()
    return job.id


@pytest.mark.postgres
async def test_worker_delivers_over_rest_without_a_gateway(
    discord_server: FakeDiscord, start_worker: Callable[..., Any], pg_url: str, tmp_path: Path
) -> None:
    fake = discord_server
    worker = await start_worker()
    job_id = await enqueue(pg_url, fake, tmp_path / "gateway-images")

    result = await fake.wait_for_message(is_result, timeout=60)
    assert job_messages(fake, job_id) == [result], "one message for the job"
    assert [a.filename for a in result.attachments] == [f"ponybot-{job_id}-1.png"]
    assert result.author_id == fake.bot_user_id

    async def done() -> bool:
        job = await worker.queue.get(job_id)
        return job is not None and job.status is JobStatus.DONE

    await wait_until_async(done, 30, "job done")
    job = await worker.queue.get(job_id)
    assert job is not None and job.result_message_id == result.id
    assert fake.gateway_connections == 0 and fake.identify_count == 0, "the worker opened a gateway"
    assert not fake.requests_matching("*", r"/commands"), "the worker touched the slash commands"
    assert worker.worker.state in (WorkerState.IDLE, WorkerState.GENERATING)


@pytest.mark.postgres
async def test_worker_releases_its_running_job_on_stop(
    discord_server: FakeDiscord, start_worker: Callable[..., Any], pg_url: str, tmp_path: Path
) -> None:
    fake = discord_server
    worker = await start_worker(PONY_SHUTDOWN_GRACE_S="0.1")
    generator = worker.engine.generator
    original = generator.txt2img

    def stuck(*args: Any, should_cancel: Any = None, **kwargs: Any) -> Any:
        import time

        while not (should_cancel and should_cancel()):
            time.sleep(0.02)
        return original(*args, should_cancel=should_cancel, **kwargs)

    generator.txt2img = stuck  # runs until the stopping worker asks it to stop
    job_id = await enqueue(pg_url, fake, tmp_path / "gateway-images")

    async def running() -> bool:
        job = await worker.queue.get(job_id)
        return job is not None and job.status is JobStatus.RUNNING

    await wait_until_async(running, 30, "job running")
    runner = start_worker.runners[0]  # type: ignore[attr-defined]
    await runner.stop()
    queue = await PgJobQueue.open(pg_url, QueueLimits(), images_dir=tmp_path / "gateway-images")
    try:
        job = await queue.get(job_id)
    finally:
        await queue.close()
    assert job is not None and job.status is JobStatus.QUEUED, "the stopped worker put its job back"
    assert job.lease_owner is None


async def queued_answer(fake: FakeDiscord) -> str:
    """Run /pony as alice and return the text of its (ephemeral) answer."""
    interaction = await fake.slash("pony", {"prompt": "a pony", "seed": 3, "count": 1})
    answer = await interaction.wait_followup()
    return str(answer.content)


async def test_gateway_without_local_worker_queues_and_claims_nothing(
    discord_server: FakeDiscord, start_bot: Callable[..., Any]
) -> None:
    fake = discord_server
    bot = await start_bot(wait_model=False, PONY_LOCAL_WORKER="false")
    answer = await queued_answer(fake)
    assert answer.startswith("Queued as job #1")
    assert "still loading" not in answer, "the model this process never loads is not the member's concern"
    status = await fake.wait_for_message(lambda m: job_messages(fake, 1) == [m], timeout=10)
    await asyncio.sleep(3)  # several claim intervals: a started worker would have taken it
    job = await bot.queue.get(1)
    assert job is not None and job.status is JobStatus.QUEUED and job.lease_owner is None
    assert job.status_message_id == status.id
    assert bot.worker.state is WorkerState.ELSEWHERE
    assert bot.engine.state is EngineState.LOADING, "no worker here: the model is never loaded"
    assert not any(is_result(m) for m in fake.channel_messages(fake.channel_id))
    for subcommand in ("pause", "resume"):  # there is no worker here to pause
        interaction = await fake.slash("pony-admin", {}, subcommand=subcommand, user=fake.admin)
        assert (await interaction.wait_followup()).content == NO_LOCAL_WORKER
    interaction = await fake.slash("pony-admin", {}, subcommand="status", user=fake.admin)
    status_lines = str((await interaction.wait_followup()).content).splitlines()
    assert "Worker: none in this process (ponybot worker runs the jobs)" in status_lines
    assert not bot.worker.paused


async def test_run_no_worker_flag_serves_commands_and_leaves_jobs_queued(
    discord_server: FakeDiscord, tiny_model: Path, tmp_path: Path
) -> None:
    import sqlite3

    fake = discord_server
    env = {**os.environ, **bot_env(fake, tmp_path / "data", tiny_model)}
    env.pop("PONY_LOCAL_WORKER", None)
    log = (tmp_path / "bot.log").open("wb")
    proc = subprocess.Popen([str(PONYBOT_SCRIPT), "run", "--no-worker"], env=env, stdout=log, stderr=log)
    try:
        await fake.wait_until_connected(timeout=30)
        await wait_until(lambda: fake.find_command("pony") is not None, 30, "commands synced")
        assert (await queued_answer(fake)).startswith("Queued as job #1")
        await asyncio.sleep(3)
        with sqlite3.connect(tmp_path / "data" / "jobs.sqlite3") as conn:
            row = conn.execute("SELECT status, lease_owner FROM jobs WHERE id = 1").fetchone()
        assert row == ("queued", None), "nothing claimed the job"
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 60)
        log.close()
    assert code == 0, (tmp_path / "bot.log").read_text(errors="replace")


@pytest.mark.postgres
async def test_worker_with_a_refused_token_is_one_line(
    discord_server: FakeDiscord, tiny_model: Path, tmp_path: Path, pg_url: str
) -> None:
    fake = discord_server
    env = {
        **os.environ,
        **bot_env(fake, tmp_path / "data", tiny_model, PONY_DATABASE_URL=pg_url),
        "DISCORD_TOKEN": "not-the-token",
    }
    result = await asyncio.to_thread(
        subprocess.run, [str(PONYBOT_SCRIPT), "worker"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 3
    assert result.stderr.strip().splitlines()[-1] == (
        "Discord refused the token: check DISCORD_TOKEN (Developer Portal > Bot > Reset Token)."
    )
    assert "Traceback" not in result.stderr
    assert fake.gateway_connections == 0


@pytest.mark.postgres
async def test_a_gateway_and_a_worker_on_two_machines_share_one_queue(
    discord_server: FakeDiscord,
    start_bot: Callable[..., Any],
    start_worker: Callable[..., Any],
    pg_url: str,
    tmp_path: Path,
) -> None:
    """`ponybot run --no-worker` answers /pony, a `ponybot worker` (its own images folder) makes
    and posts the result into the gateway's status message, /pony-info on the gateway posts it
    again from the images the worker shared, and Cancel on the gateway stops the worker's job."""
    fake = discord_server
    worker = await start_worker()
    gateway = await start_bot(wait_model=False, PONY_LOCAL_WORKER="false", PONY_DATABASE_URL=pg_url)
    assert gateway.worker.state is WorkerState.ELSEWHERE

    assert (await queued_answer(fake)).startswith("Queued as job #1")
    result = await fake.wait_for_message(is_result, timeout=60)
    assert job_messages(fake, 1) == [result], "the worker edited the gateway's status message"
    assert await wait_until_async(lambda: _status(gateway, 1, JobStatus.DONE), 30, "job 1 done")
    assert not (gateway.settings.images_dir / "1").exists(), "made on the worker's machine"

    info = await fake.slash("pony-info", {"job": 1})
    assert (await info.wait_followup()).content == "Posted job #1 again below."
    repost = await wait_until(lambda: [m for m in job_messages(fake, 1) if m.id != result.id], 10, "re-post")
    assert [a.data for a in repost[0].attachments] == [a.data for a in result.attachments]

    slow_down_generation(worker, 0.3)  # type: ignore[arg-type]
    interaction = await fake.slash("pony", {"prompt": "a long one", "steps": 30, "count": 1})
    await interaction.wait_followup()
    await wait_until_async(lambda: _status(gateway, 2, JobStatus.RUNNING), 30, "job 2 running")
    status = job_messages(fake, 2)[0]
    cancel = next(cid for label, cid in status.buttons() if label == "Cancel")
    click = await fake.click(status.id, cancel)
    assert (await click.wait_followup()).content == "Stopping job #2…"
    await wait_until_async(lambda: _status(gateway, 2, JobStatus.CANCELLED), 30, "job 2 cancelled")
    notice = await wait_until(
        lambda: fake.messages[status.id].embeds[0]["title"] == "Cancelled" and fake.messages[status.id],
        10,
        "cancel notice",
    )
    assert not notice.attachments
    assert fake.gateway_connections == 1, "only the gateway process connected"


async def _status(bot: Any, job_id: int, status: JobStatus) -> bool:
    job = await bot.queue.get(job_id)
    return job is not None and job.status is status
