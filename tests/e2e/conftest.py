"""Fixtures that run the real bot against the loopback Discord.

The bot is started the way production starts it: `bot.app.run_bot(load_settings())` in-process
(fast, and lets fault tests reach inside), or the `ponybot run` console script as a subprocess
(for kill -9 and restart tests). Settings always come from the environment.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from discord_spec import STATS as SPEC_STATS
from fake_discord import FakeDiscord, FakeMessage, SpecViolation, created_fakes, take_created

from bot.app import run_bot
from bot.config import load_settings
from bot.discord_ui.services import Services
from bot.runtime.engine import EngineState

PONYBOT_SCRIPT = Path(sys.executable).with_name("ponybot")


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread while the test runs: on the shared 2-core machines OpenMP contention
    makes the tiny model several times slower (as in tests/generator/conftest.py)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_SPEC_REPORTED = pytest.StashKey[int]()  # violations already reported by the test's call phase


def _spec_failure(violations: list[SpecViolation]) -> str:
    lines = "\n".join(f"  {v.method} {v.route}: {v.json_path}: {v.message}" for v in violations)
    return f"request bodies that Discord's spec rejects (Discord answers 400 50035):\n{lines}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Fail the test itself when it (or the bot) sent a body that Discord's spec rejects."""
    outcome = yield
    violations = [v for fake in created_fakes() for v in fake.spec_violations]
    if violations and outcome.excinfo is None:  # type: ignore[attr-defined]
        item.stash[_SPEC_REPORTED] = len(violations)
        outcome.force_exception(pytest.fail.Exception(_spec_failure(violations), pytrace=False))  # type: ignore[attr-defined]


@pytest.fixture(autouse=True)
def no_spec_violations(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test if the bot (or the test) sent the loopback Discord a request body that Discord's
    OpenAPI spec rejects (route, field and the schema's message in the failure); bodies sent while
    the test body ran fail the test, later ones (shutdown) its teardown."""
    take_created()
    yield
    violations = [v for fake in take_created() for v in fake.spec_violations]
    late = violations[request.node.stash.get(_SPEC_REPORTED, 0) :]
    if late:
        pytest.fail(_spec_failure(late), pytrace=False)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """How many request bodies the spec check validated (and on how many route templates)."""
    if SPEC_STATS.validated or SPEC_STATS.unvalidated:
        terminalreporter.write_line(SPEC_STATS.summary())
        if terminalreporter.verbosity > 0:  # -v: which routes
            for route in sorted(SPEC_STATS.routes):
                terminalreporter.write_line(f"  validated: {route}")
            for route in sorted(SPEC_STATS.unvalidated_routes):
                terminalreporter.write_line(f"  no body schema: {route}")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD v1.x pipeline on disk (draws noise), written once per test session."""
    from generator.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny-sd")


@pytest.fixture
async def discord_server() -> AsyncIterator[FakeDiscord]:
    """A started loopback Discord."""
    fake = FakeDiscord()
    fake.interaction_deadline = 3.0
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


def bot_env(fake: FakeDiscord, data_dir: Path, model: Path, **extra: Any) -> dict[str, str]:
    """The environment a test bot runs with (small, fast defaults)."""
    env = {
        "DISCORD_TOKEN": fake.bot_token,
        "DISCORD_API_BASE": fake.api_base,
        "DISCORD_GATEWAY_URL": fake.gateway_url,
        "PONY_DATA_DIR": str(data_dir),
        "PONY_MODEL": str(model),
        "PONY_DEVICE": "cpu",
        "PONY_COOLDOWN_S": "0",
        "PONY_DEFAULT_STEPS": "3",
        "PONY_DEFAULT_COUNT": "2",
        "PONY_MAX_PIXELS": str(512 * 512),
        "PONY_BASE_RESOLUTION": "64",
        "PONY_BATCH_SIZE": "1",
        "PONY_LEASE_S": "30",
        "PONY_RETRY_BACKOFF_S": "0.2",
        "PONY_LOG_LEVEL": "INFO",
        "OMP_NUM_THREADS": "1",  # subprocess bots: same reason as one_torch_thread
        "PONY_CPU_THREADS": "1",  # the model load sets torch's threads: keep one_torch_thread's 1
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


class InProcessBot:
    """`run_bot` in this event loop, configured through the environment; `start` returns the bot's
    `Services` (its Discord client is `.client`)."""

    def __init__(self, env: dict[str, str], monkeypatch: pytest.MonkeyPatch):
        self.env = env
        self.monkeypatch = monkeypatch
        self.bot: Services | None = None
        self.task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    async def start(self, *, wait_model: bool = True) -> Services:
        for key, value in self.env.items():
            self.monkeypatch.setenv(key, value)
        settings = load_settings()
        self._stop = asyncio.Event()
        built: asyncio.Future[Services] = asyncio.get_running_loop().create_future()
        self.task = asyncio.create_task(
            run_bot(settings, handle_signals=False, stop=self._stop, started=built.set_result)
        )
        self.bot = await asyncio.wait_for(built, 10)
        await wait_until(lambda: self.bot.client.is_ready() or self.task.done(), 20, "bot ready")
        if self.task.done():
            self.task.result()
        if wait_model:
            await wait_until(lambda: self.bot.engine.state is not EngineState.LOADING, 60, "model loaded")
        return self.bot

    async def stop(self) -> None:
        if self.task is None:
            return
        self._stop.set()
        await asyncio.wait_for(self.task, 60)
        self.task = None


@pytest.fixture
async def start_bot(
    discord_server: FakeDiscord, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[..., Any]]:
    """`await start_bot(**env_overrides)` starts an in-process bot; all are stopped at the end."""
    bots: list[InProcessBot] = []

    async def start(*, wait_model: bool = True, **extra: Any) -> Services:
        runner = InProcessBot(bot_env(discord_server, tmp_path / "data", tiny_model, **extra), monkeypatch)
        bots.append(runner)
        return await runner.start(wait_model=wait_model)

    start.runners = bots  # type: ignore[attr-defined]
    yield start
    for runner in bots:
        await runner.stop()


class SubprocessBot:
    """`ponybot run` as a child process (what systemd runs)."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([str(PONYBOT_SCRIPT), "run"], env=self.env, stdout=log, stderr=log)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


async def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `check` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def wait_until_async(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll the coroutine function `check` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def embed_footer(message: FakeMessage) -> str | None:
    """The footer text of a message's first embed."""
    return ((message.embeds or [{}])[0].get("footer") or {}).get("text")


def job_messages(fake: FakeDiscord, job_id: int, channel_id: int | None = None) -> list[FakeMessage]:
    """Live (not deleted) channel messages whose footer names the job."""
    channel = channel_id or fake.channel_id
    return [m for m in fake.channel_messages(channel) if embed_footer(m) == f"ponybot job #{job_id}"]


def is_result(message: FakeMessage) -> bool:
    """A finished result: the green embed with PNG attachments."""
    return (
        bool(message.attachments)
        and bool(message.embeds)
        and message.embeds[0].get("title")
        in (
            "Image",
            "Upscale",
            "Variations",
        )
    )


def slow_down_generation(bot: Services, per_step_s: float) -> None:
    """Make every generator call sleep `per_step_s` at each step (in the GPU thread), so tests can
    act while a job is running. Cancellation and progress keep working."""
    generator = bot.engine.generator
    for name in ("txt2img", "txt2img_batch", "variation", "upscale"):
        original = getattr(generator, name)

        def slowed(*args: Any, __original: Any = original, progress: Any = None, **kwargs: Any) -> Any:
            def sleepy(step: int, total: int, preview: Any = None) -> None:
                time.sleep(per_step_s)
                if progress is not None:
                    progress(step, total, preview)

            return __original(*args, progress=sleepy, **kwargs)

        setattr(generator, name, slowed)


async def job_status(bot: Services, job_id: int) -> str | None:
    """The job's status in the database."""
    job = await bot.queue.get(job_id)
    return None if job is None else str(job.status)


async def wait_for_status(bot: Services, job_id: int, status: str, timeout: float) -> bool:
    """Poll the database until the job has `status`; AssertionError after `timeout` seconds."""

    async def has_status() -> bool:
        return await job_status(bot, job_id) == status

    return await wait_until_async(has_status, timeout, f"job #{job_id} {status}")
